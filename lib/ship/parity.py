"""The parity check: the GGUF run by llama.cpp against merged/ in transformers, and its table.

    from lib.ship.parity import check_parity, parity_table
    report = check_parity(merged_dir, gguf_path, cfg, examples, "q8_0")   # export/parity.json
    parity_table(report)                                                  # notebook 06

Both sides decode greedy with no repetition penalty on the eval prompts (llama.cpp through
llama-cpp-python):
- prompt tokens: the rendered prompt tokenizes to the same ids in llama.cpp (also when rendered
  from the template inside the GGUF, and from the Modelfile's template);
- greedy agreement: share of answers whose first `export.parity_tokens` tokens are identical;
- perplexity of the eval answers from llama.cpp's logits vs transformers', relative drift;
- stop rate on both sides (llama.cpp stops at the tokens the GGUF marks end-of-generation).
A figure beyond its tolerance (`export.*`, else the type's default below) sets "ok": false with one
line per figure in "failures".
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from lib.data.prompts import render_prompt
from lib.data.templates import stop_token_ids
from lib.data.tokenization import IGNORE_INDEX, encode_example
from lib.evaluate.scoring import perplexity
from lib.evaluate.verdict import form_comparison
from lib.model.generation import eval_conversations, generate_reply, model_context
from lib.model.loading import load_merged
from lib.run.errors import SFTError
from lib.run.formatting import table
from lib.run.hardware import release
from lib.run.settings import GenerationSettings
from lib.ship.ollama import render_with_pieces, template_pieces

# Default tolerances by type: (relative perplexity drift, smallest greedy agreement).
# Greedy answers fork at the first near-tie, so quantized types are not held to an agreement (measured on
# SmolLM2-135M: q8_0 drifts 0.34% in perplexity, yet 6 of 8 answers fork within 14 tokens).
TOLERANCES = {"f32": (0.01, 0.75), "f16": (0.01, 0.75), "bf16": (0.01, 0.75), "q8_0": (0.03, 0.0)}
LOW_BIT_TOLERANCE = (0.15, 0.0)


def tolerances(cfg, quant: str) -> tuple[float, float]:
    """(relative perplexity drift, smallest greedy agreement) for `quant`: the config's or the type's default."""
    ppl, agree = TOLERANCES.get(quant, LOW_BIT_TOLERANCE)
    e = cfg.export
    return (ppl if e.ppl_tolerance is None else e.ppl_tolerance,
            agree if e.min_agreement is None else e.min_agreement)


def load_gguf(path, n_ctx: int):
    """A GGUF file in llama.cpp (llama-cpp-python), keeping the logits of every position."""
    from llama_cpp import Llama

    # Half the cores: llama.cpp's threads wait for each other spinning, and next to torch's thread pool
    # (already started by the transformers side) all cores made decoding ~10x slower on 2 cores.
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(512, n_ctx), logits_all=True, verbose=False,
                 n_threads=max(1, (os.cpu_count() or 2) // 2), seed=0)


def _gguf_is_eog(llm, token_id: int) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token_id))


def llama_greedy(llm, prompt_ids: list[int], max_new_tokens: int) -> dict:
    """Greedy answer in llama.cpp (argmax of its logits, no repetition penalty); stops where llama.cpp
    does, at a token the GGUF marks end-of-generation. Same shape as lib.model.generation.generate_reply."""
    import numpy as np

    llm.reset()
    llm.eval(prompt_ids)
    new: list[int] = []
    while len(new) < max_new_tokens:
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        new.append(tok)
        if _gguf_is_eog(llm, tok) or llm.n_tokens >= llm.n_ctx():
            break
        llm.eval([tok])
    return {"token_ids": new, "stopped": bool(new) and _gguf_is_eog(llm, new[-1])}


def llama_perplexity(llm, tokenizer, examples, max_length) -> dict:
    """Perplexity over the same answer tokens as lib.evaluate.scoring.perplexity, from llama.cpp's logits."""
    import numpy as np

    nll, count = 0.0, 0
    for ex in examples:
        enc = encode_example(tokenizer, ex, max_length)
        ids, labels = enc["input_ids"], enc["labels"]
        where = [t for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX]
        if not where:
            continue
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[:len(ids)], dtype=np.float64)
        rows = logits[[t - 1 for t in where]]
        top = rows.max(axis=1, keepdims=True)
        logz = (top[:, 0] + np.log(np.exp(rows - top).sum(axis=1)))
        nll += float((logz - rows[np.arange(len(where)), [labels[t] for t in where]]).sum())
        count += len(where)
    loss = nll / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}


def _gguf_template_ids(llm, messages) -> list[int] | None:
    """Prompt ids as llama-cpp-python's chat completion makes them from the template inside the GGUF."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    bos, eos = llm.token_bos(), llm.token_eos()
    text = lambda t: llm._model.token_get_text(t) if t != -1 else ""  # noqa: E731
    formatter = Jinja2ChatFormatter(template=template, eos_token=text(eos), bos_token=text(bos))
    rendered = formatter(messages=messages)
    return llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)


def gguf_add_bos(llm) -> bool:
    return str(llm.metadata.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"


def _parity_failures(e, n_prompts, same_prompt, eog, ppl, greedy, stop) -> list[str]:
    """One line per parity figure that misses its tolerance."""
    drift, ppl_ll, ppl_hf, ppl_tol = ppl
    agree, n, min_agree = greedy
    stop_ll, stop_hf = stop
    failures = []
    if same_prompt < n_prompts:
        failures.append(f"prompt tokens: {n_prompts - same_prompt} of {n_prompts} prompts tokenize differently "
                        "in llama.cpp (must be 0)")
    if not all(eog.values()):
        failures.append(f"stop tokens: {[t for t, ok in eog.items() if not ok]} are not end-of-generation in the "
                        "GGUF (llama.cpp would not stop there)")
    if not drift <= ppl_tol:
        failures.append(f"perplexity drift {drift:.2%} ({ppl_ll['perplexity']:.6g} llama.cpp vs "
                        f"{ppl_hf['perplexity']:.6g} transformers) > export.ppl_tolerance {ppl_tol:g}")
    if not agree >= min_agree:
        failures.append(f"greedy agreement {agree:.0%} over the first {n} tokens < export.min_agreement {min_agree:g}")
    if not abs(stop_ll - stop_hf) <= e.stop_rate_tolerance:
        failures.append(f"stop rate {stop_ll:.0%} llama.cpp vs {stop_hf:.0%} transformers differs by more than "
                        f"export.stop_rate_tolerance {e.stop_rate_tolerance:g}")
    return failures


def _first_differences(hf_answers, ll_answers) -> list:
    """Per prompt, the first position where the two greedy answers differ (None: identical)."""
    return [next((i for i, (a, b) in enumerate(zip(h["token_ids"], g["token_ids"])) if a != b), None)
            for h, g in zip(hf_answers, ll_answers)]


def _transformers_side(model_dir, chosen, examples, cfg, greedy, progress):
    """merged/ in transformers: (tokenizer, prompt ids, greedy answers, perplexity)."""
    from tqdm.auto import tqdm

    model, tokenizer = load_merged(model_dir)
    prompts = [tokenizer(render_prompt(tokenizer, c[1]), add_special_tokens=False)["input_ids"] for c in chosen]
    hf_answers = [generate_reply(model, tokenizer, c[1], settings=greedy)
                  for c in tqdm(chosen, desc="greedy answers (transformers)", unit="prompt", disable=not progress)]
    ppl_hf = perplexity(model, tokenizer, examples, cfg.eval.batch_size, cfg.train.max_length,
                        desc="perplexity (transformers)", progress=progress)
    del model
    release()
    return tokenizer, prompts, hf_answers, ppl_hf


def _served(cfg, chosen, examples, tokenizer, hf_answers, ll_answers, quant) -> dict:
    """The GGUF's task scores against merged/'s (lib/evaluate/verdict.py), its answers decoded as transformers
    decodes its own."""
    for a in ll_answers:
        a["text"] = tokenizer.decode(a["token_ids"], skip_special_tokens=True).strip()
    return form_comparison(cfg, chosen, examples, {"merged (transformers)": hf_answers,
                                                   f"GGUF {quant} (llama.cpp)": ll_answers})


def merged_context(model_dir) -> int | None:
    """The positions of the merged model (its config.json), or None where it does not say."""
    from lib.run.rundir import read_json

    try:
        return model_context(read_json(Path(model_dir) / "config.json"))
    except SFTError:
        return None


def parity_budget(prompt_lengths: list[int], max_new_tokens: int, max_length: int, context: int | None):
    """The new tokens each greedy answer may take in llama.cpp and the context to allocate: what the model's
    context leaves after each prompt, as transformers' side cuts it (bounded_new_tokens), never the raw
    generation.max_new_tokens (2147483647 would ask llama.cpp for a context of two billion positions)."""
    budgets = [min(max_new_tokens, max(1, context - n)) if context else max_new_tokens for n in prompt_lengths]
    n_ctx = max([max_length] + [n + b + 1 for n, b in zip(prompt_lengths, budgets)]) + 8
    return budgets, n_ctx


def check_parity(model_dir, gguf_path, cfg, examples: list[dict], quant: str, progress: bool = True) -> dict:
    """Compare the GGUF in llama.cpp with merged/ in transformers (see the module docstring)."""
    from tqdm.auto import tqdm

    e = cfg.export
    max_length = cfg.train.max_length
    greedy = GenerationSettings(max_new_tokens=cfg.generation.max_new_tokens, do_sample=False,
                                repetition_penalty=1.0, no_repeat_ngram_size=0)
    chosen = eval_conversations(examples)[:e.parity_examples]
    # transformers first, then llama.cpp: both spin up CPU threads, and interleaved they fight for the cores.
    tokenizer, prompts, hf_answers, ppl_hf = _transformers_side(model_dir, chosen, examples, cfg, greedy, progress)
    stops = stop_token_ids(tokenizer)
    pieces = template_pieces(tokenizer)

    budgets, n_ctx = parity_budget([len(p) for p in prompts], greedy.max_new_tokens, max_length, merged_context(model_dir))
    llm = load_gguf(gguf_path, n_ctx)
    add_bos = gguf_add_bos(llm)
    same_prompt = same_gguf_template = same_modelfile = 0
    ll_answers = []
    for (_, messages, _), ids in tqdm(list(zip(chosen, prompts)), desc=f"greedy answers (llama.cpp, {quant})",
                                      unit="prompt", disable=not progress):
        text = render_prompt(tokenizer, messages)
        same_prompt += llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids
        same_gguf_template += _gguf_template_ids(llm, messages) == ids
        if pieces is not None:
            ollama_text = (pieces["head"] if not add_bos else "") + render_with_pieces(pieces, messages)
            same_modelfile += llm.tokenize(ollama_text.encode("utf-8"), add_bos=add_bos, special=True) == ids
        ll_answers.append(llama_greedy(llm, ids, budgets.pop(0)))  # the same prompt ids on both sides
    ppl_ll = llama_perplexity(llm, tokenizer, examples, max_length)
    eog = {t: _gguf_is_eog(llm, t) for t in stops}
    del llm

    k, n = max(len(chosen), 1), e.parity_tokens
    agree = sum(h["token_ids"][:n] == g["token_ids"][:n] for h, g in zip(hf_answers, ll_answers)) / k
    first_diff = _first_differences(hf_answers, ll_answers)
    drift = abs(ppl_ll["perplexity"] - ppl_hf["perplexity"]) / ppl_hf["perplexity"]
    stop_hf, stop_ll = (sum(a["stopped"] for a in answers) / k for answers in (hf_answers, ll_answers))
    ppl_tol, min_agree = tolerances(cfg, quant)
    failures = _parity_failures(e, len(chosen), same_prompt, eog, (drift, ppl_ll, ppl_hf, ppl_tol),
                                (agree, n, min_agree), (stop_ll, stop_hf))
    return {
        "ok": not failures,
        "failures": failures,
        "quant": quant,
        "gguf": Path(gguf_path).name,
        "gguf_mb": round(Path(gguf_path).stat().st_size / 2**20, 2),
        "prompts": len(chosen),
        "prompt_tokens": {"identical": same_prompt, "identical_from_gguf_template": same_gguf_template,
                          "identical_from_modelfile_template": same_modelfile if pieces is not None else None},
        "greedy": {"tokens": n, "agreement": agree, "min_agreement": min_agree, "first_difference": first_diff,
                   "max_new_tokens": greedy.max_new_tokens},
        "perplexity": {"llama_cpp": ppl_ll, "transformers": ppl_hf, "relative_drift": drift, "tolerance": ppl_tol},
        "stop_rate": {"llama_cpp": stop_ll, "transformers": stop_hf, "tolerance": e.stop_rate_tolerance},
        "stop_tokens": {"ids": stops, "tokens": tokenizer.convert_ids_to_tokens(stops),
                        "end_of_generation_in_gguf": all(eog.values())},
        "add_bos": add_bos,
        "decoding": "greedy (argmax) on both sides, repetition penalty 1.0, the same prompt token ids",
        "task_scores": _served(cfg, chosen, examples, tokenizer, hf_answers, ll_answers, quant),
    }


def _served_rows(ts: dict | None) -> list[tuple]:
    """The GGUF's task scores against merged/'s on the same prompts and greedy decoding (the form it ships in)."""
    if not ts or not ts.get("rows"):
        return []
    return [(f"task score as served: {r['metric']}", f"{100 * r['tuned']:.0f}% vs {100 * r['base']:.0f}%",
             f"not checked: the GGUF vs merged/ {r['difference'] * 100:+.0f} points (95% CI {r['ci95'][0] * 100:+.0f} "
             f"to {r['ci95'][1] * 100:+.0f}, n={r['n']}): {r['verdict']}") for r in ts["rows"]]


def parity_table(report: dict):
    """The parity report for notebook 06: each figure, and what it means (its tolerance, what would be alarming)."""
    import pandas as pd

    p, g, s, t = report["perplexity"], report["greedy"], report["stop_rate"], report["prompt_tokens"]
    n = report["prompts"]
    rows = [
        ("GGUF", f"{report['gguf']} ({report['gguf_mb']:,.1f} MB)", "the file llama.cpp, Ollama and LM Studio load"),
        ("prompts with identical tokens (llama.cpp / GGUF template / Modelfile)",
         f"{t['identical']} / {t['identical_from_gguf_template']} / {t['identical_from_modelfile_template']} of {n}",
         "checked: must be all; fewer means llama.cpp feeds the model other text than training did"),
        (f"greedy answers identical over {g['tokens']} tokens", f"{g['agreement']:.0%}",
         (f"checked: passes at {g['min_agreement']:.0%} or more" if g["min_agreement"] else
          "not held to a minimum (export.min_agreement 0)") + ". A quantized GGUF shifts logits a little, so greedy "
         "answers fork at the first near-tie and may still be good; 0% with a high drift would be alarming"),
        ("perplexity llama.cpp / transformers", f"{p['llama_cpp']['perplexity']:.6g} / {p['transformers']['perplexity']:.6g}",
         "the same answer tokens scored by both"),
        ("relative perplexity drift", f"{p['relative_drift']:.2%}",
         f"checked: passes up to {p['tolerance'] * 100:.3g}% (export.ppl_tolerance, by GGUF type); the cost of the "
         "GGUF's precision. Far beyond it: a wrong conversion"),
        ("stop rate llama.cpp / transformers", f"{s['llama_cpp']:.0%} / {s['transformers']:.0%}",
         f"checked: may differ by up to {s.get('tolerance', 0):.0%} (export.stop_rate_tolerance)"),
        ("stop tokens end generation in the GGUF", "yes" if report["stop_tokens"]["end_of_generation_in_gguf"] else "NO",
         "checked: otherwise llama.cpp would run past the answer"),
        *_served_rows(report.get("task_scores")),
        ("check", "ok" if report["ok"] else "FAILED: " + "; ".join(report["failures"]), "every checked line passes"),
    ]
    return table(pd.DataFrame(rows, columns=["measure", "value", "what it means"]).set_index("measure"))

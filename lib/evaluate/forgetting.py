"""The forgetting check of evaluation (04): how much less likely the tuned model finds what the base model says
to general prompts that have nothing to do with the training data. Needs no download and no reference answers.

    python -m lib evaluate --run demo [--set eval.general_prompts=my_prompts.jsonl]

    from lib.evaluate.forgetting import forgetting_check, reading
    result = forgetting_check(model, tokenizer, cfg, paths)   # the adapter on = tuned, off = base

The prompts (`eval.general_prompts`, by default data/general_prompts.jsonl: a few dozen general-knowledge,
arithmetic, coding, writing and advice questions) are answered by the base model (the adapter switched off),
greedy, at most `eval.general_max_new_tokens` tokens; those answers are the references. They are made once per
base model, prompts and settings and cached in eval/forgetting_base.jsonl. Then both models score the
answer tokens (as the training loss would, lib.data.tokenization.encode_example): the result is the tuned model's
perplexity over the base model's, `ratio` (1.0: nothing forgotten; 1.3: the tuned model finds the base
model's general answers 1.3x less likely per token), and the mean per-token KL divergence KL(base || tuned)
of the next-token distributions over the same tokens (nats; 0 when the models agree).

What it shows: how far tuning moved the model away from its own general behaviour. What it does not:
whether those answers were right (a tuned model can drift from a wrong base answer and be better), nor
ability on any benchmark; a ratio near 1 on a few dozen prompts is no proof that nothing was lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math

from lib.data.readers import load_records, read_examples
from lib.data.templates import TemplateError
from lib.data.tokenization import IGNORE_INDEX, encode_example
from lib.evaluate.scoring import padded_batch
from lib.model.generation import generate_answers, model_device, pad_id
from lib.model.oom import in_batches
from lib.run.errors import ConfigError, SFTError
from lib.run.paths import resolve_repo_path
from lib.run.realmodel import weights_fingerprint
from lib.run.rundir import write_jsonl


def _general_records(path) -> list[tuple[list[dict], object]]:
    """(conversation, RawRecord) for each record of a general prompts file, read by the data reader (a FIFO,
    folder, binary or non-UTF-8 file, a 5,000-digit number, deep nesting, a lone surrogate: one line naming the
    file and line, as for training data): {"prompt": text} or {"messages": [...]} ending with the user's turn."""
    file = resolve_repo_path(path)
    if not file.is_file():
        raise ConfigError(f"eval.general_prompts: {path} is not a file (a JSONL file of prompt or messages "
                          "records; None skips the forgetting check)")
    out = []
    for raw in load_records(str(file)).records:
        rec = raw.record
        if isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and rec["prompt"].strip():
            out.append(([{"role": "user", "content": rec["prompt"]}], raw))
        elif isinstance(rec, dict) and isinstance(rec.get("messages"), list) and rec["messages"] \
                and isinstance(rec["messages"][-1], dict) and rec["messages"][-1].get("role") == "user":
            for i, m in enumerate(rec["messages"]):
                if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                    raise raw.error("not a message with a text role and content", field=f"messages[{i}]")
            out.append(([{"role": m["role"], "content": m["content"]} for m in rec["messages"]], raw))
        else:
            raise raw.error("not a {\"prompt\": text} or {\"messages\": [...]} record ending with the user's turn")
    return out


def load_general_prompts(path) -> list[list[dict]]:
    """The conversations of a general prompts file (_general_records)."""
    return [conversation for conversation, _ in _general_records(path)]


def check_general_prompts(cfg, tokenizer) -> list[list[dict]]:
    """The conversations the forgetting check will use, each encoded once with the tokenizer first, so that
    one the chat template refuses (the end-of-turn token as text, ...) is one line naming its file and line
    before any evaluation runs, not a traceback after it; [] when eval.general_prompts is None."""
    if not cfg.eval.general_prompts:
        return []
    records = _general_records(cfg.eval.general_prompts)[:cfg.eval.general_examples]
    for conversation, raw in records:
        try:
            encode_example(tokenizer, {"messages": [*conversation, {"role": "assistant", "content": "."}]}, None)
        except TemplateError as e:
            raise raw.error(str(e)) from None
    return [conversation for conversation, _ in records]


def cache_key(cfg, conversations) -> str:
    """What the base model's answers depend on: the model and its weights (realmodel.weights_fingerprint), its
    quantization, the prompt format, the prompts and the generation settings."""
    what = {"model": cfg.model.name_or_path, "weights": weights_fingerprint(cfg.model.name_or_path),
            "quant": dataclasses.asdict(cfg.quant),
            "prompt_format": cfg.data.prompt_format, "system_prompt": cfg.data.system_prompt,
            "max_new_tokens": cfg.eval.general_max_new_tokens, "max_length": cfg.train.max_length,
            "repetition_penalty": cfg.generation.repetition_penalty,
            "no_repeat_ngram_size": cfg.generation.no_repeat_ngram_size, "prompts": conversations}
    return hashlib.sha256(json.dumps(what, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def base_answers(model, tokenizer, cfg, paths, conversations, progress: bool = True) -> list[dict]:
    """The base model's greedy answers ({"messages", "answer", "stopped", "key"} rows): from
    eval/forgetting_base.jsonl when it was made for the same key, else generated (the adapter off) and cached."""
    key = cache_key(cfg, conversations)
    try:
        cached = read_examples(paths.forgetting_base) if paths.forgetting_base.exists() else []
    except SFTError:  # a damaged cache is made again
        cached = []
    whole = all(isinstance(r, dict) and r.get("key") == key and isinstance(r.get("answer"), str)
                and isinstance(r.get("messages"), list) and isinstance(r.get("stopped"), bool) for r in cached)
    if len(cached) == len(conversations) and whole:  # a damaged or other row: made again
        return cached
    settings = dataclasses.replace(cfg.generation, do_sample=False, max_new_tokens=cfg.eval.general_max_new_tokens)
    disable = getattr(model, "disable_adapter", None)
    with disable() if disable is not None else contextlib.nullcontext():
        answers = generate_answers(model, tokenizer, conversations, settings, cfg.eval.batch_size,
                                   desc="forgetting check (base answers)", progress=progress,
                                   max_length=cfg.train.max_length)
    rows = [{"key": key, "messages": c, "answer": a["text"], "stopped": a["stopped"]}
            for c, a in zip(conversations, answers)]
    write_jsonl(paths.forgetting_base, rows)
    return rows


def compare_models(model, tokenizer, examples, batch_size: int = 8, max_length: int | None = None,
                   desc: str = "forgetting check", progress: bool = True) -> dict:
    """The base (adapter off) and tuned (adapter on) model on the answer tokens of `examples`: each one's
    perplexity, their ratio (tuned / base) and the mean per-token KL(base || tuned) in nats."""
    from tqdm.auto import tqdm

    encoded = [encode_example(tokenizer, ex, max_length) for ex in examples]
    encoded = [e for e in encoded if any(x != IGNORE_INDEX for x in e["labels"][1:])]
    if not encoded:
        raise ConfigError("forgetting check: no answer tokens to score (the base answers are empty or cut)")
    encoded.sort(key=lambda e: len(e["input_ids"]))
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(encoded), desc=desc, unit="example", disable=not progress) as bar:
            rows = in_batches(lambda b: _batch(model, b, pad_id(tokenizer)), encoded, batch_size, what=desc,
                              progress=bar)
    finally:
        model.train(was_training)
    tokens = sum(r[3] for r in rows)
    base, tuned, kl = (sum(r[k] for r in rows) / tokens for k in range(3))
    ppl_base, ppl_tuned = math.exp(min(base, 700.0)), math.exp(min(tuned, 700.0))
    return {"base_perplexity": ppl_base, "tuned_perplexity": ppl_tuned, "ratio": math.exp(min(tuned - base, 700.0)),
            "mean_kl": kl, "tokens": tokens, "prompts": len(encoded)}


def _batch(model, batch, pad: int) -> list[tuple[float, float, float, int]]:
    """(base NLL, tuned NLL, KL(base || tuned), scored tokens) summed over each example of a right-padded batch."""
    import torch
    import torch.nn.functional as F

    ids, labels, mask = padded_batch(batch, pad)
    device = model_device(model)
    disable = getattr(model, "disable_adapter", None)
    with torch.no_grad():
        tuned = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        with disable() if disable is not None else contextlib.nullcontext():
            base = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    out = []
    target = labels[:, 1:].to(tuned.device)
    for row in range(len(batch)):
        keep = target[row] != IGNORE_INDEX
        lb = F.log_softmax(base[row, :-1][keep].float(), dim=-1)
        lt = F.log_softmax(tuned[row, :-1][keep].float(), dim=-1)
        t = target[row][keep]
        nll_b = -lb.gather(1, t[:, None]).sum().item()
        nll_t = -lt.gather(1, t[:, None]).sum().item()
        kl = (lb.exp() * (lb - lt)).sum().item()
        out.append((nll_b, nll_t, kl, int(keep.sum())))
    return out


def forgetting_check(model, tokenizer, cfg, paths, progress: bool = True) -> dict | None:
    """The forgetting check of a loaded base + adapter (see the module); None when eval.general_prompts is None."""
    if not cfg.eval.general_prompts:
        return None
    conversations = check_general_prompts(cfg, tokenizer)
    answers = base_answers(model, tokenizer, cfg, paths, conversations, progress)
    examples = [{"messages": r["messages"] + [{"role": "assistant", "content": r["answer"]}]} for r in answers]
    result = compare_models(model, tokenizer, examples, cfg.eval.batch_size, cfg.train.max_length, progress=progress)
    result.update(prompts_file=str(cfg.eval.general_prompts), max_new_tokens=cfg.eval.general_max_new_tokens,
                  base_answers_stopped=sum(bool(r["stopped"]) for r in answers) / len(answers),
                  reading=reading(result["ratio"], result["mean_kl"]))
    return result


def reading(ratio: float, kl: float | None = None) -> str:
    """The forgetting figure in plain words."""
    if ratio < 1.0:
        how = f"finds the base model's general answers {1 / ratio:.2f}x more likely"
    else:
        how = f"finds the base model's general answers {ratio:.2f}x less likely"
    verdict = ("little changed" if ratio < 1.1 else "somewhat changed" if ratio < 1.5 else
               "clearly changed: it may have lost some general ability" if ratio < 3 else
               "far from the base: general ability has likely suffered")
    kl_text = f", mean KL {kl:.3f} nats a token" if kl is not None else ""
    return f"the tuned model {how} per token than the base ({verdict}{kl_text})"


def forgetting_table(run: str):
    """eval/forgetting.json as a one-column DataFrame for notebook 04's report (rows: figures), its reading as
    the caption; a DataFrame saying why when the check was skipped."""
    import pandas as pd

    from lib.run.paths import require, run_paths
    from lib.run.rundir import check_fresh, read_json

    paths = run_paths(run)
    require(paths, "forgetting")
    check_fresh(paths, "evaluate", paths.eval_dir)
    result = read_json(paths.forgetting)
    if "ratio" not in result:
        return pd.DataFrame({"forgetting check": [result.get("skipped", "not run")]}, index=["skipped"])
    rows = {"general prompts": result["prompts"], "base answer tokens scored": result["tokens"],
            "base model's perplexity on them": result["base_perplexity"],
            "tuned model's perplexity on them": result["tuned_perplexity"],
            "ratio tuned / base (1.0: unchanged)": result["ratio"],
            "mean KL(base || tuned), nats a token": result["mean_kl"],
            "base answers that stopped": result["base_answers_stopped"], "reading": result["reading"]}
    return pd.DataFrame({"forgetting check": rows})

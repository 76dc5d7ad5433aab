"""Evaluation (notebook 04): perplexity and generated answers, base model vs tuned model.

    python -m lib evaluate --run demo [--set generation.do_sample=true --set eval.generate_examples=32]

    from lib.evaluate.evaluation import run_evaluate, metrics_table, predictions_table
    result = run_evaluate("demo")          # writes eval/perplexity.json, predictions.jsonl, generation_metrics.json

Both models are the same loaded weights: the 4-bit base with the trained adapter, and the base
with the adapter switched off (peft's `disable_adapter()`), so the comparison costs one load.

Perplexity (lib/evaluate/scoring.py) is exp(total NLL / total tokens) over the assistant tokens of the eval split, the very
tokens the training loss sees (`lib.data.tokenization.encode_example` labels, cut at train.max_length).
It is computed batch by batch (one batch of logits in memory at a time) and summed in float64.

Generation (lib/model/generation.py) answers the first `eval.generate_examples` eval prompts with both models, batched with
left padding, under `cfg.generation` (greedy or sampling, temperature, top-k, top-p, max new
tokens, no-repeat n-gram size, repetition penalty). A prompt longer than train.max_length tokens
is cut to its last max_length tokens (the latest turns and the generation prompt; a leading bos
is kept), so one huge prompt cannot take unbounded memory and time; generation_metrics.json
counts them (`prompts_cut`), as perplexity.json counts the examples cut (`examples_cut`).
Metrics: BLEU (sacrebleu), ROUGE-L F1 (rouge-score), the stop rate (answers that ended with an
end-of-turn / eos token rather than at the length limit) and a Socratic style score (share of
answers that end with a question, questions per answer). The references get the style score too, as the target to compare with.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from pathlib import Path

from lib.data.readers import read_examples
from lib.data.textmetrics import generation_metrics, style_scores
from lib.evaluate.forgetting import check_general_prompts, forgetting_check
from lib.evaluate.scoring import perplexity
from lib.evaluate.verdict import (
    MIN_PAIRS,
    RESAMPLES,
    SEED,
    null_control_sentence,
    resolved_scorer,
    task_scores,
    verdict_rows,
    verdict_sentence,
)
from lib.model.generation import eval_conversations, eval_tools, generate_answers
from lib.model.loading import load_tuned_model
from lib.model.oom import out_of_memory
from lib.run.context import open_run
from lib.run.errors import MissingStageError, SFTError
from lib.run.formatting import CUT_AT_MAX_NEW_TOKENS, mark_cut, num, pct, table
from lib.run.hardware import release
from lib.run.paths import require, run_paths
from lib.run.rundir import (
    check_fresh,
    check_trained,
    fingerprint,
    install,
    read_json,
    remove_leftovers,
    run_lock,
    staging,
    write_json,
    write_jsonl,
)
from lib.run.stages import stage

MODELS = ("base", "tuned")
STAGING = ".staging-"  # results are built in eval/.staging-XXXXXXXX, then installed as one set


# ----------------------------------------------------------------------------- the stage


def run_evaluate(run: str, overrides=(), progress: bool = True, null_control: bool = False) -> dict:
    """Entry point of notebook 04 and `python -m lib evaluate`.

    Returns {"verdict": eval/verdict.json's content, "perplexity": {"base": {...}, "tuned": {...}},
    "generation": metrics (or None when eval.generate_examples is 0 or the data has no conversations),
    "predictions": rows, "forgetting": ..., "null_control": eval/null_control.json's content}.
    null_control: also score the adapter at its initial weights (LoRA B = 0: the base) against the base.
    """
    if null_control is not True and null_control is not False:
        raise SFTError(f"null_control: expected true or false, got {null_control!r}")
    paths = run_paths(run)
    with run_lock(paths, "evaluate"):
        return _run_evaluate(paths, run, overrides, progress, null_control)


def _run_evaluate(paths, run, overrides, progress, null_control=False) -> dict:
    sources = _check_inputs(paths, run)
    ctx = open_run(run, "evaluate", overrides)
    cfg = ctx.cfg
    scorer = resolved_scorer(cfg)  # a bad eval.scorer stops here, before any model loads
    examples = _eval_examples(paths, cfg)
    started = time.time()
    with out_of_memory("evaluation", cfg, doing="loading the base model and adapter", run=run):
        model, tokenizer = load_tuned_model(cfg, paths.adapter, info=ctx.device)
    check_general_prompts(cfg, tokenizer)  # a bad general prompt is one line now, not after the evaluation
    with out_of_memory("evaluation", cfg, run=run):  # batches back off by themselves; this is at a batch of 1
        ppl, nll = _perplexities(model, tokenizer, examples, cfg, progress)
        ppl_seconds = time.time() - started
        predictions, gen_metrics, scored = _generation(model, tokenizer, examples, cfg, progress, scorer)
        forgetting = _forgetting(model, tokenizer, cfg, paths, progress)
        verdict = _verdict(scored, nll, forgetting, cfg)
        control = _null_control(model, tokenizer, examples, cfg, progress, scorer, scored) if null_control else None
    del model
    release()
    _write_results(paths, sources, ppl, predictions, gen_metrics, forgetting, verdict, control)
    print(verdict["sentence"])
    _print_results(ppl, ppl_seconds, predictions, gen_metrics, cfg.train.max_length)
    if forgetting is not None:
        print(f"forgetting check on {forgetting['prompts']} general prompts: {forgetting['reading']} "
              f"({forgetting['seconds']:.1f}s)")
    if control is not None:
        print(control["sentence"])
    return {"verdict": verdict, "perplexity": ppl, "generation": gen_metrics, "predictions": predictions,
            "forgetting": forgetting, "null_control": control}


def _verdict(scored, nll, forgetting, cfg, models=("base", "tuned")) -> dict:
    """eval/verdict.json: the rows (lib/evaluate/verdict.py), the scores chosen and why, the method."""
    rows = verdict_rows(scored, nll, forgetting, cfg.eval.forgetting_budget, models)
    return {"sentence": verdict_sentence(rows), "rows": rows,
            "scores": scored["names"] if scored else [], "why": scored["why"] if scored else "no answers generated",
            "method": f"paired bootstrap over the eval prompts, {RESAMPLES} resamples, seed {SEED}, 95% percentile "
                      f"interval; under {MIN_PAIRS} prompts: too few prompts to tell"}


def _null_control(model, tokenizer, examples, cfg, progress, scorer, scored) -> dict | None:
    """The adapter at its initial weights (every LoRA B zeroed: the base's function through the adapter's code
    path) against the base, on the same prompts and decoding: every task row must be `no detectable change`."""
    if scored is None:
        return None
    for name, param in model.named_parameters():
        if "lora_B" in name or "lora_magnitude_vector" in name:
            if "lora_magnitude_vector" in name:
                raise SFTError("--null-control: a DoRA adapter has no initial weights equal to the base here "
                               "(its magnitudes are trained); run it on a LoRA adapter")
            param.data.zero_()
    chosen = eval_conversations(examples)[:max(0, cfg.eval.generate_examples)]
    tools = eval_tools(examples, chosen)
    answers = _answers(model, tokenizer, [c[1] for c in chosen], cfg, progress, tools if any(tools) else None)
    control = task_scores(cfg, {"base": answers["base"], "untrained adapter": answers["tuned"]},
                          [c[2] for c in chosen], [examples[c[0]] for c in chosen], scorer)
    control["names"] = scored["names"]
    out = _verdict(control, None, None, cfg, models=("base", "untrained adapter"))
    out["sentence"] = null_control_sentence(out["rows"])
    return out


def _forgetting(model, tokenizer, cfg, paths, progress) -> dict | None:
    """The forgetting check (lib/evaluate/forgetting.py), timed; None when eval.general_prompts is None."""
    started = time.time()
    result = forgetting_check(model, tokenizer, cfg, paths, progress)
    if result is not None:
        result["seconds"] = round(time.time() - started, 2)
    return result


def _check_inputs(paths, run) -> dict:
    """The inputs are there and fresh; returns their fingerprints (the manifest's sources)."""
    require(paths, "config", "eval_data", "adapter")
    if not (paths.adapter / "adapter_config.json").exists():
        raise MissingStageError(f"{paths.adapter} holds no adapter (adapter_config.json): {stage('train').first(run)}")
    sources = {"prepare": fingerprint(paths, "prepare"), "train": check_trained(paths)}
    remove_leftovers(paths.eval_dir, re.escape(STAGING) + r"\w{8}")  # of a killed evaluate (we hold the lock)
    return sources


def _eval_examples(paths, cfg) -> list[dict]:
    examples = read_examples(paths.eval_data)
    if cfg.eval.max_examples is not None:
        examples = examples[:cfg.eval.max_examples]
    if not examples:
        raise SFTError(f"{paths.eval_data} holds no examples: prepare the data with data.eval_fraction > 0 "
                       "(notebook 01) to measure perplexity")
    return examples


def _perplexities(model, tokenizer, examples, cfg, progress) -> dict:
    """Perplexity of the tuned model, and of the base (the adapter switched off)."""
    bs, max_len = cfg.eval.batch_size, cfg.train.max_length
    ppl = {}
    ppl["tuned"] = perplexity(model, tokenizer, examples, bs, max_len, desc="perplexity (tuned)", progress=progress,
                              per_example=True)
    with model.disable_adapter():
        ppl["base"] = perplexity(model, tokenizer, examples, bs, max_len, desc="perplexity (base)", progress=progress,
                                 per_example=True)
    nll = {m: ppl[m].pop("per_example") for m in MODELS}  # the same examples in the same order: paired
    ppl = {"base": ppl["base"], "tuned": ppl["tuned"]}
    for m in MODELS:
        if not math.isfinite(ppl[m]["loss"]):
            raise SFTError(f"the {m} model's eval loss is not finite ({ppl[m]['loss']}): a numerical overflow; "
                           "try quant.compute_dtype=bfloat16 (or float32), or a lower learning rate if only "
                           "the tuned model is affected")
    return ppl, nll


def _answers(model, tokenizer, conversations, cfg, progress, tools=None) -> dict:
    """Both models' answers, each from the same seed (`tools`: each conversation's tool schemas or None)."""
    import torch

    bs, max_len = cfg.eval.batch_size, cfg.train.max_length
    answers = {}
    torch.manual_seed(cfg.train.seed)
    with model.disable_adapter():
        answers["base"] = generate_answers(model, tokenizer, conversations, cfg.generation, bs,
                                           desc="generate (base)", progress=progress, max_length=max_len, tools=tools)
    torch.manual_seed(cfg.train.seed)
    answers["tuned"] = generate_answers(model, tokenizer, conversations, cfg.generation, bs,
                                        desc="generate (tuned)", progress=progress, max_length=max_len, tools=tools)
    return answers


def _generation(model, tokenizer, examples, cfg, progress, scorer=None) -> tuple[list[dict], dict | None, dict | None]:
    """(predictions rows, generation metrics, task scores) for the eval conversations, up to
    eval.generate_examples of them."""
    started = time.time()
    chosen = eval_conversations(examples)[:max(0, cfg.eval.generate_examples)]
    if not chosen:
        return [], None, None
    references = [c[2] for c in chosen]
    tools = eval_tools(examples, chosen)
    answers = _answers(model, tokenizer, [c[1] for c in chosen], cfg, progress, tools if any(tools) else None)
    scored = task_scores(cfg, answers, references, [examples[c[0]] for c in chosen], scorer)
    predictions = []
    for k, ((index, prompt, reference), base, tuned) in enumerate(zip(chosen, answers["base"], answers["tuned"])):
        predictions.append({
            "index": index,
            "prompt": prompt[-1]["content"],
            "messages": prompt,
            "reference": reference,
            "base": base["text"],
            "tuned": tuned["text"],
            "base_stopped": base["stopped"],
            "tuned_stopped": tuned["stopped"],
            "prompt_cut": tuned["prompt_cut"],
            "scores": {m: {name: v[k] for name, v in scored["values"][m].items()} for m in MODELS},
        })
    scores = {m: generation_metrics(answers[m], references) for m in MODELS}
    signature = [scores[m].pop("bleu_signature") for m in MODELS][0]
    return predictions, {
        "examples": len(predictions),
        "prompts_cut": sum(p["prompt_cut"] for p in predictions),
        "max_length": cfg.train.max_length,
        "base": scores["base"],
        "tuned": scores["tuned"],
        "reference": style_scores(references),
        "bleu_signature": signature,
        "generation": dataclasses.asdict(cfg.generation),
        "seconds": round(time.time() - started, 2),
    }, scored


def _write_results(paths, sources, ppl, predictions, gen_metrics, forgetting=None, verdict=None, control=None) -> None:
    """Everything computed: now write, as one set (nothing half-written if anything before failed or
    the process is killed while the files are moved in: see lib/run/rundir.py)."""
    with staging(paths.eval_dir, STAGING) as staged:
        write_json(staged / paths.perplexity.name, ppl)
        write_jsonl(staged / paths.predictions.name, predictions)
        write_json(staged / paths.generation_metrics.name, gen_metrics if gen_metrics is not None else
                   {"examples": 0, "skipped": "eval.generate_examples is 0 or the eval data has no conversations"})
        write_json(staged / paths.forgetting.name, forgetting if forgetting is not None else
                   {"skipped": "eval.general_prompts is None"})
        write_json(staged / paths.verdict.name, verdict)
        write_json(staged / paths.null_control.name, control if control is not None else
                   {"skipped": "run with --null-control (notebook 04: NULL_CONTROL = True)"})
        targets = (paths.verdict, paths.null_control, paths.perplexity, paths.predictions, paths.generation_metrics,
                   paths.forgetting)
        install(paths, "evaluate", {t: staged / t.name for t in targets},
                [str(t.relative_to(paths.root)) for t in targets], sources)


def _print_results(ppl, ppl_seconds, predictions, gen_metrics, max_len) -> None:
    b, t = ppl["base"], ppl["tuned"]
    print(f"perplexity over {t['tokens']} answer tokens of {t['examples']} eval examples: "
          f"base {b['perplexity']:.2f}, tuned {t['perplexity']:.2f} ({ppl_seconds:.1f}s)")
    if t.get("examples_cut"):
        print(f"note: {t['examples_cut']} eval examples are longer than train.max_length={max_len}; perplexity "
              "scores their first max_length tokens, as training saw them")
    if gen_metrics is not None and gen_metrics["prompts_cut"]:
        print(f"note: {gen_metrics['prompts_cut']} of {len(predictions)} generation prompts were longer than "
              f"train.max_length={max_len} tokens and were cut to their last {max_len} (the latest turns)")
    if gen_metrics is not None:
        print(f"generated {len(predictions)} answers per model: BLEU base {gen_metrics['base']['bleu']:.1f} / "
              f"tuned {gen_metrics['tuned']['bleu']:.1f}, stop rate base {gen_metrics['base']['stop_rate']:.0%} / "
              f"tuned {gen_metrics['tuned']['stop_rate']:.0%} ({gen_metrics['seconds']:.1f}s)")
        if "tool_call_examples" in gen_metrics["tuned"]:
            b, t = gen_metrics["base"], gen_metrics["tuned"]
            print(f"tool calls on {t['tool_call_examples']} prompts: parse as JSON base {b['tool_call_parse_rate']:.0%} / "
                  f"tuned {t['tool_call_parse_rate']:.0%}, name the reference function base "
                  f"{b['tool_name_match_rate']:.0%} / tuned {t['tool_name_match_rate']:.0%}")


# ----------------------------------------------------------------------------- notebook views


# Generation metrics: key -> (label, better: "higher" / "lower" / "reference" (closer to the eval answers), a share?)
GENERATION_ROWS = {
    "bleu": ("BLEU (0-100)", "higher", False), "rouge_l": ("ROUGE-L F1 (0-1)", "higher", False),
    "stop_rate": ("answers that stop on their own (end-of-turn)", "higher", True),
    "question_rate": ("answers ending with a question", "reference", True),
    "questions_per_answer": ("questions per answer", "reference", False),
    "mean_words": ("words per answer", "reference", False),
    "tool_call_parse_rate": ("tool calls that parse as JSON", "higher", True),
    "tool_name_match_rate": ("tool calls naming the reference function", "higher", True)}


def metrics_table(run: str, styled: bool = False):
    """Perplexity and generation metrics of both models as a DataFrame (rows: metrics; columns: models,
    and the references' own style scores). styled: the notebook's view, numbers rounded and shares as
    percentages, with a change column saying the direction (better / worse / closer to the eval answers)."""
    import pandas as pd

    ppl, gen = _eval_results(run)
    models = [m for m in ("base", "tuned") if isinstance(ppl.get(m), dict)]
    rows = {
        "perplexity (lower is better)": {m: ppl[m]["perplexity"] for m in models},
        "loss per answer token (nats)": {m: ppl[m]["loss"] for m in models},
        "answer tokens scored": {m: ppl[m]["tokens"] for m in models},
    }
    for key, (label, _, _) in GENERATION_ROWS.items():
        row = {m: gen[m].get(key) for m in MODELS if isinstance(gen.get(m), dict)}
        if key in (gen.get("reference") or {}):
            row["reference"] = gen["reference"][key]
        if any(v is not None for v in row.values()):  # tool-call rates only for data with tool calls
            rows[label] = row
    columns = [c for c in ("base", "tuned", "reference") if any(c in r for r in rows.values())]
    df = pd.DataFrame(rows).T.reindex(columns=columns)
    return _readable(df) if styled else df


def _readable(df):
    """metrics_table's notebook view: base, tuned, change (with its direction); the eval answers' own score
    inside the change of the rows it is the target of."""
    import pandas as pd

    how = {label: (better, share) for label, better, share in GENERATION_ROWS.values()}
    how |= {"perplexity (lower is better)": ("lower", False), "loss per answer token (nats)": ("lower", False)}
    out = []
    for label, r in df.iterrows():
        better, share = how.get(label, (None, False))
        shown = {m: (pct(r.get(m), 0) if share else num(r.get(m))) for m in ("base", "tuned") if m in r}
        out.append({"": label, **shown, "change": _change(r.get("base"), r.get("tuned"), r.get("reference"),
                                                            better, share)})
    return table(pd.DataFrame(out).set_index(""))


def _change(b, t, ref, better, share) -> str:
    """'-68% (better)', '+88 points (better)', '+3.1 (closer to the eval answers' 4.0)'."""
    if better is None or b is None or t is None or b != b or t != t:
        return ""
    if share:
        text = f"{(t - b) * 100:+.0f} points"
    else:
        text = f"{(t - b) / abs(b):+.0%}" if b else f"{t - b:+.3g}"
    if better == "reference":
        if ref is None or ref != ref:
            return text
        target = pct(ref, 0) if share else num(ref)
        word = "closer to" if abs(t - ref) < abs(b - ref) else "no closer to" if abs(t - ref) == abs(b - ref) else "further from"
        return f"{text} ({word} the eval answers' {target})"
    word = "same" if t == b else "better" if (t < b) == (better == "lower") else "worse"
    return f"{text} ({word})"


def metrics_verdict(run: str) -> str:
    """One line under notebook 04's secondary table: what perplexity shows, and what it does not."""
    ppl, gen = _eval_results(run)
    b, t = ppl["base"]["perplexity"], ppl["tuned"]["perplexity"]
    how = f"{(b - t) / b:.0%} lower" if t < b else f"{(t - b) / b:.0%} higher"
    line = (f"Perplexity {num(b)} -> {num(t)} ({how}): the tuned model finds the reference answers "
            f"{'more' if t < b else 'no more'} likely. That falls after almost any tuning on data like the training "
            "data; whether the answers are right is the verdict table above")
    if gen.get("examples"):
        stop = [gen[m].get("stop_rate") for m in MODELS]
        line += f"; answers that stop on their own {pct(stop[0], 0)} -> {pct(stop[1], 0)} (over {gen['examples']} answers)"
    return line + "."


def _eval_results(run: str) -> tuple[dict, dict]:
    paths = run_paths(run)
    require(paths, "perplexity", "generation_metrics")
    check_fresh(paths, "evaluate", paths.eval_dir)
    return _read_eval_json(paths.perplexity), _read_eval_json(paths.generation_metrics)


def predictions_table(run: str, n: int = 5, styled: bool = False):
    """The first `n` generated answers side by side (prompt, reference, base, tuned, whether each stopped).

    styled: a pandas Styler that keeps line breaks and aligns text left, for notebooks.
    """
    import pandas as pd

    paths = run_paths(run)
    require(paths, "predictions")
    check_fresh(paths, "evaluate", paths.eval_dir)
    rows = read_examples(paths.predictions)[:n]
    cols = ["prompt", "reference", "base", "tuned"]
    df = pd.DataFrame([{c: r.get(c, "") for c in cols} for r in rows], columns=cols)
    for m in MODELS:
        df[f"{m} stopped"] = [r.get(f"{m}_stopped") for r in rows]
    if not styled:
        return df
    view = df.drop(columns=[f"{m} stopped" for m in MODELS])
    limit = (_read_eval_json(paths.generation_metrics).get("generation") or {}).get("max_new_tokens", "?")
    for m in MODELS:  # the mark comes from the token ids (generate_answers' "stopped"), not the text
        view[m] = [mark_cut(t if t.strip() else "(empty answer)", not r.get(f"{m}_stopped"),
                            CUT_AT_MAX_NEW_TOKENS.format(n=limit)) for t, r in zip(view[m], rows)]
    return table(view)


def _read_eval_json(path):
    return read_json(path, stage("evaluate").rerun(Path(path).parent.parent.name))

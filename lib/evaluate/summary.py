"""The before/after summary of a run: what fine-tuning changed, readable at a glance.

    python -m lib summary --run demo          # also printed at the end of `python -m lib pipeline`

    from lib.evaluate.summary import before_after
    print(before_after("demo"))

It leads with the verdict (eval/verdict.json: did it help, each task score base vs tuned with its 95%
interval), then reads what the stages wrote (eval/perplexity.json, eval/generation_metrics.json,
eval/predictions.jsonl, eval/forgetting.json (the forgetting check), logs/training_summary.json, merged/merge_report.json when there) and
computes nothing new: base vs tuned perplexity, the share of generated answers that are questions
and that stop on their own (the end-of-turn token, not the length limit), and one eval prompt
answered by the base and the tuned model side by side. It checks the manifests of what it reads first
(lib/run/rundir.py check_result): eval/ interrupted, damaged or of an earlier adapter is refused, naming
evaluate to rerun; a merge report in that state is left out, and the summary says so.
"""

from __future__ import annotations

import textwrap

from lib.data.readers import read_examples
from lib.evaluate.verdict import readable_rows
from lib.run.paths import require, run_paths
from lib.run.rundir import check_result, is_pending, read_json, unusable


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def _example(predictions: list[dict]) -> dict | None:
    """The first prompt whose base and tuned answers differ (else the first): deterministic, not picked by score."""
    for p in predictions:
        if p.get("base", "").strip() != p.get("tuned", "").strip():
            return p
    return predictions[0] if predictions else None


def _answer(label: str, text: str, stopped: bool, width: int) -> list[str]:
    paragraphs = [" ".join(p.split()) for p in (text or "").splitlines() if p.strip()] or ["(empty answer)"]
    if not stopped:
        paragraphs[-1] += " [... cut at max_new_tokens: did not stop]"
    lines = [ln for p in paragraphs for ln in textwrap.wrap(p, width=width - 9)]
    return [f"  {label:<6} " + lines[0]] + ["         " + ln for ln in lines[1:]]


def before_after(run: str, width: int = 100) -> str:
    """The run's before/after summary as text (see the module docstring)."""
    paths = run_paths(run)
    require(paths, "perplexity", "generation_metrics")
    # eval/ complete (not a killed evaluate's mixture) and of the current adapter and data; then the training
    # summary is the one that adapter came with (its hash is part of train's fingerprint, checked too)
    check_result(paths, "evaluate")
    ppl = _read_result(paths.perplexity)
    gen = _read_result(paths.generation_metrics)
    train = _read_result(paths.training_summary) if paths.training_summary.exists() else {}

    model = train.get("model") or "?"
    head = f"Before / after fine-tuning: {model}, run {run}"
    if train.get("global_step"):
        epochs = train.get("epoch", 0)
        head += (f" ({train['global_step']} steps, {epochs:.3g} epoch{'' if epochs == 1 else 's'}, "
                 f"{train.get('runtime_s', 0):.0f}s of training)")
    verdict = _read_result(paths.verdict) if paths.verdict.exists() else None
    lines = [head, "=" * min(width, len(head))]
    n = gen.get("examples", 0)
    if isinstance(verdict, dict) and verdict.get("rows"):
        lines += textwrap.wrap(verdict["sentence"], width=width) + [""] + _verdict_lines(verdict["rows"])
    else:  # a run evaluated before eval/verdict.json existed
        rows = [("", "base", "tuned"), ("eval perplexity (lower is better)", f"{ppl['base']['perplexity']:.2f}",
                                        f"{ppl['tuned']['perplexity']:.2f}")]
        if n:
            rows += [("answers that stop on their own", _pct(gen["base"].get("stop_rate")),
                      _pct(gen["tuned"].get("stop_rate")))]
        lines += [f"  {label:<36}{b:>10}{t:>10}" for label, b, t in rows]
    ref = (gen.get("reference") or {}).get("question_rate")
    notes = []
    if n:
        settings = gen.get("generation") or {}
        mode = "sampled" if settings.get("do_sample") else "greedy"
        notes.append(f"{n} eval prompts, {mode}, at most {settings.get('max_new_tokens', '?')} new tokens")
    if ref is not None and ref >= 0.5:
        notes.append(f"the eval answers: {ref:.0%} questions")
    notes += _merged_note(paths)
    if notes:
        lines.append("  (" + "; ".join(notes) + ")")
    lines += _forgetting_lines(paths, width)

    predictions = read_examples(paths.predictions) if paths.predictions.exists() else []
    ex = _example(predictions)
    if ex is not None:
        lines += ["", textwrap.shorten(f"Prompt: {ex.get('prompt', '')}", width=width)]
        lines += _answer("base", ex.get("base", ""), bool(ex.get("base_stopped")), width)
        lines += _answer("tuned", ex.get("tuned", ""), bool(ex.get("tuned_stopped")), width)
    return "\n".join(lines)


def _verdict_lines(rows: list[dict]) -> list[str]:
    """eval/verdict.json's rows as fixed-width text: what, base, tuned, change (95% CI), n, verdict."""
    table = readable_rows(rows).reset_index()
    table.columns = ["", "base", "tuned", "change (95% CI)", "n", "verdict"]
    return ["  " + line for line in table.to_string(index=False, justify="left").splitlines()]


def _forgetting_lines(paths, width: int) -> list[str]:
    """The forgetting check (eval/forgetting.json) in plain words, when evaluate ran it."""
    result = _read_result(paths.forgetting) if paths.forgetting.exists() else None
    if not isinstance(result, dict) or "ratio" not in result:
        return []
    text = (f"General ability (forgetting check, {result['prompts']} general prompts answered by the base model): "
            f"perplexity ratio tuned/base {result['ratio']:.2f}; {result['reading']}.")
    return [""] + textwrap.wrap(text, width=width, subsequent_indent="  ")


def _merged_note(paths) -> list[str]:
    """The merged model's figures from merged/merge_report.json, when merge's results are complete, intact
    and of the current adapter; otherwise a note that they are left out, and why."""
    if not paths.merge_report.exists() and not is_pending(paths, "merge"):
        return []
    problem = unusable(paths, "merge", verify=[paths.merge_report.relative_to(paths.root).as_posix()])
    if problem:
        return [f"merged model left out: {problem}"]
    merged = _read_result(paths.merge_report)
    merged_ppl = (merged.get("perplexity") or {}).get("merged") if isinstance(merged, dict) else None
    if not (isinstance(merged_ppl, dict) and "perplexity" in merged_ppl):
        return []
    drift = f", drift {merged['relative_drift']:.2%} from the adapter" if "relative_drift" in merged else ""
    return [f"merged model: perplexity {merged_ppl['perplexity']:.2f}{drift}"]


def _read_result(path):
    return read_json(path, "rerun the stage that writes it")

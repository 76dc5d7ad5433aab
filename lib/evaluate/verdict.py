"""Did the fine-tune help? The paired comparison of base and tuned on the same eval prompts, each score
with its 95% bootstrap interval and a verdict, for eval/verdict.json, notebook 04 and the summary.

    from lib.evaluate.verdict import task_scores, verdict_rows, verdict_sentence, verdict_table
    scored = task_scores(cfg, answers, references, records)   # each model's per-prompt scores, which and why
    rows = verdict_rows(scored, nll)                           # [{"metric", "higher_is_better", "base", "tuned",
                                                               #   "difference", "ci95", "n", "verdict"}, ...]
    verdict_table("demo", styled=True)                         # notebook 04's first table

The interval is a paired bootstrap: the prompts are resampled with replacement (RESAMPLES times, seed SEED)
and each resample's difference of means (tuned - base) taken; the 2.5th and 97.5th percentiles bound it.
The verdict is `better` or `worse` when the whole interval lies on one side of zero, `no detectable change`
when it holds zero, and `too few prompts to tell` below MIN_PAIRS prompts, where not even a change on every
prompt, all one way, would be significant (the sign test: 2 x 0.5^5 = 0.0625 > 0.05 at five prompts).
Perplexity gets the same paired bootstrap (the ratio of summed NLL to summed tokens, per resample); the
forgetting check's ratio is held against `eval.forgetting_budget` (above it: `worse`).
"""

from __future__ import annotations

import warnings

from lib.data.scores import choose_scores, resolve_scorer, run_scorer, score_answers
from lib.data.textmetrics import is_question, rouge_l_per_answer, style_scores

RESAMPLES = 2000
SEED = 0
MIN_PAIRS = 6
MODELS = ("base", "tuned")
LABELS = {"exact": "exact match", "contains": "reference inside the answer", "json": "JSON equal to the reference",
          "json_valid": "answers holding valid JSON", "json_keys": "JSON keys right (per-key accuracy)",
          "number": "final number right", "label": "label right (accuracy)", "tool_call": "tool call right (name and "
          "arguments)", "rouge_l": "ROUGE-L F1 (text overlap)", "stop_rate": "answers that stop on their own",
          "question_rate": "answers ending with a question", "perplexity": "perplexity of the eval answers",
          "forgetting": "forgetting check (perplexity ratio of the base's general answers)"}


def paired_bootstrap(base: list[float], tuned: list[float], resamples: int = RESAMPLES, seed: int = SEED):
    """(mean difference tuned - base, (low, high) 95% percentile interval) over paired values."""
    import numpy as np

    b, t = np.asarray(base, dtype=float), np.asarray(tuned, dtype=float)
    diff = t - b
    if not len(diff):
        return None, None
    idx = np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))
    means = diff[idx].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), (float(low), float(high))


def decide(ci95, n: int, higher_is_better: bool) -> str:
    """better / worse / no detectable change / too few prompts to tell (see the module docstring)."""
    if n < MIN_PAIRS or ci95 is None:
        return "too few prompts to tell"
    low, high = ci95
    if low > 0 or high < 0:
        return "better" if (low > 0) == higher_is_better else "worse"
    return "no detectable change"


def score_row(metric: str, base: list, tuned: list, higher_is_better: bool = True, kind: str = "task") -> dict | None:
    """One verdict row over the prompts where both values exist (a score that does not apply is None)."""
    pairs = [(b, t) for b, t in zip(base, tuned) if b is not None and t is not None]
    if not pairs:
        return None
    bs, ts = [float(b) for b, _ in pairs], [float(t) for _, t in pairs]
    diff, ci = paired_bootstrap(bs, ts)
    return {"metric": metric, "kind": kind, "higher_is_better": higher_is_better, "base": sum(bs) / len(bs),
            "tuned": sum(ts) / len(ts), "difference": diff, "ci95": list(ci), "n": len(pairs),
            "verdict": decide(ci, len(pairs), higher_is_better)}


def perplexity_row(nll: dict) -> dict | None:
    """The perplexity row: nll = {"base": [[nll, tokens], ...], "tuned": [...]}, the same examples in order."""
    import numpy as np

    if not nll or not nll.get("base"):
        return None
    b, t = np.asarray(nll["base"], dtype=float), np.asarray(nll["tuned"], dtype=float)
    ppl = lambda x, i: np.exp(np.minimum(x[i, 0].sum(axis=-1) / x[i, 1].sum(axis=-1), 700.0))  # noqa: E731
    every = np.arange(len(b))
    idx = np.random.default_rng(SEED).integers(0, len(b), size=(RESAMPLES, len(b)))
    low, high = np.percentile(ppl(t, idx) - ppl(b, idx), [2.5, 97.5])
    base, tuned = float(ppl(b, every)), float(ppl(t, every))
    ci = (float(low), float(high))
    return {"metric": "perplexity", "kind": "perplexity", "higher_is_better": False, "base": base, "tuned": tuned,
            "difference": tuned - base, "ci95": list(ci), "n": len(b), "verdict": decide(ci, len(b), False)}


def forgetting_row(forgetting: dict | None, budget: float) -> dict | None:
    """The forgetting check's ratio against eval.forgetting_budget: `worse` above it, else `within budget`."""
    if not forgetting or "ratio" not in forgetting:
        return None
    ratio = forgetting["ratio"]
    return {"metric": "forgetting", "kind": "forgetting", "higher_is_better": False, "base": 1.0, "tuned": ratio,
            "difference": ratio - 1.0, "ci95": None, "n": forgetting.get("prompts"), "budget": budget,
            "verdict": "worse" if ratio > budget else "within budget"}


# ----------------------------------------------------------------------------- the scores of both models


def task_scores(cfg, answers: dict, references: list[str], records: list[dict], scorer=None) -> dict:
    """Each model's per-prompt scores: {"names", "why", "values": {model: {score: [...]}}}. answers:
    {model: [generate_answers() rows]}; scorer: the resolved eval.scorer function (or None)."""
    if cfg.eval.scores is not None:
        names, why = list(cfg.eval.scores), "set in eval.scores"
    else:
        names, why = choose_scores(references)
    values = {}
    for m in answers:
        texts = [a["text"] for a in answers[m]]
        v = score_answers(names, texts, references)
        if scorer is not None:
            v[cfg.eval.scorer] = run_scorer(scorer, cfg.eval.scorer, texts, references, records)
        v["rouge_l"] = rouge_l_per_answer(texts, references)
        v["stop_rate"] = [float(bool(a["stopped"])) for a in answers[m]]
        if style_scores(references)["question_rate"] >= 0.5:  # the data has that style: the answers are scored on it
            v["question_rate"] = [float(is_question(t)) for t in texts]
        values[m] = v
    if cfg.eval.scores is not None and values:
        first = next(iter(values.values()))
        unfit = [n for n in names if all(x is None for x in first[n])]
        if unfit:  # e.g. number on references that hold none: no row, said rather than left out silently
            said = (f"eval.scores: {', '.join(unfit)} fits none of the {len(references)} eval references, so it "
                    "gives no verdict row; choose scores that fit them, or eval.scorer (your own function)")
            warnings.warn(said, stacklevel=2)
            why += f"; {said}"
    if scorer is not None:
        names = names + [cfg.eval.scorer]
        why += f"; and your scorer {cfg.eval.scorer}"
    return {"names": names, "why": why, "values": values}


def resolved_scorer(cfg):
    """The eval.scorer function, resolved before any model loads (a bad value stops the stage at once)."""
    return resolve_scorer(cfg.eval.scorer) if cfg.eval.scorer else None


def verdict_rows(scored: dict | None, nll: dict | None = None, forgetting: dict | None = None,
                 budget: float = 1.5, models=MODELS) -> list[dict]:
    """Task rows first, then the secondary text rows, then perplexity and forgetting."""
    rows = []
    if scored is not None:
        a, b = (scored["values"][m] for m in models)
        secondary = [k for k in ("rouge_l", "stop_rate", "question_rate") if k in a]
        for name in scored["names"] + secondary:
            rows.append(score_row(name, a[name], b[name], kind="task" if name in scored["names"] else "text"))
    rows += [perplexity_row(nll), forgetting_row(forgetting, budget)]
    return [r for r in rows if r is not None]


def _points(r: dict) -> str:
    """A row's difference in words: points for shares, relative for perplexity."""
    if r["kind"] in ("perplexity", "forgetting"):
        return f"{r['base']:.3g} -> {r['tuned']:.3g}"
    lo, hi = (100 * x for x in r["ci95"])
    return (f"{100 * r['base']:.0f}% -> {100 * r['tuned']:.0f}% ({100 * r['difference']:+.0f} points, 95% CI "
            f"{lo:+.0f} to {hi:+.0f})")


def verdict_sentence(rows: list[dict], names=None) -> str:
    """One sentence in words: the first task score's verdict (or perplexity's, said to be no proof)."""
    task = [r for r in rows if r["kind"] == "task"]
    forgot = next((r for r in rows if r["kind"] == "forgetting" and r["verdict"] == "worse"), None)
    tail = (f" But it forgot: the forgetting ratio {forgot['tuned']:.2f} is above eval.forgetting_budget "
            f"{forgot['budget']:g}." if forgot else "")
    if not task:
        ppl = next((r for r in rows if r["kind"] == "perplexity"), None)
        head = ("No task score fits these references, so nothing says whether answers are right: set eval.scores "
                "or eval.scorer.")
        if ppl:
            head += f" Perplexity {_points(ppl)}: {ppl['verdict']} (it falls after almost any tuning; no proof)."
        return head + tail
    r = task[0]
    word = {"better": "Fine-tuning helped", "worse": "Fine-tuning made it worse",
            "no detectable change": "No detectable change", "too few prompts to tell": "Too few prompts to tell"}
    return (f"{word[r['verdict']]} on your task: {LABELS.get(r['metric'], r['metric'])} {_points(r)}, "
            f"over {r['n']} eval prompts.{tail}")


def null_control_sentence(rows: list[dict]) -> str:
    """What the null control says: every task row should read `no detectable change`."""
    noisy = [r["metric"] for r in rows if r["kind"] == "task" and r["verdict"] in ("better", "worse")]
    if noisy:
        return (f"The null control moved {', '.join(noisy)} with an untrained adapter: the evaluation itself is "
                "noisy (sampling, padding); do not trust a verdict of that size.")
    return "The null control (the adapter at its initial weights, i.e. the base) shows no detectable change, as it must."


def readable_rows(rows: list[dict]):
    """verdict rows as a notebook table: what, base, tuned, change with its 95% interval, n, verdict."""
    import pandas as pd

    out = []
    for r in rows:
        share = r["kind"] in ("task", "text") and r["metric"] != "rouge_l"
        show = (lambda x: f"{100 * x:.0f}%") if share else (lambda x: f"{x:.3g}")
        ci = r.get("ci95")
        change = (f"{r['difference'] * (100 if share else 1):+.3g}{' points' if share else ''}"
                  + (f" (95% CI {ci[0] * (100 if share else 1):+.3g} to {ci[1] * (100 if share else 1):+.3g})"
                     if ci else f" (budget {r.get('budget'):g})"))
        label = LABELS.get(r["metric"], f"{r['metric']} (your scorer)")
        out.append({"": label, "base": show(r["base"]), "tuned": show(r["tuned"]), "change": change,
                    "n": r["n"], "verdict": r["verdict"]})
    return pd.DataFrame(out).set_index("") if out else pd.DataFrame()



# ----------------------------------------------------------------------------- the model in the form it ships


def form_comparison(cfg, chosen, examples, answers: dict) -> dict:
    """The model in another form (merged/, a GGUF) against the form it was evaluated in, on the same prompts
    with the same decoding: the task score rows (else ROUGE-L and the stop rate), paired, with intervals.
    chosen: eval_conversations() rows; answers: {form: [generate_answers() rows]}, the reference form first."""
    scored = task_scores(cfg, answers, [c[2] for c in chosen], [examples[c[0]] for c in chosen],
                         resolved_scorer(cfg))
    forms = tuple(answers)
    rows = verdict_rows(scored, models=forms)
    rows = [r for r in rows if r["kind"] == "task"] or [r for r in rows if r["metric"] in ("rouge_l", "stop_rate")]
    return {"forms": list(forms), "rows": rows, "sentence": form_sentence(rows, forms)}


def form_sentence(rows: list[dict], forms) -> str:
    """'served as merged: JSON equal to the reference 83% vs adapter 85%, -2 points (95% CI -7 to +3), n=30:
    no detectable change.'"""
    if not rows:
        return f"served as {forms[1]}: no answers to compare"
    r = rows[0]
    lo, hi = (100 * x for x in r["ci95"])
    return (f"served as {forms[1]}: {LABELS.get(r['metric'], r['metric'])} {100 * r['tuned']:.0f}% vs {forms[0]} "
            f"{100 * r['base']:.0f}%, {100 * r['difference']:+.0f} points (95% CI {lo:+.0f} to {hi:+.0f}), "
            f"n={r['n']}: {r['verdict']}.")


# ----------------------------------------------------------------------------- notebook views


def read_verdict(run: str, null_control: bool = False) -> dict:
    """eval/verdict.json (or eval/null_control.json), checked complete and fresh (evaluate reruns otherwise)."""
    from lib.run.paths import require, run_paths
    from lib.run.rundir import check_fresh, read_json
    from lib.run.stages import stage

    paths = run_paths(run)
    name = "null_control" if null_control else "verdict"
    require(paths, name)
    check_fresh(paths, "evaluate", paths.eval_dir)
    return read_json(getattr(paths, name), stage("evaluate").rerun(run))


def verdict_table(run: str, styled: bool = False, null_control: bool = False):
    """Notebook 04's first table: each score base vs tuned, the change with its 95% interval, n, the verdict.
    styled: the notebook's view (lib/run/formatting.py table)."""
    from lib.run.formatting import table

    result = read_verdict(run, null_control)
    if "rows" not in result:
        import pandas as pd

        return pd.DataFrame({"": [result.get("skipped", "no verdict")]})
    df = readable_rows(result["rows"])
    return table(df) if styled else df


def verdict_line(run: str, null_control: bool = False) -> str:
    """The verdict in one sentence, and which scores were chosen and why."""
    result = read_verdict(run, null_control)
    if "rows" not in result:
        return result.get("skipped", "")
    return f"{result['sentence']}\nScores: {', '.join(result['scores']) or 'none'} ({result['why']}). {result['method']}."

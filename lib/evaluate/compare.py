"""Compare runs side by side: the settings that differ, their loss curves, their results and their answers.

    python -m lib compare RUN [RUN ...] [--figure curves.png]     # tables on stdout; the curves in a PNG

    from lib.evaluate.compare import compare_runs, settings_diff, results_table, answers_table, curves_figure
    runs = compare_runs(["demo", "demo-lr1e-4"])
    settings_diff(runs); results_table(runs); answers_table(runs); curves_figure(runs)

It reads what the stages wrote (config.yaml, logs/training_metrics.csv, logs/samples.jsonl,
eval/perplexity.json, eval/generation_metrics.json, eval/forgetting.json, eval/predictions.jsonl) and writes
nothing into the runs. Runs need not have finished the same stages: each run's missing results are said
(with the notebook or command that makes them) and its cells left empty. An unknown run is refused in one
line, naming the runs there are.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from lib.data.readers import read_examples
from lib.run.config import load_config, to_dict
from lib.run.errors import ConfigError, SFTError
from lib.run.figures import COLORS, STEP, STYLE, read_metrics
from lib.run.paths import RunPaths, outputs_dir, run_paths
from lib.run.rundir import read_json, unusable
from lib.run.stages import stage
from lib.train.samples import read_samples


@dataclass
class RunView:
    """What one run has to compare: its settings and the results it has (None where missing)."""

    name: str
    paths: RunPaths
    settings: dict
    metrics: dict = field(default_factory=dict)
    perplexity: dict | None = None
    generation: dict | None = None
    forgetting: dict | None = None
    answers: dict = field(default_factory=dict)  # prompt -> the tuned model's answer
    answers_from: str = ""  # eval/predictions.jsonl or logs/samples.jsonl (step N)
    missing: list = field(default_factory=list)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "columns":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _json(path: Path):
    """A result file's JSON object, or None: missing, damaged, not an object, or not a regular file (a FIFO is
    never waited on: rundir.read_json)."""
    if not os.path.lexists(path):
        return None
    try:
        value = read_json(path)
    except SFTError:
        return None
    return value if isinstance(value, dict) else None


def known_runs() -> list[str]:
    root = outputs_dir()
    return sorted(p.name for p in root.iterdir() if (p / "config.yaml").exists()) if root.is_dir() else []


def load_run(name: str) -> RunView:
    """The run's settings and whatever results it has; unknown run: a one-line ConfigError."""
    paths = run_paths(name)
    if not paths.config.exists():
        there = known_runs()
        raise ConfigError(f"compare: no run '{name}' in {outputs_dir()} (runs there: {', '.join(there) or 'none'})")
    view = RunView(name, paths, {k: v for k, v in _flat(to_dict(load_config(paths.config))).items() if k != "run"})
    if paths.metrics_csv.exists():
        view.metrics = read_metrics(paths.metrics_csv)
    else:
        view.missing.append(f"training ({stage('train').first(name)})")
    stale = unusable(paths, "evaluate") if paths.eval_dir.exists() else None  # half-installed or stale eval/
    if stale:
        view.missing.append(f"evaluation left out: {stale}")
        return _answers(view, evaluated=False) or view
    view.perplexity = _json(paths.perplexity)
    view.generation = _json(paths.generation_metrics)
    forgetting = _json(paths.forgetting)
    view.forgetting = forgetting if isinstance(forgetting, dict) and "ratio" in forgetting else None
    if view.perplexity is None:
        view.missing.append(f"evaluation ({stage('evaluate').first(name)})")
    _answers(view)
    return view


def _answers(view: RunView, evaluated: bool = True) -> None:
    """The tuned model's answers: the evaluation's, else the last answers sampled while training."""
    if evaluated and view.paths.predictions.is_file():
        rows = [r for r in read_examples(view.paths.predictions) if isinstance(r, dict)]
        view.answers = {r["prompt"]: r.get("tuned", "") for r in rows if isinstance(r.get("prompt"), str)}
        view.answers_from = "eval/predictions.jsonl"
        return
    rows = read_samples(view.paths.samples)
    if rows:
        last = max(r["step"] for r in rows)
        view.answers = {r["prompt"]: r["answer"] for r in rows if r["step"] == last}
        view.answers_from = f"logs/samples.jsonl (step {last})"


def compare_runs(names) -> list[RunView]:
    names = list(dict.fromkeys(names))
    if not names:
        raise ConfigError("compare: name at least one run")
    return [load_run(n) for n in names]


def settings_diff(runs: list[RunView]):
    """The settings whose values differ between the runs (rows: settings; columns: runs)."""
    import pandas as pd

    keys = sorted({k for r in runs for k in r.settings})
    rows = {k: {r.name: _cell(r.settings.get(k)) for r in runs} for k in keys
            if len({json.dumps(r.settings.get(k), sort_keys=True, default=str) for r in runs}) > 1}
    return pd.DataFrame(rows, index=[r.name for r in runs]).T.reindex(columns=[r.name for r in runs])


def _cell(v):
    return json.dumps(v) if isinstance(v, (dict, list)) else v


def _last(metrics: dict, key: str):
    series = metrics.get(key)
    return series[1][-1] if series else None


def results_table(runs: list[RunView]):
    """Final losses, perplexity, generation metrics and the forgetting check of each run (rows: figures)."""
    import pandas as pd

    def gen(r, key):
        tuned = (r.generation or {}).get("tuned")
        return tuned.get(key) if isinstance(tuned, dict) else None

    figures = {
        "last training loss": lambda r: _last(r.metrics, "loss"),
        "last eval loss": lambda r: _last(r.metrics, "eval_loss"),
        "steps": lambda r: max((s[0][-1] for s in r.metrics.values() if s[0]), default=None),
        "eval perplexity, base": lambda r: ((r.perplexity or {}).get("base") or {}).get("perplexity"),
        "eval perplexity, tuned": lambda r: ((r.perplexity or {}).get("tuned") or {}).get("perplexity"),
        "BLEU (0-100)": lambda r: gen(r, "bleu"),
        "ROUGE-L F1": lambda r: gen(r, "rouge_l"),
        "stop rate": lambda r: gen(r, "stop_rate"),
        "answers ending with a question": lambda r: gen(r, "question_rate"),
        "forgetting: perplexity ratio on base answers": lambda r: (r.forgetting or {}).get("ratio"),
        "forgetting: mean KL (nats a token)": lambda r: (r.forgetting or {}).get("mean_kl"),
        "last sampled stop rate": lambda r: _last(r.metrics, "sample_stop_rate"),
    }
    rows = {label: {r.name: f(r) for r in runs} for label, f in figures.items()}
    rows = {k: v for k, v in rows.items() if any(x is not None for x in v.values())}
    return pd.DataFrame(rows, index=[r.name for r in runs]).T


def answers_table(runs: list[RunView], n: int = 4):
    """Each run's answer to the same prompts (the first `n` prompts every run answered), side by side."""
    import pandas as pd

    with_answers = [r for r in runs if r.answers]
    if not with_answers:
        return pd.DataFrame(columns=["prompt", *[r.name for r in runs]])
    shared = [p for p in with_answers[0].answers if all(p in r.answers for r in with_answers)][:n]
    return pd.DataFrame([{"prompt": p, **{r.name: r.answers.get(p, "") for r in runs}} for p in shared],
                        columns=["prompt", *[r.name for r in runs]])


def curves_figure(runs: list[RunView]):
    """Training loss (solid) and eval loss (dashed, dots) of every run on one axis."""
    import matplotlib as mpl
    from matplotlib.figure import Figure

    palette = [COLORS["train"], COLORS["eval"], COLORS["merged"], COLORS["other"], "#ff7f0e", "#8c564b"]
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(9, 4.5))
        ax = fig.add_subplot()
        for k, r in enumerate(runs):
            color = palette[k % len(palette)]
            if "loss" in r.metrics:
                ax.plot(*r.metrics["loss"], color=color, label=f"{r.name} train")
            if "eval_loss" in r.metrics:
                ax.plot(*r.metrics["eval_loss"], color=color, linestyle="--", marker="o", label=f"{r.name} eval")
        ax.set_xlabel(STEP)
        ax.set_ylabel("loss (nats a token)")
        ax.set_title("Loss of " + ", ".join(r.name for r in runs))
        if ax.lines:
            ax.legend()
        fig.tight_layout()
    return fig


def _text(df, width: int = 60) -> str:
    if df.empty:
        return "  (none)"
    view = df.copy()
    for c in view.columns:
        view[c] = view[c].map(lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else
                              f"{v:.4g}" if isinstance(v, float) else
                              (str(v) if len(str(v)) <= width else str(v)[:width - 3] + "...").replace("\n", " "))
    return view.to_string()


def status_lines(runs: list[RunView]) -> list[str]:
    """One line a run: what it is missing, or that it has every result."""
    return [f"{r.name}: missing {'; '.join(r.missing)}" if r.missing else f"{r.name}: complete" for r in runs]


def report(runs: list[RunView]) -> str:
    """The comparison as text (what `python -m lib compare` prints)."""
    lines = [f"Comparing {len(runs)} runs: {', '.join(r.name for r in runs)}", ""]
    lines += [line for line, r in zip(status_lines(runs), runs) if r.missing]
    lines += ["", "Settings that differ:", _text(settings_diff(runs)), "", "Results:", _text(results_table(runs)),
              "", "Answers to the same prompts (tuned):", _text(answers_table(runs), width=50)]
    sources = [f"{r.name}: {r.answers_from}" for r in runs if r.answers_from]
    if sources:
        lines.append("  (answers from " + "; ".join(sources) + ")")
    return "\n".join(lines)


FIGURE_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg")


def run_compare(names, figure: str | None = None) -> str:
    """Entry point of `python -m lib compare`: prints the report; `figure`: a PNG path for the loss curves."""
    if figure and Path(figure).suffix.lower() not in FIGURE_SUFFIXES:  # matplotlib would add .png to a folder
        raise ConfigError(f"--figure {figure}: a file name ending in {', '.join(FIGURE_SUFFIXES)} "
                          "(e.g. curves.png), not a folder or another kind of file")
    runs = compare_runs(names)
    text = report(runs)
    print(text)
    if figure:
        path = Path(figure).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        curves_figure(runs).savefig(path, dpi=110)
        print(f"loss curves: {path}")
    return text

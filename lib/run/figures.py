"""The figures of a run, shared by notebooks 01, 03 and 05: training curves, perplexity, generation
metrics, token lengths. `lib.evaluate.plots` (notebook 05) saves them; this module only reads and draws.

    from lib.run.figures import load_inputs, panel_figure, overview_figure
    fig = panel_figure("loss", load_inputs("demo"))

Reads logs/training_metrics.csv (required), and when present eval/perplexity.json,
eval/generation_metrics.json, merged/merge_report.json, data/report.json, logs/training_summary.json
and config.yaml. Panels whose data is missing say which notebook provides it. Figures are drawn
on matplotlib's Agg canvas (no pyplot, no display needed) and saved as PNG under plots/;
notebooks show the saved files.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from lib.run.config import load_config
from lib.run.errors import SFTError
from lib.run.paths import require, run_paths
from lib.run.rundir import check_fresh, fingerprint, read_json, read_text, unusable
from lib.run.stages import stage

STEP = "optimizer step"
COLORS = {"train": "#1f77b4", "eval": "#d62728", "base": "#7f7f7f", "tuned": "#1f77b4", "merged": "#2ca02c",
          "other": "#9467bd"}
STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10,
         "xtick.labelsize": 10, "ytick.labelsize": 10, "axes.grid": True, "grid.alpha": 0.3}
PANELS = ["loss", "behaviour", "learning_rate", "grad_norm", "tokens_per_second", "perplexity", "generation_metrics",
          "token_lengths", "peak_memory"]
# Panels drawn as a file of their own only, when the run has their data (not in the overview).
OWN_FILE = ["eval_loss_by_source"]


# ----------------------------------------------------------------------------- inputs


def _read_optional(path: Path):
    """A JSON result of a stage that may not have run yet: None when missing."""
    return read_json(path) if path.exists() else None


def read_metrics(path) -> dict:
    """training_metrics.csv as {column: (steps, values)} with the empty cells of each column dropped."""
    import pandas as pd

    path = Path(path)
    try:
        df = pd.read_csv(io.StringIO(read_text(path)))  # a regular file: a FIFO is refused, never waited on
    except pd.errors.EmptyDataError:
        return {}
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise SFTError(f"{path}: not a readable CSV ({str(e).splitlines()[0]})") from None
    if "step" not in df.columns:
        raise SFTError(f"{path}: no 'step' column (columns: {', '.join(map(str, df.columns))})")
    df = df.apply(pd.to_numeric, errors="coerce")
    out = {}
    for col in df.columns:
        if col == "step":
            continue
        sub = df[["step", col]].dropna()
        sub = sub[sub[col].map(math.isfinite)]
        if len(sub):
            out[col] = (sub["step"].tolist(), sub[col].tolist())
    return out


def _merged_perplexity(report: dict | None):
    """The merged model's perplexity from merged/merge_report.json (merge's own result), if any."""
    merged = ((report or {}).get("perplexity") or {}).get("merged")
    if isinstance(merged, dict) and isinstance(merged.get("perplexity"), (int, float)):
        return float(merged["perplexity"])
    return None


def token_length_histogram(report: dict | None):
    """(bin_edges, counts, max_length) from data/report.json (a histogram or a list of lengths)."""
    if not isinstance(report, dict):
        return None
    tl = report.get("token_lengths")
    max_length = report.get("max_length")
    if isinstance(tl, dict) and isinstance(tl.get("histogram"), dict):
        h = tl["histogram"]
        edges, counts = h.get("bin_edges"), h.get("counts")
        if edges and counts and len(edges) == len(counts) + 1:
            return list(edges), list(counts), max_length
    values = tl.get("values") if isinstance(tl, dict) else tl
    if isinstance(values, list) and values and all(isinstance(v, (int, float)) for v in values):
        import numpy as np

        counts, edges = np.histogram(values, bins=min(30, max(5, len(set(values)))))
        return edges.tolist(), counts.tolist(), max_length
    return None


def load_inputs(run: str) -> dict:
    """Everything the plots draw, read from the run directory."""
    paths = run_paths(run)
    require(paths, "metrics_csv")
    fingerprint(paths, "train")  # the training logs are complete (not an interrupted or running training)
    if paths.perplexity.exists():
        check_fresh(paths, "evaluate", paths.eval_dir)  # eval/ of an adapter trained before a retrain
    ppl = _read_optional(paths.perplexity)
    problem = unusable(paths, "merge", verify=["merged/merge_report.json"])  # interrupted, damaged or stale
    if problem:
        print(f"note: the merged model's figures are left out: {problem}")
    merge_report = None if problem else _read_optional(paths.merge_report)
    data_report = _read_optional(paths.data_report)
    cfg = None
    if paths.config.exists():
        try:
            cfg = load_config(paths.config)
        except SFTError:
            cfg = None
    perplexities = {}
    for m in ("base", "tuned"):
        if ppl and isinstance(ppl.get(m), dict) and "perplexity" in ppl[m]:
            perplexities[m] = ppl[m]["perplexity"]
    merged = _merged_perplexity(merge_report)
    if merged is not None:
        perplexities["merged"] = merged
    return {
        "run": run,
        "metrics": read_metrics(paths.metrics_csv),
        "perplexity": perplexities,
        "generation": _read_optional(paths.generation_metrics),
        "token_lengths": token_length_histogram(data_report),
        "summary": _read_optional(paths.training_summary) or {},
        "config": cfg,
    }


# ----------------------------------------------------------------------------- panels


def _number(v: float) -> str:
    if v != 0 and abs(v) < 0.01:
        return f"{v:.2e}"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"


def _placeholder(ax, title: str, message: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True,
            color="#555555", fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def _line(ax, steps, values, label=None, color=None, style="-"):
    few = len(steps) <= 40
    ax.plot(steps, values, style, marker="o" if few else None, markersize=4 if len(steps) > 1 else 7,
            label=label, color=color, linewidth=1.6)
    if len(steps) == 1:
        ax.annotate(_number(values[0]), (steps[0], values[0]), textcoords="offset points", xytext=(8, 6),
                    color=color)


def _step_axis(ax, steps=()):
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(STEP)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if steps and max(steps) - min(steps) < 2:  # one or two logged steps: whole-number ticks around them
        ax.set_xlim(min(steps) - 1, max(steps) + 1)


def _series_panel(ax, data, key, title, ylabel, missing, color=None, log_if_wide=False, sci=False):
    m = data["metrics"]
    if key not in m:
        return _placeholder(ax, title, missing)
    steps, values = m[key]
    _line(ax, steps, values, color=color)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    _step_axis(ax, steps)
    positive = [v for v in values if v > 0]
    if log_if_wide and positive and len(positive) == len(values) and max(positive) / min(positive) > 50:
        ax.set_yscale("log")
    if sci:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))


def panel_loss(ax, data):
    m = data["metrics"]
    if "loss" not in m and "eval_loss" not in m:
        return _placeholder(ax, "Loss", f"no loss logged yet: run notebook {stage('train').notebook}")
    if "loss" in m:
        _line(ax, *m["loss"], label="train loss", color=COLORS["train"])
    if "eval_loss" in m:
        _line(ax, *m["eval_loss"], label="eval loss", color=COLORS["eval"], style="--")
    else:
        ax.text(0.98, 0.95, "no eval steps logged", ha="right", va="top", transform=ax.transAxes,
                color="#555555", fontsize=9)
    ax.set_title("Training and evaluation loss")
    ax.set_ylabel("cross-entropy (nats / answer token)")
    _step_axis(ax, [x for k in ("loss", "eval_loss") if k in m for x in m[k][0]])
    ax.legend(loc="best")


# The answers sampled while training (lib/train/samples.py): the metrics CSV's sample_* columns, on a 0-1 scale.
BEHAVIOUR = {"sample_stop_rate": ("stop on their own", "#2ca02c"),
             "sample_question_rate": ("end with a question", "#9467bd"),
             "sample_rouge_l": ("ROUGE-L F1 vs reference", "#1f77b4"),
             "sample_bleu": ("BLEU / 100", "#ff7f0e"),
             "sample_task_score": ("task score (the run's first, as notebook 04 scores it)", "#d62728")}


def best_task_step(metrics: dict) -> tuple[int, float] | None:
    """(step, value) of the sampled step with the best task score (the first such step), or None."""
    steps, values = metrics.get("sample_task_score", ([], []))
    pairs = [(s, v) for s, v in zip(steps, values) if v == v]
    return max(pairs, key=lambda p: (p[1], -p[0])) if pairs else None


def panel_behaviour(ax, data):
    m = data["metrics"]
    shown = [k for k in BEHAVIOUR if k in m]
    if not shown:
        return _placeholder(ax, "Answers during training", "no answers sampled while training "
                            f"(eval.sample_prompts is 0, or notebook {stage('train').notebook} not run)")
    for key in shown:
        label, color = BEHAVIOUR[key]
        steps, values = m[key]
        _line(ax, steps, [v / 100 if key == "sample_bleu" else v for v in values], label=label, color=color)
    ax.set_ylim(-0.05, 1.05)
    best = best_task_step(m)
    cfg = data.get("config")
    stops = m.get("sample_stop_rate", ([], []))[1]
    cut = (f"\nanswers cut at {cfg.eval.sample_max_new_tokens} new tokens count as not stopping"
           "\n(raise eval.sample_max_new_tokens to see whole ones)"
           if cfg is not None and stops and stops[-1] < 0.5 else "")  # the Socratic demo: answers run past 16
    ax.set_title("Answers during training (sample prompts)" +
                 (f"\nbest task score {best[1]:.0%} at step {best[0]}" if best else "") + cut)
    ax.set_ylabel("share of answers / score (0-1)")
    _step_axis(ax, [x for k in shown for x in m[k][0]])
    ax.legend(loc="best")


def panel_learning_rate(ax, data):
    _series_panel(ax, data, "learning_rate", "Learning-rate schedule", "learning rate",
                  "learning rate not logged", color=COLORS["other"], sci=True)


def panel_grad_norm(ax, data):
    _series_panel(ax, data, "grad_norm", "Gradient norm", "L2 norm of the gradient (before clipping)",
                  "gradient norm not logged", color=COLORS["train"], log_if_wide=True)
    cfg = data.get("config")
    if "grad_norm" in data["metrics"] and cfg is not None and cfg.train.max_grad_norm:
        ax.axhline(cfg.train.max_grad_norm, color="#555555", linestyle=":", linewidth=1.2,
                   label=f"clipping threshold ({cfg.train.max_grad_norm:g})")
        ax.legend(loc="upper right")


def panel_tokens_per_second(ax, data):
    _series_panel(ax, data, "tokens_per_second", "Training throughput", "tokens per second",
                  "throughput not logged", color=COLORS["merged"])


def panel_peak_memory(ax, data):
    _series_panel(ax, data, "peak_memory_mb", "Peak memory (GPU allocated; process RSS on a CPU)",
                  "peak memory (MiB)", "peak memory not logged", color=COLORS["other"])


def _bar_labels(ax, bars, fmt=_number):
    for b in bars:
        h = b.get_height()
        if h is None or not math.isfinite(h):
            continue
        ax.annotate(fmt(h), (b.get_x() + b.get_width() / 2, h), ha="center", va="bottom",
                    textcoords="offset points", xytext=(0, 3), fontsize=10)


def panel_perplexity(ax, data):
    ppl = data["perplexity"]
    title = "Eval perplexity (answer tokens)"
    if not ppl:
        return _placeholder(ax, title, f"no perplexity yet:\nrun notebook {stage('evaluate').notebook}")
    names = list(ppl)
    values = [ppl[n] for n in names]
    bars = ax.bar(names, values, color=[COLORS.get(n, COLORS["other"]) for n in names], width=0.6)
    log = min(values) > 0 and max(values) / min(values) > 20
    if log:
        ax.set_yscale("log")
    _bar_labels(ax, bars)
    ax.set_title(title)
    ax.set_ylabel("perplexity (lower is better)" + (", log scale" if log else ""))
    ax.set_xlabel("model")
    ax.margins(y=0.15)
    if log:
        ax.set_ylim(top=max(values) * 3)
    ax.grid(axis="x", visible=False)


def panel_generation(ax, data):
    gen = data.get("generation")
    title = "Generated answers vs references"
    if not gen or not isinstance(gen.get("tuned"), dict):
        msg = ("no answers generated (eval.generate_examples is 0)" if gen else
               f"no generation metrics yet:\nrun notebook {stage('evaluate').notebook}")
        return _placeholder(ax, title, msg)
    metrics = [("bleu", "BLEU / 100", 0.01), ("rouge_l", "ROUGE-L F1", 1.0), ("stop_rate", "stop rate", 1.0),
               ("question_rate", "ends with ?", 1.0)]
    models = [m for m in ("base", "tuned") if isinstance(gen.get(m), dict)]
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(metrics))]
        vals = [(gen[m].get(k) or 0.0) * scale for k, _, scale in metrics]
        bars = ax.bar(xs, vals, width=width, label=m, color=COLORS[m])
        _bar_labels(ax, bars, "{:.2f}".format)
    ref = (gen.get("reference") or {}).get("question_rate")
    if ref is not None:
        j = len(metrics) - 1
        ax.hlines(ref, j - 0.45, j + 0.45, colors="#000000", linestyles="--", linewidth=1.2,
                  label="references (ends with ?)")
    ax.set_xticks(range(len(metrics)), [label for _, label, _ in metrics])
    ax.set_ylim(0, 1.18)
    ax.set_ylabel("score (0 to 1, higher is better)")
    ax.set_title(f"{title} ({gen.get('examples', '?')} prompts)")
    ax.legend(loc="upper left", ncols=3)
    ax.grid(axis="x", visible=False)


def panel_token_lengths(ax, data):
    tl = data.get("token_lengths")
    title = "Token lengths of the training examples"
    if not tl:
        return _placeholder(ax, title, f"no token-length histogram:\nrun notebook {stage('prepare').notebook}")
    edges, counts, max_length = tl
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color=COLORS["train"], edgecolor="white")
    ax.set_title(title)
    ax.set_xlabel("tokens per example (prompt + answer)")
    ax.set_ylabel("examples")
    if isinstance(max_length, (int, float)):
        if max_length <= edges[-1] * 1.5:
            ax.axvline(max_length, color=COLORS["eval"], linestyle="--", label=f"max_length = {max_length}")
            ax.legend(loc="upper right")
        else:
            ax.text(0.98, 0.95, f"max_length = {max_length}\n(all examples fit)", ha="right", va="top",
                    transform=ax.transAxes, fontsize=10, color="#555555")
    ax.grid(axis="x", visible=False)


def panel_eval_loss_by_source(ax, data):
    """A mix of sources (data.sources): each source's eval loss at every evaluation."""
    series = (data.get("summary") or {}).get("eval_loss_by_source")
    if not series:
        return _placeholder(ax, "Eval loss by source", "one data source: mix several with --data A --data B")
    steps = []
    for name, points in series.items():
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        _line(ax, xs, ys, label=name)
        steps += xs
    ax.set_title("Evaluation loss by data source")
    ax.set_ylabel("cross-entropy (nats / answer token)")
    _step_axis(ax, steps)
    ax.legend(loc="best")


DRAW = {
    "eval_loss_by_source": panel_eval_loss_by_source,
    "loss": panel_loss,
    "behaviour": panel_behaviour,
    "learning_rate": panel_learning_rate,
    "grad_norm": panel_grad_norm,
    "tokens_per_second": panel_tokens_per_second,
    "perplexity": panel_perplexity,
    "generation_metrics": panel_generation,
    "token_lengths": panel_token_lengths,
    "peak_memory": panel_peak_memory,
}


def has_data(name: str, data: dict) -> bool:
    m = data["metrics"]
    return {
        "loss": "loss" in m or "eval_loss" in m,
        "behaviour": any(k in m for k in BEHAVIOUR),
        "learning_rate": "learning_rate" in m,
        "grad_norm": "grad_norm" in m,
        "tokens_per_second": "tokens_per_second" in m,
        "peak_memory": "peak_memory_mb" in m,
        "perplexity": bool(data["perplexity"]),
        "generation_metrics": bool(data.get("generation") and isinstance(data["generation"].get("tuned"), dict)),
        "token_lengths": bool(data.get("token_lengths")),
        "eval_loss_by_source": bool((data.get("summary") or {}).get("eval_loss_by_source")),
    }[name]


# ----------------------------------------------------------------------------- figures


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _title(data) -> str:
    cfg, summary = data.get("config"), data.get("summary") or {}
    parts = [f"run '{data['run']}'"]
    if cfg is not None:
        parts.append(f"model {Path(cfg.model.name_or_path).name}, {cfg.quant.mode} {cfg.quant.quant_type}, "
                     f"LoRA r={cfg.lora.r}")
    if summary.get("global_step") is not None:
        parts.append(f"{summary['global_step']} steps")
    return "  |  ".join(parts)


def overview_figure(data: dict):
    """The overview of every panel, two a row, as a matplotlib Figure (Agg canvas)."""
    import matplotlib

    rows = (len(PANELS) + 1) // 2
    with matplotlib.rc_context(STYLE):
        fig = _figure((12, 3.75 * rows))
        axes = fig.subplots(rows, 2).flatten()
        for ax, name in zip(axes, PANELS):
            DRAW[name](ax, data)
        for ax in axes[len(PANELS):]:
            ax.set_visible(False)
        fig.suptitle(_title(data), fontsize=13)
    return fig


def panel_figure(name: str, data: dict):
    """One panel as its own Figure."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        fig = _figure((8, 4.5))
        DRAW[name](fig.subplots(), data)
    return fig

"""Plots (lib/evaluate/plots.py): real PNGs from a trained run, and runs with one step, no eval, no log."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import copy_run
from matplotlib.image import imread

from lib.evaluate.plots import run_plots
from lib.run.errors import MissingStageError, SFTError
from lib.run.figures import PANELS, load_inputs, token_length_histogram
from lib.run.paths import run_paths

PNG = b"\x89PNG\r\n\x1a\n"


def _check_png(path, size=None):
    assert path.read_bytes()[:8] == PNG, f"{path} is not a PNG"
    img = imread(path)
    assert img.ndim == 3 and img.std() > 0.01, f"{path} is blank"
    if size is not None:
        assert img.shape[1::-1] == size
    return img


def test_plots_of_the_trained_run(trained_run):
    run = copy_run(trained_run, "plotted")  # the session run stays read-only
    paths = run_paths(run)
    paths.eval_dir.mkdir(exist_ok=True)
    paths.perplexity.write_text(json.dumps({
        "base": {"loss": 7.6, "perplexity": 2000.0, "tokens": 1000},
        "tuned": {"loss": 5.3, "perplexity": 200.0, "tokens": 1000}}))
    scores = {"bleu": 3.0, "rouge_l": 0.2, "stop_rate": 0.5, "question_rate": 0.25, "questions_per_answer": 1.0,
              "mean_words": 12.0}
    paths.generation_metrics.write_text(json.dumps({"examples": 4, "base": scores, "tuned": scores,
                                                    "reference": {"question_rate": 1.0}}))
    # The merged model's perplexity as notebook 06 reports it.
    paths.merged.mkdir()
    paths.merge_report.write_text(json.dumps({"perplexity": {"merged": {"perplexity": 201.0},
                                                             "adapter": {"perplexity": 200.0}}}))

    data = load_inputs(run)
    steps, losses = data["metrics"]["loss"]
    assert len(steps) >= 5 and steps == sorted(steps) and all(v > 0 for v in losses)
    assert "eval_loss" in data["metrics"] and "learning_rate" in data["metrics"]
    assert data["perplexity"] == {"base": 2000.0, "tuned": 200.0, "merged": 201.0}
    edges, counts, max_length = data["token_lengths"]
    report = json.loads(paths.data_report.read_text())
    assert sum(counts) == report["counts"]["train"] and max_length == report["max_length"]

    pngs = run_plots(run)
    assert pngs[0] == paths.plots / "metrics_plot.png"
    _check_png(pngs[0], size=(1200, 1875))  # 5 rows of 2 panels
    names = {p.stem for p in pngs[1:]}
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_second", "perplexity", "generation_metrics",
            "token_lengths"} <= names <= set(PANELS)
    for p in pngs[1:]:
        _check_png(p, size=(800, 450))

    # Evaluation results gone: their panels go too (no stale pictures of an earlier run).
    paths.perplexity.unlink()
    paths.generation_metrics.unlink()
    (paths.merged / "merge_report.json").unlink()
    names = {p.stem for p in run_plots(run)}
    assert "perplexity" not in names and "generation_metrics" not in names
    assert not (paths.plots / "perplexity.png").exists()


def _log(outputs, run, text):
    paths = run_paths(run)
    paths.logs.mkdir(parents=True)
    paths.metrics_csv.write_text(text)
    return paths


HEADER = "step,epoch,loss,eval_loss,learning_rate,grad_norm,tokens_per_second,peak_memory_mb\n"


def test_one_logged_step_without_eval(outputs):
    paths = _log(outputs, "one", HEADER + "1,0.1,7.5,,0.0002,0.8,1500.0,\n")
    pngs = run_plots("one")
    assert [p.name for p in pngs] == ["metrics_plot.png", "loss.png", "learning_rate.png", "grad_norm.png",
                                      "tokens_per_second.png"]
    for p in pngs:
        _check_png(p)
    data = load_inputs("one")
    assert data["metrics"]["loss"] == ([1], [7.5]) and "eval_loss" not in data["metrics"]
    assert data["perplexity"] == {} and data["token_lengths"] is None
    assert paths.plots.is_dir()


def test_eval_rows_and_missing_cells(outputs):
    # Train and eval logs on separate rows, empty cells, a non-finite value: each series keeps its own steps.
    _log(outputs, "mixed", HEADER + "2,0.2,7.0,,1e-4,0.5,1000,\n4,0.4,6.0,,2e-4,nan,1100,\n4,0.4,,6.5,,,,\n")
    m = load_inputs("mixed")["metrics"]
    assert m["loss"] == ([2, 4], [7.0, 6.0])
    assert m["eval_loss"] == ([4], [6.5])
    assert m["grad_norm"] == ([2], [0.5])
    assert "peak_memory_mb" not in m
    _check_png(run_plots("mixed")[0])


def test_header_only_log_gives_an_overview_of_placeholders(outputs):
    _log(outputs, "empty", HEADER)
    pngs = run_plots("empty")
    assert [p.name for p in pngs] == ["metrics_plot.png"]
    _check_png(pngs[0])


def test_missing_or_bad_log_is_a_clear_error(outputs):
    from lib.__main__ import main

    with pytest.raises(MissingStageError, match="03_train_sft"):
        run_plots("untrained")
    assert main(["plot", "--run", "untrained"]) == 2
    _log(outputs, "bad", "epoch,loss\n0.1,7\n")
    with pytest.raises(SFTError, match="training_metrics.csv: no 'step' column"):
        run_plots("bad")
    assert not run_paths("bad").plots.exists()


def testtoken_length_histogram_from_a_histogram_or_a_list():
    hist = {"token_lengths": {"histogram": {"bin_edges": [10, 20, 30], "counts": [3, 1]}}, "max_length": 64}
    assert token_length_histogram(hist) == ([10, 20, 30], [3, 1], 64)
    edges, counts, max_length = token_length_histogram({"token_lengths": [12, 15, 15, 40, 41], "max_length": 32})
    assert sum(counts) == 5 and edges[0] == 12 and edges[-1] == 41 and max_length == 32
    assert np.all(np.diff(edges) > 0)
    assert token_length_histogram({"counts": {}}) is None and token_length_histogram(None) is None


def test_the_answers_panel_says_how_long_a_sampled_answer_may_be():
    """Answers sampled while training are cut at eval.sample_max_new_tokens: a panel whose last stop rate is low
    says so (the Socratic demo's answers all ran past 16 tokens, read as "never stops"), and not otherwise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lib.run.config import make_config
    from lib.run.figures import panel_behaviour

    cfg = make_config("tiny")
    for stops, warned in (([0.0, 0.0], True), ([0.0, 1.0], False)):
        fig, ax = plt.subplots()
        metrics = {"sample_stop_rate": ([0, 10], stops), "sample_task_score": ([0, 10], [0.0, 0.5])}
        panel_behaviour(ax, {"metrics": metrics, "config": cfg})
        title = ax.get_title()
        plt.close(fig)
        assert title.startswith("Answers during training (sample prompts)\nbest task score 50% at step 10")
        assert (f"answers cut at {cfg.eval.sample_max_new_tokens} new tokens count as not stopping\n(raise "
                "eval.sample_max_new_tokens" in title) is warned

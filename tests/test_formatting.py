"""How numbers and cut text read (lib/run/formatting.py), and the reading rules a rendered notebook is held to
(tests/rendered.py): each rule catches what it names and lets the project's own marks through."""

from __future__ import annotations

import nbformat
import pandas as pd
import pytest

from lib.run.formatting import CUT_AT_MAX_LENGTH, CUT_AT_MAX_NEW_TOKENS, mark_cut, num, pct, table
from tests.rendered import long_numbers, problems


@pytest.mark.parametrize("value, shown", [
    (7074.0, "7,074"), (3.7159759998321533, "3.716"), (2.7694666385650635, "2.769"), (0.000183378, "0.0001834"),
    (9.4e-07, "9.400e-07"), (1234567.0, "1,234,567"), (12345.678, "12,346"), (None, "-"), (float("nan"), "-"),
    (30, "30"), (True, "True")])
def test_num_rounds_as_a_reader_wants(value, shown):
    assert num(value) == shown


def test_pct_and_cut_marks():
    assert (pct(0.125), pct(1.0), pct(None), pct(0.125, 0)) == ("12.5%", "100%", "-", "12%")
    why = CUT_AT_MAX_NEW_TOKENS.format(n=96)
    assert mark_cut("This creates a sort of ", True, why) == "This creates a sort of [… cut at max_new_tokens=96: did not stop]"
    assert mark_cut("Done.", False, why) == "Done."
    assert "max_length=8" in CUT_AT_MAX_LENGTH.format(n=8)


def _notebook(*outputs) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = list(outputs)
    nb.cells = [cell]
    return nb


def _html_table(df) -> nbformat.NotebookNode:
    return nbformat.v4.new_output("display_data", data={"text/html": df.to_html(), "text/plain": "table"})


def test_reading_rules_catch_what_they_name():
    log = nbformat.v4.new_output("stream", name="stderr", text="llama_model_loader: - kv 0\n" * 21)
    assert "stderr output of 21 lines" in problems(_notebook(log))[0]
    pieces = [nbformat.v4.new_output("stream", name="stderr", text="[ 1/272] output_norm.weight\n")] * 21
    assert "stderr output of 21 lines" in problems(_notebook(*pieces))[0]  # one block on the page
    short = nbformat.v4.new_output("stream", name="stderr", text="a warning\n" * 20)
    assert problems(_notebook(short)) == []

    line = nbformat.v4.new_output("stream", name="stdout", text="eval loss 3.7159759998321533 -> 2.77; torch 2.13.0\n")
    assert long_numbers("eval loss 3.7159759998321533 -> 2.77; torch 2.13.0 7074.000000") == ["3.7159759998321533",
                                                                                           "7074.000000"]
    assert "3.7159759998321533" in problems(_notebook(line))[0]
    cut = pd.DataFrame({"value": ["HuggingFaceTB/SmolLM2-135M-Ins…", "a reply [… cut at max_new_tokens=96: did not stop]"]})
    found = problems(_notebook(_html_table(cut)))
    assert len(found) == 1 and "SmolLM2-135M-Ins…" in found[0]


def test_table_keeps_names_whole_and_rounds():
    df = pd.DataFrame({"value": [7074.0, 3.7159759998321533, "HuggingFaceTB/SmolLM2-135M-Instruct " * 3]})
    shown = table(df).to_html()
    assert "7,074" in shown and "3.716" in shown and "SmolLM2-135M-Instruct HuggingFaceTB" in shown
    nb = _notebook(nbformat.v4.new_output("display_data", data={"text/html": shown, "text/plain": "t"}))
    assert problems(nb) == []


MARKUP = "<img src=x onerror=alert(1)>"


def _html(shown) -> str:
    return shown.to_html() if hasattr(shown, "to_html") and not isinstance(shown, pd.DataFrame) else shown._repr_html_()


def test_table_escapes_markup_in_every_cell_and_label():
    """Data text (answers, prompts, field and run names) is written into a notebook page as HTML: pandas' Styler
    does not escape it, so the one table helper does, in cells, row labels and column labels."""
    df = pd.DataFrame({"text": [MARKUP, "a & b"], MARKUP: [MARKUP, 2.5], "n": [1, None]}, index=[MARKUP, "b"])
    for shown in (table(df), table(df, index=False), table(df.reset_index(drop=True))):
        html = shown.to_html()
        assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html and "a &amp; b" in html
        assert "2.5" in html


def _poisoned(value):
    """`value` (a report or summary as a stage wrote it) with MARKUP appended to every text value."""
    if isinstance(value, dict):
        return {k: _poisoned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_poisoned(v) for v in value]
    return value + MARKUP if isinstance(value, str) else value


def test_every_table_a_notebook_shows_escapes_data_text(trained_run):
    """Every table function of notebooks 01-03 on the fixture run's own reports with markup in every text
    value, and the samples table with markup in the prompts and answers: none writes the markup as HTML."""
    import json
    import shutil

    from lib.data import audit_table, fields_table
    from lib.model import adapted_table, model_table
    from lib.run.paths import run_paths
    from lib.train import metrics_table, samples_table, summary_table
    from tests.conftest import copy_run

    paths = run_paths(trained_run)
    report = _poisoned(json.loads(paths.data_report.read_text()))
    summary = _poisoned(json.loads(paths.model_summary.read_text()))
    training = _poisoned(json.loads(paths.training_summary.read_text()))
    shown = [audit_table(report), fields_table(report), model_table(summary), adapted_table(summary),
             summary_table(training)]
    run = copy_run(trained_run, "markup")
    copy = run_paths(run)
    rows = [json.loads(line) for line in copy.samples.read_text().splitlines()]
    copy.samples.write_text("".join(json.dumps({**r, "prompt": r["prompt"] + MARKUP, "answer": MARKUP,
                                                "reference": MARKUP}) + "\n" for r in rows))
    shown += [samples_table(run, styled=True), samples_table(run), metrics_table(run)]
    try:
        for i, t in enumerate(shown):
            html = _html(t)
            assert "<img" not in html, f"table {i} writes data as HTML"
        assert all(MARKUP.replace("<", "&lt;").replace(">", "&gt;") in _html(t) for t in shown[:2] + shown[5:7])
    finally:
        shutil.rmtree(copy.root)

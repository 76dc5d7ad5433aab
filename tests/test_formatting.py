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

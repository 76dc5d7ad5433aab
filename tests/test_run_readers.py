"""The readers added since the last round go through the run-directory checks (lib/run/rundir.py read_text /
read_json): a FIFO or folder where a file is expected is refused in one line, never waited on; a damaged file
is one line naming it; compare leaves a half-installed or stale eval/ out and says so; --figure needs an image
file name."""

from __future__ import annotations

import json
import os

import pytest

from lib.run.errors import SFTError
from lib.run.rundir import read_json, read_text


@pytest.mark.parametrize("kind", ["fifo", "folder", "deep", "digits", "latin1"])
def test_read_json_refuses_what_is_not_a_json_file_in_one_line(tmp_path, kind):
    path = tmp_path / "settings.json"
    if kind == "fifo":
        os.mkfifo(path)  # reading it would wait forever
    elif kind == "folder":
        path.mkdir()
    else:
        path.write_bytes({"deep": b"[" * 100_000 + b"]" * 100_000, "digits": b"1" * 5000,
                          "latin1": b'{"a": "caf\xe9"}'}[kind])
    with pytest.raises(SFTError, match=rf"^{path}: ") as e:
        read_json(path)
    assert "\n" not in str(e.value)
    if kind in ("fifo", "latin1"):
        with pytest.raises(SFTError, match=rf"^{path}: "):
            read_text(path)


def _sample(step=0, index=0, **kw):
    return {"step": step, "epoch": 0.0, "index": index, "prompt": "p", "reference": "r", "answer": "a",
            "stopped": True, **kw}


@pytest.mark.parametrize("bad", ["[1, 2]", '"text"', json.dumps({"index": 0, "prompt": "p"}),
                                 json.dumps(_sample(step="2")), "{not json"])
def test_a_damaged_samples_row_is_one_line_naming_file_and_line(tmp_path, bad):
    from lib.train.samples import read_samples

    path = tmp_path / "samples.jsonl"
    path.write_text("\n".join([json.dumps(_sample()), bad, json.dumps(_sample(step=2))]) + "\n")
    with pytest.raises(SFTError, match=rf"^{path}: line 2: "):
        read_samples(path)


def test_the_samples_reader_skips_a_torn_last_line_and_refuses_a_fifo(tmp_path):
    from lib.train.samples import read_samples

    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps(_sample()) + "\n" + json.dumps(_sample(step=2))[:20])
    assert read_samples(path) == [_sample()]
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(SFTError, match="not a regular file"):
        read_samples(fifo)


@pytest.mark.parametrize("figure", ["curves.txt", "plots", "curves"])
def test_compare_figure_needs_an_image_file_name(outputs, capsys, figure):
    from lib.__main__ import main

    assert main(["compare", "nothing", "--figure", str(outputs / figure)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a file name ending in .png" in err[0], err
    assert not list(outputs.glob("*.png"))


def test_compare_leaves_out_a_half_installed_evaluation_and_says_so(trained_run, capsys):
    """An evaluate killed mid-install (eval/ there, stages/evaluate.pending) is not shown as a result; a FIFO as
    logs/training_metrics.csv is one line, never a hang."""
    import shutil

    from conftest import copy_run

    from lib.evaluate.compare import compare_runs, status_lines
    from lib.run.paths import run_paths
    from lib.run.rundir import begin

    run = copy_run(trained_run, "half-eval")
    paths = run_paths(run)
    try:
        paths.eval_dir.mkdir(exist_ok=True)
        paths.perplexity.write_text(json.dumps({"base": {"perplexity": 9.0}, "tuned": {"perplexity": 1.0}}))
        begin(paths, "evaluate")
        view = compare_runs([run])[0]
        assert view.perplexity is None and any("evaluation left out" in m for m in view.missing), view.missing
        assert any("evaluation left out" in line for line in status_lines([view]))
        paths.metrics_csv.unlink()
        os.mkfifo(paths.metrics_csv)
        with pytest.raises(SFTError, match="not a regular file"):
            compare_runs([run])
    finally:
        shutil.rmtree(paths.root)

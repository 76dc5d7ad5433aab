"""Every reader checks the manifest of what it reads (issue 22): push, summary, chat --merged, export and merge
refuse (or leave out, saying so) results that are interrupted, damaged or stale, up the whole chain of stages.

One merged run is made once (the tiny model); a retrain or re-merge is a rewritten result sealed as the stage
would (conftest.reseal), a kill is a KeyboardInterrupt at an exact move of lib.run.rundir.install, as in
tests/test_rundir.py."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from conftest import copy_run, reseal
from test_rundir import _hold_lock, _one_error_line

from lib.__main__ import main
from lib.run import rundir
from lib.run.paths import run_paths

QUICK_EVAL = ["eval.generate_examples=1", "generation.max_new_tokens=8", "eval.max_examples=8"]


@pytest.fixture(scope="module")
def merged(trained_run) -> str:
    """The trained run, evaluated and merged once; tests copy it before changing anything."""
    from lib.evaluate.evaluation import run_evaluate
    from lib.ship.merge import run_merge

    run = copy_run(trained_run, "readers_merged")
    run_evaluate(run, overrides=QUICK_EVAL, progress=False)
    run_merge(run, overrides=["eval.max_examples=8"])
    return run


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _kill_at(monkeypatch, n: int, hit):
    """Make lib.run.rundir's os.replace raise KeyboardInterrupt at its n-th call (from 0) for which hit(src, dst)."""
    real, calls = os.replace, []

    def dying(src, dst):
        if hit(Path(src), Path(dst)):
            calls.append(dst)
            if len(calls) > n:
                raise KeyboardInterrupt("killed")
        return real(src, dst)

    monkeypatch.setattr(rundir.os, "replace", dying)
    return lambda: monkeypatch.setattr(rundir.os, "replace", real)


def _export(run: str, name: str, killed_at=None, monkeypatch=None) -> None:
    """Install an export (a stand-in GGUF) through export's own install, optionally killed at a move."""
    from lib.ship.export import _install_export

    paths = run_paths(run)
    with rundir.staging(paths.root, ".export-") as tmp:
        (tmp / name).write_bytes(b"GGUF" + name.encode())
        restore = _kill_at(monkeypatch, killed_at, lambda s, d: d.parent == paths.export) if killed_at is not None else None
        try:
            _install_export(paths, tmp, name, f"FROM ./{name}\n", {"ok": True, "gguf": name, "perplexity": {}})
        finally:
            if restore:
                restore()


def _retrain(run: str, steps: int = 999) -> None:
    """A new training result (other step counts), sealed as train would: train's fingerprint changes."""
    paths = run_paths(run)
    summary = json.loads(paths.training_summary.read_text())
    summary["global_step"] = steps
    paths.training_summary.write_text(json.dumps(summary))
    reseal(run, "train")


def _remerge(run: str) -> None:
    """A new merge of the current adapter: merge's fingerprint changes, its inputs are the current ones."""
    paths = run_paths(run)
    report = json.loads(paths.merge_report.read_text())
    report["remerged"] = True
    paths.merge_report.write_text(json.dumps(report))
    reseal(run, "merge")


def _push(run: str, *include: str) -> int:
    extra = ["--include", ",".join(include)] if include else []
    return main(["push", "--run", run, "--repo", "someone/x", "--dry-run"] + extra)


# ------------------------------------------------------------------------------ merge records every file


def test_the_merge_manifest_records_every_file_of_merged(merged):
    paths = run_paths(merged)
    m = rundir.read_manifest(paths, "merge")
    files = {f"merged/{k}" for k in _snapshot(paths.merged)}
    assert set(m["outputs"]) == files and "merged/model.safetensors" in files
    assert set(m["inputs"]) == {"prepare", "train"}


def _zero_weights(path: Path) -> None:
    """Zero every tensor of a safetensors file, header kept: it parses, loads, and is garbage."""
    data = path.read_bytes()
    head = 8 + struct.unpack("<Q", data[:8])[0]
    path.write_bytes(data[:head] + bytes(len(data) - head))


@pytest.mark.parametrize("how", ["zeroed", "truncated"])
def test_damaged_merged_weights_are_refused_by_chat_export_and_push(merged, how, capsys):
    run = copy_run(merged, f"readers_{how}")
    weights = run_paths(run).merged / "model.safetensors"
    if how == "zeroed":
        _zero_weights(weights)
    else:
        weights.write_bytes(weights.read_bytes()[:5000])
    for argv in (["chat", "--run", run, "--merged", "--prompt", "hi"], ["export", "--run", run, "--quant", "f16"],
                 ["push", "--run", run, "--repo", "someone/x", "--dry-run"]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        line = _one_error_line(capsys)
        assert str(weights) in line and f"python -m lib merge --run {run}" in line, line
    assert not run_paths(run).push.exists() and not run_paths(run).export.exists()


# ------------------------------------------------------------------------------ push


def test_push_refuses_what_an_earlier_adapter_or_merge_made(merged, capsys):
    run = copy_run(merged, "readers_push_retrain")
    paths = run_paths(run)
    _export(run, f"{run}-q8_0.gguf")
    assert _push(run) == 0
    assert set(json.loads((paths.stages / "push.json").read_text())["inputs"]) == {"train", "merge", "export"}
    pushed = _snapshot(paths.push)

    _retrain(run)  # the old merged model and GGUF are of the earlier adapter
    for parts in [(), ("merged",), ("gguf",), ("adapter", "gguf")]:
        capsys.readouterr()
        assert _push(run, *parts) == 2, parts
        line = _one_error_line(capsys)
        assert str(paths.merged) in line and "stale" in line and f"python -m lib merge --run {run}" in line, line
    assert _snapshot(paths.push) == pushed  # the last good push/ is left as it was

    _remerge(run)  # merged again, not exported: the GGUF is of the earlier merge
    assert _push(run, "gguf") == 2
    line = _one_error_line(capsys)
    assert str(paths.export) in line and "stale" in line and "merge ran again" in line, line
    assert _push(run, "adapter", "merged") == 0  # fresh: staged; the stale eval figures are left out, and said
    out = capsys.readouterr().out
    card = (paths.push / "README.md").read_text()
    assert "leaves out the figures of eval/perplexity.json" in out and "python -m lib evaluate" in out
    assert "| tuned |" not in card and "Merge check" in card and "steps: 999" in card
    assert "GGUF parity" not in card  # export's figures are of the earlier merge


def test_push_stages_only_the_gguf_the_export_manifest_records(merged):
    run = copy_run(merged, "readers_push_two_ggufs")
    _export(run, f"{run}-q8_0.gguf")
    _export(run, f"{run}-f16.gguf")  # the q8_0 file of the earlier export stays in export/, unrecorded
    assert _push(run, "gguf") == 0
    staged = set(_snapshot(run_paths(run).push))
    assert f"{run}-f16.gguf" in staged and f"{run}-q8_0.gguf" not in staged


@pytest.mark.parametrize("killed_at", [1, 2])
def test_push_refuses_a_half_installed_export(merged, killed_at, monkeypatch, capsys):
    run = copy_run(merged, f"readers_push_killed_export_{killed_at}")
    paths = run_paths(run)
    _export(run, f"{run}-q8_0.gguf")
    with pytest.raises(KeyboardInterrupt):
        _export(run, f"{run}-f16.gguf", killed_at=killed_at, monkeypatch=monkeypatch)
    for parts in [(), ("gguf",)]:
        assert _push(run, *parts) == 2
        line = _one_error_line(capsys)
        assert "export stage was interrupted" in line and f"python -m lib export --run {run}" in line, line
    assert not paths.push.exists()


def test_push_refuses_a_merge_killed_while_installing(merged, monkeypatch, capsys):
    """Killed between moving the old merged/ aside and moving the new one in: merged/ is gone for now."""
    run = copy_run(merged, "readers_push_killed_merge")
    paths = run_paths(run)
    staged = paths.root / ".merged-abcd1234"
    staged.mkdir()
    for f in paths.merged.iterdir():
        (staged / f.name).write_bytes(f.read_bytes())
    restore = _kill_at(monkeypatch, 1, lambda s, d: paths.merged in (s, d))
    with pytest.raises(KeyboardInterrupt):
        rundir.install(paths, "merge", {paths.merged: staged}, [], {})
    restore()
    assert not paths.merged.exists() and rundir.is_pending(paths, "merge")
    for argv in (["push", "--run", run, "--repo", "someone/x", "--dry-run"],
                 ["chat", "--run", run, "--merged", "--prompt", "hi"]):
        assert main(argv) == 2
        line = _one_error_line(capsys)
        assert "merge stage was interrupted" in line and f"python -m lib merge --run {run}" in line, line
    assert main(["summary", "--run", run]) == 0  # the summary leaves the merged figures out, and says why
    out = capsys.readouterr().out
    assert "merged model left out" in out and "merge stage was interrupted" in out and "merged model: perplexity" not in out


def test_a_killed_push_leaves_nothing_behind_after_the_next(merged, monkeypatch):
    run = copy_run(merged, "readers_push_killed")
    paths = run_paths(run)
    assert _push(run, "adapter") == 0
    restore = _kill_at(monkeypatch, 1, lambda s, d: paths.push in (s, d))  # killed swapping the new push/ in
    assert _push(run, "adapter") == 130  # the CLI's exit status for an interrupt
    restore()
    (paths.root / ".push-abcd1234").mkdir()  # the staging folder of a push killed with SIGKILL
    leftovers = sorted(p.name for p in paths.root.glob(".push-*"))
    assert any(n.startswith(".push-old-") for n in leftovers) and ".push-abcd1234" in leftovers
    assert _push(run, "adapter") == 0
    assert not list(paths.root.glob(".push-*")) and (paths.push / "README.md").exists()


# ------------------------------------------------------------------------------ summary


def test_summary_refuses_new_step_counts_over_old_figures_and_leaves_out_a_stale_merge(merged, capsys):
    from lib.evaluate.summary import before_after

    run = copy_run(merged, "readers_summary")
    text = before_after(run)
    assert "merged model: perplexity" in text and "left out" not in text
    _retrain(run, steps=777)
    assert main(["summary", "--run", run]) == 2
    line = _one_error_line(capsys)
    assert str(run_paths(run).eval_dir) in line and "stale" in line and f"python -m lib evaluate --run {run}" in line
    reseal(run, "evaluate")  # evaluated again (same figures, of the new adapter): the merge is still the old one
    text = before_after(run)
    assert "777 steps" in text and "merged model left out" in text and "merged model: perplexity" not in text


@pytest.mark.parametrize("killed_at", [1, 2])
def test_summary_and_merge_after_a_killed_evaluate(merged, killed_at, monkeypatch, capsys):
    """evaluate killed between its moves leaves a mixture of old and new eval/ files: summary refuses it;
    merge does not read eval/, runs, and leaves the interrupted eval/ exactly as it was."""
    run = copy_run(merged, f"readers_killed_eval_{killed_at}")
    paths = run_paths(run)
    targets = (paths.perplexity, paths.predictions, paths.generation_metrics)
    with rundir.staging(paths.eval_dir, ".staging-") as staged:
        for t in targets:
            (staged / t.name).write_text(t.read_text().replace("0", "1"))
        restore = _kill_at(monkeypatch, killed_at, lambda s, d: d in targets)
        with pytest.raises(KeyboardInterrupt):
            rundir.install(paths, "evaluate", {t: staged / t.name for t in targets}, [], {})
        restore()
    assert main(["summary", "--run", run]) == 2
    line = _one_error_line(capsys)
    assert "evaluate stage was interrupted" in line and f"python -m lib evaluate --run {run}" in line
    if killed_at == 2:
        return  # one merge is enough
    before = _snapshot(paths.eval_dir), (paths.stages / "evaluate.pending").read_bytes()
    assert main(["merge", "--run", run, "--set", "eval.max_examples=8"]) == 0
    assert (_snapshot(paths.eval_dir), (paths.stages / "evaluate.pending").read_bytes()) == before
    assert rundir.check_result(paths, "merge") is not None


# ------------------------------------------------------------------------------ export's lock


def test_a_second_export_refused_by_the_lock_leaves_the_running_ones_log(merged, capsys):
    run = copy_run(merged, "readers_export_locked")
    paths = run_paths(run)
    paths.export_log.write_text("the running export's converter output\n")
    proc = _hold_lock(run)
    try:
        assert main(["export", "--run", run, "--quant", "f16"]) == 2
        line = _one_error_line(capsys)
        assert f"PID {proc.pid}" in line and "being written by another process" in line
    finally:
        proc.kill()
        proc.wait()
    assert paths.export_log.read_text() == "the running export's converter output\n"
    assert not paths.export.exists()

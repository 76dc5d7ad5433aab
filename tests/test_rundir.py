"""Run-directory integrity (lib/run/rundir.py): one writer per run, atomic stage outputs, stale results
refused, damaged files named, leftovers of killed stages removed, non-finite training resumable.

Every case drives the real stages (the tiny model, real processes for the lock)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import SAMPLE, copy_run

from lib.__main__ import main
from lib.run.paths import REPO_ROOT, run_paths
from lib.run.rundir import RunDirError, lock_path, run_lock


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip() and "\r" not in ln and "it/s]" not in ln
             and "s/it]" not in ln and not ln.startswith(("[transformers]", "  warnings.warn"))]  # progress bars
    errors = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


# ------------------------------------------------------------------------------ one writer per run


def _hold_lock(run: str):
    """Another real process that takes the run's lock and keeps it until killed."""
    code = ("import sys, time; from lib.run.paths import run_paths; from lib.run.rundir import run_lock\n"
            f"with run_lock(run_paths({run!r}), 'train'):\n"
            "    print('locked', flush=True); time.sleep(600)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RANK", None)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.parametrize("stage", ["prepare", "train", "evaluate", "plot", "merge", "push"])
def test_a_second_writer_exits_2_naming_the_process_that_holds_the_run(outputs, stage, capsys):
    proc = _hold_lock("busy")
    try:
        extra = {"prepare": ["--data", str(SAMPLE)], "push": ["--repo", "someone/x", "--dry-run"]}
        args = [stage, "--run", "busy"] + extra.get(stage, [])
        assert main(args) == 2
        line = _one_error_line(capsys)
        assert f"PID {proc.pid}" in line and "being written by another process" in line
        assert not run_paths("busy").root.exists()  # the second writer wrote nothing
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_of_a_killed_writer_is_taken_over(outputs):
    proc = _hold_lock("crashed")
    os.kill(proc.pid, signal.SIGKILL)  # kill -9: no cleanup ran, the lock file still names it
    proc.wait()
    assert lock_path(run_paths("crashed")).read_text().split()[0] == str(proc.pid)
    with run_lock(run_paths("crashed"), "prepare"):
        assert lock_path(run_paths("crashed")).read_text().split()[0] == str(os.getpid())
        with run_lock(run_paths("crashed"), "train"):  # re-entrant: pipeline stages in one process
            pass
    # and a live holder is not taken over
    proc = _hold_lock("crashed")
    try:
        with pytest.raises(Exception, match=f"PID {proc.pid}"):
            with run_lock(run_paths("crashed"), "plot"):
                pass
    finally:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------ atomic prepare


def _prepared_files(paths) -> dict:
    return {p.name: p.read_bytes() for p in (paths.config, paths.train_data, paths.eval_data, paths.data_report)}


@pytest.mark.parametrize("killed_at", [0, 1, 2, 3])
def test_a_prepare_killed_between_its_moves_is_refused_not_mixed(outputs, killed_at, monkeypatch, capsys):
    """Re-prepare with another split dies at each of its four moves; train refuses what it left."""
    import lib.run.rundir as rundir
    from lib.data.prepare import run_prepare

    run_prepare("half", str(SAMPLE), profile="tiny", overrides=["data.seed=1"])
    paths = run_paths("half")
    old = _prepared_files(paths)
    # a staging folder of an earlier killed prepare, and one of another run that must stay
    (outputs / ".half-prepare-abcd1234").mkdir()
    (outputs / ".halfway-prepare-abcd1234").mkdir()

    real_replace, calls = os.replace, []

    def dying_replace(src, dst):
        if str(src).startswith(str(outputs / ".half-prepare-")) and str(dst).startswith(str(paths.root)):
            calls.append(dst)
            if len(calls) > killed_at:
                raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(rundir.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        run_prepare("half", str(SAMPLE), profile="tiny", overrides=["data.seed=2"])
    monkeypatch.setattr(rundir.os, "replace", real_replace)
    now = _prepared_files(paths)
    assert now != old or killed_at == 0
    assert not (outputs / ".half-prepare-abcd1234").exists() and (outputs / ".halfway-prepare-abcd1234").exists()

    assert main(["train", "--run", "half"]) == 2
    line = _one_error_line(capsys)
    assert "prepare stage was interrupted" in line and "python -m lib prepare --run half" in line
    assert not paths.adapter.exists() and not paths.checkpoints.exists()

    run_prepare("half", str(SAMPLE), profile="tiny", overrides=["data.seed=2"])  # rerun: consistent again
    from lib.run.rundir import fingerprint

    assert fingerprint(paths, "prepare") is not None


def test_a_prepared_file_changed_afterwards_is_named(outputs, capsys):
    from lib.data.prepare import run_prepare

    run_prepare("edited", str(SAMPLE), profile="tiny")
    paths = run_paths("edited")
    with open(paths.eval_data, "a") as f:
        f.write(paths.train_data.read_text().splitlines()[0] + "\n")
    assert main(["train", "--run", "edited"]) == 2
    line = _one_error_line(capsys)
    assert str(paths.eval_data) in line and "is not the file prepare wrote" in line


# ------------------------------------------------------------------------------ damaged files


def _damage(path, how):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x00garbage\xff" * 8)


@pytest.mark.parametrize("how", ["truncated", "garbage"])
@pytest.mark.parametrize("file", ["adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                                  "logs/training_summary.json"])
@pytest.mark.parametrize("stage", ["train", "evaluate", "merge", "chat"])
def test_a_damaged_training_result_is_one_line_naming_the_file_and_train(trained_run, stage, file, how, capsys):
    run = copy_run(trained_run, f"damaged-{stage}-{file.split('/')[1].split('.')[0]}-{how}")
    paths = run_paths(run)
    _damage(paths.root / file, how)
    args = [stage, "--run", run] + (["--prompt", "hi"] if stage == "chat" else [])
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert str(paths.root / file) in line and f"python -m lib train --run {run} --retrain" in line
    assert "already finished" not in capsys.readouterr().out
    assert not paths.merged.exists() and not paths.eval_dir.exists() or stage not in ("merge", "evaluate")


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt"])
def test_a_damaged_optimizer_or_scheduler_state_skips_the_checkpoint(trained_run, tmp_path, name, how):
    from lib.train.checkpoints import CheckpointWarning, checkpoint_problem, last_checkpoint

    found = sorted(run_paths(trained_run).checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    older, newer = found[-2], found[-1]
    for ck in (older, newer):
        shutil.copytree(ck, tmp_path / ck.name)
    assert checkpoint_problem(tmp_path / newer.name) is None
    target = tmp_path / newer.name / name
    if how == "empty":
        target.write_bytes(b"")
    else:
        _damage(target, how)
    assert name in checkpoint_problem(tmp_path / newer.name)
    with pytest.warns(CheckpointWarning, match=f"{newer.name} .*{name}"):
        assert last_checkpoint(tmp_path, clean=True) == tmp_path / older.name
    assert not (tmp_path / newer.name).exists()


# ------------------------------------------------------------------------------ stale results, gates, leftovers


@pytest.mark.slow
def test_results_of_an_earlier_adapter_are_refused_after_retrain(outputs, capsys):
    """The pipeline stops at a failed merge gate (exit 1); after `train --retrain` plot, the eval
    tables and chat --merged refuse the old results until the stage that makes them runs again."""
    from lib.evaluate.evaluation import metrics_table
    from lib.run.figures import load_inputs

    run = "retrained"
    quick = ["train.max_steps=4", "train.eval_steps=2", "train.save_steps=2", "train.logging_steps=1",
             "eval.generate_examples=1", "eval.max_examples=8", "merge.tolerance=1e-12"]
    sets = [a for kv in quick for a in ("--set", kv)]
    assert main(["pipeline", "--run", run, "--data", str(SAMPLE), "--profile", "tiny"] + sets) == 1
    res = capsys.readouterr()
    assert "Traceback" not in res.err and "\nerror: merge check failed" in "\n" + res.err
    assert "done: results in" not in res.out
    paths = run_paths(run)
    assert paths.merge_report.exists() and (paths.plots / "metrics_plot.png").exists()
    metrics_table(run)  # fresh: fine
    # a killed merge left a temp folder as large as the model: the next merge removes it
    (paths.root / ".merged-abcd1234").mkdir()
    (paths.root / ".merged-abcd1234" / "model.safetensors").write_bytes(b"0" * 1000)
    assert main(["merge", "--run", run, "--set", "merge.fail_on_drift=false"]) == 0
    assert not (paths.root / ".merged-abcd1234").exists()
    old_adapter = (paths.adapter / "adapter_model.safetensors").read_bytes()
    assert main(["push", "--run", run, "--repo", "someone/x", "--dry-run"]) == 0  # fresh: staged, with a manifest
    assert json.loads((paths.stages / "push.json").read_text())["inputs"].keys() == {"train", "merge"}

    assert main(["train", "--run", run, "--retrain", "--set", "train.seed=7"]) == 0
    assert (paths.adapter / "adapter_model.safetensors").read_bytes() != old_adapter
    capsys.readouterr()
    assert main(["plot", "--run", run]) == 2
    line = _one_error_line(capsys)
    assert str(paths.eval_dir) in line and "stale" in line and "python -m lib evaluate --run retrained" in line
    with pytest.raises(RunDirError, match="evaluate"):
        metrics_table(run)
    assert main(["chat", "--run", run, "--merged", "--prompt", "hi"]) == 2
    line = _one_error_line(capsys)
    assert str(paths.merged) in line and "python -m lib merge --run retrained" in line
    # push never stages the new adapter beside the old merged model
    assert main(["push", "--run", run, "--repo", "someone/x", "--dry-run"]) == 2
    line = _one_error_line(capsys)
    assert str(paths.merged) in line and "stale" in line and "python -m lib merge --run retrained" in line

    assert main(["evaluate", "--run", run]) == 0
    data = load_inputs(run)  # eval is fresh again; the stale merged figure is left out, and said
    assert "merged" not in data["perplexity"] and "merged model's figures are left out" in capsys.readouterr().out
    assert main(["plot", "--run", run]) == 0


# ------------------------------------------------------------------------------ non-finite training


def test_a_checkpoint_whose_weights_blew_up_is_not_kept(prepared_run):
    """The weights blow up to 1e20 (finite) at step 6 and are saved in checkpoint-6; the loss of step 7
    is not finite. checkpoint-6 is not a good checkpoint (its weights made that loss): checkpoint-3 is kept."""
    import torch
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from lib.run.errors import TrainingError
    from lib.train.training import run_train

    class BlowUp(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 6:
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if "lora_" in n:
                            p.mul_(1e20)

    from test_train import _fresh_copy

    run = _fresh_copy(prepared_run, "blowup")
    paths = run_paths(run)
    with pytest.raises(TrainingError) as err:
        run_train(run, overrides=["train.save_steps=3", "train.eval_steps=3", "train.max_steps=9"],
                  callbacks=[BlowUp()])
    msg = str(err.value)
    assert "step 7" in msg and "checkpoint-3" in msg and "checkpoint-6" not in msg
    assert f"python -m lib train --run {run} --set train.learning_rate=" in msg
    assert sorted(p.name for p in paths.checkpoints.glob("checkpoint-*")) == ["checkpoint-3"]
    kept = load_file(str(paths.checkpoints / "checkpoint-3" / "adapter_model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) and t.abs().max() < 1e3 for t in kept.values())


@pytest.mark.slow
def test_the_advised_resume_with_a_lower_learning_rate_gets_past_the_blow_up(prepared_run, capsys):
    """A learning rate far too high (plain SGD, no clipping) makes the gradient overflow for real. The
    command the error advises (resume from the kept checkpoint with a tenth of the learning rate) is
    followed as a user would, until training finishes: each resume gets past the step that failed."""
    import re

    from test_train import _fresh_copy

    run = _fresh_copy(prepared_run, "too-high-lr")
    paths = run_paths(run)
    sets = ["train.max_steps=12", "train.save_steps=1", "train.eval_steps=100", "train.logging_steps=1",
            "train.learning_rate=1e5", "train.warmup_ratio=0.5", "train.max_grad_norm=0", "train.optim=sgd"]
    args = ["train", "--run", run] + [a for kv in sets for a in ("--set", kv)]
    lr, failed_at, resumed = 1e5, 0, False
    for attempt in range(4):  # noqa: B007 (read after the loop)
        status = main(args)
        if status == 0:
            break
        assert status == 2
        line = _one_error_line(capsys)
        failed = int(re.search(r"training stopped at step (\d+)", line).group(1))
        assert failed > failed_at or not resumed  # a resume gets past the step that failed before
        failed_at = failed
        kept = re.search(r"(checkpoint-(\d+)), is kept", line)
        if kept:  # never the checkpoint whose weights made the failing step
            assert int(kept.group(2)) <= failed - 2
            assert [p.name for p in paths.checkpoints.glob("checkpoint-*")] == [kept.group(1)]
        advised = re.search(r"`python -m lib (train --run \S+ (--retrain )?--set train\.learning_rate=(\S+))`", line)
        assert bool(advised.group(2)) is (kept is None)
        resumed = kept is not None
        assert float(advised.group(3)) == pytest.approx(lr / 10)
        lr = float(advised.group(3))
        args = advised.group(1).split()
    else:
        pytest.fail("training did not finish after following the advice three times")
    assert attempt >= 1 and failed_at >= 2
    out = capsys.readouterr().out
    assert ("learning rate changed since" in out) is resumed
    summary = json.loads(paths.training_summary.read_text())
    assert summary["global_step"] == 12 and (summary["resumed_from"] is not None) is resumed
    assert summary["final_loss"] is not None and summary["final_loss"] < 100

"""03: resuming a training exactly, and only with the settings its checkpoint was made with: a kill at the
last moment resumes to the adapter of an uninterrupted run; a setting that shapes the checkpoint (or the
finished adapter) is refused in one line before anything is saved; a checkpoint whose step is not its
own is skipped like any damaged one."""

from __future__ import annotations

import shutil

import pytest

from lib.paths import run_paths

# A few steps, a checkpoint every two: steps 2 and 4 are saved, 4 the last.
SHORT = ["train.save_steps=2", "train.eval_steps=2", "train.logging_steps=1", "train.save_total_limit=3"]


def _fresh_copy(prepared_run, name):
    """A copy of the prepared run without anything a training left in it."""
    from conftest import copy_run

    run = copy_run(prepared_run, name)
    paths = run_paths(run)
    for p in (paths.checkpoints, paths.adapter, paths.logs, paths.model_summary.parent):
        shutil.rmtree(p, ignore_errors=True)
    return run


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _stop_at(step):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step:
                raise KeyboardInterrupt

    return StopAt()


@pytest.fixture(scope="module")
def interrupted(prepared_run):
    """A run killed at step 3 of 4: checkpoint-2 saved with the tiny profile's settings, no adapter."""
    from lib.train import run_train

    run = _fresh_copy(prepared_run, "interrupted")
    with pytest.raises(KeyboardInterrupt):
        run_train(run, overrides=[*SHORT, "train.max_steps=4"], callbacks=[_stop_at(3)])
    assert (run_paths(run).checkpoints / "checkpoint-2").is_dir()
    return run


# ------------------------------------------------------------------------------ exact resume


@pytest.mark.parametrize("length", ["train.max_steps=4", "train.num_train_epochs=0.2"])
def test_a_kill_while_the_adapter_is_saved_resumes_to_the_same_adapter(prepared_run, monkeypatch, length):
    """Killed in save_adapter, after the checkpoint of the last step: the rerun trains no step more (a
    checkpoint at the last step, with max_steps or with a fraction of an epoch, is the end of training)."""
    import torch

    import lib.train
    from lib.train import run_train

    tag = length.split(".")[1].split("=")[0]
    reference = _fresh_copy(prepared_run, f"exact-{tag}")
    expected = run_train(reference, overrides=[*SHORT, length])
    run = _fresh_copy(prepared_run, f"killed-{tag}")

    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies as the adapter is moved in

    with monkeypatch.context() as m:
        m.setattr(lib.train, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            run_train(run, overrides=[*SHORT, length])
    paths = run_paths(run)
    last = f"checkpoint-{expected['global_step']}"
    assert (paths.checkpoints / last).is_dir() and not paths.training_summary.exists()
    summary = run_train(run)
    assert summary["resumed_from"] == last
    assert summary["global_step"] == expected["global_step"]
    a, b = _tensors(paths.adapter), _tensors(run_paths(reference).adapter)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert summary["final_eval_loss"] == expected["final_eval_loss"]

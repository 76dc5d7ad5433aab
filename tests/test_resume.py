"""03: resuming a training exactly, and only with the settings its checkpoint was made with: a kill at the
last moment resumes to the adapter of an uninterrupted run; a setting that shapes the checkpoint (or the
finished adapter) is refused in one line before anything is saved; a checkpoint whose step is not its
own is skipped like any damaged one."""

from __future__ import annotations

import json
import shutil

import pytest
from test_adapters import _stop_at, _tensors  # a KeyboardInterrupt after a step; an adapter's tensors
from test_train import _fresh_copy  # a copy of the prepared run without any training in it

from lib.run.paths import run_paths

# A few steps, a checkpoint every two: steps 2 and 4 are saved, 4 the last.
SHORT = ["train.save_steps=2", "train.eval_steps=2", "train.logging_steps=1", "train.save_total_limit=3"]


@pytest.fixture(scope="module")
def interrupted(prepared_run):
    """A run killed at step 3 of 4: checkpoint-2 saved with the tiny profile's settings, no adapter."""
    from lib.train.training import run_train

    run = _fresh_copy(prepared_run, "interrupted")
    with pytest.raises(KeyboardInterrupt):
        run_train(run, overrides=[*SHORT, "train.max_steps=4"], callbacks=[_stop_at(3)])
    assert (run_paths(run).checkpoints / "checkpoint-2").is_dir()
    return run


# ------------------------------------------------------------------------------ exact resume


@pytest.mark.parametrize("length", ["train.max_steps=4",
                                    pytest.param("train.num_train_epochs=0.2", marks=pytest.mark.slow)])
def test_a_kill_while_the_adapter_is_saved_resumes_to_the_same_adapter(prepared_run, monkeypatch, length):
    """Killed in save_adapter, after the checkpoint of the last step: the rerun trains no step more (a
    checkpoint at the last step, with max_steps or with a fraction of an epoch, is the end of training)."""
    import torch

    import lib.train.training
    from lib.train.training import run_train

    tag = length.split(".")[1].split("=")[0]
    reference = _fresh_copy(prepared_run, f"exact-{tag}")
    expected = run_train(reference, overrides=[*SHORT, length])
    run = _fresh_copy(prepared_run, f"killed-{tag}")

    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies as the adapter is moved in

    with monkeypatch.context() as m:
        m.setattr(lib.train.training, "replace", killed)
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


# ------------------------------------------------------------------------------ settings that shape a checkpoint


def _snapshot(root):
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _refused(run, argv, capsys) -> str:
    """The one line of a refused CLI command; nothing in the run directory written (config.yaml as it was)."""
    from lib.__main__ import main

    root = run_paths(run).root
    before, config = _snapshot(root), run_paths(run).config.read_bytes()
    assert main([*argv[:1], "--run", run, *argv[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert _snapshot(root) == before and run_paths(run).config.read_bytes() == config
    return err[0]


@pytest.mark.parametrize("setting, old", [
    ("lora.alpha=64", "32"), ("train.max_length=128", "256"), ("quant.mode=none", "4bit"), ("lora.r=8", "16"),
    ("lora.target_modules=attention", "all-linear"), ("lora.use_dora=true", "false"),
    ("train.seed=7", "42"), ("train.best_metric=task_score", "eval_loss"),  # its state holds the best eval loss
])
def test_resuming_with_a_setting_that_shapes_the_checkpoint_is_refused(interrupted, capsys, setting, old):
    key, new = setting.split("=")
    line = _refused(interrupted, ["train", "--set", setting], capsys)
    assert line.startswith(f"error: {key}: checkpoint-2 was trained with {key}={old}, not {new}; "
                           f"put it back (--set {key}={old})"), line
    assert f"--retrain --set {setting}" in line


def test_the_batch_may_be_split_differently_but_not_resized(interrupted, capsys):
    from lib.run.config import apply_overrides, load_config
    from lib.train.checkpoints import resume_problem

    cfg = load_config(run_paths(interrupted).config)
    split = ["train.per_device_train_batch_size=4", "train.gradient_accumulation_steps=2"]
    assert resume_problem(run_paths(interrupted), apply_overrides(cfg, split)) is None  # as out of memory suggests
    line = _refused(interrupted, ["train", "--set", "train.per_device_train_batch_size=4"], capsys)
    assert line.startswith("error: train.per_device_train_batch_size x train.gradient_accumulation_steps: "
                           "checkpoint-2 was trained with 8 examples per optimizer step, not 4"), line


def test_resuming_past_max_steps_is_refused(interrupted, capsys):
    line = _refused(interrupted, ["train", "--set", "train.max_steps=1"], capsys)
    assert "checkpoint-2 is at step 2, past the 1 steps" in line and "--retrain" in line


def test_prepare_with_another_rank_on_the_same_data_is_refused_until_put_back(interrupted, capsys):
    """prepare --set on the same data keeps the checkpoints and saves the new rank: train names it, and
    resumes once it is put back."""
    from conftest import FAST_TRAIN, SAMPLE, copy_run

    from lib.data.prepare import run_prepare

    run = copy_run(interrupted, "reprepared")
    run_prepare(run, str(SAMPLE), profile="tiny", overrides=[*FAST_TRAIN, *SHORT, "train.max_steps=4", "lora.r=8"])
    line = _refused(run, ["train"], capsys)
    assert line.startswith("error: lora.r: checkpoint-2 was trained with lora.r=16, not 8; put it back")
    from lib.train.training import run_train

    summary = run_train(run, overrides=["lora.r=16"])
    assert summary["resumed_from"] == "checkpoint-2" and summary["global_step"] == 4


def test_a_checkpoint_whose_step_is_not_its_own_is_skipped(interrupted, tmp_path):
    """A hand-edited global_step (1,000,000) is damage: the checkpoint is skipped with a warning, never
    reported as trained; the folder's number, the state's max_steps and the scheduler's count all say so."""
    from lib.train.checkpoints import CheckpointWarning, checkpoint_problem, last_checkpoint

    def edited(name, **changes):
        ck = tmp_path / name
        shutil.copytree(run_paths(interrupted).checkpoints / "checkpoint-2", ck)
        state = json.loads((ck / "trainer_state.json").read_text())
        (ck / "trainer_state.json").write_text(json.dumps({**state, **changes}))
        return ck

    assert checkpoint_problem(edited("checkpoint-2")) is None
    assert checkpoint_problem(edited("checkpoint-3", global_step=1_000_000)) == (
        "global_step 1000000 in trainer_state.json is not the step of checkpoint-3")
    assert "is not a whole number ('4')" in checkpoint_problem(edited("checkpoint-4", global_step="4"))
    assert checkpoint_problem(edited("checkpoint-1000000", global_step=1_000_000)) == (
        "global_step 1000000 in trainer_state.json is past its max_steps 4")
    assert checkpoint_problem(edited("checkpoint-1", global_step=1)) == (
        "global_step 1 in trainer_state.json is behind scheduler.pt's 2 steps")
    with pytest.warns(CheckpointWarning) as warned:
        assert last_checkpoint(tmp_path, clean=True).name == "checkpoint-2"
    assert [str(w.message).split()[3] for w in warned] == ["checkpoint-1000000", "checkpoint-4", "checkpoint-3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2"]


def test_a_run_whose_checkpoint_claims_a_million_steps_trains_from_the_start(interrupted):
    from conftest import copy_run

    from lib.train.checkpoints import CheckpointWarning
    from lib.train.training import run_train

    run = copy_run(interrupted, "million")
    state = run_paths(run).checkpoints / "checkpoint-2" / "trainer_state.json"
    state.write_text(state.read_text().replace('"global_step": 2', '"global_step": 1000000'))
    with pytest.warns(CheckpointWarning, match="global_step 1000000 .* not the step of checkpoint-2"):
        summary = run_train(run)
    assert summary["resumed_from"] is None and summary["global_step"] == 4


# ------------------------------------------------------------------------------ a finished run's base model


def test_a_finished_run_refuses_another_base_and_keeps_its_config(trained_run, smol_dir, capsys):
    line = _refused(trained_run, ["train", "--set", f"model.name_or_path={smol_dir}"], capsys)
    assert line.startswith(f"error: model.name_or_path: the adapter was trained with model.name_or_path=tiny, "
                           f"not {smol_dir}; put it back (--set model.name_or_path=tiny)"), line
    assert f"--retrain --set model.name_or_path={smol_dir}" in line
    line = _refused(trained_run, ["train", "--set", "lora.r=8"], capsys)
    assert line.startswith("error: lora.r: the adapter was trained with lora.r=16, not 8")
    line = _refused(trained_run, ["evaluate", "--set", f"model.name_or_path={smol_dir}"], capsys)
    assert line.startswith("error: model.name_or_path: the adapter was trained with model.name_or_path=tiny")


def test_the_stages_that_load_the_adapter_refuse_another_base(trained_run, smol_dir, capsys):
    """config.yaml names another base (e.g. `prepare --set` on the same data): evaluate, merge and chat refuse
    to load the adapter on it."""
    from conftest import copy_run

    from lib.run.config import apply_overrides, load_config, save_config
    from lib.run.errors import ConfigError
    from lib.ship.chat import load_session

    run = copy_run(trained_run, "other-base")
    paths = run_paths(run)
    save_config(apply_overrides(load_config(paths.config), [f"model.name_or_path={smol_dir}"]), paths.config)
    for command in ("evaluate", "merge"):
        assert "the adapter was trained with model.name_or_path=tiny" in _refused(run, [command], capsys)
    with pytest.raises(ConfigError, match="the adapter was trained with model.name_or_path=tiny"):
        load_session(run)


# ------------------------------------------------------------------------------ the check never switches itself off


@pytest.mark.parametrize("setting, old", [("lora.alpha=128", "32"), ("lora.r=8", "16"), ("lora.use_rslora=true", "false"),
                                          ("lora.use_dora=true", "false")])
def test_without_its_record_a_checkpoint_is_checked_against_its_own_adapter_config(interrupted, capsys, setting, old):
    """checkpoints/settings.json missing: the check reads what checkpoint-2 records itself (adapter_config.json)
    instead of resuming an alpha-32 checkpoint as alpha 128."""
    from conftest import copy_run

    run = copy_run(interrupted, f"norecord-{setting.split('=')[0]}")
    run_paths(run).checkpoint_settings.unlink()
    key, new = setting.split("=")
    line = _refused(run, ["train", "--set", setting], capsys)
    assert line.startswith(f"error: {key}: checkpoint-2 was trained with {key}={old}, not {new}"), line


@pytest.mark.parametrize("damage", ['{"settings": "x", "train_data": "y"}', '{"settings": {}}', "{", "[1]", "fifo",
                                    "folder"])
def test_a_damaged_record_is_one_line_and_nothing_is_written(interrupted, capsys, damage):
    import os

    from conftest import copy_run

    run = copy_run(interrupted, f"damaged-{abs(hash(damage))}")
    record = run_paths(run).checkpoint_settings
    record.unlink()
    if damage == "fifo":
        os.mkfifo(record)
    elif damage == "folder":
        record.mkdir()
    else:
        record.write_text(damage)
    line = _refused(run, ["train", "--set", "lora.alpha=128"], capsys)
    assert line.startswith(f"error: {record}: ") and "--retrain" in line, line


def test_the_data_mapping_is_part_of_the_recorded_settings(interrupted, capsys):
    """train --set data.columns=... resumes nothing trained on the other mapping (config.yaml left as it was)."""
    line = _refused(interrupted, ["train", "--set", "data.columns={prompt: question, response: answer}"], capsys)
    assert line.startswith("error: data.columns: checkpoint-2 was trained with data.columns=none"), line
    line = _refused(interrupted, ["train", "--set", "data.ignore_fields=[notes]"], capsys)
    assert line.startswith("error: data.ignore_fields: checkpoint-2 was trained with"), line


def test_notebook_02_refuses_what_train_refuses_and_keeps_config_yaml(interrupted, trained_run):
    from conftest import copy_run

    from lib.model.configure import update_config
    from lib.run.errors import ConfigError

    finished = copy_run(trained_run, "finished-02")
    for run, what in ((interrupted, "checkpoint-2"), (finished, "the adapter")):
        config = run_paths(run).config.read_bytes()
        with pytest.raises(ConfigError, match=rf"^lora.r: {what} was trained with lora.r=16, not 4"):
            update_config(run, {"lora.r": 4})
        assert run_paths(run).config.read_bytes() == config
        assert update_config(run, {"lora.dropout": 0.1}).lora.dropout == 0.1  # what may change still does
    run_paths(finished).checkpoint_settings.unlink()
    shutil.rmtree(run_paths(finished).adapter)
    with pytest.raises(ConfigError, match=r"^lora.alpha: checkpoint-\d+ was trained with lora.alpha=32, not 8"):
        update_config(finished, {"lora.alpha": 8})

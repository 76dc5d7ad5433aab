"""Bad settings on the command line: every stage that takes --set refuses them with one line, exit
status 2, no traceback, before anything is written (config.yaml and every other file unchanged)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BAD_RANGES, SAMPLE, copy_run

from lib.__main__ import main
from lib.run.errors import ConfigError
from lib.run.paths import run_paths

REPO = Path(__file__).resolve().parent.parent

RANGES = BAD_RANGES  # refused by the ranges in lib/run/config.py: every stage
# Refused by what training needs (the model's layers, transformers' names): the stages that save config.yaml.
TRAINING = [
    ("lora.target_modules=bogus", "lora.target_modules: bogus not in this model; its linear layers are "),
    ("lora.target_modules=q_proj,nope", "lora.target_modules: nope not in this model"),
    ("train.optim=bogus", "train.optim: bogus is not a valid"),
    ("train.lr_scheduler_type=bogus", "train.lr_scheduler_type: bogus is not a valid"),
]


@pytest.fixture(scope="module")
def run(trained_run) -> str:
    """A copy of the trained run (so a wrongly accepted setting cannot spoil the shared one)."""
    return copy_run(trained_run, "settings")


def _files(root: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(argv, message, capsys) -> None:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    # one line (a progress bar of the tiny model being built on first use may come before it)
    lines = [line for line in err.splitlines() if "|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert message in lines[0], (message, err)


@pytest.mark.parametrize("setting, message", RANGES + TRAINING, ids=[s for s, _ in RANGES + TRAINING])
def test_prepare_refuses_a_bad_setting_and_writes_nothing(setting, message, capsys):
    _refused(["prepare", "--run", "bad-settings", "--data", str(SAMPLE), "--set", setting], message, capsys)
    assert not run_paths("bad-settings").root.exists()


@pytest.mark.parametrize("setting, message", RANGES + TRAINING, ids=[s for s, _ in RANGES + TRAINING])
def test_train_refuses_a_bad_setting_before_config_yaml_is_written(run, setting, message, capsys):
    before = _files(run_paths(run).root)
    _refused(["train", "--run", run, "--set", setting], message, capsys)
    assert _files(run_paths(run).root) == before


@pytest.mark.parametrize("stage", ["evaluate", "merge"])
@pytest.mark.parametrize("setting, message", RANGES, ids=[s for s, _ in RANGES])
def test_evaluate_and_merge_refuse_a_bad_setting(run, stage, setting, message, capsys):
    before = _files(run_paths(run).root)
    _refused([stage, "--run", run, "--set", setting], message, capsys)
    assert _files(run_paths(run).root) == before


def test_a_later_plain_train_still_works_after_a_refused_override(run, capsys):
    assert main(["train", "--run", run, "--set", "lora.target_modules=bogus"]) == 2
    capsys.readouterr()
    assert main(["train", "--run", run]) == 0  # the finished run says so; config.yaml is still usable
    assert "already finished" in capsys.readouterr().out


def test_notebook_02_update_config_checks_before_saving(run):
    from lib.model.configure import update_config

    before = run_paths(run).config.read_bytes()
    with pytest.raises(ConfigError, match="lora.target_modules: bogus not in this model"):
        update_config(run, {"lora.target_modules": "bogus"})
    assert run_paths(run).config.read_bytes() == before


# One real process per kind of input (a setting, raw bytes in an argument); every setting's message is checked
# in-process above (test_train_refuses_a_bad_setting_before_config_yaml_is_written).
@pytest.mark.parametrize("argv, message", [
    (["train", "--set", "train.learning_rate=nan"], "error: train.learning_rate: must be a finite number"),
    (["chat", "--prompt", b"\xff caf\xe9"], "error: chat: --prompt is not valid UTF-8 text (byte 0xff at character 1)"),
])
def test_cli_process_prints_one_line_and_no_traceback(run, argv, message):
    r = subprocess.run([sys.executable, "-m", "lib", argv[0], "--run", run, *argv[1:]], capture_output=True, cwd=REPO)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(message), err


def test_help_of_the_cli_and_of_every_subcommand_prints(capsys):
    """`python -m lib --help` and `<command> --help` print their usage (a `%` in a help text once made
    argparse raise a TypeError instead)."""
    from lib.__main__ import _parser

    commands = [name for action in _parser()._subparsers._group_actions for name in action.choices]
    assert "evaluate" in commands and "compare" in commands
    for argv in [["--help"]] + [[name, "--help"] for name in commands]:
        with pytest.raises(SystemExit) as ended:
            main(argv)
        assert ended.value.code == 0, argv
        assert "usage:" in capsys.readouterr().out, argv


def test_a_damaged_config_is_said_by_the_stage_with_or_without_set(run, capsys):
    """The early --set check (before the stage's imports) leaves a damaged config.yaml to the stage: the same
    one line with or without --set, and no traceback."""
    damaged = copy_run(run, "settings-damaged-config")
    run_paths(damaged).config.write_text("train: [\n", encoding="utf-8")
    assert main(["train", "--run", damaged]) == 2
    plain = capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["train", "--run", damaged, "--set", "train.learning_rate=1e-4"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == plain and plain.startswith("error: ")

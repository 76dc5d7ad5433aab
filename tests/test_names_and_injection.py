"""Issue 22, "names, injection, special tokens": the run is named once, run names are whole lines,
and every value written into an Ollama Modelfile parses back as itself (one FROM, no injected lines)."""

from __future__ import annotations

import pytest

from lib.__main__ import main
from lib.config import apply_overrides, make_config
from lib.errors import ConfigError
from lib.paths import check_run_name, run_paths

EXAMPLE = "data/examples/alpaca_instruction_response.jsonl"


@pytest.mark.parametrize("name", ["demo\n", "demo\r", "\ndemo", "de\nmo", "demo ", "../demo", ""])
def test_run_name_with_a_newline_or_other_junk_is_refused(name):
    with pytest.raises(ConfigError, match="is not usable"):
        check_run_name(name)


@pytest.mark.parametrize("name", ["demo", "a", "run_1.2-x", "x" * 100])
def test_ordinary_run_names_are_accepted(name):
    assert check_run_name(name) == name


def test_prepare_refuses_a_run_name_ending_in_a_newline(outputs, capsys):
    assert main(["prepare", "--run", "demo\n", "--data", EXAMPLE]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run name 'demo\\n' is not usable") and "\n" not in err
    assert not [p for p in outputs.iterdir() if not p.name.startswith(".")]


def test_set_run_cannot_rename_the_run(outputs, capsys):
    """`prepare --run A --set run=B` once said "into outputs/A" and wrote outputs/B (over B's config)."""
    assert main(["prepare", "--run", "A", "--data", EXAMPLE, "--set", "run=B"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: 'run' cannot be overridden (run='B')") and "\n" not in err
    assert not run_paths("A").root.exists() and not run_paths("B").root.exists()


def test_set_run_is_refused_on_every_stage_but_the_same_name_is_harmless():
    cfg = make_config("tiny", run="A")
    with pytest.raises(ConfigError, match="'run' cannot be overridden"):
        apply_overrides(cfg, ["run=B"])
    with pytest.raises(ConfigError, match="'run' cannot be overridden"):
        apply_overrides(cfg, {"run": "A\n"})
    assert apply_overrides(cfg, ["run=A"]).run == "A"
    assert apply_overrides(cfg, {"run": None}).run == "A"  # a notebook parameter left at None keeps it

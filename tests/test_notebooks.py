"""One notebook vocabulary: parameter names map to configuration keys by rule, comments come from
the configuration's help texts, run cells pass the parameters through one function, and the
settings table shows the values a stage will use.

The rule checked here: a parameter named SECTION_KEY is the key `section.key` and its comment is
exactly `field_help()[section.key]` (lib/run/config.py is the single source of each knob's trade-off);
any other parameter is a notebook-only knob (it starts with no section name) with a comment of its own.
"""

from __future__ import annotations

import ast
import io
import json
import re
import tokenize
from pathlib import Path

import pytest

from lib.notebook import (
    KNOBS,
    SECTIONS,
    knob,
    notebook_knobs,
    notebook_overrides,
    parameter_key,
    settings_table,
)
from lib.run.config import field_help, make_config
from lib.run.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def parameters(path: Path) -> list[tuple[str, object, str]]:
    """(name, literal value, comment) for each line of the notebook's parameters cell."""
    cell = next(c for c in cells(path) if "parameters" in c.get("metadata", {}).get("tags", []))
    src = "".join(cell["source"])
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    out = []
    for stmt in ast.parse(src).body:
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name), \
            f"{path.name}: line {stmt.lineno}: one NAME = literal per line"
        out.append((stmt.targets[0].id, ast.literal_eval(stmt.value), comments.get(stmt.lineno, "")))
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_are_config_keys_with_their_help_text(path):
    helps = field_help()
    for name, _, comment in parameters(path):
        assert name.isupper(), f"{path.name}: {name}: parameters are UPPER_CASE"
        assert comment, f"{path.name}: {name} has no comment saying its trade-off"
        key = parameter_key(name)
        if key is None:
            continue  # notebook-only knob (RUN_NAME, RETRAIN, ...): its comment is its own
        assert key in helps, f"{path.name}: {name} names no configuration key ({key})"
        assert comment == helps[key], f"{path.name}: {name}: the comment must be lib/run/config.py's help for {key}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_papermill_reads_every_parameter_and_every_cell_has_an_id(path):
    """papermill skips a parameters line holding a second "=" ("Unable to parse line") and then calls
    the parameter unknown; nbformat 4.5 wants an id on every cell (MissingIDFieldWarning)."""
    from papermill.inspection import inspect_notebook

    assert all(c.get("id") for c in cells(path)), f"{path.name}: a cell without an id"
    found = set(inspect_notebook(path))
    names = [n for n, _, _ in parameters(path)]
    assert found == set(names), f"{path.name}: papermill does not see {sorted(set(names) - found)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_run_cells_use_the_parameters_through_one_function(path):
    """No hand-written {"section.key": PARAMETER} maps; the settings table follows the parameters."""
    srcs = ["".join(c["source"]) for c in cells(path) if c["cell_type"] == "code"]
    hand_mapped = [s for s in srcs if re.search(rf'"(?:{"|".join(SECTIONS)})\.\w+"\s*:', s)]
    assert not hand_mapped, f"{path.name}: map parameters with notebook_overrides(globals())"
    keyed = [n for n, _, _ in parameters(path) if parameter_key(n)]
    if keyed:
        i = next(i for i, c in enumerate(cells(path)) if "parameters" in c.get("metadata", {}).get("tags", []))
        after = "".join(cells(path)[i + 1]["source"])
        assert "notebook_overrides(globals())" in after and "settings_table(" in after


def test_parameter_names_map_by_rule():
    assert parameter_key("TRAIN_LEARNING_RATE") == "train.learning_rate"
    assert parameter_key("LORA_R") == "lora.r"
    assert parameter_key("GENERATION_DO_SAMPLE") == "generation.do_sample"
    assert parameter_key("RUN_NAME") is None and parameter_key("DATA") is None and parameter_key("SHOW_PANELS") is None
    ns = {"RUN_NAME": "x", "TRAIN_LEARNING_RATE": 1e-4, "LORA_R": None, "In": [], "_TRAIN_X": 1, "lora_r": 3}
    assert notebook_overrides(ns) == {"train.learning_rate": 1e-4, "lora.r": None}


def test_settings_table_shows_effective_values_and_marks_differences(outputs):
    overrides = {"train.learning_rate": 1e-4, "train.seed": None, "lora.r": 4}
    table = settings_table("t", overrides, ["train"], profile="tiny", new_run=True)
    assert list(table.index[:3]) == ["train.num_train_epochs", "train.max_steps", "train.learning_rate"]
    assert table.index[-1] == "lora.r"  # a parameter outside the sections shown is listed too
    lr, seed, r = table.loc["train.learning_rate"], table.loc["train.seed"], table.loc["lora.r"]
    tiny = make_config("tiny")
    assert (lr["value"], lr["profile tiny"], lr["differs"], lr["parameter"]) == ("0.0001", repr(tiny.train.learning_rate), "*", "TRAIN_LEARNING_RATE")
    assert (seed["value"], seed["differs"]) == (repr(tiny.train.seed), "")  # None keeps the profile's value
    assert (r["value"], r["differs"]) == ("4", "*")
    assert (table["differs"] == "*").sum() == 2
    with pytest.raises(ConfigError, match="train.learning_rat"):
        settings_table("t", {"train.learning_rat": 1.0}, ["train"], new_run=True)


# ----------------------------------------------------------------------------------------------
# Notebook-only knobs: one typed reader (papermill passes `-p RETRAIN false` as the text "false")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_only_knob_goes_through_the_typed_reader(path):
    """Every parameter that names no configuration key is in KNOBS, and the first code cell after the
    parameters types them all (notebook_knobs(globals())) before any cell reads one."""
    knobs = [n for n, _, _ in parameters(path) if parameter_key(n) is None]
    assert set(knobs) <= set(KNOBS), f"{path.name}: {sorted(set(knobs) - set(KNOBS))} not in lib.notebook.KNOBS"
    i = next(i for i, c in enumerate(cells(path)) if "parameters" in c.get("metadata", {}).get("tags", []))
    first = next(c for c in cells(path)[i + 1:] if c["cell_type"] == "code")
    assert "notebook_knobs(globals())" in "".join(first["source"]), f"{path.name}: knobs read raw"
    for name, value, _ in parameters(path):  # every default reads as itself
        if name in KNOBS:
            assert knob(name, value) == value, f"{path.name}: {name}={value!r} changes when typed"


@pytest.mark.parametrize("raw,want", [("false", False), ("no", False), ("0", False), (0, False), ("False", False),
                                      (False, False), ("true", True), ("yes", True), ("1", True), (1, True),
                                      ("TRUE", True), (True, True)])
def test_a_yes_no_knob_reads_what_papermill_passes(raw, want):
    for name in ("RETRAIN", "OVERWRITE", "CHAT_WITH_MERGED", "SHOW_PANELS", "MOUNT_DRIVE"):
        assert knob(name, raw) is want
    ns = {"RETRAIN": raw, "RUN_NAME": 7, "COMPARE_RUNS": "a,b", "LORA_R": "4"}
    assert notebook_knobs(ns) == {"RUN_NAME": "7", "RETRAIN": want, "COMPARE_RUNS": ["a", "b"]}
    assert ns["RETRAIN"] is want and ns["LORA_R"] == "4"  # SECTION_KEY ones are the configuration's


@pytest.mark.parametrize("name,raw", [("RETRAIN", "maybe"), ("OVERWRITE", 2), ("SHOW_PANELS", 0.5),
                                      ("CHAT_WITH_MERGED", "None"), ("OVERWRITE", []), ("SHOW_EXAMPLES", "-1"),
                                      ("SHOW_EXAMPLES", "five"), ("COMPARE_RUNS", 3)])
def test_a_knob_that_is_not_its_type_is_refused_in_one_line_naming_it(name, raw):
    with pytest.raises(ConfigError, match=rf"^{name}: ") as e:
        knob(name, raw)
    assert "\n" not in str(e.value)


def test_the_deleting_switches_act_only_on_exactly_true(outputs):
    """run_prepare(overwrite=...) and plan_training(retrain=...) refuse a value that is not a bool before
    anything is read or deleted (the text "false" is truthy in Python)."""
    from lib.data.prepare import run_prepare
    from lib.train.training import plan_training

    for bad in ("false", "False", 1, "yes"):
        with pytest.raises(ConfigError, match=r"^overwrite \(OVERWRITE in notebook 01\): expected True or False"):
            run_prepare("x", str(ROOT / "data" / "examples" / "socratic_questions.jsonl"), overwrite=bad)
        with pytest.raises(ConfigError, match=r"^retrain \(RETRAIN in notebook 03\): expected True or False"):
            plan_training("x", retrain=bad)
    assert not (outputs / "x").exists()


def _papermill(name: str, out, **parameters):
    import papermill

    return papermill.execute_notebook(str(ROOT / "notebooks" / name), str(out), cwd=str(ROOT / "notebooks"),
                                      parameters=parameters, progress_bar=False, log_output=False)


def test_papermill_overwrite_false_refuses_true_replaces_and_the_page_reads_well(outputs, tmp_path, caplog):
    """`-p OVERWRITE false` (the text) on a run trained on other data stops at the check and deletes nothing;
    `-p OVERWRITE true` replaces it. That run, with the parameters a user passes (-p), also shows that papermill
    parses every line of the parameters cell ("Unable to parse line") and knows every parameter ("Passed
    unknown parameter"), and that the executed page keeps tests/rendered.py's rules."""
    import logging

    from papermill.exceptions import PapermillExecutionError

    from lib.data.prepare import run_prepare
    from tests.rendered import problems

    run_prepare("ow", str(ROOT / "data" / "examples" / "socratic_questions.jsonl"), profile="tiny",
                overrides=["data.max_examples=20"])
    marker = outputs / "ow" / "adapter" / "adapter_config.json"
    marker.parent.mkdir()
    marker.write_text("{}")
    other = dict(RUN_NAME="ow", PROFILE="tiny", DATA_PATH="data/examples/sharegpt_conversations.jsonl",
                 DATA_MAX_EXAMPLES=20, TRAIN_MAX_LENGTH=256)
    # papermill's text "false" (the other spellings, "False", "no", "0", are read by the same reader:
    # test_a_yes_no_knob_reads_what_papermill_passes)
    with pytest.raises(PapermillExecutionError, match="already holds results trained on other data"):
        _papermill("01_prepare_data.ipynb", tmp_path / "01.ipynb", OVERWRITE="false", **other)
    assert marker.read_text() == "{}", "OVERWRITE='false' deleted the trained run"
    # a value that is no yes/no ("maybe") is refused by the same reader: test_a_knob_that_is_not_its_type_...
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="papermill")
    nb = _papermill("01_prepare_data.ipynb", tmp_path / "01.ipynb", OVERWRITE="true", **other)
    assert not marker.exists() and (outputs / "ow" / "data" / "report.json").exists()
    said = [r.getMessage() for r in caplog.records if r.name.startswith("papermill") and r.levelno >= logging.WARNING]
    assert not said, f"papermill warned: {said}"
    assert not problems(nb), problems(nb)


def test_papermill_retrain_false_leaves_a_finished_run_alone(trained_run, tmp_path):
    """`-p RETRAIN false` (the text) on a finished run keeps its checkpoints, adapter and logs."""
    from lib.run.paths import run_paths
    from tests.conftest import copy_run

    run = copy_run(trained_run, "retrain-false")
    paths = run_paths(run)
    before = {p: p.stat().st_mtime_ns for p in (paths.adapter / "adapter_model.safetensors", paths.metrics_csv)}
    nb = _papermill("03_train_sft.ipynb", tmp_path / "03.ipynb", RUN_NAME=run, RETRAIN="false")
    text = json.dumps(nb["cells"])
    assert "finished already: True" in text
    assert {p: p.stat().st_mtime_ns for p in before} == before, "RETRAIN='false' trained again"


def test_a_notebook_shows_a_full_disk_as_one_line_and_a_bug_as_its_traceback():
    """The notebooks' error handler (lib.notebook.short_error): a bad input's message, a full or read-only
    disk anywhere in the chain of causes (torch's "PytorchStreamWriter failed" over ENOSPC) as one line with the
    path and free space; anything else keeps its traceback (None)."""
    import errno

    from lib.notebook import short_error

    assert short_error(ConfigError("lora.r: must be at least 1, got 0")) == "ConfigError: lora.r: must be at least 1, got 0"
    full = OSError(errno.ENOSPC, "No space left on device", "/tmp/x.safetensors")
    line = short_error(full)
    assert line.startswith("DiskError: no space left on the device: /tmp/x.safetensors (") and "free of" in line
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system", "/ro/adapter")
        except OSError as e:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from e
    except RuntimeError as e:
        assert short_error(e).startswith("DiskError: ") and "\n" not in short_error(e)
    assert short_error(KeyError("a")) is None and short_error(OSError(errno.ENOENT, "gone")) is None

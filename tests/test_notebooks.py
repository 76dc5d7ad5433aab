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

from lib.notebook import SECTIONS, notebook_overrides, parameter_key, settings_table
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


def test_papermill_runs_a_notebook_without_a_warning_and_it_reads_well(outputs, tmp_path, caplog):
    """Notebook 01 through papermill with the parameters a user passes (-p): papermill must parse every line of
    the parameters cell ("Unable to parse line") and know every parameter ("Passed unknown parameter"), and the
    executed page must keep tests/rendered.py's rules."""
    import logging

    import papermill

    from tests.rendered import problems

    caplog.set_level(logging.WARNING, logger="papermill")
    nb = papermill.execute_notebook(
        str(ROOT / "notebooks" / "01_prepare_data.ipynb"), str(tmp_path / "01.ipynb"), cwd=str(ROOT / "notebooks"),
        parameters={"RUN_NAME": "papermill", "PROFILE": "tiny", "TRAIN_MAX_LENGTH": 256, "DATA_MAX_EXAMPLES": 40},
        progress_bar=False, log_output=False)
    said = [r.getMessage() for r in caplog.records if r.name.startswith("papermill") and r.levelno >= logging.WARNING]
    assert not said, f"papermill warned: {said}"
    assert not problems(nb), problems(nb)
    assert (outputs / "papermill" / "data" / "report.json").exists()

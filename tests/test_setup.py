"""Project setup: environment.yml agrees with pyproject, notebooks are committed clean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = set(project["dependencies"]) | set(extras["dev"]) | set(extras["export"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    named = {p for p in pip if not p.startswith("-")}
    assert named == wanted, (sorted(named - wanted), sorted(wanted - named))
    assert "-e .[dev,export]" in pip and "conda-forge" in env["channels"]


def test_the_six_notebooks_exist_in_order():
    names = [p.stem for p in NOTEBOOKS]
    assert names == ["01_prepare_data", "02_configure_qlora_model", "03_train_sft",
                     "04_evaluate_perplexity", "05_plot_metrics", "06_merge_and_chat"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs_and_follows_the_conventions(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    cells = nb["cells"]
    dirty = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, f"{path.name}: cells {dirty} keep outputs; run `make strip`"
    assert cells[0]["cell_type"] == "markdown" and "Reads" in "".join(cells[0]["source"])
    assert "from lib.notebook import setup" in "".join(cells[1]["source"])
    params = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "exactly one cell tagged 'parameters'"
    for line in "".join(params[0]["source"]).splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert "=" in line and "#" in line, f"{path.name}: parameter without a trade-off comment: {line}"
    for c in cells:
        src = "".join(c["source"])
        if c["cell_type"] == "code":
            assert "\ndef " not in "\n" + src and "\nclass " not in "\n" + src, f"{path.name}: define in lib/, not here"


def test_the_colab_setup_says_what_pip_changed_and_which_change_needs_a_restart():
    """pip's changes from the installed versions before and after; a changed distribution this process has
    imported (pyyaml, as yaml) needs a restart, a new one or one never imported does not."""

    from lib.notebook import installed, loaded_changes, pip_changes

    now = installed()
    assert now["pyyaml"] and now["pytest"]
    before = {**now, "pyyaml": "5.0", "a-package-never-imported": "1.0"}
    before.pop("trl")
    changes = pip_changes(before, now)
    assert changes == {"a-package-never-imported": ("1.0", None), "pyyaml": ("5.0", now["pyyaml"]),
                       "trl": (None, now["trl"])}
    assert loaded_changes(changes) == ["pyyaml"]  # trl is new, the other was never imported here

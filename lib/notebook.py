"""What the six notebooks share: the setup cell, the parameter vocabulary, the settings table.

    from lib.notebook import setup
    setup(mount_drive=False, seed=42)

`setup` (cell 2): in Colab it installs the project's packages (never torch: Colab's CUDA build is
kept), says what pip changed, stops with one line when a package this session already imported was
changed (restart the session, then run the notebook again), and, if asked, mounts Google Drive and
keeps the run directories there. Everywhere
it moves to the repository root, seeds the random generators, quiets library noise, and prints
where the results go and on what hardware.

The parameter vocabulary, one rule: a parameter named SECTION_KEY is the configuration key
`section.key` (`TRAIN_LEARNING_RATE` is `train.learning_rate`, `LORA_R` is `lora.r`), and its
comment is that key's help text from `lib/run/config.py` (tests/test_notebooks.py checks both). None
keeps the current value (the run's config.yaml; the profile's for a new run). Any other name
(`RUN_NAME`, `RETRAIN`, ...) is a notebook-only knob and does not start with a section name.

    OVERRIDES = notebook_overrides(globals())             # {"train.learning_rate": 1e-4, ...}
    notebook_knobs(globals())                             # RETRAIN, SHOW_PANELS, ... checked and typed
    settings_table(RUN_NAME, OVERRIDES, ["train"])        # the values the stage will use

Every notebook-only knob goes through one typed reader (KNOBS, `notebook_knobs`), as the SECTION_KEY ones
go through the configuration's converter: papermill passes `-p RETRAIN false` as the text "false" (truthy
in Python), so "false"/"no"/"0"/0 read False, "true"/"yes"/"1"/1 read True, and anything else for a
yes/no knob is refused in one line naming the knob, before any cell acts on it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as metadata
import os
import subprocess
import sys

from lib.run.config import apply_overrides, convert_value, field_help, load_config, make_config
from lib.run.errors import ConfigError
from lib.run.paths import REPO_ROOT, outputs_dir, run_paths
from lib.run.profiles import PROFILES
from lib.run.settings import RunConfig

# The configuration's sections, in order: data, model, quant, lora, train, eval, generation, merge.
SECTIONS = tuple(f.name for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(getattr(RunConfig(), f.name)))


def in_colab() -> bool:
    return "google.colab" in sys.modules


def quiet() -> None:
    """Hide messages that say nothing to a user (bitsandbytes' optional CPU kernels, tokenizer forks)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # bitsandbytes' noise: see lib/__init__.py


def readable_tables() -> None:
    """pandas tables as a reader wants them: long names wrap instead of being cut with '…', and numbers are
    rounded as lib.run.formatting.num writes them (7,074 rather than 7074.000000; 4 significant digits)."""
    import pandas as pd

    from lib.run.formatting import num

    pd.set_option("display.max_colwidth", None)
    pd.set_option("display.float_format", num)


def short_error(value: BaseException) -> str | None:
    """The one line a notebook shows for an error instead of its traceback: a bad input's (SFTError) message,
    or for a full, read-only or unwritable disk what failed, where and the free space (as the CLI's exit-3
    line says it); None for anything else (a bug: its traceback is shown)."""
    from lib.run.errors import SFTError, disk_fault, free_space

    if isinstance(value, SFTError):
        return f"{type(value).__name__}: {value}"
    fault = disk_fault(value)
    if fault is None:
        return None
    what, path, _ = fault
    where = path or str(outputs_dir())
    return (f"DiskError: {what}: {where} ({free_space(where)}); what was installed before is kept. Free some space "
            "(or make the folder writable) and run the cell again")


def _show_short_errors() -> None:
    """In IPython, show a bad-input error (SFTError) or a disk fault as one line (short_error), not a traceback."""
    try:
        ip = get_ipython()  # type: ignore[name-defined]  # noqa: F821
    except NameError:
        return

    def handler(shell, etype, value, tb, tb_offset=None):
        line = short_error(value)
        if line is None:  # not ours to shorten: the usual traceback
            return shell.showtraceback((etype, value, tb), tb_offset=tb_offset, running_compiled_code=True)
        stb = [f"\x1b[31m{line}\x1b[0m"]
        shell._showtraceback(etype, value, stb)  # an error output (the cell fails), without the traceback
        return stb

    ip.set_custom_exc((Exception,), handler)
    # Figures from lib are built without pyplot; the inline backend makes a cell's Figure value show.
    ip.run_line_magic("matplotlib", "inline")


def installed() -> dict[str, str]:
    """Every installed distribution's version, by its normalised name ('scikit_learn' -> 'scikit-learn')."""
    import importlib

    importlib.invalidate_caches()
    return {d.metadata["Name"].lower().replace("_", "-"): d.version for d in metadata.distributions()
            if d.metadata["Name"]}


def pip_changes(before: dict[str, str], after: dict[str, str]) -> dict[str, tuple[str | None, str | None]]:
    """What pip changed: name -> (old version or None when new, new version or None when removed)."""
    return {n: (before.get(n), after.get(n)) for n in sorted(set(before) | set(after)) if before.get(n) != after.get(n)}


def loaded_changes(changes: dict) -> list[str]:
    """The changed distributions (not the new ones) that this process has already imported: these need a restart."""
    owners: dict[str, set[str]] = {}
    for module, dists in metadata.packages_distributions().items():
        for d in dists:
            owners.setdefault(d.lower().replace("_", "-"), set()).add(module)
    loaded = {m.partition(".")[0] for m in sys.modules}
    return [n for n, (old, _) in changes.items() if old is not None and owners.get(n, set()) & loaded]


def install_in_colab() -> dict:
    """pip installs this project's dependencies in the running Colab session; prints what pip changed. A
    package the session had already imported that pip changed stops here, in one line: the session keeps
    running the old copy, so the notebook would mix versions. A restart (the packages stay installed) fixes it."""
    before = installed()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(REPO_ROOT)], check=True)
    changes = pip_changes(before, installed())
    words = [f"{n} {old} -> {new}" if old else f"{n} {new} (new)" for n, (old, new) in changes.items()
             if n != "qlora-notebooks"]
    print("pip: " + (", ".join(words) if words else "nothing to install"))
    stale = loaded_changes(changes)
    if stale:
        from lib.run.errors import SFTError

        raise SFTError(f"restart needed: pip changed {', '.join(stale)}, which this session had already imported: "
                       "Runtime > Restart session, then run this notebook again (nothing is installed twice)")
    return changes


def setup(mount_drive: bool = False, seed: int = 42, install: bool = True) -> dict:
    """The setup cell: work from the repository root, seed, and print the hardware and outputs folder."""
    mount_drive = knob("MOUNT_DRIVE", mount_drive)
    os.chdir(REPO_ROOT)  # relative paths (data/examples/...) as in the README
    quiet()
    _show_short_errors()
    if in_colab() and install:
        # Before pandas or torch is imported here: torch is in Colab already and satisfies the bound, so pip keeps it.
        install_in_colab()
    readable_tables()
    if in_colab() and mount_drive:
        from google.colab import drive  # type: ignore

        drive.mount("/content/drive")
        os.environ.setdefault("SFT_OUTPUTS_DIR", "/content/drive/MyDrive/qlora-notebooks/outputs")
    import torch
    from transformers import set_seed

    set_seed(seed)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    # No profile here: the parameters cell below chooses it, and the settings table names it.
    info = {"torch": torch.__version__, "device": device, "outputs": str(outputs_dir())}
    print(f"torch {info['torch']} on {device}; runs in {info['outputs']}")
    return info


def parameter_key(name: str) -> str | None:
    """The configuration key a notebook parameter stands for ('TRAIN_LEARNING_RATE' -> 'train.learning_rate'),
    or None for a notebook-only knob (a name that does not start with a section name and '_')."""
    section, _, rest = name.partition("_")
    return f"{section.lower()}.{rest.lower()}" if rest and section.lower() in SECTIONS else None


def notebook_overrides(namespace: dict) -> dict[str, object]:
    """The configuration overrides a parameters cell sets: every UPPER_CASE SECTION_KEY name of
    `namespace` (a notebook's `globals()`), in the cell's order. None values are kept: they keep the
    current value (`lib.run.config.apply_overrides`); an unknown key is refused there, naming it."""
    return {parameter_key(n): v for n, v in namespace.items()
            if n.isupper() and not n.startswith("_") and parameter_key(n)}


# The notebook-only knobs (parameters that name no configuration key) and their types, as the configuration's
# converter reads them (lib/run/config.py convert_value); a list knob left empty or None is [].
KNOBS = {"RUN_NAME": "str", "PROFILE": "str | None", "OVERWRITE": "bool", "RETRAIN": "bool",
         "SHOW_EXAMPLES": "int", "SHOW_PANELS": "bool", "COMPARE_RUNS": "list", "CHAT_WITH_MERGED": "bool",
         "SYSTEM_PROMPT": "str | None", "SCRIPTED_PROMPTS": "list", "EXPORT_QUANT": "str | None",
         "PUSH_REPO": "str | None", "MOUNT_DRIVE": "bool", "REPO_URL": "str", "NULL_CONTROL": "bool"}


def knob(name: str, value):
    """One notebook-only knob's value as its type in KNOBS ("false" -> False for a yes/no knob), or a
    ConfigError naming the knob; a count must be at least 0."""
    if name not in KNOBS:
        raise ConfigError(f"{name}: not a notebook parameter (known: {', '.join(KNOBS)})")
    kind = KNOBS[name]
    if kind == "list" and isinstance(value, str) and not value.strip():
        return []
    out = convert_value(name, value, kind)  # "RETRAIN: cannot use 'maybe' (expected bool)"
    if kind == "int" and out < 0:
        raise ConfigError(f"{name}: must be at least 0, got {out}")
    return [] if kind == "list" and out is None else out


def notebook_knobs(namespace: dict) -> dict[str, object]:
    """Check and type every notebook-only knob of `namespace` (a notebook's `globals()`) in place, so that the
    cells below read RETRAIN=False, never the text "false" papermill passed; returns {name: value}."""
    typed = {name: knob(name, namespace[name]) for name in KNOBS if name in namespace}
    namespace.update(typed)
    return typed


def effective_config(run: str, overrides: dict, profile: str | None = None, new_run: bool = False):
    """The configuration a stage will use: the run's config.yaml with the overrides applied, or, for
    notebook 01 (`new_run`), a fresh one from the profile as `run_prepare` builds it."""
    if new_run:
        return make_config(profile, run=run, overrides=overrides)
    return apply_overrides(load_config(run_paths(run).config), overrides)


def settings_table(run: str, overrides: dict, sections, profile: str | None = None, new_run: bool = False):
    """The values a stage will use, one row per key of `sections` and of the parameters: the notebook
    parameter (if the cell has one), the value, the profile's value, and '*' where they differ."""
    import pandas as pd

    cfg = effective_config(run, overrides, profile, new_run)
    base = make_config(cfg.profile if cfg.profile in PROFILES else None)
    keys = [k for k in field_help() if k.split(".")[0] in sections]
    keys += [k for k in overrides if k not in keys]
    rows = []
    for key in keys:
        section, name = key.split(".")
        value, default = getattr(getattr(cfg, section), name), getattr(getattr(base, section), name)
        param = key.replace(".", "_").upper() if key in overrides else ""
        rows.append({"key": key, "parameter": param, "value": repr(value),
                     f"profile {base.profile}": repr(default), "differs": "*" if value != default else ""})
    return pd.DataFrame(rows).set_index("key")

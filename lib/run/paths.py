"""Where things live: the repository root and the run directories under outputs/.

The run directory `outputs/<run>/` is the only channel between the notebooks. The environment
variable SFT_OUTPUTS_DIR moves `outputs/` (e.g. to Google Drive in Colab, or a temp dir in tests).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from lib.run.errors import ConfigError, MissingStageError
from lib.run.stages import stage

REPO_ROOT = Path(__file__).resolve().parents[2]
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # fullmatch: no final newline


def outputs_dir() -> Path:
    return Path(os.environ.get("SFT_OUTPUTS_DIR") or REPO_ROOT / "outputs").expanduser().resolve()


def cache_dir() -> Path:
    """Where built artefacts that do not belong to one run are cached (the tiny model, SmolLM2, GGUF
    files dequantized into model folders); SFT_CACHE_DIR moves it."""
    return Path(os.environ.get("SFT_CACHE_DIR") or outputs_dir() / ".cache").expanduser().resolve()


def resolve_repo_path(path) -> Path:
    """A path as the user wrote it: absolute, relative to the working directory, or to the repo root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    return (REPO_ROOT / p).resolve() if (REPO_ROOT / p).exists() else p.resolve()


@dataclass(frozen=True)
class RunPaths:
    """Every file a run directory holds, by stage (see the README's run directory section)."""

    root: Path

    # 01 prepare data
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def train_data(self) -> Path:
        return self.data_dir / "train.jsonl"

    @property
    def eval_data(self) -> Path:
        return self.data_dir / "eval.jsonl"

    @property
    def data_report(self) -> Path:
        return self.data_dir / "report.json"

    # 02 configure model
    @property
    def model_summary(self) -> Path:
        return self.root / "model" / "summary.json"

    # 03 train
    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def metrics_csv(self) -> Path:
        return self.logs / "training_metrics.csv"

    @property
    def training_summary(self) -> Path:
        return self.logs / "training_summary.json"

    @property
    def samples(self) -> Path:  # answers to a few eval prompts at step 0 and every evaluation
        return self.logs / "samples.jsonl"

    # 04 evaluate
    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def perplexity(self) -> Path:
        return self.eval_dir / "perplexity.json"

    @property
    def predictions(self) -> Path:
        return self.eval_dir / "predictions.jsonl"

    @property
    def generation_metrics(self) -> Path:
        return self.eval_dir / "generation_metrics.json"

    @property
    def forgetting(self) -> Path:  # the forgetting check: the tuned model on the base model's general answers
        return self.eval_dir / "forgetting.json"

    @property
    def forgetting_base(self) -> Path:  # the base model's answers to the general prompts (a cache)
        return self.eval_dir / "forgetting_base.jsonl"

    @property
    def verdict(self) -> Path:  # did it help: task scores base vs tuned, 95% intervals, verdicts
        return self.eval_dir / "verdict.json"

    @property
    def null_control(self) -> Path:  # the same rows for the adapter at its initial weights (--null-control)
        return self.eval_dir / "null_control.json"

    # 05 plots
    @property
    def plots(self) -> Path:
        return self.root / "plots"

    # 06 merge
    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def merge_report(self) -> Path:
        return self.merged / "merge_report.json"

    # 06 export and push
    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def parity(self) -> Path:
        return self.export / "parity.json"

    @property
    def export_log(self) -> Path:
        return self.logs / "export.log"

    @property
    def push(self) -> Path:
        return self.root / "push"

    # 03 train: the adapter before the first step, what shapes the checkpoints, the tracker's folder
    @property
    def initial_adapter(self) -> Path:
        return self.checkpoints / "initial-adapter"

    @property
    def checkpoint_settings(self) -> Path:  # the settings that shape the checkpoints (lib.run.context.SHAPING)
        return self.checkpoints / "settings.json"

    @property
    def tensorboard(self) -> Path:
        return self.logs / "tensorboard"

    # the record of the stages (lib/run/rundir.py): manifests, and the lock beside the run
    @property
    def stages(self) -> Path:
        return self.root / "stages"

    @property
    def lock(self) -> Path:
        return self.root.parent / ".locks" / f"{self.root.name}.lock"


def check_run_name(name: str) -> str:
    if not isinstance(name, str) or not _RUN_NAME.fullmatch(name):
        raise ConfigError(
            f"run name {name!r} is not usable: use letters, digits, '.', '_' or '-' (at most 100 characters)"
        )
    return name


def run_paths(run: str) -> RunPaths:
    return RunPaths(outputs_dir() / check_run_name(run))


# The stage that writes each file of RunPaths, for "run X first" messages (names from lib/run/stages.py).
STAGE_OF = {
    "config": "prepare", "train_data": "prepare", "eval_data": "prepare", "data_report": "prepare",
    "model_summary": "configure",
    "adapter": "train", "metrics_csv": "train", "training_summary": "train", "samples": "train",
    "perplexity": "evaluate", "predictions": "evaluate", "generation_metrics": "evaluate",
    "forgetting": "evaluate", "forgetting_base": "evaluate", "verdict": "evaluate", "null_control": "evaluate",
    "plots": "plot", "merged": "merge", "merge_report": "merge", "export": "export", "parity": "export",
}


def require(paths: RunPaths, *names: str) -> None:
    """Stop with a message naming the notebook (and command) to run first if an input is missing."""
    for name in names:
        p = getattr(paths, name)
        if not p.exists():
            raise MissingStageError(f"{p} not found: {stage(STAGE_OF[name]).first(paths.root.name)}")

"""The checkpoints of a training run: which one is complete enough to resume from, where a blow-up began and
which checkpoints it spoiled, the learning rate of a resumed run, and what an out-of-memory stop keeps.

    from lib.train.checkpoints import last_checkpoint, checkpoint_problem
    last_checkpoint(run_paths("demo").checkpoints)        # Path('.../checkpoint-20'), or None
    checkpoint_problem(path)                              # 'optimizer.pt is missing', or None if complete
    resume_problem(paths, cfg)                            # 'lora.r: checkpoint-20 was trained with ...', or None

A training that starts from scratch records the settings that shape its checkpoints (lib.run.context.SHAPING)
and the hash of the training data in checkpoints/settings.json; resuming with other ones is refused.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from pathlib import Path

from lib.run.context import record_problem, shaping_settings
from lib.run.rundir import file_hash, read_json, write_json
from lib.run.stages import stage

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What FSDP saves in a checkpoint instead of adapter_model.safetensors and optimizer.pt (accelerate's names:
# a folder per shard set with SHARDED_STATE_DICT, one .bin with FULL_STATE_DICT).
FSDP_WEIGHTS = ("pytorch_model_fsdp_0", "pytorch_model_fsdp.bin")
FSDP_OPTIMIZER = ("optimizer_0", "optimizer.bin")


class CheckpointWarning(UserWarning):
    """A checkpoint that cannot be resumed from (missing or unreadable files)."""


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None if it is complete."""
    state = path / "trainer_state.json"
    if not state.exists():
        return "trainer_state.json is missing"
    try:
        saved = json.loads(state.read_text(encoding="utf-8"))
        history = saved.get("log_history") or []
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise ValueError("log_history is not a list of records")
    except (ValueError, OSError, AttributeError, RecursionError):
        return "trainer_state.json is unreadable"
    for h in history:
        if any(isinstance(h.get(k), float) and not math.isfinite(h[k]) for k in ("loss", "grad_norm", "eval_loss")):
            return f"a non-finite loss or gradient norm was logged at step {h.get('step')}"
    if any((path / n).exists() for n in FSDP_WEIGHTS):
        return _fsdp_checkpoint_problem(path) or _step_problem(path, saved)
    # the files first (a missing one is named), then what trainer_state.json says of the step
    return _weights_problem(path) or _optimizer_problem(path) or _step_problem(path, saved)


def _step_problem(path: Path, state: dict) -> str | None:
    """Why the global_step of a checkpoint's trainer_state.json is not the step it was saved at: not its folder's
    number, past the state's own max_steps, or behind the step count of its learning-rate scheduler."""
    step = state.get("global_step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"trainer_state.json's global_step is not a whole number ({str(step)[:40]!r})"
    step, total = state.get("global_step"), state.get("max_steps")
    if type(step) is not int or step < 1 or path.name != f"checkpoint-{step}":
        return f"global_step {step!r} in trainer_state.json is not the step of {path.name}"
    if type(total) is int and 0 < total < step:
        return f"global_step {step} in trainer_state.json is past its max_steps {total}"
    scheduled = _scheduler_steps(path / "scheduler.pt")
    if scheduled is not None and scheduled > step:  # fewer only where fp16 skipped an overflowing step
        return f"global_step {step} in trainer_state.json is behind scheduler.pt's {scheduled} steps"
    return None


def _scheduler_steps(path: Path) -> int | None:
    """The steps a saved learning-rate scheduler has taken (None if unreadable: the file checks say so)."""
    try:
        import torch

        steps = torch.load(str(path), map_location="cpu", weights_only=True).get("last_epoch")
    except Exception:
        return None
    return steps if type(steps) is int else None


def _weights_problem(path: Path) -> str | None:
    """Why the adapter weights of a (non-FSDP) checkpoint are not usable: missing, unreadable or not finite."""
    weights = [path / n for n in ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors")]
    weights = [w for w in weights if w.exists()]
    if not weights or not (path / "adapter_config.json").exists():
        return "the adapter weights are missing"
    if weights[0].suffix == ".safetensors":
        try:
            import torch
            from safetensors import safe_open

            with safe_open(str(weights[0]), framework="pt") as f:
                finite_weights = all(bool(torch.isfinite(f.get_tensor(k)).all()) for k in f.keys())
        except Exception:
            return f"{weights[0].name} is unreadable"
        if not finite_weights:
            return f"{weights[0].name} holds non-finite weights"
    return None


def _optimizer_problem(path: Path) -> str | None:
    for name in ("optimizer.pt", "scheduler.pt"):
        p = path / name
        if not p.exists() or p.stat().st_size == 0:
            return f"{name} is missing"
        if not _readable_torch_file(p):
            return f"{name} is truncated or unreadable"
    return _rng_problem(path)


def _rng_problem(path: Path) -> str | None:
    """The random states are optional (the trainer resumes without them), but one that is there must load."""
    for p in sorted(path.glob("rng_state*.pth")):
        if not _readable_torch_file(p):
            return f"{p.name} is truncated or unreadable"
    return None


def _fsdp_checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint FSDP saved (accelerate's sharded folders or full .bin files) cannot be resumed from."""
    def present(names):
        return any((path / n).is_dir() and any((path / n).iterdir()) or (path / n).is_file()
                   and (path / n).stat().st_size > 0 for n in names)

    if not present(FSDP_OPTIMIZER):
        return "the FSDP optimizer state is missing"
    if not (path / "scheduler.pt").exists() or not _readable_torch_file(path / "scheduler.pt"):
        return "scheduler.pt is missing"
    return _rng_problem(path)


def _readable_torch_file(path: Path) -> bool:
    """A torch.save file (a zip archive) whose members all read back with matching checksums and that loads
    as the trainer loads it (weights only, numpy's random state allowed: no code in a pickle runs)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            if z.testzip() is not None:
                return False
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False
    import torch

    try:
        from transformers.trainer_pt_utils import safe_globals
    except ImportError:  # transformers 5.0 (the lowest allowed) keeps it in transformers.trainer
        from transformers.trainer import safe_globals

    try:
        with safe_globals():
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # an unpickling error, a global that is not allowed, a damaged record: not loadable
        return False
    return True


def _numbered(folder: Path) -> list[tuple[int, Path]]:
    """The checkpoint-N folders in `folder` with their step N, newest first."""
    if not folder.is_dir():
        return []
    return sorted(((int(m.group(1)), p) for p in folder.iterdir()
                   if p.is_dir() and (m := _CHECKPOINT.match(p.name))), reverse=True)


def last_checkpoint(folder: Path, clean: bool = False) -> Path | None:
    """The newest complete checkpoint-N in `folder`; incomplete newer ones warned about (and removed if clean)."""
    for _, p in _numbered(Path(folder)):
        problem = checkpoint_problem(p)
        if problem is None:
            return p
        if clean:
            warnings.warn(f"skipping incomplete checkpoint {p.name} ({problem}); it is removed", CheckpointWarning,
                          stacklevel=2)
            shutil.rmtree(p, ignore_errors=True)
    return None


def checkpoint_step(checkpoint: Path) -> int | None:
    """The global step a (complete) checkpoint was saved at."""
    return read_json(Path(checkpoint) / "trainer_state.json").get("global_step")


def blow_up_start(history: list[dict], failed_step: int) -> int:
    """The step where the divergence that ended in a non-finite value at `failed_step` began: the first
    logged gradient norm above 10x the median of the logged ones (the weights before it were sane)."""
    norms = [(h["step"], h["grad_norm"]) for h in history if isinstance(h.get("grad_norm"), (int, float))]
    finite_norms = sorted(v for _, v in norms if math.isfinite(v))
    if len(finite_norms) < 3:
        return failed_step
    limit = 10 * finite_norms[len(finite_norms) // 2]
    return min([s for s, v in norms if not (v <= limit)] + [failed_step])


def drop_checkpoints_from(folder: Path, step: int) -> None:
    """Remove checkpoints saved at `step` or later: their weights led to a non-finite loss or gradient.

    A checkpoint at step N holds the weights after N updates, which the loss of step N + 1 is computed
    with; when step N + 1 is not finite, checkpoint-N is not a good one to resume from (its weights may
    already be huge: the blow-up happens before the loss overflows)."""
    for n, p in _numbered(Path(folder)):
        if n >= step:
            shutil.rmtree(p, ignore_errors=True)


def rescale_learning_rate(sched, optimizer, new: float) -> float | None:
    """Scale a resumed scheduler and optimizer to the learning rate `new` when the checkpoint's differs;
    returns the checkpoint's learning rate when it did (None when nothing changed)."""
    if not getattr(sched, "base_lrs", None):
        return None
    old = sched.base_lrs[0]
    if not old or math.isclose(old, new, rel_tol=1e-9):
        return None
    ratio = new / old
    sched.base_lrs = [lr * ratio for lr in sched.base_lrs]
    if getattr(sched, "_last_lr", None):
        sched._last_lr = [lr * ratio for lr in sched._last_lr]
    for group in optimizer.param_groups:
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio
    return old


def kept_checkpoint(folder: Path, run: str) -> str:
    """The sentence of an out-of-memory stop about the checkpoint kept (checked complete) and how to go on."""
    ck = last_checkpoint(folder)
    if ck is None:
        return "No checkpoint had been saved yet: rerunning starts training over."
    return (f"The last good checkpoint is kept: {ck} (step {checkpoint_step(ck)}), and training resumes from it: "
            f"with smaller settings, {stage('train').rerun(run, ' --set key=value')}; a setting that shapes the "
            "checkpoint (train.max_length, quant.mode, ...) needs --retrain.")


def record_settings(paths, cfg) -> None:
    """checkpoints/settings.json: what shapes the checkpoints of a training that starts from scratch."""
    write_json(paths.checkpoint_settings, {"settings": shaping_settings(cfg),
                                           "train_data": file_hash(paths.train_data)})


def resume_problem(paths, cfg) -> str | None:
    """Why `cfg` cannot resume the run's last complete checkpoint (one line), or None: a setting that shapes it
    differs from its record, the training data changed since, or it is past train.max_steps."""
    ck = last_checkpoint(paths.checkpoints)
    if ck is None:
        return None
    step, total = checkpoint_step(ck), cfg.train.max_steps
    if 0 < total < step:
        return past_the_end(ck, step, total)
    return record_problem(paths, cfg, ck)


def past_the_end(checkpoint, step: int, total: int) -> str:
    """Why a checkpoint saved after more steps than the training now has cannot be resumed (one line)."""
    name = Path(checkpoint).name if checkpoint else "the checkpoint"
    run = Path(checkpoint).parent.parent.name if checkpoint else "RUN"
    return (f"train.max_steps / train.num_train_epochs: {name} is at step {step}, past the {total} steps training "
            f"has now; set them to train at least {step} steps, or train the {total} steps from scratch: "
            f"{stage('train').rerun(run, ' --retrain')}")

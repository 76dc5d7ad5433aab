"""One stage run's context: the run's folders, its configuration and the machine it runs on, resolved once.

    from lib.run.context import open_run
    ctx = open_run("demo", "evaluate", overrides=["eval.max_examples=8"])
    ctx.cfg, ctx.paths, ctx.device, ctx.compute_dtype, ctx.attn_implementation

Every stage after prepare starts here instead of re-deriving these itself: the configuration is
config.yaml with the stage's overrides applied (lib/run/config.py's one "None keeps" rule), the device,
compute dtype and attention kernel are resolved once (lib/model/loading.py's rules), and the loaders are
handed `ctx.device` so that nothing below asks again. A missing config.yaml names the notebook to run
first (lib/run/stages.py).

An adapter's weights mean something only with the settings it was trained with (SHAPING): a resumed
checkpoint or a finished adapter is refused with another value (`mismatch`), and the stages that load
the adapter refuse a base model other than the one it was trained on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lib.run.config import apply_overrides, from_dict, load_config, to_dict
from lib.run.errors import ConfigError, SFTError
from lib.run.hardware import attn_implementation, compute_dtype_name, device_info
from lib.run.paths import RunPaths, require, run_paths
from lib.run.rundir import file_hash, read_json
from lib.run.settings import RunConfig, target_modules
from lib.run.stages import stage


@dataclass(frozen=True)
class RunContext:
    run: str
    stage: str  # the stage (a name of lib/run/stages.py) or reader (chat) this context serves
    paths: RunPaths
    cfg: RunConfig
    device: dict  # lib.model.loading.device_info(): device type, GPU name, compute capability, memory
    compute_dtype: str  # quant.compute_dtype resolved for this device
    attn_implementation: str  # model.attn_implementation resolved for this device and batching

    def describe(self) -> str:
        """One line: where and how this stage computes."""
        return (f"{self.stage} of run {self.run} on {self.device['name']} ({self.device['device']}), "
                f"{self.compute_dtype} compute, attention {self.attn_implementation}")


def open_run(run: str, stage: str, overrides=()) -> RunContext:
    """The context of `stage` on `run`: config.yaml with `overrides` applied, the device and precision resolved."""
    paths = run_paths(run)
    require(paths, "config")
    cfg = apply_overrides(load_config(paths.config), overrides or [])
    if stage in ADAPTER_READERS:
        check_base(paths, cfg)
    info = device_info()
    compute = compute_dtype_name(cfg, info, training=stage == "train")
    return RunContext(run, stage, paths, cfg, info, compute, attn_implementation(cfg, info))


# The settings that shape a checkpoint: the base its weights were trained on and how it was quantized, the
# adapter's shape (trained parameters, their optimizer state and scale), and the batches its step count is
# a position in (with EXAMPLES_PER_STEP: the batch may be split differently, as the out-of-memory message
# suggests, but not resized). A checkpoint resumed with another value would mix two trainings in one adapter
# (or fail to load). The learning rate, its schedule, the number of steps, dropout, the optimizer, precision,
# evaluation and logging may change.
SHAPING = ("model.name_or_path", "quant.mode", "quant.quant_type", "quant.double_quant",
           "lora.r", "lora.alpha", "lora.target_modules", "lora.use_dora", "lora.use_rslora", "lora.init",
           "lora.bias", "lora.loraplus_lr_ratio", "train.max_length", "train.batching", "train.seed",
           "data.columns", "data.ignore_fields",  # these two: which fields of the data were trained
           "train.best_metric")  # which checkpoint the trainer state holds as the best
EXAMPLES_PER_STEP = "train.per_device_train_batch_size x train.gradient_accumulation_steps"


def shaping_settings(cfg) -> dict:
    """{key: value} of the SHAPING settings of a RunConfig (or of a to_dict of one), and EXAMPLES_PER_STEP."""
    d = cfg if isinstance(cfg, dict) else to_dict(cfg)
    out = {k: d.get(k.split(".")[0], {}).get(k.split(".")[1]) for k in SHAPING}
    t = d.get("train", {})
    out["train.best_metric"] = out["train.best_metric"] or "eval_loss"  # a run recorded before the key existed
    out[EXAMPLES_PER_STEP] = t.get("per_device_train_batch_size", 0) * t.get("gradient_accumulation_steps", 0)
    return out


def _text(v) -> str:
    """A value as `--set` takes it."""
    return str(v).lower() if isinstance(v, bool) or v is None else str(v)


def mismatch(recorded: dict, cfg, what: str, keys=SHAPING) -> str | None:
    """The one-line refusal when a setting of `cfg` differs from the value `what` (e.g. "checkpoint-20")
    was trained with (`recorded`: shaping_settings of that training), else None."""
    now = shaping_settings(cfg)
    for key in keys:
        if key in recorded and recorded[key] != now[key]:
            old, new = _text(recorded[key]), _text(now[key])
            return (f"{key}: {what} was trained with {key}={old}, not {new}; put it back (--set {key}={old}) "
                    f"or train from scratch with {new}: {stage('train').rerun(cfg.run, f' --retrain --set {key}={new}')}")
    if keys is SHAPING and recorded.get(EXAMPLES_PER_STEP) not in (None, now[EXAMPLES_PER_STEP]):
        return (f"{EXAMPLES_PER_STEP}: {what} was trained with {recorded[EXAMPLES_PER_STEP]} examples per "
                f"optimizer step, not {now[EXAMPLES_PER_STEP]}; split the batch differently but keep the product, "
                f"or train from scratch: {stage('train').rerun(cfg.run, ' --retrain')}")
    return None


ADAPTER_READERS = ("evaluate", "merge", "chat")  # the stages that load the base model with the run's adapter


def check_base(paths, cfg) -> None:
    """Refuse (ConfigError) a base model other than the one the run's adapter was trained on."""
    trained = paths.adapter / "run_config.json"
    try:
        trained_on = json.loads(trained.read_text(encoding="utf-8"))["model"]["name_or_path"]
    except (OSError, ValueError, LookupError, TypeError, RecursionError):
        return  # no adapter yet, or one saved before run_config.json: the adapter's own checks speak
    problem = mismatch({"model.name_or_path": trained_on}, cfg, "the adapter", keys=("model.name_or_path",))
    if problem:
        raise ConfigError(problem)


def checkpoint_settings(checkpoint) -> dict:
    """The SHAPING settings a checkpoint records itself, in its adapter_config.json (peft's: r, alpha, target
    modules, DoRA, rsLoRA, bias): what the resume check compares with when checkpoints/settings.json is missing.
    Raises ConfigError (one line) when the file is missing or damaged."""
    path = Path(checkpoint) / "adapter_config.json"
    try:
        saved = read_json(path)
        out = {"lora.r": saved["r"], "lora.alpha": saved["lora_alpha"], "lora.use_dora": bool(saved.get("use_dora")),
               "lora.use_rslora": bool(saved.get("use_rslora")), "lora.bias": saved.get("bias", "none")}
        modules = saved.get("target_modules")
        modules = sorted([modules] if isinstance(modules, str) else modules or [])
    except (SFTError, LookupError, TypeError, AttributeError) as e:
        why = str(e) if isinstance(e, SFTError) else f"{path}: damaged ({type(e).__name__}: {e})"
        raise ConfigError(f"{why}; the checkpoint cannot be checked against the settings: train from scratch "
                          f"({stage('train').rerun(Path(checkpoint).parent.parent.name, ' --retrain')})") from None
    return {**out, "lora.target_modules": sorted(map(str, modules))}


def checkpoint_mismatch(checkpoint, cfg) -> str | None:
    """mismatch() against what `checkpoint` records itself (checkpoint_settings); lora.target_modules is compared
    as the set of module names where the configuration names them (all-linear depends on the model)."""
    recorded = checkpoint_settings(checkpoint)
    modules = recorded.pop("lora.target_modules")
    wanted = target_modules(cfg)
    if wanted != "all-linear" and modules and sorted(wanted) != modules:
        recorded["lora.target_modules"] = ",".join(modules)
    elif wanted != "all-linear" or not modules:
        recorded["lora.target_modules"] = cfg.lora.target_modules  # the same modules, however they are named
    return mismatch(recorded, cfg, Path(checkpoint).name, keys=tuple(k for k in SHAPING if k in recorded))


def record_problem(paths, cfg, checkpoint) -> str | None:
    """Why `cfg` cannot resume `checkpoint` (one line), or None: a SHAPING setting differs from
    checkpoints/settings.json or, without that record, from what the checkpoint records itself; the training
    data changed since; or the record is damaged (never skipped: the check does not switch itself off)."""
    record_path, name = paths.checkpoint_settings, Path(checkpoint).name
    if not os.path.lexists(record_path):  # saved before the record existed, or removed
        return checkpoint_mismatch(checkpoint, cfg)
    try:
        record = read_json(record_path)
        settings, data = record["settings"], record["train_data"]
        if not isinstance(settings, dict) or not isinstance(data, str):
            raise TypeError("'settings' is not a mapping or 'train_data' not a hash")
    except (SFTError, LookupError, TypeError) as e:
        why = str(e) if isinstance(e, SFTError) else f"{record_path}: damaged ({e})"
        return (f"{why}: what {name} was trained with cannot be read; put the file back or train from "
                f"scratch: {stage('train').rerun(cfg.run, ' --retrain')}")
    if data != file_hash(paths.train_data):
        return (f"{paths.train_data}: prepared again since {name} was saved (other training examples); train "
                f"from scratch on them: {stage('train').rerun(cfg.run, ' --retrain')}")
    return mismatch(settings, cfg, name)


def trained_problem(paths, cfg) -> str | None:
    """What `train --set` refuses, for a stage that rewrites config.yaml before training (notebook 02): a
    SHAPING setting other than the finished adapter's (adapter/run_config.json) or the newest checkpoint's."""
    adapter = paths.adapter / "run_config.json"
    if adapter.is_file():
        try:
            trained = from_dict(read_json(adapter), source=str(adapter))
        except SFTError:  # damaged: the stages that load the adapter say so (rundir.check_trained)
            trained = None
        problem = mismatch(shaping_settings(trained), cfg, "the adapter") if trained else None
        if problem:
            return problem
    numbered = [(int(p.name[11:]), p) for p in paths.checkpoints.glob("checkpoint-*") if p.name[11:].isdigit()]
    if not numbered:
        return None
    return record_problem(paths, cfg, max(numbered)[1])

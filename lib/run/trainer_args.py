"""What training makes of a configuration: TRL's SFTConfig from a RunConfig, and the check that
training will accept a configuration, without loading weights. Shared by prepare (01), notebook 02
and training (03), so each refuses a bad setting before anything is saved.

    from lib.run.trainer_args import check_settings, sft_config
    check_settings(cfg, run_paths("demo"))            # ConfigError naming the key, or nothing
    args = sft_config(cfg, "outputs/demo/checkpoints")
"""

from __future__ import annotations

import os
from pathlib import Path

from lib.run.config import check_best_model
from lib.run.errors import ConfigError, first_line
from lib.run.hardware import attn_implementation, bf16_ok, compute_dtype_name, device_info, fsdp_enabled
from lib.run.memory import cached_layers
from lib.run.paths import RunPaths
from lib.run.realmodel import load_model_config
from lib.run.settings import target_modules


def precision(cfg, info: dict | None = None) -> str:
    """train.precision resolved to bf16, fp16 or fp32 (mixed precision of the trainer)."""
    info = info or device_info()
    p = cfg.train.precision
    if p == "auto":
        if info["device"] != "cuda":
            return "fp32"
        return "bf16" if bf16_ok(info) else "fp16"
    if info["device"] == "cuda" and p == "bf16" and not bf16_ok(info):
        raise ConfigError(
            f"train.precision: bf16 needs compute capability >= 8, but {info['name']} has "
            f"{'.'.join(map(str, info['capability']))}: use fp16 (or auto)"
        )
    if info["device"] != "cuda" and p == "fp16":
        raise ConfigError("train.precision: fp16 mixed precision needs a GPU; use fp32 (or auto) on the CPU")
    return p


def check_target_modules(cfg, model_config=None) -> None:
    """Raise ConfigError when a name in lora.target_modules is no linear layer of the base model.

    Uses the model's config only (layers built on the meta device), so a bad name is refused
    before any setting is saved or any weights load.
    """
    targets = target_modules(cfg)
    if targets == "all-linear":
        return
    linears, _total = cached_layers(model_config or load_model_config(cfg), cfg.model.trust_remote_code)
    names = {n for n, *_ in linears} | {n.split(".")[-1] for n, *_ in linears} | {"lm_head"}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ConfigError(f"lora.target_modules: {', '.join(missing)} not in this model; its linear layers are "
                          f"{', '.join(sorted({n.split('.')[-1] for n, *_ in linears}))} (or use all-linear)")


FSDP_LAUNCH = "FSDP (accelerate launch with an FSDP config)"


def check_fsdp(cfg, info: dict | None = None) -> None:
    """Under FSDP, refuse what cannot be sharded, naming both settings; nothing to check otherwise.

    FSDP shards float tensors of one dtype per unit: bitsandbytes' 8-bit weights (int8 with their own
    state) cannot be, and 4-bit weights only when stored in the compute dtype (quant.quant_storage)."""
    if not fsdp_enabled():
        return
    info = info or device_info()
    if info["device"] != "cuda":
        raise ConfigError(f"{FSDP_LAUNCH} needs GPUs: accelerate shards only on GPUs (or XPU, NPU, ...); on the "
                          "CPU train with DDP: torchrun --nproc_per_node N -m lib -- train ...")
    if cfg.quant.mode == "8bit":
        raise ConfigError(f"quant.mode=8bit and {FSDP_LAUNCH}: 8-bit weights cannot be sharded; use "
                          "quant.mode=4bit (FSDP-QLoRA) or DDP (torchrun)")
    storage = cfg.quant.quant_storage
    compute = compute_dtype_name(cfg, info)
    if cfg.quant.mode == "4bit" and storage not in ("auto", compute):
        raise ConfigError(f"quant.quant_storage={storage} and quant.compute_dtype={compute} under {FSDP_LAUNCH}: "
                          "FSDP shards 4-bit weights only when stored in the compute dtype; use "
                          "quant.quant_storage=auto")


def _report_to(cfg) -> list[str] | str:
    import importlib.util

    wanted = [s.strip() for s in cfg.train.report_to.split(",") if s.strip() and s.strip() != "none"]
    for w in wanted:
        module = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}.get(w)
        if module is None:
            raise ConfigError(f"train.report_to: '{w}' is not one of none, tensorboard, wandb, mlflow, trackio")
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.report_to: {w} is not installed (pip install {module})")
    return wanted or "none"


def sft_config(cfg, output_dir, has_eval: bool = True, resuming: bool = False):
    """TRL's SFTConfig from the run configuration (the cross-field rules checked first: config.check_best_model)."""
    from trl import SFTConfig

    check_best_model(cfg, has_eval)
    eval_strategy = cfg.train.eval_strategy if has_eval else "no"
    report_to = _report_to(cfg)
    if "tensorboard" in report_to:  # transformers 5 reads the folder from the environment
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(RunPaths(Path(output_dir).parent).tensorboard)
    kwargs = dict(output_dir=str(output_dir), report_to=report_to, run_name=cfg.run,
                  **_optimizer_kwargs(cfg.train), **_schedule_kwargs(cfg.train, eval_strategy, resuming),
                  **_device_kwargs(cfg), **_data_kwargs(cfg.train))
    try:
        return SFTConfig(**kwargs)
    except (ValueError, TypeError) as e:
        msg = first_line(e)
        key = ("train.lr_scheduler_type" if "SchedulerType" in msg else "train.optim" if "OptimizerNames" in msg
               else "train")
        raise ConfigError(f"{key}: {msg}") from None


def _optimizer_kwargs(t) -> dict:
    return dict(
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        lr_scheduler_kwargs={"num_cycles": t.num_cycles} if t.lr_scheduler_type == "cosine_with_restarts" else {},
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a share of the steps
        weight_decay=t.weight_decay,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        optim=t.optim,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
    )


# train.best_metric -> the key of the evaluation metrics it is (task_score: set by lib/train/samples.py)
BEST_METRICS = {"eval_loss": "eval_loss", "task_score": "eval_sample_task_score"}


def _schedule_kwargs(t, eval_strategy: str, resuming: bool) -> dict:
    """When to log, evaluate and save."""
    return dict(
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a non-finite loss must show, not be averaged away
        eval_strategy=eval_strategy,
        eval_steps=t.eval_steps if eval_strategy == "steps" else None,
        eval_on_start=eval_strategy != "no" and not resuming,  # the baseline eval loss at step 0
        save_strategy=t.save_strategy,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=t.load_best_model_at_end,
        # a resumed run continues early stopping's count of evaluations without improvement
        restore_callback_states_from_checkpoint=t.early_stopping_patience is not None,
        metric_for_best_model=BEST_METRICS[t.best_metric] if eval_strategy != "no" else None,
        greater_is_better=t.best_metric == "task_score" if eval_strategy != "no" else None,
        disable_tqdm=False,
    )


def _argument_names() -> set[str]:
    import dataclasses

    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments)}


def checkpointing_kwargs(on: bool) -> dict:
    """Activation (gradient) checkpointing in the installed transformers' words: `activation_checkpointing`
    since 5.2x, `gradient_checkpointing` before (Colab's 5.15, the lowest 5.0); the other name is refused."""
    key = "activation_checkpointing" if "activation_checkpointing" in _argument_names() else "gradient_checkpointing"
    return {key: on, f"{key}_kwargs": {"use_reentrant": False} if on else None}


def sampling_kwargs(by_length: bool) -> dict:
    """Batches of similar lengths (train.batching=group_by_length) in the installed transformers' words:
    `train_sampling_strategy` in newer 5.x (Colab's 5.15 too), `group_by_length` in 5.0."""
    if "train_sampling_strategy" in _argument_names():
        return {"train_sampling_strategy": "group_by_length" if by_length else "random"}
    return {"group_by_length": by_length}


def _device_kwargs(cfg) -> dict:
    """Precision, device, activation checkpointing and distributed settings."""
    info = device_info()
    prec = precision(cfg, info)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return dict(
        bf16=prec == "bf16",
        fp16=prec == "fp16",
        use_cpu=info["device"] == "cpu",
        **checkpointing_kwargs(cfg.model.gradient_checkpointing),
        dataloader_pin_memory=info["device"] == "cuda",
        ddp_find_unused_parameters=False if distributed else None,
        ddp_backend=("gloo" if info["device"] == "cpu" else None) if distributed else None,
    )


def _data_kwargs(t) -> dict:
    """Data: tokenized and truncated here (encode_dataset); TRL keeps our labels. packing: TRL packs the
    training examples into rows of max_length tokens (best-fit decreasing; our examples are already cut
    at max_length, so none is split), position_ids restarting at each example; evaluation batches stay
    unpacked (padding-free), so the eval loss is that of padding_free."""
    packing = t.batching == "packing"
    return dict(
        max_length=t.max_length if packing else None,
        packing=packing,
        packing_strategy="bfd",
        eval_packing=False,
        padding_free=t.batching in ("padding_free", "packing"),
        neftune_noise_alpha=t.neftune_noise_alpha,
        assistant_only_loss=False,
        completion_only_loss=False,
        **sampling_kwargs(t.batching == "group_by_length"),
        include_num_input_tokens_seen="non_padding",
    )


def has_eval_data(cfg, paths) -> bool:
    if cfg.train.eval_strategy == "no" or not paths.eval_data.exists():
        return False
    with open(paths.eval_data, encoding="utf-8") as f:
        return any(line.strip() for line in f)


def check_settings(cfg, paths, has_eval: bool | None = None) -> None:
    """Raise ConfigError for a setting training cannot use, without loading anything large.

    has_eval: whether there is an evaluation split (default: read from the run's data)."""
    info = device_info()
    precision(cfg, info)
    check_fsdp(cfg, info)
    attn_implementation(cfg, info)
    check_target_modules(cfg)
    sft_config(cfg, paths.checkpoints, has_eval=has_eval_data(cfg, paths) if has_eval is None else has_eval)

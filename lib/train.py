"""03: supervised fine-tuning with TRL's SFTTrainer: resumable, logged, multi-process.

    python -m lib train --run demo [--set train.learning_rate=1e-4 ...] [--retrain]
    torchrun --nproc_per_node 2 -m lib -- train --run demo   # DDP: one process per GPU (the `--`
                                                             # stops torchrun reading --run as its --run-path)
    from lib.train import run_train; summary = run_train("demo")

Examples are tokenized here with lib.tokenization.encode_example (labels are -100 outside the
assistant answers, whose end-of-turn tokens are trained) and handed to SFTTrainer as `input_ids`
and `labels` columns, so TRL keeps our labels. Batching (train.batching): padding_free (the
sequences of a batch concatenated, with position_ids restarting at each one: no padding and no
attention across examples), pad_longest, group_by_length, or pad_max.

Rerunning continues from the last complete checkpoint (an incomplete one is removed with a
warning); a finished run is left alone unless retrain=True. A non-finite loss or gradient stops
training with a TrainingError before the optimizer applies it, so every checkpoint stays good.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import time
import warnings
from pathlib import Path

from .config import apply_overrides, from_dict, load_config, save_config, to_dict
from .errors import ConfigError, DataError, SFTError, TrainingError
from .figures import load_inputs, panel_figure
from .loading import MUTATING_INITS, adapter_variant
from .model import (
    add_lora,
    load_model_and_tokenizer,
    load_model_config,
    parameter_counts,
    write_summary,
)
from .oom import out_of_memory
from .paths import require, run_paths
from .readers import read_examples
from .rundir import (
    begin,
    check_trained,
    fingerprint,
    finish,
    is_main_rank,
    is_pending,
    read_json,
    replace,
    run_lock,
    write_atomic,
    write_json,
)
from .templates import TemplateError
from .tokenization import IGNORE_INDEX, encode_example
from .trainer_args import check_settings, has_eval_data, sft_config

METRIC_COLUMNS = ["step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm",
                  "tokens_per_second", "peak_memory_mb"]
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What FSDP saves in a checkpoint instead of adapter_model.safetensors and optimizer.pt (accelerate's names:
# a folder per shard set with SHARDED_STATE_DICT, one .bin with FULL_STATE_DICT).
FSDP_WEIGHTS = ("pytorch_model_fsdp_0", "pytorch_model_fsdp.bin")
FSDP_OPTIMIZER = ("optimizer_0", "optimizer.bin")
# fp16 mixed precision skips a step when its scaled gradients overflow; this many in a row is a real problem.
MAX_SKIPPED_FP16_STEPS = 20


class CheckpointWarning(UserWarning):
    """A checkpoint that cannot be resumed from (missing or unreadable files)."""


# --------------------------------------------------------------------------------------------
# Data


def encode_dataset(tokenizer, examples: list[dict], max_length: int | None, source=None):
    """A datasets.Dataset of `input_ids` and `labels` (assistant tokens only), truncated to max_length.

    Examples left without a trained token (e.g. a prompt longer than max_length) are dropped.
    """
    from datasets import Dataset

    ids, labels = [], []
    for i, ex in enumerate(examples):
        try:
            enc = encode_example(tokenizer, ex, max_length)
        except TemplateError as e:
            raise DataError(source or "data", str(e), line=i + 1) from None
        except (KeyError, TypeError) as e:
            raise DataError(source or "data", f"not a normalised example ({e})", line=i + 1) from None
        if enc["n_trained"] == 0:
            continue
        ids.append(enc["input_ids"])
        labels.append(enc["labels"])
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def build_collator(cfg, tokenizer):
    """The batch collator of train.batching (TRL's DataCollatorForLanguageModeling)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    mode = cfg.train.batching
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if mode in ("padding_free", "packing"):  # packed rows carry seq_lengths: position_ids restart at each example
        return DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)
    if mode in ("pad_longest", "group_by_length"):
        return DataCollatorForLanguageModeling(pad_token_id=pad)
    if mode == "pad_max":
        return DataCollatorForLanguageModeling(pad_token_id=pad, pad_to_multiple_of=cfg.train.max_length)
    raise ConfigError(f"train.batching: '{mode}' is not one of padding_free, packing, pad_longest, group_by_length, "
                      "pad_max")


# --------------------------------------------------------------------------------------------
# Trainer configuration


# --------------------------------------------------------------------------------------------
# Callbacks and the guarded trainer


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (process peak RSS)


def _metrics_callback_class():
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        """Appends every log to logs/training_metrics.csv as it comes (the main process only)."""

        def __init__(self, csv_path, resume_step: int | None = None):
            self.path = Path(csv_path)
            self._last = None  # (time, tokens) at the previous training log
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is None or not self.path.exists():
                self._rewrite([])
            else:  # drop rows logged after the checkpoint we resume from: they are trained again
                self._rewrite([r for r in read_metrics_rows(self.path) if _num(r["step"]) <= resume_step])

        def _rewrite(self, rows):
            import io

            buf = io.StringIO(newline="")
            w = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS)
            w.writeheader()
            w.writerows(rows)
            write_atomic(self.path, buf.getvalue())

        def on_train_begin(self, args, state, control, **kw):
            self._last = (time.perf_counter(), state.num_input_tokens_seen)

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            if "loss" not in logs and "eval_loss" not in logs:
                return  # the end-of-training summary log
            row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
            for k in ("loss", "eval_loss", "grad_norm"):
                row[k] = logs.get(k)
            row["learning_rate"] = logs.get("learning_rate")
            if "loss" in logs:
                now, tokens = time.perf_counter(), state.num_input_tokens_seen
                if self._last is not None and now > self._last[0]:
                    row["tokens_per_second"] = round((tokens - self._last[1]) / (now - self._last[0]), 1)
                self._last = (now, tokens)
            row["peak_memory_mb"] = round(_peak_memory_mb(), 1)
            with open(self.path, "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, fieldnames=METRIC_COLUMNS).writerow(
                    {k: ("" if v is None else v) for k, v in row.items()})

        def on_evaluate(self, args, state, control, **kw):
            # Evaluation runs outside the timed training steps: restart the tokens-per-second clock.
            self._last = (time.perf_counter(), state.num_input_tokens_seen)

    return MetricsCallback


class _StoppedBefore(Exception):
    """Resumed from a checkpoint saved when early stopping had already ended the training."""


def _early_stopping_class():
    from transformers import EarlyStoppingCallback

    class EarlyStopping(EarlyStoppingCallback):
        """transformers' early stopping; resumed from the checkpoint of the step it stopped at (its counter is
        restored with the trainer state), it refuses to train on (_fit then keeps the best checkpoint)."""

        def on_step_begin(self, args, state, control, **kw):
            if self.early_stopping_patience_counter >= self.early_stopping_patience:
                raise _StoppedBefore()

    return EarlyStopping


def _fit(trainer, resume) -> None:
    """trainer.train(), resuming from `resume`; a run that had stopped early gets its best adapter, untrained."""
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except _StoppedBefore:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        best = Path(trainer.args.output_dir) / Path(trainer.state.best_model_checkpoint).name
        set_peft_model_state_dict(trainer.model, load_file(str(best / "adapter_model.safetensors")))
        _close_bars(trainer)
        _print_main(f"{Path(resume).name} was saved when early stopping ended the training: not training on")
    except BaseException:  # an error or an interrupt: close the progress bar it leaves open
        _close_bars(trainer)
        raise


def _close_bars(trainer) -> None:
    for cb in trainer.callback_handler.callbacks:
        if getattr(cb, "training_bar", None) is not None:
            cb.training_bar.close()


def _guarded_trainer_class():
    import torch
    from trl import SFTTrainer

    class GuardedSFTTrainer(SFTTrainer):
        """SFTTrainer that stops on a non-finite loss or gradient before the optimizer step."""

        _bad_loss = None
        _skipped = 0
        phase = "train"  # or "eval": what an out-of-memory error interrupted (oom_doing)

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.phase = "train"
            loss = super().training_step(model, inputs, num_items_in_batch)
            bad = ~torch.isfinite(loss.detach())
            self._bad_loss = bad if self._bad_loss is None else (self._bad_loss | bad)
            if self.accelerator.sync_gradients:  # the last micro-batch before an optimizer step
                self._check(model)
            return loss

        def _check(self, model):
            grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
            norm = torch.stack(torch._foreach_norm(grads)).norm().float() if grads else torch.zeros(())
            flags = torch.stack([self._bad_loss.float().reshape(()).to(norm.device),
                                 (~torch.isfinite(norm)).float()])
            self._bad_loss = None
            if self.args.world_size > 1:
                import torch.distributed as dist

                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            bad_loss, bad_grad = bool(flags[0] > 0), bool(flags[1] > 0)
            if not (bad_loss or bad_grad):
                self._skipped = 0
                return
            if not bad_loss and self.args.fp16:
                self._skipped += 1  # fp16: the loss scaler skips this step and lowers its scale
                if self._skipped < MAX_SKIPPED_FP16_STEPS:
                    return
            step = self.state.global_step + 1
            what = "loss" if bad_loss else "gradient norm"
            folder = Path(self.args.output_dir)
            if self.is_world_process_zero():
                drop_checkpoints_from(folder, blow_up_start(self.state.log_history, step) - 1)
            raise TrainingError(non_finite_message(what, step, self.args, last_checkpoint(folder),
                                                   run=Path(self.args.output_dir).parent.name))

        def prediction_step(self, *args, **kwargs):
            self.phase = "eval"
            return super().prediction_step(*args, **kwargs)

        def _load_optimizer_and_scheduler(self, checkpoint):
            """Resume with the configured learning rate, also when it was changed since the checkpoint."""
            super()._load_optimizer_and_scheduler(checkpoint)
            if checkpoint is not None:
                _rescale_learning_rate(self.lr_scheduler, self.optimizer, self.args.learning_rate, checkpoint)

    return GuardedSFTTrainer


def _rescale_learning_rate(sched, optimizer, new: float, checkpoint) -> None:
    """Scale a resumed scheduler and optimizer to the learning rate `new` when the checkpoint's differs."""
    if not getattr(sched, "base_lrs", None):
        return
    old = sched.base_lrs[0]
    if not old or math.isclose(old, new, rel_tol=1e-9):
        return
    ratio = new / old
    sched.base_lrs = [lr * ratio for lr in sched.base_lrs]
    if getattr(sched, "_last_lr", None):
        sched._last_lr = [lr * ratio for lr in sched._last_lr]
    for group in optimizer.param_groups:
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio
    _print_main(f"learning rate changed since {Path(checkpoint).name}: {old:g} -> {new:g}")


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
    if not Path(folder).is_dir():
        return
    for p in Path(folder).iterdir():
        m = _CHECKPOINT.match(p.name)
        if p.is_dir() and m and int(m.group(1)) >= step:
            shutil.rmtree(p, ignore_errors=True)


def build_trainer(cfg, model, tokenizer, train_dataset, eval_dataset=None, output_dir="checkpoints",
                  resuming: bool = False, callbacks=()):
    """The guarded SFTTrainer of `cfg` for a LoRA model and encoded datasets (see encode_dataset)."""
    import torch

    args = sft_config(cfg, output_dir, has_eval=eval_dataset is not None and len(eval_dataset) > 0,
                      resuming=resuming)
    callbacks = list(callbacks)
    if cfg.train.early_stopping_patience is not None:
        callbacks.append(_early_stopping_class()(cfg.train.early_stopping_patience, cfg.train.early_stopping_threshold))
    optimizer = loraplus_optimizer(cfg, model, args) if cfg.lora.loraplus_lr_ratio is not None else None
    trainer = _guarded_trainer_class()(
        model=model,
        args=args,
        optimizers=(optimizer, None),  # None: the Trainer's own optimizer; the scheduler is always its own
        # padding_free and packing: TRL's own collator (it refuses another one)
        data_collator=None if args.padding_free else build_collator(cfg, tokenizer),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    # TRL casts a quantized model's adapters to bf16; keep them fp32, the precision the optimizer
    # updates in (autocast still runs the matmuls in 16 bits on a GPU).
    for p in trainer.model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return trainer


def loraplus_optimizer(cfg, model, args):
    """LoRA+ (lora.loraplus_lr_ratio): peft's create_loraplus_optimizer with the optimizer class and
    settings train.optim names (transformers' own mapping): A at the learning rate, B (and DoRA's
    magnitudes) at ratio x the learning rate. The Trainer's scheduler then scales every group alike,
    and a checkpoint's optimizer.pt restores its state as for any optimizer."""
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    return create_loraplus_optimizer(model=model, optimizer_cls=optimizer_cls, lr=args.learning_rate,
                                     loraplus_lr_ratio=cfg.lora.loraplus_lr_ratio,
                                     loraplus_weight_decay=args.weight_decay, **kwargs)


def non_finite_message(what: str, step: int, args, checkpoint, run: str = "RUN") -> str:
    kept = (f"the last good checkpoint (finite weights and losses), {checkpoint.name}, is kept"
            if checkpoint else "no good checkpoint was saved before it")
    lower = f"{args.learning_rate / 10:.3g}"
    how = (f"resume from it with a lower learning rate: `python -m lib train --run {run} --set "
           f"train.learning_rate={lower}` (notebook 03: LEARNING_RATE = {lower})" if checkpoint else
           f"train again with a lower learning rate: `python -m lib train --run {run} --retrain --set "
           f"train.learning_rate={lower}`")
    tips = [f"a lower train.learning_rate (now {args.learning_rate:g})",
            "more warmup (train.warmup_ratio)",
            f"gradient clipping train.max_grad_norm=1.0 or lower (now {args.max_grad_norm:g})"]
    if args.fp16:
        tips.append("train.precision=bf16 (on a GPU that has it) or fp32 instead of fp16")
    tips.append("checking the data for empty or garbled answers")
    return (f"training stopped at step {step}: the {what} is not finite (nan or inf); {kept}; {how}. "
            f"Other remedies: {', '.join(tips[1:])}.")


def oom_doing(trainer, cfg) -> str:
    """What training was doing when memory ran out: a training step or an evaluation, with its batch."""
    if trainer is None:
        return "loading the model"
    step, args = trainer.state.global_step, trainer.args
    if getattr(trainer, "phase", "train") == "eval":
        return f"evaluating at step {step} (eval batches of {args.per_device_eval_batch_size})"
    total = f" of {trainer.state.max_steps}" if trainer.state.max_steps else ""
    return (f"step {step + 1}{total} (micro-batches of {args.per_device_train_batch_size} sequences of up to "
            f"{cfg.train.max_length} tokens)")


def kept_checkpoint(folder: Path, run: str) -> str:
    """The sentence of an out-of-memory stop about the checkpoint kept (checked complete) and how to go on."""
    ck = last_checkpoint(folder)
    if ck is None:
        return "No checkpoint had been saved yet: rerunning starts training over."
    step = read_json(ck / "trainer_state.json").get("global_step")
    return (f"The last good checkpoint is kept: {ck} (step {step}); rerunning with smaller settings resumes from "
            f"it: `python -m lib train --run {run} --set key=value` (or notebook 03).")


# --------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None if it is complete."""
    state = path / "trainer_state.json"
    if not state.exists():
        return "trainer_state.json is missing"
    try:
        history = json.loads(state.read_text(encoding="utf-8")).get("log_history") or []
    except (ValueError, OSError, AttributeError):
        return "trainer_state.json is unreadable"
    for h in history:
        if any(isinstance(h.get(k), float) and not math.isfinite(h[k]) for k in ("loss", "grad_norm", "eval_loss")):
            return f"a non-finite loss or gradient norm was logged at step {h.get('step')}"
    if any((path / n).exists() for n in FSDP_WEIGHTS):
        return _fsdp_checkpoint_problem(path)
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
    for name in ("optimizer.pt", "scheduler.pt"):
        p = path / name
        if not p.exists() or p.stat().st_size == 0:
            return f"{name} is missing"
        if not _readable_torch_file(p):
            return f"{name} is truncated or unreadable"
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
    return None


def _readable_torch_file(path: Path) -> bool:
    """A torch.save file (a zip archive) whose members all read back with matching checksums."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False


def last_checkpoint(folder: Path, clean: bool = False) -> Path | None:
    """The newest complete checkpoint-N in `folder`; incomplete newer ones warned about (and removed if clean)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in folder.iterdir()
                    if p.is_dir() and (m := _CHECKPOINT.match(p.name))), reverse=True)
    for _, p in found:
        problem = checkpoint_problem(p)
        if problem is None:
            return p
        if clean:
            warnings.warn(f"skipping incomplete checkpoint {p.name} ({problem}); it is removed", CheckpointWarning,
                          stacklevel=2)
            shutil.rmtree(p, ignore_errors=True)
    return None


# --------------------------------------------------------------------------------------------
# Results


def read_metrics_rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _num(v):
    if v in (None, ""):
        return None
    try:
        return float(v)
    except ValueError:
        return None


def metrics_frame(run: str):
    """logs/training_metrics.csv as a pandas DataFrame."""
    import pandas as pd

    paths = run_paths(run)
    require(paths, "metrics_csv")
    return pd.read_csv(paths.metrics_csv)


def loss_figure(run: str):
    """Training and evaluation loss against the step (the loss panel of notebook 05, as a Figure)."""
    return panel_figure("loss", load_inputs(run))


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _data_hash(paths) -> str | None:
    try:
        return read_json(paths.data_report).get("data_hash")
    except (SFTError, AttributeError):
        return None


def _model_card(cfg, summary: dict, data_hash: str | None) -> str:
    import yaml

    base = cfg.model.name_or_path
    best = summary.get("best_eval_loss")
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base}" if base != "tiny" else "base_model: tiny (built offline by lib/tiny.py)",
        "tags: [qlora, sft, trl, lora]",
        "---",
        "",
        f"# LoRA adapter: {cfg.run}",
        "",
        f"Supervised fine-tuning of `{base}` with QLoRA ({cfg.quant.mode}, LoRA r={cfg.lora.r}, "
        f"alpha={cfg.lora.alpha}, targets {cfg.lora.target_modules}), loss on assistant tokens only.",
        "",
        f"- adapter: {adapter_variant(cfg)}" + _init_note(cfg),
        f"- data: `{cfg.data.path}` (format {cfg.data.format}), data hash `{data_hash}`",
        f"- steps: {summary.get('global_step')}, epochs: {summary.get('epoch')}, "
        f"tokens trained on: {summary.get('train_tokens')}",
        f"- eval loss: {summary.get('initial_eval_loss')} before, {summary.get('final_eval_loss')} after"
        + (f", best {best:.4f}" if isinstance(best, float) else ""),
        f"- trainable parameters: {summary.get('trainable_params')} of {summary.get('total_params')}",
        f"- adapter from step {summary.get('adapter_from_step')}"
        + (f" (stopped early at step {summary['stopped_at_step']})" if summary.get("stopped_early") else ""),
        f"- libraries: {', '.join(f'{k} {v}' for k, v in summary.get('versions', {}).items())}",
        "",
        "## Use",
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "from transformers import AutoTokenizer",
        "model = AutoPeftModelForCausalLM.from_pretrained('adapter')",
        "tokenizer = AutoTokenizer.from_pretrained('adapter')  # with the chat template used in training",
        "```",
        "",
        "## Configuration",
        "",
        "```yaml",
        yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _init_note(cfg) -> str:
    if cfg.lora.init in MUTATING_INITS:
        return (f"; saved converted to a plain LoRA of rank {2 * cfg.lora.r} on the original base (peft's "
                "path_initial_model_for_weight_conversion)")
    if cfg.lora.init == "loftq":
        return "; made for the 4-bit NF4 base: merge it into the dequantized 4-bit weights (lib.merge does)"
    return ""


def _summary(trainer, cfg, counts, runtime_s, resumed_from) -> dict:
    hist = trainer.state.log_history
    train_losses = [h["loss"] for h in hist if "loss" in h]
    evals = [(h.get("step"), h["eval_loss"]) for h in hist if "eval_loss" in h]
    eval_values = [v for _, v in evals]
    return {
        "run": cfg.run,
        "model": cfg.model.name_or_path,
        "final_loss": train_losses[-1] if train_losses else None,
        "initial_eval_loss": next((v for s, v in evals if s == 0), None),
        "final_eval_loss": eval_values[-1] if eval_values else None,
        "best_eval_loss": min(eval_values) if eval_values else None,
        "best_checkpoint": (Path(trainer.state.best_model_checkpoint).name
                            if trainer.state.best_model_checkpoint else None),
        **early_stop(trainer),
        "global_step": trainer.state.global_step,
        "epoch": round(trainer.state.epoch or 0.0, 4),
        "runtime_s": round(runtime_s, 2),
        "resumed_from": resumed_from,
        "train_tokens": int(trainer.state.num_input_tokens_seen),
        **counts,
        "world_size": trainer.args.world_size,
        "batching": cfg.train.batching,
        "adapter_variant": adapter_variant(cfg),
        "versions": _versions(),
    }


def early_stop(trainer) -> dict:
    """Whether early stopping ended the training (before max_steps), at which step, and the best step it kept
    (with load_best_model_at_end, the adapter saved is that step's)."""
    from transformers import EarlyStoppingCallback

    st = trainer.state
    cb = next((c for c in trainer.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback)), None)
    stopped = (cb is not None and cb.early_stopping_patience_counter >= cb.early_stopping_patience
               and st.global_step < st.max_steps)
    return {"stopped_early": stopped, "stopped_at_step": st.global_step if stopped else None,
            "best_step": st.best_global_step, "best_step_eval_loss": st.best_metric,
            "adapter_from_step": (st.best_global_step if trainer.args.load_best_model_at_end and st.best_global_step
                                  else st.global_step)}


# --------------------------------------------------------------------------------------------
# The stage


def is_finished(paths) -> bool:
    return (not is_pending(paths, "train") and paths.training_summary.exists()
            and (paths.adapter / "adapter_config.json").exists())


def _changed(old, new) -> list[str]:
    a, b = to_dict(old), to_dict(new)
    out = []
    for section, values in b.items():
        if isinstance(values, dict):
            out += [f"{section}.{k} {a[section].get(k)!r} -> {v!r}" for k, v in values.items()
                    if a[section].get(k) != v]
    return out


def _print_main(*args):
    if is_main_rank():
        print(*args, flush=True)


def run_train(run: str, overrides=(), retrain: bool = False, callbacks=()) -> dict:
    """Entry point of notebook 03 and `python -m lib train` (also under torchrun): returns the summary.

    Loads config.yaml, applies and saves `overrides`, needs the data of notebook 01, writes
    model/summary.json if notebook 02 has not run, trains (resuming from the last complete
    checkpoint), and saves the adapter, the logs and logs/training_summary.json. `callbacks`:
    extra transformers TrainerCallbacks. Holds the run's lock throughout (lib/rundir.py).
    """
    paths = run_paths(run)
    with run_lock(paths, "train"):
        return _run_train(paths, run, overrides, retrain, callbacks)


def _run_train(paths, run, overrides, retrain, callbacks) -> dict:
    from accelerate import PartialState

    require(paths, "config", "train_data", "eval_data")
    fingerprint(paths, "prepare")  # the prepared data are complete and as prepare wrote them
    old = load_config(paths.config)
    cfg = apply_overrides(old, overrides) if overrides else old
    state = PartialState()
    check_settings(cfg, paths)  # a bad setting stops here, before config.yaml is written
    if state.is_main_process and overrides:
        save_config(cfg, paths.config)

    if is_finished(paths) and not retrain:
        check_trained(paths)  # a damaged adapter or summary is said, not reported as finished
        changes = _changed(trained_config(paths), cfg)
        summary = read_json(paths.training_summary)
        msg = f"run '{run}' has already finished training ({paths.training_summary})"
        if changes:
            msg += (f"; the changed settings ({'; '.join(changes)}) are saved but not applied: "
                    "retrain=True (--retrain) trains again from scratch")
        else:
            msg += "; retrain=True (--retrain) trains again from scratch"
        _print_main(msg)
        return summary
    if state.is_main_process:
        begin(paths, "train")  # until the end, adapter/ and logs/ are not a finished training
    if retrain and state.is_main_process:
        for p in (paths.checkpoints, paths.adapter, paths.logs):
            shutil.rmtree(p, ignore_errors=True)
    state.wait_for_everyone()
    return _train(cfg, paths, callbacks, state)


def trained_config(paths):
    """The RunConfig the finished run was trained with (saved in the adapter), else config.yaml's."""
    trained = paths.adapter / "run_config.json"
    if trained.exists():
        try:
            return from_dict(read_json(trained), source=str(trained))
        except SFTError:
            pass
    return load_config(paths.config)


def _train(cfg, paths, extra_callbacks, state) -> dict:
    """Resume point, model with its adapter, datasets, trainer, fit, then the adapter and the logs saved."""
    resume, resume_step = _resume_point(paths, state)
    model, tokenizer, counts = _model_with_adapter(cfg, paths, state)
    train_ds, eval_ds = _datasets(cfg, paths, tokenizer)
    callbacks = list(extra_callbacks)
    if state.is_main_process:
        callbacks.insert(0, _metrics_callback_class()(paths.metrics_csv, resume_step))
    trainer = build_trainer(cfg, model, tokenizer, train_ds, eval_ds, paths.checkpoints,
                            resuming=resume is not None, callbacks=callbacks)
    started = time.perf_counter()
    with out_of_memory("training", cfg, doing=lambda: oom_doing(trainer, cfg),
                       kept=lambda: kept_checkpoint(paths.checkpoints, cfg.run)):
        _fit(trainer, resume)
    runtime = time.perf_counter() - started
    summary = _summary(trainer, cfg, counts, runtime, resume.name if resume else None)
    if trainer.is_fsdp_enabled:  # the adapter is sharded: every process takes part in gathering it
        _save_adapter(trainer, cfg, paths, summary, main=state.is_main_process)
    if state.is_main_process:
        if not trainer.is_fsdp_enabled:
            _save_adapter(trainer, cfg, paths, summary)
        _finish_train(cfg, paths, summary)
    state.wait_for_everyone()
    return summary


def _resume_point(paths, state) -> tuple[Path | None, int | None]:
    """The last complete checkpoint (incomplete ones removed by the main process) and its step."""
    with state.main_process_first():
        resume = last_checkpoint(paths.checkpoints, clean=state.is_main_process)
    if resume is None:
        return None, None
    step = read_json(resume / "trainer_state.json")["global_step"]
    _print_main(f"resuming from {resume.name} (step {step})")
    return resume, step


def _model_with_adapter(cfg, paths, state) -> tuple:
    """The 4-bit base with the run's LoRA (seeded), its parameter counts; model/summary.json if notebook
    02 has not written it; the initial adapter of a pissa/olora run (what the saved one converts against)."""
    from transformers import set_seed

    set_seed(cfg.train.seed)
    with out_of_memory("training", cfg, doing="loading the model", kept=lambda: kept_checkpoint(paths.checkpoints, cfg.run)):
        model, tokenizer = load_model_and_tokenizer(cfg, for_training=True)
    footprint = model.get_memory_footprint()
    set_seed(cfg.train.seed)  # the LoRA initialisation draws from it
    model = add_lora(model, cfg)
    if cfg.lora.init in MUTATING_INITS and state.is_main_process:
        model.save_pretrained(str(initial_adapter_dir(paths)))
    if state.is_main_process and not paths.model_summary.exists():
        write_summary(paths, cfg, model, footprint, load_model_config(cfg))
    return model, tokenizer, parameter_counts(model)


def _datasets(cfg, paths, tokenizer) -> tuple:
    """The prepared train and eval data, tokenized with their labels; eval None when there is none to use."""
    train_ds = encode_dataset(tokenizer, read_examples(paths.train_data), cfg.train.max_length, paths.train_data)
    eval_ds = encode_dataset(tokenizer, read_examples(paths.eval_data), cfg.train.max_length, paths.eval_data)
    if len(train_ds) == 0:
        raise DataError(paths.train_data, "no example has a trained token (check the data and train.max_length)")
    return train_ds, (eval_ds if len(eval_ds) > 0 and has_eval_data(cfg, paths) else None)


def _finish_train(cfg, paths, summary) -> None:
    """logs/training_summary.json, the stage's manifest, and the closing lines."""
    write_json(paths.training_summary, summary)
    finish(paths, "train", [paths.adapter.name + "/adapter_model.safetensors",
                            paths.adapter.name + "/adapter_config.json",
                            "logs/training_summary.json", "logs/training_metrics.csv"],
           {"prepare": fingerprint(paths, "prepare", verify=False)})
    _print_main(f"trained {summary['global_step']} steps in {summary['runtime_s']:.1f} s; eval loss "
                f"{summary['initial_eval_loss']} -> {summary['final_eval_loss']}; adapter in {paths.adapter}")
    if summary["stopped_early"]:
        _print_main(f"stopped early at step {summary['stopped_at_step']}: the eval loss did not improve for "
                    f"{cfg.train.early_stopping_patience} evaluation(s); the adapter is the best step's, "
                    f"{summary['best_step']} (eval loss {summary['best_step_eval_loss']:.4f})")


def initial_adapter_dir(paths) -> Path:
    """The adapter as initialised (pissa/olora), before any step: beside the checkpoints, not one of them."""
    return paths.checkpoints / "initial-adapter"


def _save_adapter(trainer, cfg, paths, summary, main: bool = True) -> None:
    """adapter/: peft weights, tokenizer (with its chat template), model card; written aside, then moved in.

    Under FSDP every process calls it: the adapter is gathered into a full state dict (peft's recipe),
    and the main process writes it."""
    tmp = paths.adapter.with_name(paths.adapter.name + ".tmp")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(tmp))  # collective; only the main process writes
    else:
        convert = {}
        if cfg.lora.init in MUTATING_INITS:  # a plain LoRA (rank 2r) of the original base, which every stage loads
            convert["path_initial_model_for_weight_conversion"] = str(initial_adapter_dir(paths))
        trainer.model.save_pretrained(str(tmp), **convert)
    if not main:
        return
    trainer.processing_class.save_pretrained(str(tmp))
    (tmp / "README.md").write_text(_model_card(cfg, summary, _data_hash(paths)), encoding="utf-8")
    write_json(tmp / "run_config.json", to_dict(cfg))
    replace(tmp, paths.adapter)


__all__ = ["encode_dataset", "build_collator", "sft_config", "build_trainer", "run_train", "last_checkpoint", "checkpoint_problem",
           "metrics_frame", "loss_figure", "CheckpointWarning", "IGNORE_INDEX"]

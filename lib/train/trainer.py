"""The trainer of stage 03: TRL's SFTTrainer guarded against non-finite values, with the metrics CSV writer and
early stopping as callbacks, the batch collator of train.batching, and a view of one collated batch.

    from lib.train.trainer import build_trainer, show_batch
    show_batch(cfg, tokenizer, train_ds)                  # one batch, the trained positions marked
    trainer = build_trainer(cfg, model, tokenizer, train_ds, eval_ds, "outputs/demo/checkpoints")
    trainer.train()

Only the train stage imports this module (it imports torch, transformers and TRL at its top).
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from lib.data.tokenization import IGNORE_INDEX
from lib.run.errors import ConfigError, TrainingError
from lib.run.formatting import table as styled_table
from lib.run.rundir import is_main_rank, write_atomic
from lib.run.stages import stage
from lib.run.trainer_args import sft_config
from lib.train.checkpoints import (
    blow_up_start,
    drop_checkpoints_from,
    last_checkpoint,
    past_the_end,
    rescale_learning_rate,
)
from lib.train.lmhead import compact_lm_head

# The scores of the answers sampled while training (lib/train/samples.py), one row a sampled step, as evaluate has them.
SAMPLE_COLUMNS = ["sample_stop_rate", "sample_question_rate", "sample_questions_per_answer", "sample_mean_words",
                  "sample_bleu", "sample_rouge_l", "sample_task_score"]
METRIC_COLUMNS = ["step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm",
                  "tokens_per_second", "peak_memory_mb", *SAMPLE_COLUMNS]
# fp16 mixed precision skips a step when its scaled gradients overflow; this many in a row is a real problem.
MAX_SKIPPED_FP16_STEPS = 20


def print_main(*args) -> None:
    """print() on the process that writes only, so that a run on several GPUs says each thing once."""
    if is_main_rank():
        print(*args, flush=True)


def build_collator(cfg, tokenizer):
    """The batch collator of train.batching (TRL's DataCollatorForLanguageModeling)."""
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
# One batch, as the model sees it


def _segments(ids: list[int], labels: list[int], starts: list[int], attended: list[int]):
    """(first, last, kind) runs of one row: kind is 'trained', 'prompt' or 'padding'; a run never spans
    two examples (`starts`: the positions where an example begins)."""
    kinds = ["padding" if not a else "trained" if lab != IGNORE_INDEX else "prompt" for lab, a in zip(labels, attended)]
    runs, first = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or kinds[i] != kinds[first] or i in starts:
            runs.append((first, i - 1, kinds[first]))
            first = i
    return runs


def batch_table(cfg, tokenizer, dataset, size: int = 2):
    """The first `size` examples of an encoded dataset, collated as train.batching batches them, as a table:
    one row per run of positions that are trained (the loss counts them), prompt or padding, decoded."""
    import pandas as pd

    batch = build_collator(cfg, tokenizer)([dataset[i] for i in range(min(size, len(dataset)))])
    out = []
    for r in range(batch["input_ids"].shape[0]):
        ids, labels = batch["input_ids"][r].tolist(), batch["labels"][r].tolist()
        pos = batch["position_ids"][r].tolist() if "position_ids" in batch else list(range(len(ids)))
        attended = batch["attention_mask"][r].tolist() if "attention_mask" in batch else [1] * len(ids)
        starts = [i for i, p in enumerate(pos) if p == 0]
        for first, last, kind in _segments(ids, labels, starts, attended):
            out.append({"row": r, "example": r + sum(s <= first for s in starts) - 1,
                        "positions": f"{first}-{last}", "trained": "yes" if kind == "trained" else kind,
                        "text": tokenizer.decode(ids[first:last + 1]).replace("\n", "⏎")})
    return pd.DataFrame(out)


def show_batch(cfg, tokenizer, dataset, size: int = 2):
    """batch_table for a notebook: the whole text shown, left-aligned, the trained runs highlighted (None
    without a dataset: a finished run builds none)."""
    if dataset is None:
        return None
    table = batch_table(cfg, tokenizer, dataset, size)
    trained = table["trained"] == "yes"
    return (styled_table(table, index=False)
            .apply(lambda col: ["background-color: #d4f4d4" if t else "" for t in trained], subset=["text"])
            .set_caption(f"{cfg.train.batching}: {int(trained.sum())} trained runs, "
                         f"{len(table)} runs of positions"))


# --------------------------------------------------------------------------------------------
# Callbacks


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (process peak RSS)


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
        self.append(row)

    def append(self, row: dict) -> None:
        """One row of the CSV (columns of METRIC_COLUMNS; the others left empty)."""
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=METRIC_COLUMNS).writerow(
                {k: ("" if v is None else v) for k, v in row.items()})

    def on_evaluate(self, args, state, control, **kw):
        # Evaluation runs outside the timed training steps: restart the tokens-per-second clock.
        self._last = (time.perf_counter(), state.num_input_tokens_seen)


class StoppedBefore(Exception):
    """Resumed from a checkpoint saved when early stopping had already ended the training."""


class EarlyStopping(EarlyStoppingCallback):
    """transformers' early stopping; resumed from the checkpoint of the step it stopped at (its counter is
    restored with the trainer state), it refuses to train on (GuardedSFTTrainer.train then keeps the best
    checkpoint)."""

    def on_step_begin(self, args, state, control, **kw):
        if self.early_stopping_patience_counter >= self.early_stopping_patience:
            raise StoppedBefore()


def early_stop(trainer) -> dict:
    """Whether early stopping ended the training (before max_steps), at which step, and the best step it kept
    (with load_best_model_at_end, the adapter saved is that step's)."""
    st = trainer.state
    cb = next((c for c in trainer.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback)), None)
    stopped = (cb is not None and cb.early_stopping_patience_counter >= cb.early_stopping_patience
               and st.global_step < st.max_steps)
    by_loss = trainer.args.metric_for_best_model in (None, "eval_loss", "loss")
    return {"stopped_early": stopped, "stopped_at_step": st.global_step if stopped else None,
            "best_step": st.best_global_step, "best_metric": trainer.args.metric_for_best_model,
            "best_step_value": st.best_metric, "best_step_eval_loss": st.best_metric if by_loss else None,
            "adapter_from_step": (st.best_global_step if trainer.args.load_best_model_at_end and st.best_global_step
                                  else st.global_step)}


# --------------------------------------------------------------------------------------------
# The guarded trainer


class GuardedSFTTrainer(SFTTrainer):
    """SFTTrainer that stops on a non-finite loss or gradient before the optimizer step, resumes with the
    configured learning rate, and closes its progress bar when training ends in an error."""

    _bad_loss = None
    _skipped = 0
    phase = "train"  # or "eval": what an out-of-memory error interrupted (oom_doing)

    def __repr__(self) -> str:
        a, evals = self.args, self.eval_dataset
        return (f"{type(self).__name__} (a trl.SFTTrainer) of {type(self.model).__name__}: "
                f"{len(self.train_dataset)} training rows, {len(evals) if evals is not None else 0} eval examples, "
                f"batches of {a.per_device_train_batch_size} x {a.gradient_accumulation_steps} accumulated, "
                f"learning rate {a.learning_rate:g}, max_steps {a.max_steps}, checkpoints in {a.output_dir}")

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Trainer.train; resumed from a checkpoint saved when early stopping had ended the training, the best
        checkpoint's adapter is loaded and nothing is trained."""
        resume = str(resume_from_checkpoint) if isinstance(resume_from_checkpoint, Path) else resume_from_checkpoint
        self._resumed_from = resume
        try:
            return super().train(resume, *args, **kwargs)
        except StoppedBefore:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            best = Path(self.args.output_dir) / Path(self.state.best_model_checkpoint).name
            set_peft_model_state_dict(self.model, load_file(str(best / "adapter_model.safetensors")))
            self._close_bars()
            print_main(f"{Path(resume).name} was saved when early stopping ended the training: not training on")
            return None
        except BaseException:  # an error or an interrupt: close the progress bar it leaves open
            self._close_bars()
            raise

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The next optimizer step's batches; none when a resumed checkpoint is at the schedule's last step
        already (Trainer would train one step more: it checks the step count only after a step). Here, not in
        the epoch loop, because that loop is private and changed within transformers 5 (5.0 has none)."""
        done, total = self.state.global_step, self.state.max_steps
        if done > total > 0:
            raise ConfigError(past_the_end(getattr(self, "_resumed_from", None), done, total))
        if done == total > 0:
            self.control.should_training_stop = True
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def _close_bars(self) -> None:
        for cb in self.callback_handler.callbacks:
            if getattr(cb, "training_bar", None) is not None:
                cb.training_bar.close()

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
        flags = torch.stack([self._bad_loss.float().reshape(()).to(norm.device), (~torch.isfinite(norm)).float()])
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
        folder = Path(self.args.output_dir)
        if self.is_world_process_zero():
            drop_checkpoints_from(folder, blow_up_start(self.state.log_history, step) - 1)
        raise TrainingError(non_finite_message("loss" if bad_loss else "gradient norm", step, self.args,
                                               last_checkpoint(folder), run=folder.parent.name))

    def prediction_step(self, *args, **kwargs):
        self.phase = "eval"
        return super().prediction_step(*args, **kwargs)

    # The eval split of a mix of sources, by source ({label: Dataset}; lib.data.sources): each one's loss is
    # logged beside eval_loss at every evaluation, as eval_loss_by_source ({label: loss}).
    eval_subsets: dict | None = None
    _by_source: dict | None = None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        if eval_dataset is None and metric_key_prefix == "eval" and self.eval_subsets:
            self._by_source = {}
            for name, ds in self.eval_subsets.items():
                out = self.evaluation_loop(self.get_eval_dataloader(ds), description=f"evaluation ({name})",
                                           prediction_loss_only=True, metric_key_prefix="eval")
                self._by_source[name] = out.metrics.get("eval_loss")
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def log(self, logs, *args, **kwargs):
        if "eval_loss" in logs and self._by_source:
            logs, self._by_source = {**logs, "eval_loss_by_source": self._by_source}, None
        return super().log(logs, *args, **kwargs)


def by_source(log_history: list[dict]) -> dict | None:
    """{source: [[step, eval loss], ...]} of a mix of sources' training log (None for one source)."""
    out: dict = {}
    for h in log_history:
        for name, loss in (h.get("eval_loss_by_source") or {}).items():
            out.setdefault(name, []).append([h.get("step"), loss])
    return out or None


def eval_subsets(eval_ds, examples: list[dict], kept: list[int]) -> dict | None:
    """The rows of the encoded eval split (`kept`: the example each row came from) by the source its example
    names (`metadata._source`), as datasets; None unless there are two sources or more."""
    rows: dict = {}
    for row, i in enumerate(kept):
        rows.setdefault((examples[i].get("metadata") or {}).get("_source"), []).append(row)
    if len(rows) < 2 or None in rows:
        return None
    return {name: eval_ds.select(idx) for name, idx in rows.items()}

    def _load_optimizer_and_scheduler(self, checkpoint):
        """Resume with the configured learning rate, also when it was changed since the checkpoint."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            old = rescale_learning_rate(self.lr_scheduler, self.optimizer, self.args.learning_rate)
            if old is not None:
                print_main(f"learning rate changed since {Path(checkpoint).name}: {old:g} -> "
                           f"{self.args.learning_rate:g}")


def with_assistant_masks(dataset):
    """`dataset` with an `assistant_masks` column (1 where a token is trained): TRL 1.0's packing keeps no labels
    column (the labels became input_ids, every token trained) but keeps this mask, which its collator applies."""
    if dataset is None or "labels" not in dataset.column_names or "assistant_masks" in dataset.column_names:
        return dataset
    return dataset.add_column("assistant_masks", [[int(t != IGNORE_INDEX) for t in labels] for labels in dataset["labels"]])


def build_trainer(cfg, model, tokenizer, train_dataset, eval_dataset=None, output_dir="checkpoints",
                  resuming: bool = False, callbacks=()) -> GuardedSFTTrainer:
    """The guarded SFTTrainer of `cfg` for a LoRA model and encoded datasets (see lib.train.training.encode_dataset)."""
    args = sft_config(cfg, output_dir, has_eval=eval_dataset is not None and len(eval_dataset) > 0,
                      resuming=resuming)
    callbacks = list(callbacks)
    if cfg.train.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(cfg.train.early_stopping_patience, cfg.train.early_stopping_threshold))
    optimizer = loraplus_optimizer(cfg, model, args) if cfg.lora.loraplus_lr_ratio is not None else None
    if cfg.train.batching == "packing":  # TRL 1.0 packs input_ids and assistant_masks only: our labels as a mask too
        train_dataset, eval_dataset = (with_assistant_masks(d) for d in (train_dataset, eval_dataset))
    trainer = GuardedSFTTrainer(
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
    if trainer.args.device.type == "cpu":  # TRL's head projects every position off-GPU: only the trained ones
        model = trainer.model
        compact_lm_head(model.get_base_model() if hasattr(model, "get_base_model") else model)
    return trainer


def loraplus_optimizer(cfg, model, args):
    """LoRA+ (lora.loraplus_lr_ratio): peft's create_loraplus_optimizer with the optimizer class and
    settings train.optim names (transformers' own mapping): A at the learning rate, B (and DoRA's
    magnitudes) at ratio x the learning rate. The Trainer's scheduler then scales every group alike,
    and a checkpoint's optimizer.pt restores its state as for any optimizer."""
    from peft.optimizers import create_loraplus_optimizer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    return create_loraplus_optimizer(model=model, optimizer_cls=optimizer_cls, lr=args.learning_rate,
                                     loraplus_lr_ratio=cfg.lora.loraplus_lr_ratio,
                                     loraplus_weight_decay=args.weight_decay, **kwargs)


def non_finite_message(what: str, step: int, args, checkpoint, run: str = "RUN") -> str:
    """The TrainingError of a non-finite loss or gradient: the checkpoint kept and how to go on."""
    kept = (f"the last good checkpoint (finite weights and losses), {checkpoint.name}, is kept"
            if checkpoint else "no good checkpoint was saved before it")
    lower = f"{args.learning_rate / 10:.3g}"
    how = (f"resume from it with a lower learning rate: TRAIN_LEARNING_RATE = {lower} and "
           f"{stage('train').rerun(run, f' --set train.learning_rate={lower}')}" if checkpoint else
           f"train again with a lower learning rate: RETRAIN = True, TRAIN_LEARNING_RATE = {lower} and "
           f"{stage('train').rerun(run, f' --retrain --set train.learning_rate={lower}')}")
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

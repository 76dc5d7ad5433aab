"""03: supervised fine-tuning with TRL's SFTTrainer, as steps: notebook 03 runs them one cell each, and
run_train wires the same steps for `python -m lib train` (also under torchrun: one process per GPU).

    python -m lib train --run demo [--set train.learning_rate=1e-4 ...] [--retrain]
    torchrun --nproc_per_node 2 -m lib -- train --run demo   # DDP: one process per GPU (the `--`
                                                             # stops torchrun reading --run as its --run-path)

    from lib.train.training import attach_lora, build_datasets, build_sft_trainer, load_model, plan_training, save_adapter, train
    plan = plan_training("demo", {"train.learning_rate": 1e-4})   # settings saved, inputs checked, resume point
    model, tokenizer = load_model(plan)                           # the 4-bit base
    model = attach_lora(model, plan)                              # its LoRA adapters (seeded)
    train_ds, eval_ds = build_datasets(plan, tokenizer)           # tokenized, labels on the answers only
    trainer = build_sft_trainer(plan, model, tokenizer, train_ds, eval_ds)
    train(trainer, plan)                                          # trainer.train(resume_from_checkpoint=plan.resume)
    summary = save_adapter(trainer, plan)                         # adapter/, logs/training_summary.json

Examples are tokenized here with lib.data.tokenization.encode_example (labels are -100 outside the
assistant answers, whose end-of-turn tokens are trained) and handed to SFTTrainer as `input_ids`
and `labels` columns, so TRL keeps our labels. Batching (train.batching): padding_free (the
sequences of a batch concatenated, with position_ids restarting at each one: no padding and no
attention across examples), packing, pad_longest, group_by_length, or pad_max (lib/train/trainer.py).

Rerunning continues from the last complete checkpoint (an incomplete one is removed with a
warning), with the settings that shape it (lib.run.context.SHAPING, recorded in checkpoints/settings.json):
another value is refused before config.yaml is saved, as it is against a finished run's adapter. A
checkpoint at the schedule's last step ends the training. A finished run is left alone unless retrain=True (plan.finished: every step after
plan_training then does nothing). A non-finite loss or gradient stops training with a TrainingError
before the optimizer applies it, so every checkpoint stays good. Each step that writes holds the
run's lock (lib/run/rundir.py); run_train holds it throughout.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from lib.data.readers import read_examples
from lib.data.templates import TemplateError
from lib.data.tokenization import encode_example
from lib.model.configure import parameter_counts, with_lora, write_summary
from lib.model.loading import MUTATING_INITS, adapter_variant, load_model_and_tokenizer
from lib.model.oom import out_of_memory
from lib.run.config import apply_overrides, flag, from_dict, load_config, save_config, to_dict
from lib.run.context import mismatch, shaping_settings
from lib.run.errors import ConfigError, DataError, SFTError
from lib.run.formatting import num
from lib.run.paths import RunPaths, require, run_paths
from lib.run.realmodel import load_model_config
from lib.run.rundir import (
    begin,
    check_trained,
    fingerprint,
    finish,
    is_pending,
    read_json,
    replace,
    run_lock,
    write_json,
)
from lib.run.settings import RunConfig
from lib.run.trainer_args import check_settings, has_eval_data
from lib.train.checkpoints import (
    checkpoint_step,
    kept_checkpoint,
    last_checkpoint,
    record_settings,
    resume_problem,
)
from lib.train.modelcard import model_card
from lib.train.nodes import peers_lost_in_one_line, world_size
from lib.train.progress import LiveProgress
from lib.train.samples import SamplesCallback
from lib.train.trainer import MetricsCallback, build_trainer, early_stop, oom_doing, print_main


@dataclass
class TrainingPlan:
    """What one training of a run works from, filled in step by step."""

    cfg: RunConfig
    paths: RunPaths
    state: object  # accelerate's PartialState: which process this is, and the barrier between processes
    resume: Path | None = None  # the checkpoint training continues from
    resume_step: int | None = None
    finished: dict | None = None  # the summary of a run that had finished already: the steps do nothing
    footprint: int = 0  # bytes of the loaded base model's weights (load_model)
    counts: dict = field(default_factory=dict)  # trainable and total parameters (attach_lora)
    runtime_s: float = 0.0  # seconds trainer.train took (train)
    eval_subsets: dict | None = None  # the eval split by source, for a mix of sources (build_datasets)

    @property
    def main(self) -> bool:
        return self.state.is_main_process


# --------------------------------------------------------------------------------------------
# The steps


def plan_training(run: str, overrides=(), retrain: bool = False) -> TrainingPlan:
    """Check the inputs (the data of notebook 01) and settings, save `overrides` in config.yaml, and find where
    training starts: a finished run is said and left alone unless `retrain` (which deletes its checkpoints,
    adapter and logs); otherwise the run is marked as being trained and the last complete checkpoint found."""
    from accelerate import PartialState

    retrain = flag("retrain (RETRAIN in notebook 03)", retrain)  # only a checked True deletes a training
    paths = run_paths(run)
    with run_lock(paths, "train"):
        require(paths, "config", "train_data", "eval_data")
        fingerprint(paths, "prepare")  # the prepared data are complete and as prepare wrote them
        old = load_config(paths.config)
        cfg = apply_overrides(old, overrides) if overrides else old
        state = PartialState()
        check_settings(cfg, paths)  # a bad setting stops here, before config.yaml is written
        finished = is_finished(paths) and not retrain
        problem = None if retrain else adapter_problem(paths, cfg) if finished else resume_problem(paths, cfg)
        if problem:  # a setting that shapes the adapter or checkpoint: refused, config.yaml left as it was
            raise ConfigError(problem)
        if state.is_main_process and overrides:
            save_config(cfg, paths.config)
        if finished:
            return TrainingPlan(cfg, paths, state, finished=_finished_summary(paths, cfg))
        if state.is_main_process:
            begin(paths, "train")  # until the end, adapter/ and logs/ are not a finished training
        if retrain and state.is_main_process:
            for p in (paths.checkpoints, paths.adapter, paths.logs):
                shutil.rmtree(p, ignore_errors=True)
        state.wait_for_everyone()
        with state.main_process_first():  # the main process removes incomplete checkpoints
            resume = last_checkpoint(paths.checkpoints, clean=state.is_main_process)
        if resume is None and state.is_main_process:
            record_settings(paths, cfg)  # what the checkpoints of this training are resumed with
    step = checkpoint_step(resume) if resume else None
    if resume:
        print_main(f"resuming from {resume.name} (step {step})")
    return TrainingPlan(cfg, paths, state, resume, step)


def load_model(plan: TrainingPlan) -> tuple:
    """The base model of the run, quantized as configured (4-bit NF4 for QLoRA) and prepared for training,
    with its tokenizer (chat template set); (None, None) when the run has finished."""
    from transformers import set_seed

    if plan.finished:
        return None, None
    cfg = plan.cfg
    set_seed(cfg.train.seed)
    with out_of_memory("training", cfg, doing="loading the model",
                       kept=lambda: kept_checkpoint(plan.paths.checkpoints, cfg.run)):
        model, tokenizer = load_model_and_tokenizer(cfg, for_training=True)
    plan.footprint = model.get_memory_footprint()
    print_main(f"{cfg.model.name_or_path} loaded ({cfg.quant.mode}): {plan.footprint / 2**20:,.1f} MiB of weights")
    return model, tokenizer


def attach_lora(model, plan: TrainingPlan):
    """The model with the run's LoRA adapters (seeded); plan.counts its trainable and total parameters.
    Writes model/summary.json if notebook 02 has not, and the initial adapter of a pissa/olora run (what the
    saved adapter is converted against)."""
    if plan.finished:
        return None
    cfg, paths = plan.cfg, plan.paths
    model = with_lora(model, cfg)
    with run_lock(paths, "train"):
        if cfg.lora.init in MUTATING_INITS and plan.main:
            model.save_pretrained(str(paths.initial_adapter))
        if plan.main and not paths.model_summary.exists():
            write_summary(paths, cfg, model, plan.footprint, load_model_config(cfg))
    plan.counts = parameter_counts(model)
    return model


def encode_dataset(tokenizer, examples: list[dict], max_length: int | None, source=None, kept=None):
    """A datasets.Dataset of `input_ids` and `labels` (assistant tokens only), truncated to max_length.

    Examples left without a trained token (a prompt past max_length) are dropped; `kept` gets each row's example.
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
        if kept is not None:
            kept.append(i)
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def build_datasets(plan: TrainingPlan, tokenizer) -> tuple:
    """The prepared train and eval data, tokenized with their labels; eval None when there is none to use
    ((None, None) when the run has finished)."""
    from lib.train.trainer import eval_subsets

    if plan.finished:
        return None, None
    cfg, paths = plan.cfg, plan.paths
    train_ds = encode_dataset(tokenizer, read_examples(paths.train_data), cfg.train.max_length, paths.train_data)
    evals, kept = read_examples(paths.eval_data), []
    eval_ds = encode_dataset(tokenizer, evals, cfg.train.max_length, paths.eval_data, kept)
    plan.eval_subsets = eval_subsets(eval_ds, evals, kept)  # a mix of sources: the eval loss of each
    if len(train_ds) == 0:
        raise DataError(paths.train_data, "no example has a trained token (check the data and train.max_length)")
    return train_ds, (eval_ds if len(eval_ds) > 0 and has_eval_data(cfg, paths) else None)


def build_sft_trainer(plan: TrainingPlan, model, tokenizer, train_ds, eval_ds=None, callbacks=()):
    """The run's SFTTrainer (lib.train.trainer.GuardedSFTTrainer): checkpoints in checkpoints/, every log appended
    to logs/training_metrics.csv and the answers to a few eval prompts to logs/samples.jsonl (lib/train/samples.py; the
    rows after the resumed checkpoint dropped); `callbacks`: extra
    transformers TrainerCallbacks. None when the run has finished."""
    if plan.finished:
        return None
    callbacks = list(callbacks)
    if plan.cfg.train.best_metric == "task_score" and world_size() > 1:
        raise ConfigError("train.best_metric=task_score: answers are sampled on one process only, so it cannot "
                          "choose the best checkpoint of a training over several; keep train.best_metric=eval_loss")
    if plan.main:
        metrics = MetricsCallback(plan.paths.metrics_csv, plan.resume_step)
        # answers first: the metrics callback's tokens-per-second clock restarts after them
        callbacks[:0] = [SamplesCallback(plan.cfg, tokenizer, plan.paths, plan.resume_step, metrics), metrics]
    trainer = build_trainer(plan.cfg, model, tokenizer, train_ds, eval_ds, plan.paths.checkpoints,
                            resuming=plan.resume is not None, callbacks=callbacks)
    trainer.eval_subsets = plan.eval_subsets if trainer.eval_dataset is not None else None
    from transformers.trainer import DEFAULT_PROGRESS_CALLBACK

    if plan.main and DEFAULT_PROGRESS_CALLBACK.__name__ == "NotebookProgressCallback":  # inside a notebook
        trainer.remove_callback(DEFAULT_PROGRESS_CALLBACK)
        trainer.add_callback(LiveProgress())  # the loss at every log, updated in place; the answers table under it
    return trainer


def train(trainer, plan: TrainingPlan):
    """trainer.train(resume_from_checkpoint=plan.resume) under the run's lock; out of memory, an
    OutOfMemoryError naming the step, the settings to change and the checkpoint kept. Returns the trainer's
    TrainOutput (None when the run has finished, or when early stopping had ended it at the checkpoint)."""
    if plan.finished:
        return None
    cfg = plan.cfg
    started = time.perf_counter()
    with run_lock(plan.paths, "train"), out_of_memory(
            "training", cfg, doing=lambda: oom_doing(trainer, cfg),
            kept=lambda: kept_checkpoint(plan.paths.checkpoints, cfg.run)), \
            peers_lost_in_one_line(plan.paths.checkpoints, lambda: trainer.state.global_step):
        output = trainer.train(resume_from_checkpoint=plan.resume)
    plan.runtime_s = time.perf_counter() - started
    return output


def save_adapter(trainer, plan: TrainingPlan) -> dict:
    """adapter/ (peft weights, tokenizer with its chat template, model card, run_config.json; written aside,
    then moved in), logs/training_summary.json and the stage's manifest; returns the summary (the finished
    run's when there was nothing to do). Under FSDP every process takes part in gathering the adapter."""
    if plan.finished:
        return plan.finished
    summary = training_summary(trainer, plan)
    with run_lock(plan.paths, "train"):
        if trainer.is_fsdp_enabled:  # the adapter is sharded: every process takes part in gathering it
            _write_adapter(trainer, plan, summary, main=plan.main)
        if plan.main:
            if not trainer.is_fsdp_enabled:
                _write_adapter(trainer, plan, summary)
            _finish(plan, summary)
    plan.state.wait_for_everyone()
    return summary


def training_summary(trainer, plan: TrainingPlan) -> dict:
    """logs/training_summary.json: losses, steps, tokens, runtime, parameters, early stopping, versions."""
    from lib.train.trainer import by_source

    cfg, hist = plan.cfg, trainer.state.log_history
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
        "eval_loss_by_source": by_source(hist),
        "best_checkpoint": (Path(trainer.state.best_model_checkpoint).name
                            if trainer.state.best_model_checkpoint else None),
        **early_stop(trainer),
        "global_step": trainer.state.global_step,
        "epoch": round(trainer.state.epoch or 0.0, 4),
        "runtime_s": round(plan.runtime_s, 2),
        "sample_seconds": round(sum(getattr(c, "seconds", 0.0) for c in trainer.callback_handler.callbacks
                                    if isinstance(c, SamplesCallback)), 2),
        "resumed_from": plan.resume.name if plan.resume else None,
        "train_tokens": int(trainer.state.num_input_tokens_seen),
        **plan.counts,
        "world_size": trainer.args.world_size,
        "batching": cfg.train.batching,
        "adapter_variant": adapter_variant(cfg),
        "versions": _versions(),
    }


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _write_adapter(trainer, plan: TrainingPlan, summary: dict, main: bool = True) -> None:
    cfg, paths = plan.cfg, plan.paths
    tmp = paths.adapter.with_name(paths.adapter.name + ".tmp")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(tmp))  # collective; only the main process writes
    else:
        convert = {}
        if cfg.lora.init in MUTATING_INITS:  # a plain LoRA (rank 2r) of the original base, which every stage loads
            convert["path_initial_model_for_weight_conversion"] = str(paths.initial_adapter)
        trainer.model.save_pretrained(str(tmp), **convert)
    if not main:
        return
    trainer.processing_class.save_pretrained(str(tmp))
    (tmp / "README.md").write_text(model_card(cfg, paths, training=summary), encoding="utf-8")
    write_json(tmp / "run_config.json", to_dict(cfg))
    replace(tmp, paths.adapter)


ADAPTER_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                           "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "run_config.json")


def _finish(plan: TrainingPlan, summary: dict) -> None:
    """logs/training_summary.json, the stage's manifest, and the closing lines."""
    cfg, paths = plan.cfg, plan.paths
    write_json(paths.training_summary, summary)
    samples = ["logs/samples.jsonl"] if paths.samples.exists() else []
    # the tokenizer and chat template saved with the adapter: what every later stage renders prompts with
    rendering = [f"{paths.adapter.name}/{n}" for n in ADAPTER_TOKENIZER_FILES if (paths.adapter / n).is_file()]
    finish(paths, "train", [paths.adapter.name + "/adapter_model.safetensors",
                            paths.adapter.name + "/adapter_config.json", *rendering,
                            "logs/training_summary.json", "logs/training_metrics.csv", *samples],
           {"prepare": fingerprint(paths, "prepare", verify=False)})
    print_main(f"trained {summary['global_step']:,} steps in {summary['runtime_s']:.1f} s; eval loss "
               f"{num(summary['initial_eval_loss'])} -> {num(summary['final_eval_loss'])}; adapter in {paths.adapter}")
    if summary["stopped_early"]:
        what = "the eval loss" if cfg.train.best_metric == "eval_loss" else "the sampled answers' task score"
        print_main(f"stopped early at step {summary['stopped_at_step']}: {what} did not improve for "
                   f"{cfg.train.early_stopping_patience} evaluation(s); the adapter is the best step's, "
                   f"{summary['best_step']} ({cfg.train.best_metric} {summary['best_step_value']:.4f})")


# --------------------------------------------------------------------------------------------
# A finished run


def is_finished(paths) -> bool:
    return (not is_pending(paths, "train") and paths.training_summary.exists()
            and (paths.adapter / "adapter_config.json").exists())


def trained_config(paths):
    """The RunConfig the finished run was trained with (saved in the adapter), else config.yaml's."""
    trained = paths.adapter / "run_config.json"
    if trained.exists():
        try:
            return from_dict(read_json(trained), source=str(trained))
        except SFTError:
            pass
    return load_config(paths.config)


def adapter_problem(paths, cfg) -> str | None:
    """Why `cfg` does not fit the finished run's adapter (a setting that shapes it differs), or None."""
    return mismatch(shaping_settings(trained_config(paths)), cfg, "the adapter")


def _changed(old, new) -> list[str]:
    a, b = to_dict(old), to_dict(new)
    out = []
    for section, values in b.items():
        if isinstance(values, dict):
            out += [f"{section}.{k} {a[section].get(k)!r} -> {v!r}" for k, v in values.items()
                    if a[section].get(k) != v]
    return out


def _finished_summary(paths, cfg) -> dict:
    """The summary of a finished run, said with the settings changed since (saved, not applied)."""
    check_trained(paths)  # a damaged adapter or summary is said, not reported as finished
    changes = _changed(trained_config(paths), cfg)
    msg = f"run '{cfg.run}' has already finished training ({paths.training_summary})"
    if changes:
        msg += (f"; the changed settings ({'; '.join(changes)}) are saved but not applied: "
                "retrain=True (--retrain) trains again from scratch")
    else:
        msg += "; retrain=True (--retrain) trains again from scratch"
    print_main(msg)
    return read_json(paths.training_summary)


# --------------------------------------------------------------------------------------------
# The stage as one call, and its results


def run_train(run: str, overrides=(), retrain: bool = False, callbacks=()) -> dict:
    """Entry point of `python -m lib train` (also under torchrun): the steps above, in order; returns the summary.

    Holds the run's lock throughout (lib/run/rundir.py); `callbacks`: extra transformers TrainerCallbacks."""
    with run_lock(run_paths(run), "train"):
        plan = plan_training(run, overrides, retrain)
        if plan.finished:
            return plan.finished
        model, tokenizer = load_model(plan)
        model = attach_lora(model, plan)
        train_ds, eval_ds = build_datasets(plan, tokenizer)
        trainer = build_sft_trainer(plan, model, tokenizer, train_ds, eval_ds, callbacks)
        train(trainer, plan)
        return save_adapter(trainer, plan)









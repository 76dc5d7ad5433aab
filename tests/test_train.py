"""03: training the tiny model in real 4-bit NF4 on the CPU with TRL's SFTTrainer: batching,
the trainer configuration, learning, logs, resuming, the non-finite guard, torchrun (DDP)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from lib.run.config import make_config
from lib.run.errors import ConfigError, MissingStageError, TrainingError
from lib.run.paths import REPO_ROOT, run_paths


def _adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _metrics(paths):
    with open(paths.metrics_csv, newline="") as f:
        return list(csv.DictReader(f))


def _fresh_copy(prepared_run, name):
    """A copy of the prepared run without anything a training left in it."""
    from conftest import copy_run

    run = copy_run(prepared_run, name)
    paths = run_paths(run)
    for p in (paths.checkpoints, paths.adapter, paths.logs, paths.model_summary.parent):
        shutil.rmtree(p, ignore_errors=True)
    return run


# ------------------------------------------------------------------------------ batching


@pytest.fixture(scope="module")
def lora_model(session_outputs):
    """The tiny 4-bit model with LoRA adapters whose B matrices are random (so they matter)."""
    from conftest import tiny_lora_model

    cfg = make_config("tiny")
    model, tok = tiny_lora_model(cfg)
    model.eval()
    return cfg, model, tok


@pytest.fixture(scope="module")
def some_examples():
    from lib.data.examples import prepare_examples

    prepared = prepare_examples(str(REPO_ROOT / "data" / "examples" / "socratic_dialogues.json"), eval_fraction=0.0)
    return prepared.train[:6]


def _loss(model, batch):
    import torch

    with torch.no_grad():  # as in training: no cache, so that packed sequences are detected
        return model(**batch, use_cache=False).loss.item()


def test_padding_free_batch_has_the_loss_of_padded_batches(lora_model, some_examples):
    import torch

    from lib.run.config import apply_overrides
    from lib.train.trainer import build_collator
    from lib.train.training import encode_dataset

    cfg, model, tok = lora_model
    ds = encode_dataset(tok, some_examples, max_length=cfg.train.max_length)
    rows = [ds[i] for i in range(len(ds))]
    lengths = [len(r["input_ids"]) for r in rows]
    assert len(set(lengths)) > 1, "examples of different lengths, so that padding happens"

    padded = build_collator(apply_overrides(cfg, {"train.batching": "pad_longest"}), tok)(rows)
    assert padded["input_ids"].shape == (len(rows), max(lengths)) and (padded["attention_mask"] == 0).any()
    flat = build_collator(cfg, tok)(rows)  # padding_free, the default
    assert flat["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in flat
    full = build_collator(apply_overrides(cfg, {"train.batching": "pad_max"}), tok)(rows)
    assert full["input_ids"].shape == (len(rows), cfg.train.max_length)

    # Ground truth: one example at a time, total NLL over total trained tokens.
    nll = tokens = 0.0
    for r in rows:
        one = build_collator(apply_overrides(cfg, {"train.batching": "pad_longest"}), tok)([r])
        n = sum(1 for x in r["labels"][1:] if x != -100)
        nll += _loss(model, one) * n
        tokens += n
    truth = nll / tokens
    assert abs(_loss(model, padded) - truth) < 1e-4
    assert abs(_loss(model, full) - truth) < 1e-4
    assert abs(_loss(model, flat) - truth) < 1e-4
    # Without the restarting position ids the examples would attend to each other: a visible difference.
    leaky = {"input_ids": flat["input_ids"], "labels": flat["labels"],
             "position_ids": torch.arange(sum(lengths))[None]}
    assert abs(_loss(model, leaky) - truth) > 1e-3


def test_encode_dataset_drops_examples_without_trained_tokens(lora_model):
    from lib.train.training import encode_dataset

    _, _, tok = lora_model
    long_prompt = {"messages": [{"role": "user", "content": "why " * 300}, {"role": "assistant", "content": "Why?"}]}
    ok = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Why?"}]}
    ds = encode_dataset(tok, [long_prompt, ok], max_length=64)
    assert len(ds) == 1 and ds.column_names == ["input_ids", "labels"]


@pytest.mark.parametrize("batching", ["padding_free", "pad_longest"])
def test_the_batch_view_marks_exactly_the_trained_positions(lora_model, some_examples, batching):
    """show_batch's table (notebook 03): its trained runs are the positions whose label is not -100, in
    each example of the collated batch, and its text is the batch's, decoded run by run."""
    from lib.run.config import apply_overrides
    from lib.train.trainer import batch_table, build_collator
    from lib.train.training import encode_dataset

    cfg, _, tok = lora_model
    cfg = apply_overrides(cfg, {"train.batching": batching})
    ds = encode_dataset(tok, some_examples, max_length=cfg.train.max_length)
    batch = build_collator(cfg, tok)([ds[0], ds[1]])
    table = batch_table(cfg, tok, ds, size=2)
    assert sorted(set(table["example"])) == [0, 1] and set(table["trained"]) <= {"yes", "prompt", "padding"}
    for r in range(batch["input_ids"].shape[0]):
        trained = set()
        for span in table[(table["row"] == r) & (table["trained"] == "yes")]["positions"]:
            first, last = map(int, span.split("-"))
            trained |= set(range(first, last + 1))
        assert trained == {i for i, lab in enumerate(batch["labels"][r].tolist()) if lab != -100}
        text = "".join(table[table["row"] == r]["text"])
        assert text == tok.decode(batch["input_ids"][r].tolist()).replace("\n", "⏎")


def test_the_steps_of_a_finished_run_do_nothing(trained_run, capsys):
    """Notebook 03 rerun on a finished run: the plan says so and every step returns at once, writing nothing."""
    from lib.train.training import (
        attach_lora,
        build_datasets,
        build_sft_trainer,
        load_model,
        plan_training,
        save_adapter,
        train,
    )

    paths = run_paths(trained_run)
    before = {p: p.stat().st_mtime_ns for p in paths.root.rglob("*") if p.is_file()}
    plan = plan_training(trained_run)
    assert "already finished training" in capsys.readouterr().out
    model, tokenizer = load_model(plan)
    assert (model, tokenizer) == (None, None) and attach_lora(model, plan) is None
    assert build_datasets(plan, tokenizer) == (None, None)
    trainer = build_sft_trainer(plan, model, tokenizer, None, None)
    assert trainer is None and train(trainer, plan) is None
    assert save_adapter(trainer, plan) == json.loads(paths.training_summary.read_text()) == plan.finished
    assert {p: p.stat().st_mtime_ns for p in paths.root.rglob("*") if p.is_file()} == before


# ------------------------------------------------------------------------------ trainer configuration


@pytest.mark.parametrize("on", [True, False])
def test_activation_checkpointing_reaches_the_installed_transformers_under_its_own_name(tmp_path, on):
    """transformers 5.2x names it activation_checkpointing, 5.0-5.15 (Colab's) gradient_checkpointing: the
    SFTConfig of either gets the run's setting (the other name is refused by TrainingArguments)."""
    from lib.run.trainer_args import checkpointing_kwargs, sft_config

    a = sft_config(make_config("tiny", overrides={"model.gradient_checkpointing": on}), tmp_path)
    key = next(iter(checkpointing_kwargs(on)))
    assert key in {"activation_checkpointing", "gradient_checkpointing"}
    assert getattr(a, key) is on and getattr(a, f"{key}_kwargs") == ({"use_reentrant": False} if on else None)


def test_sft_config_follows_the_run_configuration(tmp_path):
    from lib.run.trainer_args import sft_config

    cfg = make_config("tiny", overrides={
        "train.num_train_epochs": 5, "train.learning_rate": 1e-4, "train.lr_scheduler_type": "cosine_with_restarts",
        "train.warmup_ratio": 0.1, "train.weight_decay": 0.01, "train.per_device_train_batch_size": 3,
        "train.gradient_accumulation_steps": 2, "train.eval_steps": 7, "train.save_steps": 14,
        "train.save_total_limit": 4, "train.load_best_model_at_end": True, "train.seed": 7,
        "train.batching": "group_by_length", "train.num_cycles": 3})
    a = sft_config(cfg, tmp_path / "checkpoints")
    assert (a.num_train_epochs, a.max_steps, a.learning_rate) == (5, -1, 1e-4)
    assert str(a.lr_scheduler_type.value if hasattr(a.lr_scheduler_type, "value") else a.lr_scheduler_type) \
        == "cosine_with_restarts"
    assert (a.warmup_steps, a.weight_decay, a.per_device_train_batch_size, a.gradient_accumulation_steps) \
        == (0.1, 0.01, 3, 2)
    assert (a.eval_steps, a.save_steps, a.save_total_limit, a.seed) == (7, 14, 4, 7)
    assert a.load_best_model_at_end and a.metric_for_best_model == "eval_loss" and not a.greater_is_better
    assert a.report_to in ("none", [], ["none"]) and not a.bf16 and not a.fp16 and a.use_cpu
    assert not a.gradient_checkpointing and a.max_length is None and not a.padding_free
    assert not a.assistant_only_loss and a.completion_only_loss is False
    # batches of similar lengths, in the installed transformers' words (5.0: group_by_length)
    assert getattr(a, "train_sampling_strategy", None) == "group_by_length" or a.group_by_length is True
    assert a.eval_on_start
    assert not sft_config(cfg, tmp_path, resuming=True).eval_on_start
    assert a.lr_scheduler_kwargs == {"num_cycles": 3}
    assert sft_config(make_config("tiny"), tmp_path).padding_free
    assert sft_config(make_config("tiny"), tmp_path, has_eval=False).eval_strategy == "no"
    with pytest.raises(ConfigError, match="multiple of train.eval_steps"):
        sft_config(make_config("tiny", overrides={"train.load_best_model_at_end": True, "train.eval_steps": 4,
                                                  "train.save_steps": 6}), tmp_path)
    with pytest.raises(ConfigError, match="needs an evaluation split"):
        sft_config(cfg, tmp_path, has_eval=False)


def test_cosine_with_restarts_restarts_num_cycles_times(tmp_path):
    import torch
    from transformers import get_scheduler

    from lib.run.trainer_args import sft_config

    cfg = make_config("tiny", overrides={"train.lr_scheduler_type": "cosine_with_restarts", "train.num_cycles": 3})
    a = sft_config(cfg, tmp_path / "checkpoints")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(a.lr_scheduler_type, opt, num_warmup_steps=0, num_training_steps=30,
                          scheduler_specific_kwargs=a.lr_scheduler_kwargs)
    lrs = []
    for _ in range(30):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert sum(1 for x, y in zip(lrs, lrs[1:]) if y > x + 0.5) == 2  # 3 cycles: 2 jumps back up


def test_report_to_a_tracker_that_is_not_installed_is_a_config_error(tmp_path):
    import importlib.util

    from lib.run.trainer_args import sft_config

    missing = next((t for t in ("wandb", "mlflow", "trackio") if importlib.util.find_spec(t) is None), None)
    if missing is None:
        pytest.skip("every tracker is installed")
    with pytest.raises(ConfigError, match=f"pip install {missing}"):
        sft_config(make_config("tiny", overrides={"train.report_to": missing}), tmp_path)
    with pytest.raises(ConfigError, match="not one of"):
        sft_config(make_config("tiny", overrides={"train.report_to": "carrier-pigeon"}), tmp_path)


# ------------------------------------------------------------------------------ the trained run


def test_training_lowers_the_eval_loss_and_changes_the_adapter(trained_run):
    import torch
    from transformers import set_seed

    from lib.model.loading import add_lora, load_model_and_tokenizer
    from lib.run.config import load_config

    paths = run_paths(trained_run)
    s = json.loads(paths.training_summary.read_text())
    assert s["initial_eval_loss"] is not None and s["best_eval_loss"] < s["initial_eval_loss"] - 0.05
    assert s["final_eval_loss"] < s["initial_eval_loss"]
    assert math.isfinite(s["final_loss"]) and s["global_step"] > 0 and s["train_tokens"] > 0
    assert 0 < s["trainable_params"] < s["total_params"]
    assert set(s["versions"]) >= {"torch", "transformers", "trl", "peft", "bitsandbytes"}

    trained = _adapter_tensors(paths.adapter)
    cfg = load_config(paths.config)
    set_seed(cfg.train.seed)
    base, _ = load_model_and_tokenizer(cfg)
    set_seed(cfg.train.seed)
    initial = {k: v for k, v in add_lora(base, cfg).state_dict().items() if "lora_" in k}
    assert len(trained) == len(initial) > 0
    for name, w in trained.items():
        assert torch.isfinite(w).all()
        if "lora_B" in name:
            assert w.abs().max() > 0, f"{name} never moved from its zero initialisation"
    moved = [k for k in initial if not torch.equal(initial[k], trained[k.replace(".default", "")])]
    assert len(moved) == len(initial)


def test_the_trained_run_leaves_adapter_logs_and_model_card(trained_run):
    paths = run_paths(trained_run)
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "README.md"):
        assert (paths.adapter / name).exists(), name
    adapter_cfg = json.loads((paths.adapter / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 16 and adapter_cfg["peft_type"] == "LORA"
    card = (paths.adapter / "README.md").read_text()
    data_hash = json.loads(paths.data_report.read_text())["data_hash"]
    assert "base model: `tiny`" in card and data_hash in card and "learning_rate" in card

    rows = _metrics(paths)
    from lib.train.trainer import SAMPLE_COLUMNS

    assert list(rows[0]) == ["step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm",
                             "tokens_per_second", "peak_memory_mb", *SAMPLE_COLUMNS]
    train_rows = [r for r in rows if r["loss"]]
    eval_rows = [r for r in rows if r["eval_loss"]]
    assert len(train_rows) >= 10 and len(eval_rows) >= 3 and eval_rows[0]["step"] == "0"
    assert all(r["grad_norm"] and r["learning_rate"] and float(r["peak_memory_mb"]) > 0 for r in train_rows)
    assert all(float(r["tokens_per_second"]) > 0 for r in train_rows[1:])
    steps = [int(r["step"]) for r in train_rows]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    s = json.loads(paths.training_summary.read_text())
    assert float(train_rows[-1]["loss"]) == pytest.approx(s["final_loss"])
    assert min(float(r["eval_loss"]) for r in eval_rows) == pytest.approx(s["best_eval_loss"])

    from lib.train.report import loss_figure

    fig = loss_figure(trained_run)
    assert len(fig.axes[0].lines) == 2


def test_a_finished_run_is_not_retrained(trained_run, capsys):
    from lib.train.training import run_train

    paths = run_paths(trained_run)
    before = paths.training_summary.stat().st_mtime_ns, (paths.adapter / "adapter_model.safetensors").stat().st_mtime_ns
    summary = run_train(trained_run)
    assert "already finished training" in capsys.readouterr().out
    assert summary == json.loads(paths.training_summary.read_text())
    after = paths.training_summary.stat().st_mtime_ns, (paths.adapter / "adapter_model.safetensors").stat().st_mtime_ns
    assert before == after


# ------------------------------------------------------------------------------ resume


def _stop_at(step, exc):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step:
                raise exc

    return StopAt()


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_adapter(prepared_run, trained_run):
    import torch

    from lib.train.checkpoints import CheckpointWarning
    from lib.train.training import run_train

    run = _fresh_copy(prepared_run, "resumed")
    paths = run_paths(run)
    with pytest.raises(KeyboardInterrupt):
        run_train(run, callbacks=[_stop_at(15, KeyboardInterrupt())])
    assert (paths.checkpoints / "checkpoint-10" / "trainer_state.json").exists()
    assert not paths.adapter.exists() and not paths.training_summary.exists()
    rows_before = _metrics(paths)
    assert max(int(r["step"]) for r in rows_before) == 14  # logged up to the interruption

    # A newer checkpoint that was being written when the process died: no optimizer state, no trainer state.
    half = paths.checkpoints / "checkpoint-12"
    shutil.copytree(paths.checkpoints / "checkpoint-10", half)
    (half / "optimizer.pt").unlink()
    (half / "trainer_state.json").write_text('{"global_step": 12, "log_hist')
    with pytest.warns(CheckpointWarning, match="checkpoint-12"):
        summary = run_train(run)
    assert not half.exists()
    assert summary["resumed_from"] == "checkpoint-10"

    reference = json.loads(run_paths(trained_run).training_summary.read_text())
    assert summary["global_step"] == reference["global_step"]
    assert summary["final_eval_loss"] == pytest.approx(reference["final_eval_loss"], abs=1e-5)
    a, b = _adapter_tensors(paths.adapter), _adapter_tensors(run_paths(trained_run).adapter)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    steps = [int(r["step"]) for r in _metrics(paths) if r["loss"]]
    assert len(steps) == len(set(steps)), "rows of the interrupted steps are not duplicated"
    from lib.train.samples import read_samples

    sampled = [(r["step"], r["index"]) for r in read_samples(paths.samples)]
    assert len(sampled) == len(set(sampled)), "answers of the interrupted steps are not duplicated"
    assert {s for s, _ in sampled} == {r["step"] for r in read_samples(run_paths(trained_run).samples)}
    sample_rows = [int(r["step"]) for r in _metrics(paths) if r["sample_bleu"]]
    assert len(sample_rows) == len(set(sample_rows))
    assert summary["initial_eval_loss"] == pytest.approx(reference["initial_eval_loss"])


def test_checkpoint_problems_are_named(tmp_path):
    from lib.train.checkpoints import checkpoint_problem, last_checkpoint

    ck = tmp_path / "checkpoint-5"
    ck.mkdir()
    assert checkpoint_problem(ck) == "trainer_state.json is missing"
    (ck / "trainer_state.json").write_text("{}")
    assert checkpoint_problem(ck) == "the adapter weights are missing"
    assert last_checkpoint(tmp_path) is None and ck.exists()  # without clean, nothing is removed


# ------------------------------------------------------------------------------ non-finite guard


@pytest.mark.parametrize("what", ["loss", "gradient norm"])
def test_a_non_finite_value_stops_training_and_keeps_the_good_checkpoint(prepared_run, what):
    import torch
    from transformers import TrainerCallback

    from lib.train.training import run_train

    class Poison(TrainerCallback):
        """After step 6, an adapter weight becomes nan (as an overflow would leave it), or its
        gradient becomes inf while the loss stays finite."""

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 6:
                p = next(p for n, p in model.named_parameters() if "lora_A" in n)
                if what == "loss":
                    with torch.no_grad():
                        p.fill_(float("nan"))
                else:
                    p.register_hook(lambda g: g * float("inf"))

    run = _fresh_copy(prepared_run, f"nonfinite-{what.split()[0]}")
    paths = run_paths(run)
    with pytest.raises(TrainingError) as err:
        run_train(run, overrides=["train.save_steps=5", "train.eval_steps=5", "train.max_steps=12",
                                  "train.batching=group_by_length"], callbacks=[Poison()])
    msg = str(err.value)
    assert f"step 7: the {what} is not finite" in msg and "checkpoint-5" in msg
    assert "train.learning_rate" in msg and "train.max_grad_norm" in msg
    assert sorted(p.name for p in paths.checkpoints.glob("checkpoint-*")) == ["checkpoint-5"]
    assert all(torch.isfinite(t).all() for t in _adapter_tensors(paths.checkpoints / "checkpoint-5").values())
    assert not paths.adapter.exists() and not paths.training_summary.exists()


def test_a_bad_setting_stops_before_anything_is_written(prepared_run, capsys):
    from lib.__main__ import main

    paths = run_paths(prepared_run)
    before = paths.config.read_text()
    assert main(["train", "--run", prepared_run, "--set", "train.lr_scheduler_type=cosinus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: train.lr_scheduler_type: cosinus is not a valid")
    assert main(["train", "--run", prepared_run, "--set", "model.attn_implementation=flash_attention_2"]) == 2
    assert "flash_attention_2 is not installed" in capsys.readouterr().err
    assert paths.config.read_text() == before


def test_training_without_prepared_data_names_notebook_01(outputs):
    from lib.train.training import run_train

    with pytest.raises(MissingStageError, match="01_prepare_data"):
        run_train("never-prepared")


# ------------------------------------------------------------------------------ torchrun


@pytest.mark.slow
def test_torchrun_with_two_cpu_processes_writes_one_adapter(prepared_run):
    """DDP over gloo, with gradient checkpointing on."""
    run = _fresh_copy(prepared_run, "ddp")
    paths = run_paths(run)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    # `--` keeps torchrun (Python <= 3.11 argparse) from reading `--run` as an abbreviation of its `--run-path`.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "lib", "--", "train", "--run", run, "--set", "train.max_steps=4", "--set", "train.eval_steps=2",
           "--set", "train.save_steps=2", "--set", "train.logging_steps=1", "--set", "model.gradient_checkpointing=true"]
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads(paths.training_summary.read_text())
    assert s["world_size"] == 2 and s["global_step"] == 4
    assert json.loads(paths.model_summary.read_text())["gradient_checkpointing"] is True  # 02 done by 03
    assert (paths.adapter / "adapter_model.safetensors").exists()
    assert [p.name for p in paths.root.iterdir() if p.name.startswith("adapter")] == ["adapter"]
    rows = [r for r in _metrics(paths) if r["loss"]]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]  # one process writes the log
    # each optimizer step consumed a batch per process
    assert s["epoch"] == pytest.approx(4 * 2 * 8 / 153, abs=0.02)


def test_packed_attention_matches_the_block_mask_token_by_token(lora_model, some_examples):
    """sdpa per packed sequence gives the same log-probabilities as sdpa with transformers' block mask."""
    import torch

    from lib.train.trainer import build_collator
    from lib.train.training import encode_dataset

    cfg, model, tok = lora_model
    rows = list(encode_dataset(tok, some_examples, cfg.train.max_length))
    batch = build_collator(cfg, tok)(rows)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    logits = {}
    for impl in ("sdpa_packed", "sdpa"):
        inner.set_attn_implementation(impl)
        with torch.no_grad():
            # TRL 1.0's collator gives no cu_seq_lens: the boundaries are then where position_ids restart
            flat = {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k") if k in batch}
            logits[impl] = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                                 **(flat if impl == "sdpa_packed" else {})).logits.float().log_softmax(-1)
    inner.set_attn_implementation("sdpa_packed")
    assert torch.allclose(logits["sdpa_packed"], logits["sdpa"], atol=1e-5)

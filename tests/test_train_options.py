"""03: training options checked by value on the tiny 4-bit model: exact gradient accumulation,
NEFTune, early stopping (the best adapter kept), and packing across examples without
cross-contamination."""

from __future__ import annotations

import pytest

from lib.data.tokenization import IGNORE_INDEX
from lib.run.config import make_config

# ------------------------------------------------------------------------------ gradient accumulation


def _varied_examples(n: int, words: int = 3) -> list[dict]:
    """Conversations of clearly different lengths (so micro-batches hold different token counts)."""
    out = []
    for i in range(n):
        question = " ".join(["why is the sky blue"] * (1 + words * i))
        answer = " ".join(["because light scatters"] * (1 + (5 * i) % 7))
        out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return out


def _one_sgd_step(cfg, rows, tmp_path, batch: int, accumulate: int) -> dict:
    """The adapter after one optimizer step (plain SGD, so the update is the gradient itself) from the
    tiny model's fixed initial adapter; the batch is `batch` examples times `accumulate` micro-batches."""
    import warnings

    from conftest import tiny_lora_model
    from datasets import Dataset

    from lib.run.config import apply_overrides
    from lib.train.trainer import build_trainer

    cfg = apply_overrides(cfg, {"train.per_device_train_batch_size": batch,
                                "train.gradient_accumulation_steps": accumulate})
    model, tok = tiny_lora_model(cfg, seed=0)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ds = Dataset.from_list(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = build_trainer(cfg, model, tok, ds, None, output_dir=tmp_path / f"ga-{batch}x{accumulate}")
        trainer.train()
    assert trainer.state.global_step == 1
    return {n: p.detach() - initial[n] for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("batching", ["padding_free", "pad_longest"])
def test_gradient_accumulation_gives_the_update_of_the_whole_batch(session_outputs, tmp_path, batching):
    """b=2 x k=2 accumulated equals one batch of 4: the loss is normalised over every trained token of
    the accumulated batch (transformers' num_items_in_batch), not averaged per micro-batch."""

    from lib.data.tokenizer import load_tokenizer
    from lib.train.training import encode_dataset

    cfg = make_config("tiny", overrides={
        "train.batching": batching, "train.optim": "sgd", "train.learning_rate": 1.0,
        "train.lr_scheduler_type": "constant", "train.warmup_ratio": 0.0, "train.max_grad_norm": 0.0,
        "train.max_steps": 1, "train.eval_strategy": "no", "train.save_strategy": "no", "lora.dropout": 0.0})
    tok = load_tokenizer(cfg)
    ds = encode_dataset(tok, _varied_examples(4), cfg.train.max_length)
    rows = [ds[i] for i in range(len(ds))]
    trained = [sum(x != -100 for x in r["labels"]) for r in rows]
    assert len(rows) == 4 and len(set(trained)) == 4, "trained-token counts differ between examples"

    whole = _one_sgd_step(cfg, rows, tmp_path, batch=4, accumulate=1)
    accumulated = _one_sgd_step(cfg, rows, tmp_path, batch=2, accumulate=2)
    assert whole.keys() == accumulated.keys() and whole
    largest = max(float(u.abs().max()) for u in whole.values())
    assert largest > 1e-3, "the step moved the adapter"
    diff = max(float((whole[n] - accumulated[n]).abs().max()) for n in whole)
    assert diff <= 1e-5 * largest, f"accumulated update differs by {diff:.2e} (largest update {largest:.2e})"

    # The test can tell: averaging each micro-batch's mean loss (the wrong normalisation) moves the adapter
    # measurably differently (~1e-3 here, against ~1e-8 between the exact ones).
    per_micro = _mean_of_micro_batch_means_update(cfg, tok, rows)
    wrong = max(float((whole[n] - per_micro[n]).abs().max()) for n in whole)
    print(f"GA {batching}: largest {largest:.3e} diff {diff:.3e} per-micro-batch-mean diff {wrong:.3e}")
    assert wrong > 100 * max(diff, 1e-7 * largest)


def _mean_of_micro_batch_means_update(cfg, tok, rows) -> dict:
    """The SGD update (lr 1) of the mean over micro-batches [0, 1], [2, 3] of each one's mean token loss."""
    from conftest import tiny_lora_model

    from lib.train.trainer import build_collator

    model, _ = tiny_lora_model(cfg, seed=0)
    model.train()
    collate = build_collator(cfg, tok)
    for part in (rows[:2], rows[2:]):
        batch = collate(part)
        (model(**batch, use_cache=False).loss / 2).backward()
    return {n: -p.grad.detach() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------ NEFTune


def _train_small(cfg, tmp_path, name, callbacks=()):
    """A short training of the tiny model (fixed initial adapter) on 8 varied examples, evaluated on 4."""
    import warnings

    from conftest import tiny_lora_model

    from lib.train.trainer import build_trainer
    from lib.train.training import encode_dataset

    model, tok = tiny_lora_model(cfg, seed=0)
    train_ds = encode_dataset(tok, _varied_examples(8), cfg.train.max_length)
    eval_ds = encode_dataset(tok, _varied_examples(4)[::-1], cfg.train.max_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = build_trainer(cfg, model, tok, train_ds, eval_ds, output_dir=tmp_path / name,
                                callbacks=callbacks)
        trainer.train()
    return trainer


def _neftune_probe():
    """A callback that, during training (the NEFTune hook active), runs the input embeddings in train
    and in eval mode and records both next to the plain embedding lookup."""
    import torch
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        seen = {}

        def on_step_begin(self, args, state, control, model=None, **kw):
            if self.seen:
                return
            emb = model.base_model.model.get_input_embeddings()
            ids = torch.arange(40)[None] % emb.num_embeddings
            plain = emb.weight[ids].detach()
            was_training = emb.training
            with torch.no_grad():
                emb.train()
                noisy, noisy_again = emb(ids), emb(ids)
                emb.eval()
                quiet = emb(ids)
            emb.train(was_training)
            self.seen.update(plain=plain, noisy=noisy, noisy_again=noisy_again, quiet=quiet, emb=emb,
                             hooks=len(emb._forward_hooks))

    return Probe()


def test_neftune_adds_noise_to_training_embeddings_only(session_outputs, tmp_path):
    import torch

    base = {"train.max_steps": 3, "train.logging_steps": 1, "train.eval_steps": 3, "train.save_strategy": "no",
            "train.per_device_train_batch_size": 2, "train.gradient_accumulation_steps": 1}
    alpha = 5.0
    cfg_noise = make_config("tiny", overrides={**base, "train.neftune_noise_alpha": alpha})
    probe = _neftune_probe()
    noisy = _train_small(cfg_noise, tmp_path, "neftune", callbacks=[probe])
    plain = _train_small(make_config("tiny", overrides=base), tmp_path, "plain")

    seen = probe.seen
    assert seen["hooks"] == 1, "transformers hooked the peft model's input embeddings"
    bound = alpha / (40 * seen["plain"].shape[-1]) ** 0.5  # alpha / sqrt(tokens x width)
    delta = (seen["noisy"] - seen["plain"]).abs()
    assert 0.5 * bound < float(delta.max()) <= bound * (1 + 1e-5)
    assert not torch.equal(seen["noisy"], seen["noisy_again"]), "fresh noise at every forward"
    assert torch.equal(seen["quiet"], seen["plain"]), "no noise in eval mode (evaluation, generation)"
    assert len(seen["emb"]._forward_hooks) == 0, "the hook is removed when training ends"

    def logged(trainer, key, step):
        return next(h[key] for h in trainer.state.log_history if key in h and h["step"] == step)

    # Evaluation is unaffected (the same eval loss before training), training is not.
    assert logged(noisy, "eval_loss", 0) == logged(plain, "eval_loss", 0)
    assert logged(noisy, "loss", 1) != logged(plain, "loss", 1)
    a = {n: p.detach() for n, p in noisy.model.named_parameters() if p.requires_grad}
    b = {n: p.detach() for n, p in plain.model.named_parameters() if p.requires_grad}
    assert max(float((a[n] - b[n]).abs().max()) for n in a) > 1e-6


# ------------------------------------------------------------------------------ early stopping


def _undo_training_after(step: int):
    """A callback that puts the adapter back to its initial weights after every step past `step`, so
    every later evaluation has the initial eval loss, worse than the trained one at `step`."""
    import torch
    from transformers import TrainerCallback

    class Undo(TrainerCallback):
        initial = None

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step > step:
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if n in self.initial:
                            p.copy_(self.initial[n])

    return Undo()


@pytest.mark.slow  # ~10 steps and 6 evaluations twice (~30 s on 2 idle CPU cores)
def test_early_stopping_keeps_the_best_adapter_and_does_not_train_on(prepared_run, capsys):
    import json
    import shutil

    import torch
    from safetensors.torch import load_file
    from test_train import _fresh_copy

    from lib.run.paths import run_paths
    from lib.train.training import run_train

    run = _fresh_copy(prepared_run, "early-stop")
    paths = run_paths(run)
    summary = run_train(run, overrides=["train.max_steps=20", "train.eval_steps=2", "train.save_steps=2",
                                        "train.save_total_limit=none", "train.load_best_model_at_end=true",
                                        "train.early_stopping_patience=2"], callbacks=[_undo_training_after(4)])
    out = capsys.readouterr().out
    evals = {h["step"]: h["eval_loss"] for h in _history(paths, summary["global_step"]) if "eval_loss" in h}
    assert evals[4] < min(evals[0], evals[2]), "training lowered the eval loss up to step 4"
    assert evals[6] == evals[8] == evals[0], "after step 4 the adapter is back at its start"
    assert summary["stopped_early"] and summary["stopped_at_step"] == summary["global_step"] == 8
    assert summary["best_step"] == summary["adapter_from_step"] == 4
    assert summary["best_step_eval_loss"] == pytest.approx(evals[4])
    assert "stopped early at step 8" in out and "best step's, 4" in out
    assert json.loads(paths.training_summary.read_text())["stopped_early"] is True

    saved = load_file(str(paths.adapter / "adapter_model.safetensors"))
    best = load_file(str(paths.checkpoints / "checkpoint-4" / "adapter_model.safetensors"))
    last = load_file(str(paths.checkpoints / "checkpoint-8" / "adapter_model.safetensors"))
    assert saved.keys() == best.keys() and saved
    assert all(torch.equal(saved[k], best[k]) for k in saved), "the adapter is the best checkpoint's"
    assert any(not torch.equal(saved[k], last[k]) for k in saved)

    # Rerunning does not train on from the last checkpoint: the run is finished.
    again = run_train(run)
    assert again["global_step"] == 8 and "already finished training" in capsys.readouterr().out
    assert all(torch.equal(load_file(str(paths.adapter / "adapter_model.safetensors"))[k], best[k]) for k in best)
    # Nor when the process died after the stop, before the adapter was written: resuming from
    # checkpoint-8 (saved at the stop) trains no step and keeps the best checkpoint's adapter.
    shutil.rmtree(paths.adapter)
    paths.training_summary.unlink()
    resumed = run_train(run)
    assert "not training on" in capsys.readouterr().out
    assert resumed["resumed_from"] == "checkpoint-8" and resumed["global_step"] == 8
    assert resumed["stopped_early"] and resumed["best_step"] == resumed["adapter_from_step"] == 4
    saved = load_file(str(paths.adapter / "adapter_model.safetensors"))
    assert all(torch.equal(saved[k], best[k]) for k in best)
    assert [p.name for p in paths.checkpoints.iterdir() if p.name == "checkpoint-9"] == []


def _split_data(path, train, test):
    import json

    def conv(q, a):
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    path.write_text(json.dumps({"train": [conv(q, a) for q, a in train], "test": [conv(q, a) for q, a in test]}))
    return str(path)


@pytest.mark.slow  # two trainings of 6 steps on the tiny model (~10 s)
def test_best_metric_task_score_keeps_the_checkpoint_whose_answers_score_best(tmp_path, capsys):
    """train.best_metric=task_score: the best checkpoint is the one whose sampled answers score best, by value.
    A first training records its answers at each evaluation; a second one, the same training data and seed (so
    the same answers), gets eval references equal to the answers of step 4, scored with exact match: only step 4
    scores 1.0, so its adapter is the one kept."""
    import json
    import re

    import torch
    from conftest import SAMPLE
    from safetensors.torch import load_file

    from lib.data.prepare import run_prepare
    from lib.run.paths import run_paths
    from lib.train.samples import read_samples
    from lib.train.training import run_train

    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    pairs = [(r["instruction"], "\n".join(r["output"])) for r in rows]
    sets = ["train.max_steps=6", "train.eval_steps=2", "train.save_steps=2", "train.save_total_limit=none",
            "train.learning_rate=0.02",
            "train.load_best_model_at_end=true", "train.best_metric=task_score", "eval.scores=[exact]",
            "eval.sample_prompts=2", "eval.sample_max_new_tokens=8"]
    run_prepare("best-a", _split_data(tmp_path / "a.json", pairs[:120], pairs[120:122]), profile="tiny")
    run_train("best-a", overrides=sets)
    answers = {}
    for r in read_samples(run_paths("best-a").samples):
        answers.setdefault(r["step"], []).append(r["answer"])
    assert answers[4] != answers[2] and answers[4] != answers[6] and all(answers[4]), answers

    test = [(q, a) for (q, _), a in zip(pairs[120:122], answers[4])]
    run_prepare("best-b", _split_data(tmp_path / "b.json", pairs[:120], test), profile="tiny")
    summary = run_train("best-b", overrides=sets)
    paths = run_paths("best-b")
    again = {}
    for r in read_samples(paths.samples):
        again.setdefault(r["step"], []).append((r["answer"], r["score"]))
    assert [a for a, _ in again[4]] == answers[4], "the same training gives the same answers"
    assert [s for _, s in again[4]] == [1.0, 1.0] and all(s < 1.0 for step in (2, 6) for _, s in again[step])
    assert summary["best_step"] == summary["adapter_from_step"] == 4
    assert summary["best_metric"] == "eval_sample_task_score" and summary["best_step_value"] == 1.0
    assert summary["best_step_eval_loss"] is None
    saved = load_file(str(paths.adapter / "adapter_model.safetensors"))
    best = load_file(str(paths.checkpoints / "checkpoint-4" / "adapter_model.safetensors"))
    assert saved.keys() == best.keys() and all(torch.equal(saved[k], best[k]) for k in saved)
    assert not re.search(r"Traceback", capsys.readouterr().err)


def test_best_metric_task_score_refuses_what_it_cannot_score(prepared_run):
    """No sampled prompts, references no task score fits (free text), or a chosen score that fits none of the sampled
    references: one line each. (The refusal on several processes, in build_sft_trainer, is not run here.)"""
    from test_train import _fresh_copy

    from lib.run.config import apply_overrides
    from lib.run.errors import ConfigError
    from lib.train.training import run_train

    with pytest.raises(ConfigError, match=r"^train\.best_metric=task_score needs eval prompts answered"):
        apply_overrides(make_config("tiny"), ["train.best_metric=task_score", "eval.sample_prompts=0"])
    run = _fresh_copy(prepared_run, "best-free-text")
    with pytest.raises(ConfigError, match=r"^train\.best_metric=task_score: no task score fits the eval references"):
        run_train(run, overrides=["train.best_metric=task_score", "train.max_steps=2"])
    with pytest.raises(ConfigError, match=r"the task score number fits none of the 2 sampled eval references"):
        run_train(run, overrides=["train.best_metric=task_score", "eval.scores=[number]", "eval.sample_prompts=2",
                                  "train.max_steps=2"])


def _history(paths, step):
    import json

    return json.loads((paths.checkpoints / f"checkpoint-{step}" / "trainer_state.json").read_text())["log_history"]


@pytest.mark.parametrize("overrides, message", [
    ({"train.early_stopping_patience": 2},
     "train.early_stopping_patience needs train.load_best_model_at_end=true"),
    ({"train.early_stopping_patience": 2, "train.load_best_model_at_end": True, "train.eval_strategy": "no"},
     "train.load_best_model_at_end needs an evaluation split and train.eval_strategy"),
    ({"train.early_stopping_threshold": 0.01},
     "train.early_stopping_threshold needs train.early_stopping_patience"),
    ({"train.early_stopping_patience": 0}, "train.early_stopping_patience: must be at least 1"),
    ({"train.neftune_noise_alpha": 0.0}, "train.neftune_noise_alpha: must be above 0"),
])
def test_training_option_conflicts_are_one_line_naming_both_settings(overrides, message):
    from lib.run.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        make_config("tiny", overrides=overrides)


def test_cli_refuses_early_stopping_without_best_model_before_loading(prepared_run, capsys):
    from lib.__main__ import main
    from lib.run.paths import run_paths

    paths = run_paths(prepared_run)
    before = paths.config.read_text()
    assert main(["train", "--run", prepared_run, "--set", "train.early_stopping_patience=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.early_stopping_patience" in err[0] and "train.load_best_model_at_end" in err[0]
    assert paths.config.read_text() == before


# ------------------------------------------------------------------------------ packing


def test_packing_keeps_our_labels_and_each_example_sees_only_itself(session_outputs, tmp_path):
    """TRL's best-fit-decreasing packing of our encoded examples: every example lands once, whole, with its
    own labels at its own positions; position_ids restart at each one; and the per-token log-probabilities
    of an example inside a pack equal those of the example alone (no attention across examples)."""
    import warnings

    import torch
    from conftest import tiny_lora_model

    from lib.train.trainer import build_collator, build_trainer
    from lib.train.training import encode_dataset

    max_length = 128
    cfg = make_config("tiny", overrides={"train.batching": "packing", "train.max_length": max_length,
                                         "train.per_device_train_batch_size": 2, "train.max_steps": 2,
                                         "train.eval_strategy": "no", "train.save_strategy": "no"})
    model, tok = tiny_lora_model(cfg, seed=0)
    ds = encode_dataset(tok, _varied_examples(7, words=0), max_length)
    examples = [(tuple(ds[i]["input_ids"]), tuple(ds[i]["labels"])) for i in range(len(ds))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = build_trainer(cfg, model, tok, ds, None, output_dir=tmp_path / "packing")
    packed = trainer.train_dataset
    assert len(packed) < len(ds) and all(len(r["input_ids"]) <= max_length for r in packed)
    assert any(len(r["seq_lengths"]) > 1 for r in packed), "some rows hold several examples"

    whole = []  # every example exactly once over the packed rows, cut where seq_lengths say
    for r in packed:
        cuts = [0, *torch.tensor(r["seq_lengths"]).cumsum(0).tolist()]
        labels = r["labels"] if "labels" in r else [  # TRL 1.0 packs no labels column: the mask it applies instead
            t if m else IGNORE_INDEX for t, m in zip(r["input_ids"], r["assistant_masks"])]
        whole += [(tuple(r["input_ids"][a:b]), tuple(labels[a:b])) for a, b in zip(cuts, cuts[1:])]
    assert sorted(whole) == sorted(examples)

    batch = next(iter(trainer.get_train_dataloader()))  # two packed rows, flattened into one
    pieces = _split_packed(batch)
    rows = [len(r["input_ids"]) for r in packed]
    assert batch["input_ids"].shape[1] in {a + b for i, a in enumerate(rows) for b in rows[i + 1:]}
    assert len(pieces) >= 3
    for ids, labels, _ in pieces:
        match = [ex for ex in examples if ex[0] == ids]
        assert match, "every packed piece is one whole example"
        assert labels == match[0][1], "our labels, at the example's own positions"

    model.eval()
    with torch.no_grad():
        logp = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits.log_softmax(-1)
        alone_collate = build_collator(cfg, tok)
        worst = 0.0
        for ids, labels, (s, e) in pieces:
            one = alone_collate([{"input_ids": list(ids), "labels": list(labels)}])
            ref = model(input_ids=one["input_ids"], use_cache=False).logits.log_softmax(-1)
            worst = max(worst, float((logp[0, s:e] - ref[0]).abs().max()))
        assert worst < 1e-4, f"an example inside a pack differs from the example alone by {worst:.2e}"
        # Control: the same row with positions running on (attention across the examples) differs.
        leaky = model(input_ids=batch["input_ids"], position_ids=torch.arange(batch["input_ids"].shape[1])[None],
                      use_cache=False).logits.log_softmax(-1)
        assert float((leaky - logp).abs().max()) > 1e-2
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert trainer.state.global_step == 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def _split_packed(batch) -> list[tuple]:
    """(input_ids, labels, (start, end)) of every example of a padding-free row, by its restarting position_ids."""
    pos = batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    return [(tuple(ids[s:e]), tuple(labels[s:e]), (s, e)) for s, e in zip(starts, starts[1:])]

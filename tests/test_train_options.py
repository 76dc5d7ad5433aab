"""03: training options checked by value on the tiny 4-bit model: exact gradient accumulation,
NEFTune, early stopping (the best adapter kept), and packing across examples without
cross-contamination."""

from __future__ import annotations

import pytest

from lib.config import make_config

# ------------------------------------------------------------------------------ gradient accumulation


def _varied_examples(n: int) -> list[dict]:
    """Conversations of clearly different lengths (so micro-batches hold different token counts)."""
    out = []
    for i in range(n):
        question = " ".join(["why is the sky blue"] * (1 + 3 * i))
        answer = " ".join(["because light scatters"] * (1 + (5 * i) % 7))
        out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return out


def _one_sgd_step(cfg, rows, tmp_path, batch: int, accumulate: int) -> dict:
    """The adapter after one optimizer step (plain SGD, so the update is the gradient itself) from the
    tiny model's fixed initial adapter; the batch is `batch` examples times `accumulate` micro-batches."""
    import warnings

    from datasets import Dataset

    from conftest import tiny_lora_model
    from lib.config import apply_overrides
    from lib.train import build_trainer

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
    import torch

    from lib.train import encode_dataset

    cfg = make_config("tiny", overrides={
        "train.batching": batching, "train.optim": "sgd", "train.learning_rate": 1.0,
        "train.lr_scheduler_type": "constant", "train.warmup_ratio": 0.0, "train.max_grad_norm": 0.0,
        "train.max_steps": 1, "train.eval_strategy": "no", "train.save_strategy": "no", "lora.dropout": 0.0})
    _, tok = _tokenizer_only(cfg)
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


def _tokenizer_only(cfg):
    from lib.loading import load_tokenizer

    return None, load_tokenizer(cfg)


def _mean_of_micro_batch_means_update(cfg, tok, rows) -> dict:
    """The SGD update (lr 1) of the mean over micro-batches [0, 1], [2, 3] of each one's mean token loss."""
    from conftest import tiny_lora_model
    from lib.train import build_collator

    model, _ = tiny_lora_model(cfg, seed=0)
    model.train()
    collate = build_collator(cfg, tok)
    for part in (rows[:2], rows[2:]):
        batch = collate(part)
        (model(**batch, use_cache=False).loss / 2).backward()
    return {n: -p.grad.detach() for n, p in model.named_parameters() if p.requires_grad}

"""The CPU's compact LM head (lib/train/lmhead.py) against TRL's fused head, by value: per-token log-probabilities,
entropy, top-1 flags, loss and the LoRA gradients at the trained positions; and the trainer installs it."""

from __future__ import annotations

import pytest

from lib.run.config import make_config


def _batch(tok):
    import torch

    rows = [tok("Why does ice float on water? Because it is less dense.")["input_ids"],
            tok("What is rain? Water falling from clouds.")["input_ids"]]
    width = max(map(len, rows))
    ids = torch.full((2, width), tok.pad_token_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    labels = torch.full((2, width), -100)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        labels[i, len(r) // 2:len(r)] = torch.tensor(r[len(r) // 2:])  # the second half of each row is trained
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _run(model, batch, num_items=None):
    model.zero_grad(set_to_none=True)
    out = model(**batch, fused_lm_head=True, num_items_in_batch=num_items)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _compare_heads(model, batch, num_items=None, atol=1e-5):
    """TRL's fused head, then the compact one, on the same model and batch: equal at every position."""
    import torch
    import trl.trainer.utils

    from lib.train.lmhead import OUTPUTS, compact_lm_head, trl_has_fused_head

    if not trl_has_fused_head():  # older TRL 1.x (the lowest allowed, 1.0): no fused head
        pytest.skip("this TRL has no fused LM head: SFTTrainer computes the logits itself, nothing to compact")
    add_fused_lm_head = trl.trainer.utils.add_fused_lm_head

    base = model.get_base_model()
    add_fused_lm_head(base, outputs=OUTPUTS)  # what SFTTrainer does
    ref, ref_grads = _run(model, batch, num_items)
    assert compact_lm_head(base) and compact_lm_head(base)  # installed once; a second call changes nothing
    out, grads = _run(model, batch, num_items)
    assert torch.equal(out.label_mask, ref.label_mask) and int(out.label_mask.sum()) > 4
    assert int(out.label_mask.sum()) < out.label_mask.numel()  # some positions are not trained: the point
    torch.testing.assert_close(out.log_probs, ref.log_probs, atol=atol, rtol=1e-5)
    assert float(out.log_probs.detach()[~out.label_mask].abs().sum()) == 0.0  # zero where nothing is trained, as TRL's
    torch.testing.assert_close(out.entropy, ref.entropy, atol=atol, rtol=1e-5)
    assert torch.equal(out.is_top1, ref.is_top1)
    torch.testing.assert_close(out.loss, ref.loss, atol=atol / 10, rtol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=atol / 10, rtol=1e-4)
    plain = model(**{k: v for k, v in batch.items() if k not in ("labels", "seq_lengths")})  # the model's own
    assert plain.logits.shape[-1] == base.config.vocab_size


@pytest.mark.parametrize("num_items", [None, 7])
def test_compact_head_equals_trls_fused_head_at_trained_positions(num_items):
    from conftest import tiny_lora_model

    model, tok = tiny_lora_model(make_config("tiny"))
    _compare_heads(model, _batch(tok), num_items)


@pytest.mark.slow  # loads SmolLM2 in 4-bit (~10 s)
def test_compact_head_on_smollm2_with_the_projects_padding_free_batch():
    """SmolLM2's real template and 49k vocabulary, the batch as training makes it: the prepared Socratic
    conversations encoded with their labels (prompt and system text untrained), concatenated padding-free."""
    from conftest import tiny_lora_model

    from lib.train.trainer import build_collator
    from lib.train.training import encode_dataset

    cfg = make_config("smol")
    model, tok = tiny_lora_model(cfg, b_std=0.01)
    convs = [{"messages": [{"role": "user", "content": "Why does ice float on water?"},
                           {"role": "assistant", "content": "What happens to the volume of water when it freezes?"}]},
             {"messages": [{"role": "user", "content": "How do vaccines work?"},
                           {"role": "assistant", "content": "What does the immune system remember?\nWhy might "
                                                            "a weakened virus be enough?"}]}]
    batch = build_collator(cfg, tok)(list(encode_dataset(tok, convs, cfg.train.max_length, None)))
    assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch  # one row, sequences back to back
    _compare_heads(model, dict(batch), atol=1e-4)


def test_untrained_batch_gives_a_differentiable_zero_and_the_trainer_installs_the_head(tmp_path):
    import torch
    from conftest import tiny_lora_model

    from lib.train.lmhead import trained_positions_head, trl_has_fused_head

    if not trl_has_fused_head():
        pytest.skip("this TRL has no fused LM head (trl.kernels): SFTTrainer computes the logits itself")
    from lib.train.trainer import build_trainer
    from lib.train.training import encode_dataset

    cfg = make_config("tiny")
    model, tok = tiny_lora_model(cfg)
    hidden = torch.randn(1, 5, model.config.hidden_size, requires_grad=True)
    out = trained_positions_head(model.get_output_embeddings(), hidden, torch.full((1, 5), -100))
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and hidden.grad is not None and float(hidden.grad.abs().sum()) == 0.0
    data = encode_dataset(tok, [{"messages": [{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Why?"}]}], 64, None)
    trainer = build_trainer(cfg, model, tok, data, output_dir=tmp_path / "checkpoints")
    assert getattr(trainer.model.get_base_model().forward, "compact_lm_head", False)  # the CPU: compact

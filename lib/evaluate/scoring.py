"""Scoring a model on a run's examples: perplexity over the answer tokens, and the examples to use.

    from lib.evaluate.scoring import perplexity, check_examples
    examples, split = check_examples(paths, cfg)      # the eval split (or 32 training examples)
    perplexity(model, tokenizer, examples, batch_size=8, max_length=cfg.train.max_length)

Perplexity is exp(total NLL / total tokens) over the assistant tokens, the very tokens the
training loss sees (`lib.data.tokenization.encode_example` labels, cut at train.max_length), computed
batch by batch (one batch of logits in memory at a time; a batch that runs out of memory is halved
and retried, lib/model/oom.py) and summed in example order. Evaluation (04),
the merge check and the GGUF parity check all use it.
"""

from __future__ import annotations

import math

from lib.data.readers import read_examples
from lib.data.tokenization import IGNORE_INDEX, encode_example
from lib.model.generation import model_device, pad_id
from lib.model.oom import in_batches
from lib.run.errors import SFTError
from lib.run.paths import require


def perplexity(model, tokenizer, examples, batch_size: int = 8, max_length: int | None = 1024,
               desc: str = "perplexity", progress: bool = True, per_example: bool = False) -> dict:
    """Perplexity of `model` over the trained (assistant) tokens of normalised `examples`.

    Returns {"loss": mean NLL per token (nats), "perplexity": exp(loss), "tokens": count,
    "examples": examples that have at least one scored token, "examples_cut": examples longer than
    max_length, scored on their first max_length tokens only (as training cuts them)}; per_example: also
    "per_example": [[NLL, tokens], ...] in a fixed order (by length, then input order) for a paired comparison.
    """
    from tqdm.auto import tqdm

    encoded = [encode_example(tokenizer, ex, max_length) for ex in examples]
    n_cut = sum(1 for e in encoded if max_length is not None and e["length"] > max_length)
    # Token t is predicted from tokens < t, so a label at position 0 can never be scored.
    encoded = [e for e in encoded if any(x != IGNORE_INDEX for x in e["labels"][1:])]
    if not encoded:
        raise SFTError("no assistant tokens to score in the evaluation examples "
                       "(empty answers, or all cut by train.max_length)")
    encoded.sort(key=lambda e: len(e["input_ids"]))  # similar lengths together: little padding
    device = model_device(model)
    pad = pad_id(tokenizer)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(encoded), desc=desc, unit="example", disable=not progress) as bar:
            rows = in_batches(lambda batch: _batch_nll(model, batch, pad, device), encoded, batch_size,
                              what=desc, progress=bar)
    finally:
        model.train(was_training)
    total_nll, total_tokens = 0.0, 0
    for nll, tokens in rows:  # summed in example order: the same total for any batch size
        total_nll += nll
        total_tokens += tokens
    loss = total_nll / total_tokens
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": total_tokens,
           "examples": len(encoded), "examples_cut": n_cut}
    if per_example:
        out["per_example"] = [[nll, tokens] for nll, tokens in rows]
    return out


def padded_batch(batch, pad: int):
    """(input_ids, labels, attention_mask) tensors of encoded examples, right-padded to the longest."""
    import torch

    width = max(len(e["input_ids"]) for e in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return ids, labels, mask


def _batch_nll(model, batch, pad: int, device) -> list[tuple[float, int]]:
    """(summed NLL, scored tokens) of each encoded example of one right-padded batch."""
    import torch
    import torch.nn.functional as F

    ids, labels, mask = padded_batch(batch, pad)
    out = []
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        target = labels[:, 1:].to(logits.device)
        for row in range(len(batch)):  # one row at a time in float32: bounded memory for big vocabularies
            nll = F.cross_entropy(logits[row, :-1].float(), target[row], ignore_index=IGNORE_INDEX, reduction="sum")
            out.append((nll.item(), int((target[row] != IGNORE_INDEX).sum())))
    del logits
    return out


def check_examples(paths, cfg) -> tuple[list[dict], str]:
    examples = read_examples(paths.eval_data)
    split = "eval"
    if not examples:  # no eval split: check on training examples rather than on nothing
        require(paths, "train_data")
        examples = read_examples(paths.train_data)[:32]
        split = "train (no eval split)"
    if cfg.eval.max_examples:
        examples = examples[: cfg.eval.max_examples]
    if not examples:
        raise SFTError(f"{paths.eval_data}: no examples to check the merged model on")
    return examples, split

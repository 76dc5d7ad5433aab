"""The LM head of training on the CPU: TRL's fused head, projecting only the positions that are trained.

TRL's SFTTrainer replaces the model's forward with a fused LM head (trl.trainer.utils.add_fused_lm_head):
`model(..., labels=labels, fused_lm_head=True)` runs the backbone and scores each next-token label with
trl.kernels.chunked_logprob.ChunkedLogProbFunction, in vocabulary tiles, without the full logits. On a
GPU with Triton it projects only the positions whose label is trained; elsewhere (the CPU) it projects
every position, prompts included, and masks the result. With a 49k-token vocabulary that head is the
largest cost of a CPU step (bench/RESULTS.md: 43% of a SmolLM2 step), and prompts are about half the
positions of chat data. compact_lm_head wraps TRL's fused forward so that on the CPU only the trained
positions are projected, by the same ChunkedLogProbFunction: the log-probabilities, entropy, top-1
flags, loss and gradients are those of TRL's head at the trained positions (tests/test_lmhead.py),
zero elsewhere, as TRL returns them.

    from lib.train.lmhead import compact_lm_head
    compact_lm_head(trainer.model.get_base_model())   # after SFTTrainer(...); lib.train.trainer does this on the CPU

Models whose head scales or soft-caps its logits (Gemma 2, Cohere, Granite, ...) or adds a mixture-of-experts
loss keep TRL's head unchanged.
"""

from __future__ import annotations

import functools
import types

VOCAB_CHUNK = 32768  # vocabulary tile of the projection (TRL's own default)
OUTPUTS = ("log_probs", "entropy", "is_top1")  # what SFTTrainer's loss and metrics read (entropy, token accuracy)
SCALED = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def trl_has_fused_head() -> bool:
    """Whether the installed TRL has the fused LM head this wraps (newer 1.x; not 1.0, the lowest allowed)."""
    import importlib.util

    import trl.trainer.utils

    return hasattr(trl.trainer.utils, "add_fused_lm_head") and importlib.util.find_spec("trl.kernels") is not None


def compact_lm_head(model) -> bool:
    """Wrap the fused forward TRL put on `model` (the base model under peft) to project only trained positions.
    Returns False, leaving the model as it is, for a head this does not cover (see the module)."""
    text_config = model.config.get_text_config()
    if any(getattr(text_config, k, None) is not None for k in SCALED) or getattr(text_config, "output_router_logits",
                                                                                  False):
        return False
    if getattr(model.forward, "compact_lm_head", False):
        return True
    if not trl_has_fused_head():  # older TRL (1.0): SFTTrainer computes the logits itself, nothing to compact
        return False
    fused = model.forward  # TRL's: the model's own forward unless fused_lm_head=True

    @functools.wraps(type(model).forward)  # generate() checks its keyword arguments against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or labels is None or shift_labels is not None:
            return fused(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                         num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        return trained_positions_head(self.get_output_embeddings(), hidden, labels[:, 1:], num_items_in_batch)

    forward.compact_lm_head = True
    model.forward = types.MethodType(forward, model)
    return True


def trained_positions_head(lm_head, hidden, targets, num_items_in_batch=None):
    """TRL's FusedCausalLMOutput for next-token `targets` (-100: not trained) of `hidden` [batch, seq, width],
    projecting only the trained positions."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import FusedCausalLMOutput

    targets = targets.to(lm_head.weight.device)
    mask = targets != -100
    per_token = ChunkedLogProbFunction.apply(hidden.to(lm_head.weight.device)[mask], lm_head.weight, lm_head.bias,
                                             targets[mask], 1.0, VOCAB_CHUNK, None, 1.0, OUTPUTS)
    # masked_scatter keeps an all-untrained batch connected to the graph: a differentiable zero
    log_probs, entropy, _, _, is_top1 = (None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x)
                                         for x in per_token)
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=mask)

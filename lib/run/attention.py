"""Exact padding-free attention without flash-attn: sdpa run on each packed sequence separately.

Padding-free batching (the default, `train.batching=padding_free`) concatenates a batch's
examples into one row; TRL's collator restarts `position_ids` at every example and passes the
boundaries as `cu_seq_lens_q`. flash-attn uses them natively. Plain `sdpa` instead gets one dense
block-diagonal mask over the whole row, which costs (sum of lengths)^2: on the CPU or a T4 that
eats most of what dropping the padding saved (bench/RESULTS.md). This attention,
registered as `sdpa_packed`, runs causal sdpa on each sequence, which costs the sum of each
length^2 and needs no mask at all. Anything else (padded batches, generation with a cache) goes
to the stock sdpa path unchanged.
"""

from __future__ import annotations

NAME = "sdpa_packed"
_registered = False


def _boundaries(kwargs, length: int) -> list[int] | None:
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        return [int(x) for x in cu.tolist()]
    pos = kwargs.get("position_ids")
    if pos is not None and pos.dim() == 2 and pos.shape[0] == 1 and pos.shape[1] == length:
        starts = (pos[0] == 0).nonzero().flatten().tolist()
        if starts and starts[0] == 0:
            return starts + [length]
    return None


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                        is_causal=None, **kwargs):
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = query.shape[2]
    bounds = None
    if attention_mask is None and query.shape[0] == 1 and key.shape[2] == length:
        bounds = _boundaries(kwargs, length)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    outs = [
        F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                       scale=scaling, dropout_p=p, enable_gqa=gqa)
        for s, e in zip(bounds[:-1], bounds[1:]) if e > s
    ]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def packed_mask(*args, batch_size=None, q_length=None, kv_length=None, attention_mask=None, **kwargs):
    """No mask for one unpadded row without a cache (the attention splits it); else sdpa's mask."""
    from transformers.masking_utils import sdpa_mask

    if batch_size == 1 and attention_mask is None and q_length == kv_length:
        return None
    return sdpa_mask(*args, batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                     attention_mask=attention_mask, **kwargs)


def register() -> str:
    global _registered
    if not _registered:
        from transformers import AttentionInterface, AttentionMaskInterface

        AttentionInterface.register(NAME, packed_sdpa_forward)
        AttentionMaskInterface.register(NAME, packed_mask)
        _registered = True
    return NAME

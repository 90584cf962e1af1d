"""sdpa for packed rows on CPU: each packed example attends on its own, without the masked blocks.

A packed row (``data.packing=true``) holds several examples, told apart by ``position_ids`` that
restart at 0; transformers turns them into a block-diagonal causal mask, and sdpa with a mask
computes every score of the ``L x L`` square, most of them masked (4 examples of 128 tokens in a
512-token row: 7/8 of it). This attention runs each example's block alone with ``is_causal=True``
instead: the same result (tests/test_packing.py), 1.6-2.7x faster attention on the SmolLM2-135M
shape, ~5% of a LoRA step (bench/RESULTS.md).

It takes that path only when it is provably the same computation: CPU tensors, a causal module,
no cache, and a boolean mask equal to the block-causal mask of the position ids. Anything else (GPU,
padding masks, generation, one example per row) goes to transformers' sdpa unchanged. On GPU,
packing is best served by ``model.attn_implementation=flash_attention_2`` (varlen kernels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "finetune_sdpa_packed"


def _segment_lengths(query, key, attention_mask, position_ids) -> list[list[int]] | None:
    """Example lengths of each row when the mask is exactly block-causal over them, else None."""
    batch, _, length, _ = query.shape
    if (query.device.type != "cpu" or position_ids is None or attention_mask is None
            or attention_mask.dtype != torch.bool or key.shape[2] != length or length < 2
            or attention_mask.shape != (batch, 1, length, length) or position_ids.shape[-1] != length):
        return None
    pos = position_ids.expand(batch, -1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1  # positions that do not continue start an example
    if not starts[:, 1:].any():
        return None
    seg = starts.cumsum(1)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    if not torch.equal(attention_mask[:, 0], (seg[:, :, None] == seg[:, None, :]) & causal):
        return None
    lengths = []
    for row in starts:
        idx = torch.nonzero(row).flatten().tolist() + [length]
        lengths.append([b - a for a, b in zip(idx[:-1], idx[1:])])
    return lengths


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs):
    """A transformers attention function: (B, H, L, D) in, ((B, L, H, D), None) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = (_segment_lengths(query, key, attention_mask, kwargs.get("position_ids"))
               if getattr(module, "is_causal", True) else None)
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    gqa = key.shape[1] != query.shape[1]
    rows = []
    # unbind/split rather than slicing: their backward is one stack/cat, not a zero-filled
    # full-size gradient per piece.
    for q, k, v, row_lengths in zip(query.unbind(0), key.unbind(0), value.unbind(0), lengths):
        parts = [F.scaled_dot_product_attention(qs[None], ks[None], vs[None], dropout_p=dropout,
                                                scale=scaling, is_causal=True, enable_gqa=gqa)[0]
                 for qs, ks, vs in zip(q.split(row_lengths, 1), k.split(row_lengths, 1),
                                       v.split(row_lengths, 1))]
        rows.append(torch.cat(parts, 1))
    return torch.stack(rows).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the attention, with transformers' sdpa mask builder, under :data:`NAME`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME


def implementation(attn: str, packing: bool) -> str:
    """What a model is built with: the packed attention for ``sdpa`` + packing, else ``attn``."""
    return register() if attn == "sdpa" and packing else attn

"""sdpa for packed rows: each packed example attends on its own, without the masked blocks.

A packed row (``data.packing=true``) holds several examples, told apart by ``position_ids`` that
restart at 0; transformers turns them into a block-diagonal causal mask, and sdpa with a mask
computes every score of the ``L x L`` square, most of them masked (4 examples of 128 tokens in a
512-token row: 7/8 of it). This attention computes only each example's own causal block instead:

- on CPU, sdpa with ``is_causal=True`` per example: the same result (tests/test_packing.py),
  1.6-2.7x faster attention on the SmolLM2-135M shape, ~5% of a LoRA step (bench/RESULTS.md);
- on CUDA (fp16/bf16, compute capability >= 8.0), one call of torch's own variable-length flash
  kernel (``torch.nn.attention.varlen.varlen_attn``) over all the batch's examples, so packing
  is padding-free on GPU without the separate flash-attn package (tests/gpu, bench/gpu.sh).

It takes that path only when it is provably the same computation: a causal module, no cache, no
dropout, and a boolean mask equal to the block-causal mask of the position ids. Anything else
(padding masks, generation, one example per row, fp32 on GPU, a torch without ``varlen_attn``)
goes to transformers' sdpa unchanged.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F

NAME = "finetune_sdpa_packed"


def _segment_lengths(query, key, attention_mask, position_ids) -> list[list[int]] | None:
    """Example lengths of each row when the mask is exactly block-causal over them, else None."""
    batch, _, length, _ = query.shape
    if (position_ids is None or attention_mask is None
            or attention_mask.dtype != torch.bool or key.shape[2] != length or length < 2
            or attention_mask.shape != (batch, 1, length, length) or position_ids.shape[-1] != length):
        return None
    pos = position_ids.expand(batch, -1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1  # positions that do not continue start an example
    if not starts[:, 1:].any():
        return None
    seg = starts.cumsum(1)
    causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    if not torch.equal(attention_mask[:, 0], (seg[:, :, None] == seg[:, None, :]) & causal):
        return None
    lengths = [[] for _ in range(batch)]
    begins = starts.nonzero().tolist()  # (row, start) pairs in row order: one host sync per layer
    for (row, a), nxt in zip(begins, begins[1:] + [[batch, 0]]):
        lengths[row].append((nxt[1] if nxt[0] == row else length) - a)
    return lengths


def _varlen_kernel(device: torch.device):
    """torch's variable-length flash attention, where this torch and GPU have it; else None."""
    return _varlen_kernel_on(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _varlen_kernel_on(device_index: int):
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn if torch.cuda.get_device_capability(device_index) >= (8, 0) else None


def _fast_path_possible(module, query, dropout: float) -> bool:
    """The checks that need no look at the mask (no device sync)."""
    if not getattr(module, "is_causal", True):
        return False
    if query.device.type == "cpu":
        return True
    return (query.device.type == "cuda" and dropout == 0.0 and query.shape[-1] <= 256
            and query.dtype in (torch.float16, torch.bfloat16)
            and _varlen_kernel(query.device) is not None)


def _varlen_attention(query, key, value, lengths: list[list[int]], scaling: float | None):
    """All examples of the batch in one varlen flash call: (B, H, L, D) in, (B, L, H, D) out."""
    kernel = _varlen_kernel(query.device)
    batch, heads, length, dim = query.shape
    if key.shape[1] != heads:  # grouped-query attention: head i reads key/value head i // groups
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    flat = [n for row in lengths for n in row]
    cu = torch.tensor([0, *itertools.accumulate(flat)], dtype=torch.int32).to(query.device, non_blocking=True)

    def tokens(t):  # (B, H, L, D) -> (B * L, H, D)
        return t.transpose(1, 2).reshape(batch * length, heads, dim)

    longest = max(flat)
    out = kernel(tokens(query), tokens(key), tokens(value), cu, cu, longest, longest, scale=scaling,
                 window_size=(-1, 0))
    return out.view(batch, length, heads, dim)


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs):
    """A transformers attention function: (B, H, L, D) in, ((B, L, H, D), None) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = (_segment_lengths(query, key, attention_mask, kwargs.get("position_ids"))
               if _fast_path_possible(module, query, dropout) else None)
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if query.device.type == "cuda":
        return _varlen_attention(query, key, value, lengths, scaling), None
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

"""Attention alone on packed rows: transformers' sdpa over the block-diagonal mask vs finetune's path.

One Llama attention layer (the shape's heads, KV heads and head size) runs forward + backward on a
packed batch whose example lengths follow the GPU benchmark's synthetic data (64 to seq_len/3
tokens, best-fit packed into rows of seq_len). Both variants are timed alternately in this
process after warm-up; the outputs and input gradients are compared before timing, so a fast path
that computes something else cannot report a time.

    python bench/packed_attention.py                          # CUDA: bf16, rows of 4096 (varlen flash)
    python bench/packed_attention.py --device cpu --seq-len 512 --dtype float32   # CPU: per-example sdpa
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import print_machine  # noqa: E402

from finetune.model import attention  # noqa: E402
from finetune.data.packing import pack_examples  # noqa: E402


def packed_lengths(rows: int, seq_len: int, seed: int) -> list[list[int]]:
    """``rows`` best-fit packed rows of examples 64..seq_len/3 long; each row padded by a last segment."""
    rng = random.Random(seed)
    lengths = [rng.randint(min(64, seq_len // 4), max(seq_len // 3, 65)) for _ in range(rows * seq_len // 200)]
    bins = pack_examples(lengths, seq_len)[:rows]
    out = []
    for b in bins:
        row = [lengths[i] for i in b]
        if sum(row) < seq_len:
            row.append(seq_len - sum(row))  # the collator's padding: positions 0.. (its own "example")
        out.append(row)
    return out


def inputs(lengths, heads, kv_heads, dim, device, dtype, seed):
    batch, seq_len = len(lengths), sum(lengths[0])
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(batch, heads, seq_len, dim, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(batch, kv_heads, seq_len, dim, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(batch, kv_heads, seq_len, dim, generator=g).to(device, dtype).requires_grad_()
    pos = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in lengths]).to(device)
    seg = torch.cat([torch.cat([torch.full((n,), i) for i, n in enumerate(row)])[None] for row in lengths]).to(device)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    mask = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]  # what transformers builds for packed rows
    return q, k, v, pos, mask


class Module(torch.nn.Module):
    is_causal = True

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups


def run(fn, module, q, k, v, mask, pos, grad_out):
    for t in (q, k, v):
        t.grad = None
    out, _ = fn(module, q, k, v, mask, dropout=0.0, scaling=q.shape[-1] ** -0.5, position_ids=pos)
    out.backward(grad_out)
    return out.detach(), [t.grad.detach().clone() for t in (q, k, v)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 (CUDA default) | float32 (CPU default)")
    p.add_argument("--seq-len", type=int, default=None, help="row length (CUDA 4096, CPU 512)")
    p.add_argument("--rows", type=int, default=2, help="rows per batch (the micro-batch)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    cuda = a.device.startswith("cuda")
    dtype = getattr(torch, a.dtype or ("bfloat16" if cuda else "float32"))
    seq_len = a.seq_len or (4096 if cuda else 512)
    repeats = a.repeats or (50 if cuda else 10)
    m = print_machine(f"packed attention fwd+bwd: device={a.device}, {dtype}, {a.rows} rows x {seq_len}, "
                      f"heads {a.heads}/{a.kv_heads}, head dim {a.head_dim}")
    lengths = packed_lengths(a.rows, seq_len, a.seed)
    print(f"# examples per row: {[len(r) for r in lengths]} (lengths {lengths})")
    q, k, v, pos, mask = inputs(lengths, a.heads, a.kv_heads, a.head_dim, a.device, dtype, a.seed)
    module = Module(a.heads // a.kv_heads)
    grad_out = torch.randn(a.rows, seq_len, a.heads, a.head_dim, generator=torch.Generator().manual_seed(1))
    grad_out = grad_out.to(a.device, dtype)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    variants = {"sdpa (block-diagonal mask)": sdpa_attention_forward,
                "finetune packed": attention.packed_sdpa_attention}
    taken = []
    real = attention._segment_lengths
    attention._segment_lengths = lambda *x: taken.append(real(*x)) or taken[-1]
    ref_out, ref_grads = run(variants["sdpa (block-diagonal mask)"], module, q, k, v, mask, pos, grad_out)
    out, grads = run(variants["finetune packed"], module, q, k, v, mask, pos, grad_out)
    attention._segment_lengths = real
    if not taken or taken[-1] is None:
        raise SystemExit("the packed path fell back to sdpa for this batch: nothing to compare")
    worst = 0.0
    for name, x, y in [("out", out, ref_out)] + list(zip("qkv", grads, ref_grads)):
        err = float((x.float() - y.float()).norm() / y.float().norm())
        worst = max(worst, err)
        print(f"# {name}: relative difference {err:.2e}")
    if worst > (2e-2 if dtype != torch.float32 else 1e-4):
        raise SystemExit(f"outputs differ ({worst:.2e}): not timing a different computation")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    times = {name: [] for name in variants}
    for i in range(repeats + 3):
        for name, fn in variants.items():
            sync()
            t0 = time.perf_counter()
            run(fn, module, q, k, v, mask, pos, grad_out)
            sync()
            if i >= 3:
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["sdpa (block-diagonal mask)"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:28s} median {med * 1e3:8.2f} ms  (min {min(ts) * 1e3:.2f})  speed-up {base / med:.2f}x")
    print(f"# {repeats} alternating repeats after 3 warm-ups; commit {m['commit']}")


if __name__ == "__main__":
    main()

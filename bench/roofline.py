"""A roofline for this machine: GEMM peak at the run's own matmul shapes vs what a run achieves.

1. The peak: every distinct linear-layer shape of the model (LoRA r16 on q/k/v/o/gate/up/down, the
   50k-vocabulary head included) timed as ``2048 x in @ in x out`` in fp32 and bf16, in this process
   (the thread count a run gets). The best shape is the peak a run is measured against.
2. The run: ``python -m finetune recipe=lora-llm`` on the same model dir (random weights, vs_hf.py's
   shapes), real alpaca data packed 4 x 512, LoRA or full fine-tuning, fp32 or bf16 autocast; its
   ``flops_per_s`` (metrics.jsonl: finetune/train/flops.py's count) over the steps after the warm-up.
3. The split of those FLOPs per token: linear forward, input gradients, weight gradients, head,
   attention.

    python bench/roofline.py                                   # 32M shape, lora + full, fp32 + bf16
    python bench/roofline.py --shape smollm2-135m --modes lora --precisions fp32
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finetune_entry, print_machine, read_jsonl, run_child, table  # noqa: E402
from vs_hf import ALPHA, R, SHAPES, TARGETS, alpaca_rows, save_model  # noqa: E402

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def model_and_counter(model_dir: Path, mode: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.train.flops import FlopCounter

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if mode == "lora":
        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS))
    return model, FlopCounter(model)


def gemm_table(shapes: list[tuple[int, int]], precision: str, rows: int = 2048) -> list[dict]:
    import torch

    from finetune.train.flops import measured_peak

    dtype = getattr(torch, DTYPES[precision])
    cap = 1 << 24  # measured_peak's output cap: the 50k head is timed on fewer rows
    return [{"shape": f"{min(rows, cap // o)} x {i} @ {i} x {o}",
             "gflops": measured_peak([(i, o)], rows, dtype, budget_s=0.3, max_out=cap) / 1e9}
            for i, o in sorted(set(shapes), key=lambda s: -s[0] * s[1])]


def run(work: Path, model_dir: Path, mode: str, precision: str, steps: int, warmup: int) -> dict:
    out = work / f"run-{mode}-{precision}"
    shutil.rmtree(out, ignore_errors=True)
    peft = ([f"peft.r={R}", f"peft.alpha={ALPHA}", "peft.dropout=0.0", f"peft.target_modules=[{','.join(TARGETS)}]"]
            if mode == "lora" else ["peft=none"])
    cmd = [*finetune_entry(), "recipe=lora-llm", "model=smollm2-135m", f"model.name_or_path={model_dir}",
           "model.dtype=float32", "model.attn_implementation=sdpa", f"trainer.precision={precision}",
           f"data.path={work / 'alpaca.jsonl'}", "data.format=alpaca", "data.eval_size=0", "data.eval_split=null",
           "data.max_seq_len=512", "data.packing=true", f"data.cache_dir={work / 'cache'}", *peft,
           "optim.lr=2e-4", "optim.warmup_steps=0", "optim.warmup_ratio=0.0", "optim.scheduler=constant",
           f"trainer.max_steps={steps}", "trainer.micro_batch_size=4", "trainer.grad_accum=1",
           f"trainer.log_steps={warmup}", "trainer.eval_steps=0", "trainer.save_steps=0",
           "trainer.sample_prompts=0", "trainer.exact_match_prompts=0", "trainer.progress=false",
           "logger.plots=false", "export.merge=false", "seed=42", f"output_dir={out}"]
    log = work / f"log-{mode}-{precision}.txt"
    code, wall, rss = run_child(cmd, log=log)
    if code:
        raise SystemExit(f"finetune failed ({code}); see {log}")
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "flops_per_s" in r and r["step"] > warmup]
    seconds = sum(r["step_time_s"] * warmup for r in rows)
    flops = sum(r["flops_per_s"] * r["step_time_s"] * warmup for r in rows)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] * warmup for r in rows)
    return {"flops_s": flops / seconds, "tok_s": tokens / seconds, "rss": rss, "mfu_logged": rows[-1]["mfu"]}


def split(counter, tokens: int, head_positions: int, sum_n2: float) -> dict:
    parts = counter.parts(tokens, head_positions, sum_n2)
    total = sum(parts.values())
    return {k: v / total for k, v in parts.items()}


def data_sample(work: Path) -> tuple[int, int, float]:
    """Tokens, head positions and sum of squared example lengths over the cached packed data."""
    import numpy as np

    npz = max((work / "cache").glob("data/*/train.npz"), key=lambda p: p.stat().st_mtime)  # this run's
    z = np.load(npz)
    off, labels = z["offsets"], z["labels"]
    lengths = np.diff(off)
    return int(lengths.sum()), int((labels != -100).sum()), float((lengths.astype(np.float64) ** 2).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-32m")
    p.add_argument("--modes", default="lora,full")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--work", default=None)
    a = p.parse_args()
    if (a.steps - a.warmup) % a.warmup:
        raise SystemExit("--steps minus --warmup must be a multiple of --warmup (the run logs every --warmup steps)")
    print_machine(f"roofline: shape={a.shape}, modes={a.modes}, precisions={a.precisions}, "
                  f"steps={a.steps} (warm-up {a.warmup} excluded)")
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-roofline-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / f"model-{a.shape}"
    if not (model_dir / "config.json").exists():
        save_model(a.shape, model_dir)
    import json

    (work / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows()))
    results = []
    for mode in a.modes.split(","):
        _, counter = model_and_counter(model_dir, mode)
        for precision in a.precisions.split(","):
            gemms = gemm_table(counter.shapes, precision)
            peak = max(g["gflops"] for g in gemms)
            print(f"\n## GEMM at the {mode} run's shapes, {precision} (peak {peak:,.1f} GFLOP/s)")
            print(table(gemms, [("shape", "matmul", ""), ("gflops", "GFLOP/s", ",.1f")]), flush=True)
            t0 = time.time()
            r = run(work, model_dir, mode, precision, a.steps, a.warmup)
            r.update(mode=mode, precision=precision, peak=peak, mfu=r["flops_s"] / 1e9 / peak)
            results.append(r)
            print(f"  {mode} {precision}: {r['flops_s'] / 1e9:,.1f} GFLOP/s = {r['mfu']:.1%} of the measured "
                  f"peak ({r['tok_s']:,.0f} tok/s, logged mfu {r['mfu_logged']:.1%}, {time.time() - t0:.0f} s)",
                  flush=True)
        parts = split(counter, *data_sample(work))
        print(f"\n## {mode}: where the counted FLOPs go (alpaca, packed)\n"
              + table([{"part": k, "share": v} for k, v in parts.items()], [("part", "part", ""), ("share", "share", ".1%")]))
    print("\n## roofline")
    print(table(results, [("mode", "mode", ""), ("precision", "precision", ""), ("tok_s", "tok/s", ",.0f"),
                          ("flops_s", "achieved FLOP/s", ".3e"), ("peak", "GEMM peak GFLOP/s", ",.1f"),
                          ("mfu", "MFU vs peak", ".1%"), ("mfu_logged", "mfu logged by the run", ".1%"),
                          ("rss", "peak RSS MiB", ",.0f")]))


if __name__ == "__main__":
    main()

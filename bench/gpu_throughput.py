"""LoRA and full fine-tune throughput of finetune on one GPU: tokens/s and MFU.

A Llama-shaped model with random weights (``--shape``: 1b = TinyLlama-1.1B's shape, hidden 2048,
22 layers, 32 heads / 4 KV heads, MLP 5632, vocab 32000; 0.5b = hidden 1536, 20 layers, 12/4
heads, MLP 4096, tied embeddings) is saved with ``save_pretrained`` next to a character-level
tokenizer built in code (no network, no Hub); a synthetic prompt/completion set (lengths 64 to
seq_len/3 tokens, half prompt) is written as jsonl. Each (mode, attention) pair runs the public
entry ``python -m finetune`` in a fresh process: bf16 weights (model.dtype=auto on a bf16 GPU),
packing into rows of --seq-len tokens (position ids, no mask). ``--attn`` lists the attention
implementations to compare: sdpa (with packing: finetune's varlen flash path, finetune/attention.py),
sdpa-masked (bench only, the A/B baseline: sdpa with finetune's packed attention switched off
in-process), sdpa-chunked-loss (sdpa with ``trainer.chunked_loss=on``; auto leaves it off on CUDA),
flash_attention_2 (needs the flash-attn package), flex_attention (transformers' block mask).

Figures (after the warm-up window, from finetune's metrics.jsonl):
- tokens/s: non-padding tokens per second (finetune's ``tokens_per_s``);
- MFU = (6 * N * tokens + attention FLOPs) / seconds / peak, where N is the base model's parameter
  count (the 6N convention for both modes: LoRA skips the frozen weights' gradient, so its
  hardware FLOPs are nearer 4N), attention FLOPs are 6 * 2 * n^2 * hidden per layer for each packed
  example of n tokens (QK^T and AV, causal half, forward + backward), and the peak is MEASURED:
  the best of a few large bf16 matmuls on this card (fp32 on CPU), before and again after the runs
  (the higher counts: one H200 read 670 TFLOP/s once and 795 another time).

    python bench/gpu_throughput.py                       # on a GPU: full then LoRA, 1b, sdpa, ~2-3 min
    python bench/gpu_throughput.py --attn sdpa,flex_attention --modes full
    python bench/gpu_throughput.py --device cpu --tiny   # CPU smoke test of the same path (~1 min)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finetune_entry, print_machine, read_jsonl, run_child, table  # noqa: E402

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    "0.5b": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=20, num_attention_heads=12,
                 num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}


def measured_peak_flops(device: str) -> tuple[float, str]:
    """Best FLOP/s of large matmuls: bf16 on CUDA, fp32 on CPU (what the CPU smoke test runs)."""
    import torch

    if device == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 20
    else:
        n, dtype, reps = 1024, torch.float32, 3
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    if device == "cuda":  # ~1 s of products first: an idle card starts at low clocks (345 MHz seen)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 1.0:
            a @ b
            torch.cuda.synchronize()
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    return best, f"{'bf16' if device == 'cuda' else 'fp32'} {n}x{n} matmul"


def save_model(shape: str, out: Path, device: str) -> int:
    """Random-weight Llama + a character tokenizer built in code; returns the parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.model.builtin import tiny_chat_tokenizer

    tok = tiny_chat_tokenizer()
    cfg = LlamaConfig(max_position_embeddings=8192, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):  # random init of 1B weights: seconds on a GPU, a minute on CPU
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return n


def synthetic_data(path: Path, rows: int, max_len: int, seed: int = 0) -> None:
    """prompt/completion pairs of random characters: one character = one token, so lengths are exact."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz ,.;:!?0123456789"
    lines = []
    for _ in range(rows):
        n = rng.randint(min(64, max_len // 2), max_len - 2)
        p = n // 2
        lines.append(json.dumps({"prompt": "".join(rng.choices(alphabet, k=p)),
                                 "completion": "".join(rng.choices(alphabet, k=n - p))}))
    path.write_text("\n".join(lines) + "\n")


def attention_flops_per_token(data_dir: Path, layers: int, hidden: int) -> float:
    """Training attention FLOPs per token of the packed data: sum_n 6 * 2 * n^2 * hidden * layers / tokens."""
    import numpy as np

    npz = max(data_dir.glob("data/*/train.npz"), key=lambda f: f.stat().st_mtime)  # this run's cache
    lengths = np.diff(np.load(npz)["offsets"]).astype(np.float64)
    return float(6 * 2 * (lengths ** 2).sum() * hidden * layers / lengths.sum())


def finetune_cmd(mode: str, attn: str, model_dir: Path, data: Path, out: Path, a) -> list[str]:
    off = ("packed-attention",) if attn == "sdpa-masked" else ()
    chunked = "on" if attn == "sdpa-chunked-loss" else "auto"
    attn = "sdpa" if attn.startswith("sdpa") else attn
    recipe = ["recipe=lora-llm", "peft.r=16", "peft.alpha=32", "peft.dropout=0.0", "optim.lr=2e-4"] \
        if mode == "lora" else ["recipe=full-llm", "optim.lr=1e-5"]
    return [*finetune_entry(off), *recipe, f"trainer.chunked_loss={chunked}", "model=smollm2-135m",
            f"model.name_or_path={model_dir}", f"model.attn_implementation={attn}",
            f"model.gradient_checkpointing={'true' if a.grad_ckpt else 'false'}",
            f"data.path={data}", "data.format=prompt_completion", "data.eval_size=0", "data.eval_split=null",
            f"data.max_seq_len={a.seq_len}", "data.packing=true", f"data.cache_dir={data.parent / 'cache'}",
            "optim.warmup_steps=0", "optim.warmup_ratio=0.0", "optim.scheduler=constant",
            f"trainer.max_steps={a.steps}", f"trainer.micro_batch_size={a.mb}", "trainer.grad_accum=1",
            f"trainer.log_steps={a.warmup}", "trainer.eval_steps=0", "trainer.save_steps=0",
            "trainer.sample_prompts=0", "trainer.progress=false", "logger.plots=false", f"output_dir={out}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny model, short rows, few steps (smoke test)")
    p.add_argument("--shape", choices=[s for s in SHAPES if s != "tiny"], default="1b")
    p.add_argument("--modes", default="full,lora")
    p.add_argument("--attn", default="sdpa",
                   help="comma list of sdpa | sdpa-masked | sdpa-chunked-loss | flash_attention_2 | flex_attention")
    p.add_argument("--rows", type=int, default=None, help="synthetic examples (default 2000; tiny 400)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--mb", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--work", default=None)
    a = p.parse_args()
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if a.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --device cpu --tiny for the CPU smoke test")
    shape = "tiny" if a.tiny else a.shape
    defaults = dict(seq_len=256, mb=2, steps=6, warmup=2) if a.tiny else dict(seq_len=4096, mb=2, steps=50, warmup=10)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    m = print_machine(f"finetune GPU throughput: shape={shape}, device={a.device}, attn={a.attn}, "
                      f"seq_len={a.seq_len}, mb={a.mb}, steps={a.steps} (warm-up {a.warmup} excluded), packing")
    if a.device == "cuda":
        import torch

        print(f"# device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    peak, how = measured_peak_flops(a.device)
    print(f"# measured peak: {peak / 1e12:.3g} TFLOP/s ({how})", flush=True)
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, data = work / f"model-{shape}", work / "synthetic.jsonl"
    t0 = time.perf_counter()
    n_params = save_model(shape, model_dir, a.device)  # rewritten each time: same seed, same weights
    synthetic_data(data, a.rows or (400 if a.tiny else 2000), a.seq_len // (1 if a.tiny else 3))
    print(f"# model {n_params / 1e6:.1f}M parameters saved in {time.perf_counter() - t0:.0f}s", flush=True)
    cfg = SHAPES[shape]
    rows = []
    attn_per_tok = None
    failed = []
    for mode, attn in [(m_, at) for m_ in a.modes.split(",") for at in a.attn.split(",")]:
        out = work / f"run-{mode}-{attn}"
        shutil.rmtree(out, ignore_errors=True)
        log = work / f"log-{mode}-{attn}.txt"
        code, wall, rss = run_child(finetune_cmd(mode, attn, model_dir, data, out, a), env=env, log=log)
        if code:  # report it and go on: one attention failing must not hide the others' figures
            print(log.read_text()[-2000:])
            print(f"  {mode}/{attn}: FAILED (exit {code}); log {log}", flush=True)
            failed.append(f"{mode}/{attn}")
            continue
        if attn_per_tok is None:
            attn_per_tok = attention_flops_per_token(data.parent / "cache", cfg["num_hidden_layers"],
                                                     cfg["hidden_size"])
        train = [r for r in read_jsonl(out / "metrics.jsonl") if "tokens_per_s" in r]
        prev, tokens, seconds = 0, 0.0, 0.0
        for r in train:
            k = r["step"] - prev
            if prev >= a.warmup:
                seconds += r["step_time_s"] * k
                tokens += r["tokens_per_s"] * r["step_time_s"] * k
            prev = r["step"]
        tok_s = tokens / seconds
        last = train[-1]
        if "attention: finetune_sdpa_packed" in log.read_text():
            attn += " (finetune packed)"  # the child logged that it built the model with it
        rows.append({"mode": mode, "attn": attn, "tok_s": tok_s, "step_s": seconds / (a.steps - a.warmup), "mem": last.get("cuda_allocated_mib"),
                     "rss": rss, "wall": wall, "loss": f"{train[0]['loss']:.3f}->{last['loss']:.3f}"})
        print(f"  {mode}/{attn}: {tok_s:,.0f} tok/s, MFU {(6 * n_params + attn_per_tok) * tok_s / peak:.1%} "
              f"of the peak measured before", flush=True)
    if not rows:
        raise SystemExit(f"every run failed: {', '.join(failed)}")
    after, _ = measured_peak_flops(a.device)
    print(f"# measured peak after the runs: {after / 1e12:.3g} TFLOP/s", flush=True)
    peak = max(peak, after)
    for r in rows:
        r["mfu"] = (6 * n_params + attn_per_tok) * r["tok_s"] / peak
    print()
    print(table(rows, [("mode", "mode", ""), ("attn", "attention", ""), ("tok_s", "tokens/s", ",.0f"), ("step_s", "step s", ".3f"),
                       ("mfu", "MFU", ".1%"), ("mem", "peak CUDA alloc MiB", ",.0f"),
                       ("rss", "peak RSS MiB", ",.0f"), ("wall", "process s", ".0f"), ("loss", "loss", "")]))
    print(f"# N = {n_params / 1e6:.1f}M, attention {attn_per_tok / 1e6:.1f} MFLOP/token, peak "
          f"{peak / 1e12:.3g} TFLOP/s measured (the higher of before / after); commit {m['commit']}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

"""finetune recipe=dpo-llm vs TRL's DPOTrainer: useful tokens/s and peak RSS on the same pairs and model.

Same model dir (a Llama with random weights saved with ``save_pretrained``, SmolLM2-135M-shaped by
default, ``--shape tiny`` for a quick check; the GPT-2 BPE + chatml specials, as bench/vs_hf.py),
same pairs (real: /work/shared/data/preference-real/dpo_en_demo.json, LLaMA-Factory's sharegpt
ranking layout; TRL gets them as conversational prompt / chosen / rejected), sigmoid loss, beta 0.1,
LoRA r16 / alpha 32 / dropout 0 on q/k/v/o/gate/up/down (the reference = the adapter disabled on
both sides; ``--peft none``: full fine-tuning against a frozen copy), micro-batch --mb pairs, AdamW
lr 1e-4 constant, sequences cut at --max-len tokens. ``--precompute``: reference log-probs computed
once before training on both sides (finetune ``pref.precompute_ref=true``, TRL
``precompute_ref_log_probs=True``); the precompute pass is not in the timed steps of either.
``--packed``: finetune with ``data.packing=true`` (each micro-batch's chosen + rejected sequences
packed padding-free, finetune/tasks/preference_batches.py); TRL pads as before.

Each framework runs in a fresh process, one after the other, ``--repeats`` times (order flipped each
repeat); tokens/s = non-padding tokens of chosen + rejected per second of the steps after the first
``--warmup`` (finetune: its metrics.jsonl windows; TRL: step-end timestamps and the attention-mask
sum of each batch); RSS = the child's peak resident set (ru_maxrss).

    python bench/vs_trl_dpo.py --shape tiny --steps 12          # a minute
    python bench/vs_trl_dpo.py                                  # SmolLM2-135M shape, both reference modes
    python bench/vs_trl_dpo.py --packed --modes live            # finetune's packed pairs vs TRL
    python bench/vs_trl_dpo.py --pairs 48 --steps 8             # both modes on the first 48 pairs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_as_child, SHARED, median, print_machine, read_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = SHARED / "preference-real" / "dpo_en_demo.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def child_ours(args, work: Path) -> dict:
    out = work / f"ours-{time.time_ns()}"
    cmd = [sys.executable, "-m", "finetune", "recipe=dpo-llm", "model=smollm2-135m",
           f"model.name_or_path={work / 'model'}", "model.dtype=float32", f"data.path={args.data}",
           "data.eval_split=null", "data.eval_size=0", f"data.max_seq_len={args.max_len}",
           f"data.cache_dir={work / 'cache'}", f"trainer.max_steps={args.steps}",
           f"trainer.micro_batch_size={args.mb}", f"trainer.log_steps={args.warmup}", "trainer.eval_steps=0",
           "trainer.save_steps=0", "trainer.progress=false", "logger.plots=false", "optim.lr=1e-4",
           "optim.scheduler=constant", "optim.warmup_steps=0", "optim.warmup_ratio=0.0",
           f"pref.precompute_ref={'true' if args.precompute else 'false'}", "pref.rpo_alpha=0",  # TRL's sigmoid alone
           "trainer.exact_match_prompts=0", "trainer.sample_prompts=0", "seed=42", f"output_dir={out}"]
    cmd += ["peft=none"] if args.peft == "none" else ["peft.r=16", "peft.alpha=32", "peft.dropout=0.0"]
    cmd += ["data.packing=true"] if args.packed else []
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"finetune failed:\n{proc.stderr[-3000:]}")
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "tokens_per_s" in r]
    prev, tokens, seconds = 0, 0.0, 0.0
    for r in rows:
        if prev >= args.warmup:  # the windows after the warm-up window
            seconds += r["step_time_s"] * (r["step"] - prev)
            tokens += r["tokens_per_s"] * r["step_time_s"] * (r["step"] - prev)
        prev = r["step"]
    return {"tokens_per_s": tokens / seconds, "first_loss": rows[0]["loss"]}


def child_trl(args, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    ref, lora = None, None
    if args.peft == "none":
        ref = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32).eval()
    else:
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    rows = [{"prompt": [{"role": role[m["from"]], "content": m["value"]} for m in r["conversations"]],
             "chosen": [{"role": "assistant", "content": r["chosen"]["value"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]["value"]}]}
            for r in json.loads(Path(args.data).read_text())]
    counted, stamps = [0], []

    class Timing(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append((time.perf_counter(), counted[0]))

    class Counting(DPOTrainer):
        def compute_loss(self, model, inputs, *a, **k):
            counted[0] += int(inputs["attention_mask"].sum())
            return super().compute_loss(model, inputs, *a, **k)

    cfg = DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=args.mb, max_steps=args.steps,
                    learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, beta=0.1,
                    loss_type=["sigmoid"], max_length=args.max_len, logging_steps=1, report_to=[],
                    save_strategy="no", use_cpu=True, seed=42, gradient_checkpointing=False,
                    precompute_ref_log_probs=args.precompute, dataloader_num_workers=0)
    trainer = Counting(model=model, ref_model=ref, args=cfg, train_dataset=Dataset.from_list(rows),
                       processing_class=tok, peft_config=lora, callbacks=[Timing()])
    trainer.train()
    (t0, n0), (t1, n1) = stamps[args.warmup - 1], stamps[-1]
    return {"tokens_per_s": (n1 - n0) / (t1 - t0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=["smollm2-135m", "tiny"], default="smollm2-135m")
    ap.add_argument("--peft", choices=["lora", "none"], default="lora")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--mb", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--modes", default="live,precompute", help="reference modes: live, precompute (comma list)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--pairs", type=int, default=0,
                    help="use the first N pairs of --data (0: all; the precompute pass covers every pair)")
    ap.add_argument("--child", choices=["ours", "trl"])
    ap.add_argument("--precompute", action="store_true")
    ap.add_argument("--packed", action="store_true", help="finetune with data.packing=true (TRL unchanged)")
    ap.add_argument("--work")
    args = ap.parse_args()
    if args.child:
        run_as_child(child_ours if args.child == "ours" else child_trl, args, Path(args.work))
        return
    print_machine(f"DPO: finetune vs TRL, {args.shape}, peft={args.peft}, mb {args.mb}, max {args.max_len}"
                  f"{', finetune packed' if args.packed else ''}")
    from vs_hf import save_model

    with tempfile.TemporaryDirectory() as tmp:
        save_model(args.shape, Path(tmp) / "model")
        if args.pairs:  # both sides read the same subset
            subset = Path(tmp) / f"first-{args.pairs}.json"
            subset.write_text(json.dumps(json.loads(Path(args.data).read_text())[:args.pairs]))
            args.data = str(subset)
        for mode in args.modes.split(","):
            results: dict = {"ours": [], "trl": []}
            for rep in range(args.repeats):
                for name in (("ours", "trl") if rep % 2 == 0 else ("trl", "ours")):
                    cmd = [sys.executable, __file__, "--child", name, "--work", tmp, "--steps", str(args.steps),
                           "--warmup", str(args.warmup), "--mb", str(args.mb), "--max-len", str(args.max_len),
                           "--data", args.data, "--peft", args.peft] + (["--precompute"] if mode == "precompute" else [])
                    cmd += ["--packed"] if args.packed else []
                    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                                          env={**os.environ, "PYTHONPATH": str(REPO)})
                    if proc.returncode:
                        raise SystemExit(f"{name} ({mode}) failed:\n{proc.stderr[-3000:]}")
                    results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            tps = {k: median([r["tokens_per_s"] for r in v]) for k, v in results.items()}
            rss = {k: median([r["peak_rss_mib"] for r in v]) for k, v in results.items()}
            for name in ("ours", "trl"):
                runs = ", ".join(f"{r['tokens_per_s']:.0f}" for r in results[name])
                print(f"[{mode}] {name:4s} tokens/s {tps[name]:9.1f} (runs: {runs})   peak RSS {rss[name]:7.1f} MiB")
            print(f"[{mode}] ratio: {tps['ours'] / tps['trl']:.2f}x TRL tokens/s, "
                  f"{rss['ours'] / rss['trl']:.2f}x TRL peak RSS", flush=True)
    print(f"load after: {Path('/proc/loadavg').read_text().split()[0]}")


if __name__ == "__main__":
    main()

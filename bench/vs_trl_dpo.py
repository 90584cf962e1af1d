"""finetune recipe=dpo-llm vs TRL's DPOTrainer: tokens/s and peak RSS on the same pairs and model.

Same model (the built-in tiny Llama, seed 42, full fine-tuning: each framework keeps a frozen
reference copy), same pairs (real: /work/shared/data/preference-real/dpo_en_demo.json, LLaMA-Factory's
sharegpt ranking layout; TRL gets them as conversational prompt / chosen / rejected), sigmoid loss,
beta 0.1, micro-batch --mb pairs, AdamW lr 1e-4 constant, sequences cut at --max-len tokens.
Each framework runs in a fresh process; tokens/s = non-padding tokens of chosen + rejected per
second of the steps after the first (warm-up); RSS = the child's peak resident set (ru_maxrss).

    python bench/vs_trl_dpo.py --steps 20          # prints one row per framework and the ratios
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path("/work/shared/data/preference-real/dpo_en_demo.json")


def child_ours(args, work: Path) -> dict:
    out = work / "ours"
    cmd = [sys.executable, "-m", "finetune", "recipe=dpo-llm", "peft=none", f"data.path={args.data}",
           "data.eval_split=null", "data.eval_size=0", f"data.max_seq_len={args.max_len}",
           f"data.cache_dir={work / 'cache'}", f"trainer.max_steps={args.steps}",
           f"trainer.micro_batch_size={args.mb}", "trainer.log_steps=1", "trainer.eval_steps=0",
           "trainer.progress=false", "optim.lr=1e-4", "optim.scheduler=constant", "optim.warmup_steps=0",
           f"output_dir={out}"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "loss" in r and r["step"] > 1]
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in rows)
    return {"tokens_per_s": tokens / sum(r["step_time_s"] for r in rows)}


def child_trl(args, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from finetune.model.builtin import tiny_chat_tokenizer, tiny_llama_config

    tok = tiny_chat_tokenizer()
    torch.manual_seed(42)
    model = LlamaForCausalLM(tiny_llama_config(len(tok), tok.pad_token_id, tok.eos_token_id))
    ref = LlamaForCausalLM(model.config)
    ref.load_state_dict(model.state_dict())
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
                    save_strategy="no", use_cpu=True, seed=42, gradient_checkpointing=False)
    trainer = Counting(model=model, ref_model=ref.eval(), args=cfg, train_dataset=Dataset.from_list(rows),
                       processing_class=tok, callbacks=[Timing()])
    trainer.train()
    (t0, n0), (t1, n1) = stamps[0], stamps[-1]
    return {"tokens_per_s": (n1 - n0) / (t1 - t0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--mb", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--child", choices=["ours", "trl"])
    ap.add_argument("--work")
    args = ap.parse_args()
    if args.child:
        fn = child_ours if args.child == "ours" else child_trl
        result = fn(args, Path(args.work))
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # ours: the CLI process
        result["peak_rss_mib"] = max(own, kids) / 1024
        print(json.dumps(result))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("ours", "trl"):
            proc = subprocess.run([sys.executable, __file__, "--child", name, "--work", tmp, "--steps",
                                   str(args.steps), "--mb", str(args.mb), "--max-len", str(args.max_len),
                                   "--data", args.data], capture_output=True, text=True, cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
            if proc.returncode:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, r in results.items():
        print(f"{name:5s} tokens/s {r['tokens_per_s']:10.1f}   peak RSS {r['peak_rss_mib']:8.1f} MiB")
    print(f"ratio: {results['ours']['tokens_per_s'] / results['trl']['tokens_per_s']:.2f}x TRL tokens/s, "
          f"{results['ours']['peak_rss_mib'] / results['trl']['peak_rss_mib']:.2f}x TRL peak RSS")


if __name__ == "__main__":
    main()

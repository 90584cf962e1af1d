"""A third task defined here, outside finetune/, trains through the real loop and resumes exactly.

Token tagging: each character of a word is tagged vowel / consonant / other by a token-classification
head on the built-in tiny BERT. Nothing in finetune/ knows this task: it is picked with
``model.task=test_custom_task:CharTaggingTask`` (an import path), as a user's own task would be.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
import torch.nn.functional as F

from run_helpers import REPO, read_metrics, run_cli, train_losses
from finetune.data.tokenize import IGNORE, Encoded
from finetune.tasks import Task

TAGS = ("other", "vowel", "consonant")


def tag(char: str) -> int:
    if not char.isalpha():
        return 0
    return 1 if char.lower() in "aeiou" else 2


class CharTaggingTask(Task):
    name = "char-tagging"
    formats = ("text",)
    packs = False
    peft_task_type = "TOKEN_CLS"

    def auto_model_class(self):
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification

    def model_kwargs(self, cfg, label_names):
        return {"num_labels": len(TAGS), "id2label": dict(enumerate(TAGS)),
                "label2id": {t: i for i, t in enumerate(TAGS)}}

    def encode(self, tokenizer, items, stats, label_names):
        ids, labels = [], []
        for text in items:
            enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True,
                            truncation=True, max_length=self.cfg.data.max_seq_len)
            ids.append(enc["input_ids"])
            labels.append([IGNORE if a == b else tag(text[a]) for a, b in enc["offset_mapping"]])
            stats.kept += 1
            stats.tokens += len(enc["input_ids"])
        return Encoded.from_lists(ids, labels), list(TAGS)

    def loss_sum(self, model, batch):
        return self._forward(model, batch)[0]

    def count_targets(self, batch):
        return int((batch["labels"] != IGNORE).sum())

    def eval_sums(self, model, batch):
        loss, logits = self._forward(model, batch)
        keep = batch["labels"] != IGNORE
        return loss, {"correct": float((logits.argmax(-1)[keep] == batch["labels"][keep]).sum())}

    def eval_metrics(self, sums, count):
        return {"eval_accuracy": sums["correct"] / max(count, 1.0)}

    @staticmethod
    def _forward(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(),
                               ignore_index=IGNORE, reduction="sum")
        return loss, logits


def words(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [{"text": "".join(rng.choice(letters + "  .,!") for _ in range(rng.randint(6, 24)))}
            for _ in range(n)]


@pytest.mark.slow
def test_a_task_defined_outside_the_package_trains_and_resumes_exactly(tmp_path):
    data = tmp_path / "words.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in words(400)))
    args = ["recipe=lora-classifier", "model.task=test_custom_task:CharTaggingTask", f"data.path={data}",
            "data.format=text", "data.eval_split=null", "data.eval_size=40", "data.max_seq_len=32",
            "trainer.max_steps=40", "trainer.save_steps=20", "trainer.eval_steps=20", "trainer.log_steps=1",
            "trainer.micro_batch_size=8", "trainer.grad_accum=2", "peft.dropout=0.1", "optim.lr=5e-3",
            "trainer.progress=false", "logger.plots=false", f"data.cache_dir={tmp_path / 'cache'}"]
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    run_cli([*args, f"output_dir={tmp_path / 'full'}"], env=env, timeout=600, check=True)
    rows = read_metrics(tmp_path / "full")
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[-1]["eval_accuracy"] > 0.9, evals  # vowel / consonant / other, learned
    losses = train_losses(tmp_path / "full")
    assert losses[-1][1] < 0.5 * losses[0][1]
    # The adapter holds the task's head: final/ loads as a token classifier with its tag names.
    from peft import AutoPeftModelForTokenClassification

    model = AutoPeftModelForTokenClassification.from_pretrained(tmp_path / "full" / "final")
    assert model.config.id2label == dict(enumerate(TAGS))
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[2, 10, 11, 3]])).logits.shape == (1, 4, len(TAGS))

    resumed = run_cli([*args, f"output_dir={tmp_path / 'resumed'}",
                       f"resume={tmp_path / 'full' / 'checkpoints' / 'step-00000020'}"], env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert train_losses(tmp_path / "resumed") == [(s, v) for s, v in losses if s > 20]


def test_an_unknown_task_path_is_one_line(tmp_path):
    proc = run_cli(["recipe=lora-llm", "model.task=no_such_module:Task", f"output_dir={tmp_path / 'run'}"],
                   timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "model.task='no_such_module:Task'" in lines[0], proc.stderr

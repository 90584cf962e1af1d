"""Sequence classification: (text, label) rows, one cross-entropy target per row.

Labels are named: ``data.labels`` or the sorted set found in the training data; their order fixes
the class ids (saved as id2label / label2id in the model config). Eval adds ``eval_accuracy``,
from the same forward as the loss. ``final/``: the adapter (with the classifier head) or full model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.data.tokenize import Encoded, Stats, encode_labelled
from finetune.errors import ConfigError, DataError
from finetune.tasks import Task


class SequenceClassificationTask(Task):
    name = "sequence-classification"
    formats = ("classification",)
    packs = False
    needs_eos = False
    peft_task_type = "SEQ_CLS"

    def auto_model_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def model_kwargs(self, cfg, label_names):
        num_labels = len(label_names) if label_names else cfg.model.num_labels
        if not num_labels:
            raise ConfigError("sequence classification needs model.num_labels or labelled data")
        kwargs = {"num_labels": num_labels}
        if label_names:
            kwargs["id2label"] = dict(enumerate(label_names))
            kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
        return kwargs

    def after_load(self, model, tokenizer) -> None:
        if model.config.pad_token_id is None:  # batches are padded: the head reads the last real token
            model.config.pad_token_id = tokenizer.pad_token_id

    def encode(self, tokenizer, items: list, stats: Stats, label_names=None):
        data = self.cfg.data
        texts = [t for t, _ in items]
        names = label_names or list(data.labels) or sorted({lab for _, lab in items})
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted({lab for _, lab in items if lab not in index})
        if unknown:
            raise DataError(f"labels {unknown[:5]} are not among data.labels={names}; "
                            "add them to data.labels or fix the data")
        ids, kept = encode_labelled(tokenizer, texts, data.max_seq_len, data.overlong, stats)
        class_labels = [index[items[i][1]] for i in kept]
        return Encoded.from_lists(ids, [[-100] * len(x) for x in ids], class_labels), names

    def target_count(self, encoded) -> int:
        return len(encoded)

    def loss_sum(self, model, batch: dict) -> torch.Tensor:
        return self._forward(model, batch)[0]

    def count_targets(self, batch: dict) -> int:
        return int(batch["class_labels"].numel())

    def eval_sums(self, model, batch: dict):
        loss, logits = self._forward(model, batch)  # one forward gives the loss and the accuracy
        return loss, {"correct": float((logits.argmax(-1) == batch["class_labels"]).sum())}

    def eval_metrics(self, sums: dict, count: float) -> dict:
        return {"eval_accuracy": sums["correct"] / max(count, 1.0)}

    @staticmethod
    def _forward(model, batch: dict):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return F.cross_entropy(out.logits.float(), batch["class_labels"], reduction="sum"), out.logits

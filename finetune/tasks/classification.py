"""Sequence classification: (text, label) rows, one cross-entropy target per row.

Labels are named: ``data.labels`` or the sorted set found in the training data; their order fixes
the class ids (saved as id2label / label2id in the model config). Eval adds ``eval_accuracy``,
from the same forward as the loss. ``final/``: the adapter (with the classifier head) or full model.

``data.packing=true``: the same random micro-batches, laid out without padding (each micro-batch's
examples end to end in one row, per-example attention, each example pooled at its own position;
finetune/tasks/packed_classification.py). BERT / RoBERTa / XLM-R encoders and Llama / Qwen /
Mistral decoder classifiers; any other model type is a config error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.data.tokenize import Encoded, Stats, encode_labelled
from finetune.errors import ConfigError, DataError
from finetune.tasks import Task, packed_classification


class SequenceClassificationTask(Task):
    name = "sequence-classification"
    formats = ("classification",)
    packs = True  # data.packing: padding-free micro-batches (packed_classification.py)
    packs_per_batch = True  # the collator packs each micro-batch; rows stay one example each
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

    def check_config(self, cfg) -> list[str]:
        problems = super().check_config(cfg)
        if cfg.data.packing and cfg.data.streaming:
            problems.append("data.packing=true for sequence classification needs cached data: "
                            "set data.streaming=false (or data.packing=false)")
        if cfg.data.packing and cfg.trainer.compile:  # a new row length every step: a recompile each
            problems.append("data.packing=true for sequence classification gives rows of varying length: "
                            "set trainer.compile=false (or data.packing=false)")
        return problems

    def after_load(self, model, tokenizer) -> None:
        if model.config.pad_token_id is None:  # batches are padded: the head reads the last real token
            model.config.pad_token_id = tokenizer.pad_token_id
        if self.cfg.data.packing:
            packed_classification.install(model)

    def collator(self, tokenizer, pad_to: int | None = None):
        if self.cfg.data.packing:
            return packed_classification.PackedCollator()
        return super().collator(tokenizer, pad_to)

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
        if "packed_lengths" in batch:
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                        packed_lengths=batch["packed_lengths"])
        else:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return F.cross_entropy(out.logits.float(), batch["class_labels"], reduction="sum"), out.logits

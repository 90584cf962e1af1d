"""KTO (Kahneman-Tversky Optimisation) on the same loop: unpaired desirable / undesirable examples.

Rows. ``data.format=kto`` gives one chat per record (ending with the completion) and a boolean
``label``. It is rendered by :func:`finetune.data.chat_encode.encode_chats` with
``train_on="last"``, as SFT and DPO: the labels cover exactly the completion tokens and the
template's end-of-turn marker. A row stores TWO sequences, like a DPO pair: the example ``(x_i,
y_i)`` followed by its mismatched KL sequence ``(x_i, y_{i-1})`` (the prompt tokens of this row,
the completion tokens of the previous kept row of the split, the first row taking the last one's:
TRL's rotation by one, over the whole split instead of each batch). ``Encoded.class_labels`` keeps
the example's length, signed: ``+len`` desirable, ``-len`` undesirable. Each sequence is cut to
``data.max_seq_len`` on its own with DPO's rule (:func:`~finetune.tasks.preference.fit_pair`):
prompt tokens from the left first, then a completion keeps its start and its end-of-turn token.

Loss (TRL's ``KTOTrainer``, Eq. 7 of the KTO paper). With ``r = log pi(y|x) - log pi_ref(y|x)``
summed over the completion tokens and ``z = max(0, mean over KL sequences of r)`` (detached):
desirable ``w_d (1 - sigmoid(beta (r - z)))``, undesirable ``w_u (1 - sigmoid(beta (z - r)))``;
``pref.loss=apo_zero_unpaired`` drops ``z``: ``w_d (1 - sigmoid(beta r))`` / ``w_u sigmoid(beta r)``.
``loss_sum`` is the sum over examples and ``count_targets`` the number of examples.

The KL estimate ``z`` is a statistic of the whole OPTIMIZER STEP: :meth:`KTOTask.before_step`
(called by the loop before the step's backward passes) runs the policy and the reference, without
gradients, over the KL sequences of all the step's micro-batches, and sums them over all ranks.
Because the mismatched pairs are fixed per row (not per batch), a step's loss and gradient do not
depend on how its rows are split into micro-batches and ranks: grad_accum 2 x micro-batch 4 ==
1 x 8 == 2 ranks x 4, exactly. (TRL estimates ``z`` per micro-batch, averaged over ranks; with one
micro-batch per step on one process the two definitions are the same number.) At eval, ``z`` is
the estimate of each eval batch (as TRL).

Reference: DPO's (the base with the LoRA adapter disabled, the frozen SFT adapter with
``model.adapter_path``, a frozen copy with ``peft=none``). ``pref.precompute_ref=true``: DPO's table
(finetune/tasks/reference_logps.py) with the columns (example, KL sequence): both sequences are
fixed per row by :meth:`KTOTask.encode` (stored in the row, so the data cache's key covers the
pairing), hence one row's two reference values do not depend on the batch, the shuffle, the
micro-batch split, the rank or a resume. Steps and eval look them up by ``row_ids``; the policy
still runs over the KL sequences (``before_step``). The table's key is DPO's (the reference
weights, adapter files, dtype, attention implementation, LM-head path) marked ``-kto`` for its
columns; both columns are computed for either loss (``apo_zero_unpaired`` reads only the first).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from finetune.data.chat_encode import ChatSettings, encode_chats
from finetune.data.records import bad_row
from finetune.data.tokenize import IGNORE, Encoded, Stats
from finetune.distributed import all_reduce_sum
from finetune.errors import DataError
from finetune.tasks import Task
from finetune.tasks.preference import DPOTask, PairCollator, completion_logps, fit_pair
from finetune.tasks.reference_logps import load_or_compute

KTO_LOSSES = ("kto", "apo_zero_unpaired")


def kto_losses(loss: str, beta: float, logratios, desirable, kl, desirable_weight: float = 1.0,
               undesirable_weight: float = 1.0):
    """Per-example weighted losses and rewards ``beta * r`` (see the module docstring)."""
    if loss == "kto":
        chosen, rejected = 1 - torch.sigmoid(beta * (logratios - kl)), 1 - torch.sigmoid(beta * (kl - logratios))
    elif loss == "apo_zero_unpaired":
        chosen, rejected = 1 - torch.sigmoid(beta * logratios), torch.sigmoid(beta * logratios)
    else:
        raise ValueError(f"unknown KTO loss {loss!r}; choose one of {', '.join(KTO_LOSSES)}")
    losses = torch.where(desirable, desirable_weight * chosen, undesirable_weight * rejected)
    return losses, beta * logratios.detach()


def _split(ids: list, labels: list) -> int:
    """Index of the first completion token (the first labelled one)."""
    return next(i for i, lab in enumerate(labels) if lab != IGNORE)


def fit_one(seq: tuple[list, list], max_len: int) -> tuple[list, list]:
    """One sequence cut to ``max_len`` by DPO's rule (a pair of the sequence with itself)."""
    return fit_pair(seq, seq, max_len)[0]


class KTOCollator:
    """KTO rows -> the examples (``input_ids``, ``labels``, ``attention_mask``), their KL sequences
    (the same keys prefixed ``kl_``), ``desirable`` (bool per example), each part right-padded to
    its own width (``pad_to`` with trainer.compile). DPO's PairCollator does the padding."""

    def __init__(self, pad_id: int, pad_to: int | None = None):
        self.pairs, self.pad_to = PairCollator(pad_id, pad_to), pad_to

    def __call__(self, rows: list[dict]) -> dict:
        n = len(rows)
        both = self.pairs([{**r, "class_label": abs(int(r["class_label"]))} for r in rows])
        out = {"desirable": torch.tensor([int(r["class_label"]) > 0 for r in rows]), "num_examples": n,
               "num_tokens": both["num_tokens"]}
        for prefix, part in (("", slice(0, n)), ("kl_", slice(n, 2 * n))):
            width = self.pad_to or int(both["attention_mask"][part].sum(1).max())
            for key in ("input_ids", "labels", "attention_mask"):
                out[prefix + key] = both[key][part, :width]
        return out


def kl_part(batch: dict) -> dict:
    return {"input_ids": batch["kl_input_ids"], "labels": batch["kl_labels"],
            "attention_mask": batch["kl_attention_mask"]}


class KTOTask(DPOTask):
    """KTO on unpaired examples; ``pref.loss=kto | apo_zero_unpaired``, ``pref.beta``,
    ``pref.desirable_weight``, ``pref.undesirable_weight``.

    Train rows of metrics.jsonl carry the loss and ``kl`` (the step's estimate ``z``, mean over the
    steps since the last log), ``rewards/chosen`` / ``rewards/rejected`` and ``logps/chosen`` /
    ``logps/rejected`` (means over the desirable / undesirable examples since the last log, all
    ranks), ``rewards/margin`` (their difference); eval rows the same with the ``eval_`` prefix.
    """

    name = "kto"
    formats = ("kto",)
    greedy_answers = False  # a completion may be the undesirable one: no reference answer
    packs = False  # DPOTask packs pairs; KTO's example + KL sequences are not packed (yet)
    packs_per_batch = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self._step_kl = None  # [the current step's z (before_step), micro-batches left in the step]

    def check_config(self, cfg) -> list[str]:
        problems = Task.check_config(self, cfg)
        p = cfg.pref
        if p.rpo_alpha:
            problems.append("pref.rpo_alpha is for model.task=dpo, not kto; set pref.rpo_alpha=0")
        if p.loss not in KTO_LOSSES:
            problems.append(f"pref.loss={p.loss} is not valid for model.task=kto; choose one of: "
                            f"{', '.join(KTO_LOSSES)}")
        if p.beta <= 0:
            problems.append(f"pref.beta={p.beta} must be > 0")
        for key in ("desirable_weight", "undesirable_weight"):
            if p[key] <= 0:
                problems.append(f"pref.{key}={p[key]} must be > 0")
        if cfg.data.streaming:
            problems.append("data.streaming=true is not available for model.task=kto; set data.streaming=false")
        return problems

    @property
    def needs_reference(self) -> bool:
        return True

    def after_load(self, model, tokenizer) -> None:
        super().after_load(model, tokenizer)  # DPO's: the reference's weights key, the frozen copy (peft=none)
        if self.ref_key is not None:
            self.ref_key += "-kto"  # columns (example, KL sequence), not DPO's (chosen, rejected)

    def before_train(self, trainer) -> None:
        self.place_reference(trainer)
        if self.ref_key is None:
            return
        self.ref_table = load_or_compute(trainer, self.table_logps, self.ref_key)
        self.ref_model = None  # full fine-tuning: the frozen copy is not needed any more

    def table_logps(self, model, batch: dict) -> torch.Tensor:
        """A batch's reference values for the table: its ``n`` examples, then their ``n`` KL sequences."""
        return torch.cat([self.reference_logps(model, batch), self.reference_logps(model, kl_part(batch))])

    def reference_of_batch(self, model, batch: dict, kl: bool, split: str) -> torch.Tensor:
        """The reference's log-probs of a batch's examples (``kl=False``) or KL sequences: the table's
        rows by ``row_ids`` (pref.precompute_ref) or a reference forward, no gradient."""
        if self.ref_table is not None:
            return self.ref_table[split][batch["row_ids"], int(kl)].to(batch["input_ids"].device)
        with torch.no_grad():
            return self.reference_logps(model, kl_part(batch) if kl else batch)

    # ---------------------------------------------------------------- data
    def encode(self, tokenizer, items: list, stats: Stats, label_names=None):
        data = self.cfg.data
        if not tokenizer.chat_template:
            raise DataError(f"data.format=kto needs a chat template but the tokenizer of "
                            f"{self.cfg.model.name_or_path!r} has none; set model.chat_template")
        settings = dataclasses.replace(ChatSettings.from_config(self.cfg), train_on="last", max_len=1 << 30)
        origins = getattr(items, "origins", None) or [f"example {i}" for i in range(len(items))]
        kept = []  # (ids, labels, first completion index, desirable)
        for i, (chat, desirable) in enumerate(items):
            scratch = Stats()
            scratch.template_notes = stats.template_notes
            problems = []
            seqs = encode_chats(tokenizer, [chat], settings, scratch, lambda _, why, out=problems: out.append(why))
            if problems or len(seqs[0]) != 1 or all(lab == IGNORE for lab in seqs[1][0]):
                bad_row(data, stats, origins[i], problems[0] if problems else
                        "the chat template left a completion with no tokens", data.format)
                continue
            ids, labels = seqs[0][0], seqs[1][0]
            if len(ids) > data.max_seq_len and data.overlong == "drop":
                stats.dropped_overlong += 1
                continue
            kept.append((ids, labels, _split(ids, labels), desirable))
        all_ids, all_labels, split = [], [], []
        for k, (ids, labels, first, desirable) in enumerate(kept):
            o_ids, o_labels, o_first, _ = kept[k - 1]  # the previous row's completion (row 0: the last's)
            kl = (ids[:first] + o_ids[o_first:], [IGNORE] * first + o_labels[o_first:])
            example = (ids, labels)
            if max(len(ids), len(kl[0])) > data.max_seq_len:
                stats.truncated += 1
                example, kl = fit_one(example, data.max_seq_len), fit_one(kl, data.max_seq_len)
            all_ids.append(example[0] + kl[0])
            all_labels.append(example[1] + kl[1])
            split.append(len(example[0]) if desirable else -len(example[0]))
            stats.kept += 1
            stats.tokens += len(example[0]) + len(kl[0])
            stats.target_tokens += sum(lab != IGNORE for lab in example[1])
        return Encoded.from_lists(all_ids, all_labels, split), None

    def target_count(self, encoded) -> int:
        """The examples' completion tokens (not those of their KL sequences)."""
        if len(encoded) == 0:
            return 0
        labelled = np.concatenate([[0], np.cumsum(encoded.labels != IGNORE)])
        starts = encoded.offsets[:-1]
        return int((labelled[starts + np.abs(encoded.class_labels)] - labelled[starts]).sum())

    def inspect_views(self, encoded, i: int, label_names=None) -> list:
        from finetune.inspect.render import View

        ids, labels = (a.tolist() for a in encoded.example(i))
        split = int(encoded.class_labels[i])  # +length: desirable, -length: undesirable; the KL part follows
        return [View("desirable" if split > 0 else "undesirable", ids[:abs(split)], labels[:abs(split)])]

    def chats(self, item) -> list[list[dict]]:
        return [item[0]]  # (conversation, desirable)

    def collator(self, tokenizer, pad_to: int | None = None):
        return KTOCollator(tokenizer.pad_token_id, pad_to)

    def count_targets(self, batch: dict) -> int:
        return int(batch["num_examples"])

    # ---------------------------------------------------------------- loss
    def kl_sums(self, model, batch: dict, split: str = "train") -> torch.Tensor:
        """[sum over the batch's KL sequences of log pi - log pi_ref, their count], no gradient."""
        with torch.no_grad():
            policy = completion_logps(model, kl_part(batch), self.chunked)[0]
            reference = self.reference_of_batch(model, batch, True, split)
        return torch.stack([(policy - reference).sum(), torch.tensor(float(len(policy)), device=policy.device)])

    def before_step(self, trainer, micro: list[dict]) -> None:
        """The step's KL estimate z over all its micro-batches and ranks (one all-reduce), used by
        the step's ``len(micro)`` calls of :meth:`loss_sum`."""
        if self.cfg.pref.loss != "kto":
            return
        acc = trainer.acc
        total = torch.zeros(2, device=acc.device)
        with acc.autocast():
            for batch in micro:
                total += self.kl_sums(trainer.model, trainer.to_device(batch))
        kl_sum, count = all_reduce_sum(acc, [float(total[0]), float(total[1])])
        self._step_kl = [torch.tensor(max(kl_sum / max(count, 1.0), 0.0), device=acc.device), len(micro)]

    def example_outputs(self, model, batch: dict, kl=None, split: str = "train"):
        """(per-example losses, rewards, policy log-probs, z) of a batch; ``kl=None``: the batch's own z."""
        p = self.cfg.pref
        if kl is None:
            if p.loss == "kto":
                kl_sum, count = self.kl_sums(model, batch, split)
                kl = (kl_sum / count).clamp(min=0)
            else:
                kl = torch.zeros((), device=batch["input_ids"].device)
        logps = completion_logps(model, batch, self.chunked)[0]
        ref = self.reference_of_batch(model, batch, False, split)
        losses, rewards = kto_losses(p.loss, p.beta, logps - ref, batch["desirable"], kl, p.desirable_weight,
                                     p.undesirable_weight)
        return losses, rewards, logps.detach(), kl

    def _sums(self, rewards, logps, desirable, kl) -> dict:
        d, u = desirable.float(), (~desirable).float()
        return {"chosen": d.sum(), "rejected": u.sum(), "rewards/chosen": (rewards * d).sum(),
                "rewards/rejected": (rewards * u).sum(), "logps/chosen": (logps * d).sum(),
                "logps/rejected": (logps * u).sum(), "kl": kl.detach().float(), "batches": torch.ones_like(d[0])}

    def loss_sum(self, model, batch: dict) -> torch.Tensor:
        kl = None
        if self._step_kl is not None:  # inside a step: its z (before_step); else the batch's own
            kl, self._step_kl[1] = self._step_kl[0], self._step_kl[1] - 1
            if self._step_kl[1] == 0:
                self._step_kl = None
        losses, rewards, logps, kl = self.example_outputs(model, batch, kl)
        for name, value in self._sums(rewards, logps, batch["desirable"], kl).items():
            self._train_sums[name] = self._train_sums.get(name, 0) + value
        return losses.sum()

    def _means(self, sums: dict, prefix: str = "") -> dict:
        chosen, rejected, batches = sums["chosen"], sums["rejected"], max(sums["batches"], 1.0)
        out = {f"{prefix}kl": sums["kl"] / batches}
        for side, n in (("chosen", chosen), ("rejected", rejected)):
            if n > 0:
                out[f"{prefix}rewards/{side}"] = sums[f"rewards/{side}"] / n
                out[f"{prefix}logps/{side}"] = sums[f"logps/{side}"] / n
        if chosen > 0 and rejected > 0:
            out[f"{prefix}rewards/margin"] = out[f"{prefix}rewards/chosen"] - out[f"{prefix}rewards/rejected"]
        return out

    def train_metrics(self, sums: dict) -> dict:
        return self._means({k: float(v) for k, v in sums.items()})

    # ---------------------------------------------------------------- eval
    def eval_sums(self, model, batch: dict):
        losses, rewards, logps, kl = self.example_outputs(model, batch, split="eval")
        return losses.sum(), {k: float(v) for k, v in self._sums(rewards, logps, batch["desirable"], kl).items()}

    def eval_metrics(self, sums: dict, count: float) -> dict:
        return self._means(sums, "eval_")

"""Preference tuning (DPO family) on the same loop: one training row = one pair.

Rows. ``data.format=preference`` gives two chats per record (the same prompt + chosen / rejected),
each rendered by :func:`finetune.data.chat_encode.encode_chats` with ``train_on="last"``: the
labels cover exactly the completion tokens and the template's end-of-turn marker, as in SFT. A
pair is stored as ONE example: chosen ids followed by rejected ids, with the length of the chosen
part in ``Encoded.class_labels`` (the per-example integer the cache already keeps), so that the
cache, the hold-out split, the shuffling and the feed keep a pair together with no change.
Truncation (``data.max_seq_len`` per sequence) cuts the shared prompt from the left first; a
completion that alone is too long keeps its start and its last token (the end-of-turn marker).

Batches. :class:`PairCollator` splits each row back into its two sequences: a batch of ``n``
pairs is ``2n`` right-padded sequences, chosen ``[0, n)`` then rejected ``[n, 2n)``, so chosen and
rejected of a pair go through one forward. Log-probs are computed at completion positions only
(``logits_to_keep`` as a boolean mask, as the SFT loss).

Loss. ``loss_sum`` returns the SUM over pairs of the per-pair loss and ``count_targets`` the number
of pairs: the loop divides by the pairs of the whole step (all micro-batches, all ranks), so
accumulation and DDP equal one big batch. Every loss here is per pair, except ORPO's SFT term:
with ``pref.orpo_sft=token`` (default, as TRL) it is the NLL per chosen token over the whole step
(``before_step`` counts the step's chosen tokens and pairs over all micro-batches and ranks and
weighs each token by pairs / tokens, so accumulation and DDP stay exact; at eval, per eval batch);
``pref.orpo_sft=pair`` averages it over each pair's tokens first.

Reference. LoRA: the base with the adapter disabled (peft's ``disable_adapter()``; no second
copy); starting from an SFT adapter (``model.adapter_path``), that adapter is loaded a second
time, frozen, as the adapter named ``reference``. Full fine-tuning: a frozen copy of the loaded
model. SimPO and ORPO need no reference (no reference forward).
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from finetune.data.chat_encode import ChatSettings, encode_chats
from finetune.data.records import bad_row
from finetune.data.tokenize import IGNORE, Encoded, Stats
from finetune.errors import DataError
from finetune.model.linear_cross_entropy import head_passes_hidden_states, linear_token_logprobs, plain_lm_head
from finetune.tasks import Task
from finetune.tasks.reference_logps import load_or_compute, weights_key
from finetune.tasks.causal_lm import shifted_targets

LOSSES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
REFERENCE_ADAPTER = "reference"


# ------------------------------------------------------------------------------------- maths
def preference_losses(loss: str, beta: float, policy_chosen, policy_rejected, ref_chosen=None,
                      ref_rejected=None, len_chosen=None, len_rejected=None, *,
                      label_smoothing: float = 0.0, gamma: float = 0.5, orpo_lambda: float = 0.1,
                      sft_scale: float | None = None):
    """Per-pair losses and rewards from summed completion log-probs (``len_*``: completion tokens).

    Returns ``(losses, chosen_rewards, rejected_rewards)``, one value per pair. With ``d`` the
    difference of log-ratios ``(pc - rc) - (pr - rr)``:

    - sigmoid: ``-(1-ls) logsig(beta d) - ls logsig(-beta d)`` (ls > 0: conservative DPO)
    - robust: ``(-(1-ls) logsig(beta d) + ls logsig(-beta d)) / (1 - 2 ls)``
    - hinge: ``relu(1 - beta d)``
    - ipo: ``(d_avg - 1/(2 beta))^2`` with the log-ratios averaged over each completion's tokens
    - simpo (no reference): ``-logsig(beta (pc/|c| - pr/|r|) - gamma)`` (with label smoothing as sigmoid)
    - orpo (no reference): ``NLL(chosen)/|c| - lambda logsig(log odds(c) - log odds(r))``, the
      odds of the length-normalised log-probs; rewards ``beta * avg log-prob``. With ``sft_scale``
      (``pref.orpo_sft=token``) the SFT term is ``NLL(chosen) * sft_scale`` instead, where
      ``sft_scale = pairs / chosen tokens`` of the whole step: summed over the step's pairs and
      divided by its pairs, it is the mean NLL per chosen token (TRL's ORPO), not per pair.
    """
    ls = label_smoothing
    if loss in ("simpo", "orpo"):
        avg_c, avg_r = policy_chosen / len_chosen, policy_rejected / len_rejected
        if loss == "simpo":
            logits = beta * (avg_c - avg_r) - gamma
            losses = -(1 - ls) * F.logsigmoid(logits) - ls * F.logsigmoid(-logits)
        else:
            log_odds = (avg_c - avg_r) - (torch.log1p(-torch.exp(avg_c)) - torch.log1p(-torch.exp(avg_r)))
            sft = -avg_c if sft_scale is None else -policy_chosen * sft_scale
            losses = sft - orpo_lambda * F.logsigmoid(log_odds)
        return losses, beta * avg_c.detach(), beta * avg_r.detach()
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    d = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        losses = -(1 - ls) * F.logsigmoid(beta * d) - ls * F.logsigmoid(-beta * d)
    elif loss == "robust":
        losses = (-(1 - ls) * F.logsigmoid(beta * d) + ls * F.logsigmoid(-beta * d)) / (1 - 2 * ls)
    elif loss == "hinge":
        losses = torch.relu(1 - beta * d)
    elif loss == "ipo":
        d_avg = chosen_ratio / len_chosen - rejected_ratio / len_rejected
        losses = (d_avg - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {loss!r}; choose one of {', '.join(LOSSES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def completion_logps(model, batch: dict, chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each sequence's completion tokens, their count), float32, per sequence.

    Only completion positions reach the LM head (``logits_to_keep`` as a boolean mask); where the
    head allows it (finetune/model/linear_cross_entropy.py) it runs in chunks that keep no logits."""
    targets = shifted_targets(batch["labels"])
    keep = targets != IGNORE
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    head = plain_lm_head(model) if chunked else None
    if head is not None:
        with head_passes_hidden_states(head):
            hidden = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        token_logps = linear_token_logprobs(hidden, head.weight, targets[keep])
    else:
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits.float()
        if logits.dim() == 3:  # a model that ignores a mask-valued logits_to_keep
            logits = logits[keep]
        token_logps = -F.cross_entropy(logits, targets[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(keep.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, rows, token_logps), keep.sum(1).to(token_logps.dtype)


def _unwrap(model):
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):  # DDP, torch.compile
        model = getattr(model, "module", None) or model._orig_mod
    return model


@contextmanager
def reference_of(model):
    """The LoRA policy as its reference: the adapter named ``reference`` (an SFT start) if loaded,
    else the base with every adapter disabled. The trainable adapter is active again afterwards."""
    peft_model = _unwrap(model)
    if REFERENCE_ADAPTER in getattr(peft_model, "peft_config", {}):
        # As TRL's use_adapter: set_adapter also flips requires_grad, and switching back restores
        # it (the trained adapter trainable, the reference frozen) before any backward.
        previous = peft_model.active_adapter
        peft_model.set_adapter(REFERENCE_ADAPTER)
        try:
            yield peft_model
        finally:
            peft_model.set_adapter(previous)
    else:
        with peft_model.disable_adapter():
            yield peft_model


# ------------------------------------------------------------------------------------- rows
def fit_pair(chosen: tuple[list, list], rejected: tuple[list, list], max_len: int):
    """Cut both sequences of a pair to ``max_len``: the shared prompt from the left first (keeping
    one token to predict from), then a completion keeps its start and its last token."""
    def split(seq):
        ids, labels = seq
        first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
        return first, ids, labels

    (fc, ic, lc), (fr, ir, lr) = split(chosen), split(rejected)
    longest = max(len(ic) - fc, len(ir) - fr)
    cut = max(0, min(fc, fr) - max(1, max_len - longest))  # prompt tokens dropped from the left
    out = []
    for ids, labels in ((ic[cut:], lc[cut:]), (ir[cut:], lr[cut:])):
        if len(ids) > max_len:
            ids, labels = ids[:max_len - 1] + ids[-1:], labels[:max_len - 1] + labels[-1:]
        labels = [IGNORE] + labels[1:]
        out.append((ids, labels))
    return out


class PairCollator:
    """Pair rows -> ``2n`` right-padded sequences (chosen ``[0, n)``, rejected ``[n, 2n)``)."""

    def __init__(self, pad_id: int, pad_to: int | None = None):
        self.pad_id, self.pad_to = pad_id, pad_to

    def __call__(self, rows: list[dict]) -> dict:
        seqs = [(r["input_ids"][:r["class_label"]], r["labels"][:r["class_label"]]) for r in rows]
        seqs += [(r["input_ids"][r["class_label"]:], r["labels"][r["class_label"]:]) for r in rows]
        width = self.pad_to or max(len(s[0]) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s_ids, s_labels) in enumerate(seqs):
            k = len(s_ids)
            ids[i, :k] = torch.as_tensor(s_ids, dtype=torch.long)
            labels[i, :k] = torch.as_tensor(s_labels, dtype=torch.long)
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "num_pairs": len(rows),
                "num_tokens": int(mask.sum())}


# ------------------------------------------------------------------------------------- task
class DPOTask(Task):
    """DPO and its relatives on (prompt, chosen, rejected) pairs; ``pref.*`` picks the loss.

    Train rows of metrics.jsonl carry the loss and ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margin``, ``rewards/accuracy``, ``logps/chosen``, ``logps/rejected`` (means over
    the pairs since the last log, all ranks); eval rows add ``eval_rewards/chosen``,
    ``eval_rewards/rejected``, ``eval_rewards/margin``, ``eval_rewards/accuracy`` (chosen scored
    above rejected), ``eval_logps/chosen`` and ``eval_logps/rejected`` (means over pairs).
    """

    name = "dpo"
    formats = ("preference",)
    packs = False
    needs_eos = True
    peft_task_type = "CAUSAL_LM"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.ref_model = None  # full fine-tuning: the frozen copy (after_load)
        self.ref_key: str | None = None  # pref.precompute_ref: the reference's weights key (after_load)
        self.ref_table: dict | None = None  # pref.precompute_ref: {"train"|"eval": (rows, 2)} (before_train)
        self.chunked = True  # the LM head in chunks (setup: trainer.chunked_loss)
        self._train_sums: dict = {}  # metric sums of the training batches since the last log
        self._sft_scale: float | None = None  # ORPO, pref.orpo_sft=token: pairs / chosen tokens of the step

    def setup(self, device_type: str) -> None:
        # trainer.chunked_loss=auto: on for CPU, off on CUDA, as for SFT (finetune/config/schema.py).
        self.chunked = {"on": True, "off": False}.get(self.cfg.trainer.chunked_loss, device_type != "cuda")

    def check_config(self, cfg) -> list[str]:
        problems = super().check_config(cfg)
        p = cfg.pref
        if p.loss not in LOSSES:
            problems.append(f"pref.loss={p.loss} is not valid; choose one of: {', '.join(LOSSES)}")
        if p.beta <= 0:
            problems.append(f"pref.beta={p.beta} must be > 0")
        if not 0 <= p.label_smoothing < 0.5:
            problems.append(f"pref.label_smoothing={p.label_smoothing} must lie in [0, 0.5)")
        if p.orpo_sft not in ("token", "pair"):
            problems.append(f"pref.orpo_sft={p.orpo_sft} must be token or pair")
        if cfg.data.streaming:
            problems.append("data.streaming=true is not available for model.task=dpo; set data.streaming=false")
        if p.precompute_ref and not self.needs_reference:
            problems.append(f"pref.precompute_ref=true has nothing to compute: model.task={cfg.model.task} "
                            f"pref.loss={p.loss} uses no reference model; set pref.precompute_ref=false")
        return problems

    @property
    def needs_reference(self) -> bool:
        return self.cfg.pref.loss not in REFERENCE_FREE

    def auto_model_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def after_wrap(self, model) -> None:
        adapter = self.cfg.model.adapter_path
        if adapter and self.needs_reference:  # the SFT adapter, loaded again and frozen: the reference
            model.load_adapter(adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)

    def after_load(self, model, tokenizer) -> None:
        if self.needs_reference and self.cfg.pref.precompute_ref:
            first = next(model.parameters())
            self.ref_key = weights_key(model, self.cfg.model.adapter_path, (
                str(first.dtype), getattr(model.config, "_attn_implementation", None), self.chunked))
        if self.needs_reference and self.cfg.peft.method == "none":
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    def before_train(self, trainer) -> None:
        if self.ref_key is None:
            return
        self.ref_table = load_or_compute(trainer, self.reference_logps, self.ref_key)
        self.ref_model = None  # full fine-tuning: the frozen copy is not needed any more

    # ---------------------------------------------------------------- data
    def encode(self, tokenizer, items: list, stats: Stats, label_names=None):
        data = self.cfg.data
        if not tokenizer.chat_template:
            raise DataError(f"data.format=preference needs a chat template but the tokenizer of "
                            f"{self.cfg.model.name_or_path!r} has none; set model.chat_template")
        # Whole sequences, the last assistant turn trained; the pair is cut below (fit_pair).
        settings = dataclasses.replace(ChatSettings.from_config(self.cfg), train_on="last", max_len=1 << 30)
        origins = getattr(items, "origins", None) or [f"example {i}" for i in range(len(items))]
        ids, labels, split = [], [], []
        for i, pair in enumerate(items):
            scratch = Stats()
            scratch.template_notes = stats.template_notes
            problems = []
            seqs = encode_chats(tokenizer, list(pair), settings, scratch, lambda _, why: problems.append(why))
            if problems or len(seqs[0]) != 2:
                bad_row(data, stats, origins[i], problems[0] if problems else
                        "the chat template left a completion with no tokens", data.format)
                continue
            (c_ids, r_ids), (c_lab, r_lab) = seqs
            if c_ids == r_ids:
                bad_row(data, stats, origins[i], "chosen and rejected render to the same tokens", data.format)
                continue
            if max(len(c_ids), len(r_ids)) > data.max_seq_len:
                if data.overlong == "drop":
                    stats.dropped_overlong += 1
                    continue
                stats.truncated += 1
                (c_ids, c_lab), (r_ids, r_lab) = fit_pair((c_ids, c_lab), (r_ids, r_lab), data.max_seq_len)
            ids.append(c_ids + r_ids)
            labels.append(c_lab + r_lab)
            split.append(len(c_ids))
            stats.kept += 1
            stats.tokens += len(c_ids) + len(r_ids)
            stats.target_tokens += sum(lab != IGNORE for lab in c_lab + r_lab)
        return Encoded.from_lists(ids, labels, split), None

    def inspect_views(self, encoded, i: int, label_names=None) -> list:
        from finetune.inspect.render import View

        ids, labels = (a.tolist() for a in encoded.example(i))
        split = int(encoded.class_labels[i])
        return [View("chosen", ids[:split], labels[:split]), View("rejected", ids[split:], labels[split:])]

    def chats(self, item) -> list[list[dict]]:
        return list(item)  # (chosen conversation, rejected conversation)

    def collator(self, tokenizer, pad_to: int | None = None):
        return PairCollator(tokenizer.pad_token_id, pad_to)

    # ---------------------------------------------------------------- loss
    @property
    def token_sft(self) -> bool:
        return self.cfg.pref.loss == "orpo" and self.cfg.pref.orpo_sft == "token"

    @staticmethod
    def chosen_tokens(batch: dict) -> int:
        n = batch["input_ids"].shape[0] // 2
        return int((shifted_targets(batch["labels"][:n]) != IGNORE).sum())

    def before_step(self, trainer, micro: list[dict]) -> None:
        if self.token_sft:  # the step's pairs / chosen tokens, all micro-batches and ranks
            from finetune.distributed import all_reduce_sum

            pairs, tokens = all_reduce_sum(trainer.acc, [float(sum(b["num_pairs"] for b in micro)),
                                                         float(sum(self.chosen_tokens(b) for b in micro))])
            self._sft_scale = pairs / max(tokens, 1.0)

    def pair_outputs(self, model, batch: dict, split: str = "train"):
        """(per-pair losses, chosen rewards, rejected rewards, policy log-probs) of a batch."""
        p = self.cfg.pref
        sft_scale = None
        if self.token_sft:  # eval: this batch's own pairs / chosen tokens
            sft_scale = (self._sft_scale if split == "train" and self._sft_scale is not None
                         else batch["num_pairs"] / max(self.chosen_tokens(batch), 1))
        logps, lengths = completion_logps(model, batch, self.chunked)
        n = batch["input_ids"].shape[0] // 2
        ref = (None, None)
        if self.ref_table is not None:  # precomputed: rows of the cache, by the batch's row ids
            values = self.ref_table[split][batch["row_ids"]].to(logps.device)
            ref = (values[:, 0], values[:, 1])
        elif self.needs_reference:
            with torch.no_grad():
                ref_logps = self.reference_logps(model, batch)
            ref = (ref_logps[:n], ref_logps[n:])
        losses, rc, rr = preference_losses(p.loss, p.beta, logps[:n], logps[n:], *ref, lengths[:n], lengths[n:],
                                           label_smoothing=p.label_smoothing, gamma=p.gamma,
                                           orpo_lambda=p.orpo_lambda, sft_scale=sft_scale)
        return losses, rc, rr, logps.detach()

    def reference_logps(self, model, batch: dict) -> torch.Tensor:
        if self.ref_model is not None:
            device = batch["input_ids"].device
            if next(self.ref_model.parameters()).device != device:
                self.ref_model.to(device)
            return completion_logps(self.ref_model, batch, self.chunked)[0]
        with reference_of(model) as reference:
            return completion_logps(reference, batch, self.chunked)[0]

    def loss_sum(self, model, batch: dict) -> torch.Tensor:
        losses, rc, rr, logps = self.pair_outputs(model, batch)
        for name, value in self._pair_sums(rc, rr, logps).items():  # the train row's rewards
            self._train_sums[name] = self._train_sums.get(name, 0) + value
        return losses.sum()

    @staticmethod
    def _pair_sums(rc, rr, logps=None) -> dict:
        n = len(rc)
        sums = {"pairs": torch.tensor(float(n), device=rc.device), "rewards/chosen": rc.sum(),
                "rewards/rejected": rr.sum(), "rewards/margin": (rc - rr).sum(),
                "rewards/accuracy": (rc > rr).float().sum()}
        if logps is not None:
            sums.update({"logps/chosen": logps[:n].sum(), "logps/rejected": logps[n:].sum()})
        return sums

    def train_metric_sums(self) -> dict:
        sums, self._train_sums = self._train_sums, {}
        return sums

    def train_metrics(self, sums: dict) -> dict:
        pairs = max(sums.pop("pairs"), 1.0)
        return {k: v / pairs for k, v in sums.items()}

    def count_targets(self, batch: dict) -> int:
        return int(batch["num_pairs"])

    # ---------------------------------------------------------------- eval
    def eval_sums(self, model, batch: dict):
        losses, rc, rr, logps = self.pair_outputs(model, batch, "eval")
        sums = self._pair_sums(rc, rr, logps)
        del sums["pairs"]  # the eval's count is count_targets
        return losses.sum(), {k: float(v) for k, v in sums.items()}

    def eval_metrics(self, sums: dict, count: float) -> dict:
        return {f"eval_{k}": v / max(count, 1.0) for k, v in sums.items()}


class RewardTask(DPOTask):
    """A Bradley-Terry reward model: a sequence classifier with one output scores each sequence
    (at its last token); per pair ``-logsig(r_c - r_r - pref.margin) + pref.center_coef (r_c + r_r)^2``
    (the centering regulariser keeps the scores near zero). Same rows, collator and normaliser
    (pairs) as DPO; no reference. ``rewards/accuracy``: chosen scored above rejected."""

    name = "reward"
    peft_task_type = "SEQ_CLS"
    needs_eos = False

    @property
    def needs_reference(self) -> bool:
        return False

    def auto_model_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def model_kwargs(self, cfg, label_names):
        return {"num_labels": 1}

    def after_load(self, model, tokenizer) -> None:
        if model.config.pad_token_id is None:  # right-padded pairs: the score is read at the last real token
            model.config.pad_token_id = tokenizer.pad_token_id

    def pair_outputs(self, model, batch: dict, split: str = "train"):
        p = self.cfg.pref
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()
        n = scores.shape[0] // 2
        rc, rr = scores[:n], scores[n:]
        losses = -F.logsigmoid(rc - rr - p.margin) + p.center_coef * (rc + rr) ** 2
        return losses, rc.detach(), rr.detach(), None

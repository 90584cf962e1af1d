"""Preference tuning (DPO family) on the same loop: one training row = one pair.

Rows. ``data.format=preference`` gives two chats per record (the same prompt + chosen / rejected),
each rendered by :func:`finetune.data.chat_encode.encode_chats` with ``train_on="last"``: the
labels cover exactly the completion tokens and the template's end-of-turn marker, as in SFT. A
pair is stored as ONE example: chosen ids followed by rejected ids, with the length of the chosen
part in ``Encoded.class_labels`` (the per-example integer the cache already keeps), so that the
cache, the hold-out split, the shuffling and the feed keep a pair together with no change.
Truncation (``data.max_seq_len`` per sequence) cuts the shared prompt from the left first; a
completion that alone is too long keeps its start and its last token (the end-of-turn marker).

Batches (finetune/tasks/preference_batches.py). :class:`PairCollator` splits each row back into its
two sequences: a batch of ``n`` pairs is ``2n`` right-padded sequences, chosen ``[0, n)`` then
rejected ``[n, 2n)``, so chosen and rejected of a pair go through one forward. With
``data.packing=true`` (:class:`PackedPairCollator`) the same ``2n`` sequences are packed
padding-free into rows of 2 x ``data.max_seq_len`` tokens, position ids restarting per sequence and
no attention mask (SFT packing's per-example attention); the rows stay pairs, so a step trains the
same pairs in the same micro-batches as unpacked and only the layout changes. Log-probs are computed
at completion positions only (``logits_to_keep`` as a boolean mask, as the SFT loss) and summed per
sequence (by row, or by the packed batch's ``sequence_ids``), in the same order for both layouts.
The reward model does not pack (its score is read at each row's last token).

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
model, placed like the policy (FSDP: sharded by the same units; ZeRO-3: partitioned by an engine
without optimizer; finetune/distributed/). SimPO and ORPO need no reference (no reference forward).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from finetune.data.chat_encode import ChatSettings, encode_chats
from finetune.data.records import bad_row
from finetune.data.tokenize import IGNORE, Encoded, Stats
from finetune.errors import DataError
from finetune.model.linear_cross_entropy import (head_passes_hidden_states, head_weight, linear_token_logprobs,
                                                 plain_lm_head)
from finetune.tasks import Task
from finetune.tasks.causal_lm import exact_match_after, exact_match_before, shifted_targets, write_samples
from finetune.tasks.preference_batches import (ROW_CAPACITY_FACTOR, PackedPairCollator, PairCollator,  # noqa: F401
                                                fit_pair, packing_stats)  # (PairCollator: kto.py imports it from here)
from finetune.tasks.preference_losses import LOSSES, REFERENCE_FREE, preference_losses  # noqa: F401 (re-exported)
from finetune.tasks.reference_logps import load_or_compute, weights_key

REFERENCE_ADAPTER = "reference"
log = logging.getLogger(__name__)


def completion_logps(model, batch: dict, chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each sequence's completion tokens, their count), float32, per sequence.

    Only completion positions reach the LM head (``logits_to_keep`` as a boolean mask); where the
    head allows it (finetune/model/linear_cross_entropy.py) it runs in chunks that keep no logits.
    A packed batch (:class:`PackedPairCollator`) sums by its ``sequence_ids``, a padded one by row:
    either way one value per sequence, chosen ``[0, n)`` then rejected ``[n, 2n)``."""
    targets = shifted_targets(batch["labels"])
    keep = targets != IGNORE
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    head = plain_lm_head(model) if chunked else None
    if head is not None:
        with head_passes_hidden_states(head):
            hidden = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        token_logps = linear_token_logprobs(hidden, head_weight(head), targets[keep])
    else:
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits.float()
        if logits.dim() == 3:  # a model that ignores a mask-valued logits_to_keep
            logits = logits[keep]
        token_logps = -F.cross_entropy(logits, targets[keep], reduction="none")
    if "sequence_ids" in batch:  # packed: the sequence each kept token belongs to
        owner, count = batch["sequence_ids"][keep], batch["num_sequences"]
    else:
        owner, count = keep.nonzero()[:, 0], keep.shape[0]
    sums = torch.zeros(count, dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, owner, token_logps), sums.index_add(0, owner, torch.ones_like(token_logps))


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
    packs = True  # data.packing=true: each micro-batch's sequences packed (preference_batches.py)
    greedy_answers = True  # trainer.exact_match_prompts: the held-out prompts answered, against chosen
    packs_per_batch = True  # ... by the collator: the data keeps one row per pair (finetune/data/__init__.py)
    sequences_per_row = 2  # chosen + rejected (KTO: the example + its KL sequence)
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
        if p.rpo_alpha < 0:
            problems.append(f"pref.rpo_alpha={p.rpo_alpha} must be >= 0 (0: off)")
        if p.rpo_alpha and self.name != "dpo":
            problems.append(f"pref.rpo_alpha is for model.task=dpo, not {self.name}; set pref.rpo_alpha=0")
        elif p.rpo_alpha and p.loss == "orpo":
            problems.append("pref.rpo_alpha adds an SFT term and pref.loss=orpo has its own; "
                            "set pref.rpo_alpha=0 (orpo's weight is pref.orpo_lambda)")
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

    def place_reference(self, trainer) -> None:
        """The full fine-tune's frozen copy placed (sharded) like the policy (strategy.prepare_frozen)."""
        if self.ref_model is not None:
            from finetune.distributed.strategy import local_share

            self.ref_model = trainer.strategy.prepare_frozen(trainer.acc, self.ref_model)
            local, whole = local_share(self.ref_model)
            log.info("reference model: a frozen copy (distributed=%s), %d of its %d weights on rank %d",
                     trainer.cfg.distributed.strategy, local, whole, trainer.acc.process_index)

    def before_train(self, trainer) -> None:
        self.place_reference(trainer)
        if self.ref_key is not None:
            self.ref_table = load_or_compute(trainer, self.reference_logps, self.ref_key)
            self.ref_model = None  # full fine-tuning: the frozen copy is not needed any more
        if self.greedy_answers:
            exact_match_before(trainer)

    def on_eval(self, trainer) -> None:
        if self.greedy_answers:  # samples.jsonl: the prompts answered greedily, with the chosen text as reference
            write_samples(trainer)
            exact_match_after(trainer)

    @staticmethod
    def greedy_sequence(encoded, i: int):
        """Exact match: a pair's chosen sequence (its prompt answered, compared with the chosen text)."""
        ids, labels = encoded.example(i)
        split = int(encoded.class_labels[i])
        return ids[:split], labels[:split]

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
        if self.cfg.data.packing:
            return PackedPairCollator(tokenizer.pad_token_id, self.row_capacity, fixed_width=pad_to is not None)
        return PairCollator(tokenizer.pad_token_id, pad_to)

    @property
    def row_capacity(self) -> int:
        return ROW_CAPACITY_FACTOR * self.cfg.data.max_seq_len

    def make_feed(self, trainer, feed):
        if self.cfg.data.packing:  # the packing figures of data_stats.json: this run's micro-batches, epoch 0
            trainer.data.stats["packing"] = packing_stats(trainer, feed.plan, self.row_capacity)
        return feed

    def plan_rows(self, cfg, plan) -> list[tuple[str, str]]:
        if not cfg.data.packing:
            return []
        return [("packing", f"each micro-batch's 2 x {cfg.trainer.micro_batch_size} sequences packed padding-free "
                            f"into rows of {self.row_capacity} tokens (2 x data.max_seq_len); a train row is still one pair")]

    # ---------------------------------------------------------------- loss
    @property
    def token_sft(self) -> bool:
        """An NLL term per chosen token of the step: ORPO's (pref.orpo_sft=token) or pref.rpo_alpha's."""
        p = self.cfg.pref
        return (p.loss == "orpo" and p.orpo_sft == "token") or (p.loss != "orpo" and p.rpo_alpha > 0)

    @staticmethod
    def chosen_tokens(batch: dict) -> int:
        keep = shifted_targets(batch["labels"]) != IGNORE
        if "sequence_ids" in batch:  # packed: chosen are the sequences [0, n)
            return int((batch["sequence_ids"][keep] < batch["num_pairs"]).sum())
        return int(keep[:batch["num_pairs"]].sum())

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
        n = batch["num_pairs"]
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
                                           orpo_lambda=p.orpo_lambda, sft_scale=sft_scale,
                                           rpo_alpha=p.rpo_alpha if p.loss != "orpo" else 0.0)
        return losses, rc, rr, logps.detach()

    def reference_logps(self, model, batch: dict) -> torch.Tensor:
        if self.ref_model is not None:  # on the device, sharded like the policy (place_reference)
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
    greedy_answers = False  # a scorer: nothing to generate
    packs = False  # the score is read at each row's last token: packed rows would need it per sequence
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

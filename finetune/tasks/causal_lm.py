"""Causal-LM supervised fine-tuning: the task, and where its loss is computed.

The loss is a SUM over targets, never a mean: the trainer divides by
the number of targets in the whole optimizer step (all micro-batches, all ranks), which is what
makes N micro-batches x accumulation equal to one big batch, with uneven lengths too.

The causal-LM path asks the model for logits only at positions that have a target
(``logits_to_keep`` as a boolean mask): prompt tokens (label -100) need no LM-head projection
and no cross-entropy, the largest single cost with a big vocabulary. Where the architecture
allows (finetune/model/linear_cross_entropy.py), the head and the cross-entropy then run in chunks that
keep no logits. The loss is the same as the full-logits path (tested).
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from finetune.data.chat_encode import ChatSettings, encode_chats
from finetune.data.formats import CHAT_FORMATS
from finetune.data.records import bad_row
from finetune.data.tokenize import IGNORE, Encoded, Stats, encode_documents, encode_segmented
from finetune.errors import DataError
from finetune.model.linear_cross_entropy import (head_passes_hidden_states, head_weight,
                                                 linear_cross_entropy_sum, plain_lm_head)
from finetune.outputs import exact_match
from finetune.tasks import Task


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """targets[:, t] = labels[:, t + 1]: the token each position predicts (-100 = none)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def model_inputs(batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "position_ids")
    return {k: batch[k] for k in keys if k in batch}


def causal_lm_loss_sum(model, batch: dict, chunked: bool = True) -> torch.Tensor:
    targets = shifted_targets(batch["labels"])
    keep = targets != IGNORE
    head = plain_lm_head(model) if chunked else None
    if head is not None:
        with head_passes_hidden_states(head):
            hidden = model(**model_inputs(batch), use_cache=False, logits_to_keep=keep).logits
        return linear_cross_entropy_sum(hidden, head_weight(head), targets[keep])
    out = model(**model_inputs(batch), use_cache=False, logits_to_keep=keep)
    logits = out.logits  # (num_targets, vocab): flattened by the boolean mask
    loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss


def causal_lm_loss_sum_full(model, batch: dict) -> torch.Tensor:
    """Reference path (all logits); used by tests to check the fast path."""
    targets = shifted_targets(batch["labels"])
    out = model(**model_inputs(batch), use_cache=False)
    loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(),
                           ignore_index=IGNORE, reduction="sum")
    return loss


def count_targets(batch: dict) -> int:
    """Targets in a (host-side) batch: what the step's loss is normalised by."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


class CausalLMTask(Task):
    """Supervised fine-tuning of a causal LM: chats (alpaca / messages / sharegpt, through the
    tokenizer's chat template, loss on the assistant turns), prompt/completion pairs, or raw text
    (continued pretraining). ``final/``: the adapter or full model + tokenizer; samples.jsonl:
    greedy completions of the first ``trainer.sample_prompts`` eval prompts at each eval;
    exact_match.json: greedy exact match on ``trainer.exact_match_prompts`` eval prompts before the
    first step and after the last (finetune/outputs/exact_match.py)."""

    name = "causal-lm"
    formats = ("alpaca", "messages", "sharegpt", "prompt_completion", "text")
    packs = True
    greedy_answers = True
    needs_eos = True
    peft_task_type = "CAUSAL_LM"
    chunked = True

    def auto_model_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def setup(self, device_type: str) -> None:
        # trainer.chunked_loss=auto: on for CPU, off on CUDA (finetune/config/schema.py says why).
        self.chunked = {"on": True, "off": False}.get(self.cfg.trainer.chunked_loss, device_type != "cuda")

    def encode(self, tokenizer, items: list, stats: Stats, label_names=None):
        data = self.cfg.data
        if data.format in CHAT_FORMATS:  # one render per conversation, mask from its spans
            if not tokenizer.chat_template:
                raise DataError(f"data.format={data.format} needs a chat template but the tokenizer of "
                                f"{self.cfg.model.name_or_path!r} has none; set model.chat_template")
            origins = getattr(items, "origins", None) or [f"example {i}" for i in range(len(items))]
            on_bad = lambda i, problem: bad_row(data, stats, origins[i], problem, data.format)  # noqa: E731
            ids, labels = encode_chats(tokenizer, items, ChatSettings.from_config(self.cfg), stats, on_bad)
            return Encoded.from_lists(ids, labels), None
        if data.format == "prompt_completion":
            segmented = [[(p, data.train_on_prompt), (c, True)] if p else [(c, True)] for p, c in items]
        else:  # text: documents cut into max_seq_len chunks
            ids, labels = encode_documents(tokenizer, items, data.max_seq_len, stats)
            return Encoded.from_lists(ids, labels), None
        ids, labels = encode_segmented(tokenizer, segmented, data.max_seq_len, data.overlong, stats)
        return Encoded.from_lists(ids, labels), None

    def chats(self, item) -> list[list[dict]]:
        return [item] if self.cfg.data.format in CHAT_FORMATS else []

    def loss_sum(self, model, batch: dict) -> torch.Tensor:
        return causal_lm_loss_sum(model, batch, self.chunked)

    def count_targets(self, batch: dict) -> int:
        return count_targets(batch)

    def before_train(self, trainer) -> None:
        exact_match_before(trainer)

    def on_eval(self, trainer) -> None:
        write_samples(trainer)
        exact_match_after(trainer)


def write_samples(trainer) -> None:
    """Greedy completions of the first ``trainer.sample_prompts`` eval prompts, appended to samples.jsonl."""
    n = trainer.cfg.trainer.sample_prompts
    if n:
        rows = greedy_rows(trainer, n)
        with (trainer.run_dir / "samples.jsonl").open("a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)


def exact_match_before(trainer) -> None:
    """``trainer.exact_match_prompts``: the "before" figure, on the main process of a fresh run
    (a resumed run has none)."""
    n = trainer.cfg.trainer.exact_match_prompts
    if n and trainer.is_main and trainer.state.step == 0:
        rows = greedy_rows(trainer, n, exact=True)
        if rows:
            exact_match.record(trainer.run_dir, "before", exact_match.score(rows))


def exact_match_after(trainer) -> None:
    """The "after" figure at the eval of the last step (logged by finetune/train/run_log.py)."""
    n = trainer.cfg.trainer.exact_match_prompts
    if n and trainer.state.step == trainer.total_steps:
        rows = greedy_rows(trainer, n, exact=True)
        if rows:
            exact_match.record(trainer.run_dir, "after", exact_match.score(rows))


def prompt_and_reference(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """A sequence as (prompt ids: everything before its first target, reference ids: its target
    tokens), for greedy samples and exact match."""
    first_target = next((j for j, lab in enumerate(labels) if lab != IGNORE), len(ids))
    return ids[:first_target], [t for t in labels if t != IGNORE]


EXACT_SLACK = 8  # exact match: tokens generated beyond the reference's length (a longer answer is wrong)


@torch.no_grad()
def greedy_rows(trainer, n: int, exact: bool = False, batch_size: int = 32) -> list[dict]:
    """Greedy completions of the first ``n`` eval prompts (``step``, ``prompt``, ``completion``,
    ``reference``), left-padded batches; [] without eval data or when the weights are sharded
    across ranks. ``exact``: at most the reference's length + EXACT_SLACK new tokens (enough to
    decide an exact match), else ``trainer.sample_max_new_tokens``."""
    data = trainer.data.eval
    if data is None or not trainer.strategy.can_generate_on_main():
        return []  # sharded weights: generation would need every rank
    model = trainer.acc.unwrap_model(trainer.model)
    tok = trainer.tokenizer
    # A task whose rows hold something else (DPO: chosen + rejected) names the sequence to use.
    example = getattr(trainer.task, "greedy_sequence", None) or (lambda enc, i: enc.example(i))
    examples = [prompt_and_reference(*(list(map(int, a)) for a in example(data.encoded, i)))
                for i in range(min(n, len(data)))]
    was_training = model.training
    model.eval()
    rows = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        width = max(len(p) for p, _ in chunk)
        prompt = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(prompt)
        for k, (p, _) in enumerate(chunk):
            prompt[k, width - len(p):], mask[k, width - len(p):] = torch.as_tensor(p), 1
        new = (max(len(r) for _, r in chunk) + EXACT_SLACK if exact
               else trainer.cfg.trainer.sample_max_new_tokens)
        out = model.generate(input_ids=prompt.to(trainer.acc.device), attention_mask=mask.to(trainer.acc.device),
                             max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        for k, (p, ref) in enumerate(chunk):
            rows.append({"step": trainer.state.step, "prompt": tok.decode(p),
                         "completion": tok.decode(out[k, width:], skip_special_tokens=True),
                         "reference": tok.decode(ref, skip_special_tokens=True)})
    model.train(was_training)
    return rows

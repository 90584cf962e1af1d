"""Padding-free classification batches: ``data.packing=true`` with ``model.task=sequence-classification``.

A layout change only. The micro-batch holds the same examples as unpacked (rows stay one example
each; the plan draws the same random batches), but :class:`PackedCollator` lays them end to end in
ONE row with no padding at all, position ids restarting at 0 per example, and their lengths
(``packed_lengths``). :func:`install` gives the task model a forward that computes each example on
its own and pools it at ITS position, so the logits are ``(n_examples, num_labels)`` in the batch's
order and the loss / accuracy are those of the padded batch:

- BERT-style encoders (``bert``, ``roberta``, ``xlm-roberta``): bidirectional attention within each
  example only, through a block-diagonal additive 4D mask (transformers passes a 4D mask through
  unchanged; the encoder's attention is not causal, so finetune/model/attention.py hands it to
  plain sdpa), then the model's own head on each example's first token (BERT: pooler -> dropout ->
  classifier; RoBERTa: its classification head). RoBERTa numbers positions from
  ``padding_idx + 1``: that offset is added.
- Llama-style decoders (``llama``, ``qwen2``, ``qwen3``, ``mistral``): no attention mask, so
  transformers makes the block-causal mask from the restarting position ids (and
  finetune/model/attention.py runs each example's causal block alone); the score head at each
  example's last token.

Any other model type is a config error. Dropout acts elementwise on real tokens (and on attention
weights within an example) in both layouts, so packed and padded training agree in expectation;
with dropout 0 or in eval they agree to float rounding (tests/test_classifier_packing.py).

One row with a mask, measured on MiniLM-L6 / emotion at batch 16 (363 real tokens per batch, padded
width 48: 53% padding), LoRA forward + backward on 2 heavily loaded CPU cores: padded 7.2 s, one
row + mask 5.4 s, one row with one sdpa call per example (no masked scores) 6.7 s. A whole run
(issue 21 setting, 1 seed, quiet steps only) gained ~1.2x tokens/s over padded batches, not the
2x the padding suggests. Best-fit rows of ``data.max_seq_len`` would cut the masked scores but
add row padding; not measured.

The forward is installed on the task model itself (not called around it) so that DDP / FSDP /
PEFT wrappers still see one ordinary ``model(...)`` call per micro-batch.
"""

from __future__ import annotations

import types

import numpy as np
import torch

from finetune.errors import ConfigError

ENCODERS = ("bert", "roberta", "xlm-roberta")
DECODERS = ("llama", "qwen2", "qwen3", "mistral")


def family(model_type: str) -> str:
    """``encoder`` | ``decoder`` for a supported model type, else a one-line :class:`ConfigError`."""
    if model_type in ENCODERS:
        return "encoder"
    if model_type in DECODERS:
        return "decoder"
    raise ConfigError(f"data.packing=true for sequence classification supports model types "
                      f"{', '.join(ENCODERS + DECODERS)}; this model is {model_type!r}: set data.packing=false")


class PackedCollator:
    """One-example rows -> one row holding the whole micro-batch, no padding."""

    def __call__(self, rows: list[dict]) -> dict:
        lengths = [len(r["input_ids"]) for r in rows]
        ids = np.concatenate([np.asarray(r["input_ids"], dtype=np.int64) for r in rows])
        pos = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
        return {"input_ids": torch.from_numpy(ids)[None], "position_ids": torch.from_numpy(pos)[None],
                "packed_lengths": lengths,  # a host list: the mask and pooling need no device sync
                "class_labels": torch.tensor([r["class_label"] for r in rows], dtype=torch.long),
                "num_tokens": int(ids.size), "num_rows": len(rows)}  # rows/s counts examples, as unpacked


def install(model) -> None:
    """Make ``model`` (a transformers ``*ForSequenceClassification``, before PEFT) take packed
    batches: ``model(input_ids, position_ids, packed_lengths=[...])`` returns per-example logits;
    without ``packed_lengths`` it is the model's own forward."""
    attn = model.config._attn_implementation
    if family(model.config.model_type) == "encoder" and attn not in ("sdpa", "eager", "finetune_sdpa_packed"):
        raise ConfigError(f"data.packing=true for a {model.config.model_type} classifier needs "
                          f"model.attn_implementation=sdpa or eager (a 4D block mask), not {attn}")
    # A bound method (not a closure): a deepcopy of the model rebinds it to the copy.
    model.forward = types.MethodType(_forward, model)


def _forward(self, *args, packed_lengths=None, **kwargs):
    if packed_lengths is None:
        return type(self).forward(self, *args, **kwargs)
    return types.SimpleNamespace(logits=packed_logits(self, kwargs["input_ids"], kwargs["position_ids"],
                                                      packed_lengths))


def packed_logits(model, input_ids, position_ids, lengths: list[int]) -> torch.Tensor:
    """(n_examples, num_labels) logits of a packed row (1, N) of examples of ``lengths``."""
    cfg = model.config
    base = getattr(model, model.base_model_prefix)
    starts = torch.tensor(np.cumsum([0, *lengths[:-1]]), device=input_ids.device)
    if family(cfg.model_type) == "decoder":
        # No mask and no cache: transformers derives the block-causal mask from the position ids.
        hidden = base(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        ends = starts + torch.tensor(lengths, device=input_ids.device) - 1
        return model.score(hidden[0, ends])
    # Block-diagonal additive mask (1, 1, N, N): additive so that eager (which adds it) and sdpa agree.
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=input_ids.device),
                                  torch.tensor(lengths, device=input_ids.device))
    dtype = base.get_input_embeddings().weight.dtype
    mask = torch.zeros(seg.numel(), seg.numel(), dtype=dtype, device=seg.device)
    mask.masked_fill_(seg[:, None] != seg[None, :], torch.finfo(dtype).min)
    if cfg.model_type != "bert":  # RoBERTa family: positions start after the padding index
        position_ids = position_ids + cfg.pad_token_id + 1
    hidden = base(input_ids=input_ids, position_ids=position_ids, attention_mask=mask[None, None],
                  token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
    first = hidden[0, starts][:, None]  # (n, 1, H): each example's first ([CLS] / <s>) token
    if cfg.model_type == "bert":
        return model.classifier(model.dropout(base.pooler(first)))
    return model.classifier(first)  # RobertaClassificationHead reads [:, 0]

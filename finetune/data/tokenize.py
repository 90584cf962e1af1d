"""Tokenise formatted examples into ``input_ids`` + ``labels`` with the loss mask.

Chats are encoded by :mod:`finetune.data.chat_template` (one render of the whole conversation,
encoded once, loss mask from character spans). :class:`ChatRenderer` and :func:`chat_segments`
below are the earlier prefix-render segmentation, kept for callers outside the chat formats.
Segmented examples (prompt_completion) are encoded in one fast-tokenizer call.

Labels are ``-100`` on prompt tokens (unless ``data.train_on_prompt``), and always on the first
token of an example: it is never a prediction target, which also keeps packed neighbours from
training on each other's first token.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from finetune.errors import DataError

IGNORE = -100


@dataclass
class Stats:
    """Counts reported to the user and written to ``<run_dir>/data_stats.json``.

    ``read`` counts records, ``kept``/``tokens``/``target_tokens`` the examples of the split (for
    the text format an example is a chunk of ``max_seq_len`` tokens).
    """

    read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_target: int = 0
    skipped_bad: int = 0
    tokens: int = 0
    target_tokens: int = 0
    bad_examples: list[str] = field(default_factory=list)  # first few, for the log
    # Chats (chat_template.py): examples per mask path, and rows the template changed or cut
    # (system_folded, reasoning_restored, dropped ..., eos_appended), each also warned once.
    template_notes: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


class Encoded:
    """Variable-length examples in flat int32 arrays: example i is ``ids[offsets[i]:offsets[i+1]]``."""

    def __init__(self, ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray,
                 class_labels: np.ndarray | None = None):
        self.ids, self.labels, self.offsets = ids, labels, offsets
        self.class_labels = class_labels

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.labels[a:b]

    @classmethod
    def from_lists(cls, ids: list[list[int]], labels: list[list[int]], class_labels=None) -> "Encoded":
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in ids], out=offsets[1:])
        flat = lambda xs: np.array(list(itertools.chain.from_iterable(xs)), dtype=np.int32)
        cl = None if class_labels is None else np.asarray(class_labels, dtype=np.int64)
        return cls(flat(ids), flat(labels), offsets, cl)


class ChatRenderer:
    """Renders a tokenizer's chat template with the compiled Jinja template, as
    ``apply_chat_template(..., tokenize=False)`` does (same compile cache, same variables: the
    special tokens), without its per-call normalisation overhead (~3x the render itself)."""

    def __init__(self, tokenizer):
        from transformers.utils.chat_template_utils import _compile_jinja_template

        self.template = _compile_jinja_template(tokenizer.get_chat_template())
        self.variables = dict(tokenizer.special_tokens_map)

    def __call__(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    tools=None, documents=None, **self.variables)


def chat_segments(render: ChatRenderer, messages: list[dict],
                  train_on_prompt: bool) -> list[tuple[str, bool]]:
    """Split a rendered chat into (text, trainable) segments at assistant-turn boundaries.

    Renders per assistant turn: the prompt before it (with the generation prompt) and the chat
    through it; a single-turn chat costs two renders. The boundaries are exact for any template
    that renders prefixes as prefixes, and an error names the problem otherwise.
    """
    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], True) if i else ""
        full = render(messages[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DataError("the tokenizer's chat template does not render conversation prefixes "
                            "as prefixes, so the loss mask cannot be placed exactly; set "
                            "model.chat_template to a prefix-stable template")
        segments.append((prompt[len(done):], train_on_prompt))
        segments.append((full[len(prompt):], True))
        done = full
    # The formats end every chat with an assistant turn, so `done` is usually the whole render.
    tail = "" if messages[-1]["role"] == "assistant" else render(messages, False)[len(done):]
    if tail:
        segments.append((tail, train_on_prompt))
    return [(text, trainable) for text, trainable in segments if text]


def assemble(seg_ids: list[list[int]], seg_trainable: list[bool], eos_id: int,
             ensure_eos: bool) -> tuple[list[int], list[int]]:
    """Concatenate segment tokens into one example; make the last trained token EOS."""
    ids, labels = [], []
    last_trained = -1
    for i, trainable in enumerate(seg_trainable):
        if trainable:
            last_trained = i
    for i, toks in enumerate(seg_ids):
        if ensure_eos and i == last_trained:
            if eos_id in toks:
                # Template turn ends like "<|im_end|>\n": keep up to the last EOS.
                toks = toks[: len(toks) - toks[::-1].index(eos_id)]
            else:
                toks = toks + [eos_id]
        ids += toks
        labels += toks if seg_trainable[i] else [IGNORE] * len(toks)
    if labels:
        labels[0] = IGNORE
    return ids, labels


def fit_length(ids: list[int], labels: list[int], max_len: int, overlong: str,
               stats: Stats) -> tuple[list[int], list[int]] | None:
    """Apply ``data.overlong`` and count; None when the example is dropped."""
    if len(ids) > max_len:
        if overlong == "drop":
            stats.dropped_overlong += 1
            return None
        ids, labels = ids[:max_len], labels[:max_len]
        stats.truncated += 1
    if not labels:
        stats.dropped_no_target += 1
        return None
    targets = len(labels) - 1 - labels.count(IGNORE) + (labels[0] == IGNORE)  # labels[1:]
    if targets == 0:
        stats.dropped_no_target += 1
        return None
    stats.kept += 1
    stats.tokens += len(ids)
    stats.target_tokens += targets
    return ids, labels


def encode_texts(tokenizer, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
    """One batch call on the Rust tokenizer (the Python wrapper's per-text conversion of attention
    masks etc. costs ~15% of the encode, for nothing we use)."""
    backend = tokenizer.backend_tokenizer
    if backend.padding or backend.truncation:  # set in tokenizer.json: the wrapper turns them off
        return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]


def encode_segmented(tokenizer, examples: list[list[tuple[str, bool]]], max_len: int,
                     overlong: str, stats: Stats, ensure_eos: bool = True,
                     batch_size: int = 1024) -> tuple[list[list[int]], list[list[int]]]:
    """Encode segmented examples in batches; returns kept ids and labels."""
    all_ids, all_labels = [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        texts = [text for ex in chunk for text, _ in ex]
        encoded = encode_texts(tokenizer, texts) if texts else []
        pos = 0
        for ex in chunk:
            seg_ids = encoded[pos:pos + len(ex)]
            pos += len(ex)
            ids, labels = assemble(seg_ids, [t for _, t in ex], tokenizer.eos_token_id, ensure_eos)
            fitted = fit_length(ids, labels, max_len, overlong, stats)
            if fitted:
                all_ids.append(fitted[0])
                all_labels.append(fitted[1])
    return all_ids, all_labels


def encode_documents(tokenizer, docs: list[str], max_len: int, stats: Stats):
    """Continued pretraining: documents + EOS, concatenated and cut into ``max_len`` chunks."""
    stream: list[int] = []
    for toks in encode_texts(tokenizer, docs):
        stream.extend(toks + [tokenizer.eos_token_id])
    ids = [stream[i:i + max_len] for i in range(0, len(stream), max_len)]
    ids = [chunk for chunk in ids if len(chunk) > 1]
    labels = [[IGNORE] + chunk[1:] for chunk in ids]
    stats.kept += len(ids)  # examples = chunks of max_len tokens
    stats.tokens += sum(len(c) for c in ids)
    stats.target_tokens += sum(len(c) - 1 for c in ids)
    return ids, labels


def encode_labelled(tokenizer, texts: list[str], max_len: int, overlong: str, stats: Stats):
    """Classification: special tokens from the tokenizer, truncated (or dropped) at max_len."""
    encoded = encode_texts(tokenizer, texts, add_special_tokens=True)
    kept, keep_idx = [], []
    for i, ids in enumerate(encoded):
        if len(ids) > max_len:
            if overlong == "drop":
                stats.dropped_overlong += 1
                continue
            ids = ids[: max_len - 1] + ids[-1:]  # keep the closing special token ([SEP])
            stats.truncated += 1
        kept.append(ids)
        keep_idx.append(i)
        stats.kept += 1
        stats.tokens += len(ids)
    stats.target_tokens = stats.kept
    return kept, keep_idx

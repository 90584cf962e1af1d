"""Conversations -> training rows (input ids + loss mask) through the tokenizer's chat template.

Each conversation is rendered once, whole, by :class:`finetune.data.chat_template.ChatTemplate`
(which also locates the trained assistant spans in that render: finetune/data/chat_template.py
says how), encoded in one call, and masked from the spans by the fast tokenizer's offsets.
:class:`ChatSettings` carries what the encoding needs as plain values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from finetune.data.chat_template import BadChat, ChatTemplate, chat_template_for
from finetune.data.tokenize import IGNORE, fit_length
from finetune.errors import ConfigError


@dataclass(frozen=True)
class ChatSettings:
    """What ``encode_chats`` needs, as plain values (``from_config`` reads them from a run config)."""

    train_on: str = "all"  # all | last | each: which assistant turns carry loss (module docstring)
    train_on_prompt: bool = False  # loss on every token up to the last trained turn
    append_eos: str = "auto"  # auto: only where the template marks no turn end | always | never
    strict: bool = False  # text the template drops or refuses -> BadChat instead of a warning
    date: str = "2024-07-26"  # what strftime_now() returns in templates (Llama-3.2's date header)
    name: str = "chat data"  # names the template/family in warnings and errors
    max_len: int = 1 << 30
    overlong: str = "truncate"  # truncate | drop

    def __post_init__(self):
        for key, value, allowed in (("train_on", self.train_on, ("all", "last", "each")),
                                    ("append_eos", self.append_eos, ("auto", "always", "never"))):
            if value not in allowed:
                raise ConfigError(f"data.{key}={value!r} is not valid; choose one of: "
                                  f"{', '.join(allowed)}")

    @classmethod
    def from_config(cls, cfg) -> "ChatSettings":
        data, model = cfg.data, cfg.model
        template = model.chat_template
        name = template if template and ("{" not in template) else model.name_or_path
        return cls(train_on=data.train_on, train_on_prompt=bool(data.train_on_prompt),
                   append_eos=data.append_eos, strict=bool(data.strict_template),
                   date=str(data.chat_date), name=str(name), max_len=int(data.max_seq_len),
                   overlong=data.overlong)


def _trained_turns(messages: list[dict], train_on: str) -> list[list[int]]:
    """Per example of this conversation, the assistant messages it trains (``each``: one example
    per assistant turn, the conversation cut after it)."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise BadChat("the conversation has no assistant message to train on")
    if train_on == "all":
        return [turns]
    if train_on == "last":
        return [turns[-1:]]
    return [[i] for i in turns]


def _token_at(enc, char: int, lo: int, hi: int, step: int) -> int | None:
    """The token covering ``char``, else the nearest covered character towards ``step`` in [lo, hi)."""
    while lo <= char < hi:
        token = enc.char_to_token(char)
        if token is not None:
            return token
        char += step
    return None


def encode_chats(tokenizer, chats: list[list[dict]], settings: ChatSettings, stats,
                 on_bad=None, batch_size: int = 1024) -> tuple[list[list[int]], list[list[int]]]:
    """Conversations -> kept ``(ids, labels)`` (``data.overlong`` applied and counted in ``stats``).

    A conversation that cannot be rendered or masked calls ``on_bad(index, reason)`` (the caller
    names the row's file:line, then raises or counts it); without ``on_bad`` it raises BadChat.
    Labels are -100 outside the trained spans (everywhere up to the last trained token with
    ``train_on_prompt``) and on the first token. The example ends with the last trained token:
    what the template renders after it (Qwen's newline after ``<|im_end|>``) carries no loss.
    """
    template = chat_template_for(tokenizer, settings.date)
    notes = stats.template_notes
    examples: list[tuple[str, list[tuple[int, int]]]] = []
    for index, messages in enumerate(chats):
        row = []
        try:
            for trained in _trained_turns(messages, settings.train_on):
                cut = messages[: trained[-1] + 1]
                text, spans, path = template.locate(cut, trained, settings.strict, settings.name,
                                                    notes)
                notes[f"path_{path}"] = notes.get(f"path_{path}", 0) + 1
                row.append((text, spans))
        except BadChat as exc:
            if on_bad is None:
                raise
            on_bad(index, str(exc))
            continue
        examples += row
    all_ids, all_labels = [], []
    for first in range(0, len(examples), batch_size):
        chunk = examples[first:first + batch_size]
        encodings = template.backend.encode_batch([text for text, _ in chunk],
                                                  add_special_tokens=False)
        for (text, spans), enc in zip(chunk, encodings):
            ids, labels = _mask(enc, text, spans, template, settings, notes)
            fitted = fit_length(ids, labels, settings.max_len, settings.overlong, stats)
            if fitted:
                all_ids.append(fitted[0])
                all_labels.append(fitted[1])
    return all_ids, all_labels


def _mask(enc, text, spans, template: ChatTemplate, settings: ChatSettings, notes: dict):
    """Labels from character spans; the example cut after its last trained token."""
    ids = enc.ids
    token_spans = []
    for start, end in spans:
        t0 = _token_at(enc, start, start, end, 1)
        t1 = _token_at(enc, end - 1, start, end, -1)
        if t0 is not None and t1 is not None:
            token_spans.append((t0, t1 + 1))
    if not token_spans:
        return [], []
    final_end = spans[-1][1]
    seq_end = template.layout.seq_end if template.layout else ""
    if seq_end and settings.append_eos != "never" and final_end == len(text) - len(seq_end) \
            and text.endswith(seq_end):
        token_spans[-1] = (token_spans[-1][0], len(ids))  # the template's own end of sequence
    n = token_spans[-1][1]
    ids = ids[:n]
    if settings.train_on_prompt:
        labels = list(ids)
    else:
        labels = [IGNORE] * n
        for t0, t1 in token_spans:
            labels[t0:t1] = ids[t0:t1]
    if ids[-1] != template.eos_id and (settings.append_eos == "always" or (
            settings.append_eos == "auto" and not text.endswith(template.specials, 0, final_end))):
        if settings.append_eos == "auto":
            template._note(notes, "eos_appended", f"{settings.name}: the chat template ends "
                           f"assistant turns without a special token; {template.eos} is appended "
                           "(data.append_eos=never to not)", level=logging.INFO)
        ids = ids + [template.eos_id]
        labels = labels + [template.eos_id]
    labels[0] = IGNORE
    return ids, labels


def render_prompts(tokenizer, prompts: list[list[dict]], settings: ChatSettings) -> list[list[int]]:
    """Prompt conversations -> the ids a model generates from (``add_generation_prompt=True``),
    rendered and encoded once each like :func:`encode_chats` (for RL rollouts and evaluation).
    A prompt the template cannot render raises :class:`BadChat`."""
    template = chat_template_for(tokenizer, settings.date)
    texts = [template._render_row(p, gen=True) for p in prompts]
    return [e.ids for e in template.backend.encode_batch(texts, add_special_tokens=False)]

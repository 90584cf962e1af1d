"""Chat templates -> input ids + loss mask, exactly as the template renders the conversation.

This module renders and locates (:func:`chat_template_for` -> :class:`ChatTemplate`); the entry
point that turns conversations into training rows is :mod:`finetune.data.chat_encode` (plain values
in, no config objects)::

    ids, labels = encode_chats(tokenizer, chats, ChatSettings(...), stats, on_bad=callback)

and model.chat_template presets / files are resolved by :mod:`finetune.data.chat_presets`.

Each conversation is rendered ONCE, whole, by the tokenizer's own template and encoded in ONE call,
so training sees the token ids inference sees (no per-segment encodes: SentencePiece would add a
prefix space to every segment, BPE merges would break at segment edges). The loss mask is placed
with character spans of the trained assistant turns inside that one render, mapped to tokens by the
fast tokenizer's offsets (``Encoding.char_to_token``). A span is what the model generates at that
point: from the end of the generation prompt through the template's end-of-turn marker.

How a span is found (one path per conversation; docs/data.md lists which family takes which):

- ``generation``: the template marks assistant text with ``{% generation %}`` (the built-in
  model's template): the marked blocks are the spans; one render.
- ``verbatim``: the template writes each assistant content unchanged between a fixed header and
  its end-of-turn marker (Llama-3.x, Qwen2.5, SmolLM2, Phi-3, Mistral, Gemma, most rows of every
  family). The layout (generation prompt, text between it and the content, end-of-turn marker) is
  learnt once per template from a probe conversation of sentinels; each row then needs one render
  and a string search for ``header + content + marker``.
- ``sentinel``: anything else (contents the template trims, reasoning it splits off or drops).
  The assistant content is replaced by a private-use sentinel and the row rendered again; the
  region where that render and the real one differ is the turn's text as the template rendered it.
  One extra render per trained turn; works for any template that renders the rest of the
  conversation independently of that turn's content.

Templates that rewrite history (Qwen3 drops the reasoning of turns before the last user message,
DeepSeek-R1 of every turn): each trained turn is trained as it appears in the final render, except
that the FINAL assistant turn keeps its reasoning on reasoning templates (templates that know
``</think>``): when the template cut it, it is put back as the model generates it
(``<think>\\n...\\n</think>\\n\\n`` + answer). ``train_on="each"`` trains every turn with its own
prompt (one example per assistant turn), so every turn keeps its reasoning.

What a template loses is reported, never silently trained around: a system message the template
refuses (raises) or drops is folded into the first user turn (the last one for a template that
writes it there when prompting, as Mistral Nemo), with one warning per run; other text absent from
the render warns once; ``strict=True`` makes both a per-row error (:class:`BadChat`). Counts go to
``stats.template_notes``.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import weakref
from dataclasses import dataclass

from finetune.errors import DataError

log = logging.getLogger(__name__)

SENTINEL = "\ue000{}\ue001"  # private-use characters: never produced by a template, checked absent
THINK = "<think>\n{}\n</think>\n\n{}"  # how Qwen3 and DeepSeek-R1 write a reasoning block


class BadChat(ValueError):
    """A conversation this template cannot render or mask; the message names the problem."""


def _split_reasoning(message: dict) -> tuple[str, str]:
    """(reasoning, answer) of an assistant message: a reasoning field, or <think> in the content."""
    content = message["content"]
    reasoning = message.get("reasoning_content")
    if reasoning is None and "</think>" in content:
        head, answer = content.split("</think>")[0], content.split("</think>")[-1]
        return head.split("<think>")[-1].strip("\n"), answer
    return (reasoning or "").strip("\n"), content


def _fold_system(messages: list[dict], into_last: bool) -> list[dict]:
    """The documented fallback for a template that refuses or drops a system message: its text
    goes before the text of the first user turn (as Gemma-3's own template does), or of the last
    one for a template that shows the system text there when it prompts (Mistral Nemo)."""
    system, rest = messages[0]["content"], messages[1:]
    users = [i for i, m in enumerate(rest) if m["role"] == "user"]
    if not users:
        raise BadChat("the system message cannot be folded into a user turn: there is none")
    i = users[-1] if into_last else users[0]
    return rest[:i] + [{**rest[i], "content": f"{system}\n\n{rest[i]['content']}"}] + rest[i + 1:]


def _common_prefix(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # binary search on slice equality: C-speed compares, no per-character loop
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid:] == b[len(b) - mid:]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class Layout:
    """Where a template puts an assistant turn, learnt from one probe conversation of sentinels.
    Index 0 is a turn followed by more conversation, 1 the final turn."""

    gen_prompt: str  # what add_generation_prompt=True appends ("" when the template has none)
    head: tuple[str, str]  # text between the generation prompt and the content
    tail: tuple[str, str]  # text after the content through the end-of-turn marker ("": no marker)
    seq_end: str  # after the final turn's marker, when it is the template's own EOS (Phi-3)


class ChatTemplate:
    """A compiled chat template, its probed layout, and the span search for one conversation."""

    def __init__(self, tokenizer, source: str, date: str):
        from transformers.utils.chat_template_utils import _compile_jinja_template

        try:
            self.template = _compile_jinja_template(source)
        except Exception as exc:  # jinja2.TemplateSyntaxError and friends
            line = getattr(exc, "lineno", None)
            raise DataError(f"the chat template does not compile{f' (line {line})' if line else ''}: "
                            f"{exc}; fix model.chat_template") from None
        try:
            day = datetime.date.fromisoformat(date)
        except ValueError:
            raise DataError(f"data.chat_date={date!r} is not a date (YYYY-MM-DD)") from None
        self.env = self.template.environment
        self.base = {**self.template.globals, **tokenizer.special_tokens_map, "tools": None,
                     "documents": None, "strftime_now": lambda fmt: day.strftime(fmt)}
        self.eos, self.eos_id = tokenizer.eos_token, tokenizer.eos_token_id
        specials = set(tokenizer.all_special_tokens) | {
            t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        self.specials = tuple(sorted(specials, key=len, reverse=True))
        self.special_re = re.compile("|".join(map(re.escape, self.specials)) or "(?!)")
        self.reasoning = "</think>" in source  # Qwen3, DeepSeek-R1: a template that knows reasoning
        self.generation = re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None
        self.layout = self._probe()
        self.system_in_last_user = self._probe_system()
        self.warned: set[str] = set()
        backend = tokenizer.backend_tokenizer
        if backend.padding or backend.truncation:  # set in tokenizer.json: encode without them
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(backend.to_str())
            backend.no_padding()
            backend.no_truncation()
        self.backend = backend

    def render(self, messages: list[dict], gen: bool = False, track: list | None = None) -> str:
        """The template's render, as ``apply_chat_template(tokenize=False)`` (same compiled
        template and variables) with ``strftime_now`` pinned, without jinja's per-call context
        merge (4x the cost of a short render). ``track`` collects ``{% generation %}`` spans."""
        ctx = self.env.context_class(self.env, {**self.base, "messages": messages,
                                                "add_generation_prompt": gen},
                                     self.template.name, self.template.blocks)
        if track is None:
            return self.env.concat(self.template.root_render_func(ctx))
        blocks: list[str] = []
        with self.env.activate_tracker(blocks, track):
            blocks.extend(self.template.root_render_func(ctx))
        return "".join(blocks)

    def _render_row(self, messages: list[dict], track: list | None = None, gen: bool = False) -> str:
        try:
            return self.render(messages, gen, track)
        except Exception as exc:
            raise BadChat(f"the chat template raised{self._template_line(exc)}: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None

    def _template_line(self, exc: Exception) -> str:
        tb, line = exc.__traceback__, None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == "<template>":
                line = self.template.get_corresponding_lineno(tb.tb_lineno)
            tb = tb.tb_next
        return f" (template line {line})" if line else ""

    def _probe(self) -> Layout | None:
        u1, a1, u2, a2 = (SENTINEL.format(i) for i in range(4))
        chat = [{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                {"role": "user", "content": u2}, {"role": "assistant", "content": a2}]
        try:
            full = self.render(chat)
            gen1, plain1 = self.render(chat[:1], True), self.render(chat[:1], False)
            gen2 = self.render(chat[:3], True)
        except Exception:
            return None  # the template refuses the probe: every row takes the sentinel path
        if any(full.count(s) != 1 for s in (u1, a1, u2, a2)):
            return None
        cut = _common_prefix(gen1, plain1)
        for token in self.special_re.finditer(gen1):  # never cut inside a special token
            if token.start() < cut < token.end():
                cut = token.start()
        gen_prompt = gen1[cut:]
        head = []
        for prompt, sent in ((gen1, a1), (gen2, a2)):
            at = full.index(sent)
            if full.startswith(prompt) and len(prompt) <= at:
                head.append(full[len(prompt):at])
            elif gen_prompt and full.rfind(gen_prompt, 0, at) >= 0:
                head.append(full[full.rfind(gen_prompt, 0, at) + len(gen_prompt):at])
            else:
                head.append("")
        after_last = full[full.index(a2) + len(a2):]
        marker = self.special_re.search(after_last)
        tail_last = after_last[:marker.end()] if marker else ""
        after_mid = full[full.index(a1) + len(a1):full.index(u2)]
        tail_mid = tail_last if tail_last and after_mid.startswith(tail_last) else ""
        rest = after_last[len(tail_last):]
        seq_end = rest if tail_last and self.eos and rest.strip() == self.eos else ""
        return Layout(gen_prompt, (head[0], head[1]), (tail_mid, tail_last), seq_end)

    def _probe_system(self) -> bool:
        """Whether the template, prompting, writes the system text into the last user turn only
        (Mistral Nemo: a conversation that ends with an assistant turn shows no system text)."""
        system, u1, a1, u2 = (SENTINEL.format(i) for i in range(4, 8))
        chat = [{"role": "system", "content": system}, {"role": "user", "content": u1},
                {"role": "assistant", "content": a1}, {"role": "user", "content": u2}]
        try:
            prompt = self.render(chat, True)
        except Exception:
            return False
        return f"{system}\n\n{u2}" in prompt and u1 in prompt and system not in prompt.split(u1)[0]

    # ------------------------------------------------------------------------- spans
    def locate(self, messages: list[dict], trained: list[int], strict: bool, name: str,
               notes: dict) -> tuple[str, list[tuple[int, int]], str]:
        """The render of ``messages`` (as it is trained), the character spans of the assistant
        messages ``trained`` and the path that found them. Raises :class:`BadChat`."""
        if any("\ue000" in m["content"] or "\ue000" in (m.get("reasoning_content") or "")
               for m in messages):
            raise BadChat("a message contains U+E000, the private-use character the mask search uses")
        messages = [{**m, "thinking": m["reasoning_content"]} if m.get("reasoning_content")
                    is not None else m for m in messages]  # both names, as transformers passes them
        track: list | None = [] if self.generation else None
        try:
            text = self._render_row(messages, track)
            why = None
        except BadChat as exc:
            if messages[0]["role"] != "system" or strict:
                raise
            why = f"refuses a system message ({str(exc).split(': ', 1)[-1]})"
        if why is None and messages[0]["role"] == "system" and messages[0]["content"].strip() \
                and messages[0]["content"].strip() not in text:
            if strict:
                raise BadChat("the chat template drops the system message (data.strict_template=true)")
            why = ("writes the system text only into the last user turn of a prompt" if
                   self.system_in_last_user else "has no place for a system message")
        if why is not None:  # the documented fallback
            where = "last" if self.system_in_last_user else "first"
            self._note(notes, "system_folded", f"{name}: the chat template {why}; the system text "
                       f"is folded into the {where} user turn (data.strict_template=true stops "
                       "instead)")
            messages = _fold_system(messages, self.system_in_last_user)
            trained = [i - 1 for i in trained]
            track = [] if self.generation else None
            text = self._render_row(messages, track)
        lost = next((m for m in messages if m["role"] != "assistant" and m["content"].strip()
                     and m["content"].strip() not in text), None)
        if lost is not None:
            self._lost(notes, strict, name, f"{lost['role']} text", lost["content"])
        if track:
            spans = self._generation_spans(text, track, messages, trained)
            if spans is not None:
                return text, spans, "generation"
        spans = self._verbatim_spans(text, messages, trained)
        if spans is not None:
            return text, spans, "verbatim"
        text, spans = self._sentinel_spans(text, messages, trained, strict, name, notes)
        return text, spans, "sentinel"

    def _generation_spans(self, text, track, messages, trained):
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if len(track) != len(turns):
            return None
        spans = []
        for (start, end), i in zip(track, turns):
            if i in trained:
                if _split_reasoning(messages[i])[1].strip() not in text[start:end]:
                    return None
                spans.append((start, self._marker_end(text, end, i == len(messages) - 1)))
        return spans

    def _verbatim_spans(self, text, messages, trained):
        layout, last = self.layout, len(messages) - 1
        if layout is None:
            return None
        spans, cur = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            if m.get("reasoning_content") is not None or (
                    self.reasoning and "</think>" in m["content"]):
                return None  # the template may split or drop it: the sentinel path checks
            k = int(i == last)
            needle = layout.gen_prompt + layout.head[k] + m["content"] + layout.tail[k]
            at = text.find(needle, cur)
            if at < 0:
                return None
            cur = at + len(needle)
            if i in trained:
                spans.append((at + len(layout.gen_prompt), cur))
        return spans

    def _sentinel_spans(self, text, messages, trained, strict, name, notes):
        layout, last = self.layout, len(messages) - 1
        gen_prompt = layout.gen_prompt if layout else ""
        spans, cur = [], 0
        for i in trained:
            probe = list(messages)
            probe[i] = {"role": "assistant", "content": SENTINEL.format(i)}
            other = self._render_row(probe)
            if other.count(SENTINEL.format(i)) != 1:
                raise BadChat(f"the chat template does not render assistant message {i} once")
            a = _common_prefix(text, other)
            b = len(text) - _common_suffix(text[a:], other[a:])
            if a < cur:
                raise BadChat(f"assistant message {i} is not rendered after the turn before it")
            at = text.rfind(gen_prompt, cur, a) if gen_prompt else -1
            start = at + len(gen_prompt) if at >= 0 else a
            reasoning, answer = _split_reasoning(messages[i])
            region = text[a:b]
            if answer.strip() and answer.strip() not in region:
                self._lost(notes, strict, name, "assistant text", answer)
            if reasoning and reasoning not in region:
                if not self.reasoning:
                    self._lost(notes, strict, name, "reasoning (the template has no reasoning "
                               "block)", reasoning)
                elif i == last:  # the final turn as the model generates it
                    restored = messages[i]["content"] if "</think>" in messages[i]["content"] \
                        else THINK.format(reasoning, answer.lstrip("\n"))
                    if text[:a].endswith("<think>\n") and restored.startswith("<think>"):
                        restored = restored[len("<think>"):].lstrip("\n")  # the prompt opens it
                    text, b = text[:a] + restored + text[b:], a + len(restored)
                    self._note(notes, "reasoning_restored", f"{name}: the chat template cuts the "
                               "reasoning from the final assistant turn; the trained turn keeps it "
                               "(<think>...</think> before the answer, as the model generates it)",
                               level=logging.INFO)
                elif strict:
                    raise BadChat("the chat template drops the reasoning of an earlier assistant "
                                  "turn (data.strict_template=true; data.train_on=each keeps it)")
                else:
                    self._note(notes, "history_reasoning_dropped", f"{name}: the chat template "
                               "drops the reasoning of earlier assistant turns; with "
                               "data.train_on=all they are trained as rendered, without it "
                               "(data.train_on=each trains every turn with its reasoning)")
            end = self._marker_end(text, b, i == last)
            spans.append((start, end))
            cur = end
        return text, spans

    def _marker_end(self, text: str, end: int, final: bool) -> int:
        """Extend a span that ends at the content through the template's end-of-turn marker."""
        tail = self.layout.tail[int(final)] if self.layout else ""
        if tail and text.startswith(tail, end):
            return end + len(tail)
        marker = self.special_re.match(text, end) if self.layout is None else None
        return marker.end() if marker else end

    def _note(self, notes: dict, kind: str, message: str, level: int = logging.WARNING) -> None:
        notes[kind] = notes.get(kind, 0) + 1
        if kind not in self.warned:
            self.warned.add(kind)
            log.log(level, message)

    def _lost(self, notes, strict, name, what, text):
        excerpt = text.strip()[:60]
        if strict:
            raise BadChat(f"the chat template drops {what} ({excerpt!r}; data.strict_template=true)")
        self._note(notes, f"dropped {what.split(' (')[0]}", f"{name}: the chat template drops {what}, "
                   f"e.g. {excerpt!r}; it is not in the training input (data.strict_template=true "
                   "stops instead)")


_TEMPLATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def chat_template_for(tokenizer, date: str) -> ChatTemplate:
    """The compiled, probed template of ``tokenizer`` (cached per tokenizer, template, special
    tokens and date: streaming asks once per chunk, and warnings are given once per run)."""
    source = tokenizer.get_chat_template() if tokenizer.chat_template else None
    if not source:
        raise DataError("the tokenizer has no chat template; set model.chat_template")
    key = (source, json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
           len(tokenizer), date)
    per_tokenizer = _TEMPLATES.setdefault(tokenizer, {})
    if key not in per_tokenizer:
        per_tokenizer[key] = ChatTemplate(tokenizer, source, date)
    return per_tokenizer[key]

"""Chat-template checks for ``stage=inspect``: one actionable line each, naming the example and turn.

Template-level: whether ``{% generation %}`` marks assistant text (info), a template whose
generation prompt adds nothing (no assistant marker), a template that writes BOS while the
tokenizer adds one on encode. Per conversation: message text missing from the render, and
unstable prefixes (the render of ``messages[:k]`` is not a prefix of the render of
``messages[:k+1]``). Per encoded sequence: a supervised turn that ends without an end-of-turn/EOS
token, a doubled BOS. The renders are those of training (finetune/data/chat_template.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from finetune.data.chat_template import _common_prefix, _split_reasoning, chat_template_for
from finetune.inspect.render import View, supervised_runs

PROBE = [{"role": "user", "content": "Hi."}]


@dataclass(frozen=True)
class Finding:
    check: str  # generation_markers | no_assistant_marker | bos_added_twice | missing_text |
    #             unstable_prefix | no_end_of_turn | double_bos
    message: str
    level: int = logging.WARNING

    @property
    def warning(self) -> bool:
        return self.level >= logging.WARNING


def _excerpt(text: str, width: int = 40) -> str:
    return repr(text[:width] + ("…" if len(text) > width else ""))


def template_findings(tokenizer, date: str) -> list[Finding]:
    template = chat_template_for(tokenizer, date)
    found = [Finding("generation_markers", "the chat template marks assistant text with {% generation %}: "
                     "the loss mask comes from those blocks" if template.generation else
                     "the chat template has no {% generation %} markers: the loss mask is found from "
                     "its layout (docs/data.md, 'Chat templates and loss masks')", logging.INFO)]
    try:
        prompting, plain = template.render(PROBE, True), template.render(PROBE, False)
    except Exception as exc:  # noqa: BLE001 - a template that refuses a lone user turn
        prompting = plain = None
        found.append(Finding("no_assistant_marker", f"the chat template raised on a lone user turn "
                             f"({type(exc).__name__}: {exc}); its assistant marker cannot be checked"))
    if prompting is not None and prompting == plain:
        found.append(Finding("no_assistant_marker", "the chat template has no assistant marker: "
                             "add_generation_prompt=true adds nothing, so a prompt does not show where "
                             "the model's turn begins; write one (e.g. '<|assistant|>') in model.chat_template"))
    bos = tokenizer.bos_token
    if bos and prompting is not None and prompting.startswith(bos):
        added = tokenizer("x", add_special_tokens=True)["input_ids"]
        if added and added[0] == tokenizer.bos_token_id:
            found.append(Finding("bos_added_twice", f"the chat template writes {bos} and the tokenizer "
                                 f"adds one on encode: encoding a render with add_special_tokens=True "
                                 f"(pipelines, servers) doubles it; encode renders with "
                                 f"add_special_tokens=False or drop {bos} from the template"))
    return found


def conversation_findings(tokenizer, date: str, name: str, messages: list[dict]) -> list[Finding]:
    template = chat_template_for(tokenizer, date)
    found = []
    try:
        full = template.render(messages)
    except Exception as exc:  # noqa: BLE001
        return [Finding("missing_text", f"{name}: the chat template raised ({type(exc).__name__}: {exc}); "
                        "the conversation cannot be trained")]
    for k, m in enumerate(messages):
        text = (_split_reasoning(m)[1] if m["role"] == "assistant" else m["content"]).strip()
        if text and text not in full:
            found.append(Finding("missing_text", f"{name} turn {k} ({m['role']}): its text {_excerpt(text)} "
                                 "is missing from the render: the template drops or rewrites it"))
    previous = None
    for k in range(1, len(messages) + 1):
        try:
            current = template.render(messages[:k])
        except Exception:  # noqa: BLE001 - e.g. a template that needs a user turn last
            previous = None
            continue
        if previous is not None and not current.startswith(previous):
            at = _common_prefix(previous, current)
            found.append(Finding("unstable_prefix", f"{name} turn {k - 1} ({messages[k - 1]['role']}): "
                                 f"rendering messages[:{k - 1}] is not a prefix of rendering "
                                 f"messages[:{k}]; from character {at} the shorter render has "
                                 f"{_excerpt(previous[at:])}, the longer {_excerpt(current[at:])} "
                                 "(a turn's tokens change once later turns exist)"))
        previous = current
    return found


def sequence_findings(tokenizer, name: str, ids: list[int], labels: list[int]) -> list[Finding]:
    found = []
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:2] == [bos, bos]:
        found.append(Finding("double_bos", f"{name}: starts with {tokenizer.bos_token} twice: the chat "
                             "template writes BOS and something adds it again; write it once"))
    specials = set(tokenizer.all_special_ids)
    for j, (start, end) in enumerate(supervised_runs(View("", ids, labels))):
        last = ids[end - 1]
        if last != tokenizer.eos_token_id and last not in specials:
            found.append(Finding("no_end_of_turn", f"{name} supervised turn {j}: ends with "
                                 f"{tokenizer.decode([last])!r}, not an end-of-turn or EOS token, so the "
                                 "model does not learn to stop there; end assistant turns with a special "
                                 "token in the template or set data.append_eos=always"))
    return found

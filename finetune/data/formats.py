"""Turn a raw record into what the tokenizer step consumes, by ``data.format``:

- alpaca (instruction / input / output), messages (OpenAI ``role``/``content``, plus an optional
  ``reasoning_content`` / ``thinking`` / ``reasoning``), sharegpt (``from``/``value``) -> a chat: a
  list of ``{"role", "content"}`` messages (``reasoning_content`` where given);
- prompt_completion -> ``(prompt, completion)`` raw strings (no chat template);
- text -> a document string (continued pretraining);
- classification -> ``(text, label)``;
- preference -> a :class:`PreferencePair` of two chats sharing one prompt: ``prompt`` (a string or
  messages) + ``chosen`` / ``rejected`` (strings, an assistant message or messages), or
  LLaMA-Factory's sharegpt ranking layout (``conversations`` + ``chosen`` / ``rejected`` objects
  with ``from`` / ``value``), detected per row;
- kto -> a :class:`KTOExample` (chat, desirable): one unpaired completion with a boolean ``label``,
  either KTO's layout (``messages`` ending with the assistant completion + ``label``) or
  ``prompt`` (a string or messages) + ``completion`` (a string, an assistant message or messages)
  + ``label``, detected per row.

A bad record raises :class:`BadExample` naming the field; the caller adds file:line and decides
(``data.on_bad_example``) whether that ends the run or the row is skipped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from omegaconf import DictConfig, OmegaConf

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant"}
CHAT_ROLES = ("system", "user", "assistant")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # a message's reasoning, by any name


class BadExample(ValueError):
    """A record that does not fit the format; the message names the field and the problem."""


@dataclass(frozen=True)
class FormatSpec:
    """The ``data.*`` settings formatting reads, as plain Python values.

    Read once per run: attribute access on an OmegaConf node costs ~75us, which per row and field
    was the largest single cost of the pipeline.
    """

    format: str
    columns: SimpleNamespace
    system_prompt: str | None

    @classmethod
    def from_config(cls, data: DictConfig, fmt: str | None = None) -> "FormatSpec":
        columns = SimpleNamespace(**OmegaConf.to_container(data.columns, resolve=True))
        return cls(fmt or data.format, columns, data.system_prompt)


def format_record(row, spec: FormatSpec):
    """One raw row -> what ``spec.format`` yields (see the module docstring)."""
    if not isinstance(row, dict):
        raise BadExample(f"expected an object with fields, got {type(row).__name__}")
    return FORMATS[spec.format](row, spec)


def _field(row: dict, column: str, key: str, *, allow_empty: bool = False) -> str:
    if column not in row:
        raise BadExample(f"missing field {column!r} (data.columns.{key}={column})")
    value = row[column]
    if not isinstance(value, str):
        raise BadExample(f"field {column!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadExample(f"field {column!r} is empty")
    return value


def _optional(row: dict, column: str) -> str:
    value = row.get(column)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadExample(f"field {column!r} must be a string, got {type(value).__name__}")
    return value


def _check_chat(messages: list[dict]) -> list[dict]:
    if not messages:
        raise BadExample("the conversation has no messages")
    for i, m in enumerate(messages):
        if m["role"] not in CHAT_ROLES:
            raise BadExample(f"message {i}: unknown role {m['role']!r} (expected {', '.join(CHAT_ROLES)})")
        if not isinstance(m["content"], str):
            raise BadExample(f"message {i}: content must be a string, got {type(m['content']).__name__}")
    if messages[-1]["role"] != "assistant":
        raise BadExample("the conversation does not end with an assistant message")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadExample("the conversation has no non-empty assistant message")
    return messages


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    if system and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}] + messages
    return messages


def to_chat(row: dict, data: FormatSpec) -> list[dict]:
    cols, fmt = data.columns, data.format
    if fmt == "alpaca":
        instruction = _field(row, cols.instruction, "instruction")
        extra = _optional(row, cols.input)
        output = _field(row, cols.output, "output")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        system = _optional(row, cols.system) or data.system_prompt
        return _check_chat(_with_system([{"role": "user", "content": user},
                                         {"role": "assistant", "content": output}], system))
    column = cols.messages if fmt == "messages" else cols.conversations
    turns = row.get(column)
    if not isinstance(turns, list):
        raise BadExample(f"field {column!r} must be a list of messages "
                         f"(data.columns.{'messages' if fmt == 'messages' else 'conversations'}={column})")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadExample(f"message {i} must be an object")
        if fmt == "messages":
            if "role" not in turn or "content" not in turn:
                raise BadExample(f"message {i} needs 'role' and 'content'")
            messages.append({"role": turn["role"], "content": turn["content"]})
            reasoning = next((turn[k] for k in REASONING_FIELDS if turn.get(k) is not None), None)
            if reasoning is not None:  # kept for reasoning templates (data/chat_template.py)
                if not isinstance(reasoning, str):
                    raise BadExample(f"message {i}: reasoning must be a string, "
                                     f"got {type(reasoning).__name__}")
                messages[-1]["reasoning_content"] = reasoning
        else:
            if "from" not in turn or "value" not in turn:
                raise BadExample(f"message {i} needs 'from' and 'value'")
            role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
            if role is None:
                raise BadExample(f"message {i}: unknown speaker {turn['from']!r}")
            messages.append({"role": role, "content": turn["value"]})
    return _check_chat(_with_system(messages, data.system_prompt))


def to_completion(row: dict, data: FormatSpec) -> tuple[str, str]:
    cols = data.columns
    return (_field(row, cols.prompt, "prompt", allow_empty=True),
            _field(row, cols.completion, "completion"))


def to_text(row: dict, data: FormatSpec) -> str:
    return _field(row, data.columns.text, "text")


def to_labelled(row: dict, data: FormatSpec) -> tuple[str, str]:
    cols = data.columns
    text = _field(row, cols.text, "text")
    if cols.label not in row or row[cols.label] is None:
        raise BadExample(f"missing field {cols.label!r} (data.columns.label={cols.label})")
    return text, str(row[cols.label])


class PreferencePair(tuple):
    """(chosen chat, rejected chat): the same prompt messages, each ending with its completion."""

    @property
    def chosen(self) -> list[dict]:
        return self[0]

    @property
    def rejected(self) -> list[dict]:
        return self[1]


def _completion(value, column: str) -> list[dict]:
    """A completion as assistant messages: a string, one message, or a list of messages."""
    if value is None:
        raise BadExample(f"missing field {column!r} (data.columns.{column})")
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    elif isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise BadExample(f"field {column!r} must be a string, a message or a list of messages, "
                         f"got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        role = m.get("role", SHAREGPT_ROLES.get(str(m.get("from", "")).lower()))
        content = m.get("content", m.get("value"))
        if role != "assistant":
            raise BadExample(f"field {column!r}: message {i} must be an assistant message, got role {role!r}")
        if not isinstance(content, str):
            raise BadExample(f"field {column!r}: message {i} content must be a string, "
                             f"got {type(content).__name__}")
        out.append({"role": "assistant", "content": content})
    if not out or not "".join(m["content"] for m in out).strip():
        raise BadExample(f"field {column!r} is empty")
    return out


def to_preference(row: dict, data: FormatSpec) -> PreferencePair:
    cols = data.columns
    prompt = _prompt_messages(row, data)
    chosen, rejected = _completion(row.get(cols.chosen), cols.chosen), _completion(row.get(cols.rejected),
                                                                                  cols.rejected)
    if chosen == rejected:
        raise BadExample(f"fields {cols.chosen!r} and {cols.rejected!r} are identical")
    return PreferencePair((prompt + chosen, prompt + rejected))


def _prompt_messages(row: dict, data: FormatSpec) -> list[dict]:
    """The prompt of a preference / KTO row as messages: ``prompt`` (a string or messages), or a
    sharegpt ``conversations`` list (preference's ranking layout)."""
    cols = data.columns
    if cols.conversations in row and cols.prompt not in row:  # sharegpt ranking layout
        if not isinstance(row[cols.conversations], list):
            raise BadExample(f"field {cols.conversations!r} must be a list of messages")
        prompt = to_chat({cols.conversations: row[cols.conversations] + [{"from": "gpt", "value": "x"}]},
                         FormatSpec("sharegpt", cols, data.system_prompt))[:-1]
    else:
        value = row.get(cols.prompt)
        if value is None:
            raise BadExample(f"missing field {cols.prompt!r} (data.columns.prompt={cols.prompt})")
        if isinstance(value, str):
            if not value.strip():
                raise BadExample(f"field {cols.prompt!r} is empty")
            prompt = [{"role": "user", "content": value}]
        elif isinstance(value, list):
            prompt = to_chat({cols.messages: value + [{"role": "assistant", "content": "x"}]},
                             FormatSpec("messages", cols, None))[:-1]
        else:
            raise BadExample(f"field {cols.prompt!r} must be a string or a list of messages, "
                             f"got {type(value).__name__}")
        prompt = _with_system(prompt, data.system_prompt)
    return prompt


class KTOExample(tuple):
    """(chat ending with the completion, desirable): one unpaired KTO example."""

    @property
    def chat(self) -> list[dict]:
        return self[0]

    @property
    def desirable(self) -> bool:
        return self[1]


def to_kto(row: dict, data: FormatSpec) -> KTOExample:
    cols = data.columns
    if cols.label not in row or row[cols.label] is None:
        raise BadExample(f"missing field {cols.label!r} (data.columns.label={cols.label}): "
                         "true (desirable) or false (undesirable)")
    label = row[cols.label]
    if not isinstance(label, bool):
        raise BadExample(f"field {cols.label!r} must be a boolean (true = desirable, false = undesirable), "
                         f"got {type(label).__name__} {label!r}")
    if cols.messages in row and cols.prompt not in row:  # KTO's layout: the last assistant turn is the completion
        chat = to_chat(row, FormatSpec("messages", cols, data.system_prompt))
        if not chat[-1]["content"].strip():
            raise BadExample(f"field {cols.messages!r}: the last assistant message (the completion) is empty")
    else:
        chat = _prompt_messages(row, data) + _completion(row.get(cols.completion), cols.completion)
    return KTOExample((chat, label))


# data.format -> the function that formats one row (the valid choices of data.format).
FORMATS = {"alpaca": to_chat, "messages": to_chat, "sharegpt": to_chat,
           "prompt_completion": to_completion, "text": to_text, "classification": to_labelled, "preference": to_preference,
           "kto": to_kto}
CHAT_FORMATS = ("alpaca", "messages", "sharegpt")  # formats that can be mixed in data.sources

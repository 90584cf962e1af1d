"""``model.chat_template``: the shipped presets (finetune/data/chat_templates/*.jinja), files and
Jinja strings -> the template text, with the check that a preset's tokens exist in the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "chat_templates"
# The tokens each preset writes; they must be single tokens of the tokenizer it is used with.
PRESET_TOKENS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "qwen3": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "mistral": ("[INST]", "[/INST]"),
    "phi3": ("<|user|>", "<|assistant|>", "<|end|>"),
    "deepseek-r1": ("<｜User｜>", "<｜Assistant｜>"),
}


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.jinja"))


def resolve_chat_template(value: str, tokenizer=None) -> str:
    """``model.chat_template``: a preset name, a file (Jinja, or JSON with a ``chat_template``
    field such as a tokenizer_config.json), or a Jinja string -> the template text."""
    value = str(value)
    if value in PRESET_TOKENS or (PRESET_DIR / f"{value}.jinja").is_file():
        missing = [t for t in PRESET_TOKENS.get(value, ()) if tokenizer is not None
                   and not _is_single_token(tokenizer, t)]
        if missing:
            raise ConfigError(f"model.chat_template={value}: the tokenizer has no token for "
                              f"{', '.join(missing)}; use the preset of the model's family "
                              f"({', '.join(presets())}) or pass its template")
        return (PRESET_DIR / f"{value}.jinja").read_text()
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.chat_template={value!r} is not a preset ({', '.join(presets())}), "
                          "an existing file or a Jinja template")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            text = json.loads(text)["chat_template"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"model.chat_template={value}: a JSON file needs a 'chat_template' "
                              "field with the template") from None
    return text


def _is_single_token(tokenizer, token: str) -> bool:
    ids = tokenizer.backend_tokenizer.encode(token, add_special_tokens=False).ids
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id


# ----------------------------------------------------------------------------- rendering

"""``stage=chat``: the chat UI of :mod:`finetune.chat.app` over a run's ``final/`` or ``merged/``.

Which model: ``chat.model_dir`` (a ``final/`` adapter, a ``merged/`` or a fully fine-tuned model
dir), else ``<output_dir>/final``. Which base it is compared with: an adapter's own base
(adapter_config.json); for a full model ``chat.base_model``, else the base of the run the dir
sits in (:func:`run_base_model`). Keys: chat.host, chat.port, chat.share, chat.max_new_tokens.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml
from omegaconf import DictConfig

from finetune.errors import ConfigError, ModelError

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'finetune[chat]'"


def require_gradio(what: str) -> None:
    """One line naming the extra to install when Gradio is missing."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ConfigError(f"{what} needs gradio, which is not installed: {INSTALL_HINT}") from None


def chat_model_dir(cfg: DictConfig) -> Path:
    if not cfg.chat.model_dir and not cfg.output_dir:
        raise ConfigError("stage=chat needs chat.model_dir=<a final/ or merged/ dir> or output_dir=<run dir> "
                          "(its final/ is served)")
    model_dir = Path(cfg.chat.model_dir or Path(cfg.output_dir) / "final")
    if not (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        raise ConfigError(f"stage=chat: {model_dir} holds no model (no adapter_config.json nor config.json); "
                          "point chat.model_dir at a run's final/ or merged/ dir")
    return model_dir


def run_base_model(model_dir: Path) -> str | None:
    """The base of the run a full model dir sits in (``<run>/merged``, ``<run>/final``): the
    adapter's base in ``<run>/final``, else ``model.name_or_path`` of ``<run>/config.yaml`` when it
    names a loadable model (not a built-in one)."""
    run_dir = model_dir.resolve().parent
    adapter = run_dir / "final" / "adapter_config.json"
    if adapter.is_file():
        return json.loads(adapter.read_text()).get("base_model_name_or_path")
    config_path = run_dir / "config.yaml"
    name = ((yaml.safe_load(config_path.read_text()) or {}).get("model") or {}).get("name_or_path") \
        if config_path.is_file() else None
    return None if not name or name.startswith("builtin:") else name


def base_for(cfg: DictConfig, model_dir: Path) -> str | None:
    if (model_dir / "adapter_config.json").is_file():
        return cfg.chat.base_model  # None: the adapter's own base
    return cfg.chat.base_model or run_base_model(model_dir)


def load_chat_generator(model_dir: Path, base: str | None):
    from finetune.chat.app import load_generator

    try:
        generator = load_generator(str(model_dir), base)
    except (OSError, ValueError) as error:
        raise ModelError(f"stage=chat: cannot load {model_dir}" + (f" with base {base}" if base else "")
                         + f": {' '.join(str(error).split())[:300]}") from None
    if not getattr(generator.tokenizer, "chat_template", None):
        raise ConfigError(f"stage=chat: the tokenizer in {model_dir} has no chat template; serve a chat model's "
                          "final/ (trained with a chat template, model.chat_template)")
    return generator


def run_chat(cfg: DictConfig) -> int:
    require_gradio("stage=chat")
    from finetune.chat.app import build_app

    model_dir = chat_model_dir(cfg)
    generator = load_chat_generator(model_dir, base_for(cfg, model_dir))
    if not generator.has_base:
        log.info("chat: no base model known for %s (set chat.base_model=<id or dir>): fine-tuned answers only",
                 model_dir)
    title = f"finetune chat: {model_dir.resolve().parent.name}/{model_dir.name}"
    app = build_app(generator, title=title, max_new_tokens=cfg.chat.max_new_tokens)
    try:
        app.queue().launch(server_name=cfg.chat.host, server_port=cfg.chat.port, share=cfg.chat.share)
    except OSError as error:
        raise ConfigError(f"chat.port={cfg.chat.port} on chat.host={cfg.chat.host} cannot be served "
                          f"({' '.join(str(error).split())[:200]}): pick another chat.port") from None
    return 0

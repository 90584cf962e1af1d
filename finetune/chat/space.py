"""A Hugging Face Space next to the pushed model: ``hub.space=true`` (after the end-of-run push) or
``stage=space`` (for a run already pushed; ``output_dir=<run dir>``, ``hub.repo_id=<its model repo>``).

The Space (repo type ``space``, SDK gradio; id ``hub.space_repo_id``, default ``hub.repo_id``) holds:
- ``app.py``: :mod:`finetune.chat.app` itself plus an entry point that serves the model repo by its
  Hub id (env ``MODEL_ID`` overrides it, ``BASE_MODEL`` the base of a full model);
- ``requirements.txt``: torch, transformers and peft at the versions that wrote the model;
- ``README.md``: the Space card (``sdk: gradio``, ``sdk_version``, ``app_file``, ``models``).
A private model repo needs an ``HF_TOKEN`` secret in the Space's settings to be read.
"""

from __future__ import annotations

import logging
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from finetune.errors import ConfigError

log = logging.getLogger(__name__)
# The Space's Gradio when this machine has none (pushing needs no Gradio): the version tested here.
TESTED_GRADIO = "6.31.0"
REQUIREMENTS = ("torch", "transformers", "peft")
ENTRY_POINT = '''

if __name__ == "__main__":  # the Space's entry point, appended by finetune.chat.space
    import os

    generator = load_generator(os.environ.get("MODEL_ID", {model_id!r}), os.environ.get("BASE_MODEL") or {base!r})
    build_app(generator, title={title!r}).queue().launch()
'''


def app_source(model_id: str, base_model: str | None) -> str:
    from finetune.chat import app

    return Path(app.__file__).read_text() + ENTRY_POINT.format(
        model_id=model_id, base=base_model, title=f"{model_id}: fine-tuned vs base")


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name).split("+")[0]  # 2.13.0+cpu -> 2.13.0
    except metadata.PackageNotFoundError:
        return None


def requirements() -> str:
    return "".join(f"{name}=={package_version(name)}\n" if package_version(name) else f"{name}\n"
                   for name in REQUIREMENTS)


def space_card(model_id: str, base_model: str | None) -> str:
    from huggingface_hub import SpaceCard, SpaceCardData

    from finetune.outputs.model_card import looks_like_hub_id

    models = [model_id] + ([base_model] if looks_like_hub_id(base_model) else [])
    data = SpaceCardData(title=model_id.split("/")[-1][:30], sdk="gradio",
                         sdk_version=package_version("gradio") or TESTED_GRADIO, app_file="app.py",
                         models=models, emoji="💬", colorFrom="blue", colorTo="gray", pinned=False)
    body = (f"# {model_id.split('/')[-1]}: chat\n\n"
            f"Chat with [{model_id}](https://huggingface.co/{model_id}) (fine-tuned with finetune) and with its base "
            f"model{f' `{base_model}`' if base_model else ''}, side by side, streamed. Greedy at temperature 0.\n\n"
            "Space variables: `MODEL_ID` (the model repo), `BASE_MODEL` (the base of a merged or full model). "
            "A private model repo needs an `HF_TOKEN` secret.\n")
    return str(SpaceCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def space_base_model(run_dir: Path | None) -> tuple[str | None, str | None]:
    """(the base named in the card, the base app.py loads itself): an adapter names its own base
    in adapter_config.json, so app.py is given one only for a full model."""
    from finetune.outputs.model_card import base_model_name, looks_like_hub_id, read_run

    if run_dir is None:
        return None, None
    base = base_model_name(run_dir, read_run(run_dir)[0])
    if base and not looks_like_hub_id(base):
        log.warning("hub: the base model %s is a local path a Space cannot load: set the Space's BASE_MODEL "
                    "variable (full models) or push an adapter trained on a Hub model", base)
    if (run_dir / "final" / "adapter_config.json").is_file():
        return base, None
    return base, base if looks_like_hub_id(base) else None


def write_space(folder: Path, model_id: str, run_dir: Path | None) -> Path:
    shown_base, app_base = space_base_model(run_dir)
    (folder / "app.py").write_text(app_source(model_id, app_base))
    (folder / "requirements.txt").write_text(requirements())
    (folder / "README.md").write_text(space_card(model_id, shown_base), encoding="utf-8")
    return folder


def push_space(run_dir: Path | None, hub_cfg: Any, *, token: str | None = None, endpoint: str | None = None,
               backoff_s: float = 2.0) -> str:
    """Create (or update) the Space of ``hub_cfg.repo_id``'s model; returns the commit URL."""
    from finetune.outputs.hub import check_token_absent, make_api, resolve_token, with_retries

    if not hub_cfg.repo_id:
        raise ConfigError("a Space needs the model repo it serves: set hub.repo_id=<user>/<model>")
    space_id, token = hub_cfg.space_repo_id or hub_cfg.repo_id, resolve_token(token)
    api = make_api(token, endpoint)
    with tempfile.TemporaryDirectory(prefix="finetune-space-") as tmp:
        folder = write_space(Path(tmp), hub_cfg.repo_id, Path(run_dir) if run_dir else None)
        check_token_absent({p.name: p for p in folder.iterdir()}, token)

        def upload() -> str:
            api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=hub_cfg.private, exist_ok=True)
            return api.upload_folder(repo_id=space_id, repo_type="space", folder_path=folder,
                                     commit_message=f"finetune: chat Space for {hub_cfg.repo_id}").commit_url

        url = with_retries(upload, f"push of the Space {space_id}", hub_cfg.max_retries + 1, backoff_s, token)
    log.info("hub: pushed the Space %s (serving %s): %s", space_id, hub_cfg.repo_id, url)
    return url


def run_space(cfg: DictConfig) -> int:
    if not cfg.hub.repo_id:
        raise ConfigError("stage=space needs hub.repo_id=<the pushed model repo the Space serves>")
    run_dir = Path(cfg.output_dir) if cfg.output_dir else None
    if run_dir is not None and not run_dir.is_dir():
        raise ConfigError(f"stage=space: output_dir={run_dir} does not exist; pass the run dir that was pushed")
    push_space(run_dir, cfg.hub)
    return 0

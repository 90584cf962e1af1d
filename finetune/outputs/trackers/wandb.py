"""Weights & Biases tracker: one W&B run per training run, on the main process only.

- Identity from ``logger.wandb``: project, entity, name (default: the run dir's name), group,
  tags, notes. The resolved config (secret-looking keys removed) becomes the run's config.
- Mode ``auto`` (default): ``WANDB_MODE`` if set, else ``online`` when an API key is configured
  (``WANDB_API_KEY``, an identity token file, or a ``.netrc`` entry for the W&B host), else
  ``offline``. ``online`` / ``offline`` / ``disabled`` force a mode.
- Files go under ``<output_dir>/wandb``. A resumed run passes the id saved in its checkpoint
  (``state["tracker_ids"]["wandb"]``) with ``resume="allow"``, so it continues the same W&B run.
- W&B must never stop training: a failed ``init`` (or log) prints one warning line and the
  tracker turns itself off.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from finetune.outputs.trackers import Tracker

log = logging.getLogger(__name__)
SECRET_KEY = re.compile(r"token|secret|password|api_?key|credential", re.IGNORECASE)


def scrub(node):
    """A config container without keys that look like secrets."""
    if isinstance(node, dict):
        return {k: scrub(v) for k, v in node.items() if not SECRET_KEY.search(str(k))}
    return [scrub(v) for v in node] if isinstance(node, list) else node


def has_api_key() -> bool:
    """Whether wandb would find credentials: the env variables it reads, then ``.netrc``."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:  # wandb's own netrc reader (private module: any failure means "no key found")
        from wandb.sdk.lib.wbauth import wbnetrc

        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        return bool(wbnetrc.read_netrc_auth(host=host))
    except Exception:  # noqa: BLE001
        return False


def resolve_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    return os.environ.get("WANDB_MODE") or ("online" if has_api_key() else "offline")


class WandbTracker(Tracker):
    def __init__(self, cfg: DictConfig, run_dir: Path, resume_id: str | None = None):
        self.cfg, self.run_dir, self.run = cfg.logger.wandb, run_dir, None
        wcfg = self.cfg
        os.environ.setdefault("WANDB_SILENT", "true")  # no banner / sync lines on the console
        try:
            import wandb

            run_dir.mkdir(parents=True, exist_ok=True)
            config = scrub(OmegaConf.to_container(cfg, resolve=True))
            self.run = wandb.init(
                project=wcfg.project, entity=wcfg.entity, name=wcfg.name or run_dir.name,
                group=wcfg.group, tags=list(wcfg.tags) or None, notes=wcfg.notes,
                config=config, dir=str(run_dir), mode=resolve_mode(wcfg.mode),
                id=resume_id, resume="allow" if resume_id else None,
                settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
            self.run_id = self.run.id
            # Eval rows arrive at the same step as train rows: one shared x-axis for both.
            self.run.define_metric("*", step_metric="trainer/step")
        except Exception as exc:  # noqa: BLE001 - tracking never stops training
            self._disable(f"W&B init failed, continuing without it: {type(exc).__name__}: {exc}")

    def _disable(self, message: str) -> None:
        log.warning(" ".join(str(message).split())[:300])
        self.run = None

    def log(self, row: dict, step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log({**{k: v for k, v in row.items() if k != "step"}, "trainer/step": step})
        except Exception as exc:  # noqa: BLE001
            self._disable(f"W&B log failed, tracking stopped: {type(exc).__name__}: {exc}")

    def finish(self, summary: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update({f"final/{k}": v for k, v in summary.items()
                                     if isinstance(v, (int, float, str))})
            final = Path(summary.get("final_dir") or self.run_dir / "final")
            if self.cfg.log_artifact and final.is_dir():
                import wandb

                artifact = wandb.Artifact(f"{self.run.name}-final".replace("/", "-"), type="model",
                                          metadata={"steps": summary.get("steps"),
                                                    "eval_loss": summary.get("eval_loss")})
                artifact.add_dir(str(final))
                self.run.log_artifact(artifact)
            self.run.finish()
        except Exception as exc:  # noqa: BLE001
            self._disable(f"W&B finish failed: {type(exc).__name__}: {exc}")

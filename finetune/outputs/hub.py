"""Pushing a run to the Hugging Face Hub: checks first, retries with backoff, never leaks the token.

- ``push_run(run_dir, hub_cfg)``: the end-of-run push. It checks ``final/`` (no empty tensors,
  the chat template ends the assistant turn with the eos token, an optional ``verify`` callable,
  e.g. :func:`verify_adapter`), then commits in one commit ``final/`` at the repo root, ``merged/``
  as a subfolder when present, ``config.yaml`` (secret-looking keys dropped), ``summary.json`` and
  a generated ``README.md`` (:mod:`finetune.model_card`). Raises :class:`HubPushError` on failure.
- ``HubUploader``: the trainer's background uploader. Main process only; one worker thread; a
  failed upload is a warning line and an entry in ``close()``'s results, never an exception in
  the training loop.

Keys read from ``hub_cfg`` (``finetune.config.HubConfig``): push, repo_id, private, revision,
strategy, max_retries, commit_message, space (the chat Space after the run's push,
:mod:`finetune.chat.space`); license is read by the model card from config.yaml.
The token comes from the ``token`` argument, ``HF_TOKEN`` or ``huggingface_hub.get_token()``; it
is passed to the client only, and redacted from every message this module emits.
The Hub endpoint is ``HF_ENDPOINT`` (read by huggingface_hub at import) unless ``endpoint=`` is given.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import ConfigError, FinetuneError, HubPushError

log = logging.getLogger(__name__)

STRATEGIES = ("end", "every_checkpoint", "best")
HF_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{8,}")
SECRET_KEY_PATTERN = re.compile(r"token|secret|password|api_?key|credential", re.IGNORECASE)
TEXT_SCAN_LIMIT = 10 * 2**20  # files above this are weights, not text a token could hide in


# --- config, token, redaction -------------------------------------------------------------------
def hub_config_problems(hub_cfg: Any) -> list[str]:
    """What is wrong with the hub.* keys, one line each (the run's config validation uses it)."""
    problems = []
    if hub_cfg.push and not hub_cfg.repo_id:
        problems.append("hub.push=true needs hub.repo_id=<user>/<name> (e.g. hub.repo_id=your-name/my-model)")
    if hub_cfg.strategy not in STRATEGIES:
        problems.append(f"hub.strategy={hub_cfg.strategy!r} is not valid; choose one of: {', '.join(STRATEGIES)}")
    if hub_cfg.max_retries < 0:
        problems.append(f"hub.max_retries={hub_cfg.max_retries} must be >= 0")
    return problems


def check_hub_config(hub_cfg: Any) -> None:
    """One-line ConfigError naming the hub.* key that is wrong (for direct use of this module)."""
    problems = hub_config_problems(hub_cfg)
    if problems:
        raise ConfigError(problems[0])


def resolve_token(token: str | None = None) -> str:
    from huggingface_hub import get_token

    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise ConfigError("hub.push=true needs a Hub token: set HF_TOKEN or run `hf auth login`")
    return token


def redact(text: str, token: str | None) -> str:
    """The text with the token (and anything shaped like an HF token) replaced by ***."""
    if token:
        text = text.replace(token, "***")
    return HF_TOKEN_PATTERN.sub("hf_***", text)


def one_line(error: BaseException, token: str | None) -> str:
    message = " ".join(str(error).split()) or type(error).__name__
    return redact(f"{type(error).__name__}: {message}", token)


def is_main_process() -> bool:
    # torchrun / accelerate / SLURM launchers all export RANK; a plain run has none.
    return int(os.environ.get("RANK", "0")) == 0


# --- checks on final/ before anything leaves the machine ----------------------------------------
def check_no_empty_tensors(final_dir: Path) -> None:
    """Every safetensors file in final_dir holds tensors, none with 0 elements (a ZeRO-3 gather bug)."""
    from safetensors import safe_open

    files = sorted(final_dir.glob("*.safetensors"))
    if not files:
        raise HubPushError(f"refusing to push: no .safetensors weights in {final_dir}")
    for path in files:
        with safe_open(str(path), framework="pt") as weights:
            names = list(weights.keys())
            empty = [n for n in names if weights.get_slice(n).get_shape().count(0)]
        if not names:
            raise HubPushError(f"refusing to push: {path.name} holds no tensors")
        if empty:
            raise HubPushError(f"refusing to push: {path.name} has empty tensors ({', '.join(empty[:3])})")


def check_chat_template_eos(final_dir: Path) -> None:
    """The saved chat template closes the assistant turn with eos, or generation never stops."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(final_dir, local_files_only=True)
    except (OSError, ValueError) as error:
        raise HubPushError(f"refusing to push: no loadable tokenizer in {final_dir} ({one_line(error, None)[:200]})") from None
    if not getattr(tokenizer, "chat_template", None):
        return  # classifiers and raw-text models have no chat turns to end
    chat = [{"role": "user", "content": "PING"}, {"role": "assistant", "content": "PONG"}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    after_reply = rendered[rendered.rindex("PONG") + len("PONG"):].lstrip()
    if not tokenizer.eos_token or not after_reply.startswith(tokenizer.eos_token):
        raise HubPushError(f"refusing to push: the chat template in {final_dir} does not end the assistant turn "
                           f"with the eos token {tokenizer.eos_token!r} (it renders {after_reply[:40]!r})")


def verify_adapter(final_dir: Path, base_model_loader: Callable[[], Any], inputs: dict,
                   expected_logits: Any, atol: float = 1e-4) -> None:
    """Reload the adapter offline onto a fresh base; its logits must match the recorded ones."""
    import torch
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model_loader(), str(final_dir), local_files_only=True).eval()
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    diff = (logits - expected_logits.float()).abs().max().item()
    if diff > atol:
        raise HubPushError(f"refusing to push: the adapter in {final_dir} reloads to different logits "
                           f"(max abs diff {diff:.3g} > {atol})")


# --- what is pushed ------------------------------------------------------------------------------
def scrub_config(text: str) -> str:
    """config.yaml without any key that looks like a secret."""
    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: scrub(v) for k, v in node.items() if not SECRET_KEY_PATTERN.search(str(k))}
        return [scrub(v) for v in node] if isinstance(node, list) else node
    return yaml.safe_dump(scrub(yaml.safe_load(text)), sort_keys=False)


def run_files(run_dir: Path) -> dict[str, Path | bytes]:
    """path in repo -> local file or content, for the end-of-run commit."""
    final_dir = run_dir / "final"
    files: dict[str, Path | bytes] = {}
    for path in sorted(p for p in final_dir.rglob("*") if p.is_file()):
        files[path.relative_to(final_dir).as_posix()] = path
    files.pop("README.md", None)  # the local card; push_run writes the repo's (its own repo id)
    if "adapter_config.json" in files:
        files["adapter_config.json"] = portable_adapter_config(run_dir, files["adapter_config.json"])
    if (run_dir / "merged").is_dir():
        for path in sorted(p for p in (run_dir / "merged").rglob("*") if p.is_file()):
            files[f"merged/{path.relative_to(run_dir / 'merged').as_posix()}"] = path
    if (run_dir / "config.yaml").exists():
        files["config.yaml"] = scrub_config((run_dir / "config.yaml").read_text()).encode()
    if (run_dir / "summary.json").exists():
        files["summary.json"] = run_dir / "summary.json"
    return files


def portable_adapter_config(run_dir: Path, path: Path) -> Path | bytes:
    """adapter_config.json naming the base by its Hub id where there is one (final/ names a local
    path, e.g. a package's files or the run's base_model/, which means nothing on another machine)."""
    from finetune.model.builtin import hub_id
    from finetune.outputs.model_card import pick, read_run

    hub = hub_id(pick(read_run(run_dir)[0], "model.name_or_path"))
    config = json.loads(path.read_text())
    if not hub or config.get("base_model_name_or_path") == hub:
        return path
    return (json.dumps({**config, "base_model_name_or_path": hub}, indent=2, sort_keys=True) + "\n").encode()


def check_token_absent(files: dict[str, Path | bytes], token: str) -> None:
    needle = token.encode()
    for name, source in files.items():
        if isinstance(source, Path) and source.stat().st_size > TEXT_SCAN_LIMIT:
            continue
        if needle in (source if isinstance(source, bytes) else source.read_bytes()):
            raise HubPushError(f"refusing to push: {name} contains the Hub token")


# --- talking to the Hub --------------------------------------------------------------------------
def is_transient(error: BaseException) -> bool:
    """Server errors, rate limits and network failures are worth retrying; bad requests are not."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError) and error.response is not None:
        return error.response.status_code >= 500 or error.response.status_code == 429
    return not isinstance(error, (ValueError, FinetuneError))


def with_retries(action: Callable[[], Any], what: str, attempts: int, backoff_s: float, token: str) -> Any:
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as error:  # noqa: BLE001 - every failure is reported, redacted, below
            if attempt == attempts or not is_transient(error):
                # `from None`: the chained traceback would carry the unredacted client message.
                raise HubPushError(f"{what} failed after {attempt} attempt(s): {one_line(error, token)}") from None
            log.info("hub: %s failed (attempt %d/%d), retrying: %s", what, attempt, attempts, one_line(error, token))
            time.sleep(backoff_s * 2 ** (attempt - 1))


def ensure_repo(api: Any, hub_cfg: Any) -> None:
    api.create_repo(hub_cfg.repo_id, private=hub_cfg.private, exist_ok=True)
    if hub_cfg.revision:
        api.create_branch(hub_cfg.repo_id, branch=hub_cfg.revision, exist_ok=True)


def make_api(token: str, endpoint: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token, library_name="finetune")


def push_run(run_dir: Path, hub_cfg: Any, *, token: str | None = None,
             verify: Callable[[Path], None] | None = None, endpoint: str | None = None,
             backoff_s: float = 2.0) -> str:
    """Check and push a finished run dir in one commit; returns the commit URL (ends with the oid)."""
    from huggingface_hub import CommitOperationAdd

    from finetune.outputs.model_card import build_model_card

    check_hub_config(hub_cfg)
    if not hub_cfg.repo_id:
        raise ConfigError("hub.repo_id must be set to push a run (e.g. hub.repo_id=your-name/my-model)")
    run_dir, token = Path(run_dir), resolve_token(token)
    final_dir = run_dir / "final"
    if not final_dir.is_dir():
        raise HubPushError(f"refusing to push: {final_dir} does not exist (did training finish?)")
    check_no_empty_tensors(final_dir)
    check_chat_template_eos(final_dir)
    if verify is not None:
        verify(final_dir)
    files = run_files(run_dir)
    files["README.md"] = build_model_card(run_dir, hub_cfg.repo_id).content.encode()
    check_token_absent(files, token)
    api = make_api(token, endpoint)
    message = hub_cfg.commit_message or f"finetune: upload run {run_dir.name}"

    def commit() -> str:
        ensure_repo(api, hub_cfg)
        # Fresh operations per attempt: the client marks them as used once a commit goes through.
        ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(src) if isinstance(src, Path) else src)
               for name, src in files.items()]
        return api.create_commit(hub_cfg.repo_id, ops, commit_message=message, revision=hub_cfg.revision).commit_url

    url = with_retries(commit, f"push of {run_dir} to {hub_cfg.repo_id}", hub_cfg.max_retries + 1, backoff_s, token)
    log.info("hub: pushed %s to %s", run_dir, url)
    return url


@dataclass
class UploadResult:
    what: str
    ok: bool
    commit_url: str | None = None
    error: str | None = None  # one line, token redacted


class HubUploader:
    """Uploads in a background thread so training never waits on the network.

    ``submit(folder, message)`` snapshots the folder (hard links, so a checkpoint rotated away
    meanwhile still uploads) and queues it; ``submit_run()`` queues :func:`push_run`.
    ``close(wait=True)`` drains the queue and returns one :class:`UploadResult` per job. On ranks
    other than 0, and when hub.push is false, every call is a no-op.
    """

    def __init__(self, hub_cfg: Any, run_dir: Path, *, token: str | None = None,
                 endpoint: str | None = None, backoff_s: float = 2.0):
        self.hub_cfg, self.run_dir, self.endpoint, self.backoff_s = hub_cfg, Path(run_dir), endpoint, backoff_s
        self.enabled = bool(hub_cfg.push) and is_main_process()
        self.results: list[UploadResult] = []
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._repo_ready = False
        if self.enabled:  # fail at startup, not hours later at the first upload
            check_hub_config(hub_cfg)
            self._token = resolve_token(token)
            self._staging = Path(tempfile.mkdtemp(prefix="finetune-hub-"))

    def wants(self, event: str) -> bool:
        """Whether hub.strategy uploads on this event: "checkpoint", "best" or "end"."""
        wanted = {"end": {"end"}, "every_checkpoint": {"checkpoint", "end"}, "best": {"best", "end"}}
        return self.enabled and event in wanted[self.hub_cfg.strategy]

    def submit(self, folder: Path, message: str, path_in_repo: str = "") -> None:
        if not self.enabled:
            return
        snapshot = self._staging / f"{len(self.results)}-{self._jobs.qsize()}-{time.monotonic_ns()}"
        shutil.copytree(folder, snapshot, copy_function=_link_or_copy)
        self._put((f"upload of {folder}", lambda: self._upload_folder(snapshot, folder.name, message, path_in_repo)))

    def submit_run(self, verify: Callable[[Path], None] | None = None) -> None:
        if not self.enabled:
            return
        self._put((f"push of {self.run_dir}", lambda: push_run(
            self.run_dir, self.hub_cfg, token=self._token, verify=verify,
            endpoint=self.endpoint, backoff_s=self.backoff_s)))
        if self.hub_cfg.space:
            self._put((f"Space for {self.hub_cfg.repo_id}", self._push_space))

    def _push_space(self) -> str:
        """hub.space=true: the chat Space (finetune/chat/space.py), once the model it serves is pushed."""
        from finetune.chat.space import push_space

        if not self.results or not self.results[-1].ok:
            raise HubPushError(f"Space not pushed: the push of the model {self.hub_cfg.repo_id} before it failed")
        return push_space(self.run_dir, self.hub_cfg, token=self._token, endpoint=self.endpoint,
                          backoff_s=self.backoff_s)

    def close(self, wait: bool = True) -> list[UploadResult]:
        """Stop the worker; with wait=False, jobs still queued are dropped."""
        if self._thread is not None:
            if not wait:
                _drain(self._jobs)
            self._jobs.put(None)
            if wait:
                self._thread.join()
            self._thread = None
        if self.enabled and wait:
            shutil.rmtree(self._staging, ignore_errors=True)
        return list(self.results)

    def _put(self, job: tuple[str, Callable[[], str]]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="finetune-hub-upload", daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            what, action = job
            try:
                self.results.append(UploadResult(what, True, commit_url=action()))
            except Exception as error:  # noqa: BLE001 - never raise into training; report instead
                line = str(error) if isinstance(error, HubPushError) else one_line(error, self._token)
                line = redact(line, self._token)
                self.results.append(UploadResult(what, False, error=line))
                log.warning("hub: %s", line)

    def _upload_folder(self, folder: Path, name: str, message: str, path_in_repo: str) -> str:
        api = make_api(self._token, self.endpoint)

        def upload() -> str:
            if not self._repo_ready:
                ensure_repo(api, self.hub_cfg)
                self._repo_ready = True
            # A checkpoint's README.md is peft's stub, whose base_model may be a local path the Hub
            # rejects; the repo's card is the one push_run writes.
            info = api.upload_folder(repo_id=self.hub_cfg.repo_id, folder_path=folder, path_in_repo=path_in_repo or None,
                                     commit_message=self.hub_cfg.commit_message or message,
                                     revision=self.hub_cfg.revision, ignore_patterns=["README.md"])
            return info.commit_url

        try:
            return with_retries(upload, f"upload of {name} to {self.hub_cfg.repo_id}",
                                self.hub_cfg.max_retries + 1, self.backoff_s, self._token)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed: copy instead
        shutil.copy2(src, dst)


def _drain(jobs: queue.Queue) -> None:
    while True:
        try:
            jobs.get_nowait()
        except queue.Empty:
            return

"""The on-disk preprocessing cache: its key, and publishing/loading one entry atomically.

The key hashes everything that changes the tokenised output: the ``data.*`` config (but packing,
which happens at load time), each source's fingerprint (file paths + sizes + mtimes, or Hub id +
config + split + revision), the tokenizer (vocabulary, merges, normaliser: its full JSON), the chat
template (after ``model.chat_template``; ``data.chat_date``, part of ``data.*``, pins its date), EOS,
the seed (eval hold-out), the task and the pipeline version. An entry is written to
a temporary directory ``.<key>.tmp-<host>-<pid>``, flushed to disk and published by one rename;
other processes poll for it (no collective). A builder killed mid-write (SIGTERM, kill -9, OOM)
leaves only its temp dir, which no reader looks at and the next builder removes (its pid is gone
on this host, or it is a day old). A published entry that was damaged later is one DataError.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from finetune.data import sources
from finetune.data.tokenize import Encoded
from finetune.errors import ConfigError, DataError

PIPELINE_VERSION = "4"  # bump when tokenisation/packing output changes (4: one-render chat masks)


def cache_key(cfg: DictConfig, tokenizer) -> str:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    for k in ("cache_dir", "packing"):  # packing happens at load time
        data.pop(k, None)
    srcs = data["sources"] or [{"path": data["path"], "name": data["name"], "split": data["split"],
                                "revision": data["revision"]}]
    prints = [sources.fingerprint(s["path"], name=s.get("name"), split=s.get("split", "train"),
                                  revision=s.get("revision")) for s in srcs]
    if data["eval_split"]:
        files = sources.eval_files(data["path"], data["eval_split"])
        prints += [sources.fingerprint(str(f)) for f in files or []] or [data["eval_split"]]
    tok = hashlib.sha256((tokenizer.backend_tokenizer.to_str() + str(tokenizer.chat_template)
                          + str(tokenizer.eos_token)).encode()).hexdigest()
    payload = {"data": data, "sources": prints, "tokenizer": tok, "seed": cfg.seed,
               "task": cfg.model.task, "version": PIPELINE_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_root(cfg: DictConfig) -> Path:
    """``data.cache_dir`` (or $FINETUNE_CACHE, ~/.cache/finetune) + ``/data``, created: one that
    cannot be is a ConfigError now, not after the tokenisation (streaming writes nothing there)."""
    root = cfg.data.cache_dir or os.environ.get("FINETUNE_CACHE") or "~/.cache/finetune"
    path = Path(root).expanduser() / "data"
    if not cfg.data.get("streaming", False):
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"data.cache_dir={root}: cannot create {exc.filename or path} "
                              f"({exc.strerror or type(exc).__name__}); set data.cache_dir (or "
                              "FINETUNE_CACHE) to a writable directory") from None
    return path


TEMP = re.compile(r"^\.(?P<key>[^.]+)\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)$")
STALE_AFTER_S = 24 * 3600


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def clean_stale_temps(root: Path) -> list[Path]:
    """Remove the temp dirs of builders that died mid-write: this host's with a pid that no
    longer runs, and any host's older than a day. Returns what was removed."""
    removed = []
    host, now = socket.gethostname(), time.time()
    for tmp in root.glob(".*.tmp-*") if root.is_dir() else []:
        m = TEMP.match(tmp.name)
        if not m or not tmp.is_dir():
            continue
        try:
            old = now - tmp.stat().st_mtime > STALE_AFTER_S
        except FileNotFoundError:
            continue
        mine = m.group("host") in (host, None)
        if old or (mine and int(m.group("pid")) != os.getpid() and not _pid_runs(int(m.group("pid")))):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_entry(path: Path, arrays: dict, meta: dict) -> None:
    clean_stale_temps(path.parent)
    tmp = temp_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, enc in arrays.items():
        if enc is None:
            continue
        extra = {} if enc.class_labels is None else {"class_labels": enc.class_labels}
        np.savez(tmp / f"{split}.npz", ids=enc.ids, labels=enc.labels, offsets=enc.offsets, **extra)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    for f in tmp.iterdir():  # on disk before the rename makes the entry visible
        _fsync(f)
    try:
        os.rename(tmp, path)  # atomic publish; another builder may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    _fsync(path.parent)


def load_entry(path: Path) -> tuple[dict, dict]:
    try:
        arrays = {}
        for split in ("train", "eval"):
            f = path / f"{split}.npz"
            if f.exists():
                with np.load(f) as z:
                    arrays[split] = Encoded(z["ids"], z["labels"], z["offsets"],
                                            z["class_labels"] if "class_labels" in z else None)
            else:
                arrays[split] = None
        return arrays, json.loads((path / "meta.json").read_text())
    except Exception as exc:  # noqa: BLE001 - zip, numpy and json each raise their own
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise DataError(f"data cache entry {path} is damaged ({type(exc).__name__}: {first}); "
                        f"delete it (rm -r {path}) and run again to rebuild it") from None


def wait_for_entry(path: Path, failed: Path, poll_s: float = 1.0) -> None:
    """Non-builders poll the file system (no collective, so no timeout to hit)."""
    while not (path / "meta.json").exists():
        if failed.exists():
            raise DataError(f"data preprocessing failed on the building process: {failed.read_text()}")
        time.sleep(poll_s)

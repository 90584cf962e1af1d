"""The on-disk preprocessing cache: its key, and publishing/loading one entry atomically.

The key hashes everything that changes the tokenised output: the ``data.*`` config (but packing,
which happens at load time), each source's fingerprint (file paths + sizes + mtimes, or Hub id +
config + split + revision), the tokenizer (vocabulary, merges, normaliser: its full JSON), the chat
template (after ``model.chat_template``; ``data.chat_date``, part of ``data.*``, pins its date), EOS,
the seed (eval hold-out), the task and the pipeline version. An entry is written to
a temporary directory and published by one rename; other processes poll for it (no collective).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from finetune.data import sources
from finetune.data.tokenize import Encoded
from finetune.errors import DataError

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
    root = cfg.data.cache_dir or os.environ.get("FINETUNE_CACHE") or "~/.cache/finetune"
    return Path(root).expanduser() / "data"


def save_entry(path: Path, arrays: dict, meta: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, enc in arrays.items():
        if enc is None:
            continue
        extra = {} if enc.class_labels is None else {"class_labels": enc.class_labels}
        np.savez(tmp / f"{split}.npz", ids=enc.ids, labels=enc.labels, offsets=enc.offsets, **extra)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.rename(tmp, path)  # atomic publish; another builder may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def load_entry(path: Path) -> tuple[dict, dict]:
    arrays = {}
    for split in ("train", "eval"):
        f = path / f"{split}.npz"
        if f.exists():
            z = np.load(f)
            arrays[split] = Encoded(z["ids"], z["labels"], z["offsets"],
                                    z["class_labels"] if "class_labels" in z else None)
        else:
            arrays[split] = None
    return arrays, json.loads((path / "meta.json").read_text())


def wait_for_entry(path: Path, failed: Path, poll_s: float = 1.0) -> None:
    """Non-builders poll the file system (no collective, so no timeout to hit)."""
    while not (path / "meta.json").exists():
        if failed.exists():
            raise DataError(f"data preprocessing failed on the building process: {failed.read_text()}")
        time.sleep(poll_s)

"""The data pipeline: source -> format -> tokenise (+ loss mask, EOS) -> pack or pad -> cache.

``prepare_data`` is the one entry point. Its result is cached on disk under a key that hashes
everything that changes it (source files + mtimes or Hub revision, format, columns, tokenizer and
template, lengths, packing, seed of the eval hold-out), so a second run skips tokenisation. In a
multi-process run one process per node builds the cache and the others poll the file system for
it: no collective is involved, so a long tokenisation cannot hit a NCCL/gloo timeout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from finetune.data import formats, sources
from finetune.data.packing import Collator, TokenRows, pack_examples
from finetune.data.tokenize import (Encoded, Stats, chat_segments, encode_documents,
                                    encode_labelled, encode_segmented)
from finetune.errors import DataError

log = logging.getLogger(__name__)
PIPELINE_VERSION = "1"  # bump when tokenisation/packing output changes


@dataclass
class PreparedData:
    train: TokenRows
    eval: TokenRows | None
    stats: dict
    label_names: list[str] | None
    cache_dir: Path
    cache_hit: bool
    seconds: float

    def collator(self, pad_id: int, packed: bool, pad_to: int | None = None) -> Collator:
        return Collator(pad_id, packed, pad_to)


def _records(cfg: DictConfig, split: str | None = None):
    data = cfg.data
    srcs = list(data.sources) or [OmegaConf.create({"path": data.path, "name": data.name,
                                                    "split": data.split, "revision": data.revision,
                                                    "weight": 1.0})]
    for src in srcs:
        records = list(sources.read_source(src.path, name=src.name, split=split or src.split,
                                           revision=src.revision, text_column=data.columns.text,
                                           streaming=data.streaming))
        yield from _weighted(records, float(src.weight), cfg.seed)


def _weighted(records: list, weight: float, seed: int):
    """A mixture source contributes ``weight * len(source)`` records (repeats when > 1)."""
    if weight == 1.0:
        return records
    whole, frac = int(weight), weight - int(weight)
    rng = np.random.default_rng(seed)
    extra = rng.choice(len(records), size=int(round(frac * len(records))), replace=False)
    return records * whole + [records[i] for i in sorted(extra)]


def _format_all(cfg: DictConfig, records, stats: Stats) -> list:
    """Format every record; a bad one ends the run (default) or is skipped and counted."""
    fmt, data = cfg.data.format, cfg.data
    out = []
    for rec in records:
        stats.read += 1
        try:
            if "__error__" in rec.row:
                raise formats.BadExample(rec.row["__error__"])
            if fmt in ("alpaca", "messages", "sharegpt"):
                out.append(formats.to_chat(rec.row, fmt, data))
            elif fmt == "prompt_completion":
                out.append(formats.to_completion(rec.row, data))
            elif fmt == "text":
                out.append(formats.to_text(rec.row, data))
            else:
                out.append(formats.to_labelled(rec.row, data))
        except formats.BadExample as exc:
            if data.on_bad_example == "error":
                raise DataError(f"{rec.origin}: {exc} (data.format={fmt}); fix the row or set "
                                "data.on_bad_example=skip to skip and count bad rows") from None
            stats.skipped_bad += 1
            if len(stats.bad_examples) < 5:
                stats.bad_examples.append(f"{rec.origin}: {exc}")
    return out


def _encode(cfg: DictConfig, tokenizer, items: list, stats: Stats, label_names=None):
    data, fmt = cfg.data, cfg.data.format
    if fmt in ("alpaca", "messages", "sharegpt"):
        if not tokenizer.chat_template:
            raise DataError(f"data.format={fmt} needs a chat template but the tokenizer of "
                            f"{cfg.model.name_or_path!r} has none; set model.chat_template")
        segmented = [chat_segments(tokenizer, m, data.train_on_prompt) for m in items]
        ids, labels = encode_segmented(tokenizer, segmented, data.max_seq_len, data.overlong, stats)
        return Encoded.from_lists(ids, labels), None
    if fmt == "prompt_completion":
        segmented = [[(p, data.train_on_prompt), (c, True)] if p else [(c, True)] for p, c in items]
        ids, labels = encode_segmented(tokenizer, segmented, data.max_seq_len, data.overlong, stats)
        return Encoded.from_lists(ids, labels), None
    if fmt == "text":
        ids, labels = encode_documents(tokenizer, items, data.max_seq_len, stats)
        return Encoded.from_lists(ids, labels), None
    texts = [t for t, _ in items]
    names = label_names or list(data.labels) or sorted({lab for _, lab in items})
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({lab for _, lab in items if lab not in index})
    if unknown:
        raise DataError(f"labels {unknown[:5]} are not among data.labels={names}; "
                        "add them to data.labels or fix the data")
    ids, kept = encode_labelled(tokenizer, texts, data.max_seq_len, data.overlong, stats)
    class_labels = [index[items[i][1]] for i in kept]
    return Encoded.from_lists(ids, [[-100] * len(x) for x in ids], class_labels), names


def _subset(enc: Encoded, idx: np.ndarray) -> Encoded:
    ids = [enc.example(int(i))[0].tolist() for i in idx]
    labels = [enc.example(int(i))[1].tolist() for i in idx]
    cl = None if enc.class_labels is None else enc.class_labels[idx]
    return Encoded.from_lists(ids, labels, cl)


def _holdout(cfg: DictConfig, enc: Encoded) -> tuple[Encoded, Encoded | None]:
    size = cfg.data.eval_size
    n_eval = int(round(size * len(enc))) if size < 1 else int(size)
    if n_eval == 0:
        return enc, None
    if n_eval >= len(enc):
        raise DataError(f"data.eval_size={size} holds out {n_eval} of {len(enc)} examples, "
                        "leaving none to train on; lower data.eval_size")
    perm = np.random.default_rng(cfg.seed).permutation(len(enc))
    return _subset(enc, np.sort(perm[n_eval:])), _subset(enc, np.sort(perm[:n_eval]))


def cache_key(cfg: DictConfig, tokenizer) -> str:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    for k in ("cache_dir", "num_proc", "packing"):  # packing happens at load time
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


def _build(cfg: DictConfig, tokenizer) -> tuple[dict, dict]:
    stats = Stats()
    train_items = _format_all(cfg, _records(cfg), stats)
    train, names = _encode(cfg, tokenizer, train_items, stats)
    eval_enc = None
    if cfg.data.eval_split:
        files = sources.eval_files(cfg.data.path, cfg.data.eval_split)
        eval_stats = Stats()
        records = (sources.read_local(files, cfg.data.columns.text) if files
                   else _records(cfg, split=cfg.data.eval_split))
        eval_items = _format_all(cfg, records, eval_stats)
        eval_enc, _ = _encode(cfg, tokenizer, eval_items, eval_stats, names)
        stats_eval = eval_stats.as_dict()
    else:
        train, eval_enc = _holdout(cfg, train)
        stats_eval = {"kept": 0 if eval_enc is None else len(eval_enc), "held_out_from_train": True}
    if len(train) == 0:
        raise DataError(f"data.path={cfg.data.path!r}: no training examples left after formatting "
                        f"and length filtering ({stats.as_dict()}); check the data and data.max_seq_len")
    arrays = {"train": train, "eval": eval_enc}
    meta = {"stats": {"train": stats.as_dict(), "eval": stats_eval}, "label_names": names}
    return arrays, meta


def _save(path: Path, arrays: dict, meta: dict) -> None:
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


def _load(path: Path) -> tuple[dict, dict]:
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


def _wait_for(path: Path, failed: Path, poll_s: float = 1.0) -> None:
    """Non-builders poll the file system (no collective, so no timeout to hit)."""
    while not (path / "meta.json").exists():
        if failed.exists():
            raise DataError(f"data preprocessing failed on the building process: {failed.read_text()}")
        time.sleep(poll_s)


def _rows(enc: Encoded | None, cfg: DictConfig) -> tuple[TokenRows | None, dict]:
    if enc is None:
        return None, {}
    if not cfg.data.packing:
        return TokenRows(enc), {}
    bins = pack_examples(enc.lengths(), cfg.data.max_seq_len)
    real = int(enc.lengths().sum())
    return TokenRows(enc, bins), {"rows": len(bins), "packing_efficiency": real / (len(bins) * cfg.data.max_seq_len)}


def prepare_data(cfg: DictConfig, tokenizer, *, build: bool = True) -> PreparedData:
    """Load (or build and cache) the run's datasets. ``build=False``: wait for another process."""
    t0 = time.perf_counter()
    key = cache_key(cfg, tokenizer)
    path = cache_root(cfg) / key
    failed = path.with_name(f"{key}.failed")
    hit = (path / "meta.json").exists()
    if not hit:
        if build:
            failed.unlink(missing_ok=True)
            try:
                arrays, meta = _build(cfg, tokenizer)
            except Exception as exc:
                failed.parent.mkdir(parents=True, exist_ok=True)
                failed.write_text(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                raise
            meta["build_seconds"] = time.perf_counter() - t0
            _save(path, arrays, meta)
        else:
            _wait_for(path, failed)
    arrays, meta = _load(path)
    train, pack_train = _rows(arrays["train"], cfg)
    evals, pack_eval = _rows(arrays["eval"], cfg)
    stats = dict(meta["stats"])
    if pack_train:
        stats["packing"] = {"train": pack_train, "eval": pack_eval}
    seconds = time.perf_counter() - t0
    if hit:
        stats["cache"] = {"hit": True, "seconds": seconds, "saved_seconds": meta.get("build_seconds", 0.0) - seconds}
    else:
        stats["cache"] = {"hit": False, "seconds": seconds}
    return PreparedData(train, evals, stats, meta.get("label_names"), path, hit, seconds)

"""The data pipeline: source -> format -> tokenise (+ loss mask, EOS) -> pack or pad -> cache.

``prepare_data`` is the one entry point. Its result is cached on disk (cache.py) under a key that
hashes everything that changes it (source files + mtimes or Hub revision, format, columns,
tokenizer and template, lengths, seed of the eval hold-out), so a second run skips tokenisation. In a
multi-process run one process per node builds the cache and the others poll the file system for
it: no collective is involved, so a long tokenisation cannot hit a NCCL/gloo timeout.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from finetune.data import sources
from finetune.data.cache import cache_key, cache_root, load_entry, save_entry, wait_for_entry
from finetune.data.packing import TokenRows, pack_examples
from finetune.data.records import format_records, read_records, source_format, source_list
from finetune.data.stream_sources import Mixture
from finetune.data.streaming import StreamingRows, encode_chunk
from finetune.data.tokenize import Encoded, Stats
from finetune.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: TokenRows
    eval: TokenRows | None
    stats: dict
    label_names: list[str] | None
    cache_dir: Path
    cache_hit: bool


def _subset(enc: Encoded, idx: np.ndarray) -> Encoded:
    ids = [enc.example(int(i))[0].tolist() for i in idx]
    labels = [enc.example(int(i))[1].tolist() for i in idx]
    cl = None if enc.class_labels is None else enc.class_labels[idx]
    return Encoded.from_lists(ids, labels, cl)


def _counts(enc: Encoded, task) -> dict:
    return {"kept": len(enc), "tokens": len(enc.ids), "target_tokens": task.target_count(enc)}


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


def build_eval_split(cfg: DictConfig, tokenizer, task, label_names) -> tuple[Encoded, dict]:
    """The named eval split (``data.eval_split``: a split name or a local file/glob), encoded."""
    files = sources.eval_files(cfg.data.path, cfg.data.eval_split)
    eval_stats = Stats()
    pairs = (((r, cfg.data.format) for r in sources.read_local(files, cfg.data.columns.text))
             if files else read_records(cfg, split=cfg.data.eval_split))
    eval_items = format_records(cfg, pairs, eval_stats)
    eval_enc, _ = task.encode(tokenizer, eval_items, eval_stats, label_names)
    return eval_enc, eval_stats.as_dict()


def _build(cfg: DictConfig, tokenizer, task) -> tuple[dict, dict]:
    stats = Stats()
    train_items = format_records(cfg, read_records(cfg), stats)
    train, names = task.encode(tokenizer, train_items, stats, None)
    if cfg.data.eval_split:
        eval_enc, stats_eval = build_eval_split(cfg, tokenizer, task, names)
    else:
        train, eval_enc = _holdout(cfg, train)
        stats_eval = {"kept": 0, "held_out_from_train": True}
        if eval_enc is not None:  # the counts so far cover train + held-out eval: split them
            stats_eval.update(_counts(eval_enc, task))
            stats.kept, stats.tokens, stats.target_tokens = _counts(train, task).values()
    if len(train) == 0:
        raise DataError(f"data.path={cfg.data.path!r}: no training examples left after formatting "
                        f"and length filtering ({stats.as_dict()}); check the data and data.max_seq_len")
    arrays = {"train": train, "eval": eval_enc}
    meta = {"stats": {"train": stats.as_dict(), "eval": stats_eval}, "label_names": names}
    return arrays, meta


def _rows(enc: Encoded | None, cfg: DictConfig, task) -> tuple[TokenRows | None, dict]:
    if enc is None:
        return None, {}
    # A task that packs each collated batch itself (DPO: a pair's sequences) keeps one row per example.
    if not cfg.data.packing or task.packs_per_batch:
        return TokenRows(enc), {}
    bins = pack_examples(enc.lengths(), cfg.data.max_seq_len)
    real = int(enc.lengths().sum())
    return TokenRows(enc, bins), {"rows": len(bins), "packing_efficiency": real / (len(bins) * cfg.data.max_seq_len)}


def _prepare_streaming(cfg: DictConfig, tokenizer, task, key: str, t0: float) -> PreparedData:
    """``data.streaming=true``: a :class:`StreamingRows` for train, eval materialised (see streaming.py)."""
    data = cfg.data
    srcs = source_list(data)
    fmts = [source_format(data, s) for s in srcs]
    names = list(data.labels) or None
    if data.format == "classification" and not names:
        raise DataError("data.streaming=true with data.format=classification needs data.labels="
                        "[...] (the label set cannot be inferred from a stream)")
    eval_enc, stats_eval, start = None, {}, None
    if data.eval_split:
        eval_enc, stats_eval = build_eval_split(cfg, tokenizer, task, names)
    elif data.eval_size:
        if data.eval_size < 1:
            raise DataError(f"data.eval_size={data.eval_size} is a fraction, but a stream's size is "
                            "unknown: set data.eval_size=<count> (records held out from the start "
                            "of the stream), data.eval_split=<split>, or data.eval_size=0")
        mixture = Mixture(srcs, fmts, data.columns.text, [cfg.seed, 0])
        pairs = list(itertools.islice(iter(mixture), int(data.eval_size)))
        held = Stats()
        examples = encode_chunk(cfg, tokenizer, task, pairs, held, names)
        if examples:
            eval_enc = Encoded.from_lists([e[0] for e in examples], [e[1] for e in examples],
                                          None if names is None else [e[2] for e in examples])
        stats_eval = {**held.as_dict(), "held_out_from_train": True}
        start = mixture.position
    train = StreamingRows(cfg, tokenizer, task, srcs, fmts, start, names)
    evals, pack_eval = _rows(eval_enc, cfg, task)
    stats = {"train": train.report(), "eval": stats_eval,
             "cache": {"hit": False, "seconds": time.perf_counter() - t0, "streaming": True}}
    if pack_eval:
        stats["eval"]["packing"] = pack_eval
    return PreparedData(train, evals, stats, names, cache_root(cfg) / f"stream-{key}", False)


def prepare_data(cfg: DictConfig, tokenizer, task=None, *, build: bool = True) -> PreparedData:
    """Load (or build and cache) the run's datasets for ``task`` (how records become rows; default
    the config's ``model.task``). ``build=False``: wait for another process to build them.

    With ``data.streaming=true`` nothing is cached: every process streams (see streaming.py).
    """
    if task is None:
        from finetune.tasks import get_task

        task = get_task(cfg)
    t0 = time.perf_counter()
    key = cache_key(cfg, tokenizer)
    if cfg.data.streaming:
        return _prepare_streaming(cfg, tokenizer, task, key, t0)
    path = cache_root(cfg) / key
    failed = path.with_name(f"{key}.failed")
    hit = (path / "meta.json").exists()
    if not hit:
        if build:
            failed.unlink(missing_ok=True)
            try:
                arrays, meta = _build(cfg, tokenizer, task)
            except Exception as exc:
                failed.parent.mkdir(parents=True, exist_ok=True)
                failed.write_text(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                raise
            meta["build_seconds"] = time.perf_counter() - t0
            save_entry(path, arrays, meta)
        else:
            wait_for_entry(path, failed)
    arrays, meta = load_entry(path)
    train, pack_train = _rows(arrays["train"], cfg, task)
    evals, pack_eval = _rows(arrays["eval"], cfg, task)
    stats = dict(meta["stats"])
    if pack_train:
        stats["packing"] = {"train": pack_train, "eval": pack_eval}
    seconds = time.perf_counter() - t0
    if hit:
        saved = meta.get("build_seconds", 0.0) - seconds
        stats["cache"] = {"hit": True, "seconds": seconds, "saved_seconds": saved}
        log.info("data cache hit %s: loaded in %.2fs, %.1fs of preprocessing saved", path, seconds, saved)
    else:
        stats["cache"] = {"hit": False, "seconds": seconds}
    return PreparedData(train, evals, stats, meta.get("label_names"), path, hit)

"""The data pipeline: source -> format -> tokenise (+ loss mask, EOS) -> pack or pad -> cache.

``prepare_data`` is the one entry point. Its result is cached on disk (cache.py) under a key that
hashes everything that changes it (source files + mtimes or Hub revision, format, columns,
tokenizer and template, lengths, seed of the eval hold-out), so a second run skips tokenisation. In a
multi-process run one process per node builds the cache and the others poll the file system for
it: no collective is involved, so a long tokenisation cannot hit a NCCL/gloo timeout.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from finetune.data import formats, sources
from finetune.data.chat_template import ChatSettings, encode_chats
from finetune.data.cache import cache_key, cache_root, load_entry, save_entry, wait_for_entry
from finetune.data.packing import Collator, TokenRows, pack_examples
from finetune.data.tokenize import (IGNORE, Encoded, Stats, encode_documents, encode_labelled,
                                    encode_segmented)
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
    seconds: float

    def collator(self, pad_id: int, packed: bool, pad_to: int | None = None) -> Collator:
        return Collator(pad_id, packed, pad_to)


CHAT_FORMATS = ("alpaca", "messages", "sharegpt")


def source_list(data: DictConfig) -> list:
    """``data.sources`` when set, else the single source ``data.path`` (weight 1)."""
    if data.sources:
        return list(data.sources)
    return [OmegaConf.create({"path": data.path, "name": data.name, "split": data.split,
                              "revision": data.revision, "weight": 1.0, "format": None})]


def source_format(data: DictConfig, src) -> str:
    """A mixture source may use another chat format (alpaca + sharegpt, ...); nothing else mixes."""
    fmt = src.get("format") or data.format
    if fmt != data.format and not (fmt in CHAT_FORMATS and data.format in CHAT_FORMATS):
        raise DataError(f"data.sources: {src.path!r} has format={fmt} but data.format={data.format}; "
                        f"only the chat formats ({', '.join(CHAT_FORMATS)}) can be mixed")
    return fmt


def _records(cfg: DictConfig, split: str | None = None):
    """(record, format) pairs of every source, mixture weights applied (see :func:`_weighted`)."""
    data = cfg.data
    for index, src in enumerate(source_list(data)):
        fmt = source_format(data, src)
        records = list(sources.read_source(src.path, name=src.name, split=split or src.split,
                                           revision=src.revision, text_column=data.columns.text))
        for rec in _weighted(records, float(src.weight), [cfg.seed, index]):
            yield rec, fmt


def _weighted(records: list, weight: float, seed: list[int]):
    """Mixture semantics (map-style data): a source contributes ``round(weight * len(source))``
    records: each record ``int(weight)`` times, plus a seeded sample without replacement of the
    fractional part (weight 0.5 = a random half, 2.5 = everything twice plus a random half),
    seeded with ``[seed, source index]``.
    The trainer shuffles rows, so the order of sources does not matter."""
    if weight == 1.0:
        return records
    if weight < 0:
        raise DataError(f"data.sources weight={weight} must be >= 0")
    whole, frac = int(weight), weight - int(weight)
    rng = np.random.default_rng(seed)
    extra = rng.choice(len(records), size=int(round(frac * len(records))), replace=False)
    return records * whole + [records[i] for i in sorted(extra)]


class FormattedItems(list):
    """Formatted examples, with ``origins[i]`` (file:line) of item i for errors found later
    (a chat the template cannot render is a bad row like a malformed one)."""

    def __init__(self):
        super().__init__()
        self.origins: list[str] = []


def bad_row(data, stats: Stats, origin: str, problem: str, fmt: str) -> None:
    """``data.on_bad_example``: end the run naming the row (error), or count and skip it."""
    if data.on_bad_example == "error":
        raise DataError(f"{origin}: {problem} (data.format={fmt}); fix the row or set "
                        "data.on_bad_example=skip to skip and count bad rows") from None
    stats.skipped_bad += 1
    if len(stats.bad_examples) < 5:
        stats.bad_examples.append(f"{origin}: {problem}")


def format_records(cfg: DictConfig, pairs, stats: Stats) -> FormattedItems:
    """Format every (record, format) pair; a bad one ends the run (default) or is skipped and counted."""
    data = cfg.data
    specs: dict[str, formats.FormatSpec] = {}
    out = FormattedItems()
    for rec, fmt in pairs:
        spec = specs.get(fmt) or specs.setdefault(fmt, formats.FormatSpec.from_config(data, fmt))
        stats.read += 1
        try:
            if isinstance(rec.row, dict) and "__error__" in rec.row:
                raise formats.BadExample(rec.row["__error__"])
            out.append(formats.format_record(rec.row, spec))
            out.origins.append(rec.origin)
        except formats.BadExample as exc:
            bad_row(data, stats, rec.origin, str(exc), fmt)
    return out


def _format_all(cfg: DictConfig, records, stats: Stats) -> list:
    """Format plain records (all in ``data.format``)."""
    fmt = cfg.data.format
    return format_records(cfg, ((rec, fmt) for rec in records), stats)


def _encode(cfg: DictConfig, tokenizer, items: list, stats: Stats, label_names=None):
    data, fmt = cfg.data, cfg.data.format
    if fmt in CHAT_FORMATS:  # one render per conversation, mask from its spans (chat_template.py)
        if not tokenizer.chat_template:
            raise DataError(f"data.format={fmt} needs a chat template but the tokenizer of "
                            f"{cfg.model.name_or_path!r} has none; set model.chat_template")
        origins = getattr(items, "origins", None) or [f"example {i}" for i in range(len(items))]
        on_bad = lambda i, problem: bad_row(data, stats, origins[i], problem, fmt)  # noqa: E731
        ids, labels = encode_chats(tokenizer, items, ChatSettings.from_config(cfg), stats, on_bad)
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


def _counts(enc: Encoded, cfg: DictConfig) -> dict:
    targets = len(enc) if cfg.data.format == "classification" else int((enc.labels != IGNORE).sum())
    return {"kept": len(enc), "tokens": len(enc.ids), "target_tokens": targets}


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


def build_eval_split(cfg: DictConfig, tokenizer, label_names) -> tuple[Encoded, dict]:
    """The named eval split (``data.eval_split``: a split name or a local file/glob), encoded."""
    files = sources.eval_files(cfg.data.path, cfg.data.eval_split)
    eval_stats = Stats()
    pairs = (((r, cfg.data.format) for r in sources.read_local(files, cfg.data.columns.text))
             if files else _records(cfg, split=cfg.data.eval_split))
    eval_items = format_records(cfg, pairs, eval_stats)
    eval_enc, _ = _encode(cfg, tokenizer, eval_items, eval_stats, label_names)
    return eval_enc, eval_stats.as_dict()


def _build(cfg: DictConfig, tokenizer) -> tuple[dict, dict]:
    stats = Stats()
    train_items = format_records(cfg, _records(cfg), stats)
    train, names = _encode(cfg, tokenizer, train_items, stats)
    if cfg.data.eval_split:
        eval_enc, stats_eval = build_eval_split(cfg, tokenizer, names)
    else:
        train, eval_enc = _holdout(cfg, train)
        stats_eval = {"kept": 0, "held_out_from_train": True}
        if eval_enc is not None:  # the counts so far cover train + held-out eval: split them
            stats_eval.update(_counts(eval_enc, cfg))
            stats.kept, stats.tokens, stats.target_tokens = _counts(train, cfg).values()
    if len(train) == 0:
        raise DataError(f"data.path={cfg.data.path!r}: no training examples left after formatting "
                        f"and length filtering ({stats.as_dict()}); check the data and data.max_seq_len")
    arrays = {"train": train, "eval": eval_enc}
    meta = {"stats": {"train": stats.as_dict(), "eval": stats_eval}, "label_names": names}
    return arrays, meta


def _rows(enc: Encoded | None, cfg: DictConfig) -> tuple[TokenRows | None, dict]:
    if enc is None:
        return None, {}
    if not cfg.data.packing:
        return TokenRows(enc), {}
    bins = pack_examples(enc.lengths(), cfg.data.max_seq_len)
    real = int(enc.lengths().sum())
    return TokenRows(enc, bins), {"rows": len(bins), "packing_efficiency": real / (len(bins) * cfg.data.max_seq_len)}


def _prepare_streaming(cfg: DictConfig, tokenizer, key: str, t0: float) -> PreparedData:
    """``data.streaming=true``: a :class:`StreamingRows` for train, eval materialised (see streaming.py)."""
    import itertools

    from finetune.data.stream_sources import Mixture
    from finetune.data.streaming import StreamingRows, encode_chunk

    data = cfg.data
    srcs = source_list(data)
    fmts = [source_format(data, s) for s in srcs]
    names = list(data.labels) or None
    if data.format == "classification" and not names:
        raise DataError("data.streaming=true with data.format=classification needs data.labels="
                        "[...] (the label set cannot be inferred from a stream)")
    eval_enc, stats_eval, start = None, {}, None
    if data.eval_split:
        eval_enc, stats_eval = build_eval_split(cfg, tokenizer, names)
    elif data.eval_size:
        if data.eval_size < 1:
            raise DataError(f"data.eval_size={data.eval_size} is a fraction, but a stream's size is "
                            "unknown: set data.eval_size=<count> (records held out from the start "
                            "of the stream), data.eval_split=<split>, or data.eval_size=0")
        mixture = Mixture(srcs, fmts, data.columns.text, [cfg.seed, 0])
        pairs = list(itertools.islice(iter(mixture), int(data.eval_size)))
        held = Stats()
        examples = encode_chunk(cfg, tokenizer, pairs, held, names)
        if examples:
            eval_enc = Encoded.from_lists([e[0] for e in examples], [e[1] for e in examples],
                                          None if names is None else [e[2] for e in examples])
        stats_eval = {**held.as_dict(), "held_out_from_train": True}
        start = mixture.position
    train = StreamingRows(cfg, tokenizer, srcs, fmts, start, names)
    evals, pack_eval = _rows(eval_enc, cfg)
    stats = {"train": train.report(), "eval": stats_eval,
             "cache": {"hit": False, "seconds": time.perf_counter() - t0, "streaming": True}}
    if pack_eval:
        stats["eval"]["packing"] = pack_eval
    return PreparedData(train, evals, stats, names, cache_root(cfg) / f"stream-{key}", False,
                        time.perf_counter() - t0)


def prepare_data(cfg: DictConfig, tokenizer, *, build: bool = True) -> PreparedData:
    """Load (or build and cache) the run's datasets. ``build=False``: wait for another process.

    With ``data.streaming=true`` nothing is cached: every process streams (see streaming.py).
    """
    t0 = time.perf_counter()
    key = cache_key(cfg, tokenizer)
    if cfg.data.streaming:
        return _prepare_streaming(cfg, tokenizer, key, t0)
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
            save_entry(path, arrays, meta)
        else:
            wait_for_entry(path, failed)
    arrays, meta = load_entry(path)
    train, pack_train = _rows(arrays["train"], cfg)
    evals, pack_eval = _rows(arrays["eval"], cfg)
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
    return PreparedData(train, evals, stats, meta.get("label_names"), path, hit, seconds)

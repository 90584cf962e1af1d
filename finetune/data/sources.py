"""Where raw records come from: built-in samples, local files (json/jsonl/csv/parquet/arrow/txt,
dirs, globs) and Hugging Face Hub datasets. Every record carries its origin ("file:line") so a bad
row can be named in the error.

A file that cannot be what its name says is refused up front by :func:`check_file` (called by
:func:`resolve_files`, so before the cache key is computed and on the streaming path too) with one
DataError naming it and the fix: not a regular file, a symlink loop or a broken link, unreadable,
empty, binary or not UTF-8 (UTF-16/32 named by its byte order mark), a Parquet/Arrow file without
its magic number. Damage found later while reading (a corrupt Parquet footer, a bad byte past the
first block) is turned into the same kind of one-line DataError by :func:`read_local`.
"""

from __future__ import annotations

import codecs
import csv
import errno
import glob
import hashlib
import json
import os
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from finetune.errors import DataError

SAMPLE_DIR = Path(__file__).parent / "sample"
BUILTIN = {
    "builtin:sample": ("instructions-train.jsonl", "instructions-eval.jsonl"),
    "builtin:sample-classification": ("reviews-train.jsonl", "reviews-eval.jsonl"),
    "builtin:sample-preference": ("preference-train.jsonl", "preference-eval.jsonl"),
    "builtin:sample-kto": ("kto-train.jsonl", "kto-eval.jsonl"),
}
TEXT_SUFFIXES = {".json", ".jsonl", ".csv", ".txt"}
LOCAL_SUFFIXES = TEXT_SUFFIXES | {".parquet", ".arrow"}
HEAD_BYTES = 64 * 1024  # what check_file reads of each file
BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
        (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


@dataclass(frozen=True)
class Record:
    row: dict
    origin: str  # "path:line" for local files, "hub-id[split]#row" for Hub datasets


def is_dataset_repo(path: str) -> bool:
    """A local directory laid out like a Hub dataset repo: a README.md whose YAML front matter
    declares ``configs:`` (or ``dataset_info:``). It is loaded by ``datasets.load_dataset`` like a
    Hub id, so config name and split apply."""
    readme = Path(os.path.expanduser(path)) / "README.md"
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return False
    front = text[3:].split("\n---", 1)[0]
    return any(line.startswith(("configs:", "dataset_info:")) for line in front.splitlines())


def _is_local(path: str) -> bool:
    if is_dataset_repo(path):
        return False
    return path.startswith(("/", "./", "../", "~")) or any(c in path for c in "*?[") \
        or Path(path).suffix in LOCAL_SUFFIXES or Path(path).exists()


def resolve_files(path: str, key: str = "data.path") -> list[Path]:
    """A local file, directory or glob -> the sorted data files it names, each one checked
    (``key``: the config key named in the errors)."""
    if path in BUILTIN:
        return [SAMPLE_DIR / BUILTIN[path][0]]
    expanded = os.path.expanduser(path)
    if any(c in expanded for c in "*?["):
        files = [Path(p) for p in sorted(glob.glob(expanded, recursive=True))]
    elif Path(expanded).is_dir():
        files = _dir_files(Path(expanded))
    else:
        files = [Path(expanded)]
    files = [f for f in files if f.suffix in LOCAL_SUFFIXES or not f.exists()]
    if not files:
        held = ""
        if Path(expanded).is_dir():
            names = sorted(p.name for p in Path(expanded).iterdir())
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            held = f"; the directory holds {shown or 'nothing'}"
        raise DataError(f"{key}={path!r} matches no data files "
                        f"(expected {', '.join(sorted(LOCAL_SUFFIXES))}{held})")
    for f in files:
        check_file(f, key)
    return files


def _dir_files(root: Path) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.suffix in LOCAL_SUFFIXES)
    if (root / "state.json").is_file() and (root / "dataset_info.json").is_file():
        # ``datasets.Dataset.save_to_disk``: the rows are in the .arrow shards, the JSON is metadata
        files = [p for p in files if p.suffix == ".arrow"]
    return files


def check_file(f: Path, key: str = "data.path") -> None:
    """Refuse a data file that cannot be read as its suffix says, with one line naming it."""
    try:
        st = os.stat(f)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataError(f"{key}: {f} is a symlink loop ({exc.strerror}); "
                            "point the link at a real file or remove it") from None
        if os.path.islink(f):
            raise DataError(f"{key}: {f} is a broken symlink (to {os.readlink(f)}); "
                            "point the link at an existing file or remove it") from None
        if exc.errno == errno.ENOENT:
            raise DataError(f"{key}: {f} does not exist; pass an existing file, directory "
                            "or glob") from None
        raise DataError(f"{key}: {f} cannot be read ({exc.strerror}); fix its permissions "
                        "or pass another file") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"{key}: {f} is a directory, not a data file; pass the directory "
                        "itself (its data files are read) or a file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{key}: {f} is not a regular file (a FIFO, socket or device); "
                        "pass a data file")
    if st.st_size == 0:
        raise DataError(f"{key}: {f} is empty (0 bytes); write the data into it or remove "
                        f"it from {key}")
    try:
        with open(f, "rb") as fh:
            head = fh.read(HEAD_BYTES)
            tail = _tail(fh, st.st_size)
    except OSError as exc:
        hint = "make it readable (chmod a+r)" if exc.errno == errno.EACCES else "check the disk"
        raise DataError(f"{key}: {f} cannot be read ({exc.strerror}); {hint} "
                        f"or remove it from {key}") from None
    if f.suffix in TEXT_SUFFIXES:
        _check_text(f, head, st.st_size <= HEAD_BYTES, key)
    elif f.suffix == ".parquet" and not head.startswith(b"PAR1"):
        raise DataError(f"{key}: {f} is not a Parquet file (it does not start with the PAR1 "
                        "magic number); pass the right file or fix its name")
    elif f.suffix == ".parquet" and tail != b"PAR1":
        raise DataError(f"{key}: {f} is a truncated or damaged Parquet file (no PAR1 magic "
                        f"number at its end); re-export it or remove it from {key}")
    elif f.suffix == ".arrow" and not (head.startswith(b"ARROW1") or head.startswith(b"\xff\xff\xff\xff")):
        raise DataError(f"{key}: {f} is not an Arrow IPC file or stream (no Arrow magic "
                        f"number); re-export it or remove it from {key}")


def _tail(fh, size: int) -> bytes:
    if size < 4:
        return b""
    fh.seek(size - 4)
    return fh.read(4)


def _check_text(f: Path, head: bytes, complete: bool, key: str) -> None:
    """The first block of a text data file must be UTF-8 (a UTF-8 byte order mark is fine)."""
    for bom, name in BOMS:
        if head.startswith(bom):
            raise DataError(f"{key}: {f} is {name} text (byte order mark "
                            f"{bom.hex(' ').upper()}), data files must be UTF-8; convert it: "
                            f"iconv -f {name} -t UTF-8 {f} > {f.with_suffix('.utf8' + f.suffix).name}")
    decoder = codecs.getincrementaldecoder("utf-8")()
    bad = None
    try:
        decoder.decode(head, final=complete)
    except UnicodeDecodeError as exc:
        bad = exc.start
    controls = sum(head.count(bytes([b])) for b in (*range(0, 9), *range(14, 32)))
    if b"\x00" in head or (bad is not None and controls > 0):
        nul = head.find(b"\x00")
        if nul >= 0 and _looks_utf16(head):
            raise DataError(f"{key}: {f} looks like UTF-16 text without a byte order mark "
                            "(every other byte is 0), data files must be UTF-8; convert it: "
                            f"iconv -f UTF-16LE -t UTF-8 {f} > {f.with_suffix('.utf8' + f.suffix).name}")
        where = min(x for x in (nul, bad) if x is not None and x >= 0)
        raise DataError(f"{key}: {f} is not a text file (binary data at byte {where}); a "
                        f"{f.suffix} file must be UTF-8 text: pass the right file or fix its name")
    if bad is not None:
        raise DataError(f"{key}: {f} is not UTF-8 text (byte 0x{head[bad]:02x} at offset {bad}); "
                        f"convert it to UTF-8 (e.g. iconv -f LATIN1 -t UTF-8 {f}) or fix the byte")


def _looks_utf16(head: bytes) -> bool:
    sample = head[:4096]
    zeros_even, zeros_odd = sample[0::2].count(0), sample[1::2].count(0)
    half = max(1, len(sample) // 2)
    return max(zeros_even, zeros_odd) > 0.3 * half and min(zeros_even, zeros_odd) < 0.05 * half


def _read_errors():
    try:
        import pyarrow

        return (OSError, ValueError, csv.Error, pyarrow.ArrowException)
    except ImportError:  # pragma: no cover - pyarrow comes with datasets
        return (OSError, ValueError, csv.Error)


@contextmanager
def reading(f: Path):
    """Damage found while reading ``f`` (past what check_file saw) -> one DataError naming it."""
    try:
        yield
    except DataError:
        raise
    except UnicodeDecodeError as exc:
        raise DataError(f"{f}: not UTF-8 text ({exc.encoding} codec: {exc.reason}); convert the "
                        "file to UTF-8 or fix the bad bytes") from None
    except _read_errors() as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        kind = {".parquet": "Parquet", ".arrow": "Arrow"}.get(f.suffix, f"{f.suffix} data")
        raise DataError(f"{f}: cannot be read as a {kind} file ({type(exc).__name__}: {first}); "
                        "re-export the file or remove it from data.path") from None


def parse_json_line(raw: bytes) -> dict:
    """One line of a JSON-lines file: the parsed value, or ``{"__error__": why}`` (a bad row)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return {"__error__": f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"}
    try:
        return json.loads(text.lstrip("\ufeff"))
    except json.JSONDecodeError as exc:
        return {"__error__": f"invalid JSON ({exc.msg})"}


def _read_json(path: Path) -> Iterator[Record]:
    raw = path.read_bytes()
    if path.suffix == ".json" and raw.lstrip(codecs.BOM_UTF8 + b" \t\r\n").startswith(b"["):
        text = raw.decode("utf-8-sig")
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); "
                            "fix the file (a JSON array of objects or one object per line)") from exc
        for i, row in enumerate(rows):
            yield Record(row, f"{path}[{i}]")
        return
    # Split on b"\n" only, like the streaming reader: line numbers agree, and U+2028 inside a
    # JSON string (legal unescaped) does not end a line.
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        yield Record(parse_json_line(line), f"{path}:{lineno}")


def _read_csv(path: Path) -> Iterator[Record]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        for i, row in enumerate(csv.DictReader(fh), start=2):  # line 1 is the header
            yield Record(row, f"{path}:{i}")


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    for i, row in enumerate(pq.read_table(path).to_pylist()):
        yield Record(row, f"{path}#row{i}")


def _read_arrow(path: Path) -> Iterator[Record]:
    """An Arrow IPC file (``ARROW1`` magic) or stream (what ``datasets`` writes)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    with pa.memory_map(str(path)) as src:
        is_file = src.read(6) == b"ARROW1"
        src.seek(0)
        table = (ipc.open_file(src) if is_file else ipc.open_stream(src)).read_all()
    for i, row in enumerate(table.to_pylist()):
        yield Record(row, f"{path}#row{i}")


def _read_txt(path: Path, text_column: str) -> Iterator[Record]:
    # One document per file: continued pretraining chunks it to the context length later.
    yield Record({text_column: path.read_bytes().decode("utf-8-sig")}, f"{path}:1")


def read_local(files: list[Path], text_column: str = "text") -> Iterator[Record]:
    for f in files:
        with reading(f):
            if f.suffix in (".json", ".jsonl"):
                yield from _read_json(f)
            elif f.suffix == ".csv":
                yield from _read_csv(f)
            elif f.suffix == ".parquet":
                yield from _read_parquet(f)
            elif f.suffix == ".arrow":
                yield from _read_arrow(f)
            else:
                yield from _read_txt(f, text_column)


def read_hub(path: str, *, name: str | None, split: str, revision: str | None,
             streaming: bool = False) -> Iterator[Record]:
    """A Hub dataset (or a local dataset repo dir) through ``datasets.load_dataset``."""
    ds = load_hub(path, name=name, split=split, revision=revision, streaming=streaming)
    for i, row in enumerate(ds):
        yield Record(row, f"{path}[{split}]#row{i}")


def load_hub(path: str, *, name: str | None, split: str, revision: str | None, streaming: bool):
    """``datasets.load_dataset`` with its failures turned into one actionable DataError."""
    import datasets

    # datasets' per-split progress bars go to stderr, where a failed run must leave one line.
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(os.path.expanduser(path), name=name, split=split,
                                     revision=revision, streaming=streaming)
    except (FileNotFoundError, ConnectionError, ValueError, OSError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise DataError(f"data.path={path!r} (split {split!r}) could not be loaded: {first}; "
                        "check the id/split, or pass a local file with data.path=<file>") from exc


def is_local_source(path: str) -> bool:
    """Files read by finetune itself (True) or a dataset for ``datasets.load_dataset`` (False)."""
    return path in BUILTIN or _is_local(path)


def read_source(path: str, *, name=None, split="train", revision=None, text_column="text",
                streaming=False) -> Iterator[Record]:
    if is_local_source(path):
        yield from read_local(resolve_files(path), text_column)
    else:
        yield from read_hub(path, name=name, split=split, revision=revision, streaming=streaming)


def eval_files(path: str, eval_split: str) -> list[Path] | None:
    """Local eval data: builtin eval split, or an eval_split that names a file/glob."""
    if path in BUILTIN and eval_split == "eval":
        return [SAMPLE_DIR / BUILTIN[path][1]]
    if _is_local(eval_split):
        return resolve_files(eval_split, "data.eval_split")
    return None


def fingerprint(path: str, *, name=None, split="train", revision=None) -> str:
    """What identifies the source's content: file paths + sizes + mtimes, or Hub id + revision."""
    if path in BUILTIN or _is_local(path):
        parts = [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in resolve_files(path)]
    elif is_dataset_repo(path):
        root = Path(os.path.expanduser(path)).resolve()
        parts = [f"repo:{root}:{name}:{split}:{revision}"] + [
            f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(root.rglob("*"))
            if f.is_file() and ".git" not in f.parts]
    else:
        parts = [f"hub:{path}:{name}:{split}:{revision}"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

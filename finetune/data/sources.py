"""Where raw records come from: built-in samples, local files (json/jsonl/csv/parquet/txt, dirs,
globs) and Hugging Face Hub datasets. Every record carries its origin ("file:line") so a bad
row can be named in the error.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from finetune.errors import DataError

SAMPLE_DIR = Path(__file__).parent / "sample"
BUILTIN = {
    "builtin:sample": ("instructions-train.jsonl", "instructions-eval.jsonl"),
    "builtin:sample-classification": ("reviews-train.jsonl", "reviews-eval.jsonl"),
    "builtin:sample-preference": ("preference-train.jsonl", "preference-eval.jsonl"),
}
LOCAL_SUFFIXES = {".json", ".jsonl", ".csv", ".parquet", ".txt"}


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


def resolve_files(path: str) -> list[Path]:
    """A local file, directory or glob -> the sorted data files it names."""
    if path in BUILTIN:
        return [SAMPLE_DIR / BUILTIN[path][0]]
    expanded = os.path.expanduser(path)
    if any(c in expanded for c in "*?["):
        files = [Path(p) for p in sorted(glob.glob(expanded, recursive=True))]
    elif Path(expanded).is_dir():
        files = sorted(p for p in Path(expanded).rglob("*") if p.suffix in LOCAL_SUFFIXES)
    else:
        files = [Path(expanded)]
    files = [f for f in files if f.suffix in LOCAL_SUFFIXES or not f.exists()]
    if not files:
        raise DataError(f"data.path={path!r} matches no data files "
                        f"(expected {', '.join(sorted(LOCAL_SUFFIXES))})")
    for f in files:
        if not f.is_file():
            raise DataError(f"data.path: {f} does not exist; pass an existing file, directory or glob")
    return files


def _read_json(path: Path) -> Iterator[Record]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); "
                            "fix the file (a JSON array of objects or one object per line)") from exc
        for i, row in enumerate(rows):
            yield Record(row, f"{path}[{i}]")
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Record({"__error__": f"invalid JSON ({exc.msg})"}, f"{path}:{lineno}")
            continue
        yield Record(row, f"{path}:{lineno}")


def _read_csv(path: Path) -> Iterator[Record]:
    with path.open(newline="", encoding="utf-8") as fh:
        for i, row in enumerate(csv.DictReader(fh), start=2):  # line 1 is the header
            yield Record(row, f"{path}:{i}")


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    for i, row in enumerate(pq.read_table(path).to_pylist()):
        yield Record(row, f"{path}#row{i}")


def _read_txt(path: Path, text_column: str) -> Iterator[Record]:
    # One document per file: continued pretraining chunks it to the context length later.
    yield Record({text_column: path.read_text(encoding="utf-8")}, f"{path}:1")


def read_local(files: list[Path], text_column: str = "text") -> Iterator[Record]:
    for f in files:
        if f.suffix in (".json", ".jsonl"):
            yield from _read_json(f)
        elif f.suffix == ".csv":
            yield from _read_csv(f)
        elif f.suffix == ".parquet":
            yield from _read_parquet(f)
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
        return resolve_files(eval_split)
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

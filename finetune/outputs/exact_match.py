"""Greedy exact match on held-out prompts: the run's learning in one line a person can read.

``trainer.exact_match_prompts=N`` (causal LM): before the first step and after the last, the first
``N`` eval prompts are completed greedily and compared with their references after stripping
surrounding whitespace (an exact string compare, nothing else normalised). The result goes to
``exact_match.json`` in the run dir, to the log at the end of the run, and to report.md::

    Greedy exact match on 50 held-out prompts: before 0/50 (0%), after 46/50 (92%)
"""

from __future__ import annotations

import json
from pathlib import Path

FILE = "exact_match.json"


def normalise(text: str) -> str:
    return text.strip()


def exact_matches(completions: list[str], references: list[str]) -> int:
    """How many completions equal their reference once both are stripped of surrounding whitespace."""
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions for {len(references)} references")
    return sum(normalise(c) == normalise(r) for c, r in zip(completions, references))


def score(rows: list[dict], keep_misses: int = 20) -> dict:
    """``{"hits", "n", "misses"}`` of greedy rows (``prompt`` / ``completion`` / ``reference``
    keys); ``misses``: the first ``keep_misses`` rows that do not match, to read what went wrong."""
    hit = [normalise(r["completion"]) == normalise(r["reference"]) for r in rows]
    misses = [{k: r[k] for k in ("prompt", "completion", "reference")} for r, h in zip(rows, hit) if not h]
    return {"hits": sum(hit), "n": len(rows), "misses": misses[:keep_misses]}


def _part(name: str, result: dict | None) -> str:
    if not result:
        return f"{name} -"
    return f"{name} {result['hits']}/{result['n']} ({100 * result['hits'] / max(result['n'], 1):.0f}%)"


def exact_match_line(before: dict | None, after: dict | None) -> str:
    n = (after or before or {}).get("n", 0)
    return f"Greedy exact match on {n} held-out prompts: {_part('before', before)}, {_part('after', after)}"


def record(run_dir: Path, when: str, result: dict) -> dict:
    """Record ``result`` as the ``before`` or ``after`` figure of ``exact_match.json`` (``before``
    starts the file afresh); returns both figures."""
    data = {} if when == "before" else (read_result(run_dir) or {})
    data[when] = result
    (Path(run_dir) / FILE).write_text(json.dumps(data, indent=1))
    return data


def read_result(run_dir: Path) -> dict | None:
    path = Path(run_dir) / FILE
    return json.loads(path.read_text()) if path.exists() else None

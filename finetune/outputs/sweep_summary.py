"""``python -m finetune.outputs.sweep_summary <sweep_dir | run_dir ...>`` — one table for a sweep.

A run dir is a directory with ``config.yaml`` (every run writes it first) and, once finished,
``summary.json``. Given a sweep dir (Hydra ``multirun/<time>/``, ``runs/sweep-<id>/`` of a W&B
sweep, ``$OUTPUT_ROOT/sweep-<job>/`` of ``slurm/sweep-array.sbatch``), the run dirs below it are
found. The table's override columns are the config keys whose values differ between the runs
(plus any ``.hydra/overrides.yaml`` a run has), so it works whichever tool launched the runs.
Rows are sorted best first by ``eval_loss``; unfinished runs come last. The table is printed and
written as ``sweep_summary.md`` and ``sweep_summary.csv`` into the sweep dir.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import yaml

METRICS = ("eval_loss", "last_loss", "tokens_per_s", "steps")
# Keys that differ between runs without being a hyperparameter.
IGNORED = ("output_dir", "export.adapter_dir", "export.out_dir", "hub.repo_id", "logger.wandb.name")


def find_run_dirs(paths: list[Path], max_depth: int = 3) -> list[Path]:
    runs: list[Path] = []
    for path in paths:
        if (path / "config.yaml").is_file():
            runs.append(path)
            continue
        if max_depth and path.is_dir():
            subdirs = sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")),
                             key=_natural)
            runs += find_run_dirs(subdirs, max_depth - 1)
    return runs


def _natural(path: Path):
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def hydra_overrides(run: Path) -> dict:
    path = run / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    pairs = [o.lstrip("+~").split("=", 1) for o in yaml.safe_load(path.read_text()) or []]
    return {k: v for k, v in (p for p in pairs if len(p) == 2) if k not in IGNORED}


def read_run(run: Path) -> dict:
    config = flatten(yaml.safe_load((run / "config.yaml").read_text()) or {})
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    metrics = {k: (summary or {}).get(k) for k in METRICS}
    if summary is None:  # unfinished: the latest figures logged so far
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                if line.strip()] if (run / "metrics.jsonl").is_file() else []
        evals, train = [r for r in rows if "eval_loss" in r], [r for r in rows if "loss" in r]
        metrics.update(eval_loss=evals[-1]["eval_loss"] if evals else None,
                       last_loss=train[-1]["loss"] if train else None,
                       tokens_per_s=train[-1]["tokens_per_s"] if train else None,
                       steps=max((r["step"] for r in rows), default=None))
    return {"run": run, "config": config, "overrides": hydra_overrides(run), "metrics": metrics,
            "status": "done" if summary is not None else "unfinished"}


def override_keys(runs: list[dict]) -> list[str]:
    keys = {k for r in runs for k in r["overrides"]}
    all_keys = {k for r in runs for k in r["config"]}
    keys |= {k for k in all_keys if len({json.dumps(r["config"].get(k)) for r in runs}) > 1}
    return sorted(k for k in keys if k not in IGNORED)


def _value(run: dict, key: str):
    return run["config"].get(key, run["overrides"].get(key))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def summarize(runs: list[dict], base: Path) -> tuple[list[str], list[list]]:
    """(header, rows) sorted best first: finished runs by eval_loss, then the rest."""
    keys = override_keys(runs)
    order = sorted(runs, key=lambda r: (r["status"] != "done", r["metrics"]["eval_loss"] is None,
                                        r["metrics"]["eval_loss"] or 0.0))
    header = ["run", *keys, *METRICS, "status"]
    rows = [[os.path.relpath(r["run"], base), *(_value(r, k) for k in keys),
             *(r["metrics"][m] for m in METRICS), r["status"]] for r in order]
    return header, rows


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def text_table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells) + "\n"


def sweep_dir_for(paths: list[Path], runs: list[Path]) -> Path:
    """The directory given (when one non-run dir), else the runs' common parent."""
    if len(paths) == 1 and paths[0] not in runs:
        return paths[0]
    return Path(os.path.commonpath([str(r.parent) for r in runs]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.outputs.sweep_summary", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="a sweep dir, or run dirs")
    args = parser.parse_args(argv)
    paths = [p.resolve() for p in args.paths]
    missing = [str(p) for p in paths if not p.exists()]
    run_dirs = find_run_dirs([p for p in paths if p.exists()])
    if missing or not run_dirs:
        where = ", ".join(missing) + " does not exist" if missing else \
            f"no run dirs (with a config.yaml) under {', '.join(map(str, paths))}"
        print(f"error: {where}", file=sys.stderr)
        return 2
    base = sweep_dir_for(paths, run_dirs)
    header, rows = summarize([read_run(r) for r in run_dirs], base)
    print(text_table(header, rows), end="")
    (base / "sweep_summary.md").write_text(f"# Sweep summary: {base}\n\n" + markdown_table(header, rows))
    with (base / "sweep_summary.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
    print(f"written: {base / 'sweep_summary.md'}, {base / 'sweep_summary.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run metrics: ``metrics.jsonl`` (one JSON object per logged step), the console, and trackers.

Only the main process writes. Train rows carry at least step, loss, lr, tokens_per_s; eval rows
carry step and eval_loss (the contract in the README).
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import torch


def peak_memory() -> dict:
    """Peak RSS of this process (CPU) and CUDA allocated/reserved, in MiB."""
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["cuda_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    return out


# Dense bf16 peak FLOP/s by device name, for the MFU estimate (None where unknown: no MFU).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                   "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def device_peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def truncate_after(path: Path, step: int) -> None:
    """On resume: drop rows logged after the checkpoint's step, so the file reads as one run."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


class MetricsLog:
    def __init__(self, run_dir: Path, trackers: list, console):
        self.path = run_dir / "metrics.jsonl"
        self.fh = self.path.open("a", buffering=1)
        self.trackers = trackers
        self.console = console

    def write(self, row: dict) -> None:
        self.fh.write(json.dumps(row) + "\n")
        for t in self.trackers:
            t.log(row, row["step"])
        self.console.log_row(row)

    def close(self, summary: dict) -> None:
        self.fh.close()
        for t in self.trackers:
            t.finish(summary)


def format_row(row: dict) -> str:
    if "eval_loss" in row:
        extra = f"  eval_acc {row['eval_accuracy']:.3f}" if "eval_accuracy" in row else ""
        return f"step {row['step']:>6}  eval_loss {row['eval_loss']:.4f}{extra}"
    return (f"step {row['step']:>6}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
            f"grad_norm {row.get('grad_norm', float('nan')):.3f}  tok/s {row['tokens_per_s']:,.0f}")


class Console:
    """A rich progress bar on a terminal; plain log lines otherwise (CI, job logs)."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.progress = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.progress.add_task("train", total=total, completed=start, info="")
            self.progress.start()

    def advance(self, step: int, info: str | None = None) -> None:
        if self.progress is not None:
            kw = {"info": info} if info is not None else {}
            self.progress.update(self.task, completed=step, **kw)

    def log_row(self, row: dict) -> None:
        line = format_row(row)
        if self.progress is not None:
            self.progress.console.print(line)
            if "loss" in row:
                self.advance(row["step"], f"loss {row['loss']:.4f} lr {row['lr']:.1e} tok/s {row['tokens_per_s']:,.0f}")
        else:
            print(line, flush=True)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()

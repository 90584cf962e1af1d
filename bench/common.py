"""Shared helpers for the benchmarks: machine facts, child processes with their peak RSS, tables."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `import finetune` from a checkout that is not pip-installed
    sys.path.insert(1, str(REPO))
SHARED = Path(os.environ.get("FINETUNE_SHARED_DATA", "/work/shared/data"))


def machine() -> dict:
    """CPU model, core count, load average, date and commit: printed with every figure."""
    model = platform.processor() or "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "finetune", "bench"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return {"cpu": model, "cores": os.cpu_count(), "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": commit + ("+dirty" if dirty else "")}


def print_machine(title: str) -> dict:
    m = machine()
    print(f"# {title}\n# machine: {m['cpu']} ({m['cores']} cores), load {m['load']}, "
          f"{m['date']}, commit {m['commit']}\n# command: {' '.join(sys.argv)}", flush=True)
    return m


def run_child(cmd: list[str], env: dict | None = None, cwd: Path | None = None,
              log: Path | None = None) -> tuple[int, float, float]:
    """Run ``cmd`` in a fresh process; returns (exit status, wall seconds, peak RSS MiB of that child)."""
    t0 = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, cwd=cwd or REPO, stdout=out,
                            stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if log:
        out.close()
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """cols: (key, header, format). Markdown, so it pastes into RESULTS.md as is."""
    head = "| " + " | ".join(h for _, h, _ in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append("-" if v is None else (format(v, fmt) if fmt else str(v)))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


# A/B baselines: the public entry with one of finetune's own speed-ups switched off in-process, so
# "before" and "after" run the same code otherwise, in the same invocation.
SWITCH_OFF = {
    "packed-attention": "import finetune.model.attention as m; m.implementation = lambda attn, packing: attn",
}


def finetune_entry(off: tuple[str, ...] = ()) -> list[str]:
    """``[python, -m, finetune]``, or a ``-c`` entry that first switches off the named speed-ups."""
    if not off:
        return [sys.executable, "-m", "finetune"]
    code = "; ".join([SWITCH_OFF[name] for name in off] +
                     ["import runpy; runpy.run_module('finetune', run_name='__main__', alter_sys=True)"])
    return [sys.executable, "-c", code]


def run_as_child(fn, args, work: Path) -> None:
    """The ``--child`` half of a framework comparison: run ``fn(args, work)`` and print its result
    dict as one JSON line, with the peak RSS of this process or its children (the CLI run), MiB."""
    import resource

    result = fn(args, work)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # ours: the CLI process
    result["peak_rss_mib"] = max(own, kids) / 1024
    print(json.dumps(result))

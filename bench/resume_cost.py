"""Cost of resuming late in a run: process start -> first trained step, resumed at step 10 vs 2,000.

Two real runs of the built-in tiny Llama (micro_batch_size 1, log every step, so the late
checkpoint also carries 2,000 rows of history and metrics.jsonl has 2,000 rows to truncate) on a
large synthetic alpaca set (default 20,000 rows, so step 2,000 is deep inside epoch 0): one
saves a checkpoint at step 10 (max_steps 11), one at step 2,000 (max_steps 2,001). Each is then
resumed from that checkpoint (``resume=<checkpoints/step-N>``) and killed once its first step is
logged. The parent starts the clock just before it launches the process and stops it when the
first new train row (step N+1) appears in metrics.jsonl (polled every 2 ms), so the figure is
everything a resumed job pays before its first step: imports, data cache load, model build,
checkpoint load, batch-plan positioning, the step itself. Resumes alternate 10 / 2,000 in fresh
processes; medians are compared. Target: the 2,000 figure within 20% of the 10 figure.

    python bench/resume_cost.py            # ~3-5 min on 2 cores (the 2,000-step run dominates)
    python bench/resume_cost.py --quick    # late step 300
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, median, print_machine, table  # noqa: E402

# A 0.9M-parameter model on an oversubscribed machine: extra OpenMP threads only add contention.
ENV = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
WORDS = ["river", "stone", "cloud", "ember", "maple", "orbit", "pixel", "quartz", "tundra", "violet"]


def synthetic(path: Path, n: int) -> None:
    rows = []
    for i in range(n):
        a, b = WORDS[i % 10], WORDS[(i * 7 + 3) % 10]
        rows.append(json.dumps({"instruction": "Join the words.", "input": f"{a} {b} {i}",
                                "output": f"{a}-{b}-{i}"}))
    path.write_text("\n".join(rows) + "\n")


def cmd(data: Path, out: Path, max_steps: int, save_steps: int, resume: str = "false") -> list[str]:
    return [sys.executable, "-m", "finetune", "recipe=lora-llm", f"data.path={data}", "data.format=alpaca",
            "data.eval_size=0", "data.eval_split=null", "data.max_seq_len=64",
            f"data.cache_dir={data.parent / 'cache'}", f"trainer.max_steps={max_steps}",
            "trainer.micro_batch_size=1", "trainer.grad_accum=1", "trainer.log_steps=1",
            "trainer.eval_steps=0", f"trainer.save_steps={save_steps}", "trainer.keep_last=1",
            "trainer.sample_prompts=0", "trainer.progress=false", "logger.plots=false",
            f"output_dir={out}", f"resume={resume}"]


def newest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step-*/trainer_state.json"))
    return found[-1].parent if found else None


def train_to(data: Path, out: Path, target: int, budget_s: float, log: Path) -> Path:
    """A real checkpoint at ``target`` (or, past ``budget_s``, wherever SIGTERM stops the run:
    finetune's preemption path writes a complete checkpoint at the current step). Continues an
    interrupted run with resume=auto."""
    ckpt = newest_checkpoint(out)
    if ckpt is not None and json.loads((ckpt / "trainer_state.json").read_text())["step"] >= target:
        return ckpt
    with open(log, "a") as fh:
        proc = subprocess.Popen(cmd(data, out, target + 1, target, resume="auto"), cwd=REPO, stdout=fh,
                                stderr=subprocess.STDOUT, env={**os.environ, **ENV})
        try:
            proc.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # checkpoint at the current step, exit 75
            proc.wait()
    ckpt = newest_checkpoint(out)
    if ckpt is None:
        raise SystemExit(f"no checkpoint written; see {log}")
    return ckpt


def first_step_seconds(command: list[str], metrics: Path, step: int, log: Path) -> float:
    """Seconds from launch to the first train row of ``step`` in metrics.jsonl; the process is then
    killed (SIGKILL: no preemption checkpoint), since the rest of its run is not measured."""
    keep = [line for line in metrics.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step - 1]
    metrics.write_text("".join(line + "\n" for line in keep))  # what resume truncates to anyway
    with open(log, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(command, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, **ENV})
        seen = None
        while seen is None:
            for line in metrics.read_text().splitlines():
                if f'"step": {step},' in line and '"loss"' in line:
                    seen = time.perf_counter() - t0
                    break
            if seen is None:
                if proc.poll() is not None:
                    raise SystemExit(f"resume run ended without step {step}; see {log}")
                time.sleep(0.002)
        proc.kill()
        proc.wait()
    return seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--late", type=int, default=None, help="late checkpoint step (default 2000)")
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-budget-s", type=float, default=1800,
                   help="stop making the late checkpoint after this long (SIGTERM: a real checkpoint "
                        "at the step reached); rerunning continues it")
    p.add_argument("--work", default=None)
    a = p.parse_args()
    late = a.late or (300 if a.quick else 2000)
    early = 10
    print_machine(f"resume cost: process start -> first trained step, resume at {early} vs {late}")
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "synthetic.jsonl"
    if not data.exists() or len(data.read_text().splitlines()) != a.rows:
        synthetic(data, a.rows)  # rewritten only when needed: its mtime is part of the data cache key
    runs = {}
    for step in (early, late):
        out = work / f"run-{step}"
        t0 = time.perf_counter()
        ckpt = train_to(data, out, step, a.train_budget_s, work / f"train-{step}.txt")
        state = json.loads((ckpt / "trainer_state.json").read_text())
        runs[step] = (out, ckpt, state["step"])
        print(f"  checkpoint at step {state['step']} ({ckpt.name}, {len(state.get('history', []))} history "
              f"rows), ready after {time.perf_counter() - t0:.1f}s", flush=True)
    early_step, late_step = runs[early][2], runs[late][2]
    if late_step != late:
        print(f"  NOTE: the late run was stopped by --train-budget-s at step {late_step} (not {late})")
    times: dict[int, list[float]] = {early: [], late: []}
    for rep in range(a.repeats):
        for step in ((early, late) if rep % 2 == 0 else (late, early)):
            out, ckpt, at = runs[step]
            s = first_step_seconds(cmd(data, out, step + 1, step, resume=str(ckpt)),
                                   out / "metrics.jsonl", at + 1, work / f"resume-{step}-{rep}.txt")
            times[step].append(s)
            print(f"  rep {rep} resume at {runs[step][2]:5d}: first step after {s:.2f}s (load "
                  f"{os.getloadavg()[0]:.2f})", flush=True)
    rows = [{"resume_at": runs[s][2], "median": median(v), "min": min(v), "runs": len(v)} for s, v in times.items()]
    print()
    print(table(rows, [("resume_at", "resumed at step", ""), ("median", "start -> first step s (median)", ".2f"),
                       ("min", "min s", ".2f"), ("runs", "runs", "")]))
    ratio = median(times[late]) / median(times[early])
    print(f"resume at {late_step} / resume at {early_step}: {ratio:.2f}x (difference "
          f"{median(times[late]) - median(times[early]):+.2f}s); target within 20%: "
          f"{'MET' if abs(ratio - 1) <= 0.2 else 'NOT MET'}")


if __name__ == "__main__":
    main()

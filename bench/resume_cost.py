"""Cost of resuming late in a run: process start -> first trained step, resumed at step 10 vs 2,000.

Two real runs of the built-in tiny Llama (micro_batch_size 1, log every step, so the late
checkpoint also carries 2,000 rows of history and metrics.jsonl has 2,000 rows to truncate) on a
large synthetic alpaca set (default 20,000 rows, so step 2,000 is deep inside epoch 0): one
saves a checkpoint at step 10 (max_steps 11), one at step 2,000 (max_steps 2,001). Each is then
resumed from that checkpoint (``resume=<checkpoints/step-N>``), trains its one remaining step and
ends. The parent starts the clock just before it launches the process and stops it when the
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, median, print_machine, run_child, table  # noqa: E402

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


def first_step_seconds(command: list[str], metrics: Path, step: int, log: Path) -> float:
    """Seconds from launch to the first train row of ``step`` in metrics.jsonl."""
    keep = [line for line in metrics.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step - 1]
    metrics.write_text("".join(line + "\n" for line in keep))  # what resume truncates to anyway
    with open(log, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(command, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
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
        if proc.wait():
            raise SystemExit(f"resume run failed ({proc.returncode}); see {log}")
    return seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--late", type=int, default=None, help="late checkpoint step (default 2000)")
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", default=None)
    a = p.parse_args()
    late = a.late or (300 if a.quick else 2000)
    early = 10
    print_machine(f"resume cost: process start -> first trained step, resume at {early} vs {late}")
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "synthetic.jsonl"
    synthetic(data, a.rows)
    runs = {}
    for step in (early, late):
        out = work / f"run-{step}"
        t0 = time.perf_counter()
        code, wall, _ = run_child(cmd(data, out, step + 1, step), log=work / f"train-{step}.txt")
        if code:
            raise SystemExit(f"training to step {step} failed; see {work / f'train-{step}.txt'}")
        ckpt = out / "checkpoints" / f"step-{step:08d}"
        assert (ckpt / "trainer_state.json").exists(), f"no checkpoint at {ckpt}"
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["step"] == step
        runs[step] = (out, ckpt)
        print(f"  trained to step {step} (+1) in {time.perf_counter() - t0:.1f}s; checkpoint {ckpt.name}",
              flush=True)
    times: dict[int, list[float]] = {early: [], late: []}
    for rep in range(a.repeats):
        for step in ((early, late) if rep % 2 == 0 else (late, early)):
            out, ckpt = runs[step]
            s = first_step_seconds(cmd(data, out, step + 1, step, resume=str(ckpt)),
                                   out / "metrics.jsonl", step + 1, work / f"resume-{step}-{rep}.txt")
            times[step].append(s)
            print(f"  rep {rep} resume at {step:5d}: first step after {s:.2f}s (load "
                  f"{os.getloadavg()[0]:.2f})", flush=True)
    rows = [{"resume_at": s, "median": median(v), "min": min(v), "runs": len(v)} for s, v in times.items()]
    print()
    print(table(rows, [("resume_at", "resumed at step", ""), ("median", "start -> first step s (median)", ".2f"),
                       ("min", "min s", ".2f"), ("runs", "runs", "")]))
    ratio = median(times[late]) / median(times[early])
    print(f"resume at {late} / resume at {early}: {ratio:.2f}x (difference "
          f"{median(times[late]) - median(times[early]):+.2f}s); target within 20%: "
          f"{'MET' if abs(ratio - 1) <= 0.2 else 'NOT MET'}")


if __name__ == "__main__":
    main()

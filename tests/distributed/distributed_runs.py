"""Helpers for tests/distributed: real ``python -m finetune`` runs on CPU (gloo), several processes.

A module of its own (not conftest) so it never clashes with the other test folders' conftests.

Every run trains the built-in tiny Llama for a few steps. Runs that several tests compare are
made once per session (:class:`Runs`). All runs share one global batch of 16 rows: 1 process x
micro 8 x accum 2, or 2 processes x micro 4 x accum 2, so their losses must agree.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
BASE = ["recipe=lora-llm", "trainer.log_steps=1", "trainer.sample_prompts=0",
        "trainer.eval_max_batches=2", "trainer.progress=false", "trainer.precision=fp32",
        "trainer.grad_accum=2"]
COMMON = [*BASE, f"trainer.max_steps={STEPS}"]
ONE_PROC = ["trainer.micro_batch_size=8"]
TWO_PROCS = ["trainer.micro_batch_size=4"]
# Each of N processes gets its share of 2 cores; without this, OpenMP spin-waits dominate.
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
       "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], *, prefix: list[str] | None = None, timeout: float = 300,
        check: bool = True) -> subprocess.CompletedProcess:
    """``<prefix or python -m finetune> args`` in a fresh process group of workers."""
    cmd = (prefix or [sys.executable, "-m", "finetune"]) + args
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **ENV})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def two_procs(strategy: str) -> list[str]:
    return [f"distributed={strategy}", "launcher.nproc_per_node=2",
            f"launcher.master_port={free_port()}", *TWO_PROCS]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def assert_adapters_agree(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], lr: float, steps: int) -> None:
    """Two runs' adapters after ``steps`` Adam steps: all but 0.1% of the weights within 1e-4, none
    more than 2 x steps x lr apart. Adam turns reduction-order round-off in a near-zero gradient
    into an lr-sized step (its update is about sign(g) x lr early on), so a few weights may end
    lr-sized apart while the losses agree to 1e-5; a wrong gradient moves most of them."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    apart = sum(int(((a[k].float() - b[k].float()).abs() > 1e-4).sum()) for k in a)
    assert apart < 1e-3 * sum(t.numel() for t in a.values()), apart
    assert max_diff(a, b) < 2 * steps * lr


class Runs:
    """Session cache: each named run trains once, whichever test asks first."""

    def __init__(self, root: Path):
        self.root, self.done = root, {}

    def get(self, name: str, args: list[str], **kw) -> Path:
        if name not in self.done:
            out = self.root / name
            run([*COMMON, *args, f"output_dir={out}"], **kw)
            self.done[name] = out
        return self.done[name]

    def reference(self) -> Path:
        """One process, the same global batch, no strategy."""
        return self.get("reference", ["distributed=none", *ONE_PROC])

    def strategy(self, strategy: str) -> Path:
        """Two processes with a checkpoint at step 2 (used by the resume tests)."""
        return self.get(strategy, [*two_procs(strategy), "trainer.save_steps=2"])

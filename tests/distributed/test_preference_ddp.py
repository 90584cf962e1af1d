"""DPO on 2 processes (DDP, gloo) equals 1 process: per-step loss, rewards and the final adapter.

2 processes x micro 4 x accum 2 against 1 process x micro 8 x accum 2 (the same 16 pairs per step):
the loss is normalised by the pairs of the whole step, and the reference forward (adapter
disabled) runs on the unwrapped model, outside DDP's gradient hooks.
"""

from __future__ import annotations

import json

import pytest

from distributed_runs import ONE_PROC, adapter, max_diff, run, two_procs

DPO = ["recipe=dpo-llm", "trainer.log_steps=1", "trainer.sample_prompts=0", "trainer.eval_steps=0",
       "trainer.progress=false", "trainer.precision=fp32", "trainer.grad_accum=2", "trainer.max_steps=3",
       "optim.lr=5e-3"]


def rows(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, filter(None, lines)) if "loss" in r}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("loss", ["sigmoid", "orpo"])
def test_dpo_two_processes_match_one_process(tmp_path, loss):
    """orpo: its SFT term per chosen token of the whole step (the token count summed over ranks)."""
    one, two = tmp_path / "one", tmp_path / "two"
    run([*DPO, f"pref.loss={loss}", *ONE_PROC, f"output_dir={one}"])
    run([*DPO, f"pref.loss={loss}", *two_procs("ddp"), f"output_dir={two}"])
    a, b = rows(one), rows(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        for key in ("loss", "rewards/margin", "rewards/accuracy", "logps/chosen"):
            assert abs(a[step][key] - b[step][key]) < 1e-5, (step, key, a[step][key], b[step][key])
    assert abs(a[3]["loss"] - a[1]["loss"]) > 1e-3  # it trained
    # Adam turns round-off in near-zero gradients into lr-sized steps: the same bound as
    # test_strategies.py's adapters.
    assert max_diff(adapter(one), adapter(two)) < 1e-4

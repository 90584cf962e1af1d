"""KTO on 2 processes (DDP, gloo) equals 1 process: per-step loss, KL estimate, rewards, final adapter.

2 processes x micro 4 x accum 2 against 1 process x micro 8 x accum 2 (the same 16 examples per
step). The KL estimate z is a statistic of the whole optimizer step (finetune/tasks/kto.py: the
policy and reference log-ratios of the KL sequences of all micro-batches, summed over the ranks,
before the step's backward passes), so it is the same number in both runs; a per-micro-batch z
(TRL's) would not be. A third run, 2 processes with ``pref.precompute_ref=true`` (the table's rows
split over the ranks, rank 0 writes it), equals the 1-process run with the live reference.
"""

from __future__ import annotations

import json

import pytest

from distributed_runs import ONE_PROC, adapter, max_diff, run, two_procs

KTO = ["recipe=kto-llm", "trainer.log_steps=1", "trainer.sample_prompts=0", "trainer.eval_steps=0",
       "trainer.progress=false", "trainer.precision=fp32", "trainer.grad_accum=2", "trainer.max_steps=4",
       "optim.lr=5e-3"]


def rows(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, filter(None, lines)) if "loss" in r}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kto_two_processes_match_one_process(tmp_path):
    one, two, pre = tmp_path / "one", tmp_path / "two", tmp_path / "pre"
    run([*KTO, *ONE_PROC, f"output_dir={one}"])
    run([*KTO, *two_procs("ddp"), f"output_dir={two}"])
    run([*KTO, *two_procs("ddp"), "pref.precompute_ref=true", f"data.cache_dir={tmp_path / 'cache'}",
         f"output_dir={pre}"])
    assert len(list((tmp_path / "cache").rglob("reference-logps-*-kto.safetensors"))) == 1
    a = rows(one)
    assert any(a[step]["kl"] > 1e-3 for step in a)  # the estimate is not clamped to 0 throughout
    assert abs(a[4]["loss"] - a[1]["loss"]) > 1e-3  # it trained
    for other in (two, pre):
        b = rows(other)
        assert sorted(a) == sorted(b) == [1, 2, 3, 4]
        for step in a:
            for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen"):
                assert abs(a[step][key] - b[step][key]) < 1e-5, (other.name, step, key, a[step][key], b[step][key])
        assert max_diff(adapter(one), adapter(other)) < 1e-4, other.name

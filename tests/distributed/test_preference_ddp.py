"""DPO on 2 processes (DDP, gloo) equals 1 process: per-step loss, rewards and the final adapter.

2 processes x micro 4 x accum 2 against 1 process x micro 8 x accum 2 (the same 16 pairs per step):
the loss is normalised by the pairs of the whole step, and the reference forward (adapter
disabled) runs on the unwrapped model, outside DDP's gradient hooks.
"""

from __future__ import annotations

import json
import random

import pytest

from finetune.data.sample.make_sample import instruction_rows, preference_rows

from distributed_runs import ONE_PROC, adapter, assert_adapters_agree, run, two_procs

DPO = ["recipe=dpo-llm", "pref.rpo_alpha=0", "trainer.exact_match_prompts=0", "trainer.log_steps=1", "trainer.sample_prompts=0", "trainer.eval_steps=0",
       "trainer.progress=false", "trainer.precision=fp32", "trainer.grad_accum=2", "trainer.max_steps=3",
       "optim.lr=5e-3"]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """The pairs this test was written on (the shipped preference set before it moved to the first-run
    tasks): the 1,000 train pairs of the earlier string tasks, made exactly as make_sample made them."""
    train = instruction_rows(random.Random(1234), 2000)
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(train[:1000], random.Random(5678))))
    return path


def rows(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, filter(None, lines)) if "loss" in r}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("loss", ["sigmoid", "orpo"])
def test_dpo_two_processes_match_one_process(tmp_path, pairs_file, loss):
    """orpo: its SFT term per chosen token of the whole step (the token count summed over ranks)."""
    one, two = tmp_path / "one", tmp_path / "two"
    data = [f"data.path={pairs_file}", "data.eval_split=null", "data.eval_size=0"]
    run([*DPO, *data, f"pref.loss={loss}", *ONE_PROC, f"output_dir={one}"])
    run([*DPO, *data, f"pref.loss={loss}", *two_procs("ddp"), f"output_dir={two}"])
    a, b = rows(one), rows(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        for key in ("loss", "rewards/margin", "rewards/accuracy", "logps/chosen"):
            assert abs(a[step][key] - b[step][key]) < 1e-5, (step, key, a[step][key], b[step][key])
    assert abs(a[3]["loss"] - a[1]["loss"]) > 1e-3  # it trained
    # Adam turns round-off in near-zero gradients into lr-sized steps (sigmoid, with the chunked head
    # the built-in model's LoRA now takes: one weight of 100,864 1.004e-4 apart, on the 2-core EPYC).
    assert_adapters_agree(adapter(one), adapter(two), lr=5e-3, steps=3)

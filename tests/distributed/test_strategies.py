"""Every strategy trains like one process: same per-step losses, same final adapter.

2 processes x micro 4 x accum 2 against 1 process x micro 8 x accum 2 (the same 16 rows per
optimizer step, split differently). Losses are normalised by the targets of the whole step, so
they must agree to float round-off; each strategy's adapter is compared with the one-process
adapter (so all strategies agree with each other within twice the tolerance).
"""

from __future__ import annotations

import json
import math

import pytest

from distributed_runs import BASE, STEPS, adapter, losses, max_diff, run, two_procs

STRATEGIES = ["ddp", "fsdp", "zero2", "zero3"]
VARIANTS = ["zero1", "fsdp-offload", "zero2-offload", "zero3-offload"]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", STRATEGIES + VARIANTS)
def test_two_processes_match_one_process(runs, strategy):
    ref, got = losses(runs.reference()), losses(runs.strategy(strategy))
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, loss in ref.items():
        assert abs(got[step] - loss) < 1e-4, (strategy, step, got[step], loss)
    weights = adapter(runs.strategy(strategy))
    assert weights and all(t.numel() > 0 for t in weights.values())  # gathered, never shards
    assert any("modules_to_save" in k or "embed_tokens" in k for k in weights)
    assert max_diff(weights, adapter(runs.reference())) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_compile_with_sharding_is_a_config_error(tmp_path, strategy):
    proc = run(["recipe=lora-llm", f"distributed={strategy}", "trainer.compile=true",
                "trainer.max_steps=1", f"output_dir={tmp_path}"], check=False, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "trainer.compile" in errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sharded_eval_with_uneven_rows_per_rank(tmp_path):
    # 9 eval rows, micro 4: rank 0 gets 5 rows (2 forwards), rank 1 gets 4 (1 forward). Under FSDP
    # each forward is a collective, so rank 1 must run a padding forward or both ranks hang.
    out = tmp_path / "uneven"
    run([*BASE, "trainer.max_steps=1", *two_procs("fsdp"), "trainer.eval_max_batches=0",
         "data.eval_split=null", "data.eval_size=9", "distributed.timeout_s=60",
         f"output_dir={out}"], timeout=200)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r for r in rows if "eval_loss" in r and math.isfinite(r["eval_loss"])]

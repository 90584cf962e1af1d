"""Resume under several processes: exact on the same world size, and across world sizes where
the strategy allows it (DDP replicates everything; FSDP saves gathered optimizer state). DeepSpeed
keeps optimizer shards per rank, so another world size is refused with one line."""

from __future__ import annotations

import pytest

from distributed_runs import COMMON, ONE_PROC, adapter, losses, max_diff, run, two_procs


def step2(run_dir):
    return run_dir / "checkpoints" / "step-00000002"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_resume_same_world_size_is_bit_identical(runs, tmp_path, strategy):
    full = runs.strategy(strategy)  # 4 steps, checkpoint at step 2 (mid-epoch)
    out = tmp_path / "resumed"
    run([*COMMON, *two_procs(strategy), "trainer.save_steps=2", f"resume={step2(full)}",
         f"output_dir={out}"])
    assert losses(out) == {s: v for s, v in losses(full).items() if s > 2}
    assert max_diff(adapter(out), adapter(full)) == 0.0


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_save_on_two_processes_resume_on_one(runs, tmp_path, strategy):
    full = runs.strategy(strategy)
    out = tmp_path / "one"
    run([*COMMON, f"distributed={strategy}", *ONE_PROC, "trainer.save_steps=2",
         f"resume={step2(full)}", f"output_dir={out}"])
    got, want = losses(out), losses(full)
    assert sorted(got) == [3, 4]
    for step, loss in got.items():
        assert abs(loss - want[step]) < 1e-4, (step, loss, want[step])
    assert max_diff(adapter(out), adapter(full)) < 1e-4


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_deepspeed_resume_on_another_world_size_is_refused(runs, tmp_path):
    full = runs.strategy("zero2")
    proc = run([*COMMON, "distributed=zero2", *ONE_PROC, f"resume={step2(full)}",
                f"output_dir={tmp_path / 'one'}"], check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-2000:]
    assert "optimizer shards of 2 processes" in errors[0]
    assert "Traceback" not in proc.stderr

"""Exact resume, O(1) position restore, atomic checkpoints under kill -9, and preemption.

The reference is one uninterrupted run; every interrupted variant must reproduce its per-step
losses bit for bit (single process, CPU). 16 rows per step over 300 training rows: 18 steps per
epoch, so a 40-step run crosses two epoch boundaries and the resume points are mid-epoch.
"""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from run_helpers import REPO, build_trainer, read_metrics, run_cli, train_losses
from finetune.errors import EXIT_PREEMPTED

COMMON = ["recipe=lora-llm", "trainer.max_steps=40", "trainer.micro_batch_size=16", "trainer.log_steps=1",
          "trainer.eval_steps=0", "trainer.sample_prompts=0", "peft.dropout=0.1",
          "data.eval_split=null", "data.eval_size=20"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    import random

    from finetune.data.sample.make_sample import instruction_rows

    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in instruction_rows(random.Random(7), 320)))
    COMMON.append(f"data.path={path}")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_file):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    run_cli([*COMMON, "trainer.save_steps=20", f"output_dir={run_dir}"], check=True)
    losses = train_losses(run_dir)
    assert [s for s, _ in losses] == list(range(1, 41))
    return run_dir, losses


def _popen(args):
    return subprocess.Popen([sys.executable, "-m", "finetune", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_resume_mid_epoch_is_bit_identical(reference, tmp_path):
    ref_dir, ref_losses = reference
    run_dir = tmp_path / "resumed"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref_dir / "checkpoints" / "step-00000020", run_dir / "checkpoints" / "step-00000020")
    run_cli([*COMMON, "resume=auto", f"output_dir={run_dir}"], check=True)
    assert train_losses(run_dir) == ref_losses[20:]  # exact equality, not approximate
    a = load_file(str(ref_dir / "final" / "adapter_model.safetensors"))
    b = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigusr1_checkpoints_exits_75_and_resume_completes_identically(reference, tmp_path):
    _, ref_losses = reference
    run_dir = tmp_path / "preempted"
    proc = _popen([*COMMON, f"output_dir={run_dir}"])
    deadline = time.time() + 300
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == EXIT_PREEMPTED, proc.stderr.read()
    ckpts = list((run_dir / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1
    stopped_at = json.loads((ckpts[0] / "trainer_state.json").read_text())["step"]
    assert 5 <= stopped_at < 40
    run_cli([*COMMON, "resume=auto", f"output_dir={run_dir}"], check=True)
    assert train_losses(run_dir) == ref_losses


@pytest.mark.slow
def test_second_signal_aborts_at_once(tmp_path, data_file):
    run_dir = tmp_path / "abort"
    # Big steps (128 rows): the second signal lands while the first is still being honoured.
    proc = _popen([*COMMON, "trainer.max_steps=400", "trainer.micro_batch_size=128", f"output_dir={run_dir}"])
    while not (run_dir / "metrics.jsonl").exists() or not read_metrics(run_dir):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    for line in proc.stderr:  # the handler has run: the next signal is a second one
        if "checkpointing after this step" in line:
            break
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert not list((run_dir / "checkpoints").glob("step-*"))  # aborted before the save


def _assert_loadable(ckpt):
    load_file(str(ckpt / "trainable.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt", "rng-rank0.pt"):
        torch.load(ckpt / name, weights_only=True)
    json.loads((ckpt / "trainer_state.json").read_text())


@pytest.mark.slow
def test_kill_9_during_saves_never_leaves_a_broken_checkpoint(reference, tmp_path):
    _, ref_losses = reference
    run_dir = tmp_path / "killed"
    args = [*COMMON, "trainer.save_steps=1", "trainer.keep_last=3", f"output_dir={run_dir}"]
    caught_mid_save = 0
    for kill_at_save in (3, 9, 17):  # kill while the Nth save's temp dir exists
        proc = _popen([*args, "resume=auto"])
        ckpt_root = run_dir / "checkpoints"
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if any(ckpt_root.glob(f".tmp-step-{kill_at_save:08d}")):
                break
            time.sleep(0.0005)
        proc.kill()
        proc.wait()
        caught_mid_save += any(ckpt_root.glob(".tmp-*"))
        published = sorted(ckpt_root.glob("step-*"))
        assert published, "no checkpoint was published before the kill"
        for ckpt in published:
            _assert_loadable(ckpt)
    assert caught_mid_save >= 1, "no kill landed inside a save; the test proved nothing"
    run_cli([*args, "resume=auto"], check=True)
    assert train_losses(run_dir) == ref_losses


def test_resume_restores_position_without_iterating(tmp_path):
    """O(1): the resumed run draws exactly the rows of the steps it trains, none before."""
    run_dir = tmp_path / "o1"
    first = build_trainer(["recipe=lora-llm", "trainer.max_steps=6", "trainer.save_steps=5",
                           "trainer.eval_steps=0", "trainer.sample_prompts=0"], run_dir)
    first.train()
    resumed = build_trainer(["recipe=lora-llm", "trainer.max_steps=6", "trainer.save_steps=5",
                             "trainer.eval_steps=0", "trainer.sample_prompts=0", "resume=auto"], run_dir)
    assert resumed.state.step == 5
    drawn = []
    dataset = resumed.data.train
    original = type(dataset).__getitem__

    class Counting(type(dataset)):
        def __getitem__(self, i):
            drawn.append(i)
            return original(self, i)

    dataset.__class__ = Counting
    resumed.train()
    assert len(drawn) == resumed.feed.rows_per_step  # one step's rows, not 6 steps' worth
    assert sorted(drawn) == sorted(resumed.feed.plan.epoch_order(0)[5].tolist())


def test_resume_refuses_a_different_model(tmp_path):
    run_dir = tmp_path / "refuse"
    run_cli(["recipe=lora-llm", "trainer.max_steps=4", "trainer.save_steps=2", "trainer.eval_steps=0",
             f"output_dir={run_dir}"], check=True)
    proc = run_cli(["recipe=lora-llm", "trainer.max_steps=6", "peft.r=4", "resume=auto",
                    f"output_dir={run_dir}"])
    assert proc.returncode == 5
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "different model or peft config" in lines[0]


def _last_step(run_dir) -> int:
    """The last logged train step (0 before any; a line being written is skipped)."""
    path = run_dir / "metrics.jsonl"
    steps = [0]
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        steps += [row["step"]] if "loss" in row else []
    return steps[-1]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_twenty_kill_9_at_random_moments_then_resume_gives_the_same_losses(reference, tmp_path):
    """20 kill -9s at seeded random moments: 5 during start-up (data, model, checkpoint loading),
    15 at random steps, a random fraction of a step late (mid-step, mid-save). Each restart is
    ``resume=auto`` (taking over the dead run's lock); the losses equal the uninterrupted run's."""
    import random

    _, ref_losses = reference
    run_dir = tmp_path / "killed-20"
    args = [*COMMON, "trainer.save_steps=2", "trainer.keep_last=2", f"output_dir={run_dir}", "resume=auto"]
    rng = random.Random(20)
    moments = [("startup", rng.uniform(0.3, 4.0)) for _ in range(5)] + \
              [("step", s) for s in sorted(rng.choices(range(2, 39), k=15))]
    rng.shuffle(moments)
    for kind, at in moments:
        proc = _popen(args)
        deadline = time.time() + 300
        if kind == "startup":
            time.sleep(at)
        else:
            while time.time() < deadline and proc.poll() is None:
                if _last_step(run_dir) >= at:
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.15))
        assert proc.poll() is None, f"the run ended before the kill at {kind} {at}: {proc.stderr.read()[-2000:]}"
        proc.kill()
        proc.wait()
        for ckpt in sorted((run_dir / "checkpoints").glob("step-*")) if (run_dir / "checkpoints").exists() else []:
            _assert_loadable(ckpt)
    run_cli(args, check=True)
    assert train_losses(run_dir) == ref_losses

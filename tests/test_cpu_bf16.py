"""``trainer.precision=bf16`` on CPU: autocast to bf16 with fp32 weights, optimizer and loss maths.

The CPU's bf16 instructions are read at run time (``amx_bf16`` / ``avx512_bf16`` in /proc/cpuinfo):
with them the run logs which it uses, without them it warns that torch emulates bf16 (slower than
fp32); both branches are tested here whatever this machine has. ``auto`` stays fp32 on CPU.

The run itself, against an fp32 run of the same 200 steps (the default recipe: the built-in model,
lr 3e-3): the first 10 steps within 5e-3 of fp32 (measured 9e-4 on a 2-core EPYC with
avx512_bf16); then the two trajectories separate (single steps up to 0.56 apart), so the bounds
are on means: all 200 steps within 3%, each 50-step window and the final eval_loss within 6%
(measured 0.8%, at most 3.1%, 2.6%). Resumed from its step-100 checkpoint, the bf16 run repeats
steps 101-200 bit for bit.
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from run_helpers import read_metrics, run_cli, train_losses
from finetune.distributed import cpu_bf16_instructions, mixed_precision
from finetune.errors import ConfigError

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path (on a GPU bf16 is CUDA's)")

CPUINFO = "processor\t: 0\nvendor_id\t: X\nflags\t\t: fpu sse2 avx2 avx512f {}\nbogomips\t: 1\n"
RUN = ["recipe=lora-llm", "trainer.max_steps=200", "trainer.log_steps=1", "trainer.eval_steps=0",
       "trainer.sample_prompts=0", "trainer.exact_match_prompts=0", "trainer.progress=false"]


def cfg(precision: str, strategy: str = "none"):
    return OmegaConf.create({"trainer": {"precision": precision},
                             "distributed": {"strategy": strategy, "timeout_s": 60}})


@pytest.mark.parametrize("flags,found", [("amx_bf16 amx_tile avx512_bf16", ["amx_bf16", "avx512_bf16"]),
                                         ("avx512_bf16", ["avx512_bf16"]), ("avx512_vnni", [])])
def test_the_cpus_bf16_instructions_are_read_from_cpuinfo(flags, found):
    assert cpu_bf16_instructions(CPUINFO.format(flags)) == found
    assert cpu_bf16_instructions("") == []


def test_precision_settings_on_cpu():
    assert mixed_precision(cfg("auto")) == "no"  # existing runs keep their fp32 losses
    assert mixed_precision(cfg("fp32")) == "no"
    assert mixed_precision(cfg("bf16")) == mixed_precision(cfg("bf16", "fsdp")) == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a GPU; use trainer.precision=bf16"):
        mixed_precision(cfg("fp16"))
    with pytest.raises(ConfigError, match="distributed=zero3 does not use"):
        mixed_precision(cfg("bf16", "zero3"))


@pytest.mark.parametrize("native", [["avx512_bf16"], []], ids=["native", "emulated"])
def test_the_run_says_whether_bf16_is_native_or_emulated(native, monkeypatch, caplog):
    import finetune.distributed as dist
    from finetune.distributed.strategy import Strategy
    from finetune.train.stages import reset_accelerate_state

    monkeypatch.setattr(dist, "cpu_bf16_instructions", lambda: native)
    reset_accelerate_state()  # another test of this worker may have built one
    with caplog.at_level(logging.INFO, logger="finetune.distributed.strategy"):
        acc = Strategy(cfg("bf16")).build_accelerator()
    try:
        assert acc.mixed_precision == "bf16" and acc.native_amp
        with acc.autocast():
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    finally:
        reset_accelerate_state()
    text = caplog.text
    if native:
        assert "autocast to bf16 (avx512_bf16), fp32 weights and optimizer" in text
    else:
        assert "this CPU has no bf16 instructions" in text and "slower than trainer.precision=fp32" in text


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    for p in ("fp32", "bf16"):
        save = ["trainer.save_steps=100"] if p == "bf16" else []
        run_cli([*RUN, f"trainer.precision={p}", *save, f"output_dir={root / p}"], check=True)
    return root


def mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.slow
def test_bf16_trains_within_tolerance_of_fp32(runs):
    a, b = dict(train_losses(runs / "fp32")), dict(train_losses(runs / "bf16"))
    assert sorted(a) == sorted(b) == list(range(1, 201))
    assert any(abs(a[s] - b[s]) > 1e-4 for s in a)  # autocast really ran (not an fp32 run)
    assert all(abs(a[s] - b[s]) < 5e-3 for s in range(1, 11)), [(s, a[s], b[s]) for s in range(1, 11)]
    for steps, bound in [(range(1, 201), 0.03), *((range(k, k + 50), 0.06) for k in (1, 51, 101, 151))]:
        fa, fb = mean([a[s] for s in steps]), mean([b[s] for s in steps])
        assert abs(fa - fb) < bound * fa, (steps, fa, fb)
    assert mean([b[s] for s in range(151, 201)]) < 0.5 * b[1]  # it learned
    ea, eb = ([r["eval_loss"] for r in read_metrics(runs / p) if "eval_loss" in r][-1] for p in ("fp32", "bf16"))
    assert abs(ea - eb) < 0.06 * ea, (ea, eb)


@pytest.mark.slow
def test_bf16_resume_is_bit_identical(runs, tmp_path):
    ref = train_losses(runs / "bf16")
    run_dir = tmp_path / "resumed"
    (run_dir / "checkpoints").mkdir(parents=True)
    step = runs / "bf16" / "checkpoints" / "step-00000100"
    shutil.copytree(step, run_dir / "checkpoints" / step.name)
    run_cli([*RUN, "trainer.precision=bf16", "resume=auto", f"output_dir={run_dir}"], check=True)
    assert train_losses(run_dir) == ref[100:]  # exact equality

"""The DeepSpeed config is derived from the run's config only (no second source that can disagree)."""

from __future__ import annotations

from hydra import compose, initialize_config_dir

from distributed_runs import REPO
from finetune.config import register_configs, validate
from finetune.distributed.strategy import get_strategy


def strategy_for(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["recipe=lora-llm", *overrides])
    validate(cfg)
    return get_strategy(cfg)


def test_ds_config_comes_from_the_run_config(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    ds = strategy_for(["distributed=zero3-offload", "trainer.micro_batch_size=3",
                       "trainer.grad_accum=5", "optim.max_grad_norm=0.5",
                       "trainer.precision=fp32"]).ds_config()
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 3 * 5 * 4
    assert ds["gradient_clipping"] == 0.5
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"


def test_no_clipping_and_no_offload(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = strategy_for(["distributed=zero1", "optim.max_grad_norm=0"]).ds_config()
    assert ds["gradient_clipping"] == 0.0
    assert ds["zero_optimization"]["stage"] == 1
    assert "offload_optimizer" not in ds["zero_optimization"]

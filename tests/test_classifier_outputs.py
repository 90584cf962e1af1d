"""A classifier run's outputs load with the standard APIs, label names included.

The base is a pretrained encoder saved without a classification head (like MiniLM: a BertModel
whose config has the default 2 labels), the data has 3 labels: loading final/ from the base's own
config would fail with a head size mismatch and lose the names. final/ points at the run's
base_model/ (the run's config + the source weight files, linked), so
``AutoPeftModelForSequenceClassification.from_pretrained(final)`` and
``pipeline("text-classification")`` (final/ and merged/) give the trained logits and the names.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fakehub/ sits beside the tests
from fakehub.tiny_models import build_tokenizer
from run_helpers import build_trainer

LABELS = {"animal": ["cat", "dog"], "sky": ["sun", "moon"], "colour": ["red", "blue", "green"]}
FILLER = ["the", "a", "is", "this", "that", "big", "small", "good", "fast", "slow"]
TEXTS = ["the cat is big", "a blue moon", "this green dog", "the sun is fast"]


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(sorted(LABELS))
        words = rng.sample(FILLER, 3) + [rng.choice(LABELS[label])]
        rng.shuffle(words)
        out.append({"text": " ".join(words), "label": label})
    return out


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


def build_encoder(base_dir: Path, *, pooler: bool = True) -> Path:
    """A pretrained-style BERT encoder (no head), saved like a downloaded checkpoint."""
    from transformers import BertConfig, BertModel

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    BertModel(config, add_pooling_layer=pooler).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    return base_dir


def train(tmp_path: Path, base: Path, *extra: str):
    data = write_jsonl(tmp_path / "train.jsonl", rows(96, 0))
    evals = write_jsonl(tmp_path / "eval.jsonl", rows(24, 1))
    run_dir = tmp_path / "run"
    trainer = build_trainer(["recipe=lora-classifier", f"model.name_or_path={base}", f"data.path={data}",
                             f"data.eval_split={evals}", "trainer.max_steps=12", "trainer.micro_batch_size=8",
                             "trainer.eval_steps=0", "optim.lr=5e-3", *extra], run_dir)
    assert trainer.train() == 0
    trainer.emit("on_run_end", 0)  # what run_train does next: report, export (merged/)
    return trainer, run_dir


def trained_logits(trainer) -> torch.Tensor:
    model = trainer.acc.unwrap_model(trainer.model).eval()
    enc = trainer.tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cls")
    base = build_encoder(tmp / "encoder")
    trainer, run_dir = train(tmp, base, "export.merge=true")
    return trainer, run_dir, base


def test_final_loads_with_auto_peft_and_keeps_the_label_names(run):
    from peft import AutoPeftModelForSequenceClassification

    trainer, run_dir, base = run
    model = AutoPeftModelForSequenceClassification.from_pretrained(run_dir / "final").eval()
    assert model.config.num_labels == 3
    assert model.config.id2label == {0: "animal", 1: "colour", 2: "sky"}
    enc = trainer.tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        reloaded = model(**enc).logits
    assert torch.allclose(reloaded, trained_logits(trainer), atol=1e-5)
    # The base is the source's weights (a hard link here: same filesystem), not a copy.
    linked = run_dir / "base_model" / "model.safetensors"
    assert os.stat(linked).st_ino == os.stat(base / "model.safetensors").st_ino


@pytest.mark.parametrize("folder", ["final", "merged"])
def test_pipeline_returns_the_label_names(run, folder):
    from transformers import pipeline

    trainer, run_dir, _ = run
    pipe = pipeline("text-classification", model=str(run_dir / folder), device="cpu")
    predicted = [p["label"] for p in pipe(TEXTS)]
    expected = [trainer.acc.unwrap_model(trainer.model).config.id2label[int(i)]
                for i in trained_logits(trainer).argmax(-1)]
    assert predicted == expected and set(predicted) <= {"animal", "colour", "sky"}


def test_final_readme_is_the_project_card(run):
    _, run_dir, _ = run
    card = (run_dir / "final" / "README.md").read_text()
    assert "More Information Needed" not in card
    assert "recipe `lora-classifier`" in card and "## Training hyperparameters" in card
    assert "pipeline_tag: text-classification" in card


def test_a_source_without_every_base_tensor_is_saved_whole(tmp_path):
    """No pooler in the source: transformers initialises it at load time, randomly, so linking the
    source would reload a different pooler; the whole base is saved instead and reloads exactly."""
    from peft import AutoPeftModelForSequenceClassification

    base = build_encoder(tmp_path / "encoder", pooler=False)
    trainer, run_dir = train(tmp_path, base)
    saved = run_dir / "base_model" / "model.safetensors"
    assert os.stat(saved).st_ino != os.stat(base / "model.safetensors").st_ino
    model = AutoPeftModelForSequenceClassification.from_pretrained(run_dir / "final").eval()
    enc = trainer.tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(model(**enc).logits, trained_logits(trainer), atol=1e-5)


def test_pushed_adapter_and_card_name_the_hub_base(tmp_path):
    from finetune.model.builtin import hub_id
    from finetune.outputs.hub import portable_adapter_config
    from finetune.outputs.model_card import label_kwargs

    assert hub_id("builtin:all-minilm-l6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_id("builtin:tiny-bert") is None and hub_id(str(tmp_path)) is None
    assert hub_id("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    run_dir = tmp_path / "run"
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("model:\n  name_or_path: builtin:all-minilm-l6-v2\n")
    path = run_dir / "final" / "adapter_config.json"
    path.write_text(json.dumps({"base_model_name_or_path": str(run_dir / "base_model"), "r": 8}))
    pushed = json.loads(portable_adapter_config(run_dir, path))
    assert pushed == {"base_model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2", "r": 8}
    # The card's snippet for the Hub repo passes the labels the Hub base's config lacks; they load.
    kwargs = label_kwargs({"0": "animal", "1": "sky"})
    assert kwargs == (", num_labels=2, id2label={0: 'animal', 1: 'sky'}, label2id={'animal': 0, 'sky': 1}")

"""``data.packing=true`` for sequence classification is a layout change only.

The same examples of uneven lengths, padded (one row each, attention mask) and packed (one row,
no padding; finetune/tasks/packed_classification.py), give the same logits, loss sum, gradients
and accuracy: BERT (LoRA and full), RoBERTa (positions offset by padding_idx + 1) and a Llama
classifier (score at each example's last token). A CLI run with data.packing=true has the per-step
losses of the unpacked run. Other model types are a one-line config error.
"""

from __future__ import annotations

import copy
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_helpers import read_metrics, run_cli  # noqa: E402

from finetune.data.packing import Collator  # noqa: E402
from finetune.errors import ConfigError  # noqa: E402
from finetune.tasks import packed_classification  # noqa: E402
from finetune.tasks.classification import SequenceClassificationTask  # noqa: E402

LENGTHS = [5, 17, 3, 11, 9, 2, 14]  # uneven, one of length 2 ([CLS] x [SEP]-like)
NUM_LABELS = 3
VOCAB = 60


def _task(packing: bool) -> SequenceClassificationTask:
    return SequenceClassificationTask(OmegaConf.create({"data": {"packing": packing}}))


def _examples(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(LENGTHS):
        ids = torch.randint(3, VOCAB, (n,), generator=g).numpy()
        out.append({"input_ids": ids, "labels": np.full(n, -100), "position_ids": np.arange(n),
                    "class_label": i % NUM_LABELS})
    return out


def _bert(dropout: float = 0.0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, num_labels=NUM_LABELS,
                        pad_token_id=0, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    config._attn_implementation = "sdpa"
    return BertForSequenceClassification(config)


def _roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64, num_labels=NUM_LABELS,
                           pad_token_id=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config._attn_implementation = "sdpa"
    return RobertaForSequenceClassification(config)


def _llama():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from finetune.model import attention

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         num_labels=NUM_LABELS, pad_token_id=0)
    # What finetune/model/load.py builds for sdpa + packing: the packed causal attention.
    config._attn_implementation = attention.implementation("sdpa", True)
    return LlamaForSequenceClassification(config)


def _lora(model, targets):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="SEQ_CLS")
    model = get_peft_model(model, lora)
    with torch.no_grad():  # LoRA B starts at zero: make the adapter matter for the comparison
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def _pair(build, lora_targets=None):
    """(padded model, packed model): the same weights, the packed one with the packed forward."""
    padded = build()
    packed = copy.deepcopy(padded)
    packed_classification.install(packed)
    if lora_targets:
        torch.manual_seed(1)
        padded = _lora(padded, lora_targets)
        torch.manual_seed(1)
        packed = _lora(packed, lora_targets)
    return padded, packed


def _step(task, model, batch):
    """Loss sum, logits and gradients of one train step (as the loop calls the task)."""
    model.zero_grad()
    loss, logits = task._forward(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), logits.detach(), grads


def _compare(build, lora_targets=None, pad_id=0):
    padded_model, packed_model = _pair(build, lora_targets)
    rows = _examples()
    padded_batch = Collator(pad_id, False)(rows)
    packed_batch = _task(True).collator(None)(rows)
    assert packed_batch["input_ids"].shape == (1, sum(LENGTHS))  # one row, no padding
    assert packed_batch["num_tokens"] == padded_batch["num_tokens"]
    loss_a, logits_a, grads_a = _step(_task(False), padded_model, padded_batch)
    loss_b, logits_b, grads_b = _step(_task(True), packed_model, packed_batch)
    assert logits_b.shape == (len(LENGTHS), NUM_LABELS)
    torch.testing.assert_close(logits_b, logits_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=0)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-5, msg=name)
    _, sums_a = _task(False).eval_sums(padded_model, padded_batch)
    _, sums_b = _task(True).eval_sums(packed_model, packed_batch)
    assert sums_a == sums_b
    return padded_model, packed_model, padded_batch, packed_batch


def test_bert_full_packed_equals_padded():
    _compare(_bert)


def test_bert_lora_packed_equals_padded():
    _compare(_bert, ["query", "key", "value", "dense"])


def test_bert_eval_mode_with_dropout_and_eager_mask():
    """Dropout 0.3 in the config, model.eval(): equal; then eager (block-diagonal additive mask)."""
    padded, packed = _pair(lambda: _bert(dropout=0.3), ["query", "value"])
    padded.eval(), packed.eval()
    rows = _examples(1)
    with torch.no_grad():
        _, a = _task(False)._forward(padded, Collator(0, False)(rows))
        _, b = _task(True)._forward(packed, _task(True).collator(None)(rows))
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        packed.base_model.model.set_attn_implementation("eager")
        _, c = _task(True)._forward(packed, _task(True).collator(None)(rows))
    torch.testing.assert_close(c, a, atol=1e-5, rtol=0)


def test_roberta_packed_equals_padded():
    _compare(_roberta, pad_id=1)


def test_llama_classifier_packed_equals_padded():
    _compare(_llama, ["q_proj", "k_proj", "v_proj", "o_proj"])


def test_unsupported_model_type_is_a_one_line_config_error():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=VOCAB, dim=32, hidden_dim=64,
                                                                 n_layers=1, n_heads=4, num_labels=3))
    with pytest.raises(ConfigError) as err:
        packed_classification.install(model)
    message = str(err.value)
    assert "\n" not in message and "data.packing" in message and "'distilbert'" in message


# ----------------------------------------------------------------------------------- CLI run
WORDS = {"animal": ["cat", "dog", "horse"], "sky": ["sun", "moon", "star"], "colour": ["red", "blue", "green"]}
FILLER = ["the", "a", "is", "this", "that", "big", "small", "good", "fast", "slow", "very", "so"]


def _write(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        label = rng.choice(sorted(WORDS))
        words = [rng.choice(FILLER) for _ in range(rng.randint(1, 12))] + [rng.choice(WORDS[label])]
        rng.shuffle(words)
        lines.append(json.dumps({"text": " ".join(words), "label": label}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _encoder(base_dir: Path) -> Path:
    """A pretrained-style BERT without dropout (so packed and padded runs can match exactly)."""
    from fakehub.tiny_models import build_tokenizer
    from transformers import BertConfig, BertModel

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    return base_dir


def test_cli_packed_run_has_the_unpacked_losses(tmp_path):
    base = _encoder(tmp_path / "encoder")
    data, evals = _write(tmp_path / "train.jsonl", 64, 0), _write(tmp_path / "eval.jsonl", 20, 1)
    runs = {}
    for packing in ("false", "true"):
        out = tmp_path / f"run-{packing}"
        run_cli(["recipe=lora-classifier", f"model.name_or_path={base}", f"data.path={data}",
                 f"data.eval_split={evals}", f"data.packing={packing}", "trainer.max_steps=8",
                 "trainer.micro_batch_size=8", "trainer.log_steps=1", "trainer.eval_steps=4",
                 "trainer.save_steps=0", "optim.lr=5e-3", "optim.warmup_steps=0", f"output_dir={out}"], check=True)
        runs[packing] = read_metrics(out)
    loss = {k: [r["loss"] for r in rows if "loss" in r and "step" in r] for k, rows in runs.items()}
    assert len(loss["true"]) == 8
    np.testing.assert_allclose(loss["true"], loss["false"], atol=1e-5, rtol=0)
    acc = {k: [r["eval_accuracy"] for r in rows if "eval_accuracy" in r] for k, rows in runs.items()}
    assert acc["true"] and acc["true"] == acc["false"]

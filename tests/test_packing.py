"""Packing: placement, efficiency, and that a packed example computes exactly what it does alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_helpers import alpaca_rows, make_cfg, write_jsonl
from transformers import LlamaConfig, LlamaForCausalLM

from finetune.model import attention
from finetune.model.builtin import tiny_chat_tokenizer
from finetune.data import prepare_data
from finetune.data.packing import Collator, TokenRows, pack_examples
from finetune.data.tokenize import IGNORE, Encoded
from finetune.tasks.causal_lm import causal_lm_loss_sum, count_targets, shifted_targets

VOCAB = 97


def alpaca_like_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Log-normal token counts clipped to 20..500 (alpaca's prompt+response: median ~120)."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=4.8, sigma=0.7, size=n), 20, 500).astype(np.int64)


def test_every_example_is_placed_once_within_capacity():
    lengths = alpaca_like_lengths(3000)
    bins = pack_examples(lengths, 1024)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))
    assert max(int(lengths[b].sum()) for b in bins) <= 1024
    assert bins == pack_examples(lengths, 1024)  # deterministic
    with pytest.raises(ValueError, match="row capacity"):
        pack_examples(np.array([5, 2000]), 1024)


@pytest.mark.parametrize("capacity", [1024, 2048])
def test_packing_efficiency_on_an_alpaca_like_distribution(capacity):
    lengths = alpaca_like_lengths(5000)
    bins = pack_examples(lengths, capacity)
    efficiency = lengths.sum() / (len(bins) * capacity)
    print(f"packing efficiency, capacity {capacity}: {efficiency:.4f} ({len(bins)} rows)")
    assert efficiency > 0.95


def test_packing_efficiency_is_reported_in_the_stats(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(300))
    cfg = make_cfg(f"data.path={path}", "data.packing=true", "data.max_seq_len=256",
                   "data.eval_size=0", "data.eval_split=null", cache_dir=tmp_path / "cache")
    data = prepare_data(cfg, tiny_chat_tokenizer())
    pack = data.stats["packing"]["train"]
    real = int(data.train.encoded.lengths().sum())
    assert pack["rows"] == len(data.train)
    assert pack["packing_efficiency"] == pytest.approx(real / (len(data.train) * 256))
    assert pack["packing_efficiency"] > 0.95


ATTNS = ["eager", "sdpa", "packed"]  # packed: finetune/attention.py (sdpa + data.packing on CPU)


def _tiny_llama(attn: str) -> LlamaForCausalLM:
    attn = attention.register() if attn == "packed" else attn
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


def _examples() -> Encoded:
    rng = np.random.default_rng(1)
    ids, labels = [], []
    for n, prompt in ((9, 4), (14, 6), (6, 2), (11, 5)):
        x = rng.integers(1, VOCAB, size=n).tolist()
        ids.append(x)
        labels.append([IGNORE] * prompt + x[prompt:])
    return Encoded.from_lists(ids, labels)


def _alone(model, ids: np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(ids, dtype=torch.long)[None]
    return model(input_ids=x, use_cache=False).logits[0]


@pytest.mark.parametrize("attn", ATTNS)
def test_packed_logits_equal_each_example_alone(attn):
    model, enc = _tiny_llama(attn), _examples()
    rows = TokenRows(enc, [[0, 1, 2, 3]])
    batch = Collator(pad_id=0, packed=True, pad_to=48)([rows[0]])
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits[0]
        start = 0
        for i in range(len(enc)):
            ids, _ = enc.example(i)
            diff = (packed[start:start + len(ids)] - _alone(model, ids)).abs().max().item()
            assert diff < 1e-5, f"example {i}: packed logits differ by {diff}"
            start += len(ids)


@pytest.mark.parametrize("attn", ATTNS)
def test_an_attention_mask_on_a_packed_row_leaks_across_examples(attn):
    """The trap the packed path avoids: with a mask of ones, later examples see earlier ones."""
    model, enc = _tiny_llama(attn), _examples()
    batch = Collator(pad_id=0, packed=True)([TokenRows(enc, [[0, 1]])[0]])
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False).logits[0]
        first = len(enc.example(0)[0])
        diff = (leaky[first:] - _alone(model, enc.example(1)[0])).abs().max().item()
    assert diff > 1e-3


@pytest.mark.parametrize("attn", ATTNS)
def test_loss_per_target_token_is_identical_packed_and_unpacked(attn):
    model, enc = _tiny_llama(attn), _examples()
    packed = Collator(pad_id=0, packed=True)([TokenRows(enc, [[0, 1], [2, 3]])[r] for r in range(2)])
    unpacked_rows = TokenRows(enc)
    unpacked = Collator(pad_id=0, packed=False)([unpacked_rows[i] for i in range(len(enc))])
    with torch.no_grad():
        loss_packed = causal_lm_loss_sum(model, packed)
        loss_unpacked = causal_lm_loss_sum(model, unpacked)
        per_example = sum(causal_lm_loss_sum(model, Collator(0, False)([unpacked_rows[i]]))
                          for i in range(len(enc)))
    targets = count_targets(packed)
    assert targets == count_targets(unpacked) == int((enc.labels != IGNORE).sum())
    # No target crosses an example boundary: each example's first label is IGNORE.
    assert int((shifted_targets(packed["labels"]) != IGNORE).sum()) == targets
    assert abs(loss_packed.item() / targets - loss_unpacked.item() / targets) < 1e-5
    assert abs(loss_packed.item() / targets - per_example.item() / targets) < 1e-5


def test_packed_attention_takes_the_per_example_path_with_sdpa_gradients(monkeypatch):
    """The per-example path is taken for a packed batch and gives sdpa's loss and gradients;
    padded (unpacked) batches fall back to sdpa itself."""
    enc = _examples()
    packed = Collator(pad_id=0, packed=True, pad_to=24)([TokenRows(enc, [[0, 2], [1]])[r] for r in range(2)])
    taken = []
    real = attention._segment_lengths
    monkeypatch.setattr(attention, "_segment_lengths", lambda *a: taken.append(real(*a)) or taken[-1])
    grads = {}
    for attn in ("sdpa", "packed"):
        model = _tiny_llama(attn).train()
        loss = causal_lm_loss_sum(model, packed)
        loss.backward()
        grads[attn] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert taken and all(t == [[9, 6, 9], [14, 10]] for t in taken)  # 2 layers x forward
    assert abs(grads["sdpa"][0] - grads["packed"][0]) < 1e-5
    for name, g in grads["sdpa"][1].items():
        assert (g - grads["packed"][1][name]).abs().max().item() < 1e-5, name
    taken.clear()
    rows = TokenRows(enc)
    padded = Collator(pad_id=0, packed=False)([rows[i] for i in range(len(enc))])
    with torch.no_grad():
        a = causal_lm_loss_sum(_tiny_llama("sdpa"), padded)
        b = causal_lm_loss_sum(_tiny_llama("packed"), padded)
    assert taken and all(t is None for t in taken) and a.item() == b.item()

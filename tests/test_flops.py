"""The FLOP count behind ``mfu`` (finetune/train/flops.py) against torch's own count of a real step.

``torch.utils.flop_counter.FlopCounterMode`` counts the matmuls a forward + backward really runs
(eager attention: full n x n scores, so the counter is built with ``causal=False`` here). Full
fine-tuning must match it exactly. LoRA: autograd skips the input gradient of the layer-0 q/k/v
projections (their input, the frozen embedding's output, needs none), which the count does not
model; the test adds that term back by hand and then requires equality.
"""

from __future__ import annotations

import pytest
import torch

from finetune.data.packing import Collator, TokenRows, pack_examples
from finetune.data.tokenize import IGNORE, Encoded
from finetune.tasks.causal_lm import causal_lm_loss_sum
from finetune.train.flops import FlopCounter, example_lengths, measured_peak

VOCAB = 97
LENGTHS = [(9, 4), (17, 10), (5, 2), (12, 1)]  # (tokens, masked prompt)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="eager").train()


def padded_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    ids, labels = [], []
    for n, prompt in LENGTHS:
        toks = torch.randint(2, VOCAB, (n,), generator=g).tolist()
        ids.append(toks)
        labels.append([IGNORE] * prompt + toks[prompt:])
    enc = Encoded.from_lists(ids, labels)
    rows = TokenRows(enc)
    return Collator(pad_id=0, packed=False)([rows[i] for i in range(len(rows))])


def counted(model, batch) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    inputs = {k: v for k, v in batch.items() if k != "num_tokens"}
    with FlopCounterMode(display=False) as mode:
        causal_lm_loss_sum(model, inputs, chunked=False).backward()
    return mode.get_total_flops()


def attention_by_hand(model, batch) -> int:
    """Eager attention over every row's padded length: QK^T and AV, forward and backward."""
    c = model.config
    n = batch["input_ids"].shape[1]
    return 3 * 2 * 2 * n * n * c.hidden_size * c.num_hidden_layers * batch["input_ids"].shape[0]


def test_full_fine_tuning_count_equals_torchs():
    model, batch = tiny_llama(), padded_batch()
    ours = FlopCounter(model, causal=False)
    assert ours.head_trains and ours.weight_grad == ours.body_forward
    n = batch["input_ids"].shape[1]
    # every position of a padded row runs through the body (the counter counts real tokens only)
    rows = batch["input_ids"].shape[0]
    head = int((batch["labels"][:, 1:] != IGNORE).sum())
    body_and_head = ours.step(rows * n, head, 0.0)
    assert counted(model, batch) == body_and_head + attention_by_hand(model, batch)


def test_lora_count_equals_torchs_but_for_the_first_layers_input_gradient():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    batch = padded_batch()
    ours = FlopCounter(model, causal=False)
    c = model.config
    h, kv = c.hidden_size, c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    # weight gradients: lora_A (h -> 4) and lora_B (4 -> h | kv) of q and v in each layer, nothing else
    assert ours.weight_grad == c.num_hidden_layers * 2 * 4 * (h + h + h + kv)
    assert not ours.head_trains
    rows, n = batch["input_ids"].shape
    head = int((batch["labels"][:, 1:] != IGNORE).sum())
    # Layer 0 takes the frozen embedding's output: autograd computes no input gradient for its q, k,
    # v base weights and q's and v's lora_A, and none for K in Q K^T (k_proj has no adapter there).
    skipped = 2 * rows * n * (h * h + 2 * h * kv + 2 * h * 4) + 2 * rows * n * n * h
    assert counted(model, batch) == ours.step(rows * n, head, 0.0) - skipped + attention_by_hand(model, batch)


def test_example_lengths_of_packed_and_padded_batches():
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n, _ in LENGTHS]
    enc = Encoded.from_lists(ids, [list(x) for x in ids])
    packed_rows = TokenRows(enc, pack_examples(enc.lengths(), 32))
    packed = Collator(pad_id=0, packed=True)([packed_rows[i] for i in range(len(packed_rows))])
    assert "attention_mask" not in packed and len(packed_rows) < len(LENGTHS)
    assert sorted(example_lengths(packed).tolist()) == sorted(n for n, _ in LENGTHS)
    assert example_lengths(padded_batch()).tolist() == [n for n, _ in LENGTHS]
    # causal attention counts half the square of each example, not of the packed row
    counter = FlopCounter(tiny_llama())
    c = counter.attention_per_n2
    assert c == 4 * 2 * 4 * 8 * 0.5
    head = int((packed["labels"][:, 1:] != IGNORE).sum())
    tokens, squares = sum(n for n, _ in LENGTHS), sum(n * n for n, _ in LENGTHS)
    assert counter.batch(packed) == counter.step(tokens, head, squares)
    assert counter.batch(packed) - counter.step(tokens, head, 0) == 3 * c * squares


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measured_peak_leaves_the_random_state_alone(dtype):
    state = torch.get_rng_state()
    peak = measured_peak([(64, 64), (64, 128)], 256, dtype, budget_s=0.01)
    assert peak > 1e6 and torch.equal(torch.get_rng_state(), state)

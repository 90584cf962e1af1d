"""The label-only logits path equals the full-logits reference, in loss and in gradients.

``causal_lm_loss_sum`` asks the model for logits only where a target exists (boolean
``logits_to_keep``); ``causal_lm_loss_sum_full`` projects every position. Both must give the same
summed loss and the same gradients, for padded (attention mask) and packed (position ids, no
mask) batches, with eager and sdpa attention. A tiny Llama built in code; float64 so that 1e-5
measures the paths, not float32 rounding.
"""

from __future__ import annotations

import pytest
import torch

from finetune.data.packing import Collator, TokenRows, pack_examples
from finetune.data.tokenize import IGNORE, Encoded
from finetune.loss import causal_lm_loss_sum, causal_lm_loss_sum_full

VOCAB = 97


def tiny_llama(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=attn, dtype=torch.float64)
    return model.train()


def examples() -> Encoded:
    """Variable lengths, a masked prompt of varying size, first token never a target."""
    g = torch.Generator().manual_seed(1)
    ids, labels = [], []
    for n, prompt in [(9, 4), (17, 10), (5, 2), (12, 1), (23, 15), (7, 6), (14, 3)]:
        toks = torch.randint(2, VOCAB, (n,), generator=g).tolist()
        lab = [IGNORE] * prompt + toks[prompt:]
        lab[0] = IGNORE
        ids.append(toks)
        labels.append(lab)
    return Encoded.from_lists(ids, labels)


def batch(packed: bool) -> dict:
    enc = examples()
    if packed:
        rows = TokenRows(enc, pack_examples(enc.lengths(), 32))
    else:
        rows = TokenRows(enc)
    out = Collator(pad_id=0, packed=packed)([rows[i] for i in range(len(rows))])
    out.pop("num_tokens")
    if packed:
        assert "attention_mask" not in out and len(rows) < len(enc)  # really packed
    return out


def loss_and_grads(model, fn, b: dict):
    model.zero_grad(set_to_none=True)
    loss = fn(model, b)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_label_only_logits_match_full_logits(attn, packed):
    model, b = tiny_llama(attn), batch(packed)
    fast_loss, fast_grads = loss_and_grads(model, causal_lm_loss_sum, b)
    ref_loss, ref_grads = loss_and_grads(model, causal_lm_loss_sum_full, b)
    assert torch.isfinite(ref_loss) and ref_loss > 0
    assert abs(float(fast_loss - ref_loss)) <= 1e-5 * max(1.0, abs(float(ref_loss)))
    assert fast_grads.keys() == ref_grads.keys() and len(ref_grads) > 0
    for name, ref in ref_grads.items():
        torch.testing.assert_close(fast_grads[name], ref, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@torch.no_grad()
def test_packed_loss_equals_examples_one_by_one(attn):
    """Packing isolates examples: the packed loss sum is the sum of each example's own loss."""
    model = tiny_llama(attn)
    enc = examples()
    single = Collator(pad_id=0, packed=False)
    alone = sum(float(causal_lm_loss_sum_full(model, single([TokenRows(enc)[i]])))
                for i in range(len(enc)))
    packed = float(causal_lm_loss_sum(model, batch(packed=True)))
    assert abs(packed - alone) <= 1e-5 * abs(alone)

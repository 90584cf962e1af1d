"""The label-only logits path equals the full-logits reference, in loss and in gradients.

``causal_lm_loss_sum`` asks the model for logits only where a target exists (boolean
``logits_to_keep``) and, for a plain LM head, runs head + cross-entropy in chunks that keep no
logits (finetune/model/linear_cross_entropy.py); ``causal_lm_loss_sum_full`` projects every position.
All must give the same summed loss and the same gradients, for padded (attention mask) and packed
(position ids, no mask) batches, with eager and sdpa attention, trained and frozen heads. A tiny
Llama built in code; float64 so that 1e-5 measures the paths, not float32 rounding.
"""

from __future__ import annotations

import pytest
import torch

from finetune.data.packing import Collator, TokenRows, pack_examples
from finetune.data.tokenize import IGNORE, Encoded
from finetune.model import linear_cross_entropy
from finetune.model.linear_cross_entropy import linear_cross_entropy_sum, plain_lm_head
from finetune.tasks.causal_lm import causal_lm_loss_sum, causal_lm_loss_sum_full

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
def test_label_only_logits_match_full_logits(attn, packed, monkeypatch):
    monkeypatch.setattr(linear_cross_entropy, "CHUNK_ELEMENTS", 7 * VOCAB)  # 7 targets a chunk
    model, b = tiny_llama(attn), batch(packed)
    assert plain_lm_head(model) is model.lm_head  # the chunked head + loss is what is compared
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


@pytest.mark.parametrize("chunk", [1, 5, 64, None])
@pytest.mark.parametrize("train_head", [True, False], ids=["head-trains", "head-frozen"])
def test_chunked_head_and_loss_equal_plain_cross_entropy(chunk, train_head):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(23, 16, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(VOCAB, 16, generator=g, dtype=torch.float64).requires_grad_(train_head)
    targets = torch.randint(0, VOCAB, (23,), generator=g)
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight), targets,
                                            reduction="sum")
    ref_grads = torch.autograd.grad(ref * 0.37, [hidden, weight] if train_head else [hidden])
    got = linear_cross_entropy_sum(hidden, weight, targets, chunk)
    got_grads = torch.autograd.grad(got * 0.37, [hidden, weight] if train_head else [hidden])
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # eval: loss only
        torch.testing.assert_close(linear_cross_entropy_sum(hidden, weight, targets, chunk), ref.detach())


def test_lora_model_with_tied_head_takes_the_chunked_path_with_equal_gradients(monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=True)
    base = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float64)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False)).train()
    assert plain_lm_head(model) is base.lm_head and not base.lm_head.weight.requires_grad
    monkeypatch.setattr(linear_cross_entropy, "CHUNK_ELEMENTS", 3 * VOCAB)
    b = batch(packed=True)
    fast_loss, fast = loss_and_grads(model, causal_lm_loss_sum, b)
    ref_loss, ref = loss_and_grads(model, lambda m, x: causal_lm_loss_sum(m, x, chunked=False), b)
    assert fast.keys() == ref.keys() and all("lora_" in n for n in ref)
    # the plain path's cross-entropy runs in float32 (.float()), the chunked one in float64
    assert abs(float(fast_loss - ref_loss)) <= 1e-6 * abs(float(ref_loss))
    for name, g in ref.items():
        torch.testing.assert_close(fast[name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert base.lm_head.forward.__func__ is torch.nn.Linear.forward  # the stand-in was removed


def test_a_head_peft_trains_whole_takes_the_chunked_path_with_equal_gradients(monkeypatch):
    """modules_to_save=[lm_head, embed_tokens] (the built-in model's LoRA): the chunked path finds
    the copy that trains, or the original while the adapter is disabled (DPO's reference pass), and
    its loss, per-sequence log-probs and gradients equal the plain path's (float64)."""
    from peft import LoraConfig, get_peft_model

    from finetune.tasks.preference import completion_logps

    base = tiny_llama("sdpa")
    original = base.lm_head
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            modules_to_save=["lm_head", "embed_tokens"],
                                            init_lora_weights=False)).train()
    head = plain_lm_head(model)
    assert head is not None and head is not original and head.weight.requires_grad
    with torch.no_grad():  # the trained copy moved away from the original
        head.weight.add_(0.05 * torch.randn_like(head.weight))
    monkeypatch.setattr(linear_cross_entropy, "CHUNK_ELEMENTS", 5 * VOCAB)
    b = batch(packed=True)
    fast_loss, fast = loss_and_grads(model, causal_lm_loss_sum, b)
    ref_loss, ref = loss_and_grads(model, lambda m, x: causal_lm_loss_sum(m, x, chunked=False), b)
    assert any("modules_to_save" in n and "lm_head" in n for n in ref)  # the head's copy got a gradient
    assert fast.keys() == ref.keys()
    assert abs(float(fast_loss - ref_loss)) <= 1e-6 * abs(float(ref_loss))
    for name, g in ref.items():  # the plain path's cross-entropy runs in float32: its rounding, not ours
        assert float((fast[name] - g).abs().max()) <= 1e-6 * float(g.abs().max()), name
    assert head.forward.__func__ is torch.nn.Linear.forward  # the stand-in was removed
    with torch.no_grad():
        with model.disable_adapter():
            assert plain_lm_head(model) is original
            got, count = completion_logps(model, b, chunked=True)
            want, want_count = completion_logps(model, b, chunked=False)
        enabled, _ = completion_logps(model, b, chunked=True)
    assert torch.equal(count, want_count.to(count.dtype))
    torch.testing.assert_close(got, want.double(), rtol=1e-6, atol=0)  # the plain path in float32
    assert float((got - enabled).abs().min()) > 1e-3  # the original head, not the trained copy


def test_heads_it_cannot_stand_in_for_take_the_plain_path():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama("sdpa")
    model.config.model_type = "granite"  # divides the logits after the head
    assert plain_lm_head(model) is None
    model = tiny_llama("sdpa")
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert plain_lm_head(model) is None  # an adapter on the head


# The built-in tiny Llama's LoRA also trains embed_tokens + lm_head (modules_to_save: the README's
# default run); "lora-llm" keeps the head frozen, as a pretrained model's would be.
@pytest.mark.parametrize("recipe", [["recipe=lora-llm", "model.lora_modules_to_save=[]"], ["recipe=lora-llm"],
                                    ["recipe=full-llm"]], ids=["lora-llm", "lora-llm-head-trained", "full-llm"])
def test_training_with_the_chunked_loss_on_and_off_follows_the_same_losses(tmp_path, recipe):
    """trainer.chunked_loss: auto (on, on CPU) and off train the same run, loss for loss."""
    from run_helpers import build_trainer, run_cli, train_losses

    for mode, chunked in (("auto", True), ("off", False)):  # what each run below trains with
        trainer = build_trainer([*recipe, f"trainer.chunked_loss={mode}"], tmp_path / f"setup-{mode}")
        assert plain_lm_head(trainer.model) is not None
        assert trainer.task.chunked == chunked
    runs = {}
    for mode in ("auto", "off"):
        run_dir = tmp_path / mode
        run_cli([*recipe, f"trainer.chunked_loss={mode}", "trainer.max_steps=8",
                 "trainer.log_steps=1", "trainer.eval_steps=0", "trainer.save_steps=0",
                 "trainer.sample_prompts=0", "trainer.progress=false", "logger.plots=false",
                 f"output_dir={run_dir}"], timeout=300, check=True)
        runs[mode] = train_losses(run_dir)
    assert len(runs["auto"]) == 8 and [s for s, _ in runs["auto"]] == [s for s, _ in runs["off"]]
    for (_, a), (_, b) in zip(runs["auto"], runs["off"]):
        assert abs(a - b) <= 1e-4 * abs(b), (runs["auto"], runs["off"])


def test_chunked_loss_under_autocast_with_hidden_states_in_another_dtype():
    """bf16 autocast, fp32 head, bf16 hidden states: runs, and matches the plain path's rounding."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(1000, 64, generator=g).requires_grad_()
    hidden = torch.randn(50, 64, generator=g).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 1000, (50,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy_sum(hidden, weight, targets, 7)
        ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight).float(), targets,
                                                reduction="sum")
    got_grads, ref_grads = torch.autograd.grad(got, [hidden, weight]), torch.autograd.grad(ref, [hidden, weight])
    assert got_grads[0].dtype == torch.bfloat16 and got_grads[1].dtype == torch.float32
    assert abs(float(got.detach()) - float(ref.detach())) <= 1e-4 * abs(float(ref.detach()))
    for a, b in zip(got_grads, ref_grads):
        assert float((a.float() - b.float()).norm() / b.float().norm()) < 1e-2


@pytest.mark.parametrize("head_trains", [False, True])
def test_chunked_token_logprobs_equal_float64_formula(head_trains):
    """linear_token_logprobs (DPO's per-token log-probs): values and gradients, with any per-token
    upstream gradient, equal log_softmax(h W^T)[t] in float64; chunks smaller than the rows."""
    from finetune.model.linear_cross_entropy import linear_token_logprobs

    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=head_trains)
    t = torch.randint(0, 50, (37,))
    g = torch.randn(37, dtype=torch.float64)
    got = linear_token_logprobs(h, w, t, chunk=7)
    (got * g).sum().backward()
    got_h, got_w = h.grad.clone(), w.grad.clone() if head_trains else None
    h.grad = w.grad = None
    want = torch.log_softmax(h @ w.T, -1).gather(1, t[:, None])[:, 0]
    (want * g).sum().backward()
    assert torch.allclose(got, want, atol=1e-12) and torch.allclose(got_h, h.grad, atol=1e-12)
    if head_trains:
        assert torch.allclose(got_w, w.grad, atol=1e-12)

"""Selective activation checkpointing (``model.checkpoint_every``): the chosen layers recompute their
forward in backward, the others do not, and the loss and gradients are those of no checkpointing."""

from __future__ import annotations

import pytest
import torch

from finetune.model.checkpointing import checkpoint_every, checkpointed_layers
from run_helpers import run_cli

LAYERS = 5


def lora_llama():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None, attention_dropout=0.1)
    base = LlamaForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float64)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    return base, model.train()


def step(k: int | None):
    """Loss, gradients and the number of attention forwards per layer of one forward + backward."""
    base, model = lora_llama()
    if k is not None:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
        checkpoint_every(base, k)
    calls = [0] * LAYERS
    for i, layer in enumerate(base.model.layers):  # inside the checkpointed forward: runs again on recompute
        layer.self_attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = torch.randint(2, 61, (3, 17), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the dropout masks
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, calls


@pytest.mark.parametrize("k,recomputed", [(1, [0, 1, 2, 3, 4]), (2, [0, 2, 4]), (3, [0, 3]), (9, [0])])
def test_every_kth_layer_recomputes_and_the_gradients_stay(k, recomputed):
    ref_loss, ref_grads, ref_calls = step(None)
    assert ref_calls == [1] * LAYERS
    loss, grads, calls = step(k)
    assert calls == [2 if i in recomputed else 1 for i in range(LAYERS)]
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) == 4 * LAYERS
    for name, g in ref_grads.items():  # the recompute replays the same dropout masks
        torch.testing.assert_close(grads[name], g, rtol=1e-12, atol=1e-14, msg=name)


def test_without_gradient_checkpointing_no_layer_recomputes():
    base, _ = lora_llama()
    assert len(checkpointed_layers(base)) == LAYERS
    assert checkpoint_every(base, 2) == []


def test_the_setting_needs_gradient_checkpointing_and_a_run_logs_its_layers(tmp_path):
    bad = run_cli(["recipe=lora-llm", "model.checkpoint_every=2", f"output_dir={tmp_path / 'bad'}"])
    assert bad.returncode == 2
    assert "model.checkpoint_every=2 picks the layers that gradient checkpointing recomputes: set " \
           "model.gradient_checkpointing=true too" in bad.stderr
    assert "Traceback" not in bad.stderr
    ok = run_cli(["recipe=lora-llm", "model.gradient_checkpointing=true", "model.checkpoint_every=2",
                  "trainer.max_steps=2", "trainer.sample_prompts=0", "trainer.exact_match_prompts=0",
                  "trainer.eval_steps=0", f"output_dir={tmp_path / 'ok'}"], check=True)
    assert "gradient checkpointing: 2 of 4 layers recompute (model.checkpoint_every=2)" in ok.stdout + ok.stderr

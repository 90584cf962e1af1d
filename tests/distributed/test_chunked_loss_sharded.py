"""The chunked LM head + loss under FSDP2 (2 processes, gloo): taken, and the same losses as the
plain path. FSDP2 keeps the root module's parameters, the head's among them, unsharded from its
forward to its backward, so the chunked loss reads the whole weight and FSDP reduce-scatters its
gradient as usual (finetune/model/linear_cross_entropy.py ``head_weight``). The LoRA run trains the
built-in model's head whole (modules_to_save); the full run trains every weight. ZeRO-3 keeps
the plain path: its head weight is gathered only inside the head's own forward."""

from __future__ import annotations

import pytest

from distributed_runs import COMMON, losses, run, two_procs

assert COMMON[0] == "recipe=lora-llm"
CHUNKED, PLAIN = "LM head + loss: in chunks, no logits kept", "LM head + loss: plain"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("recipe", ["lora-llm", "full-llm"])
def test_fsdp_takes_the_chunked_path_with_the_plain_paths_losses(tmp_path, recipe):
    got = {}
    for mode in ("auto", "off"):
        out = tmp_path / mode
        proc = run([f"recipe={recipe}", *COMMON[1:], *two_procs("fsdp"), f"trainer.chunked_loss={mode}",
                    f"output_dir={out}"])
        said = proc.stdout + proc.stderr
        assert (CHUNKED if mode == "auto" else PLAIN) in said, said[-3000:]
        got[mode] = losses(out)
    assert sorted(got["auto"]) == sorted(got["off"]) == [1, 2, 3, 4]
    for step, loss in got["off"].items():
        assert abs(got["auto"][step] - loss) <= 1e-4 * abs(loss), (step, got["auto"][step], loss)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero3_keeps_the_plain_path(tmp_path):
    proc = run([*COMMON, *two_procs("zero3"), "trainer.max_steps=1", f"output_dir={tmp_path}"])
    assert PLAIN in proc.stdout + proc.stderr

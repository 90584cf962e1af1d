"""LM head + cross-entropy in chunks, without keeping the logits.

The plain path keeps, per step, the ``(targets, vocab)`` logits, cross-entropy's saved
log-probabilities and, in backward, their gradient: three float32 matrices of 221 MB each for
1,100 targets x 50k vocabulary, more than any other activation of a small model. Here the loss
is computed ``chunk`` targets at a time, and each chunk's gradient with respect to the hidden states
(and the head's weight, when it trains) is computed right away from ``softmax - onehot``; only
those gradients are kept. Same FLOPs as forward + backward of the plain path, no recomputation;
same loss and gradients up to float rounding (tests/test_loss_paths.py).

Used by :func:`finetune.loss.causal_lm_loss_sum` when :func:`plain_lm_head` finds a head it can
stand in for; anything else takes the plain path.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

# Architectures whose causal-LM forward is exactly ``logits = lm_head(hidden[kept])`` (no logit
# scaling or soft-capping after the head: granite, cohere and gemma2 have one and are left out).
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "smollm3", "olmo2"})
CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MiB in float32 (333 targets at a 50k vocabulary)


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = torch.promote_types(weight.dtype, torch.float32)  # bf16/fp16/fp32 -> fp32, fp64 stays
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            # in the weight's dtype: under autocast the hidden states can arrive in another one
            h, t = hidden[start:start + chunk].to(weight.dtype), targets[start:start + chunk]
            logprobs = torch.log_softmax(F.linear(h, weight).to(acc), dim=-1)
            total -= logprobs.gather(1, t[:, None]).sum()
            if need_h or need_w:
                grad = logprobs.exp_()  # softmax, in place
                grad[torch.arange(len(t), device=t.device), t] -= 1.0
                grad = grad.to(weight.dtype)  # the matmuls run in the weight's dtype, as the plain path's
                if need_h:
                    grad_h[start:start + chunk] = grad @ weight
                if need_w and acc == weight.dtype:
                    grad_w.addmm_(grad.t(), h)
                elif need_w:  # bf16/fp16: a bf16 product per chunk (not an fp32 one), summed in fp32
                    grad_w += grad.t() @ h
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype), None, None)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")`` in chunks
    (float64 stays float64).

    hidden ``(n, h)``, weight ``(vocab, h)``, targets ``(n,)``, every one a real class (no -100).
    """
    if chunk is None:
        chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropySum.apply(hidden, weight, targets, chunk)


class _LinearTokenLogprobs(torch.autograd.Function):
    """Per-target log-probabilities ``log_softmax(hidden @ weight.T)[i, targets[i]]`` in chunks.

    Forward keeps, per chunk, only the gradient with respect to the hidden states of each target's
    log-prob (``(onehot - softmax) @ weight``, one row per target); backward scales those rows by
    the incoming per-target gradient. A head that trains (full fine-tuning, untied) recomputes its
    chunks' softmax in backward: its gradient needs the per-target weights, known only then.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(weight.dtype, torch.float32)
        out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        unit_h = torch.empty_like(hidden) if need_h else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk].to(weight.dtype), targets[start:start + chunk]
            logprobs = torch.log_softmax(F.linear(h, weight).to(acc), dim=-1)
            out[start:start + chunk] = logprobs.gather(1, t[:, None])[:, 0]
            if need_h:
                grad = logprobs.exp_().neg_()  # d logp_t / d logits = onehot - softmax
                grad[torch.arange(len(t), device=t.device), t] += 1.0
                unit_h[start:start + chunk] = grad.to(weight.dtype) @ weight
        ctx.save_for_backward(unit_h, hidden if need_w else None, weight if need_w else None, targets)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        unit_h, hidden, weight, targets = ctx.saved_tensors
        grad_h = None if unit_h is None else unit_h * grad_out[:, None].to(unit_h.dtype)
        grad_w = None
        if hidden is not None:
            acc = torch.promote_types(weight.dtype, torch.float32)
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
            for start in range(0, hidden.shape[0], ctx.chunk):
                h, t = hidden[start:start + ctx.chunk].to(weight.dtype), targets[start:start + ctx.chunk]
                grad = torch.softmax(F.linear(h, weight).to(acc), dim=-1).neg_()
                grad[torch.arange(len(t), device=t.device), t] += 1.0
                grad *= grad_out[start:start + ctx.chunk, None].to(acc)
                grad_w += (grad.to(weight.dtype).t() @ h).to(acc)
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int | None = None) -> torch.Tensor:
    """``log_softmax(F.linear(hidden, weight).float())`` at ``targets``, one value per row, in
    chunks that keep no logits (float32; float64 stays float64). Every target a real class."""
    if chunk is None:
        chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearTokenLogprobs.apply(hidden, weight, targets, chunk)


def plain_lm_head(model) -> torch.nn.Linear | None:
    """The model's LM head where the chunked loss can stand in for it, else None.

    Needs: a listed architecture, a bias-free ``nn.Linear`` head that no adapter wraps, and a
    weight that is not partitioned by DeepSpeed ZeRO-3 (FSDP2's is used: :func:`head_weight`).
    Wrappers that only forward (DDP, PEFT, a head that PEFT trains whole: ``modules_to_save``) are
    looked through.
    """
    inner = getattr(model, "module", model)  # DistributedDataParallel
    config = getattr(inner, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    get = getattr(inner, "get_output_embeddings", None)
    head = _running_head(get() if get is not None else None)
    if type(head) is not torch.nn.Linear or head.bias is not None or "forward" in vars(head):
        return None  # a subclass, a bias, or a forward already replaced (accelerate's device hooks)
    weight = head.weight
    if hasattr(weight, "ds_id") or weight.dim() != 2:
        return None  # partitioned by DeepSpeed ZeRO-3: gathered only inside the head's own forward
    return head


def head_weight(head: torch.nn.Linear) -> torch.Tensor:
    """The head's whole weight, read after the model's forward. FSDP2 leaves the root module's
    parameters (the head among them) unsharded from its forward until backward, so this is a plain
    tensor whose gradient FSDP reduce-scatters as usual; a head still sharded (a DTensor) is
    all-gathered, differentiably."""
    weight = head.weight
    return weight.full_tensor() if _is_dtensor(weight) else weight


def _running_head(head):
    """The module a PEFT ``ModulesToSaveWrapper`` (a head trained whole, as the built-in model's LoRA
    does) runs now, chosen as its ``forward`` chooses: the original while adapters are disabled (a
    DPO / GRPO reference pass) or the active adapter has no copy, else the active adapter's copy.
    Any other head is returned as it is."""
    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:  # peft is a dependency; a model without it has no wrapper either
        return head
    if not isinstance(head, ModulesToSaveWrapper):
        return head
    active = head.active_adapters
    if head.disable_adapters or any(a not in head._adapters for a in active):
        return head.original_module
    return head.modules_to_save[active[0]] if len(active) == 1 else None


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(t, DTensor)


@contextlib.contextmanager
def head_passes_hidden_states(head: torch.nn.Module):
    """While inside, ``head(x)`` returns ``x``: the model's "logits" are its kept hidden states."""
    head.forward = lambda x: x
    try:
        yield
    finally:
        del head.forward

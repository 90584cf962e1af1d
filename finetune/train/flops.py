"""Training FLOPs of a step, counted from the model's own linear layers and the batch, and the peak
they are measured against (``mfu`` in metrics.jsonl).

Per non-padding token, every linear layer but the LM head costs ``2 * in * out`` forward and the
same again for the gradient of its input; one whose weight trains costs ``2 * in * out`` more for
its weight gradient (LoRA: only the rank-r ``lora_A`` / ``lora_B`` products; the frozen base
weights get none). The LM head runs at target positions only (``logits_to_keep``; the chunked
loss), ``2 * d * V`` forward and backward for its input, ``2 * d * V`` more when it trains.
Attention: per layer and per example of ``n`` tokens (a packed row's examples counted one by one),
``QK^T`` and ``AV`` cost ``2 * 2 * n^2 / 2 * heads * head_dim`` forward (causal: half the square),
twice that backward. Not counted: norms, activations, softmax, RoPE, the optimizer, a DPO
reference's or GRPO's extra forwards and generation — MFU here is the model's training FLOPs.
``tests/test_flops.py`` checks the count against ``torch.utils.flop_counter`` on a real step.

On CPU the peak is measured at the run's own matmul shapes (:func:`measured_peak`, about 0.3 s
at start, main process); on a GPU it is the device's dense bf16 figure from a table.
"""

from __future__ import annotations

import time

import torch

from finetune.data.tokenize import IGNORE
from finetune.model.linear_cross_entropy import _running_head

CAUSAL_ATTENTION = 0.5  # a causal mask computes half of the n x n scores
# Bidirectional encoders (their classifiers): every token attends to all n of its example.
ENCODER_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2",
                                 "electra", "modernbert", "camembert", "albert", "mpnet"})


class FlopCounter:
    """FLOPs of one training forward + backward of ``model`` on a batch, from its linear layers."""

    def __init__(self, model, causal: bool | None = None):
        inner = _unwrap(model)
        get = getattr(inner, "get_output_embeddings", None)
        outer = get() if get is not None else None  # the head, or PEFT's wrapper of its copies
        head = _running_head(outer)
        head = head if isinstance(head, torch.nn.Linear) else None
        skip = {id(m) for m in outer.modules()} if isinstance(outer, torch.nn.Module) else set()
        active = set(inner.active_adapters) if _is_peft(inner) else set()
        self.body_forward = 0  # FLOPs per token: forward of every linear but the head (x2 multiply-add)
        self.weight_grad = 0  # FLOPs per token of the weight gradients of the linears that train
        self.shapes: list[tuple[int, int]] = []
        for name, m in inner.named_modules():
            if not isinstance(m, torch.nn.Linear) or id(m) in skip:
                continue
            if active and _adapter_of(name) not in (None, *active):
                continue  # an inactive adapter's (GRPO's reference, a loaded SFT copy): not run
            flops = 2 * m.in_features * m.out_features
            self.body_forward += flops
            if m.weight.requires_grad:
                self.weight_grad += flops
            self.shapes.append((m.in_features, m.out_features))
        self.head_forward = 2 * head.in_features * head.out_features if head is not None else 0
        self.head_trains = head is not None and head.weight.requires_grad
        if head is not None:
            self.shapes.append((head.in_features, head.out_features))
        cfg = getattr(inner, "config", None)
        if causal is None:
            causal = getattr(cfg, "model_type", None) not in ENCODER_MODEL_TYPES
        layers = getattr(cfg, "num_hidden_layers", 0) or 0
        heads = getattr(cfg, "num_attention_heads", 0) or 0
        head_dim = getattr(cfg, "head_dim", None) or ((getattr(cfg, "hidden_size", 0) or 0) // max(heads, 1))
        # per layer, per example of n tokens: 2 matmuls x 2 FLOPs x n^2 x heads x head_dim (x 1/2 causal)
        self.attention_per_n2 = 4 * layers * heads * head_dim * (CAUSAL_ATTENTION if causal else 1.0)

    def parts(self, tokens: int, head_positions: int, sum_n2: float) -> dict[str, float]:
        """Forward + backward FLOPs of a micro-batch of ``tokens`` non-padding tokens, the LM head at
        ``head_positions`` and examples whose squared lengths sum to ``sum_n2``, by where they go."""
        return {"linear forward": tokens * self.body_forward, "input gradients": tokens * self.body_forward,
                "weight gradients": tokens * self.weight_grad,
                "head": head_positions * self.head_forward * (3 if self.head_trains else 2),
                "attention": 3 * self.attention_per_n2 * sum_n2}

    def step(self, tokens: int, head_positions: int, sum_n2: float) -> float:
        """The sum of :meth:`parts`."""
        return float(sum(self.parts(tokens, head_positions, sum_n2).values()))

    def batch(self, batch: dict) -> float:
        ids = batch["input_ids"]
        labels = batch.get("labels")
        if labels is not None and labels.shape == ids.shape:
            head_positions = int((labels[:, 1:] != IGNORE).sum())  # the token each position predicts
        else:  # a classifier: one head row per sequence (its head is small; counted as the body's)
            head_positions = 0
        lengths = example_lengths(batch)
        return self.step(int(lengths.sum()), head_positions, float((lengths.double() ** 2).sum()))


def example_lengths(batch: dict) -> torch.Tensor:
    """Token count of each example: packed rows split where ``position_ids`` restart at 0 (a row's
    padding is a segment of its own, with no target: left out), padded rows by ``attention_mask``."""
    ids = batch["input_ids"]
    if "position_ids" in batch and "attention_mask" not in batch:
        pos, labels = batch["position_ids"], batch.get("labels")
        tokens_labels = labels is not None and labels.shape == ids.shape
        out = []
        for r in range(pos.shape[0]):
            starts = (pos[r] == 0).nonzero()[:, 0].tolist() + [pos.shape[1]]
            for a, b in zip(starts[:-1], starts[1:]):
                if not tokens_labels or bool((labels[r, a:b] != IGNORE).any()):
                    out.append(b - a)
        return torch.tensor(out, dtype=torch.long)
    if "attention_mask" in batch:
        return batch["attention_mask"].sum(dim=1).long()
    return torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long)


def measured_peak(shapes: list[tuple[int, int]], tokens: int, dtype: torch.dtype = torch.float32,
                  budget_s: float = 0.05, max_out: int = 1 << 24) -> float:
    """The best FLOP/s this process reaches on ``tokens x in @ in x out`` matmuls of the given
    shapes (each distinct shape timed for about ``budget_s``; at most ``max_out`` output elements,
    so a 50k-vocabulary head is timed on fewer rows), in ``dtype``. Its own generator: the run's
    random state is untouched."""
    best = 0.0
    g = torch.Generator().manual_seed(0)
    for i, o in sorted(set(shapes)):
        rows = max(1, min(tokens, max_out // o))
        a = torch.randn(rows, i, generator=g).to(dtype)
        b = torch.randn(i, o, generator=g).to(dtype)
        a @ b  # warm-up: the kernel's first call
        n, start = 0, time.perf_counter()
        while True:
            a @ b
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= budget_s:
                break
        best = max(best, 2 * rows * i * o * n / elapsed)
    return best


def run_peak_flops(trainer) -> tuple[float | None, str]:
    """(peak FLOP/s of one process, how it was found) for ``mfu``; None where there is none.
    GPU: the device's dense bf16 figure (a table); CPU: measured on the main process at the three
    largest matmul shapes of this model, ``micro_batch_size x max_seq_len`` rows (at most 2,048), in
    the run's compute dtype (bf16 under ``trainer.precision=bf16``)."""
    from finetune.train.metrics import device_peak_flops

    if not trainer.cfg.trainer.mfu:
        return None, "off (trainer.mfu=false)"
    if torch.cuda.is_available():
        peak = device_peak_flops()
        return peak, f"{torch.cuda.get_device_name()} dense bf16" if peak else "unknown for this GPU"
    if not trainer.is_main:
        return None, ""
    dtype = (torch.bfloat16 if trainer.acc.mixed_precision == "bf16"
             else next(_unwrap(trainer.model).parameters()).dtype)
    largest = sorted(set(trainer.flops.shapes), key=lambda s: s[0] * s[1])[-3:]
    tokens = max(64, min(2048, trainer.cfg.trainer.micro_batch_size * trainer.cfg.data.max_seq_len))
    return (measured_peak(largest, tokens, dtype) if largest else None,
            f"measured, {str(dtype).removeprefix('torch.')} matmuls at this model's largest shapes")


def _unwrap(model):
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):  # DDP, torch.compile
        model = getattr(model, "module", None) or model._orig_mod
    return model


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _adapter_of(name: str) -> str | None:
    parts = name.split(".")
    for key in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
        if key in parts and parts.index(key) + 1 < len(parts):
            return parts[parts.index(key) + 1]
    return None

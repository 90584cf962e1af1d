"""Selective activation checkpointing: recompute only every k-th decoder layer in backward.

transformers' ``gradient_checkpointing_enable`` turns it on in every ``GradientCheckpointingLayer``
(a decoder layer, each with its own ``gradient_checkpointing`` flag); :func:`checkpoint_every`
then switches it off again in all but layers ``0, k, 2k, ...``. Those recompute their forward in
backward (keeping only their input); the others keep their activations. Losses and gradients are
the same either way (tests/test_checkpointing.py).
"""

from __future__ import annotations

import torch


def checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def checkpoint_every(model: torch.nn.Module, k: int) -> list[int]:
    """Keep checkpointing on in layers ``i % k == 0`` only; returns their indices."""
    layers = checkpointed_layers(model)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = layer.gradient_checkpointing and i % k == 0
    return [i for i, layer in enumerate(layers) if layer.gradient_checkpointing]

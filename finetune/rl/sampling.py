"""Sampling the completions of a rollout: transformers ``generate`` with a seeded sampler per row.

Each completion has its own random stream, seeded from (``seed``, rollout index, data row,
completion number within its group): a row's completion is the same whichever rank, micro-batch or
batch size generates it, and a resumed run needs no saved sampler state (the seeds are recomputed
from the step). Sampling is done as greedy decoding over Gumbel-perturbed, warped scores
(temperature, top-k, top-p, then ``+ G`` with ``G = -log(E)``, ``E ~ Exp(1)`` from the row's
generator): the argmax of ``log p + G`` is a draw from ``p`` (the Gumbel-max trick), so this is
exactly sampling from the warped distribution, with the row's generator as the only source of noise.

Prompts are left-padded (``position_ids`` follow the mask, as transformers computes them in
``generate``); a row stops at the tokenizer's EOS (the end-of-turn marker of the chat template);
generation runs in eval mode (no dropout) with the KV cache, then the model is put back in train mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)


def row_seed(seed: int, rollout: int, row: int, g: int) -> int:
    return int(np.random.SeedSequence([seed, rollout, row, g]).generate_state(1, dtype=np.uint64)[0] >> 1)


class SeededGumbel(LogitsProcessor):
    """Adds each row's own Gumbel noise to its (already warped) scores."""

    def __init__(self, seeds: list[int]):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        vocab = scores.shape[-1]
        noise = torch.stack([-torch.empty(vocab, dtype=torch.float32).exponential_(generator=g).log()
                             for g in self.generators])
        return scores.float() + noise.to(scores.device)


@dataclass
class SamplingSettings:
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k, p in enumerate(prompts):
        if p:
            ids[k, width - len(p):], mask[k, width - len(p):] = torch.as_tensor(p, dtype=torch.long), 1
    return ids, mask


@torch.no_grad()
def generate(model, prompts: list[list[int]], seeds: list[int] | None, settings: SamplingSettings,
             pad_id: int, eos_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(left-padded prompts, their mask, completions) for each prompt (one row per entry of
    ``prompts``; ``seeds`` one per row, None with ``settings.greedy``). Completions are right-padded
    with ``pad_id`` after the row's EOS."""
    ids, mask = left_pad(prompts, pad_id)
    processors = LogitsProcessorList()
    if not settings.greedy:
        if settings.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            processors.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(settings.top_p))
        processors.append(SeededGumbel(seeds))
    config = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=False, pad_token_id=pad_id,
                              eos_token_id=eos_id, use_cache=True)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                             logits_processor=processors)
    finally:
        model.train(was_training)
    return ids, mask, out[:, ids.shape[1]:].cpu()


def completion_lengths(completions: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens of each completion up to and including its first EOS, truncated: no EOS at all)."""
    is_eos = completions == eos_id
    has = is_eos.any(1)
    first = torch.where(has, is_eos.int().argmax(1), torch.full_like(has, completions.shape[1], dtype=torch.long))
    return torch.where(has, first + 1, first), ~has

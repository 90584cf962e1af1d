"""Reward functions: what GRPO maximises, and the checks on what they return.

A reward function is any Python callable named in ``rl.rewards`` by Hydra ``_target_`` (with a
``weight``, default 1, and its own keyword arguments)::

    rl:
      rewards:
        - _target_: finetune.rl.rewards.exact_match
        - _target_: finetune.rl.rewards.regex_match
          pattern: "^<answer>.*</answer>$"
          weight: 0.5
        - _target_: mypackage.rewards.my_reward   # any importable callable

It is called once per rollout batch (this rank's prompts of one micro-batch, each repeated
``rl.num_generations`` times, in order) as::

    fn(prompts: list[str], completions: list[str], *, reference: list[str],
       prompt_ids: list[list[int]], completion_ids: list[list[int]], truncated: list[bool],
       **kwargs) -> list[float]   # one float per completion

``prompts``: the rendered prompt text (chat template applied); ``completions``: the generated text
decoded once, special tokens skipped; ``reference``: the record's answer (the training target of the
same record under SFT, decoded); ``truncated``: no end-of-turn token within ``rl.max_new_tokens``.
The record's other raw columns are not passed (the data pipeline keeps tokens only); accept
``**kwargs`` so that columns added later do not break a function. A function that raises, returns a
different number of values or a NaN / inf stops the run with one line naming it and the prompt
(:class:`RewardError`). The completion's reward is the weighted sum over the functions.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

from finetune.errors import FinetuneError
from finetune.outputs.exact_match import normalise


class RewardError(FinetuneError):
    """A reward function failed or returned unusable values."""

    exit_code = 3


# -------------------------------------------------------------------------------- built in
def exact_match(prompts, completions, *, reference, **kwargs) -> list[float]:
    """1.0 where the completion equals the record's reference once both are stripped, else 0.0."""
    return [float(normalise(c) == normalise(r)) for c, r in zip(completions, reference)]


def regex_match(prompts, completions, *, pattern: str, full: bool = True, **kwargs) -> list[float]:
    """1.0 where the completion (stripped) matches ``pattern`` (``full``: the whole text, e.g. a
    format ``^<answer>.*</answer>$``; else anywhere in it), else 0.0."""
    rx = re.compile(pattern, re.DOTALL)
    match = rx.fullmatch if full else rx.search
    return [float(match(c.strip()) is not None) for c in completions]


def length_penalty(prompts, completions, *, completion_ids, target_tokens: int = 0, **kwargs) -> list[float]:
    """``-max(0, tokens - target_tokens) / target_tokens`` (0 within the target; with
    ``target_tokens=0``: ``-tokens``, to weigh down long answers)."""
    out = []
    for ids in completion_ids:
        n = len(ids)
        out.append(-max(0, n - target_tokens) / target_tokens if target_tokens else -float(n))
    return out


class RewardModel:
    """A reward model trained by ``recipe=reward-llm``: ``path`` is its run's ``final/`` (a LoRA
    adapter or a full sequence classifier with one output); a completion's reward is the model's
    score of prompt + completion (+ the tokenizer's EOS, as the pairs it was trained on end with the
    end-of-turn marker), batched, right-padded, on the device of the policy; its metrics are
    ``rewards/reward_model``."""

    def __init__(self, path: str, batch_size: int = 32, device: str | None = None):
        import torch

        self.__name__ = "reward_model"  # the metric name: rewards/reward_model
        self.model, self.tokenizer = load_sequence_classifier(path)
        self.model.eval().requires_grad_(False)
        self.batch_size, self.device = batch_size, device
        self._torch = torch

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        torch, tok = self._torch, self.tokenizer
        if self.device is not None:
            self.model.to(self.device)
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            texts = [p + c for p, c in zip(prompts[start:start + self.batch_size],
                                           completions[start:start + self.batch_size])]
            ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
            width = max(len(x) for x in ids)
            batch = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(batch)
            for k, x in enumerate(ids):
                batch[k, :len(x)], mask[k, :len(x)] = torch.as_tensor(x), 1
            with torch.no_grad():
                out = self.model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits[:, 0]
            scores += out.float().tolist()
        return scores


def load_sequence_classifier(path: str):
    """(model, tokenizer) of a classifier run's ``final/``: a LoRA adapter (merged into its base) or
    a full model; :class:`RewardError` when the directory holds neither."""
    from pathlib import Path

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = Path(path)
    if not (root / "adapter_config.json").exists() and not (root / "config.json").exists():
        raise RewardError(f"RewardModel path {path!r} holds no adapter_config.json or config.json; give "
                          "the final/ directory of a recipe=reward-llm run")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if (root / "adapter_config.json").exists():
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(path, num_labels=1).merge_and_unload()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ------------------------------------------------------------------------------ the set
@dataclass
class Reward:
    name: str
    fn: Callable
    weight: float


def reward_name(fn) -> str:
    base = getattr(fn, "func", fn)  # functools.partial (hydra _partial_)
    return getattr(base, "__name__", None) or type(base).__name__


def build_rewards(specs) -> list[Reward]:
    """``rl.rewards`` entries -> :class:`Reward` (name, callable, weight); names made unique."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    out, seen = [], {}
    for i, spec in enumerate(specs):
        spec = OmegaConf.to_container(spec, resolve=True) if not isinstance(spec, dict) else dict(spec)
        weight = float(spec.pop("weight", 1.0))
        target = spec.get("_target_")
        try:
            if isinstance(target, str) and target.rsplit(".", 1)[-1][:1].isupper():
                fn = instantiate(spec)  # a class (RewardModel): built once, then called
            else:
                fn = instantiate(spec, _partial_=True)
        except Exception as exc:  # noqa: BLE001 - any import/argument problem becomes one line
            cause = exc.__cause__ or exc
            raise RewardError(f"rl.rewards[{i}] ({target}) cannot be built: {type(cause).__name__}: "
                              f"{str(cause).splitlines()[0] if str(cause) else ''}; check its _target_ "
                              "and arguments") from None
        name = reward_name(fn)
        seen[name] = seen.get(name, 0) + 1
        out.append(Reward(name if seen[name] == 1 else f"{name}_{seen[name]}", fn, weight))
    return out


def score(rewards: list[Reward], prompts: list[str], completions: list[str], columns: dict,
          prompt_index: list[int]) -> dict[str, list[float]]:
    """Each reward's values for the completions ({name: floats}); :class:`RewardError` naming the
    function and the prompt (``prompt_index[k]``: the data row of completion ``k``) on any failure."""
    out = {}
    for r in rewards:
        try:
            values = r.fn(prompts, completions, **columns)
        except Exception as exc:  # noqa: BLE001 - a user's function: report it in one line
            raise RewardError(f"reward {r.name} raised {type(exc).__name__}: "
                              f"{(str(exc).splitlines() or [''])[0]} (rollout of data rows "
                              f"{sorted(set(prompt_index))}); fix the function") from None
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise RewardError(f"reward {r.name} returned {type(values).__name__} values that are not "
                              "numbers; return one float per completion") from None
        if len(values) != len(completions):
            raise RewardError(f"reward {r.name} returned {len(values)} values for {len(completions)} "
                              "completions; return one float per completion")
        bad = next((k for k, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise RewardError(f"reward {r.name} returned {values[bad]} for completion {bad} of data row "
                              f"{prompt_index[bad]} (prompt {prompts[bad][-60:]!r}); return finite floats")
        out[r.name] = values
    return out


def total(rewards: list[Reward], values: dict[str, list[float]]) -> list[float]:
    """The weighted sum over the reward functions, per completion."""
    n = len(next(iter(values.values()))) if values else 0
    return [sum(r.weight * values[r.name][k] for r in rewards) for k in range(n)]

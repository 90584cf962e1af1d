"""GRPO: online RL on prompts, completions sampled by the policy itself, rewards from functions.

Data. The SFT chat formats and ``prompt_completion``, encoded by the SFT code (the chat template,
truncation, the cache): a record's prompt is its tokens before the first trained one (the rendered
conversation up to the assistant's turn) and its ``reference`` (for rewards) is the decoded
trained part (the SFT answer). Rows are prompts: ``trainer.micro_batch_size`` counts prompts.

Step. The :class:`finetune.rl.feed.RolloutFeed` makes a rollout every ``rl.epochs_per_batch``
steps (:meth:`GRPOTask.make_rollout`): each prompt sampled ``rl.num_generations`` times
(finetune/rl/sampling.py), completions decoded once and scored once by ``rl.rewards``
(finetune/rl/rewards.py), advantages normalised in each group (finetune/rl/objective.py); old
log-probs (``mu > 1``) and reference log-probs (``rl.beta > 0``; LoRA: the adapter disabled, or
the SFT adapter loaded as ``reference``, as DPO) computed once at rollout time. ``loss_sum`` is the
clipped objective summed with the per-token weights of ``rl.loss`` and ``count_targets`` its
normaliser (completions, tokens, or completions x max_new_tokens), so the loop's accumulation and
DDP equal one big batch.

Eval. Greedy completions of the held-out prompts scored by the same rewards: ``eval_reward`` (and
``eval_rewards/<name>``) is their mean; ``eval_loss`` is ``-eval_reward`` (so the best checkpoint
is the one with the highest reward). samples.jsonl: prompt, completion, reference, reward of the
first ``trainer.sample_prompts`` eval prompts; exact_match.json before / after as SFT.

Metrics (train rows, means since the last log over all ranks): ``reward``, ``reward_std``,
``rewards/<name>`` and ``rewards/<name>_std``, ``advantage_std``, ``kl``, ``clip/low``,
``clip/high``, ``clip/region`` (shares of tokens), ``completion_length``,
``completion_length_max``, ``truncated`` (share), ``generation_s`` (seconds per rank generating and
scoring) and ``generation_tokens_per_s``.
"""

from __future__ import annotations

import json
import math
import time

import torch

from finetune.data.formats import CHAT_FORMATS
from finetune.data.tokenize import IGNORE
from finetune.errors import ConfigError, DataError
from finetune.rl import objective
from finetune.rl.feed import RolloutFeed
from finetune.rl.rewards import RewardModel, build_rewards, score, total
from finetune.rl.rollout import token_logps, token_rows, training_rows
from finetune.rl.sampling import SamplingSettings, completion_lengths, generate, row_seed
from finetune.tasks.causal_lm import CausalLMTask, exact_match_after, shifted_targets
from finetune.tasks.preference import REFERENCE_ADAPTER, reference_of
from finetune.train.feed import MapFeed

ENGINES = ("hf", "vllm")


class PromptCollator:
    """Encoded rows -> their prompts and references (token lists); no padding (generation pads)."""

    def __call__(self, rows: list[dict]) -> dict:
        prompts, references = [], []
        for r in rows:
            ids, labels = list(map(int, r["input_ids"])), list(map(int, r["labels"]))
            first = next((j for j, lab in enumerate(labels) if lab != IGNORE), len(ids))
            prompts.append(ids[:first])
            references.append([t for t in labels if t != IGNORE])
        return {"prompts": prompts, "references": references, "input_ids": prompts,
                "num_tokens": sum(map(len, prompts))}


class GRPOTask(CausalLMTask):
    name = "grpo"
    formats = CHAT_FORMATS + ("prompt_completion",)
    packs = False
    needs_eos = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.trainer, self.rewards = None, []
        self._train_sums: dict = {}
        self._eval_rows: list[dict] = []

    # -------------------------------------------------------------- config
    def check_config(self, cfg) -> list[str]:
        problems = super().check_config(cfg)
        rl = cfg.rl
        if rl.loss not in objective.LOSSES:
            problems.append(f"rl.loss={rl.loss} is not one of {' | '.join(objective.LOSSES)}")
        if rl.scale_rewards not in objective.SCALES:
            problems.append(f"rl.scale_rewards={rl.scale_rewards} is not one of {' | '.join(objective.SCALES)}")
        if rl.num_generations < 2:
            problems.append(f"rl.num_generations={rl.num_generations}: a group needs >= 2 completions "
                            "(one alone always has advantage 0)")
        for key, value, ok, rule in (
                ("epochs_per_batch", rl.epochs_per_batch, rl.epochs_per_batch >= 1, ">= 1"),
                ("max_new_tokens", rl.max_new_tokens, rl.max_new_tokens >= 1, ">= 1"),
                ("temperature", rl.temperature, rl.temperature > 0, "> 0"),
                ("top_p", rl.top_p, 0 < rl.top_p <= 1, "in (0, 1]"),
                ("top_k", rl.top_k, rl.top_k >= 0, ">= 0 (0: off)"),
                ("epsilon", rl.epsilon, 0 < rl.epsilon < 1, "in (0, 1)"),
                ("beta", rl.beta, rl.beta >= 0, ">= 0")):
            if not ok:
                problems.append(f"rl.{key}={value} must be {rule}")
        if rl.epsilon_high is not None and rl.epsilon_high < rl.epsilon:
            problems.append(f"rl.epsilon_high={rl.epsilon_high} must be >= rl.epsilon={rl.epsilon} (or null)")
        if rl.engine not in ENGINES:
            problems.append(f"rl.engine={rl.engine} is not one of {' | '.join(ENGINES)}")
        elif rl.engine == "vllm":
            problems.append("rl.engine=vllm is not available in this version (colocated vLLM needs a GPU and "
                            "is not built yet); set rl.engine=hf")
        if not rl.rewards:
            problems.append("model.task=grpo needs at least one reward function in rl.rewards, e.g. "
                            "rl.rewards='[{_target_: finetune.rl.rewards.exact_match}]'")
        for i, spec in enumerate(rl.rewards or []):
            if not hasattr(spec, "get") or not spec.get("_target_"):
                problems.append(f"rl.rewards[{i}] has no _target_ (the reward function's import path, "
                                "e.g. finetune.rl.rewards.exact_match)")
        if cfg.distributed.strategy not in ("none", "ddp"):
            problems.append(f"model.task=grpo with distributed.strategy={cfg.distributed.strategy}: generation "
                            "needs the whole weights on each rank; use distributed=ddp (or none)")
        if cfg.data.streaming:
            problems.append("data.streaming=true is not available for model.task=grpo; set data.streaming=false")
        if cfg.trainer.compile:
            problems.append("trainer.compile=true is not available for model.task=grpo (generation changes "
                            "shapes every step); set trainer.compile=false")
        return problems

    # --------------------------------------------------------------- model
    def after_wrap(self, model) -> None:
        adapter = self.cfg.model.adapter_path
        if adapter and self.cfg.rl.beta > 0:  # the SFT adapter, frozen: the KL's reference
            model.load_adapter(adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)

    def after_load(self, model, tokenizer) -> None:
        if self.cfg.rl.beta > 0 and self.cfg.peft.method == "none":
            import copy

            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    ref_model = None

    # ---------------------------------------------------------------- data
    def collator(self, tokenizer, pad_to: int | None = None):
        return PromptCollator()

    def make_feed(self, trainer, feed):
        if not isinstance(feed, MapFeed):
            raise ConfigError("model.task=grpo needs map-style data (data.streaming=false)")
        self.trainer = trainer
        self.rewards = build_rewards(self.cfg.rl.rewards)
        for r in self.rewards:  # a reward model scores on the policy's device
            if isinstance(r.fn, RewardModel) and r.fn.device is None:
                r.fn.device = trainer.acc.device
        return RolloutFeed(feed, self.make_rollout, self.cfg.rl.epochs_per_batch)

    # ------------------------------------------------------------- rollout
    def _policy(self):
        return self.trainer.acc.unwrap_model(self.trainer.model)

    def _generate(self, prompts: list[list[int]], seeds, greedy: bool):
        rl, tok = self.cfg.rl, self.trainer.tokenizer
        if any(not p for p in prompts):
            raise DataError("a GRPO prompt has no tokens (a record whose answer starts at its first token); "
                            "give every record a prompt")
        settings = SamplingSettings(rl.max_new_tokens, rl.temperature, rl.top_k, rl.top_p, greedy)
        with self.trainer.acc.autocast():
            return generate(self._policy(), prompts, seeds, settings, tok.pad_token_id, tok.eos_token_id,
                            self.trainer.acc.device)

    def _score(self, prompt_ids, completions, lengths, truncated, references, rows):
        tok = self.trainer.tokenizer
        completion_ids = [completions[k, :int(n)].tolist() for k, n in enumerate(lengths)]
        prompt_text = [tok.decode(p) for p in prompt_ids]
        texts = [tok.decode(c, skip_special_tokens=True) for c in completion_ids]
        columns = {"reference": [tok.decode(r, skip_special_tokens=True) for r in references],
                   "prompt_ids": prompt_ids, "completion_ids": completion_ids,
                   "truncated": [bool(t) for t in truncated]}
        values = score(self.rewards, prompt_text, texts, columns, rows)
        return values, total(self.rewards, values), prompt_text, texts, columns["reference"]

    @torch.no_grad()
    def make_rollout(self, rollout: int, prompt_micro: list[dict]) -> list[dict]:
        """This rank's micro-batches of rollout ``rollout``: generated, scored, normalised."""
        rl, trainer, G = self.cfg.rl, self.trainer, self.cfg.rl.num_generations
        start = time.perf_counter()
        made = []
        for pb in prompt_micro:
            rows = [r for r in pb["row_ids"] for _ in range(G)]
            prompts = [p for p in pb["prompts"] for _ in range(G)]
            refs = [r for r in pb["references"] for _ in range(G)]
            seeds = [row_seed(self.cfg.seed, rollout, r, g) for r in pb["row_ids"] for g in range(G)]
            pids, pmask, comp = self._generate(prompts, seeds, greedy=False)
            lengths, truncated = completion_lengths(comp, trainer.tokenizer.eos_token_id)
            values, rewards, *_ = self._score(prompts, comp, lengths, truncated, refs, rows)
            made.append((pb, pids, pmask, comp, lengths, truncated, values, torch.tensor(rewards, dtype=torch.float64)))
        step_std = None
        if rl.scale_rewards == "batch":
            from finetune.distributed import all_reduce_sum

            all_r = torch.cat([m[-1] for m in made])
            step_std = objective.batch_std(*all_reduce_sum(trainer.acc, [float(all_r.sum()),
                                                                           float((all_r ** 2).sum()), len(all_r)]))
        micro = []
        for pb, pids, pmask, comp, lengths, truncated, values, rewards in made:
            groups = torch.arange(len(pb["prompts"])).repeat_interleave(G)
            adv = objective.advantages(rewards, groups, rl.scale_rewards, step_std)
            trained = ~truncated if rl.mask_truncated else torch.ones_like(truncated)
            batch = training_rows(pids, pmask, comp, lengths, trained, trainer.tokenizer.pad_token_id)
            batch.update(advantages=adv, row_ids=list(pb["row_ids"]), num_completions=len(rewards))
            if rl.epochs_per_batch > 1 or rl.beta > 0:
                dev = trainer.to_device(batch)
                if rl.epochs_per_batch > 1:  # the policy at rollout time, eval mode (no dropout)
                    batch["old_logps"] = self._logps(self._policy(), dev).cpu()
                if rl.beta > 0:
                    batch["ref_logps"] = self.reference_logps(dev).cpu()
            self._add_rollout_sums(values, rewards, adv, lengths, truncated)
            micro.append(batch)
        seconds = time.perf_counter() - start
        world = trainer.acc.num_processes
        self._add("generation_s", seconds / world)  # summed over ranks: the mean per rank
        self._add("generation_tokens", float(sum(int(m[4].sum()) for m in made)))
        self._add("generation_rank_s", seconds)
        return micro

    def _logps(self, model, batch: dict) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            with self.trainer.acc.autocast():
                return token_logps(model, batch, self.cfg.rl.temperature, self.chunked)
        finally:
            model.train(was_training)

    def reference_logps(self, batch: dict) -> torch.Tensor:
        if self.ref_model is not None:
            if next(self.ref_model.parameters()).device != batch["input_ids"].device:
                self.ref_model.to(batch["input_ids"].device)
            return self._logps(self.ref_model, batch)
        with reference_of(self._policy()) as reference:
            return self._logps(reference, batch)

    # ------------------------------------------------------------ metrics
    def _add(self, name: str, value: float, reduce: str = "sum") -> None:
        old = self._train_sums.get(name)
        value = torch.as_tensor(float(value), dtype=torch.float64)
        self._train_sums[name] = value if old is None else (old + value if reduce == "sum" else torch.maximum(old, value))

    def _add_rollout_sums(self, values, rewards, adv, lengths, truncated) -> None:
        n = len(rewards)
        self._add("completions", n)
        self._add("reward", rewards.sum())
        self._add("reward_sq", (rewards ** 2).sum())
        for name, v in values.items():
            v = torch.tensor(v, dtype=torch.float64)
            self._add(f"rewards/{name}", v.sum())
            self._add(f"rewards/{name}_sq", (v ** 2).sum())
        self._add("advantage_sq", (adv.double() ** 2).sum())
        self._add("advantage", adv.double().sum())
        self._add("completion_length", lengths.sum())
        longest = torch.tensor(float(lengths.max()), dtype=torch.float64)
        if self.trainer.acc.num_processes > 1:  # every rank rolls out at the same step: a max over ranks
            import torch.distributed as dist

            longest = longest.to(self.trainer.acc.device)
            dist.all_reduce(longest, op=dist.ReduceOp.MAX)
            longest = longest.cpu()
        self._add("completion_length_max", longest / self.trainer.acc.num_processes, reduce="max")
        self._add("truncated", truncated.sum())

    def train_metric_sums(self) -> dict:
        sums, self._train_sums = self._train_sums, {}
        return sums

    def train_metrics(self, sums: dict) -> dict:
        out = {}
        tokens = sums.pop("tokens", 0.0)
        if tokens:
            for name in ("kl", "clip/low", "clip/high"):
                out[name] = sums[name] / tokens
            out["clip/region"] = out["clip/low"] + out["clip/high"]
        n = sums.get("completions", 0.0)
        if n:
            def mean_std(key):
                mean = sums[key] / n
                var = max(sums[key + "_sq"] - n * mean * mean, 0.0) / max(n - 1, 1)
                return mean, math.sqrt(var)

            out["reward"], out["reward_std"] = mean_std("reward")
            for key in sorted(k for k in sums if k.startswith("rewards/") and not k.endswith("_sq")):
                out[key], out[key + "_std"] = mean_std(key)
            out["advantage_std"] = mean_std("advantage")[1]
            out["completion_length"] = sums["completion_length"] / n
            out["completion_length_max"] = sums["completion_length_max"]
            out["truncated"] = sums["truncated"] / n
            out["generation_s"] = sums["generation_s"]
            out["generation_tokens_per_s"] = sums["generation_tokens"] / max(sums["generation_rank_s"], 1e-9)
        return out

    # ---------------------------------------------------------------- loss
    def loss_sum(self, model, batch: dict) -> torch.Tensor:
        rl = self.cfg.rl
        logps = token_logps(model, batch, rl.temperature, self.chunked)
        rows = token_rows(batch["labels"])
        old = batch.get("old_logps")
        old = logps.detach() if old is None else old
        eps_high = rl.epsilon if rl.epsilon_high is None else rl.epsilon_high
        loss, kl, low, high = objective.token_losses(logps, old, batch["advantages"][rows], rl.epsilon, eps_high,
                                                     rl.beta, batch.get("ref_logps"), rl.kl_bias_correction)
        lengths = torch.bincount(rows, minlength=batch["labels"].shape[0])
        weights = objective.token_weights(rl.loss, lengths, rows)
        self._add("tokens", len(rows))
        self._add("kl", kl.sum())
        self._add("clip/low", low.sum())
        self._add("clip/high", high.sum())
        return (loss * weights).sum()

    def count_targets(self, batch: dict) -> int:
        if "advantages" not in batch:  # an eval batch: prompts
            return len(batch["prompts"])
        tokens = int((shifted_targets(batch["labels"]) != IGNORE).sum())
        return objective.normaliser(self.cfg.rl.loss, int(batch["num_completions"]), tokens, self.cfg.rl.max_new_tokens)

    def plan_rows(self, cfg, plan) -> list[tuple[str, str]]:
        rl = cfg.rl
        per_step = plan.rows_per_step * rl.num_generations
        return [("rollouts", f"{plan.rows_per_step} prompts x {rl.num_generations} completions = {per_step} "
                             f"per rollout, up to {rl.max_new_tokens} new tokens each; a rollout every "
                             f"{rl.epochs_per_batch} step(s) (rl.epochs_per_batch), so "
                             f"{plan.steps_per_epoch * rl.epochs_per_batch:,} optimizer steps per epoch"),
                ("rewards", ", ".join(f"{s.get('_target_')} x {s.get('weight', 1.0)}" for s in rl.rewards))]

    # ---------------------------------------------------------------- eval
    def eval_sums(self, model, batch: dict):
        prompts = batch["prompts"]
        pids, pmask, comp = self._generate(prompts, None, greedy=True)
        lengths, truncated = completion_lengths(comp, self.trainer.tokenizer.eos_token_id)
        values, rewards, ptext, texts, refs = self._score(prompts, comp, lengths, truncated, batch["references"],
                                                          list(batch.get("row_ids", range(len(prompts)))))
        want = self.cfg.trainer.sample_prompts - len(self._eval_rows)
        for k in range(min(max(want, 0), len(prompts))):
            self._eval_rows.append({"step": self.trainer.state.step, "prompt": ptext[k], "completion": texts[k],
                                    "reference": refs[k], "reward": rewards[k],
                                    **{f"rewards/{n}": v[k] for n, v in values.items()}})
        sums = {"reward": float(sum(rewards)), **{f"rewards/{n}": float(sum(v)) for n, v in values.items()}}
        return torch.tensor(-sums["reward"]), sums

    def eval_metrics(self, sums: dict, count: float) -> dict:
        return {f"eval_{k}": v / max(count, 1.0) for k, v in sums.items()}

    def on_eval(self, trainer) -> None:
        rows, self._eval_rows = self._eval_rows, []
        if rows:
            with (trainer.run_dir / "samples.jsonl").open("a") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)
        exact_match_after(trainer)

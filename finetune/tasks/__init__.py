"""Tasks: everything that differs between training a chat model, a classifier, a reward model...

A :class:`Task` owns what is task-specific, so that the training loop never asks which task it
runs: the model class to build (and its arguments), how formatted records become training rows
(tokenise, masks), the collator, the loss *sum* and what counts as a target (its normaliser), the
eval metrics, what is written at each eval (samples), and the config rules of the task. The loop
divides the summed loss by the targets of the whole optimizer step, so every task gets exact
gradient accumulation and DDP for free.

Adding a task: a module with a ``Task`` subclass, an entry in :data:`TASKS` (or, without editing
finetune/, ``model.task=package.module:ClassName``), and a recipe. The methods are called in this
order: ``check_config`` (with the whole config, before anything is built) -> ``setup`` (the run's
device is known) -> ``encode`` / ``target_count`` (data preparation, cached) -> ``collator`` / ``make_feed`` (the feed) -> ``auto_model_class``
/ ``model_kwargs`` / ``after_load`` / ``after_wrap`` (model) -> ``before_train`` (model prepared and
resumed) -> per step ``collator`` rows -> ``before_step`` -> ``loss_sum`` / ``count_targets`` -> per
log step ``train_metric_sums`` / ``train_metrics`` -> at eval ``eval_sums`` / ``eval_metrics`` / ``on_eval``.
``stage=inspect`` (no model) calls ``encode``, ``inspect_views`` and ``chats``.
"""

from __future__ import annotations

from omegaconf import DictConfig

from finetune.registry import Registry

TASKS = Registry("model.task", {
    "causal-lm": "finetune.tasks.causal_lm:CausalLMTask",
    "sequence-classification": "finetune.tasks.classification:SequenceClassificationTask",
    "dpo": "finetune.tasks.preference:DPOTask",
    "reward": "finetune.tasks.preference:RewardTask",
    "kto": "finetune.tasks.kto:KTOTask",
    "grpo": "finetune.tasks.grpo:GRPOTask",
})


class Task:
    """Interface and defaults; see the module docstring for the call order."""

    name = ""
    formats: tuple[str, ...] = ()  # the data.format values this task trains on
    packs = False  # whether data.packing=true is possible
    # data.packing=true packs each micro-batch in the collator (DPO, classification: the same rows per
    # step as unpacked, laid out without padding) instead of packing the data into rows of examples.
    packs_per_batch = False
    sequences_per_row = 1  # sequences of up to data.max_seq_len in one train row (DPO: chosen + rejected)
    needs_eos = False  # the tokenizer must have an EOS token (generation has to stop)
    greedy_answers = False  # held-out prompts can be answered greedily (trainer.exact_match_prompts)
    peft_task_type = "CAUSAL_LM"  # peft.TaskType value for LoRA

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    # -------------------------------------------------------------- config
    def check_config(self, cfg: DictConfig) -> list[str]:
        """Problems of this config for the task, one line each (collected with all the others)."""
        problems = []
        if cfg.data.format not in self.formats:
            problems.append(f"model.task={cfg.model.task} does not fit data.format={cfg.data.format}: "
                            f"it trains on data.format={' | '.join(self.formats)}")
        if cfg.data.packing and not self.packs:
            problems.append(f"data.packing=true is not available for model.task={cfg.model.task}; "
                            "set data.packing=false")
        if cfg.trainer.exact_match_prompts and not self.greedy_answers:
            problems.append(f"trainer.exact_match_prompts={cfg.trainer.exact_match_prompts} is not available for "
                            f"model.task={cfg.model.task} (it has no reference answer to generate); "
                            "set trainer.exact_match_prompts=0")
        return problems

    # --------------------------------------------------------------- model
    def auto_model_class(self):
        raise NotImplementedError

    def model_kwargs(self, cfg: DictConfig, label_names: list[str] | None) -> dict:
        """Extra ``from_pretrained`` / config arguments (e.g. the number of labels)."""
        return {}

    def after_load(self, model, tokenizer) -> None:
        """Adjust a loaded pretrained model (e.g. its pad token id)."""

    def after_wrap(self, model) -> None:
        """Adjust the LoRA-wrapped model (e.g. load a frozen reference adapter next to the trained one)."""

    def setup(self, device_type: str) -> None:
        """Called once the run's device is known (e.g. to pick a loss implementation)."""

    def before_train(self, trainer) -> None:
        """Called once the model is prepared (wrapped, on its device, resumed), before the first
        step, on every rank (e.g. to precompute reference log-probs)."""

    # ---------------------------------------------------------------- data
    def encode(self, tokenizer, items: list, stats, label_names: list[str] | None):
        """Formatted records -> (:class:`finetune.data.tokenize.Encoded`, label names or None)."""
        raise NotImplementedError

    def target_count(self, encoded) -> int:
        """Targets of an encoded split (data_stats.json)."""
        from finetune.data.tokenize import IGNORE

        return int((encoded.labels != IGNORE).sum())

    def inspect_views(self, encoded, i: int, label_names: list[str] | None) -> list:
        """Example ``i`` of an encoded split as the sequences it trains on, for ``stage=inspect``
        (:class:`finetune.inspect.render.View`: title, ids, labels; labels != -100 are supervised).
        Default: the example whole, titled with its class label name when the task has labels."""
        from finetune.inspect.render import View

        ids, labels = (a.tolist() for a in encoded.example(i))
        title = "example"
        if label_names and encoded.class_labels is not None:
            title = f"label: {label_names[int(encoded.class_labels[i])]}"
        return [View(title, ids, labels)]

    def chats(self, item) -> list[list[dict]]:
        """The conversations (message lists) of one formatted record, for the template checks of
        ``stage=inspect``; [] when the format renders no chat template (default)."""
        return []

    def make_feed(self, trainer, feed):
        """The loop's feed built from the data's ``feed`` (default: that one; GRPO: rollouts)."""
        return feed

    def collator(self, tokenizer, pad_to: int | None = None):
        from finetune.data.packing import Collator

        return Collator(tokenizer.pad_token_id, bool(self.cfg.data.packing), pad_to)

    # ---------------------------------------------------------------- loss
    def before_step(self, trainer, micro: list[dict]) -> None:
        """Each optimizer step, before its backward passes, with all its micro-batches (host-side;
        every rank calls): a statistic of the whole step (KTO: the KL estimate). Default: nothing."""

    def loss_sum(self, model, batch: dict):
        """The batch's loss summed over its targets (never a mean: the loop normalises)."""
        raise NotImplementedError

    def count_targets(self, batch: dict) -> int:
        """Targets in a host-side batch: what the step's loss is normalised by."""
        raise NotImplementedError

    def train_metric_sums(self) -> dict:
        """Metric sums (device tensors) over the training batches since the last call, then reset;
        the metrics callback sums them over ranks at each log step. {} (default): none."""
        return {}

    def train_metrics(self, sums: dict) -> dict:
        """The train row's extra fields from :meth:`train_metric_sums` summed over ranks."""
        return {}

    # ---------------------------------------------------------------- eval
    def eval_sums(self, model, batch: dict) -> tuple:
        """(loss sum, {metric: sum over the batch}) for one eval batch."""
        return self.loss_sum(model, batch), {}

    def eval_metrics(self, sums: dict, count: float) -> dict:
        """The eval row's extra fields from the summed metrics and the target count."""
        return {}

    def on_eval(self, trainer) -> None:
        """Main process, after each eval (e.g. greedy samples to samples.jsonl)."""

    def plan_rows(self, cfg: DictConfig, plan) -> list[tuple[str, str]]:
        """Extra (name, value) lines of the ``dry_run=true`` plan (GRPO: the rollouts)."""
        return []


def get_task(cfg: DictConfig) -> Task:
    return TASKS.get(cfg.model.task)(cfg)

"""Config checks, run once before anything heavy is built, with every problem reported together.

:func:`problems` returns one line per problem (the key, what is wrong, the fix); :func:`validate`
raises them all as one :class:`~finetune.errors.ConfigErrors`, printed one line each. The valid
choices of the keys that pick a component come from that component's registry, so an error
message always lists exactly what can be built.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from finetune.errors import ConfigErrors

# Fixed choices; the component keys (model.task, data.format, distributed.strategy, stage) are
# added from their registries by :func:`choices`.
CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.attn_implementation": ("eager", "sdpa", "flash_attention_2", "flex_attention"),
    "data.overlong": ("truncate", "drop"),
    "data.on_bad_example": ("error", "skip"),
    "data.train_on": ("all", "last", "each"),
    "data.append_eos": ("auto", "always", "never"),
    "peft.method": ("lora", "none"),
    "optim.name": ("adamw",),
    "optim.scheduler": ("cosine", "linear", "constant"),
    "trainer.precision": ("auto", "fp32", "bf16", "fp16"),
    "trainer.chunked_loss": ("auto", "on", "off"),
    "trainer.nonfinite": ("stop", "skip_step"),
    "logger.wandb.mode": ("auto", "online", "offline", "disabled"),
    "export.dtype": ("float32", "bfloat16", "float16"),
}
POSITIVE = ("model.checkpoint_every", "trainer.micro_batch_size", "trainer.grad_accum", "trainer.log_steps",
            "trainer.length_group_steps", "trainer.length_split", "data.max_seq_len", "launcher.nproc_per_node",
            "launcher.nnodes", "inspect.examples")
NON_NEGATIVE = ("trainer.eval_steps", "trainer.save_steps", "trainer.save_minutes", "trainer.keep_last",
                "optim.warmup_steps", "optim.weight_decay", "optim.max_grad_norm",
                "trainer.eval_max_batches", "data.eval_size", "trainer.exact_match_prompts")


def choices() -> dict[str, tuple[str, ...]]:
    from finetune.data.formats import FORMATS
    from finetune.distributed.strategy import STRATEGIES
    from finetune.train.stages import STAGES

    return {**CHOICES, "data.format": tuple(FORMATS), "distributed.strategy": STRATEGIES.choices(),
            "stage": tuple(STAGES)}


def _get(cfg: DictConfig, dotted: str) -> Any:
    return OmegaConf.select(cfg, dotted)


def problems(cfg: DictConfig) -> list[str]:
    """Every problem of the composed config, one actionable line each."""
    from finetune.outputs.hub import hub_config_problems
    from finetune.tasks import TASKS

    found = [f"{k} is required but not set; pass {k}=<value>" for k in sorted(OmegaConf.missing_keys(cfg))]
    if found:
        return found  # the checks below read these keys
    for key, allowed in choices().items():
        value = _get(cfg, key)
        if value not in allowed:
            found.append(f"{key}={value!r} is not valid; choose one of: {', '.join(allowed)}")
    task_problem = TASKS.check(cfg.model.task)
    if task_problem:
        found.append(task_problem)
    elif _get(cfg, "data.format") in choices()["data.format"]:
        found += TASKS.get(cfg.model.task)(cfg).check_config(cfg)
    if str(cfg.resume).lower() in ("true", "none", ""):
        found.append("resume must be false, auto or a checkpoint directory")
    found += [f"{k}={_get(cfg, k)} must be >= 1" for k in POSITIVE if _get(cfg, k) < 1]
    found += [f"{k}={_get(cfg, k)} must be >= 0" for k in NON_NEGATIVE if _get(cfg, k) < 0]
    o, t, p = cfg.optim, cfg.trainer, cfg.peft
    if not 0 <= o.warmup_ratio < 1:
        found.append(f"optim.warmup_ratio={o.warmup_ratio} must be in [0, 1)")
    if o.lr <= 0:
        found.append(f"optim.lr={o.lr} must be > 0")
    if t.max_steps <= 0 and t.epochs <= 0:
        found.append("set trainer.max_steps > 0 or trainer.epochs > 0")
    if cfg.data.streaming and t.max_steps <= 0:
        found.append("data.streaming=true needs trainer.max_steps > 0 (a stream has no known length "
                     "to count epochs in)")
    if t.length_split > 1 and (cfg.data.packing or cfg.data.streaming):
        found.append(f"trainer.length_split={t.length_split} splits unpacked map-style micro-batches by length; "
                     "set data.packing=false and data.streaming=false, or trainer.length_split=1")
    if 1 < t.length_split and t.micro_batch_size >= 1 and t.length_split > t.micro_batch_size:
        found.append(f"trainer.length_split={t.length_split} must be <= trainer.micro_batch_size="
                     f"{t.micro_batch_size} (each part holds at least one row)")
    if p.method == "lora" and (p.r < 1 or p.alpha <= 0):
        found.append(f"peft.r={p.r} must be >= 1 and peft.alpha > 0 for LoRA")
    if not 0 <= p.dropout < 1:
        found.append(f"peft.dropout={p.dropout} must be in [0, 1)")
    if cfg.model.checkpoint_every > 1 and not cfg.model.gradient_checkpointing:
        found.append(f"model.checkpoint_every={cfg.model.checkpoint_every} picks the layers that gradient "
                     "checkpointing recomputes: set model.gradient_checkpointing=true too")
    if cfg.model.load_in_4bit and p.method != "lora":
        found.append("model.load_in_4bit=true needs peft.method=lora (QLoRA); "
                     "4-bit weights cannot be fully fine-tuned")
    found += hub_config_problems(cfg.hub)
    if cfg.hub.space and cfg.stage == "train" and not cfg.hub.push:
        found.append("hub.space=true pushes a Space next to the pushed model: set hub.push=true too "
                     "(or push a Space for a run already pushed with stage=space)")
    if not 1 <= cfg.chat.port <= 65535:
        found.append(f"chat.port={cfg.chat.port} must be a TCP port, 1-65535")
    if cfg.chat.max_new_tokens < 1:
        found.append(f"chat.max_new_tokens={cfg.chat.max_new_tokens} must be >= 1")
    if t.compile and cfg.distributed.strategy not in ("none", "ddp"):
        found.append(f"distributed={cfg.distributed.strategy} with trainer.compile=true is not supported; "
                     "set trainer.compile=false")
    if cfg.distributed.offload and cfg.distributed.strategy not in ("fsdp", "zero2", "zero3"):
        found.append("distributed.offload=true needs distributed=fsdp, zero2 or zero3")
    return found


def validate(cfg: DictConfig) -> None:
    """Raise every problem of ``cfg`` at once (:class:`ConfigErrors`, exit status 2)."""
    found = problems(cfg)
    if found:
        raise ConfigErrors(found)

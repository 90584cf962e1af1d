"""Model and tokenizer: load (built-in, Hub id or local path), set dtype/attention, wrap with PEFT.

``load_tokenizer`` comes first because the built-in models size their vocabulary from it and
classification models need the label count from the data.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig

from finetune.model import attention, builtin
from finetune.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _offline_hint(name: str, exc: Exception) -> ModelError:
    return ModelError(
        f"model.name_or_path={name!r} could not be loaded ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0][:200]}); the Hub is unreachable and it is not in the local "
        "cache: download it first, pass a local directory, or use model=tiny-llama offline")


def load_tokenizer(cfg: DictConfig, task=None):
    """The run's tokenizer, with a pad token and (for chat models) a chat template.

    ``task`` (a :class:`finetune.tasks.Task`) says whether the tokenizer must have an EOS token."""
    name = builtin.builtin_name(cfg.model.name_or_path)
    if name == "tiny-llama":
        tok = builtin.tiny_chat_tokenizer()
    elif name == "tiny-bert":
        tok = builtin.tiny_bert_tokenizer()
    else:
        from transformers import AutoTokenizer

        path = str(builtin.minilm_path()) if name == "all-minilm-l6-v2" else cfg.model.name_or_path
        try:
            tok = AutoTokenizer.from_pretrained(
                path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise _offline_hint(path, exc) from exc
    if cfg.model.chat_template:  # a preset name, a file or a Jinja string
        from finetune.data.chat_presets import resolve_chat_template

        tok.chat_template = resolve_chat_template(cfg.model.chat_template, tok)
    if tok.pad_token is None:
        # Llama-3 / Mistral ship no pad token; padding is masked out of loss and attention.
        tok.pad_token = tok.eos_token
    if (task is None or task.needs_eos) and tok.eos_token is None:
        raise ModelError(f"the tokenizer of {cfg.model.name_or_path!r} has no EOS token; "
                         "fine-tuned models could not learn to stop")
    return tok


def resolve_dtype(cfg: DictConfig, device_type: str) -> torch.dtype:
    if cfg.model.dtype != "auto":
        return DTYPES[cfg.model.dtype]
    # Weights in float32 on CPU (exact, and CPU bf16 matmuls are slow); bf16 on capable GPUs.
    if device_type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def check_environment(cfg: DictConfig) -> None:
    """Fail before any data or model work when the machine cannot run this config."""
    _quantization_config(cfg)


def _quantization_config(cfg: DictConfig):
    if not cfg.model.load_in_4bit:
        return None
    if not torch.cuda.is_available():
        raise ConfigError("model.load_in_4bit=true (QLoRA) needs a CUDA GPU and bitsandbytes; "
                          "on CPU use recipe=lora-llm")
    if builtin.builtin_name(cfg.model.name_or_path) is not None:
        raise ConfigError("model.load_in_4bit=true quantizes a pretrained checkpoint; set "
                          "model.name_or_path to a Hub id or local model directory")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError("model.load_in_4bit=true needs bitsandbytes: "
                          "pip install 'finetune[bitsandbytes]'") from exc
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def build_base_model(cfg: DictConfig, tokenizer, task, *, label_names: list[str] | None = None,
                     dtype: torch.dtype = torch.float32, meta: bool = False):
    """The un-wrapped transformers model of ``task``'s class. ``meta=True``: no memory (dry runs)."""
    from transformers import AutoConfig

    name = builtin.builtin_name(cfg.model.name_or_path)
    if cfg.model.attn_implementation == "flex_attention" and not meta and not torch.cuda.is_available():
        raise ConfigError("model.attn_implementation=flex_attention needs a CUDA GPU (torch's flex "
                          "attention has no backward on CPU): use model.attn_implementation=sdpa")
    auto_cls = task.auto_model_class()
    task_kwargs = task.model_kwargs(cfg, label_names)
    # sdpa + packing: each packed example attends alone (CPU: sdpa per example, GPU: varlen flash;
    # finetune/model/attention.py).
    attn = attention.implementation(cfg.model.attn_implementation, bool(cfg.data.packing) and task.packs)
    if attn != cfg.model.attn_implementation and not meta:
        log.info("attention: %s (packed rows: each example attends alone; finetune/model/attention.py)", attn)
    if name in builtin.BUILT_IN_MODELS:
        config = builtin.built_in_config(name, tokenizer, task_kwargs)
        config._attn_implementation = attn
        # Seeded by the caller (set_seed) so the same seed rebuilds the same weights.
        with torch.device("meta") if meta else nullcontext():
            model = auto_cls.from_config(config, dtype=dtype, attn_implementation=attn)
        if not meta:
            task.after_load(model, tokenizer)
        return model
    path = str(builtin.minilm_path()) if name == "all-minilm-l6-v2" else cfg.model.name_or_path
    common = dict(revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    try:
        if meta:
            config = AutoConfig.from_pretrained(path, **common, **task_kwargs)
            with torch.device("meta"):
                return auto_cls.from_config(config, dtype=dtype, attn_implementation=attn,
                                            trust_remote_code=cfg.model.trust_remote_code)
        model = auto_cls.from_pretrained(
            path, dtype=dtype, attn_implementation=attn,
            quantization_config=_quantization_config(cfg), **common, **task_kwargs)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ValueError) and "attn_implementation" in str(exc):
            raise ConfigError(f"model.attn_implementation={attn} is not available here: "
                              f"{str(exc).splitlines()[0][:200]}") from exc
        raise _offline_hint(path, exc) from exc
    task.after_load(model, tokenizer)
    return model


def lora_targets(cfg: DictConfig) -> list[str] | str:
    targets = list(cfg.peft.target_modules or cfg.model.lora_target_modules)
    return "all-linear" if targets == ["all-linear"] else targets


def _modules_to_save(cfg: DictConfig) -> list[str] | None:
    """Modules trained in full next to LoRA: ``peft.modules_to_save``, else the model group's
    ``model.lora_modules_to_save``, else the built-in model's own default (random-init built-ins
    must learn their embeddings). ``[]`` means none; a pretrained model's default is none."""
    chosen = cfg.peft.modules_to_save
    if chosen is None:
        chosen = cfg.model.lora_modules_to_save
    if chosen is None:
        chosen = builtin.LORA_MODULES_TO_SAVE.get(builtin.builtin_name(cfg.model.name_or_path))
    return list(chosen) if chosen else None


def wrap_peft(model, cfg: DictConfig, task):
    """LoRA-wrap ``model`` (peft.method=lora); full fine-tuning returns it unchanged."""
    adapter = cfg.model.adapter_path
    if cfg.peft.method == "none":
        if adapter:
            raise ConfigError(f"model.adapter_path={adapter} continues a LoRA adapter: set peft=lora "
                              "(or export/merge it first and pass the merged model as model.name_or_path)")
        return model
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    if cfg.model.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.model.gradient_checkpointing)
    if adapter and not next(model.parameters()).is_meta:  # dry runs (meta weights) plan a new adapter
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ConfigError(f"model.adapter_path={adapter}: no adapter_config.json there; pass a LoRA "
                              "run's final/ directory")
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        task.after_wrap(model)
        return model
    lora = LoraConfig(
        r=cfg.peft.r, lora_alpha=cfg.peft.alpha, lora_dropout=cfg.peft.dropout,
        target_modules=lora_targets(cfg),
        modules_to_save=_modules_to_save(cfg),
        use_rslora=cfg.peft.use_rslora, use_dora=cfg.peft.use_dora,
        task_type=task.peft_task_type,
    )
    try:
        model = get_peft_model(model, lora)
        task.after_wrap(model)
        return model
    except ValueError as exc:
        raise ConfigError(f"peft.target_modules: {str(exc).splitlines()[0][:300]}") from exc


def parameter_counts(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def save_base_for_reload(model, tokenizer, cfg: DictConfig, run_dir: Path, relabelled: bool = False) -> str:
    """Where ``final/``'s adapter finds its base model when reloaded offline.

    Hub / local models are referenced by name. Built-in tiny models exist only in code, so their
    seeded base weights are written once to ``<run_dir>/base_model`` and referenced by path. So is
    a LoRA base whose config the task changed (``relabelled``: a classifier's num_labels / id2label,
    a reward model's single output): loaded from its source config, the head would not match the
    adapter's, and the label names would be lost. That base_model/ holds the run's config, the
    tokenizer and the source weight files (hard links where the filesystem allows).
    """
    name = builtin.builtin_name(cfg.model.name_or_path)
    source = str(builtin.minilm_path()) if name == "all-minilm-l6-v2" else cfg.model.name_or_path
    if name not in builtin.BUILT_IN_MODELS and not (relabelled and cfg.peft.method == "lora"):
        return source
    target = run_dir / "base_model"
    if not (target / "config.json").exists():
        tmp = run_dir / f".base_model.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        files = None if name in builtin.BUILT_IN_MODELS else _complete_weight_files(model, source, cfg.model.revision)
        if files is None:  # made in code, or the source lacks tensors the base holds: save them all
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            tmp.mkdir(parents=True)
            config = copy.deepcopy(model.config)
            config.architectures = [type(model).__name__]
            config.save_pretrained(tmp)
            for path in files:
                _link_or_copy(path, tmp / path.name)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    return str(target.resolve())


def _source_dir(source: str, revision: str | None) -> Path | None:
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:  # already downloaded by from_pretrained: no network
        return Path(snapshot_download(source, revision=revision, local_files_only=True,
                                      allow_patterns=["*.safetensors", "*.safetensors.index.json"]))
    except Exception:  # noqa: BLE001 - not in the cache in this layout: save the weights instead
        return None


def _complete_weight_files(model, source: str, revision: str | None) -> list[Path] | None:
    """The source's safetensors files when they hold every base tensor other than the task head
    (which the adapter carries), else None (e.g. a head or pooler initialised at load time)."""
    from safetensors import safe_open

    folder = _source_dir(source, revision)
    if folder is None:
        return None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names] + [index]
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        return None
    stored: set[str] = set()
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                stored.update(f.keys())
    prefix = getattr(model, "base_model_prefix", "") + "."
    heads = ("classifier.", "score.")  # peft's modules_to_save for SEQ_CLS
    for key in model.state_dict():
        if key.startswith(heads):
            continue
        if key not in stored and key.removeprefix(prefix) not in stored and prefix + key not in stored:
            return None
    return files


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src.resolve(), dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)

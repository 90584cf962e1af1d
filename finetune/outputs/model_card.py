"""The README.md model card pushed with a run: Hub metadata (YAML front matter) plus a body.

The metadata goes through huggingface_hub's ``ModelCardData`` so the Hub accepts it; the body
is built from the run dir alone (``config.yaml``, ``summary.json``, ``final/``, ``merged/``),
so a card can be regenerated for any finished run: ``build_model_card(run_dir).save(path)``.
"""

from __future__ import annotations

import json
import re
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow")
FRAMEWORKS = ("finetune", "torch", "transformers", "peft", "accelerate", "huggingface_hub")
# summary.json keys (finetune.outputs.write_summary) shown in the results table, with labels.
METRIC_LABELS = {"train_loss": "train loss", "last_loss": "final train loss", "first_loss": "first train loss",
                 "eval_loss": "eval loss", "eval_accuracy": "eval accuracy",
                 "eval_reward_accuracy": "held-out reward accuracy", "best_eval_loss": "best eval loss",
                 "best_step": "best step", "tokens_per_s": "tokens/s", "tokens_seen": "tokens seen",
                 "steps": "steps", "wall_time_s": "wall time (s)"}
# Nested summary sections flattened into the table: data counts and parameter counts.
SECTIONS = {"data": "data", "parameters": "parameters"}


def pick(cfg: dict, dotted: str, default: Any = None) -> Any:
    """cfg["a"]["b"] for "a.b", or default when any part is missing."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return default if node is None else node


def read_run(run_dir: Path) -> tuple[dict, dict]:
    """(config, summary) of a run dir; either is {} when its file is absent."""
    config_path, summary_path = run_dir / "config.yaml", run_dir / "summary.json"
    config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return config or {}, summary or {}


def looks_like_hub_id(name: str | None) -> bool:
    """A Hub repo id, not a local path, a data file or a built-in name (builtin:...)."""
    if not name or ":" in name or name.startswith((".", "/", "~")) or name.endswith(DATA_FILE_SUFFIXES):
        return False
    return bool(HUB_ID.match(name)) and not Path(name).exists()


def run_task(run_dir: Path, config: dict) -> str:
    """causal-lm | sequence-classification, from the config, else from final/."""
    task = pick(config, "model.task")
    if task:
        return task
    adapter_config = run_dir / "final" / "adapter_config.json"
    if adapter_config.exists() and json.loads(adapter_config.read_text()).get("task_type") == "SEQ_CLS":
        return "sequence-classification"
    model_config = run_dir / "final" / "config.json"
    if model_config.exists():
        archs = json.loads(model_config.read_text()).get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            return "sequence-classification"
    return "causal-lm"


def base_model_name(run_dir: Path, config: dict) -> str | None:
    """The base's Hub id where there is one (a built-in copy of a Hub model included), else the
    path final/ loads it from."""
    from finetune.model.builtin import hub_id

    if hub := hub_id(pick(config, "model.name_or_path")):
        return hub
    adapter_config = run_dir / "final" / "adapter_config.json"
    if adapter_config.exists():
        return json.loads(adapter_config.read_text()).get("base_model_name_or_path") or pick(config, "model.name_or_path")
    return pick(config, "model.name_or_path")


def base_model_license(base_model: str | None) -> str | None:
    """The license in a local base model's own README front matter, when there is one."""
    if not base_model or not (Path(base_model) / "README.md").is_file():
        return None
    try:
        return ModelCard.load(Path(base_model) / "README.md").data.to_dict().get("license")
    except ValueError:  # a README without valid front matter: no license to inherit
        return None


def dataset_ids(config: dict) -> list[str]:
    paths = [pick(config, "data.path")] + [s.get("path") for s in pick(config, "data.sources", []) or []]
    return [p for p in dict.fromkeys(paths) if looks_like_hub_id(p)]


def build_card_data(run_dir: Path, config: dict) -> ModelCardData:
    is_lora = (run_dir / "final" / "adapter_config.json").exists()
    task = run_task(run_dir, config)
    classifier = task in ("sequence-classification", "reward")  # a reward model is a 1-output classifier
    base = base_model_name(run_dir, config)
    method = {"dpo": [str(pick(config, "pref.loss", "sigmoid")), "dpo"], "reward": ["reward-model"],
              "grpo": ["grpo", str(pick(config, "rl.loss", "grpo"))]}.get(task, [])
    method = list(dict.fromkeys(method))
    return ModelCardData(
        base_model=base if looks_like_hub_id(base) else None,
        library_name="peft" if is_lora else "transformers",
        tags=["finetune", "lora" if is_lora else "full", "text-classification" if classifier else "text-generation",
              *method],
        datasets=dataset_ids(config) or None,
        license=pick(config, "hub.license") or base_model_license(base) or "other",
        pipeline_tag="text-classification" if classifier else "text-generation",
    )


def hyperparameter_rows(config: dict) -> list[tuple[str, Any]]:
    max_steps = pick(config, "trainer.max_steps")
    rows = [("learning rate", pick(config, "optim.lr")), ("max steps", max_steps if (max_steps or 0) > 0 else None),
            ("epochs", pick(config, "trainer.epochs")), ("micro batch size", pick(config, "trainer.micro_batch_size")),
            ("gradient accumulation", pick(config, "trainer.grad_accum")),
            ("max sequence length", pick(config, "data.max_seq_len")), ("packing", pick(config, "data.packing"))]
    task = pick(config, "model.task")
    if task == "dpo":  # preference tuning: the method and its beta (finetune/tasks/preference.py)
        loss = pick(config, "pref.loss", "sigmoid")
        rows = [("method", f"preference tuning, pref.loss={loss}"), ("beta", pick(config, "pref.beta")),
                ("label smoothing", pick(config, "pref.label_smoothing")),
                ("SimPO gamma", pick(config, "pref.gamma") if loss == "simpo" else None),
                ("ORPO lambda", pick(config, "pref.orpo_lambda") if loss == "orpo" else None),
                ("ORPO SFT term", pick(config, "pref.orpo_sft") if loss == "orpo" else None),
                ("started from adapter", pick(config, "model.adapter_path")), *rows]
    elif task == "grpo":  # online RL: the objective, its group and the rewards (finetune/tasks/grpo.py)
        rewards = pick(config, "rl.rewards") or []
        rows = [("method", f"online RL, rl.loss={pick(config, 'rl.loss', 'grpo')}"),
                ("completions per prompt", pick(config, "rl.num_generations")),
                ("updates per rollout", pick(config, "rl.epochs_per_batch")),
                ("max new tokens", pick(config, "rl.max_new_tokens")), ("temperature", pick(config, "rl.temperature")),
                ("clip epsilon", pick(config, "rl.epsilon")), ("clip epsilon high", pick(config, "rl.epsilon_high")),
                ("KL beta", pick(config, "rl.beta")), ("reward scaling", pick(config, "rl.scale_rewards")),
                ("rewards", ", ".join(f"{r.get('_target_')} x {r.get('weight', 1.0)}" for r in rewards
                                      if isinstance(r, dict)) or None),
                ("started from adapter", pick(config, "model.adapter_path")), *rows]
    elif task == "reward":
        rows = [("method", "Bradley-Terry reward model"), ("margin", pick(config, "pref.margin")),
                ("centering coefficient", pick(config, "pref.center_coef")), *rows]
    if pick(config, "peft.method", "lora") == "lora":
        targets = pick(config, "peft.target_modules") or pick(config, "model.lora_target_modules")
        rows += [("LoRA r", pick(config, "peft.r")), ("LoRA alpha", pick(config, "peft.alpha")),
                 ("LoRA dropout", pick(config, "peft.dropout")),
                 ("LoRA target modules", ", ".join(targets) if isinstance(targets, list) else targets)]
    return [(name, value) for name, value in rows if value is not None]


def table(rows: list[tuple[str, Any]], header: tuple[str, str]) -> str:
    if not rows:
        return "_not recorded_"
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    return "\n".join(lines + [f"| {name} | {show(value)} |" for name, value in rows])


def show(value: Any) -> str:
    # Floats from the run (losses, tokens/s) carry noise digits; keep 6 significant ones.
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def metric_rows(summary: dict) -> list[tuple[str, Any]]:
    rows = [(label, summary[key]) for key, label in METRIC_LABELS.items() if summary.get(key) is not None]
    for key, label in SECTIONS.items():
        rows += [(f"{label} {name}", value) for name, value in flatten(summary.get(key)).items()]
    return rows


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"examples": 3}} -> {"train examples": 3}; scalars only, None dropped."""
    if not isinstance(node, dict):
        return {prefix.strip(): node} if node is not None and prefix else {}
    flat: dict[str, Any] = {}
    for name, value in node.items():
        flat.update(flatten(value, f"{prefix} {name}"))
    return flat


def hardware_line(summary: dict) -> str:
    device = summary.get("device_name") or summary.get("device")
    if device is None:
        return "_not recorded_"
    count = summary.get("num_devices") or summary.get("world_size") or 1
    return f"{count} x {device}"


def framework_rows() -> list[tuple[str, Any]]:
    # The package's own version string is right even in a source checkout that pip never installed.
    from finetune import __version__

    rows = [("finetune", __version__)]
    for name in FRAMEWORKS[1:]:
        try:
            rows.append((name, importlib_metadata.version(name)))
        except importlib_metadata.PackageNotFoundError:
            continue
    return rows


def run_labels(run_dir: Path) -> dict | None:
    """id2label of a classifier run: from the config of the base final/'s adapter loads."""
    adapter_config = run_dir / "final" / "adapter_config.json"
    if not adapter_config.exists():
        return None
    base = Path(json.loads(adapter_config.read_text()).get("base_model_name_or_path") or "")
    config = base / "config.json"
    return json.loads(config.read_text()).get("id2label") if config.is_file() else None


def usage_snippet(repo_id: str, is_lora: bool, classifier: bool, has_merged: bool,
                  labels: dict | None = None) -> str:
    pipeline_task = "text-classification" if classifier else "text-generation"
    prompt = "I loved it." if classifier else "Tell me about the moon."
    auto_peft = "AutoPeftModelForSequenceClassification" if classifier else "AutoPeftModelForCausalLM"
    if not is_lora:
        code = (f"from transformers import pipeline\n\npipe = pipeline(\"{pipeline_task}\", model=\"{repo_id}\")\n"
                f"print(pipe(\"{prompt}\"))")
    else:
        code = (f"from peft import {auto_peft}\nfrom transformers import AutoTokenizer, pipeline\n\n"
                f"model = {auto_peft}.from_pretrained(\"{repo_id}\"{label_kwargs(labels)})\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{repo_id}\")\n"
                f"pipe = pipeline(\"{pipeline_task}\", model=model, tokenizer=tokenizer)\nprint(pipe(\"{prompt}\"))")
    text = f"```python\n{code}\n```"
    if labels:
        text += ("\n\nThe base model's own config has no such labels: the arguments above give its head "
                 "the run's labels (the run dir's `base_model/` holds that config locally).")
    if has_merged:
        auto = "AutoModelForSequenceClassification" if classifier else "AutoModelForCausalLM"
        text += ("\n\nThe adapter merged into the base model is in `merged/` and needs no PEFT:\n\n"
                 f"```python\nfrom transformers import {auto}, AutoTokenizer, pipeline\n\n"
                 f"model = {auto}.from_pretrained(\"{repo_id}\", subfolder=\"merged\")\n"
                 f"tokenizer = AutoTokenizer.from_pretrained(\"{repo_id}\", subfolder=\"merged\")\n"
                 f"pipe = pipeline(\"{pipeline_task}\", model=model, tokenizer=tokenizer)\n```")
    return text


def label_kwargs(labels: dict | None) -> str:
    if not labels:
        return ""
    id2label = {int(k): v for k, v in labels.items()}
    label2id = {v: k for k, v in id2label.items()}
    return f", num_labels={len(id2label)}, id2label={id2label!r}, label2id={label2id!r}"


def build_model_card(run_dir: Path, repo_id: str | None = None) -> ModelCard:
    """The model card of a finished run dir; `repo_id` is used in the usage snippet."""
    run_dir = Path(run_dir)
    config, summary = read_run(run_dir)
    repo_id = repo_id or pick(config, "hub.repo_id") or str(run_dir / "final")
    data = build_card_data(run_dir, config)
    is_lora, classifier = data.library_name == "peft", data.pipeline_tag == "text-classification"
    base = base_model_name(run_dir, config)
    body = "\n\n".join([
        f"# {repo_id.split('/')[-1]}",
        f"{'A LoRA adapter' if is_lora else 'A fully fine-tuned model'} trained with "
        f"[finetune](https://pypi.org/project/finetune/), recipe `{pick(config, 'recipe', 'unknown')}`, "
        f"from base model `{base or 'unknown'}`"
        + (f" on {', '.join(f'`{p}`' for p in [pick(config, 'data.path')] if p)}." if pick(config, "data.path") else "."),
        "## Usage", usage_snippet(repo_id, is_lora, classifier, (run_dir / "merged").is_dir(),
                                  labels=run_labels(run_dir) if is_lora and classifier and looks_like_hub_id(repo_id)
                                  and looks_like_hub_id(base) else None),
        "## Training hyperparameters", table(hyperparameter_rows(config), ("hyperparameter", "value")),
        "## Results", table(metric_rows(summary), ("metric", "value")),
        "## Hardware", hardware_line(summary),
        "## Framework versions", table(framework_rows(), ("package", "version")),
    ])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")

"""Merge a LoRA adapter into its base model and export a plain transformers model, checked.

``merge_and_export(final_dir, out_dir)`` loads the base named in ``adapter_config.json`` (float32),
applies the adapter, records its logits on a few fixed probe inputs, merges
(``merge_and_unload``) and then proves the merge twice: the merged model in memory must give the
same logits within 1e-4, and so must the exported files once reloaded from disk (within a
tolerance that fits the export dtype). Safetensors shards, config, generation config and the
tokenizer are written to a temp dir beside ``out_dir`` and renamed into place only after the
checks pass, so ``out_dir`` is either the previous export or a complete, verified new one.

Config keys (``finetune.config.ExportConfig``): export.merge, export.dtype,
export.max_shard_size, export.adapter_dir, export.out_dir.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from finetune.errors import ConfigError, ExportError, ModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TASKS = ("causal-lm", "sequence-classification")
MERGE_ATOL = 1e-4  # float32 merge: W + BA in place of W(x) + B(A(x)), rounding only
# Reloading a half-precision export rounds every weight; relative to the logits' scale.
EXPORT_RTOL = {"float32": 0.0, "bfloat16": 5e-2, "float16": 1e-2}


def auto_model_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification


def read_adapter_config(final_dir: Path) -> dict:
    path = final_dir / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"export needs a LoRA adapter, but {path} does not exist "
                          "(a full fine-tune's final/ is already a plain model: load it directly)")
    return json.loads(path.read_text())


def infer_task(adapter_config: dict) -> str:
    return "sequence-classification" if adapter_config.get("task_type") == "SEQ_CLS" else "causal-lm"


def load_adapter_model(final_dir: Path, base_model: str, task: str):
    """The base model in float32 with the adapter applied, in eval mode."""
    from peft import PeftModel

    try:
        base = auto_model_class(task).from_pretrained(base_model, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load base model {base_model!r} named in {final_dir}/adapter_config.json: "
                         f"{' '.join(str(error).split())[:300]}") from None
    return PeftModel.from_pretrained(base, str(final_dir)).eval()


def load_tokenizer(final_dir: Path, base_model: str):
    from transformers import AutoTokenizer

    for source in (final_dir, base_model):
        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError):
            continue
    raise ModelError(f"no tokenizer in {final_dir} nor in the base model {base_model!r}")


def probe_inputs(vocab_size: int, batch: int = 2, length: int = 12) -> dict:
    """Fixed random token ids: the same probes for every model of the same vocab."""
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(0, vocab_size, (batch, length), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def logits_of(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def check_logits(model, inputs: dict, expected: torch.Tensor, atol: float, what: str) -> None:
    diff = (logits_of(model, inputs) - expected).abs().max().item()
    if not diff <= atol:  # also catches NaN
        raise ExportError(f"{what} does not reproduce the adapter's logits: max abs diff {diff:.3g} > {atol:.3g}")


def swap_into_place(tmp_dir: Path, out_dir: Path) -> None:
    """Replace out_dir by tmp_dir with renames only (same filesystem: they sit side by side)."""
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        out_dir.rename(old)
    tmp_dir.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def merge_and_export(final_dir: Path, out_dir: Path, *, dtype: str = "float32", max_shard_size: str = "2GB",
                     task: str | None = None, base_model: str | None = None) -> Path:
    """Merge the adapter in final_dir into its base and write a verified model to out_dir.

    task: "causal-lm" | "sequence-classification"; None reads it from the adapter's task_type.
    base_model: overrides adapter_config.json's base_model_name_or_path (a Hub id or a local dir).
    """
    final_dir, out_dir = Path(final_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ConfigError(f"export.dtype={dtype!r} is not valid; choose one of: {', '.join(DTYPES)}")
    adapter_config = read_adapter_config(final_dir)
    task = task or infer_task(adapter_config)
    if task not in TASKS:
        raise ConfigError(f"model.task={task!r} cannot be exported; choose one of: {', '.join(TASKS)}")
    base_model = base_model or adapter_config.get("base_model_name_or_path")
    if not base_model:
        raise ConfigError(f"{final_dir}/adapter_config.json names no base_model_name_or_path")

    model = load_adapter_model(final_dir, base_model, task)
    inputs = probe_inputs(model.get_input_embeddings().num_embeddings)
    expected = logits_of(model, inputs)
    merged = model.merge_and_unload()
    check_logits(merged, inputs, expected, MERGE_ATOL, "the merged model")

    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        merged.to(DTYPES[dtype]).save_pretrained(tmp_dir, max_shard_size=max_shard_size)
        load_tokenizer(final_dir, base_model).save_pretrained(tmp_dir)
        reloaded = auto_model_class(task).from_pretrained(tmp_dir, dtype=torch.float32).eval()
        atol = max(MERGE_ATOL, EXPORT_RTOL[dtype] * expected.abs().max().item())
        check_logits(reloaded, inputs, expected, atol, f"the {dtype} export reloaded from disk")
        swap_into_place(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir

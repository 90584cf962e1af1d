"""Shared pieces of the data tests: composed configs, tokenizers built in code, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from finetune.__main__ import CONFIG_DIR
from finetune.config import register_configs

REPO = Path(__file__).resolve().parent.parent
# Qwen2.5's template, shortened: a default system turn, turns ending "<|im_end|>\n".
QWEN_LIKE_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Write a poem about the sea and the sky.",
    "def add(a, b):\n    return a + b\n", "You are a helpful assistant.", "Summarise the text below.",
    "Translate to French: good morning, how are you?", "Sort the numbers 3, 1, 2 in order.",
] * 20


def qwen_like_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here, with ChatML specials; EOS is ``<|im_end|>`` like Qwen's."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = QWEN_LIKE_TEMPLATE
    return tok


def make_cfg(*overrides: str, cache_dir: Path | None = None):
    """The composed run config for ``recipe=lora-llm`` plus overrides (as the CLI builds it)."""
    register_configs()
    extra = [f"data.cache_dir={cache_dir}"] if cache_dir else []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=["recipe=lora-llm", *extra, *overrides])


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def alpaca_rows(n: int, prefix: str = "q") -> list[dict]:
    return [{"instruction": f"{prefix}{i} say {'ab' * (i % 7 + 1)}", "input": "",
             "output": f"answer {i} " + "xy" * (i % 5 + 1)} for i in range(n)]


def run_cli(*args: str, cache_dir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "FINETUNE_CACHE": str(cache_dir), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)

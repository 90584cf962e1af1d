"""Tiny models, a tokenizer and LoRA adapters built in code, for the hub and export tests.

Nothing here touches the network: a word-level tokenizer from the `tokenizers` library, a
2-layer LlamaForCausalLM, a 2-layer BertForSequenceClassification, and a LoRA adapter whose B
matrices are perturbed so that merging it changes the logits (a fresh LoRA is a no-op).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = ["the", "a", "an", "is", "are", "was", "be", "to", "of", "and", "in", "on", "for", "with", "it", "this", "that", "what", "how", "why", "who", "hello", "hi", "world", "model", "data", "train", "loss", "good", "bad", "yes", "no", "one", "two", "three", "four", "five", "answer", "question", "please", "thanks", "tell", "me", "about", "cat", "dog", "sun", "moon", "red", "blue", "green", "small", "big", "fast", "slow"]
# The assistant turn ends with the eos token: generation stops there and hub.py checks it.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %} {{ eos_token }}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tokenizer(chat_template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:], model_max_length=64,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_llama(base_dir: Path, tokenizer: PreTrainedTokenizerFast) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=8, do_sample=False,
    )
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    return base_dir


def build_bert_classifier(base_dir: Path, tokenizer: PreTrainedTokenizerFast) -> Path:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, num_labels=2, pad_token_id=tokenizer.pad_token_id,
        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
    )
    BertForSequenceClassification(config).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    return base_dir


def build_adapter(base_dir: Path, adapter_dir: Path, task: str = "causal-lm") -> Path:
    """Wrap the saved base with LoRA, perturb every lora_B, save adapter + tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    if task == "causal-lm":
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    else:
        base = AutoModelForSequenceClassification.from_pretrained(base_dir)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = get_peft_model(base, lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(adapter_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(adapter_dir)
    return adapter_dir


def build_run_dir(root: Path, task: str = "causal-lm") -> Path:
    """A run dir as the trainer leaves it: final/ (adapter + tokenizer), config.yaml, summary.json."""
    tokenizer = build_tokenizer()
    base_dir = root / "base"
    if task == "causal-lm":
        build_llama(base_dir, tokenizer)
    else:
        build_bert_classifier(base_dir, tokenizer)
    run_dir = root / "run"
    build_adapter(base_dir, run_dir / "final", task)
    (run_dir / "config.yaml").write_text(
        f"recipe: {'lora-llm' if task == 'causal-lm' else 'lora-classifier'}\n"
        f"model:\n  name_or_path: {base_dir}\n  task: {task}\n"
        "data:\n  path: tatsu-lab/alpaca\n  format: alpaca\n  max_seq_len: 64\n  packing: true\n"
        "peft:\n  method: lora\n  r: 4\n  alpha: 8.0\n  dropout: 0.05\n  target_modules: [q_proj, v_proj]\n"
        "optim:\n  lr: 0.0002\n"
        "trainer:\n  max_steps: 10\n  epochs: 1.0\n  micro_batch_size: 2\n  grad_accum: 2\n"
        "hub:\n  push: true\n  repo_id: tester/tiny\n  license: apache-2.0\n"
        "logger:\n  wandb:\n    api_key: should-not-be-pushed\n"
    )
    # The shape finetune.outputs.write_summary gives it.
    summary = {"recipe": "lora-llm", "steps": 10, "first_loss": 4.6, "last_loss": 2.5, "eval_loss": 2.7,
               "eval_accuracy": None, "tokens_per_s": 1234.5, "tokens_seen": 5000, "wall_time_s": 3.2,
               "parameters": {"total": 200000, "trainable": 4000},
               "data": {"train": {"examples": 96, "tokens": 4800}, "eval": {"examples": 4}, "packing": True, "rows": 96},
               "world_size": 1, "device": "cpu"}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir

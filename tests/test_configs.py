"""Every shipped YAML composes and validates, so no config can rot."""

import pytest

from run_helpers import CONF, REPO, compose
from finetune.errors import ConfigError

GROUPS = ["model", "data", "peft", "optim", "trainer", "distributed", "logger"]
RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


def group_options():
    for group in GROUPS:
        for path in sorted((CONF / group).glob("*.yaml")):
            yield group, path.stem


def test_recipes_are_shipped():
    assert {"lora-llm", "full-llm", "qlora-llm", "lora-classifier", "dpo-llm", "reward-llm", "kto-llm", "grpo-llm"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_validates(recipe):
    cfg = compose([f"recipe={recipe}"])
    assert cfg.recipe == recipe
    assert cfg.model.name_or_path and cfg.data.path


@pytest.mark.parametrize("group,option", list(group_options()))
def test_group_option_composes(group, option):
    recipe = "lora-llm"
    extra = []
    if group == "model" and option in ("tiny-bert", "all-minilm-l6-v2"):
        recipe = "lora-classifier"
    if group == "data" and option == "sample-classification":
        recipe = "lora-classifier"
    if group == "data" and option == "sample-preference":
        recipe = "dpo-llm"
    if group == "data" and option == "sample-kto":
        recipe = "kto-llm"
    if group == "data" and option == "chat":
        extra = ["data.path=/tmp/chat.jsonl"]  # the chat entry needs a file from the user
    cfg = compose([f"recipe={recipe}", f"{group}={option}", *extra])
    assert cfg is not None


def test_hub_models_have_lora_targets_and_no_remote_code():
    for path in (CONF / "model").glob("*.yaml"):
        cfg = compose(["recipe=lora-llm" if "bert" not in path.stem and "minilm" not in path.stem
                       else "recipe=lora-classifier", f"model={path.stem}"])
        assert cfg.model.lora_target_modules, path
        assert cfg.model.trust_remote_code is False


def test_required_model_set_is_covered():
    names = {p.stem for p in (CONF / "model").glob("*.yaml")}
    assert {"smollm2-135m", "smollm2-360m", "smollm2-1.7b", "qwen2.5-0.5b", "qwen2.5-1.5b",
            "qwen2.5-7b", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "mistral-7b",
            "tiny-llama", "all-minilm-l6-v2"} <= names


@pytest.mark.parametrize("overrides,needle", [
    (["optim.scheduler=step"], "optim.scheduler"),
    (["trainer.micro_batch_size=0"], "trainer.micro_batch_size"),
    (["data.format=classification"], "model.task"),
    (["recipe=reward-llm", "data.packing=true"], "data.packing"),
    (["hub.push=true"], "hub.repo_id"),
    (["distributed.offload=true"], "distributed.offload"),
    (["resume=true"], "resume"),
])
def test_cross_field_validation_names_the_key(overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        compose(["recipe=lora-llm", *overrides])


def test_built_in_model_settings_do_not_leak_to_a_pretrained_model(tmp_path):
    """recipe=lora-llm with model.name_or_path=<a local Llama dir>: only LoRA weights train (the
    built-in tiny Llama's embed_tokens + lm_head default is the built-in's own)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.model.builtin import tiny_chat_tokenizer
    from run_helpers import build_trainer

    tok = tiny_chat_tokenizer()
    local = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(local)
    tok.save_pretrained(local)
    trainer = build_trainer(["recipe=lora-llm", f"model.name_or_path={local}"], tmp_path / "run")
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), [n for n in trainable if "lora_" not in n]
    builtin = build_trainer(["recipe=lora-llm"], tmp_path / "builtin")
    names = [n for n, p in builtin.model.named_parameters() if p.requires_grad]
    assert any("embed_tokens" in n for n in names) and any("lm_head" in n for n in names)

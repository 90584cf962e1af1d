"""A real training run with hub.push=true, through the CLI, against the local fake Hub."""

import pytest
from huggingface_hub import ModelCard

from fakehub.server import serve
from run_helpers import run_cli

TOKEN = "hf_RunTestToken0123456789abcdefQRS"


@pytest.fixture
def hub(tmp_path):
    hub, server = serve(tmp_path / "hub", TOKEN)
    yield hub
    server.shutdown()
    server.server_close()


def _env(hub):
    return {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}


@pytest.mark.slow
def test_training_run_pushes_adapter_checkpoints_and_card(hub, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(["recipe=lora-llm", "trainer.max_steps=6", "trainer.save_steps=3", "trainer.eval_steps=0",
                    "hub.push=true", "hub.repo_id=tester/run", "hub.strategy=every_checkpoint",
                    "export.merge=true", f"output_dir={run_dir}"], env=_env(hub), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = hub.files("tester/run")
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md",
                 "config.yaml", "summary.json", "merged/config.json",
                 "checkpoints/step-00000003/trainable.safetensors"):
        assert name in files, (name, sorted(files))
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "peft" and "finetune" in card.data.tags
    assert "AutoPeftModelForCausalLM" in card.text
    # The token is nowhere: not in the logs, not in any file of the run dir, not on the Hub.
    assert TOKEN not in proc.stdout + proc.stderr
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert all(TOKEN.encode() not in blob for blob in files.values())


@pytest.mark.slow
def test_push_failure_does_not_fail_the_run(hub, tmp_path):
    hub.fail_next_commits(100)
    run_dir = tmp_path / "run"
    proc = run_cli(["recipe=lora-llm", "trainer.max_steps=3", "trainer.eval_steps=0", "hub.push=true",
                    "hub.repo_id=tester/fail", "hub.max_retries=1", f"output_dir={run_dir}"],
                   env=_env(hub), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "final" / "adapter_model.safetensors").exists()
    assert "adapter_model.safetensors" not in hub.files("tester/fail")
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "tester/fail" in line]
    assert warnings, "the failed push was not reported"


def test_missing_token_fails_before_training(tmp_path):
    proc = run_cli(["recipe=lora-llm", "hub.push=true", "hub.repo_id=tester/x", f"output_dir={tmp_path / 'r'}"],
                   env={"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf")}, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "token" in lines[0].lower()
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.parametrize("recipe,extra,method,tags", [
    ("dpo-llm", ["pref.loss=ipo", "pref.beta=0.2"], "preference tuning, pref.loss=ipo", {"dpo", "ipo"}),
    ("grpo-llm", ["rl.num_generations=4", "rl.max_new_tokens=6", "trainer.micro_batch_size=4",
                  "trainer.exact_match_prompts=0"], "online RL, rl.loss=grpo", {"grpo"}),
])
def test_preference_and_rl_runs_push_a_card_naming_the_method(hub, tmp_path, recipe, extra, method, tags):
    run_dir = tmp_path / "run"
    proc = run_cli([f"recipe={recipe}", "trainer.max_steps=2", "trainer.eval_steps=0", "trainer.sample_prompts=0",
                    "hub.push=true", f"hub.repo_id=tester/{recipe}", *extra, f"output_dir={run_dir}"],
                   env=_env(hub), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = hub.files(f"tester/{recipe}")
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(files), sorted(files)
    card = ModelCard(files["README.md"].decode())
    assert tags <= set(card.data.tags) and card.data.pipeline_tag == "text-generation"
    assert f"| method | {method} |" in card.text
    if recipe == "dpo-llm":
        assert "| beta | 0.2 |" in card.text
    else:
        assert "| rewards | finetune.rl.rewards.exact_match x 1.0 |" in card.text

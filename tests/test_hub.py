"""Hub push and model card: the real huggingface_hub client against a real local HTTP server."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download, metadata_load
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fakehub/ sits beside the tests
from fakehub.server import serve
from fakehub.tiny_models import build_run_dir, build_tokenizer

from finetune.config.schema import HubConfig
from finetune.errors import ConfigError
from finetune.outputs.export import merge_and_export
from finetune.outputs.hub import HubPushError, HubUploader, push_run, verify_adapter
from finetune.outputs.model_card import build_model_card

TOKEN = "hf_FakeTestToken0123456789abcdefXYZ"
REPO = "tester/tiny"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    # The fake Hub does not speak Xet: make the client use the LFS protocol for large files.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    # The suite runs with HF_HUB_OFFLINE=1 (nothing may reach the internet); this local endpoint
    # is the one server the client is allowed to talk to.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub, server = serve(tmp_path / "hub", TOKEN)
    yield hub
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A LoRA run dir with final/ and merged/ (built once; tests copy it before changing it)."""
    run = build_run_dir(tmp_path_factory.mktemp("lm"))
    merge_and_export(run / "final", run / "merged")
    return run


def hub_cfg(**overrides) -> HubConfig:
    return replace(HubConfig(push=True, repo_id=REPO, max_retries=2), **overrides)


def download(hub, path: str, tmp_path: Path, revision: str | None = None) -> Path:
    return Path(hf_hub_download(REPO, path, revision=revision, endpoint=hub.url, token=TOKEN,
                                cache_dir=tmp_path / "hf-cache"))


def capture_logs(caplog) -> None:
    """Everything finetune and huggingface_hub log, and INFO from the HTTP stack.

    (httpcore's DEBUG trace prints response headers verbatim: a server that echoed a token
    would show there. The real Hub does not echo tokens; this fake one does, on purpose.)
    """
    caplog.set_level(logging.INFO)
    for name in ("finetune", "huggingface_hub"):
        caplog.set_level(logging.DEBUG, logger=name)


def test_push_run_uploads_final_merged_config_summary_and_card(fake_hub, run_dir, tmp_path, caplog, capsys):
    capture_logs(caplog)
    url = push_run(run_dir, hub_cfg(), token=TOKEN, endpoint=fake_hub.url, backoff_s=0)

    repo = fake_hub.repos[REPO]
    assert repo.private and url.endswith(repo.branches["main"])
    remote = fake_hub.files(REPO)
    final_files = {p.name for p in (run_dir / "final").iterdir()} - {"README.md"}
    merged_files = {f"merged/{p.name}" for p in (run_dir / "merged").iterdir()}
    assert set(remote) == final_files | merged_files | {"config.yaml", "summary.json", "README.md"}
    for name in final_files:
        assert remote[name] == (run_dir / "final" / name).read_bytes(), name
    for name in merged_files:
        assert remote[name] == (run_dir / name).read_bytes(), name
    assert json.loads(remote["summary.json"]) == json.loads((run_dir / "summary.json").read_text())
    assert "api_key" not in remote["config.yaml"].decode() and "q_proj" in remote["config.yaml"].decode()
    # The weights went through the LFS batch API and a storage PUT, the rest inline.
    assert any(m == "PUT" and p.startswith("/_lfs/") for m, p in fake_hub.requests)

    # Read back through the client, as a user would.
    api = HfApi(endpoint=fake_hub.url, token=TOKEN)
    assert set(api.list_repo_files(REPO)) == set(remote)
    card = ModelCard.load(download(fake_hub, "README.md", tmp_path))
    meta = metadata_load(download(fake_hub, "README.md", tmp_path))
    assert meta == card.data.to_dict()
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert {"finetune", "lora"} <= set(meta["tags"])
    assert meta["datasets"] == ["tatsu-lab/alpaca"] and meta["license"] == "apache-2.0"
    assert "base_model" not in meta  # a local path is not a Hub id
    for text in ("AutoPeftModelForCausalLM", "pipeline(\"text-generation\"", "| LoRA r | 4 |",
                 "| eval loss | 2.7 |", "| tokens/s | 1234.5 |", "| data train examples | 96 |",
                 "| parameters trainable | 4000 |", "| final train loss | 2.5 |", "| transformers |", "subfolder=\"merged\""):
        assert text in card.text, text

    out, err = capsys.readouterr()
    written = [p.read_bytes() for root in (tmp_path, run_dir) for p in root.rglob("*") if p.is_file()]
    for blob in [*remote.values(), *written, caplog.text.encode(), out.encode(), err.encode()]:
        assert TOKEN.encode() not in blob


def test_push_to_revision_creates_the_branch(fake_hub, run_dir, tmp_path):
    cfg = OmegaConf.structured(hub_cfg(revision="dev"))  # as the CLI passes it: a DictConfig
    push_run(run_dir, cfg, token=TOKEN, endpoint=fake_hub.url, backoff_s=0)
    assert set(fake_hub.repos[REPO].branches) == {"main", "dev"}
    assert fake_hub.files(REPO, "main") == {}
    assert "adapter_model.safetensors" in fake_hub.files(REPO, "dev")
    assert download(fake_hub, "summary.json", tmp_path, revision="dev").read_bytes() == \
        (run_dir / "summary.json").read_bytes()


def test_missing_repo_id_is_a_one_line_config_error(run_dir):
    with pytest.raises(ConfigError, match=r"hub\.repo_id") as info:
        push_run(run_dir, hub_cfg(repo_id=None), token=TOKEN)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"hub\.repo_id"):
        HubUploader(hub_cfg(repo_id=None), run_dir, token=TOKEN)


def test_missing_token_is_a_config_error(run_dir, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    with pytest.raises(ConfigError, match="HF_TOKEN"):
        push_run(run_dir, hub_cfg())


def test_a_commit_failing_once_is_retried(fake_hub, run_dir):
    fake_hub.fail_next_commits(1)
    url = push_run(run_dir, hub_cfg(), token=TOKEN, endpoint=fake_hub.url, backoff_s=0)
    commits = [p for m, p in fake_hub.requests if m == "POST" and "/commit/" in p]
    assert len(commits) == 2 and len(fake_hub.repos[REPO].commits) == 1
    assert url.endswith(fake_hub.repos[REPO].commits[0]["oid"])


def test_a_push_failing_every_time_is_reported_not_raised_into_training(fake_hub, run_dir, caplog):
    capture_logs(caplog)
    fake_hub.fail_next_commits(100)
    with pytest.raises(HubPushError, match="after 3 attempt") as info:
        push_run(run_dir, hub_cfg(), token=TOKEN, endpoint=fake_hub.url, backoff_s=0)
    assert "\n" not in str(info.value) and "500" in str(info.value)

    uploader = HubUploader(hub_cfg(max_retries=1), run_dir, token=TOKEN, endpoint=fake_hub.url, backoff_s=0)
    uploader.submit_run()
    results = uploader.close(wait=True)  # must not raise
    assert len(results) == 1 and not results[0].ok and "after 2 attempt" in results[0].error
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "finetune.outputs.hub"]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert fake_hub.repos[REPO].commits == []


def test_a_rejected_token_is_redacted_everywhere(fake_hub, run_dir, caplog, capsys):
    capture_logs(caplog)
    wrong = "hf_WrongTokenThatTheServerEchoes42"
    with pytest.raises(HubPushError) as info:  # 401 is not transient: no retry
        push_run(run_dir, hub_cfg(), token=wrong, endpoint=fake_hub.url, backoff_s=0)
    assert "401" in str(info.value) and wrong not in str(info.value)
    uploader = HubUploader(hub_cfg(), run_dir, token=wrong, endpoint=fake_hub.url, backoff_s=0)
    uploader.submit(run_dir / "final", "checkpoint")
    [result] = uploader.close()
    out, err = capsys.readouterr()
    assert not result.ok and wrong not in result.error
    assert wrong not in caplog.text + out + err


def test_uploader_pushes_a_checkpoint_snapshot_in_the_background(fake_hub, run_dir, tmp_path):
    checkpoint = tmp_path / "checkpoint-5"
    shutil.copytree(run_dir / "final", checkpoint)
    uploader = HubUploader(hub_cfg(strategy="every_checkpoint"), run_dir, token=TOKEN,
                           endpoint=fake_hub.url, backoff_s=0)
    assert uploader.wants("checkpoint") and uploader.wants("end") and not uploader.wants("best")
    fake_hub.fail_next_commits(1)  # the uploader retries too
    uploader.submit(checkpoint, "step 5", path_in_repo="checkpoints/step-5")
    shutil.rmtree(checkpoint)  # rotated away by keep_last before the upload ran: still uploads
    [result] = uploader.close()
    assert result.ok, result.error
    remote = fake_hub.files(REPO)
    assert remote["checkpoints/step-5/adapter_model.safetensors"] == \
        (run_dir / "final" / "adapter_model.safetensors").read_bytes()
    assert fake_hub.repos[REPO].commits[0]["message"] == "step 5"
    assert "checkpoints/step-5/README.md" not in remote  # peft's stub card names a local base path
    assert len([p for m, p in fake_hub.requests if m == "POST" and "/commit/" in p]) == 2


def test_uploader_is_a_no_op_off_the_main_process(run_dir, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    uploader = HubUploader(hub_cfg(), run_dir, token=TOKEN)
    uploader.submit(run_dir / "final", "ignored")
    assert not uploader.wants("end") and uploader.close() == []


def test_refuses_an_adapter_with_empty_tensors(fake_hub, run_dir, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    save_file({"base_model.model.x.lora_A.weight": torch.empty(0, 4)}, str(bad / "final" / "adapter_model.safetensors"))
    with pytest.raises(HubPushError, match="empty tensors"):
        push_run(bad, hub_cfg(), token=TOKEN, endpoint=fake_hub.url)
    assert fake_hub.requests == []  # refused before any network call


def test_refuses_a_chat_template_without_eos_after_the_assistant_turn(fake_hub, run_dir, tmp_path):
    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    no_eos = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    build_tokenizer(chat_template=no_eos).save_pretrained(bad / "final")
    with pytest.raises(HubPushError, match="eos token"):
        push_run(bad, hub_cfg(), token=TOKEN, endpoint=fake_hub.url)
    assert fake_hub.requests == []


def test_verify_adapter_reloads_offline_to_the_recorded_logits(run_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_path = json.loads((run_dir / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]

    def load_base():
        return AutoModelForCausalLM.from_pretrained(base_path)

    inputs = {"input_ids": torch.tensor([[2, 10, 11, 12, 3]])}
    with torch.no_grad():
        expected = PeftModel.from_pretrained(load_base(), str(run_dir / "final"))(**inputs).logits
    verify_adapter(run_dir / "final", load_base, inputs, expected)
    with pytest.raises(HubPushError, match="different logits"):
        verify_adapter(run_dir / "final", load_base, inputs, expected + 1e-2)


def test_classifier_card_metadata(tmp_path):
    run = build_run_dir(tmp_path, task="sequence-classification")
    card = build_model_card(run, "tester/cls")
    meta = card.data.to_dict()
    assert meta["pipeline_tag"] == "text-classification" and meta["library_name"] == "peft"
    assert "AutoPeftModelForSequenceClassification" in card.text
    assert "pipeline(\"text-classification\"" in card.text


def test_hf_endpoint_and_hf_token_env_vars_point_the_push(fake_hub, run_dir, tmp_path):
    """HF_ENDPOINT is read when huggingface_hub is imported: set it for a fresh process."""
    script = textwrap.dedent(f"""
        from finetune.config.schema import HubConfig
        from finetune.outputs.hub import push_run
        print(push_run({str(run_dir)!r}, HubConfig(push=True, repo_id={REPO!r}), backoff_s=0))
    """)
    env = {**os.environ, "HF_ENDPOINT": fake_hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
           "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0"}
    done = subprocess.run([sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert fake_hub.url in done.stdout and TOKEN not in done.stdout + done.stderr
    assert "adapter_model.safetensors" in fake_hub.files(REPO)

"""stage=chat and hub.space: the chat generator, the Space pushed to a local Hub, the app in a real browser."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, SpaceCard, constants, snapshot_download
from omegaconf import OmegaConf
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from fakehub.server import serve
from fakehub.tiny_models import build_run_dir
from run_helpers import REPO, compose, run_cli

from finetune.chat.app import BASE, FINETUNED, ChatGenerator, Sampling, load_generator
from finetune.chat.serve import base_for, chat_model_dir, load_chat_generator, run_base_model, run_chat
from finetune.chat.space import TESTED_GRADIO, package_version, push_space, run_space
from finetune.config.schema import HubConfig
from finetune.errors import ConfigError, ConfigErrors
from finetune.outputs.export import merge_and_export
from finetune.outputs.hub import HubUploader

TOKEN = "hf_ChatTestToken0123456789abcdefUVW"
MODEL_REPO = "tester/tiny-chat"
CHAT = [{"role": "user", "content": "tell me about the moon"}]
# A second turn: the template renders the earlier answer before the new prompt.
TWO_TURNS = CHAT + [{"role": "assistant", "content": "the moon is big"}, {"role": "user", "content": "why"}]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A LoRA run dir (final/ + merged/) of tiny models built in code."""
    run = build_run_dir(tmp_path_factory.mktemp("chat"))
    merge_and_export(run / "final", run / "merged")
    return run


@pytest.fixture(scope="module")
def generator(run_dir) -> ChatGenerator:
    return load_generator(str(run_dir / "final"))


def base_path(run_dir: Path) -> str:
    return str(run_dir.parent / "base")


def greedy(model, tokenizer, messages, new_tokens: int = NEW_TOKENS) -> str:
    """The reference: one non-streamed greedy generate on the template's prompt."""
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def references(run_dir) -> dict:
    """Greedy answers of independently loaded models: the adapter on a fresh base, and the base alone."""
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    base = AutoModelForCausalLM.from_pretrained(base_path(run_dir)).eval()
    answers = {(BASE, i): greedy(base, tokenizer, chat) for i, chat in enumerate((CHAT, TWO_TURNS))}
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path(run_dir)),
                                      str(run_dir / "final")).eval()
    answers |= {(FINETUNED, i): greedy(tuned, tokenizer, chat) for i, chat in enumerate((CHAT, TWO_TURNS))}
    return answers


# --- the generator --------------------------------------------------------------------------------
def test_prompt_is_the_chat_template_with_the_generation_prompt(generator, run_dir):
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    for chat in (CHAT, TWO_TURNS):
        ids = generator.prompt_inputs(chat)["input_ids"][0].tolist()
        assert ids == tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
        assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")  # the assistant's turn is open
        assert ids != tokenizer.apply_chat_template(chat, add_generation_prompt=False, return_dict=False)


@pytest.mark.parametrize("side", [FINETUNED, BASE])
@pytest.mark.parametrize("turns", [0, 1])
def test_streamed_answer_grows_to_the_greedy_generate_answer(generator, references, side, turns):
    chat = (CHAT, TWO_TURNS)[turns]
    values = list(generator.stream(chat, side, Sampling(max_new_tokens=NEW_TOKENS)))
    assert len(values) > 2, values  # streamed piece by piece, not in one go
    assert all(later.startswith(earlier) and len(later) > len(earlier) for earlier, later in zip(values, values[1:]))
    assert values[-1] == references[(side, turns)] != ""
    assert generator.answer(chat, side, Sampling(max_new_tokens=NEW_TOKENS)) == values[-1]


def test_the_adapter_changes_the_answer(references):
    # Else "base == disabled adapter" above would prove nothing.
    assert references[(FINETUNED, 0)] != references[(BASE, 0)]


def test_sampling_settings_reach_generate(generator, run_dir):
    assert Sampling(temperature=0.0, top_p=0.5, max_new_tokens=7).generate_kwargs() == {
        "do_sample": False, "max_new_tokens": 7}
    sampling = Sampling(temperature=1.5, top_p=0.9, max_new_tokens=NEW_TOKENS)
    torch.manual_seed(7)
    streamed = list(generator.stream(CHAT, FINETUNED, sampling))[-1]
    inputs = generator.prompt_inputs(CHAT)
    torch.manual_seed(7)
    with torch.no_grad():
        out = generator.model.generate(**inputs, do_sample=True, temperature=1.5, top_p=0.9,
                                       max_new_tokens=NEW_TOKENS, pad_token_id=generator.tokenizer.pad_token_id)
    assert streamed == generator.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_a_reader_that_stops_early_ends_the_generation(generator, references):
    stream = generator.stream(CHAT, FINETUNED, Sampling(max_new_tokens=200))
    first = next(stream)
    stream.close()  # joins the generation thread: the lock is free again at once
    assert references[(FINETUNED, 0)].startswith(first)
    assert generator.answer(CHAT, BASE, Sampling(max_new_tokens=NEW_TOKENS)) == references[(BASE, 0)]


def test_merged_model_is_compared_with_the_runs_base(run_dir, references):
    merged = run_dir / "merged"
    assert run_base_model(merged) == base_path(run_dir)  # from final/adapter_config.json beside it
    generator = load_chat_generator(merged, run_base_model(merged))
    assert not generator.is_adapter and generator.has_base
    assert generator.answer(CHAT, BASE, Sampling(max_new_tokens=NEW_TOKENS)) == references[(BASE, 0)]
    assert generator.answer(CHAT, FINETUNED, Sampling(max_new_tokens=NEW_TOKENS)) == references[(FINETUNED, 0)]
    alone = load_generator(str(merged))  # no base given: fine-tuned answers only
    assert not alone.has_base
    with pytest.raises(ValueError, match="no 'base' model"):
        alone.answer(CHAT, BASE)


# --- config errors --------------------------------------------------------------------------------
def test_chat_model_dir_errors_name_the_key(tmp_path, run_dir):
    cfg = OmegaConf.create({"chat": {"model_dir": None}, "output_dir": None})
    with pytest.raises(ConfigError, match=r"chat.model_dir=.*or output_dir="):
        chat_model_dir(cfg)
    cfg = OmegaConf.create({"chat": {"model_dir": str(tmp_path)}, "output_dir": None})
    with pytest.raises(ConfigError, match="holds no model"):
        chat_model_dir(cfg)
    cfg = OmegaConf.create({"chat": {"model_dir": None}, "output_dir": str(run_dir)})
    assert chat_model_dir(cfg) == run_dir / "final"


def test_which_base_a_chat_compares_with(run_dir):
    def cfg(base=None):
        return OmegaConf.create({"chat": {"base_model": base}})

    assert base_for(cfg(), run_dir / "final") is None  # an adapter brings its own base
    assert base_for(cfg(), run_dir / "merged") == base_path(run_dir)  # the run's
    assert base_for(cfg("other/base"), run_dir / "merged") == "other/base"  # chat.base_model wins


@pytest.mark.parametrize("overrides, needle", [
    (["chat.port=0"], "chat.port=0 must be a TCP port"),
    (["chat.max_new_tokens=0"], "chat.max_new_tokens=0 must be >= 1"),
    (["hub.space=true", "hub.repo_id=a/b"], "hub.space=true pushes a Space next to the pushed model: set hub.push=true"),
])
def test_bad_chat_and_space_keys_are_one_line_each(overrides, needle):
    with pytest.raises(ConfigErrors) as caught:
        compose(["recipe=lora-llm", *overrides])
    assert any(needle in line for line in caught.value.lines()), caught.value.lines()


@pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="gradio is not installed (pip install 'finetune[chat]')")
def test_a_port_in_use_is_one_line_naming_chat_port(run_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = OmegaConf.create({"chat": {"model_dir": str(run_dir / "final"), "base_model": None, "host": "127.0.0.1",
                                         "port": port, "share": False, "max_new_tokens": 8}, "output_dir": None})
        with pytest.raises(ConfigError, match=rf"chat.port={port} on chat.host=127.0.0.1 cannot be served .*pick another"):
            run_chat(cfg)


def test_missing_gradio_is_one_line_with_the_install_command(run_dir):
    # Gradio cannot be imported (None in sys.modules makes `import gradio` raise ImportError).
    code = ("import sys; sys.modules['gradio'] = None; from finetune.__main__ import main; "
            f"sys.argv = ['finetune', 'stage=chat', 'chat.model_dir={run_dir / 'final'}']; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == "error: stage=chat needs gradio, which is not installed: pip install 'finetune[chat]'"
    assert "Traceback" not in proc.stdout + proc.stderr


# --- the Space --------------------------------------------------------------------------------------
@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the local server is the one Hub allowed
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub, server = serve(tmp_path / "hub", TOKEN)
    yield hub
    server.shutdown()
    server.server_close()


def hub_cfg(**overrides) -> HubConfig:
    return replace(HubConfig(push=True, repo_id=MODEL_REPO, space=True, max_retries=1), **overrides)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, timeout_s: float = 90) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the app exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode()
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"nothing served at {url} within {timeout_s}s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def app_env(port: int, **extra) -> dict:
    return {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False",
            "HF_HUB_OFFLINE": "1", **extra}


@pytest.mark.slow
def test_space_is_accepted_by_the_hub_and_its_app_serves_the_model(fake_hub, run_dir, tmp_path):
    url = push_space(run_dir, hub_cfg(), token=TOKEN, endpoint=fake_hub.url, backoff_s=0)
    api = HfApi(endpoint=fake_hub.url, token=TOKEN)
    assert sorted(api.list_repo_files(MODEL_REPO, repo_type="space")) == ["README.md", "app.py", "requirements.txt"]
    assert url.startswith(f"{fake_hub.url}/spaces/{MODEL_REPO}/commit/")
    assert api.repo_info(MODEL_REPO, repo_type="space").sdk == "gradio"
    assert MODEL_REPO not in fake_hub.repos  # a Space, not a model repo

    space = Path(snapshot_download(MODEL_REPO, repo_type="space", endpoint=fake_hub.url, token=TOKEN,
                                   cache_dir=tmp_path / "hf-cache"))
    card = SpaceCard.load(space / "README.md").data
    assert (card.sdk, card.app_file, card.models) == ("gradio", "app.py", [MODEL_REPO])
    assert card.sdk_version == (package_version("gradio") or TESTED_GRADIO)
    requirements = (space / "requirements.txt").read_text().split()
    assert f"transformers=={__import__('transformers').__version__}" in requirements and any(
        r.startswith("peft==") for r in requirements)
    app_py = (space / "app.py").read_text()
    assert f"os.environ.get(\"MODEL_ID\", {MODEL_REPO!r})" in app_py
    assert not re.search(r"^\s*(from|import) finetune\b", app_py, re.MULTILINE)  # standalone on the Space

    if importlib.util.find_spec("gradio") is None:
        pytest.skip("gradio is not installed (pip install 'finetune[chat]'): the pushed app.py cannot run")
    port = free_port()
    # The model repo is served from a local dir here (MODEL_ID), outside this source tree.
    env = app_env(port, MODEL_ID=str(run_dir / "final"))
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=space, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        page = wait_for_http(f"http://127.0.0.1:{port}/", proc)
        assert "gradio" in page.lower()
        config = json.loads(wait_for_http(f"http://127.0.0.1:{port}/config", proc))
        shown = {c["props"].get("elem_id"): c["props"].get("visible") for c in config["components"]}
        assert shown["finetuned"] is True and shown["base"] is True  # both columns: the adapter's base is known
        assert config["title"] == f"{MODEL_REPO}: fine-tuned vs base"
    finally:
        stop(proc)


def test_end_of_run_push_adds_the_space_after_the_model(fake_hub, run_dir):
    uploader = HubUploader(hub_cfg(), run_dir, token=TOKEN, endpoint=fake_hub.url, backoff_s=0)
    uploader.submit_run()
    results = uploader.close(wait=True)
    assert [r.ok for r in results] == [True, True], results
    assert "adapter_model.safetensors" in fake_hub.files(MODEL_REPO)
    assert set(fake_hub.files(f"spaces/{MODEL_REPO}")) == {"README.md", "app.py", "requirements.txt"}


def test_no_space_when_the_model_push_failed(fake_hub, run_dir):
    fake_hub.fail_next_commits(100)
    uploader = HubUploader(hub_cfg(), run_dir, token=TOKEN, endpoint=fake_hub.url, backoff_s=0)
    uploader.submit_run()
    model, space = uploader.close(wait=True)
    assert not model.ok and not space.ok
    assert space.error == f"Space not pushed: the push of the model {MODEL_REPO} before it failed"
    assert f"spaces/{MODEL_REPO}" not in fake_hub.repos


def test_stage_space_pushes_the_space_of_a_pushed_run(fake_hub, run_dir):
    env = {"HF_ENDPOINT": fake_hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
    proc = run_cli(["stage=space", f"output_dir={run_dir}", f"hub.repo_id={MODEL_REPO}",
                    "hub.space_repo_id=tester/tiny-chat-demo"], env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(fake_hub.files("spaces/tester/tiny-chat-demo")) == {"README.md", "app.py", "requirements.txt"}
    assert f"os.environ.get(\"MODEL_ID\", {MODEL_REPO!r})".encode() in fake_hub.files("spaces/tester/tiny-chat-demo")["app.py"]
    assert TOKEN not in proc.stdout + proc.stderr


def test_stage_space_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="stage=space needs hub.repo_id="):
        run_space(OmegaConf.create({"hub": {"repo_id": None}, "output_dir": None}))
    with pytest.raises(ConfigError, match="does not exist"):
        run_space(OmegaConf.create({"hub": {"repo_id": "a/b"}, "output_dir": str(tmp_path / "nope")}))


def test_fake_hub_checks_a_space_like_the_hub(fake_hub, tmp_path):
    from huggingface_hub.utils import get_session

    api = HfApi(endpoint=fake_hub.url, token=TOKEN)
    answer = get_session().post(f"{fake_hub.url}/api/repos/create", headers={"authorization": f"Bearer {TOKEN}"},
                                json={"name": "bad", "type": "space", "sdk": "flask"})
    assert answer.status_code == 400 and "Invalid sdk" in answer.json()["error"]
    api.create_repo("tester/no-sdk", repo_type="space", space_sdk="gradio")
    (tmp_path / "README.md").write_text("---\ntitle: x\n---\n")
    with pytest.raises(ValueError, match="sdk"):  # a Space card must name its sdk
        api.upload_file(path_or_fileobj=tmp_path / "README.md", path_in_repo="README.md",
                        repo_id="tester/no-sdk", repo_type="space")


# --- the chat app in a real browser -----------------------------------------------------------------
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
BROWSER_MISSING = [what for what, there in (
    ("/usr/bin/chromium (apt-get install chromium)", CHROMIUM.exists()),
    ("/usr/bin/chromedriver (apt-get install chromium-driver)", CHROMEDRIVER.exists()),
    ("gradio (pip install 'finetune[chat]')", importlib.util.find_spec("gradio") is not None),
    ("selenium (pip install selenium)", importlib.util.find_spec("selenium") is not None)) if not there]


@pytest.mark.slow
@pytest.mark.skipif(bool(BROWSER_MISSING), reason=f"browser test needs {', '.join(BROWSER_MISSING)}")
def test_chat_in_a_real_browser_streams_the_greedy_answers(run_dir, references, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune", "stage=chat", f"chat.model_dir={run_dir / 'final'}", f"chat.port={port}",
         f"chat.max_new_tokens={NEW_TOKENS}"], cwd=REPO, env=app_env(port), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = None
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", proc)
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 60)
        prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        prompt.send_keys(CHAT[0]["content"], Keys.ENTER)

        def answer(column: str) -> str:
            found = driver.find_elements(By.CSS_SELECTOR, f"#{column} [data-testid=bot]")
            return found[-1].text if found else ""

        expected = {"finetuned": references[(FINETUNED, 0)], "base": references[(BASE, 0)]}
        try:
            wait.until(lambda d: all(answer(column) == text for column, text in expected.items()))
        except Exception:  # noqa: BLE001 - show what the page holds instead of a bare timeout
            raise AssertionError({column: answer(column) for column in expected} | {"expected": expected}) from None
        user_turns = driver.find_elements(By.CSS_SELECTOR, "#finetuned [data-testid=user]")
        assert [turn.text for turn in user_turns] == [CHAT[0]["content"]]
        shot = tmp_path / "chat.png"
        assert driver.save_screenshot(str(shot))
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        from PIL import Image

        with Image.open(shot) as image:
            image.verify()
            assert image.size[0] >= 1000
    finally:
        if driver is not None:
            driver.quit()
        stop(proc)

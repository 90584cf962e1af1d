"""The preprocessing cache: hits, what its key covers, one builder with pollers, stage=preprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from data_helpers import REPO, alpaca_rows, make_cfg, qwen_like_tokenizer, run_cli, write_jsonl

from finetune.model.builtin import tiny_chat_tokenizer
from finetune.data import cache_key, prepare_data


def test_second_run_hits_the_cache_and_reports_the_time_saved(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(50))
    cfg = make_cfg(f"data.path={path}", cache_dir=tmp_path / "cache")
    tok = tiny_chat_tokenizer()
    first = prepare_data(cfg, tok)
    second = prepare_data(cfg, tok)
    assert not first.cache_hit and second.cache_hit
    assert second.cache_dir == first.cache_dir
    assert "saved_seconds" in second.stats["cache"]
    assert second.train.encoded.ids.tolist() == first.train.encoded.ids.tolist()
    assert second.eval.encoded.ids.tolist() == first.eval.encoded.ids.tolist()


KEYED = ["data.format=prompt_completion", "data.columns.output=answer", "data.max_seq_len=64",
         "data.train_on_prompt=true", "data.overlong=drop", "data.system_prompt=Be nice.",
         "data.eval_size=0.2", "seed=1", "model.chat_template='{{ messages[0].content }}'"]


@pytest.mark.parametrize("override", KEYED)
def test_changing_a_keyed_setting_misses(tmp_path, override):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(5))
    base = make_cfg(f"data.path={path}", cache_dir=tmp_path / "cache")
    changed = make_cfg(f"data.path={path}", override, cache_dir=tmp_path / "cache")
    tok = tiny_chat_tokenizer()
    tok2 = tiny_chat_tokenizer()
    if override.startswith("model.chat_template"):
        tok2.chat_template = changed.model.chat_template
    assert cache_key(base, tok) != cache_key(changed, tok2)


def test_packing_is_not_keyed(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(5))
    tok = tiny_chat_tokenizer()
    assert cache_key(make_cfg(f"data.path={path}", "data.packing=true"), tok) == \
        cache_key(make_cfg(f"data.path={path}", "data.packing=false"), tok)


def test_tokenizer_and_source_file_changes_miss(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(5))
    cfg = make_cfg(f"data.path={path}", cache_dir=tmp_path / "cache")
    key = cache_key(cfg, tiny_chat_tokenizer())
    assert cache_key(cfg, qwen_like_tokenizer()) != key
    tok = tiny_chat_tokenizer()
    tok.chat_template = tok.chat_template.replace("<|end|>", "<|end|>\n")
    assert cache_key(cfg, tok) != key
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched, same content
    assert cache_key(cfg, tiny_chat_tokenizer()) != key
    write_jsonl(path, alpaca_rows(6))
    assert cache_key(cfg, tiny_chat_tokenizer()) != key


WORKER = """
import sys
from data_helpers import make_cfg
from finetune.model.builtin import tiny_chat_tokenizer
from finetune.data import prepare_data
from finetune.errors import DataError
cfg = make_cfg("data.path=" + sys.argv[1], cache_dir=sys.argv[2])
try:
    data = prepare_data(cfg, tiny_chat_tokenizer(), build=sys.argv[3] == "build")
except DataError as exc:
    print("DataError:", exc)
    sys.exit(3)
print("rows", len(data.train), "hit", data.cache_hit, "dir", data.cache_dir.name)
"""


def _worker(tmp_path, data_path, role) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-c", WORKER, str(data_path), str(tmp_path / "cache"), role],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_one_builder_and_a_poller_in_two_processes(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(3000))
    poller = _worker(tmp_path, path, "wait")  # starts first: it must wait, not build
    time.sleep(1.0)
    builder = _worker(tmp_path, path, "build")
    out_b, err_b = builder.communicate(timeout=300)
    out_p, err_p = poller.communicate(timeout=300)
    assert builder.returncode == 0 and poller.returncode == 0, err_b + err_p
    assert "hit False" in out_b and "rows" in out_p
    assert out_b.split("dir")[1] == out_p.split("dir")[1]
    assert out_b.split()[1] == out_p.split()[1]  # same number of rows


@pytest.mark.slow
def test_a_failed_build_reaches_the_poller(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "x", "output": "y"}\n{not json\n')
    poller = _worker(tmp_path, path, "wait")
    builder = _worker(tmp_path, path, "build")
    out_b, _ = builder.communicate(timeout=300)
    out_p, _ = poller.communicate(timeout=300)
    assert builder.returncode == 3 and poller.returncode == 3
    assert "bad.jsonl:2" in out_b
    assert "preprocessing failed on the building process" in out_p and "bad.jsonl:2" in out_p


@pytest.mark.slow
def test_stage_preprocess_builds_then_hits(tmp_path):
    first = run_cli("recipe=lora-llm", "stage=preprocess", cache_dir=tmp_path / "cache")
    assert first.returncode == 0, first.stderr
    assert "(built)" in first.stdout and '"kept": 2000' in first.stdout
    second = run_cli("recipe=lora-llm", "stage=preprocess", cache_dir=tmp_path / "cache")
    assert second.returncode == 0 and "(hit)" in second.stdout and "saved_seconds" in second.stdout

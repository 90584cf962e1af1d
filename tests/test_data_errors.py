"""Bad data through the real CLI: one line on stderr naming file, line/row and field; skip and count;
overlong examples truncated or dropped and counted; an empty dataset is an error."""

from __future__ import annotations

import json

import pytest
from data_helpers import alpaca_rows, make_cfg, run_cli, write_jsonl

from finetune.model.builtin import tiny_chat_tokenizer
from finetune.data import prepare_data

GOOD = {"instruction": "Say hi", "output": "hi"}


def _one_error_line(result) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


def _preprocess(tmp_path, path, *extra):
    return run_cli("recipe=lora-llm", "stage=preprocess", f"data.path={path}", "data.eval_split=null",
                   "data.eval_size=0", *extra, cache_dir=tmp_path / "cache")


CASES = {
    "malformed-json-line": ('{"instruction": "a", "output": "b"}\n{"instruction": "a", oops}\n',
                            "bad.jsonl", ":2: invalid JSON"),
    "missing-column": (json.dumps(GOOD) + "\n" + json.dumps({"instruction": "x"}) + "\n",
                       "bad.jsonl", ":2: missing field 'output' (data.columns.output=output)"),
    "empty-response": (json.dumps({"instruction": "x", "output": "  "}) + "\n",
                       "bad.jsonl", ":1: field 'output' is empty"),
    "wrong-type": (json.dumps({"instruction": 5, "output": "y"}) + "\n",
                   "bad.jsonl", ":1: field 'instruction' must be a string, got int"),
    "json-array-syntax": ('[\n {"instruction": "a", "output": "b"},\n {"instruction": }\n]\n',
                          "bad.json", ":3: invalid JSON"),
    "json-array-non-object": (json.dumps([GOOD, 7]), "bad.json",
                              "[1]: expected an object with fields, got int"),
    "csv-missing-column": ("instruction,response\nSay hi,hi\n", "bad.csv",
                           ":2: missing field 'output'"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_row_is_one_line_naming_file_line_and_field(tmp_path, case):
    content, name, expected = CASES[case]
    path = tmp_path / name
    path.write_text(content)
    line = _one_error_line(_preprocess(tmp_path, path))
    assert f"{path}{expected}" in line
    if case != "json-array-syntax":  # a broken JSON document cannot be skipped row by row
        assert "data.on_bad_example=skip" in line


def test_missing_file_and_empty_glob(tmp_path):
    assert "does not exist" in _one_error_line(_preprocess(tmp_path, tmp_path / "nope.jsonl"))
    assert "matches no data files" in _one_error_line(_preprocess(tmp_path, f"{tmp_path}/*.jsonl"))


def test_skip_counts_bad_rows_and_an_empty_result_is_an_error(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{broken\n" + json.dumps({"instruction": "x"}) + "\n")
    ok = _preprocess(tmp_path, path, "data.on_bad_example=skip")
    assert ok.returncode == 0, ok.stderr
    assert '"skipped_bad": 2' in ok.stdout and '"kept": 1' in ok.stdout
    assert f"{path}:2: invalid JSON" in ok.stdout  # the first few are named in the stats
    bad_only = tmp_path / "bad.jsonl"
    bad_only.write_text("{broken\n")
    line = _one_error_line(_preprocess(tmp_path, bad_only, "data.on_bad_example=skip"))
    assert "no training examples left" in line and "'skipped_bad': 1" in line


def test_overlong_examples_are_truncated_or_dropped_and_counted(tmp_path):
    rows = [{"prompt": "p", "completion": "c" * n} for n in (10, 50, 100)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    tok = tiny_chat_tokenizer()

    def stats(overlong):
        cfg = make_cfg(f"data.path={path}", "data.format=prompt_completion", "data.max_seq_len=32",
                       f"data.overlong={overlong}", "data.eval_size=0", "data.eval_split=null",
                       cache_dir=tmp_path / "cache")
        data = prepare_data(cfg, tok)
        return data.stats["train"], data.train.encoded.lengths().tolist()

    truncated, lengths = stats("truncate")
    assert (truncated["kept"], truncated["truncated"], truncated["dropped_overlong"]) == (3, 2, 0)
    assert lengths == [12, 32, 32] and truncated["tokens"] == 76
    dropped, lengths = stats("drop")
    assert (dropped["kept"], dropped["truncated"], dropped["dropped_overlong"]) == (1, 0, 2)
    assert lengths == [12]


@pytest.mark.slow
def test_counts_are_written_to_the_run_dir(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = alpaca_rows(40) + [{"instruction": "x"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = run_cli("recipe=lora-llm", f"data.path={path}", "data.eval_split=null", "data.eval_size=4",
                  "data.on_bad_example=skip", "trainer.max_steps=1", "trainer.micro_batch_size=4",
                  "trainer.sample_prompts=0", "logger.plots=false", "trainer.progress=false",
                  f"output_dir={tmp_path / 'run'}", cache_dir=tmp_path / "cache")
    assert run.returncode == 0, run.stderr
    stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
    assert (stats["train"]["kept"], stats["train"]["skipped_bad"]) == (36, 1)
    assert stats["eval"]["kept"] == 4
    assert "36 examples kept" in run.stdout


def test_unreachable_hub_dataset_is_one_line(tmp_path):
    line = _one_error_line(_preprocess(tmp_path, "no-such-user/no-such-dataset"))
    assert "data.path='no-such-user/no-such-dataset'" in line and "could not be loaded" in line


def test_bad_row_in_a_dataset_repo_names_split_and_row(tmp_path):
    from test_data_sources import _dataset_repo

    repo = _dataset_repo(tmp_path / "repo")
    write_jsonl(repo / "data" / "train.jsonl", alpaca_rows(2) + [{"instruction": "x", "output": ""}])
    line = _one_error_line(_preprocess(tmp_path, repo))
    assert f"{repo}[train]#row2: field 'output' is empty" in line

"""Sources: local files and globs, a local dataset repo through datasets.load_dataset (no network),
weighted mixtures, and the train/eval split."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import alpaca_rows, make_cfg, write_jsonl

from finetune.model.builtin import tiny_chat_tokenizer
from finetune.data import prepare_data, sources


@pytest.fixture(autouse=True)
def offline_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))  # for the CLI runs
    # and in this process (datasets read the variable once, at import): another test's dataset repo
    # of the same name and layout, written in the same second, would otherwise be served from the cache
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def _texts(tok, data) -> list[str]:
    enc = data.train.encoded
    return sorted(tok.decode(enc.example(i)[0].tolist()) for i in range(len(enc)))


def _prepare(tmp_path, *overrides):
    cfg = make_cfg("data.eval_size=0", "data.eval_split=null", *overrides, cache_dir=tmp_path / "cache")
    return prepare_data(cfg, tiny_chat_tokenizer())


def test_json_array_jsonl_csv_parquet_give_the_same_examples(tmp_path):
    rows = alpaca_rows(5)
    tok = tiny_chat_tokenizer()
    (tmp_path / "a.json").write_text(json.dumps(rows))
    write_jsonl(tmp_path / "a.jsonl", rows)
    with (tmp_path / "a.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    results = [_texts(tok, _prepare(tmp_path, f"data.path={tmp_path / name}"))
               for name in ("a.json", "a.jsonl", "a.csv", "a.parquet")]
    assert len(results[0]) == 5 and all(r == results[0] for r in results)


def test_glob_and_directory_read_every_file(tmp_path):
    (tmp_path / "parts").mkdir()
    write_jsonl(tmp_path / "parts" / "p1.jsonl", alpaca_rows(3, "a"))
    write_jsonl(tmp_path / "parts" / "p2.jsonl", alpaca_rows(4, "b"))
    by_glob = _prepare(tmp_path, f"data.path={tmp_path}/parts/*.jsonl")
    by_dir = _prepare(tmp_path, f"data.path={tmp_path}/parts")
    assert len(by_glob.train) == len(by_dir.train) == 7


def test_txt_files_are_documents_for_the_text_format(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "one.txt").write_text("hello world")
    (tmp_path / "docs" / "two.txt").write_text("second doc")
    data = _prepare(tmp_path, f"data.path={tmp_path}/docs/*.txt", "data.format=text")
    stream = tiny_chat_tokenizer().decode(data.train.encoded.ids.tolist())
    assert stream == "hello world<|end|>second doc<|end|>"


def _dataset_repo(root):
    """A folder laid out like a Hub dataset repo: data files + README YAML with two configs."""
    (root / "data").mkdir(parents=True)
    write_jsonl(root / "data" / "train.jsonl", alpaca_rows(6, "train"))
    write_jsonl(root / "data" / "test.jsonl", alpaca_rows(2, "test"))
    write_jsonl(root / "data" / "extra.jsonl", alpaca_rows(3, "extra"))
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  default: true\n  data_files:\n"
        "  - split: train\n    path: data/train.jsonl\n  - split: test\n    path: data/test.jsonl\n"
        "- config_name: extra\n  data_files:\n  - split: train\n    path: data/extra.jsonl\n---\n# demo\n")
    return root


def test_local_dataset_repo_goes_through_load_dataset_with_config_and_split(tmp_path):
    repo = _dataset_repo(tmp_path / "repo")
    assert sources.is_dataset_repo(str(repo)) and not sources.is_local_source(str(repo))
    records = list(sources.read_source(str(repo), name="extra", split="train"))
    assert [r.row["instruction"].split()[0] for r in records] == ["extra0", "extra1", "extra2"]
    assert records[0].origin == f"{repo}[train]#row0"
    assert len(_prepare(tmp_path, f"data.path={repo}").train) == 6
    assert len(_prepare(tmp_path, f"data.path={repo}", "data.split=test").train) == 2
    assert len(_prepare(tmp_path, f"data.path={repo}", "data.name=extra").train) == 3
    named = make_cfg(f"data.path={repo}", "data.eval_split=test", cache_dir=tmp_path / "cache")
    data = prepare_data(named, tiny_chat_tokenizer())
    assert (len(data.train), len(data.eval)) == (6, 2)


def test_missing_hub_dataset_is_one_actionable_error(tmp_path):
    from finetune.errors import DataError

    with pytest.raises(DataError, match="could not be loaded.*data.path=<file>"):
        _prepare(tmp_path, "data.path=no-such-user/no-such-dataset")


def test_mixture_weights_repeat_and_subsample_deterministically(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", alpaca_rows(10, "b"))
    mix = f"data.sources=[{{path: '{a}', weight: 2}}, {{path: '{b}', weight: 0.5}}]"
    tok = tiny_chat_tokenizer()
    first = _texts(tok, _prepare(tmp_path, mix))
    assert len(first) == 20 + 5
    assert sum(t.startswith("<|user|>a") for t in first) == 20
    assert _texts(tok, _prepare(tmp_path, mix)) == first
    other_seed = _texts(tok, _prepare(tmp_path, mix, "seed=7"))
    assert len(other_seed) == 25 and other_seed != first  # another half of b


def test_mixture_of_chat_formats(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(3))
    conv = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
    b = write_jsonl(tmp_path / "b.jsonl", conv)
    mix = f"data.sources=[{{path: '{a}'}}, {{path: '{b}', format: sharegpt}}]"
    assert len(_prepare(tmp_path, mix).train) == 4


def test_held_out_eval_is_deterministic_by_seed(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(100))
    tok = tiny_chat_tokenizer()

    def split(*overrides):
        cfg = make_cfg(f"data.path={path}", "data.eval_split=null", *overrides, cache_dir=tmp_path / "c")
        data = prepare_data(cfg, tok)
        ev = data.eval.encoded
        return _texts(tok, data), sorted(tok.decode(ev.example(i)[0].tolist()) for i in range(len(ev)))

    train, ev = split("data.eval_size=0.1")
    assert (len(train), len(ev)) == (90, 10) and not set(train) & set(ev)
    assert split("data.eval_size=0.1") == (train, ev)
    assert split("data.eval_size=0.1", "seed=3")[1] != ev
    assert len(split("data.eval_size=7")[1]) == 7


def test_named_eval_split_file(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(8))
    ev = write_jsonl(tmp_path / "eval.jsonl", alpaca_rows(3, "e"))
    cfg = make_cfg(f"data.path={train}", f"data.eval_split={ev}", cache_dir=tmp_path / "cache")
    data = prepare_data(cfg, tiny_chat_tokenizer())
    assert (len(data.train), len(data.eval)) == (8, 3)
    assert np.all(data.eval.encoded.lengths() > 0)

"""Streaming mode: same examples as the cached path, packing on the fly, and an exact resume
position for local files (byte offsets), Parquet, a datasets IterableDataset and mixtures."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import alpaca_rows, make_cfg, run_cli, write_jsonl
from test_data_sources import _dataset_repo
from test_packing import alpaca_like_lengths

from finetune.model.builtin import tiny_chat_tokenizer
from finetune.data import prepare_data
from finetune.data.packing import Collator
from finetune.errors import DataError

TOK = tiny_chat_tokenizer()
COLLATE = Collator(TOK.pad_token_id, packed=True)


@pytest.fixture(autouse=True)
def offline_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def _cfg(tmp_path, path, *overrides):
    return make_cfg(f"data.path={path}", "data.streaming=true", "data.eval_split=null",
                    "data.eval_size=0", "data.max_seq_len=128", *overrides, cache_dir=tmp_path / "cache")


def _draw(iterator, n: int) -> list[list[int]]:
    out = []
    for _ in range(n):
        batch = next(iterator)
        for row, k in zip(batch["input_ids"], batch["attention_mask"] if "attention_mask" in batch
                          else (batch["input_ids"] != TOK.pad_token_id).long()):
            out.append(row[: int(k.sum())].tolist())
    return out


def _assert_resumes_exactly(cfg, steps_before=3, micro=4, accum=2, steps_after=40):
    rows = prepare_data(cfg, TOK).train
    it = rows.micro_batches(0, 1, micro, accum, COLLATE)
    _draw(it, steps_before * accum)
    state = json.loads(json.dumps(rows.state_dict(steps_before)))  # survives a JSON checkpoint
    expected = _draw(it, steps_after * accum)
    resumed = prepare_data(cfg, TOK).train
    resumed.load_state_dict(state)
    got = _draw(resumed.micro_batches(0, 1, micro, accum, COLLATE), steps_after * accum)
    assert got == expected
    return state


def test_unpacked_stream_yields_the_cached_pipeline_examples_in_order(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(40))
    cached = prepare_data(make_cfg(f"data.path={path}", "data.eval_split=null", "data.eval_size=0",
                                   "data.max_seq_len=128", cache_dir=tmp_path / "c"), TOK)
    stream = prepare_data(_cfg(tmp_path, path), TOK).train
    collate = Collator(TOK.pad_token_id, packed=False)
    got = _draw(stream.micro_batches(0, 1, 5, 1, collate), 8)
    enc = cached.train.encoded
    assert got == [enc.example(i)[0].tolist() for i in range(len(enc))]
    assert stream.report()["kept"] == 40


def test_jsonl_resume_is_exact_and_seeks_by_byte_offset(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(700))
    state = _assert_resumes_exactly(_cfg(tmp_path, path, "data.packing=true", "data.stream_buffer=100"))
    position = state["mixture"]["sources"][0]
    assert position["offset"] > 0 and position["line"] > 0
    with path.open("rb") as fh:  # the offset is the start of the next unread line
        fh.seek(position["offset"] - 1)
        assert fh.read(1) == b"\n"


def test_resume_across_files_and_epochs(tmp_path):
    (tmp_path / "parts").mkdir()
    write_jsonl(tmp_path / "parts" / "a.jsonl", alpaca_rows(30, "a"))
    pq.write_table(pa.Table.from_pylist(alpaca_rows(30, "b")), tmp_path / "parts" / "b.parquet")
    cfg = _cfg(tmp_path, tmp_path / "parts", "data.packing=true", "data.stream_buffer=16")
    _assert_resumes_exactly(cfg, steps_before=5, micro=2, accum=1, steps_after=60)  # > 1 epoch


def test_iterable_dataset_resume_is_exact(tmp_path):
    repo = _dataset_repo(tmp_path / "repo")
    cfg = _cfg(tmp_path, repo, "data.packing=false")
    state = _assert_resumes_exactly(cfg, steps_before=1, micro=2, accum=1, steps_after=5)
    assert "state" in state["mixture"]["sources"][0]  # IterableDataset.state_dict()


def test_mixture_is_weighted_deterministic_and_resumes(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(400, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", alpaca_rows(400, "b"))
    mix = f"data.sources=[{{path: '{a}', weight: 3}}, {{path: '{b}', weight: 1}}]"
    cfg = _cfg(tmp_path, a, mix)
    collate = Collator(TOK.pad_token_id, packed=False)
    rows = _draw(prepare_data(cfg, TOK).train.micro_batches(0, 1, 4, 1, collate), 50)
    share_a = np.mean([TOK.decode(r).startswith("<|user|>a") for r in rows])
    assert 0.65 < share_a < 0.85
    assert _draw(prepare_data(cfg, TOK).train.micro_batches(0, 1, 4, 1, collate), 50) == rows
    _assert_resumes_exactly(cfg, steps_before=4)


def test_ranks_take_disjoint_slices_of_each_step(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(64))
    cfg = _cfg(tmp_path, path)
    collate = Collator(TOK.pad_token_id, packed=False)
    one = _draw(prepare_data(cfg, TOK).train.micro_batches(0, 1, 4, 2, collate), 4)
    r0 = _draw(prepare_data(cfg, TOK).train.micro_batches(0, 2, 2, 2, collate), 4)
    r1 = _draw(prepare_data(cfg, TOK).train.micro_batches(1, 2, 2, 2, collate), 4)
    assert sorted(r0 + r1) == sorted(one)
    assert not set(map(tuple, r0)) & set(map(tuple, r1))


def test_streaming_packing_efficiency_on_an_alpaca_like_distribution(tmp_path):
    lengths = alpaca_like_lengths(3000)
    rows = [{"prompt": "p", "completion": "x" * (int(n) - 2)} for n in lengths]  # 1 char = 1 token
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = _cfg(tmp_path, path, "data.format=prompt_completion", "data.packing=true",
               "data.max_seq_len=1024", "data.stream_buffer=2000")
    stream = prepare_data(cfg, TOK).train
    it = stream.micro_batches(0, 1, 8, 1, COLLATE)
    while stream.epoch == 0:
        next(it)
    report = stream.report()
    print(f"streaming packing efficiency: {report['packing_efficiency']:.4f}")
    assert report["packing_efficiency"] > 0.95


def test_held_out_eval_is_the_start_of_the_stream(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(30))
    data = prepare_data(_cfg(tmp_path, path, "data.eval_size=5"), TOK)
    assert len(data.eval) == 5
    collate = Collator(TOK.pad_token_id, packed=False)
    train = _draw(data.train.micro_batches(0, 1, 5, 1, collate), 5)
    assert len(train) == 25 and TOK.decode(train[0]).startswith("<|user|>q5 ")
    with pytest.raises(DataError, match="eval_size=<count>"):
        prepare_data(_cfg(tmp_path, path, "data.eval_size=0.1"), TOK)


def test_bad_rows_in_a_stream_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(alpaca_rows(1)[0]) + "\n{oops\n")
    rows = prepare_data(_cfg(tmp_path, path), TOK).train
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON"):
        next(rows.micro_batches(0, 1, 1, 1, COLLATE))
    empty = prepare_data(_cfg(tmp_path, path, "data.on_bad_example=skip", "data.format=messages"), TOK)
    with pytest.raises(DataError, match="the stream has no training examples"):
        next(empty.train.micro_batches(0, 1, 1, 1, COLLATE))


@pytest.mark.slow
def test_trainer_resumes_a_stream_exactly(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(300))
    args = ["recipe=lora-llm", f"data.path={path}", "data.streaming=true", "data.packing=true",
            "data.eval_split=null", "data.eval_size=8", "data.stream_buffer=64", "trainer.max_steps=4",
            "trainer.save_steps=2", "trainer.log_steps=1", "trainer.micro_batch_size=2",
            "trainer.grad_accum=2", "trainer.sample_prompts=0", "trainer.progress=false",
            "logger.plots=false", "optim.warmup_steps=0"]
    full = run_cli(*args, f"output_dir={tmp_path / 'full'}", cache_dir=tmp_path / "cache")
    assert full.returncode == 0, full.stderr
    state = json.loads((tmp_path / "full/checkpoints/step-00000002/trainer_state.json").read_text())
    assert state["data_stream"]["steps_drawn"] == 2
    resumed = run_cli(*args, f"output_dir={tmp_path / 'resumed'}",
                      f"resume={tmp_path / 'full/checkpoints/step-00000002'}", cache_dir=tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stderr

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    assert losses("resumed") == {s: v for s, v in losses("full").items() if s > 2}
    # data_stats.json holds the stream's counts at the end, not the zeros of the start:
    # 4 steps x 4 rows were emitted, from records the stream read (held-out eval ones excluded).
    train = json.loads((tmp_path / "full" / "data_stats.json").read_text())["train"]
    assert train["streaming"] and train["rows_emitted"] == 16
    assert 0 < train["kept"] <= train["read"] <= 300 - 8 and train["tokens"] > 0
    assert 0.5 < train["packing_efficiency"] <= 1


def test_classification_stream_needs_label_names(tmp_path):
    from finetune.model.builtin import tiny_bert_tokenizer

    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    args = ("recipe=lora-classifier", "model=tiny-bert", "data.format=classification")
    with pytest.raises(DataError, match="needs data.labels"):
        prepare_data(_cfg(tmp_path, path, *args), tiny_bert_tokenizer())
    data = prepare_data(_cfg(tmp_path, path, *args, "data.labels=[neg,pos]"), tiny_bert_tokenizer())
    batch = next(data.train.micro_batches(0, 1, 2, 1, Collator(0, packed=False)))
    assert batch["class_labels"].tolist() == [1, 0]


@pytest.mark.slow
def test_two_ddp_processes_train_on_a_stream(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(100))
    run = run_cli("recipe=lora-llm", f"data.path={path}", "data.streaming=true", "data.packing=true",
                  "data.eval_split=null", "data.eval_size=8", "launcher.nproc_per_node=2", "distributed=ddp",
                  "trainer.max_steps=2", "trainer.save_steps=1", "trainer.micro_batch_size=2",
                  "trainer.sample_prompts=0", "trainer.progress=false", "logger.plots=false",
                  f"output_dir={tmp_path / 'run'}", cache_dir=tmp_path / "cache")
    assert run.returncode == 0, run.stderr[-2000:]
    state = json.loads((tmp_path / "run/checkpoints/step-00000001/trainer_state.json").read_text())
    assert state["data_stream"]["steps_drawn"] == 1 and state["world_size"] == 2
    assert state["data_stream"]["rows_emitted"] == 4  # 2 ranks x 2 rows: each rank its own slice

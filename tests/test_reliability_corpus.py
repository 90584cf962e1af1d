"""The bad-input corpus: configs, data files and paths a new user gets wrong, each through the real
CLI. For every case: a non-zero exit (the documented status), exactly one line on stderr starting
with ``error:`` that names the key / file / path, no ``Traceback`` anywhere, no ``final/``.

Every case runs ``recipe=lora-llm trainer.max_steps=2`` with small settings; most stop before
the model is built (config cases stop before anything is imported but Hydra). The data files are
made by the test: random bytes, UTF-16/32, Latin-1, a Parquet or Arrow file with valid magic
numbers and garbage between, truncated ones, empty files, symlink loops, a FIFO, a file made
really unreadable (root cannot read a mode-000 file once CAP_DAC_OVERRIDE is dropped: setpriv).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parent.parent
GOOD_ROW = {"instruction": "Say hi", "input": "", "output": "hi there"}
DROP_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def _rows(n: int = 8) -> str:
    return "".join(json.dumps({**GOOD_ROW, "instruction": f"Say hi {i}"}) + "\n" for i in range(n))


def _random_bytes(n: int = 4096, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _parquet_bytes() -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({k: [v] * 50 for k, v in GOOD_ROW.items()}), buf)
    return buf.getvalue()


def _arrow_stream_bytes() -> bytes:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    table = pa.table({k: [v] * 50 for k, v in GOOD_ROW.items()})
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


@dataclass
class Case:
    args: list[str]  # overrides; "{d}" is the case's data dir, "{run}" the run dir
    code: int  # the documented exit status
    phrase: str  # must be in the error line ("{d}" / "{run}" filled in)
    make: Callable[[Path], None] | None = None  # writes the case's files into {d}
    prefix: list[str] = field(default_factory=list)  # command prefix (setpriv)
    marks: tuple = ()


def _write(name: str, content: bytes | str):
    def make(d: Path) -> None:
        (d / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return make


def _data(name: str, *extra: str) -> list[str]:
    return [f"data.path={{d}}/{name}", *extra]


def _symlink_loop(d: Path) -> None:
    (d / "a.jsonl").symlink_to(d / "b.jsonl")
    (d / "b.jsonl").symlink_to(d / "a.jsonl")


def _broken_link(d: Path) -> None:
    (d / "data.jsonl").symlink_to(d / "gone.jsonl")


def _unreadable(d: Path) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop root's CAP_DAC_OVERRIDE")
    (d / "data.jsonl").write_text(_rows())
    (d / "data.jsonl").chmod(0)
    probe = subprocess.run([*DROP_DAC, "cat", str(d / "data.jsonl")], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("dropping CAP_DAC_OVERRIDE does not make a mode-000 file unreadable here")


def _dir_without_data(d: Path) -> None:
    (d / "dataset").mkdir()
    (d / "dataset" / "README.md").write_text("# notes\n")
    (d / "dataset" / "rows.bin").write_bytes(b"\x00\x01")


def _dir_with_one_binary(d: Path) -> None:
    (d / "dataset").mkdir()
    (d / "dataset" / "a.jsonl").write_text(_rows())
    (d / "dataset" / "b.jsonl").write_bytes(_random_bytes())


def _dir_named_jsonl(d: Path) -> None:
    (d / "data.jsonl").mkdir()


def _fifo(d: Path) -> None:
    os.mkfifo(d / "data.jsonl")


def _bad_byte_past_the_head(d: Path) -> None:
    """> 64 KiB of good rows (past what check_file reads), then one Latin-1 line: line 201, early
    enough that a 2-step streaming run reads it."""
    text = "".join(json.dumps({"instruction": f"Say hi {i}", "output": "hi " * 120}) + "\n"
                   for i in range(200))
    assert len(text) > 64 * 1024
    (d / "data.jsonl").write_bytes(text.encode() + b'{"instruction": "caf\xe9", "output": "x"}\n')


def _good_and_binary_eval(d: Path) -> None:
    (d / "train.jsonl").write_text(_rows())
    (d / "eval.jsonl").write_bytes(_random_bytes())


def _good_data(d: Path) -> None:
    (d / "train.jsonl").write_text(_rows())


def _file_and_good_data(d: Path) -> None:
    _good_data(d)
    (d / "a-file").write_text("not a dir")


def _damaged_checkpoint(d: Path) -> None:
    ckpt = d / "step-00000002"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text('{"step": 2, "epo')


def _model_dir_without_files(d: Path) -> None:
    (d / "model").mkdir()


HOLDERS: list[subprocess.Popen] = []  # killed after each test (see _kill_holders)


def _run_dir_held_by_a_live_run(d: Path) -> None:
    _good_data(d)
    code = ("import sys, time; from pathlib import Path; from finetune.train.run_lock import RunLock; "
            "RunLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(d / "held-run")], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    HOLDERS.append(proc)
    assert proc.stdout.readline().strip() == "held"


@pytest.fixture(autouse=True)
def _kill_holders():
    yield
    while HOLDERS:
        proc = HOLDERS.pop()
        proc.kill()
        proc.wait()


BINARY = _random_bytes()
UTF16 = _rows(3).encode("utf-16")  # with a byte order mark
CASES: dict[str, Case] = {
    # ----------------------------------------------------------------- configs (exit 2)
    "cfg-unknown-key": Case(["trainer.max_stepz=2"], 2, "unknown key 'trainer.max_stepz' (did you mean trainer.max_steps?)"),
    "cfg-unknown-top-level-key": Case(["lr=0.1"], 2, "unknown key 'lr'"),
    "cfg-unknown-data-key": Case(["data.pathh=x.jsonl"], 2, "unknown key 'data.pathh' (did you mean data.path?)"),
    "cfg-wrong-type-int": Case(["trainer.max_steps=abc"], 2, "trainer.max_steps='abc' has the wrong type"),
    "cfg-wrong-type-float": Case(["optim.lr=fast"], 2, "optim.lr='fast' has the wrong type"),
    "cfg-wrong-type-bool": Case(["data.packing=maybe"], 2, "data.packing='maybe' has the wrong type"),
    "cfg-unknown-model": Case(["model=nope"], 2, "model=nope is not a known model; valid choices:"),
    "cfg-unknown-data-group": Case(["data=nope"], 2, "data=nope is not a known data"),
    "cfg-unknown-distributed": Case(["distributed=nope"], 2, "distributed=nope is not a known distributed"),
    "cfg-unknown-logger": Case(["logger=nope"], 2, "logger=nope is not a known logger"),
    "cfg-unknown-recipe": Case(["recipe=nope"], 2, "recipe=nope is not a known recipe"),
    "cfg-bad-stage": Case(["stage=bogus"], 2, "stage='bogus' is not valid; choose one of: train, preprocess, export"),
    "cfg-bad-data-format": Case(["data.format=bogus"], 2, "data.format='bogus' is not valid"),
    "cfg-zero-micro-batch": Case(["trainer.micro_batch_size=0"], 2, "trainer.micro_batch_size=0 must be >= 1"),
    "cfg-negative-grad-accum": Case(["trainer.grad_accum=-1"], 2, "trainer.grad_accum=-1 must be >= 1"),
    "cfg-zero-max-seq-len": Case(["data.max_seq_len=0"], 2, "data.max_seq_len=0 must be >= 1"),
    "cfg-negative-eval-size": Case(["data.eval_size=-1"], 2, "data.eval_size=-1.0 must be >= 0"),
    "cfg-lora-rank-zero": Case(["peft.r=0"], 2, "peft.r=0 must be >= 1"),
    "cfg-negative-lr": Case(["optim.lr=-1"], 2, "optim.lr=-1.0 must be > 0"),
    "cfg-warmup-ratio-above-one": Case(["optim.warmup_ratio=1.5"], 2, "optim.warmup_ratio=1.5 must be in [0, 1)"),
    "cfg-dropout-one": Case(["peft.dropout=1"], 2, "peft.dropout=1.0 must be in [0, 1)"),
    "cfg-no-steps-no-epochs": Case(["trainer.max_steps=0", "trainer.epochs=0"], 2, "set trainer.max_steps > 0 or trainer.epochs > 0"),
    "cfg-resume-true": Case(["resume=true"], 2, "resume must be false, auto or a checkpoint directory"),
    "cfg-hub-push-without-repo": Case(["hub.push=true"], 2, "hub.push=true needs hub.repo_id"),
    "cfg-offload-without-sharding": Case(["distributed.offload=true"], 2, "distributed.offload=true needs distributed=fsdp"),
    "cfg-unparsable-override": Case(["trainer.max_steps=[1,2"], 2, "could not parse the overrides"),
    "cfg-format-does-not-fit-task": Case(["data.format=classification"], 2, "does not fit data.format=classification"),
    # ------------------------------------------------------------ data files (exit 3)
    "data-binary-jsonl": Case(_data("data.jsonl"), 3, "{d}/data.jsonl is not a text file (binary data", _write("data.jsonl", BINARY)),
    "data-binary-json": Case(_data("data.json"), 3, "{d}/data.json is not a text file", _write("data.json", BINARY)),
    "data-binary-csv": Case(_data("data.csv"), 3, "{d}/data.csv is not a text file", _write("data.csv", BINARY)),
    "data-binary-txt": Case(_data("data.txt", "data.format=text"), 3, "{d}/data.txt is not a text file", _write("data.txt", BINARY)),
    "data-utf16-jsonl": Case(_data("data.jsonl"), 3, "{d}/data.jsonl is UTF-16 text (byte order mark FF FE)", _write("data.jsonl", UTF16)),
    "data-utf16-csv": Case(_data("data.csv"), 3, "{d}/data.csv is UTF-16 text", _write("data.csv", "instruction,output\nhi,there\n".encode("utf-16"))),
    "data-utf16-without-bom": Case(_data("data.jsonl"), 3, "{d}/data.jsonl looks like UTF-16 text without a byte order mark", _write("data.jsonl", _rows(3).encode("utf-16-le"))),
    "data-utf32-json": Case(_data("data.json"), 3, "{d}/data.json is UTF-32 text", _write("data.json", json.dumps([GOOD_ROW]).encode("utf-32"))),
    "data-latin1-jsonl": Case(_data("data.jsonl"), 3, "{d}/data.jsonl is not UTF-8 text (byte 0xe9", _write("data.jsonl", '{"instruction": "café", "output": "x"}\n'.encode("latin-1"))),
    "data-bad-byte-past-the-head": Case(_data("data.jsonl"), 3, "{d}/data.jsonl:201: not UTF-8 text (byte 0xe9", _bad_byte_past_the_head),
    "data-parquet-garbage-between-magic": Case(_data("data.parquet"), 3, "{d}/data.parquet: cannot be read as a Parquet file", _write("data.parquet", b"PAR1" + BINARY + b"PAR1")),
    "data-parquet-truncated": Case(_data("data.parquet"), 3, "{d}/data.parquet is a truncated or damaged Parquet file", _write("data.parquet", _parquet_bytes()[:300])),
    "data-parquet-not-parquet": Case(_data("data.parquet"), 3, "{d}/data.parquet is not a Parquet file", _write("data.parquet", _rows())),
    "data-arrow-stream-garbage": Case(_data("data.arrow"), 3, "{d}/data.arrow: cannot be read as a Arrow file", _write("data.arrow", b"\xff\xff\xff\xff" + BINARY)),
    "data-arrow-file-garbage": Case(_data("data.arrow"), 3, "{d}/data.arrow: cannot be read as a Arrow file", _write("data.arrow", b"ARROW1\x00\x00" + BINARY + b"ARROW1")),
    "data-arrow-truncated": Case(_data("data.arrow"), 3, "{d}/data.arrow: cannot be read as a Arrow file", _write("data.arrow", _arrow_stream_bytes()[:200])),
    "data-arrow-not-arrow": Case(_data("data.arrow"), 3, "{d}/data.arrow is not an Arrow IPC file", _write("data.arrow", _rows())),
    "data-empty-jsonl": Case(_data("data.jsonl"), 3, "{d}/data.jsonl is empty (0 bytes)", _write("data.jsonl", b"")),
    "data-empty-parquet": Case(_data("data.parquet"), 3, "{d}/data.parquet is empty (0 bytes)", _write("data.parquet", b"")),
    "data-only-blank-lines": Case(_data("data.jsonl"), 3, "no training examples left", _write("data.jsonl", "\n\n  \n")),
    "data-dir-without-data-files": Case(_data("dataset"), 3, "data.path='{d}/dataset' matches no data files (expected .arrow, .csv, .json, .jsonl, .parquet, .txt; the directory holds README.md, rows.bin)", _dir_without_data),
    "data-dir-with-a-binary-file": Case(_data("dataset"), 3, "{d}/dataset/b.jsonl is not a text file", _dir_with_one_binary),
    "data-symlink-loop": Case(_data("a.jsonl"), 3, "{d}/a.jsonl is a symlink loop", _symlink_loop),
    "data-broken-symlink": Case(_data("data.jsonl"), 3, "{d}/data.jsonl is a broken symlink", _broken_link),
    "data-unreadable-file": Case(_data("data.jsonl"), 3, "{d}/data.jsonl cannot be read (Permission denied); make it readable", _unreadable, prefix=DROP_DAC),
    "data-directory-named-like-a-file": Case(["data.path={d}/*.jsonl"], 3, "{d}/data.jsonl is a directory, not a data file", _dir_named_jsonl),
    "data-fifo": Case(_data("data.jsonl"), 3, "{d}/data.jsonl is not a regular file", _fifo),
    "data-malformed-json-line": Case(_data("data.jsonl"), 3, "{d}/data.jsonl:2: invalid JSON", _write("data.jsonl", _rows(1) + "{oops\n")),
    "data-json-array-syntax": Case(_data("data.json"), 3, "{d}/data.json:1: invalid JSON", _write("data.json", '[{"instruction": }]')),
    "data-glob-matches-nothing": Case(["data.path={d}/*.jsonl"], 3, "data.path='{d}/*.jsonl' matches no data files"),
    "data-binary-eval-file": Case(["data.path={d}/train.jsonl", "data.eval_split={d}/eval.jsonl"], 3, "data.eval_split: {d}/eval.jsonl is not a text file", _good_and_binary_eval),
    "stream-binary-jsonl": Case(_data("data.jsonl", "data.streaming=true"), 3, "{d}/data.jsonl is not a text file", _write("data.jsonl", BINARY)),
    "stream-utf16-jsonl": Case(_data("data.jsonl", "data.streaming=true"), 3, "{d}/data.jsonl is UTF-16 text", _write("data.jsonl", UTF16)),
    "stream-empty-file": Case(_data("data.jsonl", "data.streaming=true"), 3, "{d}/data.jsonl is empty", _write("data.jsonl", b"")),
    "stream-symlink-loop": Case(_data("a.jsonl", "data.streaming=true"), 3, "{d}/a.jsonl is a symlink loop", _symlink_loop),
    "stream-parquet-garbage-between-magic": Case(_data("data.parquet", "data.streaming=true"), 3, "{d}/data.parquet: cannot be read as a Parquet file", _write("data.parquet", b"PAR1" + BINARY + b"PAR1"), marks=(pytest.mark.slow,)),
    "stream-bad-byte-past-the-head": Case(_data("data.jsonl", "data.streaming=true"), 3, "{d}/data.jsonl:201: not UTF-8 text (byte 0xe9", _bad_byte_past_the_head, marks=(pytest.mark.slow,)),
    # ------------------------------------------------------------------ paths
    "path-data-missing": Case(["data.path={d}/nope/train.jsonl"], 3, "{d}/nope/train.jsonl does not exist"),
    "path-cache-dir-cannot-be-created": Case(["data.path={d}/train.jsonl", "data.cache_dir=/proc/finetune-cache"], 2, "data.cache_dir=/proc/finetune-cache: cannot create", _good_data),
    "path-output-dir-in-proc": Case(["data.path={d}/train.jsonl", "output_dir=/proc/x"], 2, "output_dir=/proc/x: cannot create /proc/x", _good_data),
    "path-output-dir-is-a-file": Case(["data.path={d}/train.jsonl", "output_dir={d}/a-file"], 2, "output_dir={d}/a-file: cannot create", _file_and_good_data),
    "path-output-dir-under-a-file": Case(["data.path={d}/train.jsonl", "output_dir={d}/a-file/run"], 2, "output_dir={d}/a-file/run: cannot create", _file_and_good_data),
    "path-output-dir-in-use-by-a-live-run": Case(["data.path={d}/train.jsonl", "output_dir={d}/held-run"], 2, "output_dir={d}/held-run is in use by another run (host ", _run_dir_held_by_a_live_run),
    "path-resume-missing": Case(["data.path={d}/train.jsonl", "resume={d}/no-such-checkpoint"], 5, "resume={d}/no-such-checkpoint: not a complete checkpoint directory", _good_data, marks=(pytest.mark.slow,)),
    "path-resume-damaged": Case(["data.path={d}/train.jsonl", "resume={d}/step-00000002"], 5, "resume={d}/step-00000002: the checkpoint is damaged (trainer_state.json does not parse", lambda d: (_good_data(d), _damaged_checkpoint(d)), marks=(pytest.mark.slow,)),
    "path-model-missing": Case(["data.path={d}/train.jsonl", "model.name_or_path={d}/no-model"], 4, "model.name_or_path='{d}/no-model' could not be loaded", _good_data),
    "path-model-dir-empty": Case(["data.path={d}/train.jsonl", "model.name_or_path={d}/model"], 4, "model.name_or_path='{d}/model'", lambda d: (_good_data(d), _model_dir_without_files(d))),
    "path-export-without-final": Case(["stage=export"], 2, "stage=export: {run}/final has no adapter_config.json"),
}
BASE = ["recipe=lora-llm", "trainer.max_steps=2", "trainer.micro_batch_size=2", "data.eval_split=null",
        "data.eval_size=0", "trainer.eval_steps=0", "trainer.sample_prompts=0", "logger.plots=false",
        "trainer.progress=false"]


def _cli(args: list[str], prefix: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FINETUNE_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    return subprocess.run([*prefix, sys.executable, "-m", "finetune", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", [pytest.param(n, marks=c.marks) for n, c in CASES.items()])
def test_bad_input_is_one_line_no_traceback_no_final(tmp_path, name):
    case = CASES[name]
    d, run = tmp_path / "d", tmp_path / "run"
    d.mkdir()
    if case.make is not None:
        case.make(d)

    def fill(s: str) -> str:
        return s.replace("{d}", str(d)).replace("{run}", str(run))

    args = [fill(a) for a in case.args]
    base = [b for b in BASE if not (b.startswith("recipe=") and any(a.startswith("recipe=") for a in args))]
    extra = [] if any(a.startswith("output_dir=") for a in args) else [f"output_dir={run}"]
    extra += [] if any(a.startswith("data.cache_dir=") for a in args) else [f"data.cache_dir={tmp_path / 'cache'}"]
    t0 = time.monotonic()
    done = _cli([*base, *extra, *args], case.prefix, tmp_path / "cache")
    seconds = time.monotonic() - t0
    everything = done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0, f"exit 0 for {args}"
    assert "Traceback" not in everything, everything[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert fill(case.phrase) in lines[0], (lines[0], fill(case.phrase))
    assert done.returncode == case.code, (done.returncode, lines[0])
    for out in (run, d / "a-file", d / "held-run", Path("/proc/x")):
        assert not (out / "final").exists()
    assert seconds < 120, f"{name} took {seconds:.0f}s"


def test_the_corpus_is_at_least_40_cases_across_configs_data_and_paths():
    kinds = {n.split("-")[0] for n in CASES}
    assert len(CASES) >= 40 and {"cfg", "data", "stream", "path"} <= kinds

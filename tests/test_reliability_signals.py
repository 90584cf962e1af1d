"""SIGTERM while the data cache is built (``stage=preprocess`` on a generated jsonl, a real
subprocess): a killed builder never leaves a half-written entry for the next run, only its temp
dir, which the next builder removes; the next run builds and then hits the cache as usual.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from data_helpers import alpaca_rows

from finetune.data.cache import load_entry

REPO = Path(__file__).resolve().parent.parent


def _preprocess(data: Path, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "finetune", "recipe=lora-llm", "stage=preprocess",
                             f"data.path={data}", "data.eval_split=null", "data.eval_size=0",
                             f"data.cache_dir={cache}"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float, poll: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"exited {proc.returncode} first: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(poll)


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _temps(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and ".tmp-" in p.name)


def _killed_cleanly(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, err[-2000:])
    assert "Traceback" not in out + err


@pytest.mark.slow
def test_sigterm_while_the_cache_is_built_leaves_no_half_entry(tmp_path):
    data = tmp_path / "big.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows(40_000)))
    cache = tmp_path / "cache"
    root = cache / "data"  # created when preprocessing starts (cache_root)

    # 1. killed while tokenising: nothing at all is published
    proc = _preprocess(data, cache)
    _wait_for(root.exists, proc, timeout=120, poll=0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _killed_cleanly(proc)
    assert _entries(root) == [] and not list(root.glob("*.failed"))

    # 2. killed while the entry is being written: only the builder's temp dir is left
    proc = _preprocess(data, cache)
    _wait_for(lambda: root.exists() and _temps(root), proc, timeout=300, poll=0.002)
    proc.send_signal(signal.SIGTERM)
    _killed_cleanly(proc)
    left = _temps(root)
    assert _entries(root) == [] and len(left) == 1, (left, _entries(root))
    assert left[0].name.endswith(f".tmp-{socket.gethostname()}-{proc.pid}")  # the killed builder's

    # 3. the next run ignores the temp dir, builds the entry and removes the dead builder's temp
    proc = _preprocess(data, cache)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "(built)" in out and "Traceback" not in out + err
    assert _temps(root) == [] and len(_entries(root)) == 1
    arrays, meta = load_entry(_entries(root)[0])
    assert meta["stats"]["train"]["kept"] == 40_000 and len(arrays["train"]) == 40_000

    # 4. and the one after that hits it
    proc = _preprocess(data, cache)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "(hit)" in out, err[-2000:]


def test_a_damaged_published_entry_is_one_data_error(tmp_path):
    from finetune.data.cache import save_entry
    from finetune.data.tokenize import Encoded
    from finetune.errors import DataError

    entry = tmp_path / "data" / "abc"
    save_entry(entry, {"train": Encoded.from_lists([[1, 2, 3]], [[1, 2, 3]]), "eval": None},
               {"stats": {}})
    assert load_entry(entry)[0]["train"].ids.tolist() == [1, 2, 3]
    npz = entry / "train.npz"
    npz.write_bytes(npz.read_bytes()[:40])
    with pytest.raises(DataError) as err:
        load_entry(entry)
    assert f"data cache entry {entry} is damaged" in str(err.value)
    assert f"rm -r {entry}" in str(err.value) and "\n" not in str(err.value)


def test_stale_temps_of_dead_builders_are_removed_live_ones_kept(tmp_path):
    from finetune.data.cache import clean_stale_temps

    host = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        dead = tmp_path / f".k1.tmp-{host}-{2 ** 22 + 11}"
        live = tmp_path / f".k2.tmp-{host}-{sleeper.pid}"
        other_host = tmp_path / f".k3.tmp-elsewhere-{2 ** 22 + 11}"
        old_other = tmp_path / ".k4.tmp-elsewhere-5"
        for d in (dead, live, other_host, old_other):
            d.mkdir()
        os.utime(old_other, (time.time() - 2 * 86400,) * 2)
        assert sorted(clean_stale_temps(tmp_path)) == sorted([dead, old_other])
        assert live.exists() and other_host.exists()
    finally:
        sleeper.kill()
        sleeper.wait()

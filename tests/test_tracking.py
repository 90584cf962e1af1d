"""Experiment tracking with the real libraries, offline: W&B run files, TensorBoard events, report.

W&B 0.31 no longer ships a Python reader for its transaction log (``wandb.sdk.internal.datastore``
is gone and ``wandb sync --view`` was removed), so :func:`wandb_records` reads the ``.wandb``
file directly: a 7-byte header (``:W&B``, magic, version) followed by LevelDB-log framed chunks
(32 KiB blocks; each chunk has crc32, length, type), whose payloads are ``wandb.proto`` Records.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FAST = ["recipe=lora-llm", "trainer.log_steps=1", "trainer.eval_steps=2", "trainer.eval_max_batches=2",
        "trainer.sample_prompts=0", "trainer.progress=false"]


def finetune(args: list[str], tmp_path: Path, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb-env"),
                "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
                "HF_HUB_OFFLINE": "1", "FINETUNE_CACHE": str(tmp_path.parent / "finetune-cache"), **env}
    proc = subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True,
                          timeout=600, env=full_env, cwd=tmp_path)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


# ------------------------------------------------------------------ reading W&B's offline files
def wandb_records(path: Path):
    """Yield the protobuf Records of one ``run-<id>.wandb`` transaction log."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, block, payload = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero fill at the end of the file
            break
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: one complete record
            record = pb.Record()
            record.ParseFromString(payload)
            yield record
            payload = b""


def read_offline_run(run_dir: Path) -> dict:
    """id, name, group, tags, notes, config, history rows and artifacts of an offline run dir."""
    (log,) = run_dir.glob("run-*.wandb")
    out = {"config": {}, "history": [], "artifacts": []}
    for rec in wandb_records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(id=r.run_id, name=r.display_name, group=r.run_group, tags=list(r.tags),
                       notes=r.notes, project=r.project)
            items = r.config.update
        elif kind == "config":
            items = rec.config.update
        elif kind == "artifact":
            out["artifacts"].append((rec.artifact.name, rec.artifact.type))
            continue
        elif kind == "history":
            out["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                   for i in rec.history.item})
            continue
        else:
            continue
        for item in items:
            out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def config_value(config: dict, dotted: str):
    """A nested value of a W&B run config (W&B wraps each top-level key as {"value": ...})."""
    top, *rest = dotted.split(".")
    node = config[top]
    node = node.get("value", node) if isinstance(node, dict) else node
    for key in rest:
        node = node[key]
    return node


def offline_runs(output_dir: Path) -> list[Path]:
    return sorted((output_dir / "wandb").glob("offline-run-*"))


# ------------------------------------------------------------------------------- one real run
@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One training run with W&B (offline) and TensorBoard both on."""
    tmp = tmp_path_factory.mktemp("tracked")
    out = tmp / "my-run"
    proc = finetune([*FAST, "trainer.max_steps=4", "logger=wandb", "logger.tensorboard.enabled=true",
                     "logger.wandb.group=grp", "logger.wandb.tags=[a,b]", "logger.wandb.notes=hello",
                     "logger.wandb.log_artifact=true",
                     f"output_dir={out}"], tmp)
    return out, proc


def test_wandb_offline_run_has_config_and_metrics(tracked_run):
    out, proc = tracked_run
    (run,) = offline_runs(out)
    data = read_offline_run(run)
    assert data["name"] == "my-run" and data["group"] == "grp" and data["tags"] == ["a", "b"]
    assert data["notes"] == "hello" and data["project"] == "finetune"
    assert config_value(data["config"], "optim.lr") == 3e-3
    assert config_value(data["config"], "peft.r") == 8
    assert config_value(data["config"], "output_dir") == str(out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = {r["trainer/step"]: r["loss"] for r in data["history"] if "loss" in r}
    evals = {r["trainer/step"]: r["eval_loss"] for r in data["history"] if "eval_loss" in r}
    assert train == {r["step"]: pytest.approx(r["loss"]) for r in rows if "loss" in r}
    assert evals == {r["step"]: pytest.approx(r["eval_loss"]) for r in rows if "eval_loss" in r}
    assert sorted(train) == [1, 2, 3, 4] and sorted(evals) == [2, 4]
    assert data["artifacts"] == [("my-run-final", "model")]  # logger.wandb.log_artifact
    assert "wandb:" not in proc.stdout + proc.stderr  # the console stays clean


def test_tensorboard_events_have_loss_scalars(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = tracked_run
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert loss == {r["step"]: pytest.approx(r["loss"], rel=1e-6) for r in rows if "loss" in r}
    assert [e.step for e in acc.Scalars("eval/loss")] == [2, 4]
    assert {"train/lr", "train/tokens_per_s", "final/eval_loss"} <= set(acc.Tags()["scalars"])


def test_run_report_png_and_markdown(tracked_run):
    from PIL import Image

    out, _ = tracked_run
    with Image.open(out / "loss_curves.png") as img:
        img.verify()
    with Image.open(out / "loss_curves.png") as img:
        assert img.format == "PNG" and img.size[0] > 300
    report = (out / "report.md").read_text()
    assert "![loss curves](loss_curves.png)" in report and "eval_loss" in report and "## Data" in report


# -------------------------------------------------------------------- multi-process and resume
@pytest.mark.slow
def test_wandb_one_run_for_two_processes(tmp_path):
    out = tmp_path / "ddp"
    finetune([*FAST, "trainer.max_steps=2", "launcher.nproc_per_node=2", "distributed=ddp",
              "logger=wandb", f"output_dir={out}"], tmp_path)
    runs = offline_runs(out)
    assert len(runs) == 1, runs
    assert not (tmp_path / "wandb-env").exists() or not list((tmp_path / "wandb-env").rglob("*.wandb"))
    assert {r.get("trainer/step") for r in read_offline_run(runs[0])["history"]} >= {1, 2}


@pytest.mark.slow
def test_resumed_run_continues_the_wandb_run(tmp_path):
    out = tmp_path / "resume"
    base = [*FAST, "logger=wandb", "trainer.save_steps=2", f"output_dir={out}"]
    finetune([*base, "trainer.max_steps=3"], tmp_path)
    (first,) = offline_runs(out)
    first_id = read_offline_run(first)["id"]
    state = json.loads((out / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["tracker_ids"] == {"wandb": first_id}
    finetune([*base, "trainer.max_steps=5", "resume=auto"], tmp_path)
    runs = offline_runs(out)
    assert len(runs) == 2
    second = read_offline_run(runs[1])
    assert second["id"] == first_id
    assert sorted(r["trainer/step"] for r in second["history"] if "loss" in r) == [3, 4, 5]


# ----------------------------------------------------------------------------------- units
def test_wandb_mode_auto(monkeypatch, tmp_path):
    from finetune.outputs.trackers.wandb import resolve_mode

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_mode("auto") == "offline"
    assert resolve_mode("disabled") == "disabled"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    (tmp_path / "netrc").chmod(0o600)
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode("auto") == "offline"
    assert resolve_mode("online") == "online"


def test_wandb_init_failure_warns_and_training_goes_on(tmp_path, caplog):
    from omegaconf import OmegaConf

    from finetune.config.schema import RunConfig
    from finetune.outputs.trackers.wandb import WandbTracker

    cfg = OmegaConf.structured(RunConfig)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING):
        tracker = WandbTracker(cfg, blocker)
    assert tracker.run is None and tracker.run_id is None
    tracker.log({"step": 1, "loss": 1.0}, 1)
    tracker.finish({})
    warnings = [r for r in caplog.records if "W&B init failed" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()


def test_secrets_are_not_sent_as_config():
    from finetune.outputs.trackers.wandb import scrub

    cfg = {"hub": {"token": "hf_x", "repo_id": "me/x"}, "wandb_api_key": "k", "optim": {"lr": 1.0}}
    assert scrub(cfg) == {"hub": {"repo_id": "me/x"}, "optim": {"lr": 1.0}}


def test_report_from_metrics_file(tmp_path):
    from PIL import Image

    from finetune.outputs.report import write_report

    rows = [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3, "tokens_per_s": 100.0} for s in range(1, 11)]
    rows += [{"step": 5, "eval_loss": 2.7}, {"step": 10, "eval_loss": 2.2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report(tmp_path, {"steps": 10, "eval_loss": 2.2, "recipe": "lora-llm"})
    with Image.open(tmp_path / "loss_curves.png") as img:
        img.verify()
    assert "| eval_loss | 2.2 |" in report.read_text()

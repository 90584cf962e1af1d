"""Sweeps: the W&B sweep YAMLs under recipes/sweeps/, Hydra multirun, and the sweep summary.

wandb 0.31 validates sweep configs with the optional ``sweeps`` package (``wandb[sweeps]``),
which pins numpy<2 and is not installable next to this project's stack; wandb itself ships no
schema. So :func:`sweep_problems` checks the rules of that engine's JSON schema that these files
use (method, metric, parameter kinds and distributions, hyperband, the command macros), and
:func:`parameter_sets` draws parameter sets the way grid / random / bayes would propose them;
each set must compose and validate as our Hydra config with the command's fixed overrides.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SWEEPS = sorted((REPO / "recipes" / "sweeps").glob("*.yaml"))
TOP_KEYS = {"program", "project", "entity", "description", "method", "metric", "parameters", "command",
            "early_terminate", "run_cap", "name"}
DISTRIBUTIONS = {"constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform",
                 "log_uniform_values", "q_log_uniform", "q_log_uniform_values", "inv_log_uniform",
                 "inv_log_uniform_values", "normal", "q_normal", "log_normal", "q_log_normal", "beta",
                 "q_beta"}
MACROS = {"${env}", "${interpreter}", "${program}", "${args}", "${args_no_hyphens}", "${args_json}",
          "${args_json_file}", "${args_no_boolean_flags}"}


def sweep_problems(sweep: dict) -> list[str]:
    """What the W&B sweeps engine's schema would reject (plus what our command needs)."""
    problems = [f"unknown top-level key {k!r}" for k in sweep if k not in TOP_KEYS]
    method = sweep.get("method")
    if method not in ("grid", "random", "bayes"):
        problems.append(f"method={method!r}")
    metric = sweep.get("metric") or {}
    if metric.get("goal") not in ("minimize", "maximize") or not metric.get("name"):
        problems.append(f"metric needs name and goal minimize|maximize: {metric}")
    params = sweep.get("parameters") or {}
    if not params:
        problems.append("no parameters")
    for name, spec in params.items():
        kind = [k for k in ("value", "values", "distribution") if k in spec]
        if "min" in spec and "max" in spec and not kind:
            kind = ["distribution"]  # the engine infers uniform / int_uniform
        if len(kind) != 1:
            problems.append(f"{name}: exactly one of value / values / distribution+min+max")
            continue
        if kind == ["values"] and not (isinstance(spec["values"], list) and spec["values"]):
            problems.append(f"{name}: values must be a non-empty list")
        if kind == ["distribution"]:
            dist = spec.get("distribution", "uniform")
            if dist not in DISTRIBUTIONS:
                problems.append(f"{name}: distribution {dist!r}")
            elif not spec.get("min", 0) < spec.get("max", 0):
                problems.append(f"{name}: needs min < max")
            elif dist.endswith("_values") and spec["min"] <= 0:
                problems.append(f"{name}: {dist} needs min > 0")
            elif dist == "int_uniform" and not all(isinstance(spec[k], int) for k in ("min", "max")):
                problems.append(f"{name}: int_uniform needs integer min/max")
        if method == "grid" and kind == ["distribution"] and spec.get("distribution") != "int_uniform":
            problems.append(f"{name}: grid search needs discrete values")
    stop = sweep.get("early_terminate")
    if stop is not None:
        if stop.get("type") != "hyperband" or set(stop) - {"type", "min_iter", "max_iter", "s", "eta", "strict"}:
            problems.append(f"early_terminate: {stop}")
        elif not (isinstance(stop.get("min_iter"), int) and stop["min_iter"] >= 1) \
                and not ("max_iter" in stop and "s" in stop):
            problems.append("early_terminate: hyperband needs min_iter >= 1 (or max_iter and s)")
    command = sweep.get("command") or []
    unknown = [c for c in command if str(c).startswith("${") and c not in MACROS]
    if unknown:
        problems.append(f"unknown command macros {unknown}")
    if command[1:4] != ["${interpreter}", "-m", "finetune"] or "${args_no_hyphens}" not in command:
        problems.append("command must run ${interpreter} -m finetune ... ${args_no_hyphens}")
    return problems


def parameter_sets(sweep: dict, n: int = 6, seed: int = 0) -> list[dict]:
    """Every grid point, or ``n`` random draws (bayes starts from random draws too)."""
    params = sweep["parameters"]
    if sweep["method"] == "grid":
        names = list(params)
        choices = [spec["values"] if "values" in spec else [spec["value"]] for spec in params.values()]
        return [dict(zip(names, combo)) for combo in itertools.product(*choices)]
    rng = random.Random(seed)
    draws = []
    for i in range(n):
        draw = {}
        for name, spec in params.items():
            if "value" in spec:
                draw[name] = spec["value"]
            elif "values" in spec:
                draw[name] = rng.choice(spec["values"])
            else:
                lo, hi, dist = spec["min"], spec["max"], spec.get("distribution", "uniform")
                # the bounds themselves on the first two draws, then random points
                u = {0: 0.0, 1: 1.0}.get(i, rng.random())
                if dist == "int_uniform":
                    draw[name] = lo + round(u * (hi - lo))
                elif dist == "log_uniform_values":
                    draw[name] = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
                else:
                    draw[name] = lo + u * (hi - lo)
        draws.append(draw)
    return draws


def fixed_overrides(command: list) -> list[str]:
    return [c for c in command[4:] if not str(c).startswith("${")]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from finetune.config import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides)
    validate(cfg)
    return cfg


def test_sweep_yamls_are_shipped():
    assert {p.stem for p in SWEEPS} >= {"lora-lr", "lora-random", "lora-bayes"}
    assert {yaml.safe_load(p.read_text())["method"] for p in SWEEPS} == {"grid", "random", "bayes"}


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_yaml_is_valid_and_every_parameter_set_composes(path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep_problems(sweep) == []
    assert sweep["metric"] == {"name": "eval_loss", "goal": "minimize"}
    fixed = fixed_overrides(sweep["command"])
    assert "recipe=lora-llm" in fixed and "logger=wandb" in fixed
    sets = parameter_sets(sweep)
    assert sets
    for params in sets:
        # exactly the words `wandb agent` builds for ${args_no_hyphens}: f"{name}={value}"
        cfg = compose(fixed + [f"{k}={v}" for k, v in params.items()])
        for key, value in params.items():
            got = cfg
            for part in key.split("."):
                got = got[part]
            assert got == pytest.approx(value), key


def test_sweep_validator_rejects_broken_configs():
    good = yaml.safe_load((REPO / "recipes" / "sweeps" / "lora-random.yaml").read_text())
    assert sweep_problems({**good, "method": "hyperopt"})
    assert sweep_problems({**good, "metric": {"name": "eval_loss", "goal": "lowest"}})
    assert sweep_problems({**good, "parameters": {"optim.lr": {"distribution": "log_uniform_values",
                                                               "min": 0.0, "max": 1.0}}})
    assert sweep_problems({**good, "method": "grid"})  # continuous parameters in a grid
    assert sweep_problems({**good, "early_terminate": {"type": "hyperband"}})


def test_wandb_sweep_trial_gets_its_own_run_dir(monkeypatch):
    from finetune.train.run_dir import resolve_run_dir

    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    monkeypatch.setenv("WANDB_RUN_ID", "run42")
    cfg = compose(["recipe=lora-llm"])
    assert resolve_run_dir(cfg) == (Path("runs") / "sweep-abc123" / "run42").resolve()


# ------------------------------------------------------------------------------ sweep summary
def fake_run(path: Path, lr: float, eval_loss: float | None, finished: bool = True) -> None:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"optim": {"lr": lr, "name": "adamw"},
                                                      "output_dir": str(path), "seed": 42}))
    if finished:
        (path / "summary.json").write_text(json.dumps({"eval_loss": eval_loss, "last_loss": 1.0,
                                                       "tokens_per_s": 500.0, "steps": 10}))
    else:
        (path / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 2.5, "lr": lr, "tokens_per_s": 9.0}) + "\n")


def test_sweep_summary_orders_best_first(tmp_path, capsys):
    from finetune.outputs.sweep_summary import main

    fake_run(tmp_path / "0", 1e-3, 2.5)
    fake_run(tmp_path / "1", 3e-3, 2.1)
    fake_run(tmp_path / "2", 1e-2, None, finished=False)
    assert main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "optim.lr", "eval_loss", "last_loss", "tokens_per_s", "steps", "status"]
    assert [line.split()[0] for line in lines[1:4]] == ["1", "0", "2"]
    assert lines[3].split()[-1] == "unfinished"
    csv_rows = (tmp_path / "sweep_summary.csv").read_text().splitlines()
    assert csv_rows[1].startswith("1,0.003,2.1,")
    assert "| 1 | 0.003 | 2.1 |" in (tmp_path / "sweep_summary.md").read_text()


def test_sweep_summary_without_runs_is_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "finetune.outputs.sweep_summary", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: no run dirs")


# ------------------------------------------------------------------------ Hydra multirun, real
@pytest.mark.slow
def test_hydra_multirun_two_points_and_summary(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "FINETUNE_CACHE": str(tmp_path / "cache")}
    fixed = ["recipe=lora-llm", "trainer.max_steps=3", "trainer.log_steps=1", "trainer.eval_max_batches=2",
             "trainer.sample_prompts=0", "trainer.progress=false"]

    def finetune(*args, multirun=False):
        flags = ["-m"] if multirun else []  # Hydra's flags go before the overrides
        proc = subprocess.run([sys.executable, "-m", "finetune", *flags, *fixed, *args], capture_output=True,
                              text=True, timeout=600, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    sweep_dir = tmp_path / "multirun"
    finetune("optim.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep_dir}", multirun=True)
    for num, lr in ((0, 1e-3), (1, 2e-3)):
        run = sweep_dir / str(num)
        assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == lr
        assert json.loads((run / "summary.json").read_text())["steps"] == 3
        assert (run / "loss_curves.png").is_file()
    # No state leaks from job 0 into job 1 (accelerate's singletons are reset between jobs):
    # job 1 trains exactly like the same run alone in a fresh process.
    finetune("optim.lr=2e-3", f"output_dir={tmp_path / 'alone'}")

    def losses(run):
        return [r.get("loss", r.get("eval_loss")) for r in map(json.loads, (run / "metrics.jsonl").open())]

    assert losses(sweep_dir / "1") == losses(tmp_path / "alone")

    proc = subprocess.run([sys.executable, "-m", "finetune.outputs.sweep_summary", str(sweep_dir)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout.splitlines()
    assert table[0].split()[:2] == ["run", "optim.lr"]
    assert sorted(line.split()[0] for line in table[1:3]) == ["0", "1"]
    evals = [json.loads((sweep_dir / n / "summary.json").read_text())["eval_loss"] for n in ("0", "1")]
    assert table[1].split()[0] == str(evals.index(min(evals)))
    assert (sweep_dir / "sweep_summary.md").is_file() and (sweep_dir / "sweep_summary.csv").is_file()

"""``python -m finetune recipe=<name> [key=value ...]`` — the command-line entry.

Stages (``stage=``): ``train`` (default), ``preprocess`` (tokenise + cache the data only, e.g. on
CPU nodes before a GPU job), ``export`` (merge an adapter into its base model), ``chat`` (a Gradio chat
over a run's model next to its base), ``space`` (push that chat as a Hub Space). ``dry_run=true``
prints the plan (parameters, batch sizes, steps, memory estimate) without training.

Overrides are checked before anything heavy is built: every unknown key, wrong type or bad
choice is printed, one line each naming the key and the valid choices, and the exit status is 2.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from finetune.config import problems, register_configs, validate
from finetune.errors import EXIT_CONFIG_ERROR, FinetuneError


def _config_dir() -> str:
    repo = Path(__file__).resolve().parent.parent / "conf"
    packaged = Path(__file__).resolve().parent / "_configs" / "conf"
    return str(repo if repo.is_dir() else packaged)


CONFIG_DIR = _config_dir()
HYDRA_FLAGS_WITHOUT_RUN = ("--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc")


def fail(lines: list[str], code: int = EXIT_CONFIG_ERROR) -> None:
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    sys.exit(code)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars on every save


def run(cfg) -> int:
    """Run one job from a composed config; returns the exit status."""
    validate(cfg)
    launcher = cfg.launcher
    if (launcher.nproc_per_node > 1 or launcher.nnodes > 1) and not os.environ.get("FINETUNE_LAUNCHED") \
            and "RANK" not in os.environ:
        from finetune.distributed.launch import launch

        return launch(_overrides(), launcher.nproc_per_node, launcher.nnodes, launcher.node_rank,
                      launcher.master_addr, launcher.master_port)
    if cfg.dry_run:
        from finetune.train.dry_run import print_plan

        print_plan(cfg)
        return 0
    from finetune.train.stages import STAGES

    return STAGES[cfg.stage](cfg)


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def _task(cfg) -> None:
    try:
        code = run(cfg)
    except FinetuneError as exc:
        fail(exc.lines(), exc.exit_code)
    if code:
        sys.exit(code)


def compose_problems(overrides: list[str]) -> list[str]:
    """Every problem of the override set, one line each.

    Hydra stops at the first bad override, so the one it names is set aside and the rest composed
    again, until the set composes; the composed config's own checks (:func:`problems`) follow."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from finetune.config.explain import explain, override_named

    found, remaining = [], list(overrides)
    while True:
        try:
            with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
                cfg = compose("config", overrides=remaining)
        except (HydraException, OmegaConfBaseException) as exc:
            line = explain(exc, remaining, CONFIG_DIR)
            if line not in found:
                found.append(line)
            culprit = override_named(exc, remaining)
            if culprit is None:
                return found
            remaining.remove(culprit)
            continue
        return found + problems(cfg)


def precheck(overrides: list[str]) -> None:
    """Compose the config once, before Hydra runs the job, turning errors into one line each."""
    found = compose_problems(overrides)
    if found:
        fail(found)


def main() -> None:
    register_configs()
    argv = sys.argv[1:]
    multirun = any(a in ("-m", "--multirun") for a in argv)
    if not multirun and not any(a in HYDRA_FLAGS_WITHOUT_RUN for a in argv):
        precheck([a for a in argv if "=" in a and not a.startswith("-")])
    _setup_logging()
    import hydra

    worker = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")(_task)()
    except SystemExit as exc:
        if not worker or not isinstance(exc.code, int):
            raise
        _exit_worker(exc.code)
    if worker:
        _exit_worker(0)


def _exit_worker(code: int) -> None:
    """A worker of a multi-process run exits with its status (0, 75 after a preemption checkpoint, an
    error's) without the interpreter's teardown: gloo's threads met in static destructors have
    aborted finished workers with "terminate called without an active exception" (exit 134; seen in
    2-rank FSDP runs on CPU, after "model written"), turning a run that succeeded into a failure."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    main()

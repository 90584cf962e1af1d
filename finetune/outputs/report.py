"""End-of-run report: ``loss_curves.png`` and ``report.md`` in the run dir (``logger.plots``).

Built from the run dir's own files (``metrics.jsonl``, ``summary.json``, ``exact_match.json``), so it can also be
regenerated later: ``python -m finetune.outputs.report <run_dir>``. Main process only; matplotlib is
used through its object API with the Agg canvas (no pyplot, no global backend switch), which
keeps it well under a second.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from finetune.outputs.exact_match import exact_match_line, read_result


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) of ``metrics.jsonl``; empty lists when the file is missing."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


# Reward curves, where a task logs them: GRPO's mean reward, the preference tasks' margin / accuracy.
REWARD_KEYS = ("reward", "rewards/margin", "rewards/accuracy")


def plot_loss_curves(train: list[dict], evals: list[dict], path: Path) -> Path:
    """Train and eval loss (left) and learning rate (right) against the optimizer step; a third
    panel with the reward curves (train and eval) when the rows carry :data:`REWARD_KEYS`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rewards = [k for k in REWARD_KEYS if any(k in r for r in train) or any(f"eval_{k}" in r for r in evals)]
    fig = Figure(figsize=(15 if rewards else 10, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if rewards else 2)
    loss_ax, lr_ax = axes[0], axes[1]
    if rewards:
        reward_ax = axes[2]
        for k in rewards:
            rows = [r for r in train if k in r]
            if rows:
                reward_ax.plot([r["step"] for r in rows], [r[k] for r in rows], label=f"train {k}", lw=1.2)
            rows = [r for r in evals if f"eval_{k}" in r]
            if rows:
                reward_ax.plot([r["step"] for r in rows], [r[f"eval_{k}"] for r in rows], "o-", ms=4, lw=1.2,
                               label=f"eval {k}")
        reward_ax.set(title="rewards", xlabel="step")
        reward_ax.grid(alpha=0.3)
        reward_ax.legend()
    if train:
        loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1.2)
        lr_ax.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green", lw=1.2)
    if evals:
        loss_ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-",
                     label="eval loss", color="tab:orange", lw=1.2, ms=4)
    loss_ax.set(title="loss", xlabel="step", ylabel="loss")
    lr_ax.set(title="learning rate", xlabel="step", ylabel="lr")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in (loss_ax, lr_ax):
        ax.grid(alpha=0.3)
    if train or evals:
        loss_ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def report_markdown(run_dir: Path, summary: dict, image: str | None, exact: dict | None = None) -> str:
    figures = ["steps", "first_loss", "last_loss", "eval_loss", "eval_accuracy", "eval_reward", "eval_reward_accuracy",
               "best_eval_loss",
               "best_step", "tokens_per_s", "tokens_seen", "wall_time_s", "world_size", "device"]
    lines = [f"# Run report: {Path(run_dir).name}", "", f"Recipe: `{summary.get('recipe', '-')}`", "",
             "| figure | value |", "|---|---|"]
    if exact:
        lines[4:4] = [exact_match_line(exact.get("before"), exact.get("after")), ""]
    lines += [f"| {k} | {_fmt(summary[k])} |" for k in figures if summary.get(k) is not None]
    params = summary.get("parameters") or {}
    if params.get("total"):
        lines.append(f"| parameters (trainable / total) | {_fmt(params.get('trainable'))} / "
                     f"{_fmt(params['total'])} ({100 * params.get('trainable', 0) / params['total']:.2f}%) |")
    if image:
        lines += ["", f"![loss curves]({image})"]
    data = summary.get("data") or {}
    splits = [(name, data[name]) for name in ("train", "eval") if isinstance(data.get(name), dict)]
    if splits:
        keys = [k for k in splits[0][1] if not isinstance(splits[0][1][k], (list, dict))]
        lines += ["", "## Data", "", "| split | " + " | ".join(keys) + " |",
                  "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(_fmt(s.get(k)) for k in keys) + " |" for name, s in splits]
        lines += ["", f"Packing: {_fmt(data.get('packing'))}; training rows: {_fmt(data.get('rows'))}"]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, summary: dict | None = None) -> Path:
    """Write ``loss_curves.png`` and ``report.md`` into ``run_dir``; returns the report's path."""
    run_dir = Path(run_dir)
    if summary is None:
        path = run_dir / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else {}
    train, evals = read_metrics(run_dir)
    image = None
    if train or evals:
        image = plot_loss_curves(train, evals, run_dir / "loss_curves.png").name
    out = run_dir / "report.md"
    out.write_text(report_markdown(run_dir, summary, image, read_result(run_dir)))
    return out


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["."]:
        print(write_report(Path(arg)))

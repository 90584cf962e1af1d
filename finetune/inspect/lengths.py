"""Sequence lengths before and after ``data.max_seq_len`` (histogram PNG) and the data figures of
``stage=inspect``, taken from the pipeline's own counts (data_stats)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_lengths(before: np.ndarray, after: np.ndarray, max_len: int, path: Path) -> Path:
    """Overlaid histograms of the lengths as rendered and as trained, ``max_seq_len`` marked.
    matplotlib's object API with the Agg canvas (no pyplot), as the run report."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    top = max(int(before.max(initial=1)), int(after.max(initial=1)), max_len)
    bins = np.linspace(0, top + 1, min(60, top + 2))
    ax.hist(before, bins=bins, alpha=0.5, label=f"before truncation ({len(before)})", color="tab:blue")
    ax.hist(after, bins=bins, alpha=0.5, label=f"as trained ({len(after)})", color="tab:orange")
    ax.axvline(max_len, color="tab:red", ls="--", lw=1, label=f"data.max_seq_len={max_len}")
    ax.set(title="sequence lengths (tokens)", xlabel="tokens", ylabel="sequences")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def describe(lengths: np.ndarray) -> str:
    if len(lengths) == 0:
        return "-"
    p50, p95 = np.percentile(lengths, [50, 95])
    return f"min {lengths.min()}, median {p50:.0f}, p95 {p95:.0f}, max {lengths.max()}"


def data_figures(stats: dict, before: np.ndarray, after: np.ndarray) -> dict:
    """The figures shown in the log and inspect.html: the train split's counts from data_stats
    (read / kept / truncated / dropped / skipped), packing, and the length spread."""
    train = stats.get("train", {})
    figures = {k: train[k] for k in ("read", "kept", "truncated", "dropped_overlong", "dropped_no_target",
                                     "skipped_bad", "tokens", "target_tokens") if k in train}
    packing = (stats.get("packing") or {}).get("train")
    figures["packing"] = (f"{packing['rows']} rows, {100 * packing['packing_efficiency']:.1f}% filled"
                          if packing else "off")
    figures["lengths before truncation"] = describe(before)
    figures["lengths as trained"] = describe(after)
    return figures

"""The training run's plot: metrics.jsonl rows -> metrics.png (four panels against the step).

It does not: read anything but metrics.jsonl, or need a display (matplotlib's Figure, no pyplot).
"""
from __future__ import annotations

from pathlib import Path

from r3.jsonl import read_jsonl


def plot_metrics(path: Path, png: Path) -> None:
    """train.py's metrics.png: reward, second-try success, zero-variance groups and trained tokens per step."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing global

    rows = [r for r in read_jsonl(path) if "reward" in r]
    keys = [("reward", "mean reward"), ("second_try_success", "second-try success (>=1 of G)"),
            ("zero_variance_frac", "zero-variance groups"), ("reflection_len", "reflection length (tokens)")]
    fig = Figure(figsize=(16, 3.2), layout="tight")
    for ax, (k, title) in zip(fig.subplots(1, 4), keys):
        ax.plot([r["step"] for r in rows], [r[k] for r in rows], marker=".")
        ax.set(title=title, xlabel="step")
    fig.savefig(png, dpi=80)

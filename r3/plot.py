"""The training run's plot: metrics.jsonl rows -> metrics.png (four panels against the step).

It does not: read anything but metrics.jsonl, or need a display (matplotlib's Figure, no pyplot).
"""
from __future__ import annotations

from pathlib import Path

from r3.jsonl import read_jsonl


def plot_metrics(path: Path, png: Path) -> None:
    """train.py's metrics.png: held-out accuracy (first and +reflection second try, step 0 = untrained) at
    each evaluation, then reward, groups with reward variance and trained tokens per step."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing global

    rows = read_jsonl(path)
    steps = [r for r in rows if "reward" in r]
    evals = [r for r in rows if "eval_n" in r]
    fig = Figure(figsize=(16, 3.2), layout="tight")
    axes = fig.subplots(1, 4)
    for k, label in (("eval_first", "first try"), ("eval_second", "+reflection second try")):
        axes[0].plot([r["step"] for r in evals], [100 * r[k] for r in evals], marker="o", label=label)
    axes[0].set(title=f"held-out accuracy % (n={evals[-1]['eval_n'] if evals else 0})", xlabel="step")
    axes[0].legend(fontsize="small")
    keys = [("reward", "mean reward (retries)", 1), ("zero_variance_frac", "groups with reward variance", -1),
            ("reflection_len", "trained tokens per row", 1)]
    for ax, (k, title, sign) in zip(axes[1:], keys):
        ax.plot([r["step"] for r in steps], [r[k] if sign > 0 else 1 - r[k] for r in steps], marker=".")
        ax.set(title=title, xlabel="step")
    fig.savefig(png, dpi=80)

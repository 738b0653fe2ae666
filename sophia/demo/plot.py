"""The loss curves of a comparison as a PNG (``loss.png``)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sophia.demo.train import RunResult

__all__ = ["plot_losses"]


def _smooth(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Centred running mean of a per-step loss curve: ``(steps, means)`` for plotting."""
    v = np.asarray(values, np.float64)
    w = max(3, len(v) // 40) | 1
    if len(v) < w:
        return np.arange(1, len(v) + 1), v
    means = np.convolve(v, np.ones(w) / w, mode="valid")
    return np.arange(1, len(means) + 1) + w // 2, means


def plot_losses(
    results: Sequence[RunResult], path: str | os.PathLike[str], title: str = ""
) -> Path:
    """Writes the loss curves (training, smoothed, and validation) of ``results`` to a PNG.

    The left panel shows whole runs, the right one the second half, where the
    optimizers separate. Matplotlib runs on the Agg backend (no display needed).

    Args:
      results: the runs to draw.
      path: the PNG to write.
      title: the figure's title.

    Returns:
      The path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    colors = {"sophiag": "tab:blue", "adamw": "tab:orange"}
    styles = {"jax": "-", "torch": "--"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    n_steps = max((len(r.train_loss) for r in results), default=1)
    for ax, start in zip(axes, (0, n_steps // 2)):
        for r in results:
            c, ls = colors[r.optimizer.name], styles.get(r.framework, "-.")
            name = f"{r.optimizer.label} ({r.framework})"
            steps, train_s = _smooth([v if math.isfinite(v) else np.nan for v in r.train_loss])
            keep = steps >= start
            ax.plot(
                steps[keep], train_s[keep], ls, color=c, alpha=0.35, lw=1, label=f"{name} train"
            )
            vs = np.asarray(r.val_steps)
            vl = np.asarray(r.val_loss)
            keep = vs >= start
            ax.plot(vs[keep], vl[keep], ls, color=c, marker="o", ms=3, lw=1.8, label=f"{name} val")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/byte)")
        ax.grid(alpha=0.3)
    axes[0].set_title("whole run")
    axes[1].set_title("second half")
    finals = [v for r in results for v in r.val_loss[1:] if math.isfinite(v)]
    if finals:
        axes[0].set_ylim(min(finals) - 0.1, max(finals[: len(finals)]) + 0.1)
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

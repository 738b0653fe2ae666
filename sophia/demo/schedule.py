"""The learning rate of every update: linear warm-up, then a cosine decay.

Defined once here; the torch backend sets :func:`lr_at` on its param groups
before each update and the JAX backend looks the same values up in
:func:`lr_table` inside its compiled step.
"""

from __future__ import annotations

import math

import numpy as np

from sophia.demo.config import OptimConfig, RunConfig

__all__ = ["lr_at", "lr_table"]


def lr_at(step: int, opt: OptimConfig, cfg: RunConfig) -> float:
    """The learning rate of update ``step`` (0-based): linear warm-up, then cosine decay.

    ``lr * (step + 1) / warmup`` for ``step < warmup``; afterwards a cosine
    from ``lr`` down to ``min_lr_ratio * lr`` at step ``steps - 1``. Every
    backend must reproduce this (the JAX one is checked against it).
    """
    peak, floor = opt.lr, opt.lr * cfg.min_lr_ratio
    if step < cfg.warmup:
        return peak * (step + 1) / cfg.warmup
    span = max(cfg.steps - 1 - cfg.warmup, 1)
    frac = min(max((step - cfg.warmup) / span, 0.0), 1.0)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * frac))


def lr_table(opt: OptimConfig, cfg: RunConfig) -> np.ndarray:
    """:func:`lr_at` of updates ``0, 1, ..., n - 1``, enough to look up any update count.

    ``n`` is where the schedule has reached its floor for good (the end of the
    cosine, or one step past the warm-up when the run is shorter than it), so
    ``table[min(step, n - 1)] == lr_at(step, opt, cfg)`` for every ``step >= 0``.

    Returns:
      The learning rates as float64.
    """
    n = max(cfg.steps, cfg.warmup + 2)
    return np.array([lr_at(step, opt, cfg) for step in range(n)], np.float64)

"""Statistics of timing samples: medians, minima and ratios paired by round."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any


def describe(wall_ms: Sequence[float], cpu_ms: Sequence[float] | None = None) -> dict[str, Any]:
    """Median, minimum and maximum of the samples (and of their CPU times when given).

    The median is the figure to compare (robust to a few slow calls); the
    minimum is what the machine can do when nothing interferes.
    """
    d: dict[str, Any] = {
        "median_ms": statistics.median(wall_ms),
        "min_ms": min(wall_ms),
        "max_ms": max(wall_ms),
        "repeats": len(wall_ms),
        "samples_ms": list(wall_ms),
    }
    if cpu_ms is not None:
        d.update(
            cpu_median_ms=statistics.median(cpu_ms),
            cpu_min_ms=min(cpu_ms),
            cpu_samples_ms=list(cpu_ms),
        )
    return d


def ratio(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """``a / b`` of the medians, of the minima, and the median of the per-round ratios.

    ``a`` and ``b`` are samples of the same rounds (index ``r`` of both ran in
    round ``r``, within seconds of each other), so the paired figure cancels
    load that drifts between rounds.
    """
    return {
        "of_medians": statistics.median(a) / statistics.median(b),
        "of_minima": min(a) / min(b),
        "paired_median": statistics.median(x / y for x, y in zip(a, b)),
    }

"""The interleaved timer: every variant called once per round, rounds repeated.

Timing the variants one after the other lets a burst of background load land
on one of them; one call of each per round spreads it over all, and a ratio
taken within a round (:func:`harness.stats.ratio`'s ``paired_median``)
cancels slow drifts altogether.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

#: Times one call: ``(wall seconds, CPU seconds of this process, all threads)``.
Clock = Callable[[Callable[[], object]], tuple[float, float]]
#: The order of round ``r`` over the variants' names.
Order = Callable[[Sequence[str], int], list[str]]


def wall_and_cpu(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and process CPU time of one call of ``fn``, which returns once its work is done.

    CPU time counts every thread of this process and none of the others, so it
    is less sensitive to other processes taking the cores (though not to them
    taking memory bandwidth).
    """
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def rotating(names: Sequence[str], r: int) -> list[str]:
    """Round ``r`` starts one name later than round ``r - 1``: no variant always follows another."""
    k = r % len(names)
    return [*names[k:], *names[:k]]


def shuffled(seed: int | Sequence[int]) -> Order:
    """A fresh seeded random order every round."""
    rng = np.random.default_rng(seed)
    return lambda names, r: [names[i] for i in rng.permutation(len(names))]


@dataclass
class Samples:
    """Per variant, one sample per round (index ``r`` is round ``r`` for every variant)."""

    wall_ms: dict[str, list[float]] = field(default_factory=dict)
    cpu_ms: dict[str, list[float]] = field(default_factory=dict)


def interleave(
    calls: Mapping[str, Callable[[], object]],
    rounds: int,
    *,
    warmup: int = 0,
    order: Order = rotating,
    clock: Clock = wall_and_cpu,
    before_round: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> Samples:
    """Calls every variant ``warmup`` times untimed, then once per round for ``rounds`` rounds.

    Args:
      calls: the variants; each call must return once its work is finished
        (JAX: ``block_until_ready``; CUDA: a ``clock`` that synchronises).
      rounds: timed rounds.
      warmup: untimed calls of each variant first (compilation, allocation).
      order: the order of each round (:func:`rotating` by default).
      clock: how one call is timed (:func:`wall_and_cpu` by default).
      before_round: prepares round ``r`` untimed (say, the round's batch).
      log: where to say how the warm-up and each round went (``None``: silent).

    Returns:
      The samples, in milliseconds.
    """
    names = list(calls)
    for name in names:
        t0 = time.perf_counter()
        for _ in range(warmup):
            calls[name]()
        if log and warmup:
            log(f"  warm-up {name}: {time.perf_counter() - t0:.2f} s for {warmup} call(s)")
    out = Samples({k: [] for k in names}, {k: [] for k in names})
    for r in range(rounds):
        if before_round:
            before_round(r)
        for name in order(names, r):
            wall, cpu = clock(calls[name])
            out.wall_ms[name].append(1e3 * wall)
            out.cpu_ms[name].append(1e3 * cpu)
        if log:
            log(f"  round {r + 1}/{rounds} done, load {os.getloadavg()[0]:.2f}")
    return out

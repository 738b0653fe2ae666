"""The paper's diagnostics: the win rate and the momentum norm, and reading them back.

Why the reductions depend on the backend and on tracing, once: XLA:CPU
contracts ``a*b+c`` into fused multiply-adds inside a compiled computation,
and compiles the plain ``sum(r < 1)`` and ``sum(m**2)`` into full-size
temporaries (``r`` and an int32 copy of the mask) reduced in separate loops.
Compiled for CPU, each leaf therefore gets one reduction of two operands,
``[clipped, m**2]``, which XLA:CPU makes a single loop that reads the new
momentum and ``h`` once and recomputes ``r`` inside it. Run op by op, the
reductions stay plain: that loop would be compiled as a whole and its
fused multiply-adds could make the count drift from the op-by-op update.
Other backends take the plain form either way.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sophia.jax.state import find_states
from sophia.jax.step import ClipInputs, clip_ratio

__all__ = ["diagnostics"]


def win_rate_and_norm(
    inputs: list[ClipInputs], n_total: int, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """The win rate and the momentum norm of one step's :class:`ClipInputs`.

    Exact: the count is an int32 sum of zeros and ones. A coordinate is
    clipped when ``not r < 1``, so a NaN ``r`` counts as clipped, as in the spec.

    Args:
      inputs: per real part, what its clip ratio reads.
      n_total: the number of real coordinates.
      dtype: the scalar dtype of the results.

    Returns:
      ``(win_rate, momentum_norm)``.
    """
    staged = any(isinstance(x, jax.core.Tracer) for leaf in inputs for x in leaf[:2])
    if staged and jax.default_backend() == "cpu":
        n_clipped, msq = _two_operand_reductions(inputs, dtype)
    else:
        n_clipped, msq = _plain_reductions(inputs, dtype)
    n_win = jnp.asarray(n_total, jnp.int32) - n_clipped
    # The barrier keeps XLA from turning the division into a product with a rounded
    # reciprocal of the constant, which is not the correctly rounded quotient.
    total = jax.lax.optimization_barrier(jnp.asarray(max(n_total, 1), dtype))
    return n_win.astype(dtype) / total, jnp.sqrt(msq)


def _plain_reductions(inputs: list[ClipInputs], dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """``(n_clipped, sum(m**2))`` as plain per-leaf reductions."""
    n_clipped, msq = jnp.zeros([], jnp.int32), jnp.zeros([], dtype)
    for x in inputs:
        n_clipped += jnp.sum(~(clip_ratio(*x) < 1), dtype=jnp.int32)
        msq += jnp.sum(jnp.square(x.m.astype(dtype)))
    return n_clipped, msq


def _two_operand_reductions(
    inputs: list[ClipInputs], dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """``(n_clipped, sum(m**2))`` with one reduction of two operands per leaf (compiled CPU).

    An optimization barrier in front keeps XLA from fusing the loop into the
    update's, which would read ``g`` and the old momentum again.
    """
    n_clipped, msq = jnp.zeros([], jnp.int32), jnp.zeros([], dtype)
    for x in inputs:
        if not x.m.size:
            continue
        x = jax.lax.optimization_barrier(x)
        r = clip_ratio(*x)
        clipped = jnp.where(r < jnp.ones([], r.dtype), 0, 1).astype(jnp.int32)
        count, sq = jax.lax.reduce(
            (clipped, jnp.square(x.m.astype(dtype))),
            (jnp.zeros([], jnp.int32), jnp.zeros([], dtype)),
            lambda a, b: (a[0] + b[0], a[1] + b[1]),
            tuple(range(x.m.ndim)),
        )
        n_clipped, msq = n_clipped + count, msq + sq
    return n_clipped, msq


def diagnostics(opt_state: optax.OptState) -> dict[str, Any]:
    """Reads the paper's diagnostics from an optimizer state.

    Args:
      opt_state: the state of :func:`sophia.jax.sophia_g` or of any chain holding it.

    Returns:
      ``{"win_rate", "rho", "hessian_norm", "momentum_norm", "count"}`` of the
      (first) :class:`~sophia.jax.ScaleBySophiaState` inside ``opt_state``.

    Raises:
      ValueError: ``opt_state`` holds no Sophia state.
    """
    states = find_states(opt_state)
    if not states:
        raise ValueError("diagnostics: opt_state holds no ScaleBySophiaState")
    s = states[0]
    return {
        "win_rate": s.win_rate,
        "rho": s.rho,
        "hessian_norm": s.hessian_norm,
        "momentum_norm": s.momentum_norm,
        "count": s.count,
    }

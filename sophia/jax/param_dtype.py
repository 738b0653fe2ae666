"""The last link of :func:`sophia.jax.sophia_g`: updates in the parameters' dtype.

See :func:`to_param_dtype` for why and how; docs/spec.md lists the cases no
update of the parameters' dtype can reach.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sophia.jax.real_pairs import is_complex, join_parts, real_parts

__all__ = ["to_param_dtype"]


def to_param_dtype() -> optax.GradientTransformation:
    r"""Updates in the parameters' dtype that :func:`optax.apply_updates` turns into one rounding.

    The last link of :func:`sophia.jax.sophia_g`. The chain before it computes
    the update ``u`` of a bfloat16/float16 parameter ``p`` in float32; the spec
    rounds the new parameter once, ``new = round(p + u)``. optax's contract is
    that updates have the parameters' dtype, and ``apply_updates`` then adds in
    that dtype. This transform returns ``d`` of ``p``'s dtype with
    ``p + d == new`` bit for bit wherever any such ``d`` exists: the difference
    ``new - p`` rounded to ``p``'s dtype (exact when ``new`` and ``p`` are within
    a factor 2 of each other, by Sterbenz's lemma, so ``p + d`` gives ``new``
    back), or, where that rounding loses the target, its neighbour one ulp
    towards it. Where no ``d`` reaches ``new`` (a step larger than ``|p| / 2``
    that lands between the sums ``p + d`` can give, or ``new = -0`` from
    ``p != -0``), ``apply_updates`` gives a value within one ulp of
    ``max(|p|, |new|)``; docs/spec.md lists these cases and the tests measure
    them. Chain without this transform to keep the float32 updates (and
    ``apply_updates``'s single rounding) where bit-identity matters more than
    the dtype contract.

    Updates whose dtype is the parameters' (float32, float64, complex) or
    narrower pass through, cast to it. Complex leaves are handled part by part.

    Returns:
      An :class:`optax.GradientTransformation` (needs ``params`` in ``update``).
    """

    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.OptState]:
        if params is None:
            raise ValueError(optax._src.base.NO_PARAMS_MSG)
        out = jax.tree.map(_update_in_param_dtype, updates, params, is_leaf=lambda x: x is None)
        return out, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _update_in_param_dtype(u: Any, p: Any) -> Any:
    """``d`` of ``p.dtype`` with ``p + d == round(p + u)`` (see :func:`to_param_dtype`)."""
    if u is None or p is None:
        return u
    if u.dtype == p.dtype:
        return u
    if is_complex(u) != is_complex(p):
        raise ValueError(
            f"to_param_dtype: a {u.dtype} update for a {p.dtype} parameter (allowed: complex "
            "updates for complex parameters, real ones for real parameters)"
        )
    if jnp.promote_types(u.dtype, p.dtype) == p.dtype:
        return u.astype(p.dtype)  # widening is exact: p + u is the same sum
    parts = [_exact_part(up, pp) for up, pp in zip(real_parts(u), real_parts(p), strict=True)]
    return join_parts(parts, p.dtype)


def _same_bits(a: jax.Array, b: jax.Array) -> jax.Array:
    uint = jnp.dtype(f"uint{8 * jnp.dtype(a.dtype).itemsize}")
    return jax.lax.bitcast_convert_type(a, uint) == jax.lax.bitcast_convert_type(b, uint)


def _exact_part(u: jax.Array, p: jax.Array) -> jax.Array:
    """One real part of :func:`_update_in_param_dtype`: ``u`` wider than ``p``."""
    wide = u.dtype
    pw = p.astype(wide)
    new = (pw + u).astype(p.dtype)  # the spec's single rounding of theta - lr * u
    nw = new.astype(wide)
    # Where new == p (unchanged, or both infinite) the update is a zero of new's sign:
    # -0 + -0 is the only sum that stays -0, and inf - inf would be NaN.
    d0 = jnp.where(nw == pw, jnp.copysign(jnp.zeros([], wide), nw), nw - pw).astype(p.dtype)
    # p + d in p's dtype, as optax.apply_updates adds. The rounded difference can
    # miss where new sits on a power of 2 that p + d0 rounds away from; then the
    # neighbour of d0 towards new reaches it (exhaustively checked for float16
    # and bfloat16). Anything else would be an unreachable target: keep d0.
    r0 = p + d0
    hit0 = _same_bits(r0, new) | jnp.isnan(new)
    inf = jnp.asarray(jnp.inf, p.dtype)
    d1 = jnp.nextafter(d0, jnp.where(r0 < new, inf, -inf))
    hit1 = _same_bits(p + d1, new)
    return jnp.where(hit0 | ~hit1, d0, d1)

"""One SophiaG step per leaf: the momentum, the clip ratio and the signed update.

The formula and its arithmetic order are those of :func:`sophia.spec.sophia_update`;
this module is their JAX form, part by part for complex leaves
(:mod:`sophia.jax.real_pairs`). The Hessian EMA is read decoded and the new
momentum is stored in its form (:mod:`sophia.jax.narrow`); the step itself reads
the momentum unrounded.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from sophia import narrow
from sophia.jax import narrow as jnarrow
from sophia.jax.real_pairs import (
    check_gradient,
    compute_dtype,
    join_parts,
    real_parts,
    update_dtype,
)


class ClipInputs(NamedTuple):
    """What the clip ratio of one real part reads; the diagnostics take them in this form.

    Attributes:
      m: the new momentum, in the compute dtype.
      h: the Hessian EMA as stored (an array of its storage dtype, or a
        :class:`sophia.narrow.Block8`; decoded where it is read).
      rho_bs: ``rho * bs`` in the compute dtype.
      eps: ``eps`` in the compute dtype, floored (:func:`eps_floor`).
    """

    m: jax.Array
    h: jax.Array
    rho_bs: jax.Array
    eps: jax.Array


def eps_floor(eps: chex.Numeric, cd: jnp.dtype) -> jax.Array:
    """``eps`` floored at ``cd``'s smallest normal number (traced ``eps`` too): no ``0/0``."""
    return jnp.maximum(jnp.asarray(eps, cd), jnp.finfo(cd).tiny)


def clip_ratio(
    m: jax.Array, h: jax.Array | narrow.Block8, rho_bs: jax.Array, eps: jax.Array
) -> jax.Array:
    """``r = min(|m| / (rho * bs * max(h, 0) + eps), 1)`` in ``m``'s dtype, in the spec's order."""
    cd = m.dtype
    den = rho_bs * jnp.maximum(jnarrow.decode(h, cd), jnp.zeros([], cd)) + eps
    return jnp.minimum(jnp.abs(m) / den, jnp.ones([], cd))


def clip_inputs(
    mus: list[jax.Array],
    hs: list[jax.Array | narrow.Block8],
    cds: list[jnp.dtype],
    rho: jax.Array,
    bs: jax.Array,
    eps: Any,
) -> list[ClipInputs]:
    """:class:`ClipInputs` per real part of each leaf, from stored momenta ``mus``.

    ``cds`` are the leaves' compute dtypes (:func:`leaf_compute_dtype`).
    """
    out = []
    for m, h, cd in zip(mus, hs, cds, strict=True):
        rho_bs, eps_c = rho.astype(cd) * jnp.asarray(bs, cd), eps_floor(eps, cd)
        for m_part, h_part in zip(real_parts(m), jnarrow.state_parts(h), strict=True):
            out.append(ClipInputs(m_part.astype(cd), h_part, rho_bs, eps_c))
    return out


def leaf_compute_dtype(h: jax.Array | narrow.Block8, g: Any, hessian_dtype: str | None) -> Any:
    """The compute dtype of a leaf whose EMA is stored as ``h`` and whose gradient is ``g``.

    That of ``h``'s dtype where ``h`` is stored in the parameter's dtype
    (``hessian_dtype=None``, as before narrow state), else that of the gradient,
    which has the parameter's dtype where the stored ``h`` does not tell it.
    """
    if hessian_dtype is None and not jnarrow.is_block8(h):
        return compute_dtype(h.dtype)
    return compute_dtype(g.dtype)


def sophia_step(
    updates: optax.Updates,
    mu: optax.Updates,
    hessian: optax.Updates,
    rho: jax.Array,
    bs: jax.Array,
    *,
    b1: chex.Numeric,
    eps: chex.Numeric,
    maximize: bool,
    mu_dtype: str | None,
    seed: Any,
    step: jax.Array,
) -> tuple[optax.Updates, optax.Updates, list[ClipInputs]]:
    """The spec's momentum and clipped sign step for every leaf of ``updates``.

    Args:
      updates: the gradients.
      mu: the momentum before the step.
      hessian: the Hessian EMA in force for the step (leaves may be
        :class:`sophia.narrow.Block8`).
      rho: the current ``rho`` (scalar dtype).
      bs: the ``bs`` in force (scalar dtype).
      b1: EMA rate of the momentum.
      eps: the configured ``eps``.
      maximize: ascend instead of descend.
      mu_dtype: the momentum's form (:mod:`sophia.narrow`), ``None`` for the
        dtype ``mu`` already has.
      seed: the stochastic rounding's seed.
      step: the 0-based index of this step (``count`` before its increment).

    Returns:
      ``(u, new_mu, inputs)``: the update in the compute dtype (complex of it
      for complex leaves), the new momentum, and each part's
      :class:`ClipInputs` for the diagnostics.
    """
    flat_g, treedef = jax.tree.flatten(updates)
    flat_m = treedef.flatten_up_to(mu)
    flat_h = treedef.flatten_up_to(hessian)
    new_u, new_m, inputs = [], [], []
    for g, m, h in zip(flat_g, flat_m, flat_h):
        check_gradient(g, m if jnarrow.is_block8(h) else h)
        cd = compute_dtype(g.dtype)
        b1c = jnp.asarray(b1, cd)
        rho_bs, eps_c = rho.astype(cd) * bs.astype(cd), eps_floor(eps, cd)
        u_parts, m_parts = [], []
        parts = zip(real_parts(g), real_parts(m), jnarrow.state_parts(h), strict=True)
        for g_part, m_part, h_part in parts:
            gc = -g_part.astype(cd) if maximize else g_part.astype(cd)
            mc = b1c * m_part.astype(cd) + (jnp.asarray(1, cd) - b1c) * gc
            u_parts.append(jnp.sign(mc) * clip_ratio(mc, h_part, rho_bs, eps_c))
            m_parts.append(mc)  # the step reads m unrounded; only the stored m is narrowed
            inputs.append(ClipInputs(mc, h_part, rho_bs, eps_c))
        new_u.append(join_parts(u_parts, update_dtype(g.dtype)))
        new_m.append(jnarrow.store(m_parts, mu_dtype, m.dtype, seed, step, narrow.STREAM_MU))
    return treedef.unflatten(new_u), treedef.unflatten(new_m), inputs

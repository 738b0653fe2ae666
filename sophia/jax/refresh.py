"""One Hessian refresh: the EMA of an estimate, the dynamic-rho rule, the ``bs`` to follow.

The rules are those of :mod:`sophia.spec`; :func:`sophia.jax.scale_by_sophia`
applies a refresh at the start of a step, before that step's update. The EMA
reads the stored ``h`` decoded and stores the new one in its form
(:mod:`sophia.jax.narrow`), rounding with that step's index.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from sophia import narrow, spec
from sophia.jax import narrow as jnarrow
from sophia.jax.diagnostics import win_rate_and_norm
from sophia.jax.real_pairs import estimate_parts, real_parts, real_size, sq_norm
from sophia.jax.state import Estimate, LabelCountWarning, ScaleBySophiaState
from sophia.jax.step import clip_inputs, leaf_compute_dtype


@dataclasses.dataclass(frozen=True)
class RefreshConfig:
    """The configuration a refresh reads, from :func:`sophia.jax.scale_by_sophia`'s closure.

    Attributes:
      b2: EMA rate of the Hessian estimate.
      rho: the configured ``rho``, the centre of the dynamic bounds.
      bs: the configured ``bs``, or ``None`` to follow the estimates' label count.
      eps: the configured ``eps``.
      dynamic: whether the dynamic-rho rule is on.
      step_diagnostics: whether every step records the win rate and momentum
        norm (otherwise the refresh computes them for the step before it).
      hessian_dtype: the form ``h`` is stored in (:mod:`sophia.narrow`).
      seed: the stochastic rounding's seed (an int, or a traced integer scalar).
    """

    b2: chex.Numeric
    rho: chex.Numeric
    bs: chex.Numeric | None
    eps: chex.Numeric
    dynamic: bool
    step_diagnostics: bool
    hessian_dtype: str | None = None
    seed: Any = 0

    def bs_in_force(self, state: ScaleBySophiaState) -> jax.Array:
        """The ``bs`` the update divides by, in the state's scalar dtype."""
        if self.bs is None:
            return state.label_count
        return jnp.asarray(self.bs, state.rho.dtype)


def split_estimate(h_hat: Any) -> tuple[optax.Updates, Any]:
    """``(h_hat, label_count)`` of an estimate; the count is ``None`` if it carries none."""
    if isinstance(h_hat, Estimate):
        return h_hat.h_hat, h_hat.label_count
    return h_hat, None


def _is_state_leaf(x: Any) -> bool:
    """A leaf of the state trees: a masked placeholder, or a block-form ``h`` (one leaf)."""
    return isinstance(x, (optax.MaskedNode, narrow.Block8))


def apply_estimate(
    state: ScaleBySophiaState,
    h_hat: optax.Updates,
    label_count: Any,
    config: RefreshConfig,
    warned: set[str],
    grads: optax.Updates,
) -> ScaleBySophiaState:
    """Refreshes ``state`` with the estimate ``h_hat``: EMA, dynamic rho, then the ``bs``.

    Args:
      state: the state at the start of the step.
      h_hat: the estimate, with the structure of the parameters.
      label_count: the number of labels behind it, or ``None`` if unknown.
      config: the transform's configuration.
      warned: the one-time warnings this transform has given.
      grads: the step's gradients: their dtypes are the parameters', which a
        narrow ``h`` does not tell (:func:`sophia.jax.step.leaf_compute_dtype`).

    Returns:
      The refreshed state.
    """
    state = _catch_up_diagnostics(state, config, grads)
    state = _ema_and_rho(state, h_hat, config, grads)
    # After the EMA: the catch-up above needs the bs of the step before.
    return _follow_label_count(state, label_count, config, warned)


def _catch_up_diagnostics(
    state: ScaleBySophiaState, config: RefreshConfig, grads: optax.Updates
) -> ScaleBySophiaState:
    """Without per-step diagnostics: those of the last step, from the state, before a refresh.

    ``r`` depends only on the stored ``m``, ``h``, ``rho``, ``bs`` and ``eps``, all
    unchanged since that step, so this is the win rate the step would have
    recorded (bit for bit, unless ``mu_dtype`` rounds the stored momentum), and
    the dynamic-rho rule sees the same value either way. The momentum norm is
    the same up to the order of its float sum.
    """
    if config.step_diagnostics:
        return state
    # Computed unconditionally (it runs at refreshes only): under lax.cond the
    # parameter-sized operands cost XLA:CPU copies that took longer than the pass.
    sd = state.rho.dtype
    hs = jax.tree.leaves(state.hessian, is_leaf=jnarrow.is_block8)
    cds = [leaf_compute_dtype(h, g, config.hessian_dtype)
           for h, g in zip(hs, jax.tree.leaves(grads), strict=True)]  # fmt: skip
    inputs = clip_inputs(
        jax.tree.leaves(state.mu),
        hs,
        cds,
        state.rho,
        config.bs_in_force(state),
        jnp.asarray(config.eps, sd),
    )
    win_rate, m_norm = win_rate_and_norm(inputs, real_size(state.mu), sd)
    first = state.count == 0  # no step yet: nothing to report
    return state._replace(
        win_rate=jnp.where(first, state.win_rate, win_rate),
        momentum_norm=jnp.where(first, state.momentum_norm, m_norm),
    )


def _ema_and_rho(
    state: ScaleBySophiaState, h_hat: optax.Updates, config: RefreshConfig, grads: optax.Updates
) -> ScaleBySophiaState:
    """``h <- b2 h + (1 - b2) h_hat``, then the dynamic-rho rule on the last win rate."""
    sd = state.rho.dtype
    b2 = jnp.asarray(config.b2, sd)

    def ema(h: Any, hh: jax.Array, g: jax.Array) -> Any:
        if isinstance(h, optax.MaskedNode):  # a leaf another transform owns (masked)
            return h
        cd = leaf_compute_dtype(h, g, config.hessian_dtype)
        b2c = b2.astype(cd)
        values = jnarrow.decode(h, cd) if jnarrow.is_block8(h) else h
        parts = [
            b2c * hp.astype(cd) + (jnp.asarray(1, cd) - b2c) * hhp.astype(cd)
            for hp, hhp in zip(real_parts(values), estimate_parts(hh, values), strict=True)
        ]
        like = jnp.float32 if jnarrow.is_block8(h) else h.dtype
        return jnarrow.store(
            parts, config.hessian_dtype, like, config.seed, state.count, narrow.STREAM_HESSIAN
        )

    hessian = jax.tree.map(ema, state.hessian, h_hat, grads, is_leaf=_is_state_leaf)
    # The norm is of the values h holds (a block-form leaf decoded).
    values = jax.tree.map(
        lambda h: jnarrow.decode_block8(h) if jnarrow.is_block8(h) else h,
        hessian,
        is_leaf=_is_state_leaf,
    )
    rho = state.rho
    if real_size(values) > 0:
        rho0 = jnp.asarray(config.rho, sd)
        f = jnp.asarray(spec.DYNAMIC_FACTOR, sd)
        span = jnp.asarray(spec.DYNAMIC_RANGE, sd)
        up = jnp.minimum(rho * f, rho0 * span)
        # The barrier keeps XLA from rewriting x / constant as x * (1 / constant) under
        # jit, which is not the correctly rounded quotient the spec asks for.
        f_div, span_div = jax.lax.optimization_barrier((f, span))
        down = jnp.maximum(rho / f_div, rho0 / span_div)
        moved = jnp.where(
            state.win_rate < jnp.asarray(spec.WIN_RATE_BAND[0], sd),
            up,
            jnp.where(state.win_rate > jnp.asarray(spec.WIN_RATE_BAND[1], sd), down, rho),
        )
        dynamic = jnp.asarray(config.dynamic, jnp.bool_)
        rho = jnp.where(dynamic & (state.count > 0), moved, rho)
    return state._replace(hessian=hessian, rho=rho, hessian_norm=jnp.sqrt(sq_norm(values, sd)))


def _warn_once(warned: set[str], key: str, message: str) -> None:
    if key not in warned:
        warned.add(key)
        warnings.warn(message, LabelCountWarning, stacklevel=6)


def _follow_label_count(
    state: ScaleBySophiaState, n: Any, config: RefreshConfig, warned: set[str]
) -> ScaleBySophiaState:
    """After a refresh with label count ``n`` (``None``: unknown), the ``bs`` in force.

    With ``bs=None`` the state takes ``n``; an estimate with no count keeps the
    latest count (:data:`sophia.spec.REFERENCE_BS` if there was none), with a
    one-time warning, and a refresh with no labels (an all-False mask) keeps it
    too, as torch's ``SophiaG`` does. A numeric ``bs`` that differs from ``n``
    gets a one-time warning naming both (at trace time where both are known
    then, else from the device through :func:`jax.debug.callback`).
    """
    if config.bs is not None:
        if n is not None:
            _check_bs(config.bs, n, warned)
        return state
    if n is None:
        _warn_once(
            warned,
            "reference_bs",
            "sophia: bs=None follows the label count of a GNB refresh, but this estimate "
            "carries none (a hand-made or Hutchinson estimate): the step keeps the latest "
            f"count, or bs={spec.REFERENCE_BS} (spec.REFERENCE_BS, the paper's code's default) "
            "if no refresh gave one. Pass bs= (the number of labels behind each estimate, 1 "
            "for a Hutchinson one), or update(..., hessian=h_hat, label_count=n)",
        )
        return state
    n = jnp.asarray(n)
    label_count = jnp.where(n > 0, n.astype(state.rho.dtype), state.label_count)
    return state._replace(label_count=label_count)


def _check_bs(bs: Any, n: Any, warned: set[str]) -> None:
    """Warns once if the numeric ``bs`` differs from the label count ``n`` of a GNB refresh."""
    if "bs_mismatch" in warned:
        return

    def check(bs_value: Any, n_value: Any) -> None:
        bs_value, n_value = float(bs_value), int(n_value)
        if n_value > 0 and bs_value != n_value:
            _warn_once(
                warned,
                "bs_mismatch",
                f"sophia: bs={bs_value:g} but the GNB refresh saw {n_value} labels; the "
                f"update divides by rho * bs * h, so bs should be the refresh's label count "
                f"({n_value}): pass bs={n_value}, or bs=None to follow the refresh",
            )

    try:
        check(bs, n)
    except (jax.errors.ConcretizationTypeError, TypeError):
        jax.debug.callback(check, bs, n)

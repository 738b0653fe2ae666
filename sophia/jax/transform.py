r"""The SophiaG preconditioning-and-clipping core as an Optax transform.

See :mod:`sophia.spec` for the update, the arithmetic contract and the
dynamic-rho rule that this module implements for JAX.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from sophia import spec

__all__ = [
    "Estimate",
    "Estimator",
    "LabelCountWarning",
    "ScaleBySophiaState",
    "StaticFlag",
    "add_decayed_weights",
    "diagnostics",
    "on_real_pairs",
    "scale_by_learning_rate",
    "scale_by_sophia",
    "to_param_dtype",
    "update_hessian",
]

#: ``estimator(params, key, **extra_args) -> h_hat``, a diagonal-Hessian estimate
#: with the structure of ``params``. ``extra_args`` are the keyword arguments
#: given to ``update``; an estimator ignores the ones it does not use.
Estimator = Callable[..., optax.Params]


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class StaticFlag:
    """A bool held in a pytree's structure rather than as a leaf, so known at trace time."""

    value: bool

    def __bool__(self) -> bool:
        return self.value


class Estimate(NamedTuple):
    """A diagonal-Hessian estimate and the number of sampled labels behind it.

    An :data:`Estimator` may return one instead of the bare ``h_hat`` (the GNB
    estimator of :func:`sophia.jax.sophia_g` does): with ``bs=None`` the
    state's ``bs`` then follows ``label_count``, the ``N`` of the estimate's
    mean cross-entropy.

    Attributes:
      h_hat: the estimate, with the structure of the parameters.
      label_count: the number of labels (an int, or a traced integer scalar).
    """

    h_hat: optax.Updates
    label_count: Any


class LabelCountWarning(UserWarning):
    """``bs`` does not match the number of labels behind the Hessian estimate.

    The same name as :class:`sophia.torch.LabelCountWarning`, so that one filter
    reads alike in both frameworks.
    """


class ScaleBySophiaState(NamedTuple):
    r"""State of :func:`scale_by_sophia`.

    Attributes:
      count: steps taken (int32).
      mu: the momentum :math:`m`.
      hessian: the diagonal-Hessian EMA :math:`h`.
      key: PRNG key of the built-in estimator; split once per refresh.
      rho: the current :math:`\rho` (moves only with ``dynamic=True``).
      win_rate: fraction of coordinates with ``r < 1`` in the last step (with
        ``step_diagnostics=False``: in the last step before the latest refresh).
      hessian_norm: L2 norm of :math:`h`, updated at each refresh.
      momentum_norm: L2 norm of :math:`m` after the last step (with
        ``step_diagnostics=False``: as of the latest refresh).
      b2: the Hessian EMA rate in force (kept for :func:`update_hessian`).
      rho0: the configured :math:`\rho`, the centre of the dynamic bounds.
      dynamic: whether the dynamic-rho rule is on.
      bs: the ``bs`` in force: the configured one, or with ``bs=None`` the
        label count of the latest GNB refresh (:data:`sophia.spec.REFERENCE_BS`
        until one has given a count).
      eps: the configured ``eps`` (kept for :func:`update_hessian`).
      step_diagnostics: whether every step computes ``win_rate`` and
        ``momentum_norm`` (a :class:`StaticFlag`: part of the state's structure,
        so a refresh under ``jit`` knows it without a branch).
      bs_from_refresh: whether ``bs`` follows the refresh's label count (the
        transform was built with ``bs=None``; a :class:`StaticFlag`).
    """

    count: jax.Array
    mu: optax.Updates
    hessian: optax.Updates
    key: jax.Array
    rho: jax.Array
    win_rate: jax.Array
    hessian_norm: jax.Array
    momentum_norm: jax.Array
    b2: jax.Array
    rho0: jax.Array
    dynamic: jax.Array
    bs: jax.Array
    eps: jax.Array
    step_diagnostics: StaticFlag
    bs_from_refresh: StaticFlag = StaticFlag(False)


def _cd(dtype: Any) -> jnp.dtype:
    """The compute dtype of a leaf; a complex leaf computes in that of its parts."""
    return jnp.dtype(spec.compute_dtype(_part_dtype(dtype)))


def _part_dtype(dtype: Any) -> jnp.dtype:
    """The dtype of one real coordinate: float32 for complex64, float64 for complex128."""
    dtype = jnp.dtype(dtype)
    return jnp.finfo(dtype).dtype if jnp.issubdtype(dtype, jnp.complexfloating) else dtype


def _parts(x: jax.Array) -> tuple[jax.Array, ...]:
    """The real coordinates of a leaf: ``(x,)``, or ``(real, imag)`` for a complex one.

    A complex parameter is a pair of real parameters, as torch's ``view_as_real``
    makes it: every per-coordinate rule (sign, clipping, max(h, 0)) applies to
    each part on its own, never to complex numbers.
    """
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        return jnp.real(x), jnp.imag(x)
    return (x,)


def _join(parts: Any, dtype: Any) -> jax.Array:
    """Inverse of :func:`_parts`: the leaf of ``dtype`` made of ``parts``."""
    pd = _part_dtype(dtype)
    if len(parts) == 2:
        return jax.lax.complex(parts[0].astype(pd), parts[1].astype(pd)).astype(dtype)
    return parts[0].astype(dtype)


def _real_size(tree: Any) -> int:
    """Number of real coordinates in ``tree``: two per complex element, as torch counts them."""
    return sum(x.size * len(_parts(x)) for x in jax.tree.leaves(tree))


def _wide(dtype: Any) -> jnp.dtype:
    """The dtype of a leaf's update before rounding: complex of the compute dtype, or it."""
    cd = _cd(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.dtype(jnp.complex128 if cd == jnp.float64 else jnp.complex64)
    return cd


def _check_gradient(g: jax.Array, h: jax.Array) -> None:
    """A real gradient for a complex parameter (or the reverse) would lose or invent a part."""
    if jnp.issubdtype(g.dtype, jnp.complexfloating) != jnp.issubdtype(h.dtype, jnp.complexfloating):
        raise ValueError(
            f"Invalid gradient: {g.dtype} for a parameter whose Sophia state is {h.dtype} "
            "(allowed: complex gradients for complex parameters, real ones for real parameters)"
        )


def _scalar_dtype(params: optax.Params) -> jnp.dtype:
    leaves = jax.tree.leaves(params)
    if any(_part_dtype(x.dtype) == jnp.float64 for x in leaves):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def _sq_norm(tree: optax.Updates, dtype: jnp.dtype) -> jax.Array:
    sq = [
        jnp.sum(jnp.square(part.astype(dtype))) for x in jax.tree.leaves(tree) for part in _parts(x)
    ]
    return sum(sq, jnp.zeros([], dtype))


def _step_leaves(
    mus: list[jax.Array], hs: list[jax.Array], rho: jax.Array, bs: Any, eps: Any
) -> list[tuple[Any, ...]]:
    """``(m, h, (rho * bs, eps))`` per real part of each leaf in its compute dtype.

    The diagnostics take them in this form.
    """
    leaves = []
    for m, h in zip(mus, hs, strict=True):
        cd = _cd(h.dtype)
        coef = (rho.astype(cd) * jnp.asarray(bs, cd), _eps(eps, cd))
        for mp, hp in zip(_parts(m), _parts(h), strict=True):
            leaves.append((mp.astype(cd), hp, coef))
    return leaves


def _win_rate_and_norm(
    leaves: list[tuple[Any, ...]], n_total: int, sd: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """The win rate and the momentum norm of ``leaves`` (see :func:`_diagnostics`)."""
    # Compiled for XLA:CPU, the diagnostics take the two-operand reductions of _diagnostics.
    # Run op by op they stay plain reductions: the loop there would be compiled
    # as a whole, and XLA:CPU contracts a*b+c into fused multiply-adds inside a
    # compiled computation, so the count could drift from the op-by-op update.
    staged = any(isinstance(x, jax.core.Tracer) for leaf in leaves for x in leaf[:2])
    if staged and jax.default_backend() == "cpu":
        n_clipped, msq = _diagnostics(leaves, sd)
    else:
        n_clipped, msq = _plain_diagnostics(leaves, sd)
    n_win = jnp.asarray(n_total, jnp.int32) - n_clipped
    # The barrier keeps XLA from turning the division into a product with a rounded
    # reciprocal of the constant, which is not the correctly rounded quotient.
    total = jax.lax.optimization_barrier(jnp.asarray(max(n_total, 1), sd))
    return n_win.astype(sd) / total, jnp.sqrt(msq)


def _catch_up_diagnostics(state: ScaleBySophiaState) -> ScaleBySophiaState:
    """Without per-step diagnostics: those of the last step, from the state, before a refresh.

    ``r`` depends only on the stored ``m``, ``h``, ``rho``, ``bs`` and ``eps``, all
    unchanged since that step, so this is the win rate the step would have
    recorded (bit for bit, unless ``mu_dtype`` rounds the stored momentum), and
    the dynamic-rho rule sees the same value either way. The momentum norm is
    the same up to the order of its float sum.
    """
    if state.step_diagnostics:
        return state
    # Computed unconditionally (it runs at refreshes only): under lax.cond the
    # parameter-sized operands cost XLA:CPU copies that took longer than the pass.
    leaves = _step_leaves(
        jax.tree.leaves(state.mu), jax.tree.leaves(state.hessian), state.rho, state.bs, state.eps
    )
    win_rate, m_norm = _win_rate_and_norm(leaves, _real_size(state.hessian), state.rho.dtype)
    first = state.count == 0  # no step yet: nothing to report
    return state._replace(
        win_rate=jnp.where(first, state.win_rate, win_rate),
        momentum_norm=jnp.where(first, state.momentum_norm, m_norm),
    )


def _estimate_parts(hh: jax.Array, h: jax.Array) -> tuple[jax.Array, ...]:
    """The real parts of an estimate ``hh`` for the Hessian EMA ``h``.

    For a complex ``h`` the estimate is complex of ``h``'s shape (its real and
    imaginary parts estimate the two coordinates, as :func:`sophia.jax.gnb`
    returns it) or real of shape ``h.shape + (2,)`` (torch's ``view_as_real``
    layout). A complex estimate for a real ``h`` is refused rather than cut to
    its real part.
    """
    hh = jnp.asarray(hh)
    h_complex = jnp.issubdtype(h.dtype, jnp.complexfloating)
    hh_complex = jnp.issubdtype(hh.dtype, jnp.complexfloating)
    if h_complex and hh_complex and hh.shape == h.shape:
        return _parts(hh)
    if h_complex and not hh_complex and hh.shape == (*h.shape, 2):
        return hh[..., 0], hh[..., 1]
    if not h_complex and not hh_complex:
        return (hh,)
    allowed = (
        f"complex of shape {h.shape}, or real of shape {(*h.shape, 2)}"
        if h_complex
        else "a real array"
    )
    raise ValueError(
        f"Invalid Hessian estimate: {hh.dtype} of shape {hh.shape} for the {h.dtype} Hessian "
        f"EMA of shape {h.shape} (allowed: {allowed})"
    )


def _ema_and_rho(state: ScaleBySophiaState, h_hat: optax.Updates) -> ScaleBySophiaState:
    """Applies one Hessian refresh to ``state``: the EMA, then the dynamic-rho rule."""
    state = _catch_up_diagnostics(state)

    def ema(h: jax.Array, hh: jax.Array) -> jax.Array:
        if isinstance(h, optax.MaskedNode):  # a leaf another transform owns (masked)
            return h
        cd = _cd(h.dtype)
        b2c = state.b2.astype(cd)
        parts = [
            b2c * hp.astype(cd) + (jnp.asarray(1, cd) - b2c) * hhp.astype(cd)
            for hp, hhp in zip(_parts(h), _estimate_parts(hh, h), strict=True)
        ]
        return _join(parts, h.dtype)

    hessian = jax.tree.map(
        ema, state.hessian, h_hat, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
    )
    sd = state.rho.dtype
    rho = state.rho
    n_total = _real_size(hessian)
    if n_total > 0:
        rho0c = state.rho0
        f = jnp.asarray(spec.DYNAMIC_FACTOR, sd)
        span = jnp.asarray(spec.DYNAMIC_RANGE, sd)
        up = jnp.minimum(rho * f, rho0c * span)
        # The barrier keeps XLA from rewriting x / constant as x * (1 / constant) under
        # jit, which is not the correctly rounded quotient the spec asks for.
        f_div, span_div = jax.lax.optimization_barrier((f, span))
        down = jnp.maximum(rho / f_div, rho0c / span_div)
        moved = jnp.where(
            state.win_rate < jnp.asarray(spec.WIN_RATE_BAND[0], sd),
            up,
            jnp.where(state.win_rate > jnp.asarray(spec.WIN_RATE_BAND[1], sd), down, rho),
        )
        rho = jnp.where(state.dynamic & (state.count > 0), moved, rho)
    return state._replace(hessian=hessian, rho=rho, hessian_norm=jnp.sqrt(_sq_norm(hessian, sd)))


def _split_estimate(h_hat: Any) -> tuple[optax.Updates, Any]:
    """``(h_hat, label_count)`` of an estimator's result; the count is ``None`` if it gave none."""
    if isinstance(h_hat, Estimate):
        return h_hat.h_hat, h_hat.label_count
    return h_hat, None


#: One-time warnings given by :func:`update_hessian` (it has no transform to remember them).
_WARNED: set[str] = set()


def _warn_once(
    warned: set[str], key: str, message: str, category: type[Warning] = UserWarning
) -> None:
    if key not in warned:
        warned.add(key)
        warnings.warn(message, category, stacklevel=4)


def _follow_label_count(
    state: ScaleBySophiaState, n: Any, configured_bs: Any, warned: set[str]
) -> ScaleBySophiaState:
    """After a refresh with label count ``n`` (``None``: unknown), the ``bs`` in force.

    Runs after :func:`_ema_and_rho`, whose catch-up diagnostics need the ``bs`` of
    the step before. With ``bs=None`` the state takes ``n``; an estimate with no
    count keeps the latest count (:data:`sophia.spec.REFERENCE_BS` if there was
    none), with a one-time warning, and a refresh with no labels (an all-False
    mask) keeps it too, as torch's ``SophiaG`` does. A numeric ``bs`` that differs
    from ``n`` gets a one-time warning naming both (at trace time where both are
    known then, else from the device through :func:`jax.debug.callback`).
    """
    sd = state.rho.dtype
    if not state.bs_from_refresh:
        if n is not None and configured_bs is not None:
            _check_bs(configured_bs, n, warned)
        return state
    if n is None:
        _warn_once(
            warned,
            "reference_bs",
            "sophia: bs=None follows the label count of a GNB refresh, but this estimate "
            "carries none (a hand-made or Hutchinson estimate): the step keeps the latest "
            f"count, or bs={spec.REFERENCE_BS} (spec.REFERENCE_BS, the paper's code's default) "
            "if no refresh gave one. Pass bs= (the number of labels behind each estimate, 1 "
            "for a Hutchinson one), or update_hessian(..., label_count=n)",
            LabelCountWarning,
        )
        return state
    n = jnp.asarray(n)
    return state._replace(bs=jnp.where(n > 0, n.astype(sd), state.bs))


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
                LabelCountWarning,
            )

    try:
        check(bs, n)
    except (jax.errors.ConcretizationTypeError, TypeError):
        jax.debug.callback(check, bs, n)


def scale_by_sophia(
    b1: chex.Numeric = spec.DEFAULTS.betas[0],
    b2: chex.Numeric = spec.DEFAULTS.betas[1],
    rho: chex.Numeric = spec.DEFAULTS.rho,
    *,
    bs: chex.Numeric | None = spec.DEFAULTS.bs,
    eps: chex.Numeric = spec.DEFAULTS.eps,
    hessian_update_interval: int | None = spec.DEFAULTS.hessian_update_interval,
    estimator: Estimator | None = None,
    maximize: bool = False,
    dynamic: bool = False,
    mu_dtype: Any | None = None,
    seed: int | jax.Array = 0,
    step_diagnostics: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Scales updates by SophiaG's clipped, Hessian-preconditioned momentum.

    .. math::

       m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
       u_t &= \operatorname{sign}(m_t)\,
              \min\!\left(\frac{|m_t|}{\rho\, bs\, \max(h_t, 0) + \epsilon}, 1\right)

    and, at the start of every step ``t`` (0-based: ``count``, the steps taken
    so far) with ``t % k == 0``, ``k = hessian_update_interval`` (steps 0, k,
    2k, ...), before the update and from the ``params`` passed to it (those
    before the step), :math:`h \leftarrow \beta_2 h + (1-\beta_2)\hat h` with
    ``h_hat = estimator(params, key, **extra_args)``. Under ``jit`` the refresh
    runs under :func:`jax.lax.cond`, so other steps cost nothing extra; op by
    op it is a plain Python branch.

    Weight decay and the learning rate are applied by the aliases
    (:func:`sophia.jax.sophia_g`) that chain this core. The updates it returns
    are in the compute dtype (float32 for bfloat16/float16 parameters), so that
    the step is rounded to the parameters' dtype once, at the end of the chain,
    by :func:`to_param_dtype`; chain that last when building your own.

    A complex parameter is a pair of real parameters (as in torch's port): its
    real and imaginary parts each get their own momentum, Hessian EMA,
    clipping and sign, held in complex ``mu`` and ``hessian`` leaves, and count
    as two coordinates of the win rate. As for any optax optimizer, pass the
    conjugate of :func:`jax.grad`'s result for a real loss of complex
    parameters (``jax.grad`` returns :math:`\partial_x f - i\,\partial_y f`).

    Args:
      b1: EMA rate of the momentum.
      b2: EMA rate of the Hessian estimate.
      rho: clipping scale (the paper's :math:`\gamma`).
      bs: number of sampled labels behind each estimate; ``None``: the label
        count of the latest refresh whose estimate carries one (an
        :class:`Estimate`), see :func:`sophia.jax.sophia_g`.
      eps: added to the denominator; floored at the compute dtype's smallest
        normal number so ``0/0`` cannot happen.
      hessian_update_interval: ``k``, refresh at the start of each step ``t``
        with ``t % k == 0``; ``None`` disables the built-in refresh (use
        :func:`update_hessian`).
      estimator: ``estimator(params, key, **extra_args) -> h_hat``, e.g.
        :func:`sophia.jax.gnb` or :func:`sophia.jax.hutchinson`. Required
        unless ``hessian_update_interval`` is ``None``.
      maximize: ascend the objective instead of descending it.
      dynamic: adapt ``rho`` to keep the win rate in
        :data:`sophia.spec.WIN_RATE_BAND` (rule in :mod:`sophia.spec`).
      mu_dtype: dtype of the momentum; defaults to each parameter's dtype.
      seed: seed or PRNG key of the estimator's label/probe sampling.
      step_diagnostics: compute the win rate and momentum norm at every step.
        They take one more pass over ``m`` and ``h`` (a third more memory
        traffic than the update itself); with ``False`` they are computed at
        each Hessian refresh instead, for the step before it, which is all the
        dynamic-rho rule needs. Parameters, state and ``rho`` are the same
        either way.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs`.

    References:
      Liu et al., `Sophia: A Scalable Stochastic Second-order Optimizer for
      Language Model Pre-training <https://arxiv.org/abs/2305.14342>`_, 2023.
    """
    spec.validate(
        betas=(b1, b2),
        rho=rho,
        eps=eps,
        bs=bs,
        hessian_update_interval=hessian_update_interval,
        maximize=maximize,
        dynamic=dynamic,
    )
    if hessian_update_interval is not None and estimator is None:
        raise ValueError(
            "Invalid estimator: None (allowed: a callable such as sophia.jax.gnb, "
            "or hessian_update_interval=None to refresh by hand with update_hessian)"
        )
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
    warned: set[str] = set()  # the one-time warnings this transform has given

    def _config(sd: jnp.dtype) -> dict[str, jax.Array]:
        return {
            "b2": jnp.asarray(b2, sd),
            "rho0": jnp.asarray(rho, sd),
            "dynamic": jnp.asarray(dynamic, jnp.bool_),
            # With bs=None the state's bs is the refreshes' label count: not reset here.
            **({} if bs is None else {"bs": jnp.asarray(bs, sd)}),
            "eps": jnp.asarray(eps, sd),
            "step_diagnostics": StaticFlag(bool(step_diagnostics)),
            "bs_from_refresh": StaticFlag(bs is None),
        }

    def init_fn(params: optax.Params) -> ScaleBySophiaState:
        sd = _scalar_dtype(params)
        key = jax.random.PRNGKey(seed) if jnp.ndim(seed) == 0 and not _is_key(seed) else seed
        return ScaleBySophiaState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=_check_mu_dtype(mu_dtype, params)),
            hessian=optax.tree.zeros_like(params),
            key=key,
            rho=jnp.asarray(rho, sd),
            win_rate=jnp.zeros([], sd),
            hessian_norm=jnp.zeros([], sd),
            momentum_norm=jnp.zeros([], sd),
            **{"bs": jnp.asarray(spec.REFERENCE_BS, sd), **_config(sd)},
        )

    def update_fn(
        updates: optax.Updates,
        state: ScaleBySophiaState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleBySophiaState]:
        state = state._replace(**_config(state.rho.dtype))
        if hessian_update_interval is not None:
            if params is None:
                raise ValueError(
                    "sophia: params must be passed to update() for the built-in Hessian "
                    "refresh: tx.update(grads, state, params, ...)"
                )

            def refresh(s: ScaleBySophiaState) -> ScaleBySophiaState:
                key, sub = jax.random.split(s.key)
                h_hat, n = _split_estimate(estimator(params, sub, **extra_args))
                s = _ema_and_rho(s._replace(key=key), h_hat)
                return _follow_label_count(s, n, bs, warned)

            due = state.count % hessian_update_interval == 0
            if isinstance(due, jax.core.Tracer):
                state = jax.lax.cond(due, refresh, lambda s: s, state)
            elif due:
                # Op by op the step is known: a Python branch runs the refresh op by op
                # too (lax.cond would compile it anew at every call, over a second
                # each, and contract its arithmetic into FMAs as jit does).
                state = refresh(state)

        sd = state.rho.dtype
        flat_g, treedef = jax.tree.flatten(updates)
        flat_m = treedef.flatten_up_to(state.mu)
        flat_h = treedef.flatten_up_to(state.hessian)
        new_u, new_m, leaves = [], [], []
        for g, m, h in zip(flat_g, flat_m, flat_h):
            _check_gradient(g, h)
            cd = _cd(g.dtype)
            b1c = jnp.asarray(b1, cd)
            coef = (state.rho.astype(cd) * state.bs.astype(cd), _eps(eps, cd))
            u_parts, m_parts = [], []
            for gp, mp, hp in zip(_parts(g), _parts(m), _parts(h), strict=True):
                gc = -gp.astype(cd) if maximize else gp.astype(cd)
                mc = b1c * mp.astype(cd) + (jnp.asarray(1, cd) - b1c) * gc
                u_parts.append(jnp.sign(mc) * _clip_ratio(mc, hp, *coef))
                m_parts.append(mc)
                leaves.append((mc, hp, coef))
            new_u.append(_join(u_parts, _wide(g.dtype)))
            new_m.append(_join(m_parts, m.dtype if mu_dtype is None else mu_dtype))
        new_state = state._replace(
            count=optax.safe_int32_increment(state.count), mu=treedef.unflatten(new_m)
        )
        if step_diagnostics:
            win_rate, m_norm = _win_rate_and_norm(leaves, _real_size(updates), sd)
            new_state = new_state._replace(win_rate=win_rate, momentum_norm=m_norm)
        return treedef.unflatten(new_u), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_mu_dtype(mu_dtype: jnp.dtype | None, params: optax.Params) -> jnp.dtype | None:
    """``mu_dtype``, if it keeps both parts of every complex parameter (and invents none)."""
    if mu_dtype is None:
        return None
    mu_complex = jnp.issubdtype(mu_dtype, jnp.complexfloating)
    for p in jax.tree.leaves(params):
        if jnp.issubdtype(p.dtype, jnp.complexfloating) != mu_complex:
            kind = "complex" if mu_complex else "real"
            raise ValueError(
                f"Invalid mu_dtype: {mu_dtype} for a {p.dtype} parameter (allowed: None, or a "
                f"{'real' if mu_complex else 'complex'} dtype; a {kind} momentum would "
                f"{'invent' if mu_complex else 'drop'} the imaginary part)"
            )
    return mu_dtype


def _plain_diagnostics(leaves: list[tuple[Any, ...]], sd: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """``(n_clipped, sum(m**2))`` as plain per-leaf reductions (see :func:`_diagnostics`)."""
    n_clipped, msq = jnp.zeros([], jnp.int32), jnp.zeros([], sd)
    for mc, h, coef in leaves:
        n_clipped += jnp.sum(~(_clip_ratio(mc, h, *coef) < 1), dtype=jnp.int32)
        msq += jnp.sum(jnp.square(mc.astype(sd)))
    return n_clipped, msq


def _clip_ratio(mc: jax.Array, h: jax.Array, rho_bs: jax.Array, eps: jax.Array) -> jax.Array:
    """``r = min(|m| / (rho * bs * max(h, 0) + eps), 1)`` in ``mc``'s dtype, in the spec's order."""
    cd = mc.dtype
    den = rho_bs * jnp.maximum(h.astype(cd), jnp.zeros([], cd)) + eps
    return jnp.minimum(jnp.abs(mc) / den, jnp.ones([], cd))


def _diagnostics(leaves: list[tuple[Any, ...]], sd: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """``(n_clipped, sum(m**2))`` over all leaves: coordinates with ``r == 1``, and the norm.

    Args:
      leaves: ``(mc, h, (rho_bs, eps))`` per leaf, ``mc`` the new momentum in the
        compute dtype.
      sd: dtype of the sum of squares.

    What XLA:CPU makes of the plain ``sum(r < 1)`` and ``sum(m**2)``: ``r``
    (shared with the update) and an int32 copy of the mask materialised as
    full-size temporaries, then reductions that run unfused. Here each leaf
    gets one reduction of two operands, ``[clipped, m**2]``, which XLA:CPU
    compiles into a single loop that reads the new momentum and ``h`` once and
    recomputes ``r`` inside it (2.4x faster than a chunked loop of
    elementwise accumulations, measured on GPT-2-small shapes). An
    optimization barrier in front keeps XLA from fusing that loop into the
    update's, which would read ``g`` and the old momentum again.

    Exact: the count is an int32 sum of zeros and ones. A coordinate is
    clipped when ``not r < 1``, so a NaN ``r`` counts as clipped, as in the spec.
    """
    n_clipped, msq = jnp.zeros([], jnp.int32), jnp.zeros([], sd)
    for mc, h, coef in leaves:
        if not mc.size:
            continue
        mc, h, coef = jax.lax.optimization_barrier((mc, h, coef))
        r = _clip_ratio(mc, h, *coef)
        clipped = jnp.where(r < jnp.ones([], r.dtype), 0, 1).astype(jnp.int32)
        count, sq = jax.lax.reduce(
            (clipped, jnp.square(mc.astype(sd))),
            (jnp.zeros([], jnp.int32), jnp.zeros([], sd)),
            lambda x, y: (x[0] + y[0], x[1] + y[1]),
            tuple(range(mc.ndim)),
        )
        n_clipped, msq = n_clipped + count, msq + sq
    return n_clipped, msq


def _eps(eps: chex.Numeric, cd: jnp.dtype) -> jax.Array:
    """``eps`` floored at ``cd``'s smallest normal number (traced ``eps`` too)."""
    return jnp.maximum(jnp.asarray(eps, cd), jnp.finfo(cd).tiny)


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def add_decayed_weights(
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformation:
    """Adds ``weight_decay * params`` in the compute dtype (see :mod:`sophia.spec`).

    The same as :func:`optax.add_decayed_weights` for float32/float64
    parameters; for bfloat16/float16 ones the product is formed in float32
    rather than rounded to the parameter dtype first, as the spec requires;
    complex parameters decay as pairs of reals (:func:`on_real_pairs`).

    Args:
      weight_decay: the decay rate, a scalar or an optax schedule.
      mask: a pytree of booleans (or a function of the params returning one)
        selecting the leaves that decay.

    Returns:
      An :class:`optax.GradientTransformation`.
    """
    base = on_real_pairs(optax.add_decayed_weights(weight_decay))

    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.OptState]:
        if params is None:
            raise ValueError(optax._src.base.NO_PARAMS_MSG)
        wide = jax.tree.map(lambda p: p.astype(_wide(p.dtype)), params)
        return base.update(updates, state, wide)

    tx = optax.GradientTransformation(base.init, update_fn)
    return optax.masked(tx, mask) if mask is not None else tx


def _stack_parts(x: Any) -> Any:
    """A complex leaf as a real array of ``x.shape + (2,)`` (torch's ``view_as_real``)."""
    if x is None or not jnp.issubdtype(jnp.asarray(x).dtype, jnp.complexfloating):
        return x
    return jnp.stack(_parts(x), axis=-1)


def on_real_pairs(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Runs ``inner`` on complex leaves as pairs of reals, one real coordinate per part.

    optax's elementwise transforms multiply complex updates by real scalars as
    complex numbers, ``(a + bi)(c + 0i) = (ac - b*0) + (a*0 + bc)i``, which turns
    an infinite part into NaN in the other part and can flip the sign of a zero;
    SophiaG treats each part as its own coordinate (as torch's ``view_as_real``
    does). Each complex leaf of the updates (and of the params) enters
    ``inner`` as a real array of ``shape + (2,)`` and its result is put back
    together; real leaves pass unchanged. ``inner``'s state must not depend on
    the leaves' shapes (scales, schedules, weight decay).

    Args:
      inner: the transformation to wrap.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.
    """
    inner = optax.with_extra_args_support(inner)

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        is_none = lambda x: x is None  # noqa: E731
        real_u = jax.tree.map(_stack_parts, updates, is_leaf=is_none)
        real_p = None if params is None else jax.tree.map(_stack_parts, params, is_leaf=is_none)
        out, state = inner.update(real_u, state, real_p, **extra_args)

        def back(o: Any, u: Any) -> Any:
            if o is None or not jnp.issubdtype(jnp.asarray(u).dtype, jnp.complexfloating):
                return o
            return jax.lax.complex(o[..., 0], o[..., 1])

        return jax.tree.map(back, out, updates, is_leaf=is_none), state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def scale_by_learning_rate(
    learning_rate: optax.ScalarOrSchedule, *, flip_sign: bool = True
) -> optax.GradientTransformationExtraArgs:
    """:func:`optax.scale_by_learning_rate`, with complex leaves scaled as pairs of reals.

    Args:
      learning_rate: a scalar or an optax schedule.
      flip_sign: scale by ``-learning_rate`` (descent), as optax does by default.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; see :func:`on_real_pairs`.
    """
    return on_real_pairs(optax.scale_by_learning_rate(learning_rate, flip_sign=flip_sign))


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
    if jnp.issubdtype(u.dtype, jnp.complexfloating) != jnp.issubdtype(p.dtype, jnp.complexfloating):
        raise ValueError(
            f"to_param_dtype: a {u.dtype} update for a {p.dtype} parameter (allowed: complex "
            "updates for complex parameters, real ones for real parameters)"
        )
    if jnp.promote_types(u.dtype, p.dtype) == p.dtype:
        return u.astype(p.dtype)  # widening is exact: p + u is the same sum
    parts = [_exact_part(up, pp) for up, pp in zip(_parts(u), _parts(p), strict=True)]
    return _join(parts, p.dtype)


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


def _find_states(tree: Any) -> list[ScaleBySophiaState]:
    found: list[ScaleBySophiaState] = []

    def visit(x: Any) -> Any:
        if isinstance(x, ScaleBySophiaState):
            found.append(x)
        return x

    jax.tree.map(visit, tree, is_leaf=lambda x: isinstance(x, ScaleBySophiaState))
    return found


def update_hessian(
    opt_state: optax.OptState, h_hat: optax.Updates | Estimate, *, label_count: Any = None
) -> optax.OptState:
    r"""Applies a diagonal-Hessian estimate the caller computed, like torch's ``update_hessian()``.

    Works on the state of :func:`scale_by_sophia` or of any chain holding it:
    every :class:`ScaleBySophiaState` inside ``opt_state`` gets
    :math:`h \leftarrow \beta_2 h + (1-\beta_2)\hat h` and, if the transform
    was built with ``dynamic=True``, the dynamic-rho rule. Build the transform
    with ``hessian_update_interval=None`` so the built-in refresh stays off,
    and call it before the ``update`` of each step ``t`` with ``t % k == 0``,
    with an estimate at the parameters before that step (the built-in
    refresh's rule). Pure and jit-friendly.

    With ``bs=None`` the state's ``bs`` becomes the estimate's label count:
    ``label_count``, or that of an :class:`Estimate` (what
    :func:`sophia.jax.gnb_with_label_count` returns). A bare estimate without a
    count sets :data:`sophia.spec.REFERENCE_BS`, with a one-time warning.

    Args:
      opt_state: an optimizer state containing a :class:`ScaleBySophiaState`.
      h_hat: the estimate, with the structure of the parameters, or an
        :class:`Estimate`.
      label_count: the number of sampled labels behind a GNB estimate.

    Returns:
      ``opt_state`` with the refreshed Hessian EMA.
    """
    if not _find_states(opt_state):
        raise ValueError(
            "update_hessian: opt_state holds no ScaleBySophiaState; pass the state of "
            "sophia_g / sophia_h / scale_by_sophia (or of a chain containing one)"
        )
    h_hat, n = _split_estimate(h_hat)
    n = n if label_count is None else label_count

    def apply(x: Any) -> Any:
        if not isinstance(x, ScaleBySophiaState):
            return x
        return _follow_label_count(_ema_and_rho(x, h_hat), n, x.bs, _WARNED)

    return jax.tree.map(apply, opt_state, is_leaf=lambda x: isinstance(x, ScaleBySophiaState))


def diagnostics(opt_state: optax.OptState) -> dict[str, jax.Array]:
    """Reads the paper's diagnostics from an optimizer state.

    Returns:
      ``{"win_rate", "rho", "hessian_norm", "momentum_norm", "count"}`` of the
      (first) :class:`ScaleBySophiaState` inside ``opt_state``.
    """
    states = _find_states(opt_state)
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

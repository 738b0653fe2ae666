"""The SophiaG preconditioning-and-clipping core as an Optax transform.

See :mod:`sophia.spec` for the update, the arithmetic contract and the
dynamic-rho rule that this transform implements for JAX.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sophia import narrow, spec
from sophia.jax import narrow as jnarrow
from sophia.jax.diagnostics import win_rate_and_norm
from sophia.jax.real_pairs import is_complex, real_size, scalar_dtype
from sophia.jax.refresh import RefreshConfig, apply_estimate, split_estimate
from sophia.jax.state import Estimate, Estimator, ScaleBySophiaState
from sophia.jax.step import sophia_step

__all__ = ["scale_by_sophia", "update_hessian"]


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
    hessian_dtype: Any | None = None,
    seed: int | jax.Array = 0,
    step_diagnostics: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Scales updates by SophiaG's clipped, Hessian-preconditioned momentum.

    The update of :func:`sophia.spec.sophia_update` without weight decay and
    learning rate (the momentum and the clipped sign step) and, at the start
    of every step ``t`` (0-based: ``count``, the steps taken so far) with
    ``t % k == 0``, ``k = hessian_update_interval`` (steps 0, k, 2k, ...),
    before the update and from the ``params`` passed to it (those before the
    step), the Hessian EMA of the spec with
    ``h_hat = estimator(params, key, **extra_args)``. Under ``jit`` the refresh
    runs under :func:`jax.lax.cond`, so other steps cost nothing extra; op by
    op it is a plain Python branch.

    With ``hessian_update_interval=None`` the caller refreshes by hand: an
    estimate passed as ``update(grads, state, params, hessian=h_hat)`` (an
    array tree with the structure of the parameters, or an
    :class:`~sophia.jax.Estimate`; ``label_count=n`` gives the label count
    behind a bare one) is applied at the start of that step, before its
    update. Pass it on the steps ``t`` with ``t % k == 0``, from the parameters
    before the step, as the built-in refresh does.

    Weight decay and the learning rate are applied by the aliases
    (:func:`sophia.jax.sophia_g`) that chain this core. The updates it returns
    are in the compute dtype (float32 for bfloat16/float16 parameters), so that
    the step is rounded to the parameters' dtype once, at the end of the chain,
    by :func:`to_param_dtype`; chain that last when building your own.

    A complex parameter is a pair of real parameters (as in torch's port): its
    real and imaginary parts each get their own momentum, Hessian EMA,
    clipping and sign, held in complex ``mu`` and ``hessian`` leaves, and count
    as two coordinates of the win rate (its state forms: ``None`` or
    ``"float32"``). As for any optax optimizer, pass the
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
        with ``t % k == 0``; ``None`` disables the built-in refresh (pass
        ``hessian=`` to ``update``).
      estimator: ``estimator(params, key, **extra_args) -> h_hat``, e.g.
        :func:`sophia.jax.gnb` or :func:`sophia.jax.hutchinson`. Required
        unless ``hessian_update_interval`` is ``None``.
      maximize: ascend the objective instead of descending it.
      dynamic: adapt ``rho`` to keep the win rate in
        :data:`sophia.spec.WIN_RATE_BAND` (rule in :mod:`sophia.spec`).
      mu_dtype: the momentum's form (:mod:`sophia.narrow`): ``None`` (each
        parameter's dtype), ``"float32"`` or ``"bfloat16"`` (stochastic rounding);
        a name, a NumPy/JAX dtype or a torch dtype.
      hessian_dtype: the Hessian EMA's form: those of ``mu_dtype`` or
        ``"block8"`` (a :class:`sophia.narrow.Block8` leaf, stochastic rounding).
      seed: an int in ``[0, 2**32)``: the stochastic rounding's seed
        (:func:`sophia.narrow.random_bits`) and the estimator's label/probe
        sampling seed; or a PRNG key of the sampling, where no form rounds
        stochastically.
      step_diagnostics: compute the win rate and momentum norm at every step.
        They take one more pass over ``m`` and ``h``; with ``False`` they are computed at
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
        mu_dtype=mu_dtype,
        hessian_dtype=hessian_dtype,
        seed=_concrete_seed(seed),
    )
    if hessian_update_interval is not None and estimator is None:
        raise ValueError(
            "Invalid estimator: None (allowed: a callable such as sophia.jax.gnb, "
            "or hessian_update_interval=None to refresh by hand with update(..., hessian=h_hat))"
        )
    mu_dtype = narrow.state_dtype_name("mu_dtype", mu_dtype, narrow.MU_DTYPES)
    hessian_dtype = narrow.state_dtype_name("hessian_dtype", hessian_dtype, narrow.HESSIAN_DTYPES)
    rounding_seed = _rounding_seed(seed, stochastic=_STOCHASTIC & {mu_dtype, hessian_dtype})
    config = RefreshConfig(
        b2, rho, bs, eps, dynamic, bool(step_diagnostics), hessian_dtype, rounding_seed
    )
    warned: set[str] = set()  # the one-time warnings this transform has given

    def init_fn(params: optax.Params) -> ScaleBySophiaState:
        sd = scalar_dtype(params)
        key = jax.random.PRNGKey(seed) if jnp.ndim(seed) == 0 and not _is_key(seed) else seed
        _check_real_forms(params, mu_dtype=mu_dtype, hessian_dtype=hessian_dtype)
        return ScaleBySophiaState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(lambda p: jnarrow.zeros(mu_dtype, p), params),
            hessian=jax.tree.map(lambda p: jnarrow.zeros(hessian_dtype, p), params),
            key=key,
            rho=jnp.asarray(rho, sd),
            win_rate=jnp.zeros([], sd),
            hessian_norm=jnp.zeros([], sd),
            momentum_norm=jnp.zeros([], sd),
            label_count=jnp.asarray(spec.REFERENCE_BS, sd) if bs is None else None,
        )

    def update_fn(
        updates: optax.Updates,
        state: ScaleBySophiaState,
        params: optax.Params | None = None,
        *,
        hessian: optax.Updates | Estimate | None = None,
        label_count: Any = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleBySophiaState]:
        _check_bs_mode(state, bs)
        if hessian is not None:
            state = _refresh_by_hand(state, hessian, label_count, updates)
        elif label_count is not None:
            raise ValueError(
                f"Invalid label_count: {label_count!r} without hessian= (allowed: the label "
                "count of the estimate passed as update(..., hessian=h_hat, label_count=n))"
            )
        elif hessian_update_interval is not None:
            state = _builtin_refresh(state, params, updates, extra_args)
        u, mu, inputs = sophia_step(
            updates,
            state.mu,
            state.hessian,
            state.rho,
            config.bs_in_force(state),
            b1=b1,
            eps=eps,
            maximize=maximize,
            mu_dtype=mu_dtype,
            seed=rounding_seed,
            step=state.count,
        )
        new_state = state._replace(count=optax.safe_int32_increment(state.count), mu=mu)
        if step_diagnostics:
            win_rate, m_norm = win_rate_and_norm(inputs, real_size(updates), state.rho.dtype)
            new_state = new_state._replace(win_rate=win_rate, momentum_norm=m_norm)
        return u, new_state

    def _refresh_by_hand(
        state: ScaleBySophiaState, hessian: Any, label_count: Any, grads: optax.Updates
    ) -> ScaleBySophiaState:
        if hessian_update_interval is not None:
            raise ValueError(
                "Invalid hessian: a hand-computed estimate for a transform that refreshes "
                f"on its own (hessian_update_interval={hessian_update_interval}); the step "
                "would refresh twice. Allowed: hessian_update_interval=None to refresh by "
                "hand, or no hessian= to keep the built-in refresh"
            )
        h_hat, n = split_estimate(hessian)
        return apply_estimate(state, h_hat, n if label_count is None else label_count, config,
                              warned, grads)  # fmt: skip

    def _builtin_refresh(
        state: ScaleBySophiaState,
        params: optax.Params | None,
        grads: optax.Updates,
        extra_args: dict[str, Any],
    ) -> ScaleBySophiaState:
        if params is None:
            raise ValueError(
                "sophia: params must be passed to update() for the built-in Hessian "
                "refresh: tx.update(grads, state, params, ...)"
            )

        def refresh(s: ScaleBySophiaState) -> ScaleBySophiaState:
            key, sub = jax.random.split(s.key)
            h_hat, n = split_estimate(estimator(params, sub, **extra_args))
            return apply_estimate(s._replace(key=key), h_hat, n, config, warned, grads)

        due = state.count % hessian_update_interval == 0
        if isinstance(due, jax.core.Tracer):
            return jax.lax.cond(due, refresh, lambda s: s, state)
        if due:
            # Op by op the step is known: a Python branch runs the refresh op by op
            # too (lax.cond would compile it anew at every call and contract its
            # arithmetic into FMAs as jit does).
            return refresh(state)
        return state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_bs_mode(state: ScaleBySophiaState, bs: Any) -> None:
    """A state holds ``label_count`` exactly when its transform follows the refreshes."""
    if (state.label_count is None) != (bs is not None):
        raise ValueError(
            f"sophia: a state made for bs={'a number' if bs is None else 'None'} given to a "
            f"transform built with bs={bs!r}; build the transform as the state was made, or "
            "start from tx.init(params)"
        )


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


#: The forms that round stochastically, which need an integer seed and a real parameter.
_STOCHASTIC = frozenset({"bfloat16", narrow.BLOCK8})


def _concrete_seed(seed: Any) -> Any:
    """``seed`` as :func:`sophia.spec.validate` checks it: an integer scalar array read as an int.

    A PRNG key (of the sampling only) and a traced seed (``optax.inject_hyperparams``
    under ``jit``) are not the spec's to check: ``0`` stands in for them here.
    """
    if not isinstance(seed, (jax.Array, np.ndarray)):
        return seed
    if _is_key(seed) or isinstance(seed, jax.core.Tracer) or jnp.ndim(seed) != 0:
        return 0
    if not jnp.issubdtype(seed.dtype, jnp.integer):
        return seed  # refused by the spec, naming it
    return int(seed)


def _rounding_seed(seed: Any, stochastic: frozenset[str]) -> Any:
    """The stochastic rounding's seed: ``seed`` itself, unless it is a PRNG key.

    A key seeds the estimator's sampling only; where a form rounds stochastically
    the rounding needs the integer seed that :func:`sophia.narrow.random_bits`
    takes, so a key is refused then.
    """
    if not (_is_key(seed) or jnp.ndim(seed) != 0):
        return seed
    if stochastic:
        forms = ", ".join(sorted(stochastic))
        raise ValueError(
            f"Invalid seed: a PRNG key ({seed!r}) with a stochastically rounded state form "
            f"({forms}) (allowed: an integer in [0, 2**32), which seeds both the rounding "
            "and the estimator's sampling)"
        )
    return 0  # unused: no form rounds stochastically


def _check_real_forms(params: optax.Params, **forms: str | None) -> None:
    """The stochastic forms are for real parameters: a complex one takes None or 'float32'."""
    for name, form in forms.items():
        if form not in _STOCHASTIC:
            continue
        for p in jax.tree.leaves(params):
            if is_complex(p):
                raise ValueError(
                    f"Invalid {name}: {form} for a {p.dtype} parameter (allowed: None or "
                    "'float32' for complex parameters)"
                )


def update_hessian(opt_state: optax.OptState, h_hat: Any, *, label_count: Any = None) -> Any:
    """Removed: pass the estimate to ``update`` instead (this raises, naming that form).

    The optimizer state no longer carries the configuration (``b2``, ``eps``,
    ``dynamic``, ``bs``...) that a refresh outside the transform would need; the
    transform applies a hand-computed estimate at the start of the step it is
    given to, as ``tx.update(grads, opt_state, params, hessian=h_hat)``.

    Args:
      opt_state: ignored.
      h_hat: ignored.
      label_count: ignored.

    Raises:
      TypeError: always, with the replacement call.
    """
    raise TypeError(
        "sophia.jax.update_hessian(opt_state, h_hat) was removed (the state no longer holds "
        "b2, eps and the rest of the configuration a refresh needs). Build the optimizer with "
        "hessian_update_interval=None and pass the estimate to the update of the step it "
        "refreshes: updates, opt_state = tx.update(grads, opt_state, params, hessian=h_hat) "
        "(add label_count=n for a GNB estimate with bs=None), on the steps t with t % k == 0"
    )

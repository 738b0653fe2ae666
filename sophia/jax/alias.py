"""Ready-made SophiaG and Sophia-H optimizers, chained as optax's own aliases are."""

# No `from __future__ import annotations`: optax (its contrib test suite, and
# code that inspects an optimizer's signature) checks that ``learning_rate`` is
# annotated with the object optax.ScalarOrSchedule, not a string naming it.
import functools
from collections.abc import Callable
from typing import Any

import chex
import jax
import optax

from sophia import spec
from sophia.jax.estimators import gnb, gnb_with_label_count, hutchinson
from sophia.jax.param_dtype import to_param_dtype
from sophia.jax.real_pairs import add_decayed_weights, scale_by_learning_rate
from sophia.jax.state import Estimator
from sophia.jax.transform import scale_by_sophia

__all__ = ["sophia_g", "sophia_h"]

_D = spec.DEFAULTS


_ESTIMATORS: dict[str, Estimator] = {"gnb": gnb_with_label_count, "hutchinson": hutchinson}


def _estimator(estimator: Estimator | str, axis_name: str | None = None) -> Estimator:
    if isinstance(estimator, str):
        if estimator not in _ESTIMATORS:
            raise ValueError(
                f"Invalid estimator: {estimator!r} (allowed: {', '.join(map(repr, _ESTIMATORS))}"
                " or a callable estimator(params, key, **extra_args) -> h_hat)"
            )
        estimator = _ESTIMATORS[estimator]
    elif estimator is gnb:  # the same estimate, with the label count bs=None follows
        estimator = gnb_with_label_count
    elif not callable(estimator):
        raise ValueError(
            f"Invalid estimator: {estimator!r} (allowed: 'gnb', 'hutchinson' or a callable)"
        )
    return estimator if axis_name is None else functools.partial(estimator, axis_name=axis_name)


def sophia_g(
    learning_rate: optax.ScalarOrSchedule = _D.lr,
    b1: chex.Numeric = _D.betas[0],
    b2: chex.Numeric = _D.betas[1],
    rho: chex.Numeric = _D.rho,
    weight_decay: optax.ScalarOrSchedule = _D.weight_decay,
    *,
    bs: chex.Numeric | None = _D.bs,
    eps: chex.Numeric = _D.eps,
    hessian_update_interval: int | None = _D.hessian_update_interval,
    estimator: Estimator | str = "gnb",
    maximize: bool = False,
    dynamic: bool = False,
    weight_decay_mask: Any | Callable[[optax.Params], Any] | None = None,
    mu_dtype: Any | None = None,
    hessian_dtype: Any | None = None,
    seed: int | jax.Array = 0,
    axis_name: str | None = None,
    step_diagnostics: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""SophiaG with the Gauss-Newton-Bartlett Hessian estimator.

    .. math::

       m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
       \theta_t &= \theta_{t-1} - \eta_t \left(\operatorname{sign}(m_t)
         \min\!\left(\frac{|m_t|}{\rho\, bs\, \max(h_t,0) + \epsilon}, 1\right)
         + \lambda \theta_{t-1}\right)

    with :math:`h \leftarrow \beta_2 h + (1-\beta_2)\hat h`, :math:`\hat h` from
    :func:`sophia.jax.gnb`, at the start of every step ``t`` (0-based: the
    steps taken so far) with ``t % k == 0``, ``k = hessian_update_interval``
    (steps 0, k, 2k, ...), from the parameters before that step's update, as
    in torch's loop. Pass the model's logits for the current batch to every
    ``update`` (they are used on refresh steps only)::

        updates, state = tx.update(grads, state, params, logits_fn=lambda p: model(p, x))

    (or ``logits=..., logits_vjp=...`` to reuse the training forward pass).
    Where some positions do not enter the loss (padding, the last position of
    a causal model's shifted labels) add ``mask=``, a boolean array of
    ``logits.shape[:-1]`` that is True where a position counts.
    ``bs`` is the number of labels behind each estimate (tokens per batch for
    a language model); the default ``None`` takes it from each refresh's
    logits (their positions, or the mask's True entries).

    Args:
      learning_rate: a scalar or an optax schedule.
      b1: EMA rate of the momentum.
      b2: EMA rate of the Hessian estimate.
      rho: clipping scale.
      weight_decay: decoupled weight decay (scalar or schedule), multiplied by
        the learning rate as in AdamW.
      bs: number of sampled labels behind each estimate; ``None``: the label
        count of the latest GNB refresh (:data:`sophia.spec.REFERENCE_BS`,
        with a one-time warning, where an estimate carries no count). A number
        that differs from the count a refresh sees gets a one-time warning.
      eps: added to the denominator.
      hessian_update_interval: ``k``, refresh at the start of each step ``t``
        with ``t % k == 0``; ``None`` for manual refreshes, an estimate passed
        as ``update(grads, state, params, hessian=h_hat)``.
      estimator: ``"gnb"`` (:func:`sophia.jax.gnb`), ``"hutchinson"``
        (:func:`sophia.jax.hutchinson`) or an :data:`sophia.jax.Estimator`
        callable. A name keeps :func:`optax.inject_hyperparams` working without
        ``static_args``; a callable must be listed in its ``static_args``, or it
        is taken for a schedule.
      maximize: ascend instead of descend.
      dynamic: adapt ``rho`` to keep the win rate in [0.1, 0.5].
      weight_decay_mask: a pytree of booleans (or a function of the params
        returning one) selecting the leaves that decay.
      mu_dtype: the momentum's form (:mod:`sophia.narrow`): ``None`` (the
        parameters' dtype), ``"float32"`` or ``"bfloat16"`` (stochastic rounding).
      hessian_dtype: the Hessian EMA's form: those, or ``"block8"`` (8-bit
        square-root codes and a float32 scale per 256 coordinates, stochastic
        rounding).
      seed: an int in ``[0, 2**32)`` seeding the stochastic rounding and the
        label sampling, or a PRNG key of the sampling (no stochastic form then).
      axis_name: inside ``shard_map``/``pmap`` with the batch split along this
        mapped axis, the estimator averages over it so that every replica holds
        the global estimate (average the gradients over the same axis yourself,
        as usual). Leave ``None`` under plain ``jit`` with sharded arrays.
      step_diagnostics: compute the win rate and momentum norm at every step;
        ``False`` computes them at Hessian refreshes only, which saves the
        plain step a pass over ``m`` and ``h`` (see
        :func:`sophia.jax.scale_by_sophia`).

    Returns:
      The optimizer, an :class:`optax.GradientTransformationExtraArgs`.

    References:
      Liu et al., `Sophia: A Scalable Stochastic Second-order Optimizer for
      Language Model Pre-training <https://arxiv.org/abs/2305.14342>`_, 2023.
    """
    # The two hyperparameters only this chain takes; scale_by_sophia validates the rest.
    spec.validate(lr=learning_rate, weight_decay=weight_decay)
    return optax.chain(
        scale_by_sophia(
            b1,
            b2,
            rho,
            bs=bs,
            eps=eps,
            hessian_update_interval=hessian_update_interval,
            estimator=_estimator(estimator, axis_name)
            if hessian_update_interval is not None
            else None,
            maximize=maximize,
            dynamic=dynamic,
            mu_dtype=mu_dtype,
            hessian_dtype=hessian_dtype,
            seed=seed,
            step_diagnostics=step_diagnostics,
        ),
        add_decayed_weights(weight_decay, weight_decay_mask),
        scale_by_learning_rate(learning_rate),
        # updates in the parameters' dtype, p + u giving the spec's single rounding
        to_param_dtype(),
    )


def sophia_h(
    learning_rate: optax.ScalarOrSchedule = _D.lr,
    b1: chex.Numeric = _D.betas[0],
    b2: chex.Numeric = _D.betas[1],
    rho: chex.Numeric = 0.01,
    weight_decay: optax.ScalarOrSchedule = _D.weight_decay,
    *,
    bs: chex.Numeric = 1.0,
    eps: chex.Numeric = _D.eps,
    hessian_update_interval: int | None = _D.hessian_update_interval,
    maximize: bool = False,
    dynamic: bool = False,
    weight_decay_mask: Any | Callable[[optax.Params], Any] | None = None,
    mu_dtype: Any | None = None,
    hessian_dtype: Any | None = None,
    seed: int | jax.Array = 0,
    axis_name: str | None = None,
    step_diagnostics: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Sophia-H: :func:`sophia_g`'s update with the Hutchinson estimator.

    The estimate :math:`v \odot (\nabla^2 L\,v)` is of the loss's own Hessian,
    so no label count enters and ``bs`` defaults to 1; ``rho`` defaults to
    0.01, the paper's value for Sophia-H. On refresh steps pass the loss::

        updates, state = tx.update(grads, state, params, obj_fn=lambda p: loss(p, batch))

    exactly as for ``optax.contrib.sophia``.

    Args:
      learning_rate: a scalar or an optax schedule.
      b1: EMA rate of the momentum.
      b2: EMA rate of the Hessian estimate.
      rho: clipping scale.
      weight_decay: decoupled weight decay (scalar or schedule).
      bs: multiplies ``rho`` in the denominator (1 for Hutchinson).
      eps: added to the denominator.
      hessian_update_interval: ``k``, refresh at the start of each step ``t``
        with ``t % k == 0``; ``None`` for manual.
      maximize: ascend instead of descend.
      dynamic: adapt ``rho`` to keep the win rate in [0.1, 0.5].
      weight_decay_mask: which leaves decay.
      mu_dtype: the momentum's form (see :func:`sophia_g`, :mod:`sophia.narrow`).
      hessian_dtype: the Hessian EMA's form (see :func:`sophia_g`).
      seed: an int seeding the stochastic rounding and the Rademacher probes,
        or a PRNG key of the probes (see :func:`sophia_g`).
      axis_name: mapped axis the batch is split along (see :func:`sophia_g`).
      step_diagnostics: see :func:`sophia_g`.

    Returns:
      The optimizer, an :class:`optax.GradientTransformationExtraArgs`.
    """
    return sophia_g(
        learning_rate,
        b1,
        b2,
        rho,
        weight_decay,
        bs=bs,
        eps=eps,
        hessian_update_interval=hessian_update_interval,
        estimator="hutchinson",
        maximize=maximize,
        dynamic=dynamic,
        weight_decay_mask=weight_decay_mask,
        mu_dtype=mu_dtype,
        hessian_dtype=hessian_dtype,
        seed=seed,
        axis_name=axis_name,
        step_diagnostics=step_diagnostics,
    )

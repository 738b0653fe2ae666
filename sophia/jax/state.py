r"""What :func:`sophia.jax.scale_by_sophia` keeps between steps, and what a refresh hands it.

The state holds only what changes from step to step; the configuration
(``b1``, ``b2``, the configured ``rho``, ``bs``, ``eps``, ``dynamic``...) lives
in the transform's closure, as in optax's own transforms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

__all__ = [
    "STATE_LAYOUT_VERSION",
    "Estimate",
    "Estimator",
    "LabelCountWarning",
    "ScaleBySophiaState",
    "find_states",
]

#: The layout of :class:`ScaleBySophiaState`. Version 1 also held the
#: configuration (``b2``, ``rho0``, ``dynamic``, ``bs``, ``eps``,
#: ``step_diagnostics``, ``bs_from_refresh``); version 2 holds only what
#: changes, with the ``bs`` that ``bs=None`` follows as ``label_count``.
STATE_LAYOUT_VERSION = 2

#: ``estimator(params, key, **extra_args) -> h_hat``, a diagonal-Hessian estimate
#: with the structure of ``params``. ``extra_args`` are the keyword arguments
#: given to ``update``; an estimator ignores the ones it does not use.
Estimator = Callable[..., optax.Params]


class Estimate(NamedTuple):
    """A diagonal-Hessian estimate and the number of sampled labels behind it.

    An :data:`Estimator` may return one instead of the bare ``h_hat`` (the GNB
    estimator of :func:`sophia.jax.sophia_g` does), and ``update(...,
    hessian=...)`` takes one: with ``bs=None`` the update then divides by
    ``label_count``, the ``N`` of the estimate's mean cross-entropy.

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
    r"""State of :func:`sophia.jax.scale_by_sophia`: what changes, nothing configured.

    Attributes:
      count: steps taken (int32).
      mu: the momentum :math:`m`, its leaves in the transform's ``mu_dtype``
        form (:mod:`sophia.narrow`; the parameters' dtypes by default).
      hessian: the diagonal-Hessian EMA :math:`h`, its leaves in the
        ``hessian_dtype`` form: arrays, or :class:`sophia.narrow.Block8` (int8
        codes of the parameter's shape and float32 scales) for ``"block8"``.
      key: PRNG key of the built-in estimator; split once per refresh.
      rho: the current :math:`\rho` (the configured one, moved by the
        dynamic-rho rule when the transform has ``dynamic=True``).
      win_rate: fraction of coordinates with ``r < 1`` in the last step (with
        ``step_diagnostics=False``: in the last step before the latest refresh).
      hessian_norm: L2 norm of :math:`h`, updated at each refresh.
      momentum_norm: L2 norm of :math:`m` after the last step (with
        ``step_diagnostics=False``: as of the latest refresh).
      label_count: with ``bs=None``, the ``bs`` the update divides by: the label
        count of the latest GNB refresh (:data:`sophia.spec.REFERENCE_BS` until
        one has given a count), a scalar of ``rho``'s dtype; ``None`` (no leaf)
        when the transform was built with a number for ``bs``.
    """

    count: jax.Array
    mu: optax.Updates
    hessian: optax.Updates
    key: jax.Array
    rho: jax.Array
    win_rate: jax.Array
    hessian_norm: jax.Array
    momentum_norm: jax.Array
    label_count: jax.Array | None = None


def find_states(tree: Any) -> list[ScaleBySophiaState]:
    """Every :class:`ScaleBySophiaState` inside an optimizer state, in tree order.

    Args:
      tree: an optax state (of a chain, ``multi_transform``, ``inject_hyperparams``...).

    Returns:
      The Sophia states it holds.
    """
    is_state = lambda x: isinstance(x, ScaleBySophiaState)  # noqa: E731
    return [x for x in jax.tree.leaves(tree, is_leaf=is_state) if is_state(x)]

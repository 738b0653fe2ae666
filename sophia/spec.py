r"""The SophiaG specification: hyperparameters, validation, and the update in NumPy.

This module is the single source of truth that :mod:`sophia.jax` and
:mod:`sophia.torch` both obey. It depends on NumPy only.

The update (Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order
Optimizer for Language Model Pre-training", arXiv:2305.14342), for each
parameter :math:`\theta` with gradient :math:`g`, momentum :math:`m` and
diagonal-Hessian EMA :math:`h`:

.. math::

   g &\leftarrow -g \quad\text{if maximize} \\
   m &\leftarrow \beta_1 m + (1-\beta_1) g \\
   r &\leftarrow \min\!\left(\frac{|m|}{\rho\,bs\,\max(h, 0) + \epsilon}, 1\right) \\
   u &\leftarrow \operatorname{sign}(m)\, r + \lambda\,\theta \\
   \theta &\leftarrow \theta - \eta\, u

and, on a Hessian refresh with estimate :math:`\hat h`,
:math:`h \leftarrow \beta_2 h + (1-\beta_2)\hat h`. There is no bias
correction, as in the paper's code.

Arithmetic contract (what makes the frameworks agree to the bit):

* The *compute dtype* is float32 for float32/bfloat16/float16 parameters and
  float64 for float64 parameters. Every operand is cast to it, the result is
  cast back to the storage dtype of each array.
* Scalar coefficients are rounded to the compute dtype first, and derived
  scalars are computed *in* the compute dtype: ``one_minus_b1 = 1 - b1``,
  ``rho_bs = rho * bs``. That makes a hyperparameter passed as a Python float,
  a traced array (``optax.inject_hyperparams``) or a tensor give one result.
* ``eps`` is floored at the compute dtype's smallest normal number, so
  ``eps=0`` can never produce ``0/0``.
* Operation order is exactly the one in :func:`sophia_update` below, each
  operation rounded on its own (no fused multiply-add).

Dynamic rho (``dynamic=True``): at every Hessian refresh, after the EMA, and
only once at least one step has been taken, the group's ``rho`` moves by
:data:`DYNAMIC_FACTOR` according to the win rate of the last step (the fraction
of coordinates with ``r < 1``):

* win rate ``< WIN_RATE_BAND[0]``: ``rho <- min(rho * DYNAMIC_FACTOR, rho0 * DYNAMIC_RANGE)``
* win rate ``> WIN_RATE_BAND[1]``: ``rho <- max(rho / DYNAMIC_FACTOR, rho0 / DYNAMIC_RANGE)``
* otherwise unchanged;

all in the compute dtype (float32 unless the parameters are float64), where
``rho0`` is the configured ``rho``. A larger ``rho`` shrinks ``|m| / (rho bs h)``
and so raises the win rate. A group with no coordinates never moves its rho.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from sophia import narrow

__all__ = [
    "DEFAULTS",
    "DYNAMIC_FACTOR",
    "DYNAMIC_RANGE",
    "REFERENCE_BS",
    "WIN_RATE_BAND",
    "SophiaHyperParams",
    "compute_dtype",
    "dynamic_rho",
    "effective_eps",
    "hessian_ema",
    "sophia_update",
    "validate",
    "win_rate",
    "narrow",
]

#: The lower and upper win rate that the paper's authors recommend.
WIN_RATE_BAND: tuple[float, float] = (0.1, 0.5)
#: Multiplicative step of the dynamic-rho rule at each Hessian refresh.
DYNAMIC_FACTOR: float = 1.25
#: Dynamic rho stays within ``[rho0 / DYNAMIC_RANGE, rho0 * DYNAMIC_RANGE]``.
DYNAMIC_RANGE: float = 100.0
#: The label count of the paper's code (its ``step(bs=5120)`` default), used where
#: ``bs`` is ``None`` and no refresh has told how many labels are behind the estimate.
REFERENCE_BS: int = 5120


@dataclasses.dataclass(frozen=True)
class SophiaHyperParams:
    r"""SophiaG hyperparameters with the seed's defaults.

    Attributes:
      lr: learning rate :math:`\eta`.
      betas: ``(b1, b2)``, EMA rates of the momentum and of the Hessian.
      rho: clipping scale :math:`\rho` (the paper's gamma).
      weight_decay: decoupled weight decay :math:`\lambda`.
      eps: added to the denominator.
      bs: number of sampled labels behind each GNB estimate; the denominator
        is ``rho * bs * h``. ``None`` (the default): the label count of the
        latest GNB refresh (the masked-in positions of its logits), or
        :data:`REFERENCE_BS` where no refresh has given one.
      hessian_update_interval: refresh ``h`` every ``k`` steps (``None``: the
        user refreshes it by hand).
      maximize: ascend instead of descend.
      dynamic: adapt ``rho`` so that the win rate returns into
        :data:`WIN_RATE_BAND`.
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.965, 0.99)
    rho: float = 0.04
    weight_decay: float = 1e-1
    eps: float = 1e-15
    bs: float | None = None
    hessian_update_interval: int | None = 10
    maximize: bool = False
    dynamic: bool = False

    def __post_init__(self) -> None:
        validate(**dataclasses.asdict(self))


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check(name: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} (allowed: {allowed})")


def _concrete(name: str, value: Any, allowed: str) -> float | None:
    """``value`` as a float, or ``None`` where it is not concrete yet.

    Arrays, tensors and NumPy scalars with one element are read; traced
    values (inside ``jax.jit`` or ``optax.inject_hyperparams``) and schedules
    cannot be read and are left to the framework.
    """
    if isinstance(value, (bool, str, bytes)) or value is None:
        _check(name, value, False, allowed)
    if _is_number(value):
        return float(value)
    if callable(value) and not hasattr(value, "shape"):
        return None
    try:
        return float(value)
    except Exception:  # noqa: BLE001 - a tracer or a lazy value: the framework checks it
        return None


def _check_number(
    name: str, value: Any, lo: float, hi: float, lo_open: bool, hi_open: bool
) -> None:
    lo_s = "(" if lo_open else "["
    hi_s = ")" if hi_open else "]"
    allowed = f"a number in {lo_s}{lo:g}, {hi:g}{hi_s}"
    v = _concrete(name, value, allowed)
    if v is None:
        return
    ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    _check(name, value, ok and not math.isnan(v), allowed)


def _check_interval(k: Any) -> None:
    """``None``, or an integer >= 1 (a Python int or an integer array with one element).

    ``optax.inject_hyperparams`` turns ints into arrays, and inside ``jit`` into
    tracers, which are left to the framework.
    """
    allowed = "an integer >= 1, or None"
    if k is None:
        return
    if isinstance(k, numbers.Integral) and not isinstance(k, bool):
        _check("hessian_update_interval", k, k >= 1, allowed)
        return
    kind = getattr(getattr(k, "dtype", None), "kind", None)
    _check("hessian_update_interval", k, kind in ("i", "u"), allowed)
    v = _concrete("hessian_update_interval", k, allowed)
    _check("hessian_update_interval", k, v is None or v >= 1, allowed)


def validate(
    lr: Any = 1e-4,
    betas: Any = (0.965, 0.99),
    rho: Any = 0.04,
    weight_decay: Any = 1e-1,
    eps: Any = 1e-15,
    bs: Any = None,
    hessian_update_interval: Any = 10,
    maximize: Any = False,
    dynamic: Any = False,
    mu_dtype: Any = None,
    hessian_dtype: Any = None,
    seed: Any = 0,
) -> None:
    """Checks SophiaG hyperparameters; the one validator both frameworks use.

    A value that is not concrete (a learning-rate schedule, a traced array
    inside ``optax.inject_hyperparams``) is left to the framework. Raises
    ``ValueError`` naming the argument, the value and what is allowed, e.g.
    ``Invalid rho: -1.0 (allowed: a number in (0, inf))``. ``bs=None`` is
    valid: the label count of the latest GNB refresh (see
    :class:`SophiaHyperParams`). ``mu_dtype``, ``hessian_dtype`` and ``seed``
    are the narrow state's (:mod:`sophia.narrow`).
    """
    inf = math.inf
    _check_number("lr", lr, 0.0, inf, False, True)
    ok = isinstance(betas, Sequence) and not isinstance(betas, str) and len(betas) == 2
    _check("betas", betas, ok, "a pair (b1, b2)")
    for i, b in enumerate(betas):
        _check_number(f"betas[{i}]", b, 0.0, 1.0, False, True)
    _check_number("rho", rho, 0.0, inf, True, True)
    _check_number("weight_decay", weight_decay, 0.0, inf, False, True)
    _check_number("eps", eps, 0.0, inf, False, True)
    if bs is not None:
        _check_number("bs", bs, 0.0, inf, True, True)
    _check_interval(hessian_update_interval)
    _check("maximize", maximize, isinstance(maximize, (bool, np.bool_)), "True or False")
    _check("dynamic", dynamic, isinstance(dynamic, (bool, np.bool_)), "True or False")
    narrow.state_dtype_name("mu_dtype", mu_dtype, narrow.MU_DTYPES)
    narrow.state_dtype_name("hessian_dtype", hessian_dtype, narrow.HESSIAN_DTYPES)
    ok = isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and 0 <= seed < 2**32
    _check("seed", seed, ok, "an integer in [0, 2**32)")


#: The seed's defaults.
DEFAULTS = SophiaHyperParams()


def compute_dtype(dtype: Any) -> np.dtype:
    """The dtype the update math runs in for parameters of ``dtype``.

    A complex parameter is a pair of reals: complex128 computes in float64,
    complex64 in float32.
    """
    wide = np.dtype(dtype) in (np.dtype(np.float64), np.dtype(np.complex128))
    return np.dtype(np.float64) if wide else np.dtype(np.float32)


def effective_eps(eps: float, dtype: Any = np.float32) -> float:
    """``eps`` floored at the smallest normal number of the compute dtype."""
    cd = compute_dtype(dtype)
    return float(max(cd.type(eps), np.finfo(cd).tiny))


def sophia_update(
    theta: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    h: np.ndarray,
    *,
    lr: float = DEFAULTS.lr,
    b1: float = DEFAULTS.betas[0],
    rho: float = DEFAULTS.rho,
    bs: float = REFERENCE_BS,
    weight_decay: float = DEFAULTS.weight_decay,
    eps: float = DEFAULTS.eps,
    maximize: bool = False,
    mu_dtype: str | None = None,
    seed: int = 0,
    step: int = 0,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One SophiaG parameter update, the reference every framework matches.

    Args:
      theta, g, m, h: parameter, gradient, momentum and Hessian EMA. Their
        dtypes are the storage dtypes; the math runs in :func:`compute_dtype`.
      lr, b1, rho, bs, weight_decay, eps, maximize: as in
        :class:`SophiaHyperParams`, except that ``bs`` is the number actually
        used (no ``None``: the reference update knows no refresh).
      mu_dtype: the form the new momentum is stored in (:mod:`sophia.narrow`;
        ``None``: ``m``'s own dtype, rounded to nearest). ``h`` may be a
        :class:`sophia.narrow.Block8`.
      seed, step: the stochastic rounding's seed and this step's 0-based index.

    Returns:
      ``(theta_new, m_new, n_win)``: the new parameter and momentum in their
      storage dtypes, and the number of coordinates with ``r < 1``.
    """
    cd = compute_dtype(theta.dtype)
    c = cd.type
    t = theta.astype(cd)
    g = g.astype(cd)
    if maximize:
        g = -g
    b1c = c(b1)
    m_new = b1c * m.astype(cd) + (c(1) - b1c) * g
    h_values = narrow.decode(h, cd)
    den = (c(rho) * c(bs)) * np.maximum(h_values, c(0)) + c(effective_eps(eps, cd))
    r = np.minimum(np.abs(m_new) / den, c(1))
    u = np.sign(m_new) * r + c(weight_decay) * t
    t_new = t - c(lr) * u
    m_stored = narrow.encode(m_new, mu_dtype, m.dtype, seed, step, narrow.STREAM_MU)
    return t_new.astype(theta.dtype), m_stored, int(np.count_nonzero(r < 1))


def hessian_ema(
    h: np.ndarray | narrow.Block8,
    h_hat: np.ndarray,
    b2: float = DEFAULTS.betas[1],
    *,
    hessian_dtype: str | None = None,
    compute: Any = None,
    seed: int = 0,
    step: int = 0,
) -> np.ndarray | narrow.Block8:
    """``h <- b2 * h + (1 - b2) * h_hat`` in the compute dtype, stored in ``hessian_dtype``.

    ``compute`` is the parameters' compute dtype (default: that of ``h``'s
    dtype); ``hessian_dtype=None`` stores in ``h``'s own dtype, rounded to
    nearest; a narrow form rounds as :func:`sophia.narrow.encode` says, with
    ``step`` the 0-based index of the step this refresh starts.
    """
    if compute is None:
        compute = np.float32 if isinstance(h, narrow.Block8) else h.dtype
    cd = compute_dtype(compute)
    b2c = cd.type(b2)
    out = b2c * narrow.decode(h, cd) + (cd.type(1) - b2c) * h_hat.astype(cd)
    storage = np.float32 if isinstance(h, narrow.Block8) else h.dtype
    return narrow.encode(out, hessian_dtype, storage, seed, step, narrow.STREAM_HESSIAN)


def win_rate(n_win: int, n_total: int, dtype: Any = np.float32) -> np.floating:
    """Fraction of coordinates with ``r < 1``; 0 for an empty group."""
    cd = compute_dtype(dtype)
    return cd.type(n_win) / cd.type(max(n_total, 1))


def dynamic_rho(
    rho: float, rate: float, rho0: float, dtype: Any = np.float32, n_total: int = 1
) -> np.floating:
    """The dynamic-rho rule applied once (see the module docstring)."""
    cd = compute_dtype(dtype)
    c = cd.type
    rho, rate, rho0 = c(rho), c(rate), c(rho0)
    if n_total == 0:
        return rho
    if rate < c(WIN_RATE_BAND[0]):
        return np.minimum(rho * c(DYNAMIC_FACTOR), rho0 * c(DYNAMIC_RANGE))
    if rate > c(WIN_RATE_BAND[1]):
        return np.maximum(rho / c(DYNAMIC_FACTOR), rho0 / c(DYNAMIC_RANGE))
    return rho

"""What every test package shares: seeded optimizer states, exact comparisons, the repo's root.

NumPy only (and ``sophia.spec``), so the JAX, torch and cross-framework tests
all import it whichever framework they exercise. The distances count bit
patterns, the suite's definition of "identical": ``-0`` is one ulp from
``+0`` and a NaN equals any NaN (the frameworks do not agree on NaN payloads).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import ml_dtypes
import numpy as np

from sophia import spec

#: The repository root: where ``python -m tests.<package>.<module>`` finds the tests package.
REPO_ROOT = Path(__file__).resolve().parents[1]

BF16 = np.dtype(ml_dtypes.bfloat16)

_UINTS = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_INTS = {2: np.int16, 4: np.int32, 8: np.int64}


# ----------------------------------------------------------------------------- states


def random_state(
    seed: int,
    shapes: Sequence[tuple[int, ...]],
    dtype=np.float32,
    h_scale: float = 1e-3,
    zero_m: bool = False,
) -> list[tuple[np.ndarray, ...]]:
    """One ``(theta, g, m, h)`` tuple of NumPy arrays per shape, drawn from ``seed``.

    ``h`` has negative entries (as a Hutchinson estimate can) and exact zeros
    (the clip's ``max(h, eps)`` branch); ``zero_m`` puts exact zeros in ``m``
    too (the win rate's ``r < 1`` at ``m = 0``).
    """
    rng = np.random.default_rng(seed)
    out = []
    for shape in shapes:
        theta, g, m = (rng.normal(size=shape) for _ in range(3))
        h = rng.normal(size=shape) * h_scale
        if h.size:
            h.flat[:: max(h.size // 5, 1)] = 0.0
            if zero_m:
                m.flat[1 :: max(h.size // 4, 2)] = 0.0
        out.append(tuple(np.asarray(x, dtype=dtype) for x in (theta, g, m, h)))
    return out


def random_leaves(seed: int, shapes, dtype=np.float32, h_scale: float = 1e-2):
    """:func:`random_state` with zeros in ``m``, as four dicts (theta, g, m, h) keyed p0, p1, ..."""
    leaves = random_state(seed, shapes, dtype, h_scale, zero_m=True)
    return tuple({f"p{i}": leaf[j] for i, leaf in enumerate(leaves)} for j in range(4))


def reference_step(leaves, h_hat=None, b2=spec.DEFAULTS.betas[1], **kw):
    """The spec's step over a list of (theta, g, m, h) leaves; returns new leaves and n_win."""
    out, n_win = [], 0
    for i, (theta, g, m, h) in enumerate(leaves):
        if h_hat is not None:
            h = spec.hessian_ema(h, h_hat[i], b2)
        t, m2, w = spec.sophia_update(theta, g, m, h, **kw)
        out.append((t, g, m2, h))
        n_win += w
    return out, n_win


# ----------------------------------------------------------------------------- bits


def bits(x) -> np.ndarray:
    """The bit patterns of a 2-, 4- or 8-byte float array, as unsigned integers."""
    x = np.asarray(x)
    return x.view(_UINTS[x.dtype.itemsize])


def real_view(x) -> np.ndarray:
    """A complex array as real pairs of shape ``x.shape + (2,)`` (torch's ``view_as_real``).

    A C-ordered copy; a real array comes back as such a copy unchanged.
    """
    x = np.array(x)
    if not np.iscomplexobj(x):
        return x
    return x.reshape(-1).view(x.real.dtype).reshape(*x.shape, 2)


def _ordered(x: np.ndarray) -> np.ndarray:
    """Bit patterns on one monotonic integer line: ``+0`` is 0 and ``-0`` is -1.

    Python integers (object dtype), so that 64-bit differences cannot overflow.
    """
    width = 8 * x.dtype.itemsize
    i = x.view(_INTS[x.dtype.itemsize]).astype(object)
    return np.where(i < 0, -(i & ((1 << (width - 1)) - 1)) - 1, i)


def ulp_diff(a, b) -> int:
    """The largest distance in units in the last place between two same-dtype arrays.

    0 means bit-identical, NaN against NaN counting as equal; ``-0`` against
    ``+0`` is 1. Complex arrays are compared part by part.
    """
    a, b = real_view(a), real_view(b)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.size == 0:
        return 0
    both_nan = (a != a) & (b != b)
    return int(np.max(np.where(both_nan, 0, np.abs(_ordered(a) - _ordered(b)))))


def rel_diff(a, b):
    """max |a - b| / max |b| (0 when both are 0): the difference relative to the array's scale."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    scale = np.max(np.abs(b))
    d = np.max(np.abs(a - b))
    return float(d / scale) if scale > 0 else float(d)


def tree_ulp(x, y):
    return max((ulp_diff(x[k], y[k]) for k in x), default=0)


def tree_rel(x, y):
    return max((rel_diff(x[k], y[k]) for k in x), default=0.0)


def identical(a, b) -> bool:
    """Same shape, dtype and values: NaN equals NaN, and -0 is not +0 (the sign bit counts)."""
    a, b = np.asarray(a), np.asarray(b)
    if not (a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)):
        return False
    if not np.issubdtype(a.dtype, np.floating):
        return True
    numbers = ~np.isnan(a)
    return np.array_equal(np.signbit(a[numbers]), np.signbit(b[numbers]))


def within_rounding(x, ref, *operands, n: int = 2) -> bool:
    """|x - ref| <= n ulp of the largest operand: what a fused multiply-add can move."""
    dtype = np.asarray(ref).dtype
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    scale = np.abs(ref)
    for o in operands:
        scale = np.maximum(scale, np.abs(np.asarray(o, np.float64)))
    spacing = np.spacing(scale.astype(dtype)).astype(np.float64)
    return bool(np.all(np.abs(x - ref) <= n * spacing))


# ----------------------------------------------------------------------------- subprocesses


def run_module(module: str, *args: str, env=None, timeout: float | None = None):
    """``python -m module *args`` from the repository root, its output captured as text.

    Workers that must start in a fresh interpreter (an XLA flag read once, a
    device count) are modules of this package, so they import the shared
    helpers by their full name.
    """
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout,
    )  # fmt: skip

"""Distances in units in the last place, and bfloat16 rounding, for the benchmark scripts.

NumPy only, so that every script can import it whichever framework is
installed. The distance counts bit patterns: floats are laid out on one
monotonic integer line on which ``-0`` sits one step below ``+0``, so a
distance of 0 means bit-identical (the test suite's definition). NaN
compared with NaN counts as 0 whatever the payload or sign, since the
frameworks do not agree on NaN payloads.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "bfloat16_bits",
    "ordered",
    "round_to_bfloat16",
    "spacing",
    "ulp_diff",
    "ulps_of_operands",
]

_INTS = {2: np.int16, 4: np.int32, 8: np.int64}


def ordered(x: np.ndarray) -> np.ndarray:
    """The bit patterns of ``x`` (a 2-, 4- or 8-byte float or integer-coded array) as int64s.

    Sign-magnitude patterns become a monotonic integer line: ``+0`` is 0, the
    positive floats count up from it and the negative ones count down from
    ``-1``, which is ``-0``. Arrays of ``uint16`` are read as bfloat16 (or
    float16) bit patterns.

    Args:
      x: the array.

    Returns:
      An ``int64`` array of the same shape (Python ints for 8-byte inputs, so
      that differences cannot overflow).
    """
    x = np.asarray(x)
    width = 8 * x.dtype.itemsize
    i = x.view(_INTS[x.dtype.itemsize]).astype(object if width == 64 else np.int64)
    magnitude = i & ((1 << (width - 1)) - 1)
    return np.where(i < 0, -magnitude - 1, i)


def _is_nan(x: np.ndarray) -> np.ndarray:
    if x.dtype.kind in "iu":  # bit patterns: the caller keeps NaNs out
        return np.zeros(x.shape, bool)
    return np.isnan(x.astype(np.float64))


def ulp_diff(a: np.ndarray, b: np.ndarray) -> int:
    """The largest distance, in units in the last place, between two same-dtype arrays.

    Args:
      a, b: arrays of one dtype and shape (floats, or ``uint16`` bfloat16
        bit patterns from :func:`bfloat16_bits`).

    Returns:
      0 when every element is bit-identical (NaN equals NaN); ``-0`` against
      ``+0`` is 1.

    Raises:
      ValueError: the dtypes or shapes differ.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        raise ValueError(f"ulp_diff: {a.dtype}{a.shape} against {b.dtype}{b.shape}")
    if a.size == 0:
        return 0
    d = np.abs(ordered(a) - ordered(b))
    d = np.where(_is_nan(a) & _is_nan(b), 0, d)
    return int(np.max(d))


def round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to bfloat16 (to nearest, ties to even), returned as float32 values.

    The rounding torch, JAX and ml_dtypes apply when a float32 is stored as
    bfloat16; NaN stays NaN and values past bfloat16's range become infinite.
    """
    x = np.asarray(x, np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), x, out)


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """The bfloat16 bit patterns (``uint16``) of float32 values that are exact in bfloat16.

    Raises:
      ValueError: some value is not a bfloat16 (its low 16 bits are set).
    """
    bits = np.asarray(x, np.float32).view(np.uint32)
    if np.any(bits & 0xFFFF):
        raise ValueError("bfloat16_bits: the array holds values that are not bfloat16")
    return (bits >> 16).astype(np.uint16)


def spacing(scale: np.ndarray, storage: str) -> np.ndarray:
    """One ulp, in float64, at each magnitude of ``scale`` in the ``storage`` dtype.

    Args:
      scale: magnitudes.
      storage: ``"float32"``, ``"float64"`` or ``"bfloat16"`` (float32's
        spacing times ``2**16``: bfloat16 keeps float32's exponent range with 16
        fewer fraction bits, subnormals included).
    """
    scale = np.abs(np.asarray(scale, np.float64))
    if storage == "float64":
        return np.spacing(scale)
    one = np.spacing(scale.astype(np.float32)).astype(np.float64)
    return one * 65536.0 if storage == "bfloat16" else one


def ulps_of_operands(x: np.ndarray, ref: np.ndarray, storage: str, *operands: object) -> float:
    """``max |x - ref|`` in ulps of the largest of ``|ref|`` and ``|operands|``, per element.

    A computation whose roundings differ only by where fused multiply-adds
    were formed (one rounding instead of two) stays within 2 of these units:
    each dropped rounding moves the result by at most half an ulp of the
    product it skipped, which is no larger than the largest operand's. The
    test suite's bound for jitted JAX on CPU (tests/jax/test_jax_update.py).

    Args:
      x, ref: results (float32 arrays holding ``storage`` values).
      storage: the storage dtype's name, as in :func:`spacing`.
      operands: arrays or scalars broadcastable to ``ref``.

    Returns:
      The largest ratio (0.0 for empty arrays; NaN where both are NaN counts 0).
    """
    x64, ref64 = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if ref64.size == 0:
        return 0.0
    scale = np.abs(ref64)
    for o in operands:
        scale = np.maximum(scale, np.abs(np.asarray(o, np.float64)))
    with np.errstate(invalid="ignore"):
        ratio = np.abs(x64 - ref64) / spacing(scale, storage)
    ratio = np.where(np.isnan(x64) & np.isnan(ref64), 0.0, ratio)
    return float(np.max(ratio))

r"""The narrow optimizer state, part of the spec: its forms and how values are rounded into it.

SophiaG keeps two arrays per parameter, the momentum ``m`` and the Hessian EMA
``h``. By default both have the parameter's dtype. ``mu_dtype`` and
``hessian_dtype`` name a narrower (or wider) form for each:

* ``None``: the parameter's dtype, rounded to nearest (the default, and the
  behaviour before narrow state existed);
* ``"float32"``: float32, rounded to nearest from the compute dtype (exact for
  float32, bfloat16 and float16 parameters, whose compute dtype is float32);
* ``"bfloat16"``: bfloat16, rounded **stochastically** (:func:`round_bfloat16`);
* ``"block8"`` (``hessian_dtype`` only): :class:`Block8`, signed 8-bit
  square-root codes with one float32 scale per :data:`BLOCK_SIZE` coordinates,
  rounded stochastically (:func:`encode_block8`).

Why stochastic: an EMA with ``b2 = 0.99`` adds 1% of ``h_hat`` per refresh, about
2.5 bfloat16 ulps of ``h``; round to nearest drops every increment under half an
ulp, so a bfloat16 ``h`` (and ``m`` with ``b1 = 0.965``) is biased towards its old
value. Stochastic rounding is unbiased: ``x`` between two neighbours ``lo < hi``
becomes ``hi`` with probability ``(x - lo) / (hi - lo)``.

Deterministic: the random bits are a counter-based function
:func:`random_bits` of ``(seed, step, stream, coordinate)``, written here with
NumPy integer arithmetic that every framework reproduces exactly, so the NumPy
reference, JAX and every torch path agree to the bit with narrow state too.
``step`` is the 0-based index of the step whose update (or, for ``h``, whose
refresh at its start) writes the value; ``stream`` tells the arrays apart
(:data:`STREAM_MU`, :data:`STREAM_HESSIAN`); ``coordinate`` is the C-order
index into the array. The seed is the optimizer's ``seed`` hyperparameter; every
tensor draws from the same ``(seed, step, stream)`` sequence, since rounding
noise only has to be independent across steps and coordinates of one array.

The stochastic forms are for real parameters; a complex parameter (a pair of
reals to both frameworks) takes ``None`` or ``"float32"``, and anything else is
a ``ValueError``.

The update itself reads the unrounded momentum: ``r`` and the step use ``m`` in
the compute dtype, and only what is stored is narrowed.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "BLOCK8",
    "BLOCK_SIZE",
    "HESSIAN_DTYPES",
    "INDEX_SPREAD",
    "MASK32",
    "MIX_MUL1",
    "MIX_MUL2",
    "MU_DTYPES",
    "STREAM_HESSIAN",
    "STREAM_MU",
    "Block8",
    "block_count",
    "decode",
    "decode_block8",
    "encode",
    "encode_block8",
    "mix32",
    "random_bits",
    "round_bfloat16",
    "state_dtype_name",
    "state_bytes",
]

#: The 8-bit block form's name.
BLOCK8 = "block8"
#: The narrow forms each argument accepts, besides ``None`` (the parameter's dtype).
MU_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
HESSIAN_DTYPES: tuple[str, ...] = ("float32", "bfloat16", BLOCK8)
#: Coordinates per block of the 8-bit form: one float32 scale each (4 bytes per
#: 256 codes, 1.6% on top of the codes).
BLOCK_SIZE = 256
#: The largest code: a block's largest magnitude is encoded as +-127 (-128 is unused,
#: so the codes are symmetric and a sign flip is exact).
CODE_MAX = 127
#: ``stream`` of :func:`random_bits` for each array.
STREAM_MU = 0
STREAM_HESSIAN = 1

#: The random bits' arithmetic is modulo ``2**32``: every product is masked with this.
MASK32 = 0xFFFFFFFF
#: The multipliers of :func:`mix32`: odd and below ``2**31``, so that a product with a
#: 32-bit value stays below ``2**63`` and frameworks without unsigned 32-bit
#: multiplication (torch) compute it exactly in int64 before masking.
MIX_MUL1 = 0x7FEB352D
MIX_MUL2 = 0x2C1B3C6D
#: ``2**32`` over the golden ratio, negated (odd, below ``2**31``): spreads consecutive
#: indices over all 32 bits before mixing, which a xorshift-multiply alone does badly
#: for small inputs.
INDEX_SPREAD = 0x61C88647


def mix32(x: np.ndarray) -> np.ndarray:
    """A bijection of 32-bit values (xorshift-multiply rounds), on uint64 arrays."""
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(MIX_MUL1)) & np.uint64(MASK32)
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(MIX_MUL2)) & np.uint64(MASK32)
    return x ^ (x >> np.uint64(16))


def random_bits(seed: int, step: int, stream: int, shape: Any) -> np.ndarray:
    """32 random bits per coordinate of an array of ``shape``, a pure function of its inputs.

    ``key = mix(seed ^ mix(4 * step + stream))`` (all modulo ``2**32``), then
    ``bits[i] = mix(key ^ (i * 0x61C88647))`` for the C-order index ``i``, where ``mix`` is
    :func:`mix32`: ``x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15;
    x *= 0x2C1B3C6D; x ^= x >> 16``, each product modulo ``2**32``.

    Returns:
      uint32 array of ``shape``.
    """
    mask = np.uint64(MASK32)
    counter = np.array([(4 * int(step) + int(stream)) & MASK32], dtype=np.uint64)
    key = mix32(np.uint64(int(seed) & MASK32) ^ mix32(counter))
    n = int(np.prod(shape, dtype=np.int64))
    index = ((np.arange(n, dtype=np.uint64) & mask) * np.uint64(INDEX_SPREAD)) & mask
    return mix32(key ^ index).astype(np.uint32).reshape(shape)


def round_bfloat16(x: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """``x`` (float32) rounded stochastically to bfloat16 with the top 16 of ``bits``.

    The float32 bit pattern plus ``bits >> 16``, truncated to its top 16 bits:
    ``x`` between neighbours ``lo < hi`` (in magnitude) becomes ``hi`` with
    probability ``(|x| - lo) / (hi - lo)``. Infinities stay; a finite value
    past bfloat16's largest may become infinity, as its magnitude says; NaN
    becomes bfloat16 NaN (round to nearest).
    """
    import ml_dtypes  # NumPy's bfloat16; installed with jax, needed only here

    x = np.asarray(x, dtype=np.float32)
    pattern = x.view(np.uint32).astype(np.uint64)
    rounded = ((pattern + (bits.astype(np.uint64) >> np.uint64(16))) >> np.uint64(16)) << 16
    out = rounded.astype(np.uint32).view(np.float32).astype(ml_dtypes.bfloat16)
    return np.where(np.isnan(x), x.astype(ml_dtypes.bfloat16), out)


class Block8(NamedTuple):
    """An array in the 8-bit block form.

    Attributes:
      codes: int8 array of the array's shape, each in ``[-127, 127]``.
      scale: float32 array of :func:`block_count` scales; block ``b`` holds the
        coordinates ``b * BLOCK_SIZE ... (b + 1) * BLOCK_SIZE - 1`` of the C-order
        flattening; its value is ``codes * |codes| * scale[b]`` (:func:`encode_block8`).
    """

    codes: np.ndarray
    scale: np.ndarray


def block_count(size: int) -> int:
    """Blocks of :data:`BLOCK_SIZE` that cover ``size`` coordinates (the last may be partial)."""
    return -(-int(size) // BLOCK_SIZE)


def encode_block8(x: np.ndarray, bits: np.ndarray) -> Block8:
    """``x`` (float32) in the 8-bit block form, rounded stochastically with ``bits``.

    Square-root codes: a code ``c`` stands for ``c * |c| * scale``, so the 127
    levels of each sign are dense near zero and sparse near the block's largest
    magnitude, which spends the bits where SophiaG's clipping decisions fall
    (measured: ``benchmarks/narrow_codes.py``).

    Per block: ``scale = max|x| / 16129`` (``127**2``, float32). A block with a
    finite, nonzero scale codes each coordinate as follows, every operation in
    float32 and rounded once, in this order::

        v = |x| / scale                  # in [0, 16129]
        a = floor(sqrt(v)); a -= (a * a > v)     # a*a <= v < (a+1)**2
        p = (v - a * a) / (2 * a + 1)    # the odds of rounding up
        u = (bits >> 8) * 2**-24         # uniform in [0, 1)
        c = sign(x) * min(a + (u < p), 127)

    so that ``E[c * |c|] = v``: unbiased in value. Zero stays zero and the sign of
    a negative (Hutchinson) estimate is kept. A block whose scale is 0 codes
    zeros; one whose scale is not finite (an infinite or NaN coordinate) codes
    zeros with that scale, so it decodes to NaN everywhere.
    """
    x = np.asarray(x, dtype=np.float32)
    flat = x.reshape(-1)
    n = flat.size
    nb = block_count(n)
    padded = np.zeros(nb * BLOCK_SIZE, np.float32)
    padded[:n] = flat
    blocks = padded.reshape(nb, BLOCK_SIZE)
    f32 = np.float32
    with np.errstate(invalid="ignore"):
        scale = (np.max(np.abs(blocks), axis=1) / f32(CODE_MAX * CODE_MAX)).astype(f32)
    usable = np.isfinite(scale) & (scale > 0)
    per_coord = np.repeat(np.where(usable, scale, f32(1)), BLOCK_SIZE)[:n]
    keep = np.repeat(usable, BLOCK_SIZE)[:n]
    u = (bits.reshape(-1) >> np.uint32(8)).astype(f32) * f32(2.0**-24)
    with np.errstate(invalid="ignore", over="ignore"):
        v = np.where(keep, np.abs(flat) / per_coord, f32(0))
        a = np.floor(np.sqrt(v))
        a = a - (a * a > v).astype(f32)
        p = (v - a * a) / (f32(2) * a + f32(1))
    magnitude = np.minimum(a + (u < p).astype(f32), f32(CODE_MAX))
    codes = np.where(flat < 0, -magnitude, magnitude)
    return Block8(codes.astype(np.int8).reshape(x.shape), scale)


def decode_block8(block: Block8) -> np.ndarray:
    """The float32 values of ``block``: ``(c * |c|) * scale`` of each coordinate's block.

    ``c * |c|`` is an integer of at most ``16129``, exact in float32; the product
    with the scale is the one rounding.
    """
    codes = np.asarray(block.codes)
    n = codes.size
    per_coord = np.repeat(np.asarray(block.scale, np.float32), BLOCK_SIZE)[:n]
    c = codes.reshape(-1).astype(np.float32)
    with np.errstate(invalid="ignore"):
        return ((c * np.abs(c)) * per_coord).reshape(codes.shape)


def state_dtype_name(name: str, value: Any, allowed: tuple[str, ...]) -> str | None:
    """``value`` as one of ``allowed`` (or ``None``), or a ``ValueError`` naming the argument.

    Accepts the name (``"bfloat16"``), a NumPy/JAX dtype or a torch dtype
    (``torch.bfloat16``), without importing either framework.
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value
    else:
        text = str(value).removeprefix("torch.")
        try:
            text = np.dtype(value).name
        except TypeError:
            pass
    if text in allowed:
        return text
    raise ValueError(
        f"Invalid {name}: {value!r} (allowed: None (the parameter's dtype), "
        + ", ".join(repr(a) for a in allowed)
        + ")"
    )


def encode(
    x: np.ndarray, form: str | None, storage: Any, seed: int, step: int, stream: int
) -> np.ndarray | Block8:
    """``x`` (compute dtype) stored in ``form``; ``storage`` is the dtype ``None`` means.

    ``None`` and ``"float32"`` round to nearest; ``"bfloat16"`` and ``"block8"``
    round stochastically with :func:`random_bits` ``(seed, step, stream)``.
    """
    if form is None:
        return x.astype(storage)
    if form == "float32":
        return x.astype(np.float32)
    bits = random_bits(seed, step, stream, x.shape)
    x32 = x.astype(np.float32)
    if form == "bfloat16":
        return round_bfloat16(x32, bits)
    if form == BLOCK8:
        return encode_block8(x32, bits)
    raise ValueError(f"Invalid state form: {form!r} (allowed: None, {HESSIAN_DTYPES})")


def decode(stored: np.ndarray | Block8, compute: Any) -> np.ndarray:
    """A stored state array's values in the ``compute`` dtype."""
    if isinstance(stored, Block8):
        return decode_block8(stored).astype(compute)
    return np.asarray(stored).astype(compute)


def state_bytes(size: int, form: str | None, param_itemsize: int) -> int:
    """Bytes one state array of ``size`` coordinates takes in ``form``."""
    if form is None:
        return size * param_itemsize
    if form == BLOCK8:
        return size + 4 * block_count(size)
    return size * np.dtype(form if form != "bfloat16" else np.float16).itemsize

"""The narrow optimizer state in ``jax.numpy``: :mod:`sophia.narrow`, bit for bit.

:mod:`sophia.narrow` defines the forms (``None``, ``"float32"``,
``"bfloat16"``, ``"block8"``), the counter-based random bits and the two
stochastic roundings; this module is their JAX form, jit-compatible with static
shapes. The seed and the step may be traced (``optax.inject_hyperparams``, the
state's ``count``): the random bits are uint32 arithmetic, which wraps modulo
``2**32`` as the spec's masked products do. A block8 leaf is a
:class:`sophia.narrow.Block8` of JAX arrays, a pytree node (a NamedTuple).

Rounding is stochastic only where a narrow form is named; ``None`` and
``"float32"`` round to nearest, as a plain cast does.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sophia import narrow
from sophia.jax.real_pairs import is_complex, join_parts, part_dtype, real_parts
from sophia.narrow import BLOCK8, BLOCK_SIZE, CODE_MAX, Block8, block_count

__all__ = [
    "decode",
    "decode_block8",
    "encode",
    "encode_block8",
    "is_block8",
    "random_bits",
    "round_bfloat16",
    "state_parts",
    "store",
    "zeros",
]

_U32 = jnp.uint32


def mix32(x: jax.Array) -> jax.Array:
    """The spec's 32-bit mix (:func:`sophia.narrow.mix32`); uint32 products wrap as masked ones."""
    x = x ^ (x >> _U32(16))
    x = x * _U32(narrow.MIX_MUL1)
    x = x ^ (x >> _U32(15))
    x = x * _U32(narrow.MIX_MUL2)
    return x ^ (x >> _U32(16))


def _as_u32(value: Any) -> jax.Array:
    """A Python int (modulo ``2**32``) or an integer array (possibly traced) as uint32."""
    if isinstance(value, (int, np.integer)):
        return jnp.asarray(int(value) & narrow.MASK32, _U32)
    return jnp.asarray(value).astype(_U32)


def random_bits(seed: Any, step: Any, stream: int, shape: Any) -> jax.Array:
    """:func:`sophia.narrow.random_bits`: 32 random bits per C-order coordinate of ``shape``.

    Args:
      seed: the rounding seed, an int in ``[0, 2**32)`` or a (traced) integer scalar.
      step: the 0-based index of the step that writes the value (traced ``count`` too).
      stream: :data:`sophia.narrow.STREAM_MU` or :data:`sophia.narrow.STREAM_HESSIAN`.
      shape: the array's (static) shape.

    Returns:
      uint32 array of ``shape``.
    """
    if isinstance(step, (int, np.integer)):
        counter = _as_u32(4 * int(step) + stream)
    else:
        counter = _as_u32(step) * _U32(4) + _U32(stream)
    key = mix32(_as_u32(seed) ^ mix32(counter))
    n = 1
    for d in shape:
        n *= int(d)
    index = jax.lax.iota(_U32, n) * _U32(narrow.INDEX_SPREAD)
    return mix32(key ^ index).reshape(shape)


def round_bfloat16(x: jax.Array, bits: jax.Array) -> jax.Array:
    """:func:`sophia.narrow.round_bfloat16`: float32 ``x`` rounded stochastically to bfloat16.

    The spec adds in 64 bits and truncates; only NaN patterns can carry past 32
    bits, and those are replaced, so the wrapping uint32 sum keeps the same top
    16 bits everywhere else.
    """
    pattern = jax.lax.bitcast_convert_type(x.astype(jnp.float32), _U32)
    top = ((pattern + (bits >> _U32(16))) >> _U32(16)).astype(jnp.uint16)
    out = jax.lax.bitcast_convert_type(top, jnp.bfloat16)
    return jnp.where(jnp.isnan(x), x.astype(jnp.bfloat16), out)


def _blocks(flat: jax.Array, fill: Any) -> jax.Array:
    """A flat array padded with ``fill`` to whole blocks, shaped ``(blocks, BLOCK_SIZE)``."""
    nb = block_count(flat.size)
    padded = jnp.pad(flat, (0, nb * BLOCK_SIZE - flat.size), constant_values=fill)
    return padded.reshape(nb, BLOCK_SIZE)


def _per_element(per_block: jax.Array, like: jax.Array) -> jax.Array:
    """``per_block`` broadcast to ``like``'s shape in a form XLA cannot see as a broadcast.

    XLA rewrites ``a / broadcast(b)`` as ``a * broadcast(1 / b)``, which is not the
    correctly rounded quotient the spec takes. A select on a per-element
    predicate (here never true: a NaN in a usable block, whose scale would be
    NaN) is not a broadcast, so the division stays element by element, and unlike
    an optimization barrier it still fuses into one pass.
    """
    return jnp.where(jnp.isnan(like), jnp.float32(1), jnp.broadcast_to(per_block, like.shape))


def _unbroadcast(divisor: jax.Array) -> jax.Array:
    """A divisor XLA cannot see as a broadcast.

    XLA rewrites ``a / broadcast(b)`` (a scalar or a per-block value) as
    ``a * broadcast(1 / b)``, which is not the correctly rounded quotient the
    spec takes; behind the barrier it is a full array, divided element by element.
    """
    return jax.lax.optimization_barrier(divisor)


def encode_block8(x: jax.Array, bits: jax.Array) -> Block8:
    """:func:`sophia.narrow.encode_block8`: float32 ``x`` in the 8-bit square-root block form.

    The same float32 operations in the same order: ``scale = max|x| / 127**2``;
    per coordinate ``v = |x| / scale``, ``a = floor(sqrt(v))`` lowered by one
    where ``a * a > v``, ``p = (v - a * a) / (2a + 1)`` and the code
    ``sign(x) * min(a + (u < p), 127)``; zero codes for a block whose scale is
    zero or not finite. The padding of the last block holds zeros, as in the
    spec, so it changes no block's maximum. ``sqrt`` is XLA's, correctly
    rounded as NumPy's is (tested on values next to every perfect square).
    """
    x = x.astype(jnp.float32)
    n = x.size
    f32 = jnp.float32
    blocks = _blocks(x.reshape(-1), 0)
    # XLA:CPU's vectorized max can drop a NaN; the spec's block maximum is NaN then.
    has_nan = jnp.any(jnp.isnan(blocks), axis=1)
    max_abs = jnp.where(has_nan, f32(jnp.nan), jnp.max(jnp.abs(blocks), axis=1))
    scale = max_abs / _unbroadcast(jnp.full(max_abs.shape, CODE_MAX * CODE_MAX, f32))
    usable = jnp.isfinite(scale) & (scale > 0)
    divisor = _per_element(jnp.where(usable, scale, f32(1))[:, None], blocks)
    u = _blocks((bits.reshape(-1) >> _U32(8)).astype(f32) * f32(2.0**-24), 0)
    v = jnp.where(usable[:, None], jnp.abs(blocks) / divisor, f32(0))
    a = jnp.floor(jnp.sqrt(v))
    a = a - (a * a > v).astype(f32)
    # 2a + 1 is a full array already (no broadcast), so XLA divides element by element
    p = (v - a * a) / (f32(2) * a + f32(1))
    magnitude = jnp.minimum(a + (u < p).astype(f32), f32(CODE_MAX))
    y = jnp.where(blocks < 0, -magnitude, magnitude)
    codes = y.astype(jnp.int8).reshape(-1)[:n].reshape(x.shape)
    return Block8(codes, scale)


def decode_block8(block: Block8) -> jax.Array:
    """:func:`sophia.narrow.decode_block8`: the float32 values ``(c * |c|) * scale``.

    ``c * |c|`` is an integer of at most ``127**2``, exact in float32, so the
    product with the block's scale is the one rounding (a fused multiply-add
    cannot change it).
    """
    codes = block.codes
    c = _blocks(codes.reshape(-1).astype(jnp.float32), 0)
    values = (c * jnp.abs(c)) * block.scale.astype(jnp.float32)[:, None]
    return values.reshape(-1)[: codes.size].reshape(codes.shape)


def is_block8(x: Any) -> bool:
    """Whether a state leaf is in the block form (``is_leaf`` for trees holding such leaves)."""
    return isinstance(x, Block8)


def encode(
    x: jax.Array, form: str | None, storage: Any, seed: Any, step: Any, stream: int
) -> jax.Array | Block8:
    """:func:`sophia.narrow.encode`: real ``x`` (compute dtype) stored in ``form``.

    ``storage`` is the dtype ``None`` means; ``None`` and ``"float32"`` round to
    nearest, ``"bfloat16"`` and ``"block8"`` stochastically with
    :func:`random_bits` ``(seed, step, stream)``.
    """
    if form is None:
        return x.astype(storage)
    if form == "float32":
        return x.astype(jnp.float32)
    bits = random_bits(seed, step, stream, x.shape)
    if form == "bfloat16":
        return round_bfloat16(x.astype(jnp.float32), bits)
    if form == BLOCK8:
        return encode_block8(x.astype(jnp.float32), bits)
    raise ValueError(f"Invalid state form: {form!r} (allowed: None, {narrow.HESSIAN_DTYPES})")


def decode(stored: jax.Array | Block8, compute: Any) -> jax.Array:
    """:func:`sophia.narrow.decode`: a stored state leaf's values in the ``compute`` dtype."""
    if isinstance(stored, Block8):
        return decode_block8(stored).astype(compute)
    return stored.astype(compute)


def _array_dtype(form: str | None, like: Any) -> jnp.dtype:
    """The dtype of an array form for a leaf of dtype ``like`` (complex stays complex)."""
    if form is None:
        return jnp.dtype(like)
    if form == "float32" and is_complex(like):
        return jnp.dtype(jnp.complex64)
    return jnp.dtype(form)


def zeros(form: str | None, param: Any) -> jax.Array | Block8:
    """A zero state leaf in ``form`` for ``param`` (its dtype where ``form`` is ``None``).

    ``zeros_like`` keeps a sharded parameter's sharding for the codes and arrays.
    """
    param = jnp.asarray(param)
    if form == BLOCK8:
        scale = jnp.zeros([block_count(param.size)], jnp.float32)
        return Block8(jnp.zeros_like(param, dtype=jnp.int8), scale)
    return jnp.zeros_like(param, dtype=_array_dtype(form, param.dtype))


def state_parts(stored: jax.Array | Block8) -> tuple[Any, ...]:
    """The real parts of a stored leaf (a block-form leaf is real: itself)."""
    return (stored,) if isinstance(stored, Block8) else real_parts(stored)


def store(
    parts: list[jax.Array], form: str | None, like: Any, seed: Any, step: Any, stream: int
) -> jax.Array | Block8:
    """The stored leaf of the real ``parts`` (compute dtype) of a leaf, in ``form``.

    Args:
      parts: one part, or the real and imaginary parts of a complex leaf.
      form: the state form; a stochastic one takes a real leaf only (checked at init).
      like: the dtype ``None`` means (the stored leaf's own).
      seed, step, stream: the random bits' inputs (:func:`random_bits`).

    Returns:
      The leaf: an array, or a :class:`sophia.narrow.Block8`.
    """
    if form in (None, "float32"):
        return join_parts(parts, _array_dtype(form, like))
    (x,) = parts
    return encode(x, form, part_dtype(like), seed, step, stream)

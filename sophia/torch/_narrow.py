r"""The narrow state's rounding in torch: :mod:`sophia.narrow` to the bit, eager and compiled.

:mod:`sophia.narrow` defines the forms (``None``, ``"float32"``, ``"bfloat16"``,
``"block8"``), the counter-based random bits and the two stochastic roundings
with NumPy; these are the same functions on tensors. Torch has no general
unsigned 32-bit arithmetic, so the bits are computed in int64 holding values
in ``[0, 2**32)``, masked after every multiply (the spec's multipliers are
below ``2**31``, so every product fits). Every function is a plain tensor
expression, so :func:`torch.compile` (inductor) traces it as it runs eagerly.

Two additions to the spec's signatures serve the bodies that work on flat
slices of a tensor: :func:`random_bits` takes the C-order ``offset`` of the
slice's first coordinate, and :func:`decode_block8` takes the scales of the
blocks a slice covers (a slice starting on a block boundary).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sophia import narrow
from sophia.narrow import BLOCK8, BLOCK_SIZE, CODE_MAX, INDEX_SPREAD, MASK32, MIX_MUL1, MIX_MUL2

__all__ = [
    "Stored",
    "decode",
    "decode_block8",
    "encode",
    "encode_block8",
    "random_bits",
    "round_bfloat16",
    "storage_dtype",
    "stream_key",
]

#: A stored state array: a tensor, or the 8-bit form's ``(codes, scale)``.
Stored = Tensor | tuple[Tensor, Tensor]
#: The stochastic forms, which draw random bits.
STOCHASTIC = ("bfloat16", BLOCK8)
_TORCH_FORMS = {"float32": torch.float32, "bfloat16": torch.bfloat16, BLOCK8: torch.int8}


def storage_dtype(form: str | None, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a state tensor stored in ``form`` for a parameter of ``param_dtype``.

    ``None`` is the parameter's dtype; ``"float32"`` of a complex parameter is
    complex64 (its real pairs in float32); ``"block8"`` is the int8 codes.
    """
    if form is None:
        return param_dtype
    if form == "float32" and param_dtype.is_complex:
        return torch.complex64
    return _TORCH_FORMS[form]


def mix32(x: Tensor | int) -> Any:
    """The spec's ``mix32`` on int64 tensors (or Python ints) holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * MIX_MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX_MUL2) & MASK32
    return x ^ (x >> 16)


def stream_key(seed: int, step: int | Tensor, stream: int) -> int | Tensor:
    """``mix(seed ^ mix(4 * step + stream))``: what every coordinate's bits of one stream mix in.

    ``step`` is the 0-based index of the step taken, a Python int or a 0-dim
    tensor (a step counter, float or integer, holding an integer). A counter on
    the CPU is read on the host (no synchronisation); one on an accelerator,
    or any tensor under ``torch.compile``, stays a tensor: the key is then an
    int64 0-dim tensor on its device, with no host synchronisation.
    """
    if isinstance(step, Tensor):
        if step.device.type == "cpu" and not torch.compiler.is_compiling():
            step = int(step.item())
        else:
            counter = (step.detach().to(torch.int64) * 4 + stream) & MASK32
            return mix32((int(seed) & MASK32) ^ mix32(counter))
    return mix32((int(seed) & MASK32) ^ mix32((4 * int(step) + stream) & MASK32))


def bits_at(key: int | Tensor, index: Tensor) -> Tensor:
    """The bits of the coordinates ``index`` (int64) of the stream ``key`` (or one key each)."""
    return mix32(key ^ (((index & MASK32) * INDEX_SPREAD) & MASK32))


def bits_of_key(key: int | Tensor, n: int, device: torch.device, offset: int = 0) -> Tensor:
    """The bits of coordinates ``offset ... offset + n - 1`` of the stream ``key`` (flat, int64)."""
    index = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    if isinstance(key, Tensor):
        key = key.to(device)
    return bits_at(key, index)


def random_bits(
    seed: int,
    step: int | Tensor,
    stream: int,
    shape: Any,
    device: torch.device | str | None = None,
    offset: int = 0,
) -> Tensor:
    """:func:`sophia.narrow.random_bits` as an int64 tensor of ``shape`` holding uint32 values.

    Args:
      seed: the optimizer's seed.
      step: the 0-based index of the step taken (an int or a 0-dim tensor).
      stream: :data:`sophia.narrow.STREAM_MU` or :data:`sophia.narrow.STREAM_HESSIAN`.
      shape: the array's shape.
      device: where the bits are made (default: the CPU).
      offset: the C-order index of the first coordinate, for a flat slice of a
        larger array (its bits are those coordinates' bits of the whole).

    Returns:
      int64 tensor of ``shape``, each value in ``[0, 2**32)``.
    """
    shape = torch.Size(shape) if not isinstance(shape, int) else torch.Size((shape,))
    device = torch.device("cpu") if device is None else torch.device(device)
    n = shape.numel()
    return bits_of_key(stream_key(seed, step, stream), n, device, offset).view(shape)


def round_bfloat16(x: Tensor, bits: Tensor) -> Tensor:
    """:func:`sophia.narrow.round_bfloat16`: float32 ``x`` rounded stochastically to bfloat16.

    The float32 bit pattern plus ``bits >> 16``, truncated to its top 16 bits;
    NaN rounds to nearest (a bfloat16 NaN).
    """
    x = x.to(torch.float32)
    pattern = x.view(torch.int32).to(torch.int64) & MASK32
    rounded = (((pattern + (bits >> 16)) >> 16) << 16) & MASK32
    # back to the int32 of that bit pattern (two's complement), exactly
    signed = rounded - ((rounded >> 31) << 32)
    out = signed.to(torch.int32).view(torch.float32).to(torch.bfloat16)
    return torch.where(torch.isnan(x), x.to(torch.bfloat16), out)


def _blocks(flat: Tensor) -> Tensor:
    """A flat tensor zero-padded to whole blocks, as ``[blocks, BLOCK_SIZE]``."""
    n = flat.numel()
    pad = narrow.block_count(n) * BLOCK_SIZE - n
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, BLOCK_SIZE)


def encode_block8(x: Tensor, bits: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`sophia.narrow.encode_block8`: float32 ``x`` as int8 square-root codes and scales.

    Per block ``scale = max|x| / 127**2``; in a block with a finite nonzero
    scale each coordinate has ``v = |x| / scale``, ``a = floor(sqrt(v))``
    lowered by one where ``a * a > v``, ``p = (v - a * a) / (2a + 1)`` and the
    code ``sign(x) * min(a + (u < p), 127)`` (``u = (bits >> 8) * 2**-24``);
    any other block codes zeros. Every operation is float32, rounded once, in
    the spec's order (inductor on the CPU keeps a division a division, and its
    ``sqrt`` is the correctly rounded one: tested against the spec compiled).

    Returns:
      ``(codes, scale)``: int8 of ``x``'s shape, float32 of
      :func:`sophia.narrow.block_count` ``(x.numel())`` scales.
    """
    shape = x.shape
    blocks = _blocks(x.reshape(-1).to(torch.float32))
    scale = torch.amax(torch.abs(blocks), dim=1) / (CODE_MAX * CODE_MAX)
    usable = torch.isfinite(scale) & (scale > 0)
    divisor = torch.where(usable, scale, 1.0).unsqueeze(1)
    u = (_blocks(bits.reshape(-1)) >> 8).to(torch.float32) * 2.0**-24
    v = torch.where(usable.unsqueeze(1), torch.abs(blocks) / divisor, 0.0)
    a = torch.floor(torch.sqrt(v))
    a = a - (a * a > v).to(torch.float32)
    p = (v - a * a) / (2.0 * a + 1.0)
    magnitude = torch.clamp_max(a + (u < p).to(torch.float32), CODE_MAX)
    y = torch.where(blocks < 0, -magnitude, magnitude)
    codes = y.reshape(-1)[: shape.numel()].to(torch.int8).view(shape)
    return codes, scale


def decode_block8(codes: Tensor, scale: Tensor) -> Tensor:
    """:func:`sophia.narrow.decode_block8`: ``(c * |c|) * scale`` per coordinate, float32.

    ``c * |c|`` is an integer of at most ``127**2``, exact in float32, so the
    product with the scale is the one rounding. ``scale`` holds the scales of
    the blocks ``codes`` covers: all of them for a whole tensor, or those of a
    flat slice that starts on a block boundary.
    """
    c = _blocks(codes.reshape(-1)).to(torch.float32)
    blocks = (c * torch.abs(c)) * scale.to(torch.float32).unsqueeze(1)
    return blocks.reshape(-1)[: codes.numel()].view(codes.shape)


def encode(
    x: Tensor,
    form: str | None,
    storage: torch.dtype,
    seed: int,
    step: int | Tensor,
    stream: int,
    offset: int = 0,
) -> Stored:
    """:func:`sophia.narrow.encode`: ``x`` (compute dtype) stored in ``form``.

    Args:
      x: the values, in the compute dtype (real: complex tensors as real views).
      form: ``None``, ``"float32"``, ``"bfloat16"`` or ``"block8"``.
      storage: the dtype ``None`` means (the parameter's).
      seed, step, stream: the random bits' inputs (see :func:`random_bits`).
      offset: the C-order index of ``x``'s first coordinate in its array, for
        a flat slice (a block boundary for ``"block8"``).

    Returns:
      A tensor, or ``(codes, scale)`` for ``"block8"``.
    """
    if form is None:
        return x.to(storage)
    if form == "float32":
        return x.to(torch.float32)
    key = stream_key(seed, step, stream)
    bits = bits_of_key(key, x.numel(), x.device, offset).view(x.shape)
    if form == "bfloat16":
        return round_bfloat16(x.to(torch.float32), bits)
    if form == BLOCK8:
        return encode_block8(x.to(torch.float32), bits)
    raise ValueError(f"Invalid state form: {form!r} (allowed: None, {narrow.HESSIAN_DTYPES})")


def decode(stored: Stored, compute: torch.dtype) -> Tensor:
    """:func:`sophia.narrow.decode`: a stored state's values in the ``compute`` dtype."""
    if isinstance(stored, tuple):
        return decode_block8(*stored).to(compute)
    return stored.to(compute)

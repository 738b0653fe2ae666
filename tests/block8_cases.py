"""Inputs that probe the square-root codes of ``sophia.narrow.encode_block8`` at their edges.

The code of a coordinate hangs on ``v = |x| / scale`` against the perfect
squares ``a * a`` (a wrong ``sqrt``, or a division taken as a multiply by a
reciprocal, moves ``v`` or ``a`` across one) and on ``u < p`` (the odds of
rounding up). These blocks place ``v`` exactly on, and one float32 ulp either
side of, every ``k * k`` for ``k`` in ``0 ... 127``, exactly on ``16129`` (the
block's largest magnitude), just above it (a scale rounded down), and below 1
(codes 0 or 1, subnormal ``v`` included where asked), in blocks whose scale a
reciprocal would get wrong too; the bit patterns put ``u`` at 0, at its
largest value, and on the float32 grid next to ``p``. The expected codes
always come from the spec; only the inputs are chosen here. NumPy only, for
the JAX and the torch tests alike.
"""

from __future__ import annotations

import numpy as np

from sophia import narrow

F32 = np.float32
_LEVELS = narrow.CODE_MAX * narrow.CODE_MAX  # 16129


def _targets(subnormal: bool) -> np.ndarray:
    """Values of ``v``: every square, one ulp either side of it, and small ones (codes 0/1)."""
    squares = np.arange(narrow.CODE_MAX + 1, dtype=F32) ** 2
    up = np.nextafter(squares[1:-1], F32(np.inf))  # none above the largest, 127**2
    down = np.nextafter(squares[1:], F32(0))
    small = [2.0**-24, 3 * 2.0**-25, 2.0**-30, 0.5, np.nextafter(F32(1), F32(0)), 1e-7]
    if subnormal:
        small += [1e-45, 2.0**-140]
    return np.concatenate([squares, up, down, F32(small)]).astype(F32)


def _block_with(scale: np.float32, largest: np.float32, targets: np.ndarray, sign: float):
    """Whole blocks, each led by ``largest``, the others with ``|x| / scale == target``.

    A target no float32 ``x`` reaches through that division is left out (only
    possible for a scale that is not a power of two).
    """
    xs = []
    with np.errstate(under="ignore"):
        for v in targets:
            x0 = F32(v * scale)
            for x in (x0, *np.nextafter(x0, F32([0, np.inf])), x0 - F32(2) * np.spacing(x0)):
                if F32(x) / scale == v and x >= 0:
                    xs.append(F32(sign) * F32(x))
                    break
    per_block = narrow.BLOCK_SIZE - 1
    out = np.zeros(narrow.block_count(len(xs) + 1) * narrow.BLOCK_SIZE, F32)  # zeros pad
    for b, i in enumerate(range(0, len(xs), per_block)):
        piece = [F32(sign) * largest, *xs[i : i + per_block]]
        out[b * narrow.BLOCK_SIZE : b * narrow.BLOCK_SIZE + len(piece)] = piece
    return out


def square_root_edges(subnormal: bool = True) -> np.ndarray:
    """Float32 values in blocks of 256, each block's first coordinate its largest magnitude.

    Args:
      subnormal: include targets ``v`` that are float32 subnormals (XLA:CPU
        flushes those to zero, a documented exception to bit equality).

    Returns:
      A flat float32 array: positive and negative blocks of scale ``2**-10``
      and ``16`` (``v`` exact, the largest exactly ``16129``), of a scale
      whose largest ``v`` lands one ulp above ``16129``, and of one that a
      multiply by the reciprocal of ``16129`` would get wrong.
    """
    targets = _targets(subnormal)
    exact = F32(_LEVELS * 2.0**-10)  # scale 2**-10: every target reachable
    parts = [_block_with(F32(2.0**-10), exact, targets, s) for s in (1.0, -1.0)]
    # scale 16: subnormal v come from subnormal x, divided exactly
    parts.append(_block_with(F32(16), F32(_LEVELS * 16), targets, -1.0))
    for which in ("above", "reciprocal"):
        largest = _largest(which)
        parts.append(_block_with(largest / F32(_LEVELS), largest, targets, 1.0))
    return np.concatenate(parts)


def _largest(which: str) -> np.float32:
    """The first float32 above 1 whose block scale is a case of its own.

    ``"above"``: the largest ``v``, ``x / (x / 16129)``, rounds above ``16129``;
    ``"reciprocal"``: ``x / 16129`` differs from ``x * (1 / 16129)`` in float32.
    """
    levels = F32(_LEVELS)
    x = (np.arange(1, 2**20, dtype=np.uint32) + F32(1).view(np.uint32)).view(F32)
    if which == "above":
        hit = x / (x / levels) > levels
    else:
        hit = x / levels != x * (F32(1) / levels)
    return x[np.argmax(hit)]


def edge_bits(x: np.ndarray) -> list[np.ndarray]:
    """uint32 bits for ``x``: random ones, ``u = 0``, ``u`` largest, ``u`` next to ``p``.

    The last puts ``u`` on the float32 grid point nearest to each coordinate's
    rounding-up odds ``p`` (the spec's formula, used only to choose the bits),
    so ``u < p`` is decided by the last bit of ``p``.
    """
    x = np.asarray(x, F32).reshape(-1)
    nb = narrow.block_count(x.size)
    blocks = np.zeros(nb * narrow.BLOCK_SIZE, F32)
    blocks[: x.size] = x
    scale = np.abs(blocks.reshape(nb, -1)).max(axis=1) / F32(_LEVELS)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        v = np.abs(x) / np.repeat(scale, narrow.BLOCK_SIZE)[: x.size]
        a = np.floor(np.sqrt(v))
        a = a - (a * a > v)
        p = np.nan_to_num((v - a * a) / (F32(2) * a + F32(1)))
    near_p = np.minimum(np.round(p.astype(np.float64) * 2.0**24), 2**24 - 1).astype(np.uint32)
    return [
        narrow.random_bits(3, 1, narrow.STREAM_HESSIAN, x.shape),
        np.zeros(x.shape, np.uint32),
        np.full(x.shape, narrow.MASK32, np.uint32),
        near_p << np.uint32(8),
    ]

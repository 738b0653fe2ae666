"""The win count: how many coordinates a step left unclipped (``r < 1``), exactly and on device."""

from __future__ import annotations

import torch
from torch import Tensor

#: A sum of 0.0/1.0 values in float32 is exact while it stays below ``2**24``.
_EXACT_FLOAT_COUNT = 1 << 24


def count_wins(r: Tensor, one: Tensor | None = None, scratch: Tensor | None = None) -> Tensor:
    """How many entries of ``r`` are ``< 1`` (NaN is not), as a 0-dim tensor.

    With ``one`` (a 0-dim tensor of ``r``'s dtype and device) and a floating
    ``scratch`` of ``r``'s shape that is free to overwrite (it may be ``r``),
    the comparison is written into ``scratch`` as 0.0/1.0 and summed: on CPU
    much cheaper than summing a bool tensor, and exact, since every partial
    sum is an integer below ``2**24``. The result is then a float tensor
    holding an integer (see :func:`total_wins`).
    """
    if scratch is not None and one is not None and r.numel() < _EXACT_FLOAT_COUNT:
        return torch.lt(r, one, out=scratch).sum()
    return (r < 1).sum()


def total_wins(counts: list[Tensor], device: torch.device) -> Tensor:
    """The sum of 0-dim counts (ints or integer-valued floats), an int64 tensor on ``device``."""
    total = torch.zeros((), dtype=torch.int64, device=device)
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for c in counts:
        groups.setdefault((c.device, c.dtype), []).append(c)
    for cs in groups.values():
        # each float count is an exact integer; converting before summing keeps it exact
        part = torch.stack(cs).to(torch.int64).sum()
        total = total + (part if part.device == device else part.to(device))
    return total

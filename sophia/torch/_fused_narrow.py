"""The fused step's narrow-state expression and what it needs per tensor: forms, keys, coordinates.

:func:`fused_update_narrow` is :func:`sophia.torch._fused.fused_update` over the
narrow state of :mod:`sophia.narrow`: ``m`` stored in float32 or bfloat16
(rounded stochastically), ``h`` read from float32, bfloat16 or the 8-bit
square-root block form. It rounds and decodes inside the pass, element by element, so a
compiled kernel makes no full-size copy of ``m`` or ``h``. The random bits are
those of :mod:`sophia.torch._narrow` (int64 holding uint32 values), indexed by
each element's coordinate in its parameter.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from sophia import narrow
from sophia.torch import _narrow
from sophia.torch._blocks import DeviceGroup
from sophia.torch._scalars import compute_dtype

__all__ = ["NarrowForm", "fused_update_narrow", "mu_keys", "narrow_form", "packed_coordinates"]


class NarrowForm(NamedTuple):
    """How a group's state differs from the parameters' dtype, for the fused body."""

    #: ``mu_dtype="bfloat16"``: ``m`` is rounded stochastically to bfloat16.
    stochastic_mu: bool
    #: ``hessian_dtype="block8"``: ``h`` is int8 codes with float32 block scales.
    block8: bool
    seed: int
    #: The block scales, one tensor per tensor of the group (``block8`` only).
    hessian_scales: list[Tensor] | None


def narrow_form(
    group: DeviceGroup,
    hessian_scales: list[Tensor] | None,
    mu_dtype: str | None,
    hessian_dtype: str | None,
    seed: int,
) -> NarrowForm | None:
    """The group's :class:`NarrowForm`, or ``None`` where its state is the default's.

    A group whose ``m`` and ``h`` have the parameters' dtype and whose forms
    round to nearest (``None``, or ``"float32"`` of float32 parameters) runs
    the default kernels, which then give the same bits.
    """
    stochastic_mu = mu_dtype == "bfloat16"
    block8 = hessian_dtype == narrow.BLOCK8
    if not (stochastic_mu or block8) and group.params:
        dtype = group.params[0].dtype
        if group.exp_avgs[0].dtype == dtype and group.hessians[0].dtype == dtype:
            return None
    if block8 and (hessian_scales is None or len(hessian_scales) != len(group.params)):
        got = "None" if hessian_scales is None else f"{len(hessian_scales)} tensors"
        raise ValueError(
            f"Invalid hessian_scales: {got} (allowed: one float32 tensor of block scales per "
            f"parameter, {len(group.params)} here, with hessian_dtype='block8')"
        )
    return NarrowForm(stochastic_mu, block8, int(seed), hessian_scales if block8 else None)


def fused_update_narrow(
    param: Tensor,
    grad: Tensor,
    m: Tensor,
    h: Tensor,
    h_scale: Tensor,
    key: Tensor,
    first: Tensor,
    b1: Tensor,
    signed_one_minus_b1: Tensor,
    rho_bs: Tensor,
    eps: Tensor,
    weight_decay: Tensor,
    lr: Tensor,
    count_dtype: torch.dtype = torch.int64,
    stochastic_mu: bool = False,
    block8: bool = False,
) -> Tensor:
    """One tensor's step over narrow state as a pure expression, for ``torch.compile`` to fuse.

    The arithmetic is :func:`sophia.torch._fused.fused_update`'s; ``m`` and
    ``h`` may have any dtype. ``m`` is read exactly and written with ``copy_``
    (round to nearest), or with ``stochastic_mu`` (``m`` bfloat16) rounded as
    :func:`sophia.narrow.round_bfloat16` does with the bits of
    :func:`sophia.narrow.random_bits` of the momentum stream's ``key``; the
    update reads the unrounded momentum, as the spec does. With ``block8``,
    ``h`` holds int8 codes and ``h_scale`` the float32 scales of the whole
    parameter, each coordinate's value ``(c * |c|) * scale``. The coordinate
    of element ``i`` (flat C order) is ``first + i``: ``first`` is a flat
    slice's offset (0-dim), or, for tensors packed into one buffer, per
    element its coordinate minus its position in the buffer (``key`` then per
    element too).

    Returns:
      The number of coordinates with ``r < 1``, in ``count_dtype``.
    """
    compute = compute_dtype(param.dtype)
    t = param.to(compute)
    mc = m.to(compute) * b1 + grad.to(compute) * signed_one_minus_b1
    if stochastic_mu or block8:
        index = first + torch.arange(param.numel(), device=param.device).view(param.shape)
    if block8:
        # square-root codes: (c * |c|) is exact in float32, the product with the block's scale
        # the one rounding; decoded in float32 and only then widened, as sophia.narrow.decode does
        c = h.to(torch.float32)
        hv = ((c * torch.abs(c)) * h_scale[index >> 8]).to(compute)
    else:
        hv = h.to(compute)
    den = torch.clamp_min(hv, 0) * rho_bs + eps
    q = (mc + 0.0) / den
    u = torch.where(q > 1, 1.0, torch.where(q < -1, -1.0, q)) + t * weight_decay
    param.copy_(t - u * lr)
    if stochastic_mu:
        spread = ((index & narrow.MASK32) * narrow.INDEX_SPREAD) & narrow.MASK32
        bits = _narrow.mix32(key ^ spread)
        m.copy_(_narrow.round_bfloat16(mc.to(torch.float32), bits))
    else:
        m.copy_(mc)
    # r = min(|m| / den, 1) < 1 exactly where |m / den| < 1
    return (torch.abs(q) < 1).sum(dtype=count_dtype)


def mu_keys(steps: list[Tensor], seed: int, device: torch.device) -> Tensor:
    """The momentum stream's key of each step counter, as an int64 tensor on ``device``.

    Counters on the CPU are read on the host; others (and any under
    ``torch.compile``) stay on their device, so no host synchronisation happens.
    """
    keys = [_narrow.stream_key(seed, s, narrow.STREAM_MU) for s in steps]
    if all(isinstance(k, int) for k in keys):
        return torch.tensor(keys, dtype=torch.int64, device=device)
    return torch.stack([torch.as_tensor(k, dtype=torch.int64).to(device).reshape(()) for k in keys])


def packed_coordinates(keys: Tensor, sizes: list[int]) -> tuple[Tensor, Tensor]:
    """Per element of tensors of ``sizes`` packed back to back: its tensor's key, and ``first``.

    ``first`` is the element's coordinate in its tensor minus its position in
    the buffer (see :func:`fused_update_narrow`), i.e. minus its tensor's start.
    """
    device = keys.device
    total = sum(sizes)
    counts = torch.tensor(sizes, dtype=torch.int64, device=device)
    starts = [0]
    for size in sizes[:-1]:
        starts.append(starts[-1] + size)
    neg_starts = torch.tensor([-s for s in starts], dtype=torch.int64, device=device)
    key = torch.repeat_interleave(keys, counts, output_size=total)
    first = torch.repeat_interleave(neg_starts, counts, output_size=total)
    return key, first

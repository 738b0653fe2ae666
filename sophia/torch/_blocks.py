"""How the bodies partition their tensors: by (device, dtype), and on CPU into blocks.

The foreach and fused bodies take the tensors of one (device, dtype) at a
time (:func:`device_groups`). On CPU the for-loop and foreach bodies run their
many elementwise kernels block by block (small tensors batched together, large
ones cut into flat slices), so that every kernel after a block's first touch
reads it from cache and main memory streams ``theta, g, m, h`` about once, as
the fused kernel does. On other devices they run on whole tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from sophia.torch._scalars import StepCoefficients, real_view

#: Elements per block and intra-op thread: the four operands and two scratch buffers of a
#: float32 block (512 KiB each) fit in a core's share of the last-level cache. Smaller
#: blocks pay each kernel's dispatch more often; larger ones fall out of the cache.
_CPU_BLOCK = 1 << 17
#: At most this many intra-op threads share a block.
_MAX_BLOCK_THREADS = 8


class DeviceGroup(NamedTuple):
    """The tensors of one (device, parameter dtype), complex ones viewed as real pairs."""

    device: torch.device
    #: The parameters' dtype (complex for complex parameters, whose views are real).
    dtype: torch.dtype
    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    hessians: list[Tensor]
    state_steps: list[Tensor]
    #: With ``hessian_dtype="block8"``: each Hessian's float32 block scales (``hessians``
    #: then holds the int8 codes); else ``None``.
    hessian_scales: list[Tensor] | None = None


def device_groups(
    lists: list[list[Tensor]],
    has_complex: bool,
    narrow: bool = False,
    hessian_scales: list[Tensor] | None = None,
) -> list[DeviceGroup]:
    """The five parallel lists of a step, grouped by the parameters' (device, dtype).

    ``narrow``: the states may have other dtypes than their parameters (a
    narrow form), which torch's grouping refuses; the parameters, gradients
    and steps are grouped then, and the states (and ``hessian_scales``, one
    per parameter) picked by index.
    """
    params, grads, exp_avgs, hessians, steps = lists
    if not narrow:
        grouped = Optimizer._group_tensors_by_device_and_dtype(lists)  # type: ignore[arg-type]
        out = []
        for (device, dtype), ((*tensors, steps), _) in grouped.items():
            if has_complex:
                tensors = [[real_view(x) for x in xs] for xs in tensors]
            out.append(DeviceGroup(device, dtype, *(list(xs) for xs in tensors), list(steps)))
        return out
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, steps],  # type: ignore[list-item]
        with_indices=True,
    )
    out = []
    for (device, dtype), (_, idx) in grouped.items():
        tensors = [[real_view(xs[i]) for i in idx] for xs in (params, grads, exp_avgs, hessians)]
        scales = None if hessian_scales is None else [hessian_scales[i] for i in idx]
        out.append(DeviceGroup(device, dtype, *tensors, [steps[i] for i in idx], scales))
    return out


def cpu_block() -> int:
    """``_CPU_BLOCK`` elements per intra-op thread (up to ``_MAX_BLOCK_THREADS``).

    Each kernel on a block is split between the threads, so each thread's
    share stays cache-sized. With more runnable threads than cores, the
    barriers between the threads of every kernel can each wait for a
    descheduled thread; there ``torch.set_num_threads(1)`` is the remedy, as
    for any many-kernel loop.
    """
    return _CPU_BLOCK * max(1, min(torch.get_num_threads(), _MAX_BLOCK_THREADS))


def flat_slices(tensors: tuple[Tensor, ...], size: int | None) -> list[tuple[Tensor, ...]]:
    """``tensors`` (one shape) whole, or cut into matching flat slices of at most ``size`` elements.

    Only contiguous tensors are cut; the others stay whole.
    """
    n = tensors[0].numel()
    if size is None or n <= size or not all(x.is_contiguous() for x in tensors):
        return [tensors]
    return list(zip(*(x.view(-1).split(size) for x in tensors)))


def batches(lists: list[list[Tensor]], block: int | None) -> list[list[list[Tensor]]]:
    """Parallel tensor lists regrouped into batches of about ``block`` elements.

    Contiguous tensors longer than ``block`` are cut into flat slices (see
    :func:`flat_slices`), small ones share a batch, zero-size ones are
    dropped. Without ``block``, the lists are one batch.
    """
    return [batch for batch, _ in batches_with_origins(lists, block)]


#: Where a piece of a batch comes from: the index of its tensor in the lists, and the
#: C-order index of the piece's first coordinate in that tensor.
Origin = tuple[int, int]


def batches_with_origins(
    lists: list[list[Tensor]], block: int | None
) -> list[tuple[list[list[Tensor]], list[Origin]]]:
    """:func:`batches`, each batch with the origin of each of its pieces.

    The narrow state needs them: a piece's random bits and block scales are
    those of its coordinates in the whole tensor. Slices start at multiples of
    ``block``, a multiple of :data:`sophia.narrow.BLOCK_SIZE`.
    """
    if block is None:
        return [(lists, [(i, 0) for i in range(len(lists[0]))])]
    out: list[tuple[list[list[Tensor]], list[Origin]]] = []
    cur: list[list[Tensor]] = [[] for _ in lists]
    origins: list[Origin] = []
    size = 0
    for i, xs in enumerate(zip(*lists)):
        if xs[0].numel() == 0:
            continue
        offset = 0
        for piece in flat_slices(xs, block):
            k = piece[0].numel()
            if size and size + k > block:
                out.append((cur, origins))
                cur, origins, size = [[] for _ in lists], [], 0
            for lst, x in zip(cur, piece):
                lst.append(x)
            origins.append((i, offset))
            offset += k
            size += k
    if size:
        out.append((cur, origins))
    return out


class BatchScratch(NamedTuple):
    """A batch's scratch: per tensor a temporary and a quotient view, and the spans they tile."""

    tmp: list[Tensor]
    quotient: list[Tensor]
    #: The flat span of the scratch buffer that ``tmp`` tiles back to back.
    tmp_span: Tensor
    #: The flat span of the quotient buffer that ``quotient`` tiles back to back.
    quotient_span: Tensor


class Workspace:
    """What a body needs per (compute dtype, device) in one step, made once per step.

    The step's coefficients, the constants 0 and 1 as 0-dim tensors and, on
    CPU, two buffers of one block (a temporary and the quotient ``m / den``)
    whose views are cached by shape: every full block and every tensor of a
    repeated shape reuses them, since making a view costs as much as a small
    kernel.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device, coeffs: StepCoefficients) -> None:
        self.dtype, self.device, self.coeffs = dtype, device, coeffs
        self.zero = torch.zeros((), dtype=dtype, device=device)
        self.one = torch.ones((), dtype=dtype, device=device)
        self.block = cpu_block() if device.type == "cpu" else None
        self._bufs: tuple[Tensor, Tensor] | None = None
        self._views: dict[torch.Size, tuple[Tensor, Tensor]] = {}
        self._batch_views: dict[tuple[torch.Size, ...], BatchScratch] = {}

    def scratch(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """A temporary and a quotient buffer of ``x``'s shape in the compute dtype."""
        if self.block is None or x.numel() > self.block or not x.is_contiguous():
            return torch.empty_like(x, dtype=self.dtype), torch.empty_like(x, dtype=self.dtype)
        views = self._views.get(x.shape)
        if views is None:
            n = x.numel()
            tmp, quotient = self._buffers()
            views = self._views[x.shape] = (tmp[:n].view(x.shape), quotient[:n].view(x.shape))
        return views

    def batch_scratch(self, xs: list[Tensor]) -> BatchScratch | None:
        """Views of the two buffers for ``xs``, back to back; ``None`` past ``block`` elements."""
        key = tuple(x.shape for x in xs)
        views = self._batch_views.get(key)
        if views is None:
            n = sum(x.numel() for x in xs)
            if self.block is None or n > self.block:
                return None
            tmp_span, quotient_span = (buf[:n] for buf in self._buffers())
            sizes = [x.numel() for x in xs]
            tmp, quotient = (
                [v.view(x.shape) for x, v in zip(xs, span.split(sizes))]
                for span in (tmp_span, quotient_span)
            )
            views = self._batch_views[key] = BatchScratch(tmp, quotient, tmp_span, quotient_span)
        return views

    def _buffers(self) -> tuple[Tensor, Tensor]:
        if self._bufs is None:
            assert self.block is not None
            tmp = torch.empty(self.block, dtype=self.dtype, device=self.device)
            quotient = torch.empty(self.block, dtype=self.dtype, device=self.device)
            self._bufs = (tmp, quotient)
        return self._bufs

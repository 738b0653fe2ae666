r"""Functional SophiaG for PyTorch: for-loop, foreach and fused implementations.

:func:`sophia_g` (alias :func:`sophiag`) is the functional form of
:class:`sophia.torch.SophiaG`, split the way ``torch.optim.adamw`` is: one
dispatcher and three bodies,

* ``_single_tensor_sophia_g``: a Python loop over the tensors, 16 eager
  kernels each into two reused buffers,
* ``_multi_tensor_sophia_g``: ``torch._foreach_*`` kernels per (device, dtype),
* ``_fused_sophia_g``: one pass that reads ``param, grad, exp_avg, hessian``
  and writes ``param, exp_avg``. On CPU that is a native C++ kernel over all
  tensors of a (device, dtype) group at once (see :mod:`sophia.torch._native`);
  elsewhere, and on CPU where the native kernel cannot be built, one
  ``torch.compile``-d kernel per tensor, compiled once (dynamic shapes) per
  dtype and cached (tensors below ``_PACK_BELOW`` elements share one call on
  packed copies). Non-contiguous tensors always take the compiled kernel.

On CPU the for-loop and foreach bodies run block by block (``_CPU_BLOCK``
elements, small tensors batched together; see :func:`_cpu_block`), so that their
many elementwise kernels re-read each block from cache and main memory is
streamed about once, as by the fused kernel; on other devices they run on
whole tensors. Inside an outer ``torch.compile`` every body traces the fused
body's expression.

All three follow the arithmetic contract of :mod:`sophia.spec` to the bit:
the math runs in the compute dtype (float32 for float32/bfloat16/float16,
float64 for float64), scalars are rounded to it first, derived scalars
(``1 - b1``, ``rho * bs``) are computed in it, ``eps`` is floored at its
smallest normal number, and every operation is rounded on its own (no
``addcmul``/``lerp``/``alpha=`` forms, which may use fused multiply-adds).
Two exact rewrites save kernels: ``maximize`` multiplies by ``-(1 - b1)``
instead of negating the gradient, and ``sign(m) min(|m| / den, 1)`` is
computed as ``clamp((m + 0) / den, -1, 1)`` (see :func:`_fused_body`).
"""

from __future__ import annotations

import types
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, _default_to_fused_or_foreach

from sophia import spec
from sophia.torch import _native

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor, Partial, Replicate
else:  # builds without torch.distributed have no DTensors to handle
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["hessian_ema", "sophia_g", "sophiag"]

_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
#: Parameter dtypes the native CPU kernel handles.
_NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
Scalar = float | Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update math runs in for tensors of ``dtype`` (see :mod:`sophia.spec`).

    Args:
      dtype: storage dtype of a parameter (complex dtypes count as their real pairs).

    Returns:
      ``torch.float64`` for float64/complex128, ``torch.float32`` otherwise.
    """
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def _round(x: Scalar, cd: torch.dtype, device: torch.device) -> Scalar:
    """``x`` rounded to ``cd``: a Python float exact in ``cd``, or a 0-dim ``cd`` tensor."""
    if isinstance(x, Tensor):
        return x.to(device=device, dtype=cd).reshape(())
    return float(_NP_DTYPES[cd](x))


def _as_tensor(x: Scalar, cd: torch.dtype, device: torch.device) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(device=device, dtype=cd).reshape(())
    return torch.full((), float(_NP_DTYPES[cd](x)), dtype=cd, device=device)


def _coefficients(
    cd: torch.dtype,
    device: torch.device,
    *,
    lr: Scalar,
    beta1: Scalar,
    rho: Scalar,
    bs: Scalar,
    weight_decay: Scalar,
    eps: Scalar,
    as_tensors: bool = False,
) -> tuple[Scalar, ...]:
    """``(b1, 1 - b1, rho * bs, eps, weight_decay, lr)`` in the compute dtype ``cd``.

    Python floats stay Python floats (exactly representable in ``cd``, so that
    a ``float32`` kernel multiplying by them rounds once); tensors become
    0-dim ``cd`` tensors on ``device`` and the derived scalars are computed
    with tensor ops in ``cd``, never on the host, so no synchronisation
    happens. With ``as_tensors`` every coefficient is a 0-dim tensor (the
    compiled kernel takes tensors so that a new learning rate does not
    recompile it).
    """
    c = _NP_DTYPES[cd]
    if isinstance(beta1, Tensor):
        b1 = _as_tensor(beta1, cd, device)
        omb1: Scalar = torch.ones((), dtype=cd, device=device) - b1
    else:
        b1, omb1 = float(c(beta1)), float(c(1) - c(beta1))
    if isinstance(rho, Tensor) or isinstance(bs, Tensor):
        rho_bs: Scalar = _as_tensor(rho, cd, device) * _as_tensor(bs, cd, device)
    else:
        rho_bs = float(c(rho) * c(bs))
    if isinstance(eps, Tensor):
        eps_c: Scalar = torch.clamp_min(_as_tensor(eps, cd, device), float(np.finfo(c).tiny))
    else:
        eps_c = spec.effective_eps(float(eps), c)
    out = (b1, omb1, rho_bs, eps_c, _round(weight_decay, cd, device), _round(lr, cd, device))
    if as_tensors:
        out = tuple(_as_tensor(x, cd, device) for x in out)
    return out


def _real(*tensors: Tensor) -> list[Tensor]:
    return [torch.view_as_real(x) if torch.is_complex(x) else x for x in tensors]


#: Elements per block of the for-loop and foreach bodies on CPU. Their 16-21 elementwise
#: kernels run block by block, so every kernel after a block's first touch reads it from
#: cache (the four operands and two buffers, 512 KiB each in float32, 3 MiB in all):
#: main memory sees theta, g, m and h read once and theta and m written once, as in the
#: fused kernel, instead of once per kernel. Smaller blocks pay the ~5 us dispatch of
#: each kernel more often; larger ones fall out of a shared last-level cache.
_CPU_BLOCK = 1 << 17
#: At most this many intra-op threads share a block.
_MAX_BLOCK_THREADS = 8


def _cpu_block() -> int:
    """``_CPU_BLOCK`` elements per intra-op thread (up to ``_MAX_BLOCK_THREADS``).

    Each kernel on a block is split between the threads, so each thread's share
    stays cache-sized. Measured on 2 idle cores (GPT-2-small shapes, 2
    threads): foreach 0.76x and for-loop 0.65x the time of AdamW's same path
    with 256K-element blocks, against 2.1x and 1.4x with 32K-element blocks
    run on one thread. On a machine with more runnable threads than cores,
    the many barriers between the threads can each wait for a descheduled
    thread (measured under load ~9: 2 to 13x AdamW foreach); there
    ``torch.set_num_threads(1)`` is the remedy, as for any many-kernel loop.
    """
    return _CPU_BLOCK * max(1, min(torch.get_num_threads(), _MAX_BLOCK_THREADS))


#: A sum of 0.0/1.0 values in float32 is exact while it stays below ``2**24``.
_EXACT_FLOAT_COUNT = 1 << 24
#: The fused path packs tensors smaller than this into one flat buffer per step, so that
#: they take one compiled call instead of one each (each call costs ~0.1 ms of dispatch).
_PACK_BELOW = 1 << 15
#: The compiled kernel counts in int32; longer tensors are cut into pieces of this size.
_KERNEL_PIECE = 1 << 30


def _step_coefficients(
    cd: torch.dtype,
    device: torch.device,
    maximize: bool,
    *,
    lr: Scalar,
    beta1: Scalar,
    rho: Scalar,
    bs: Scalar,
    weight_decay: Scalar,
    eps: Scalar,
) -> tuple[Tensor, ...]:
    """``(b1, +-(1 - b1), rho * bs, eps, weight_decay, lr)`` as 0-dim ``cd`` tensors on ``device``.

    With ``maximize`` the second one is ``-(1 - b1)``: ``(-g) (1 - b1)`` and
    ``g (-(1 - b1))`` are the same float (negation is exact and rounding is
    symmetric), so no pass negates the gradient. Tensors rather than Python
    floats, because an eager op wraps a Python scalar into a tensor on every
    call (several microseconds each).
    """
    b1, omb1, rho_bs, eps_c, wd, lr_c = _coefficients(
        cd,
        device,
        lr=lr,
        beta1=beta1,
        rho=rho,
        bs=bs,
        weight_decay=weight_decay,
        eps=eps,
        as_tensors=True,
    )
    if maximize:
        omb1 = torch.neg(omb1)
    return b1, omb1, rho_bs, eps_c, wd, lr_c


def _count_wins(r: Tensor, one: Tensor | None = None, buf: Tensor | None = None) -> Tensor:
    """How many entries of ``r`` are ``< 1`` (NaN is not), as a 0-dim tensor.

    With ``one`` (a 0-dim tensor of ``r``'s dtype and device) and a floating
    ``buf`` of ``r``'s shape that is free to overwrite (it may be ``r``), the
    comparison is written into ``buf`` as 0.0/1.0 and summed: on CPU several
    times faster than summing a bool tensor, and exact, since every partial sum
    is an integer below ``2**24``. The result is then a float tensor holding an
    integer (see :func:`_total_wins`).
    """
    if buf is not None and one is not None and r.numel() < _EXACT_FLOAT_COUNT:
        return torch.lt(r, one, out=buf).sum()
    return (r < 1).sum()


def _total_wins(counts: list[Tensor], device: torch.device) -> Tensor:
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


def _pieces(tensors: tuple[Tensor, ...], block: int | None) -> list[tuple[Tensor, ...]]:
    """``tensors`` (one shape) whole, or as matching flat slices of at most ``block`` elements.

    Only contiguous tensors are cut; the others stay whole.
    """
    n = tensors[0].numel()
    if block is None or n <= block or not all(x.is_contiguous() for x in tensors):
        return [tensors]
    return list(zip(*(x.view(-1).split(block) for x in tensors)))


class _Workspace:
    """What the for-loop body needs per (compute dtype, device), made once per step.

    The coefficients, the constants 0 and 1 as 0-dim tensors, and two buffers
    of ``block`` elements whose views are cached by shape (every full block and
    every tensor of a repeated shape reuses them: making a view costs as much
    as a small kernel).
    """

    def __init__(self, cd: torch.dtype, device: torch.device, coeffs: tuple[Tensor, ...]) -> None:
        self.cd, self.device, self.coeffs = cd, device, coeffs
        self.zero = torch.zeros((), dtype=cd, device=device)
        self.one = torch.ones((), dtype=cd, device=device)
        self.block = _cpu_block() if device.type == "cpu" else None
        self._bufs: tuple[Tensor, Tensor] | None = None
        self._views: dict[torch.Size, tuple[Tensor, Tensor]] = {}
        self._list_views: dict[tuple[torch.Size, ...], _ListBuffers] = {}

    def buffers(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Two ``cd`` tensors of ``x``'s shape, free to overwrite."""
        if self.block is None or x.numel() > self.block or not x.is_contiguous():
            return torch.empty_like(x, dtype=self.cd), torch.empty_like(x, dtype=self.cd)
        views = self._views.get(x.shape)
        if views is None:
            n = x.numel()
            views = self._views[x.shape] = tuple(  # type: ignore[assignment]
                buf[:n].view(x.shape) for buf in self._buffers()
            )
        return views  # type: ignore[return-value]

    def list_buffers(self, xs: list[Tensor]) -> _ListBuffers | None:
        """Views of the two buffers for ``xs``, back to back; ``None`` past ``block`` elements."""
        key = tuple(x.shape for x in xs)
        views = self._list_views.get(key)
        if views is None:
            n = sum(x.numel() for x in xs)
            if self.block is None or n > self.block:
                return None
            a_flat, q_flat = (buf[:n] for buf in self._buffers())
            lists: tuple[list[Tensor], list[Tensor]] = ([], [])
            for flat, lst in zip((a_flat, q_flat), lists):
                for x, v in zip(xs, flat.split([x.numel() for x in xs])):
                    lst.append(v.view(x.shape))
            views = self._list_views[key] = _ListBuffers(*lists, a_flat, q_flat)
        return views

    def _buffers(self) -> tuple[Tensor, Tensor]:
        if self._bufs is None:
            self._bufs = tuple(  # type: ignore[assignment]
                torch.empty(self.block, dtype=self.cd, device=self.device)  # type: ignore[arg-type]
                for _ in "ar"
            )
        return self._bufs  # type: ignore[return-value]


class _ListBuffers(NamedTuple):
    """Two lists of buffers for a batch, and the flat spans of the buffers they tile."""

    a: list[Tensor]
    q: list[Tensor]
    a_flat: Tensor
    q_flat: Tensor


def _traced_sophia_g(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    state_steps: list[Tensor],
    *,
    maximize: bool,
    **hp: Any,
) -> Tensor:
    """Every path inside an outer ``torch.compile``: the per-tensor expression, fused there."""
    out_device = params[0].device
    n_win = torch.zeros((), dtype=torch.int64, device=out_device)
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, hessians, state_steps]  # type: ignore[list-item]
    )
    for (device, dtype), ((d_params, d_grads, d_ms, d_hs, d_steps), _) in grouped.items():
        torch._foreach_add_(d_steps, 1)
        coeffs = _step_coefficients(compute_dtype(dtype), device, maximize, **hp)
        for p, g, m, h in zip(d_params, d_grads, d_ms, d_hs):
            n_win = n_win + _fused_body(*_real(p, g, m, h), *coeffs).to(out_device)
    return n_win


def _single_tensor_update(
    param: Tensor, grad: Tensor, m: Tensor, h: Tensor, ws: _Workspace
) -> Tensor:
    """One tensor (or block) updated in place with 16 eager kernels and two buffers.

    Returns the number of coordinates with ``r < 1`` (see :func:`_count_wins`).
    """
    b1, omb1, rho_bs, eps, wd, lr = ws.coeffs
    cd = ws.cd
    t = param if param.dtype == cd else param.to(cd)
    mc = m if m.dtype == cd else m.to(cd)
    g = grad if grad.dtype == cd else grad.to(cd)
    hc = h if h.dtype == cd else h.to(cd)
    a, q = ws.buffers(t)
    # m <- b1 m + (1 - b1) g, each product and the sum rounded on their own
    mc.mul_(b1).add_(torch.mul(g, omb1, out=a))
    # den <- rho bs max(h, 0) + eps
    torch.clamp_min(hc, 0, out=a).mul_(rho_bs).add_(eps)
    # sign(m) min(|m| / den, 1) is clamp((m + 0) / den, -1, 1) to the bit (see _fused_body),
    # and r = min(|m| / den, 1) < 1 exactly where |(m + 0) / den| < 1
    torch.add(mc, ws.zero, out=q).div_(a)
    wins = _count_wins(torch.abs(q, out=a), ws.one, a)
    # u <- sign(m) r + wd theta; theta <- theta - lr u
    q.clamp_(-1, 1).add_(torch.mul(t, wd, out=a))
    t.sub_(q.mul_(lr))
    if t is not param:
        param.copy_(t)
    if mc is not m:
        m.copy_(mc)
    return wins


def _single_tensor_sophia_g(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: Scalar,
    beta1: Scalar,
    rho: Scalar,
    bs: Scalar,
    weight_decay: Scalar,
    eps: Scalar,
    maximize: bool,
    capturable: bool,
    has_complex: bool,
) -> Tensor:
    """The for-loop body: one tensor at a time (on CPU one block at a time), two buffers."""
    del capturable, has_complex  # every path is host-sync free; complex is viewed per tensor
    hp = {"lr": lr, "beta1": beta1, "rho": rho, "bs": bs, "weight_decay": weight_decay, "eps": eps}
    if not params:
        return torch.zeros((), dtype=torch.int64)
    if torch.compiler.is_compiling():
        return _traced_sophia_g(
            params, grads, exp_avgs, hessians, state_steps, maximize=maximize, **hp
        )
    counts: list[Tensor] = []
    spaces: dict[tuple[torch.dtype, torch.device], _Workspace] = {}
    for i in range(len(params)):
        param, grad, m, h = _real(params[i], grads[i], exp_avgs[i], hessians[i])
        state_steps[i] += 1
        if param.numel() == 0:
            continue
        cd = compute_dtype(param.dtype)
        ws = spaces.get((cd, param.device))
        if ws is None:
            coeffs = _step_coefficients(cd, param.device, maximize, **hp)
            ws = spaces[(cd, param.device)] = _Workspace(cd, param.device, coeffs)
        for piece in _pieces((param, grad, m, h), ws.block):
            counts.append(_single_tensor_update(*piece, ws))
    return _total_wins(counts, params[0].device)


def _foreach_fresh(
    op: str, src: list[Tensor], other: Tensor | float, out: list[Tensor] | None
) -> list[Tensor]:
    """``torch._foreach_<op>(src, other)``: new tensors, or computed in the buffers ``out``.

    Into buffers it takes a copy and an in-place op, except for a single tensor
    (a block of a large one, most of the work on CPU), where the op's ``out=``
    form is that same kernel without the copy.
    """
    if out is None:
        return getattr(torch, f"_foreach_{op}")(src, other)
    if len(src) == 1:
        getattr(torch, op)(src[0], other, out=out[0])
        return out
    torch._foreach_copy_(out, src)
    getattr(torch, f"_foreach_{op}_")(out, other)
    return out


def _foreach_update(
    ts: list[Tensor],
    gs: list[Tensor],
    ms: list[Tensor],
    hs: list[Tensor],
    ws: _Workspace,
    bufs: _ListBuffers | None = None,
) -> list[Tensor]:
    """The update of a list of tensors of one device and dtype with ``torch._foreach_*`` ops.

    ``bufs`` are the CPU path's block buffers for the batch: each new value is
    copied into them and computed in place, which on CPU is cheaper than
    allocating (fresh pages from the system on every block), and the count and
    the clamp run once on the flat span the batch's quotients tile. Without
    them the foreach ops allocate, as on GPU. Returns counts (see
    :func:`_count_wins`): one per batch with ``bufs``, else one per tensor.
    """
    b1, omb1, rho_bs, eps, wd, lr = ws.coeffs
    cd = ws.cd
    low = ts[0].dtype != cd
    tc = [x.to(cd) for x in ts] if low else ts
    mc = [x.to(cd) for x in ms] if low else ms
    gc = [x if x.dtype == cd else x.to(cd) for x in gs]
    hc = [x if x.dtype == cd else x.to(cd) for x in hs]
    a_out, q_out = (bufs.a, bufs.q) if bufs is not None else (None, None)
    # m <- b1 m + (1 - b1) g, each product and the sum rounded on their own
    a = _foreach_fresh("mul", gc, omb1, a_out)
    torch._foreach_mul_(mc, b1)
    torch._foreach_add_(mc, a)
    # den <- rho bs max(h, 0) + eps
    den = _foreach_fresh("clamp_min", hc, 0.0, a_out)
    torch._foreach_mul_(den, rho_bs)
    torch._foreach_add_(den, eps)
    # sign(m) min(|m| / den, 1) is clamp((m + 0) / den, -1, 1) to the bit (see _fused_body),
    # and r = min(|m| / den, 1) < 1 exactly where |(m + 0) / den| < 1
    q = _foreach_fresh("add", mc, ws.zero, q_out)
    torch._foreach_div_(q, den)
    if bufs is not None:
        # the batch's quotients tile one flat buffer: count and clamp them in one go
        wins = [_count_wins(torch.abs(bufs.q_flat, out=bufs.a_flat), ws.one, bufs.a_flat)]
        bufs.q_flat.clamp_(-1, 1)
    else:
        wins = [_count_wins(torch.abs(x, out=d), ws.one, d) for x, d in zip(q, den)]
        torch._foreach_clamp_min_(q, -1.0)
        torch._foreach_clamp_max_(q, 1.0)
    del a, den
    # u <- sign(m) r + wd theta; theta <- theta - lr u
    torch._foreach_add_(q, _foreach_fresh("mul", tc, wd, a_out))
    torch._foreach_mul_(q, lr)
    torch._foreach_sub_(tc, q)
    if low:
        torch._foreach_copy_(ts, tc)
        torch._foreach_copy_(ms, mc)
    return wins


def _batches(lists: list[list[Tensor]], block: int | None) -> list[list[list[Tensor]]]:
    """The tensor lists cut into batches of about ``block`` elements (one batch without ``block``).

    Contiguous tensors longer than ``block`` are cut into flat slices (see
    :func:`_pieces`); small tensors share a batch; zero-size ones are dropped.
    """
    if block is None:
        return [lists]
    batches: list[list[list[Tensor]]] = []
    cur: list[list[Tensor]] = [[] for _ in lists]
    size = 0
    for xs in zip(*lists):
        if xs[0].numel() == 0:
            continue
        for piece in _pieces(xs, block):
            k = piece[0].numel()
            if size and size + k > block:
                batches.append(cur)
                cur, size = [[] for _ in lists], 0
            for lst, x in zip(cur, piece):
                lst.append(x)
            size += k
    if size:
        batches.append(cur)
    return batches


def _multi_tensor_sophia_g(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: Scalar,
    beta1: Scalar,
    rho: Scalar,
    bs: Scalar,
    weight_decay: Scalar,
    eps: Scalar,
    maximize: bool,
    capturable: bool,
    has_complex: bool,
) -> Tensor:
    """The foreach body: ``torch._foreach_*`` kernels per (device, dtype), by blocks on CPU."""
    del capturable
    hp = {"lr": lr, "beta1": beta1, "rho": rho, "bs": bs, "weight_decay": weight_decay, "eps": eps}
    if len(params) == 0:
        return torch.zeros((), dtype=torch.int64)
    if torch.compiler.is_compiling():
        return _traced_sophia_g(
            params, grads, exp_avgs, hessians, state_steps, maximize=maximize, **hp
        )
    counts: list[Tensor] = []
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, hessians, state_steps]  # type: ignore[list-item]
    )
    for (device, dtype), ((d_params, d_grads, d_ms, d_hs, d_steps), _) in grouped.items():
        lists = [list(x) for x in (d_params, d_grads, d_ms, d_hs)]
        if has_complex:
            lists = [
                [torch.view_as_real(x) if torch.is_complex(x) else x for x in xs] for xs in lists
            ]
        torch._foreach_add_(d_steps, 1)
        cd = compute_dtype(dtype)
        ws = _Workspace(cd, device, _step_coefficients(cd, device, maximize, **hp))
        for batch in _batches(lists, ws.block):
            counts += _foreach_update(*batch, ws, ws.list_buffers(batch[0]))
    return _total_wins(counts, params[0].device)


def _fused_body(
    param: Tensor,
    grad: Tensor,
    m: Tensor,
    h: Tensor,
    b1: Tensor,
    omb1: Tensor,
    rho_bs: Tensor,
    eps: Tensor,
    wd: Tensor,
    lr: Tensor,
    count_dtype: torch.dtype = torch.int64,
) -> Tensor:
    """One tensor's update as a pure expression, for ``torch.compile`` to fuse into one loop.

    ``omb1`` carries the sign of ``maximize`` (see :func:`_step_coefficients`).
    For ``den > 0``, ``sign(m) min(|m| / den, 1)`` is ``clamp(m / den, -1, 1)``
    to the bit (the quotient's magnitude is ``|m| / den`` rounded alike), except
    that ``sign(-0) = 0`` makes it ``+0`` where the quotient is ``-0``: adding
    ``+0`` to ``m`` first maps ``-0`` to ``+0`` and no other value changes. That
    is a handful of vector instructions fewer per element than the literal form,
    which on a memory-bound loop still shows.
    """
    cd = compute_dtype(param.dtype)
    t = param.to(cd)
    mc = m.to(cd) * b1 + grad.to(cd) * omb1
    den = torch.clamp_min(h.to(cd), 0) * rho_bs + eps
    q = (mc + 0.0) / den
    u = torch.where(q > 1, 1.0, torch.where(q < -1, -1.0, q)) + t * wd
    param.copy_(t - u * lr)
    m.copy_(mc)
    # r = min(|m| / den, 1) < 1 exactly where |m / den| < 1
    return (torch.abs(q) < 1).sum(dtype=count_dtype)


_FUSED_KERNELS: dict[torch.dtype, Any] = {}
#: Inductor settings of the fused kernel (see :func:`_fused_kernel`).
_KERNEL_OPTIONS = {
    "cpp.enable_floating_point_contract_flag": "off",
    "cpp.enable_unsafe_math_opt_flag": False,
    "emulate_precision_casts": True,
}


def _fused_kernel(dtype: torch.dtype) -> Any:
    """The compiled kernel for parameters of ``dtype``, built on first use and cached.

    Each dtype gets its own copy of the code object, so that dynamo's
    per-function recompile limit counts each dtype on its own and one dtype
    never evicts another's compiled graph. The copy counts in int32 (cheaper in
    the vector loop); callers keep each call below ``2**31`` elements. The
    options pin what the contract needs whatever the environment says: no
    floating-point contraction or unsafe math in the C++ kernel, and no fp
    fusion (FMA) in a Triton kernel, which inductor turns off only when it
    emulates eager's rounding.
    """
    kernel = _FUSED_KERNELS.get(dtype)
    if kernel is None:
        name = f"_fused_body_{str(dtype).replace('torch.', '')}"
        code = _fused_body.__code__.replace(co_name=name)
        fn = types.FunctionType(code, _fused_body.__globals__, name, (torch.int32,))
        kernel = _FUSED_KERNELS[dtype] = torch.compile(
            fn, dynamic=True, fullgraph=True, options=_KERNEL_OPTIONS
        )
    return kernel


#: Device types the compiled kernel supports (torch.compile's inductor backends).
FUSED_DEVICES = ("cpu", "cuda", "xpu")


def _fused_packed(
    small: list[tuple[Tensor, ...]], kernel: Any, coeffs: tuple[Tensor, ...]
) -> Tensor:
    """Small (or non-contiguous) tensors through one call on flat copies, copied back after."""
    ps, gs, ms, hs = (list(x) for x in zip(*small))
    flat_p, flat_g, flat_m, flat_h = (
        torch.cat([x.reshape(-1) for x in xs]) for xs in (ps, gs, ms, hs)
    )
    n = flat_p.numel()
    # torch.compile specialises sizes 0 and 1: those go through the eager expression
    body = kernel if 1 < n < 2**31 else _fused_body
    wins = body(flat_p, flat_g, flat_m, flat_h, *coeffs)
    sizes = [x.numel() for x in ps]
    torch._foreach_copy_(ps, [v.view(x.shape) for v, x in zip(flat_p.split(sizes), ps)])
    torch._foreach_copy_(ms, [v.view(x.shape) for v, x in zip(flat_m.split(sizes), ms)])
    return wins


def _fused_sophia_g(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: Scalar,
    beta1: Scalar,
    rho: Scalar,
    bs: Scalar,
    weight_decay: Scalar,
    eps: Scalar,
    maximize: bool,
    capturable: bool,
    has_complex: bool,
) -> Tensor:
    """The fused body: one pass per tensor (read p, g, m, h; write p, m), native or compiled."""
    del capturable
    hp = {"lr": lr, "beta1": beta1, "rho": rho, "bs": bs, "weight_decay": weight_decay, "eps": eps}
    if len(params) == 0:
        return torch.zeros((), dtype=torch.int64)
    if torch.compiler.is_compiling():
        # inside an outer torch.compile (e.g. of SophiaG.step) the body is traced and fused there
        return _traced_sophia_g(
            params, grads, exp_avgs, hessians, state_steps, maximize=maximize, **hp
        )
    counts: list[Tensor] = []
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, hessians, state_steps]  # type: ignore[list-item]
    )
    for (device, dtype), ((d_params, d_grads, d_ms, d_hs, d_steps), _) in grouped.items():
        if device.type not in FUSED_DEVICES:
            raise RuntimeError(
                f"SophiaG fused=True supports devices {FUSED_DEVICES}, not {device.type!r}"
            )
        torch._foreach_add_(d_steps, 1)
        coeffs = _step_coefficients(compute_dtype(dtype), device, maximize, **hp)
        native = (
            _native.fused_step_op() if device.type == "cpu" and dtype in _NATIVE_DTYPES else None
        )
        whole: list[tuple[Tensor, ...]] = []
        small: list[tuple[Tensor, ...]] = []
        with torch.no_grad():  # one compiled graph whatever the caller's grad mode
            for xs in zip(d_params, d_grads, d_ms, d_hs):
                xs = tuple(_real(*xs)) if has_complex else xs
                n = xs[0].numel()
                if n == 0:
                    continue
                if not all(x.is_contiguous() for x in xs):
                    small.append(xs)
                elif native is not None:
                    whole.append(xs)
                elif n < _PACK_BELOW:
                    small.append(xs)
                else:
                    whole.extend(_pieces(tuple(x.view(-1) for x in xs), _KERNEL_PIECE))
            if native is not None and whole:
                counts.append(native(*(list(x) for x in zip(*whole)), torch.stack(coeffs)))
            elif whole:
                kernel = _fused_kernel(dtype)
                counts.extend(kernel(*piece, *coeffs) for piece in whole)
            if small:
                counts.append(_fused_packed(small, _fused_kernel(dtype), coeffs))
    return _total_wins(counts, params[0].device)


def sophia_g(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    state_steps: list[Tensor],
    foreach: bool | None = None,
    capturable: bool = False,
    fused: bool | None = None,
    has_complex: bool = False,
    *,
    lr: Scalar,
    beta1: Scalar,
    rho: Scalar,
    bs: Scalar,
    weight_decay: Scalar,
    eps: Scalar,
    maximize: bool,
) -> Tensor:
    r"""Functional API that performs one SophiaG step in place (see :class:`sophia.torch.SophiaG`).

    Per tensor, in the compute dtype of :mod:`sophia.spec`:
    ``m <- b1 m + (1-b1) g``; ``r <- min(|m| / (rho bs max(h,0) + eps), 1)``;
    ``theta <- theta - lr (sign(m) r + weight_decay theta)``; ``step += 1``.
    The Hessian EMA is not touched (see :func:`hessian_ema`). DTensor
    parameters (FSDP2's ``fully_shard``, tensor parallelism) are updated shard
    by shard on each rank, their states must be sharded like them, and the
    returned win count is the global one.

    Args:
      params: parameters, updated in place.
      grads: their gradients.
      exp_avgs: momenta :math:`m`, updated in place.
      hessians: diagonal-Hessian EMAs :math:`h`.
      state_steps: 0-dim step counters, incremented in place.
      foreach: use the ``torch._foreach_*`` implementation (default: as torch
        chooses, i.e. on when every tensor is on a foreach-capable device).
      capturable: accepted for symmetry with torch's optimizers; every
        implementation here is free of host synchronisation.
      fused: use the compiled single-pass kernel.
      has_complex: whether any tensor is complex (viewed as real pairs).
      lr: learning rate (float or 0-dim tensor).
      beta1: momentum EMA rate.
      rho: clipping scale.
      bs: number of labels behind each Hessian estimate.
      weight_decay: decoupled weight decay.
      eps: denominator floor (raised to the compute dtype's smallest normal).
      maximize: ascend instead of descend.

    Returns:
      The number of coordinates with ``r < 1`` (0-dim int64 tensor on the
      first parameter's device; no host synchronisation).
    """
    kwargs: dict[str, Any] = {
        "lr": lr,
        "beta1": beta1,
        "rho": rho,
        "bs": bs,
        "weight_decay": weight_decay,
        "eps": eps,
        "maximize": maximize,
        "capturable": capturable,
        "has_complex": has_complex,
    }
    lists = (params, grads, exp_avgs, hessians, state_steps)
    if DTensor is not None and any(isinstance(p, DTensor) for p in params):
        return _on_local_shards(*lists, foreach=foreach, fused=fused, **kwargs)
    if fused is None and foreach is None:
        _, foreach = _default_to_fused_or_foreach(params, False, use_fused=False)
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if not torch.compiler.is_compiling() and not all(isinstance(t, Tensor) for t in state_steps):
        raise RuntimeError("`state_steps` must be a list of 0-dim tensors")
    if fused:
        func = _fused_sophia_g
    elif foreach:
        func = _multi_tensor_sophia_g
    else:
        func = _single_tensor_sophia_g
    return func(*lists, **kwargs)


def _describe(t: Tensor) -> str:
    if isinstance(t, DTensor):
        return f"a DTensor with placements {t.placements} on {t.device_mesh}"
    return f"a plain {type(t).__name__}"


def _take(xs: list[Tensor], idx: list[int], local: bool) -> list[Tensor]:
    return [xs[i].to_local() if local else xs[i] for i in idx]


def _on_local_shards(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    state_steps: list[Tensor],
    **kwargs: Any,
) -> Tensor:
    """:func:`sophia_g` on DTensor parameters (FSDP2, tensor parallel), shard by shard.

    The update is elementwise, so updating every rank's local shard of
    ``param``, ``exp_avg`` and ``grad`` (``to_local()`` views) with the plain
    bodies is updating the DTensors, with no communication and no DTensor
    dispatch per kernel; this needs the states sharded exactly like their
    parameter. The only global quantity is the win count: per (mesh,
    placements) class it is summed over the mesh dimensions the tensors are
    sharded on (a ``Partial`` reduction) and taken as is over replicated ones.
    """
    classes: dict[Any, list[int]] = {}
    for i, p in enumerate(params):
        if not isinstance(p, DTensor):
            classes.setdefault(None, []).append(i)
            continue
        if any(pl.is_partial() for pl in p.placements):
            raise ValueError(
                f"sophia_g: parameter {i} is a DTensor with Partial placements {p.placements}; "
                "an elementwise update needs Shard or Replicate placements"
            )
        for name, t in (("grad", grads[i]), ("exp_avg", exp_avgs[i]), ("hessian", hessians[i])):
            if not (
                isinstance(t, DTensor)
                and t.device_mesh == p.device_mesh
                and t.placements == p.placements
            ):
                raise ValueError(
                    f"sophia_g: the {name} of parameter {i} is {_describe(t)}, but the "
                    f"parameter is {_describe(p)}; it must be a DTensor on the same mesh "
                    "with the same placements"
                )
        classes.setdefault((p.device_mesh, p.placements), []).append(i)
    total: Tensor | None = None
    for key, idx in classes.items():
        local = key is not None
        n = sophia_g(
            _take(params, idx, local),
            _take(grads, idx, local),
            _take(exp_avgs, idx, local),
            _take(hessians, idx, local),
            _take(state_steps, idx, False),
            **kwargs,
        )
        if key is not None and any(pl.is_shard() for pl in key[1]):
            mesh, placements = key
            parts = [Partial() if pl.is_shard() else Replicate() for pl in placements]
            n = DTensor.from_local(n, mesh, parts).full_tensor()
        total = n if total is None else total + n.to(total.device)
    assert total is not None
    return total


#: The name torch's functional optimizers would use (``torch.optim.adamw.adamw``).
sophiag = sophia_g


def hessian_ema(
    hessians: list[Tensor],
    estimates: list[Tensor],
    *,
    beta2: Scalar,
    foreach: bool | None = None,
) -> None:
    r"""``h <- b2 h + (1 - b2) h_hat`` in place, as :func:`sophia.spec.hessian_ema`.

    Args:
      hessians: the Hessian EMAs, updated in place (complex ones as real pairs).
      estimates: the estimates :math:`\hat h`, one per Hessian, of its shape
        (or of its real view for a complex Hessian); any floating dtype.
      beta2: the Hessian EMA rate (float or 0-dim tensor).
      foreach: use ``torch._foreach_*`` kernels (default: as torch chooses).
    """
    if len(hessians) != len(estimates):
        raise ValueError(f"hessian_ema: {len(hessians)} Hessians but {len(estimates)} estimates")
    hs = [torch.view_as_real(h) if torch.is_complex(h) else h for h in hessians]
    es = [torch.view_as_real(e) if torch.is_complex(e) else e for e in estimates]
    for h, e in zip(hs, es):
        if h.shape != e.shape:
            raise ValueError(
                f"hessian_ema: estimate of shape {tuple(e.shape)} for a Hessian of shape "
                f"{tuple(h.shape)}"
            )
    if foreach is None:
        _, foreach = _default_to_fused_or_foreach(hs, False, use_fused=False)

    def coeffs(cd: torch.dtype, device: torch.device) -> tuple[Scalar, Scalar]:
        if isinstance(beta2, Tensor):
            b2 = _as_tensor(beta2, cd, device)
            return b2, torch.ones((), dtype=cd, device=device) - b2
        c = _NP_DTYPES[cd]
        return float(c(beta2)), float(c(1) - c(beta2))

    if not foreach:
        for h, e in zip(hs, es):
            cd = compute_dtype(h.dtype)
            b2, omb2 = coeffs(cd, h.device)
            hc = h if h.dtype == cd else h.to(cd)
            hc.mul_(b2).add_(torch.mul(e.to(device=h.device, dtype=cd), omb2))
            if hc is not h:
                h.copy_(hc)
        return
    grouped = Optimizer._group_tensors_by_device_and_dtype([hs, es])  # type: ignore[list-item]
    for (device, dtype), ((d_hs, d_es), _) in grouped.items():
        cd = compute_dtype(dtype)
        b2, omb2 = coeffs(cd, device)
        hc = [x.to(cd) for x in d_hs] if dtype != cd else list(d_hs)
        ec = torch._foreach_mul([x.to(device=device, dtype=cd) for x in d_es], omb2)
        torch._foreach_mul_(hc, b2)
        torch._foreach_add_(hc, ec)
        if dtype != cd:
            torch._foreach_copy_(list(d_hs), hc)

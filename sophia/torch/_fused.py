"""The fused body: one pass per tensor that reads ``param, grad, exp_avg, hessian``, writes two.

On CPU the pass is the native C++ kernel over all tensors of a (device, dtype)
group at once (:mod:`sophia.torch._native`); elsewhere, and on CPU where the
native kernel cannot be built, it is :func:`fused_update` compiled once per
dtype (dynamic shapes) and cached, one call per tensor, with small and
non-contiguous tensors sharing one call on packed copies. Inside an outer
``torch.compile`` every implementation traces :func:`fused_update` instead
(:func:`sophia_g_under_compile`).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor

from sophia.torch import _native
from sophia.torch._blocks import DeviceGroup, flat_slices
from sophia.torch._scalars import Hyperparameters, compute_dtype, real_view

#: Device types the compiled kernel supports (torch.compile's inductor backends).
FUSED_DEVICES = ("cpu", "cuda", "xpu")
#: Parameter dtypes the native CPU kernel handles.
_NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: Tensors smaller than this are packed into one flat buffer per step, so that they take
#: one compiled call instead of one each (every call pays a fixed dispatch cost).
_PACK_BELOW = 1 << 15
#: The compiled kernel counts in int32; longer tensors are cut into slices of this size.
_KERNEL_SLICE = 1 << 30
#: Inductor settings of the compiled kernel (see :func:`compiled_kernel`).
_KERNEL_OPTIONS = {
    "cpp.enable_floating_point_contract_flag": "off",
    "cpp.enable_unsafe_math_opt_flag": False,
    "emulate_precision_casts": True,
}
#: The compiled kernel of each parameter dtype, built on first use.
COMPILED_KERNELS: dict[torch.dtype, Any] = {}


def fused_update(
    param: Tensor,
    grad: Tensor,
    m: Tensor,
    h: Tensor,
    b1: Tensor,
    signed_one_minus_b1: Tensor,
    rho_bs: Tensor,
    eps: Tensor,
    weight_decay: Tensor,
    lr: Tensor,
    count_dtype: torch.dtype = torch.int64,
) -> Tensor:
    """One tensor's step as a pure expression of :mod:`sophia.spec`, for ``torch.compile`` to fuse.

    The scalars are a :class:`~sophia.torch._scalars.StepCoefficients`. For
    ``den > 0``, ``sign(m) min(|m| / den, 1)`` is ``clamp(m / den, -1, 1)``
    to the bit (the quotient's magnitude is ``|m| / den`` rounded alike),
    except that ``sign(-0) = 0`` makes it ``+0`` where the quotient is ``-0``:
    adding ``+0`` to ``m`` first maps ``-0`` to ``+0`` and no other value
    changes. That saves a handful of vector instructions per element over the
    literal form. The other bodies use the same two rewrites.

    Returns:
      The number of coordinates with ``r < 1``, in ``count_dtype``.
    """
    compute = compute_dtype(param.dtype)
    t = param.to(compute)
    mc = m.to(compute) * b1 + grad.to(compute) * signed_one_minus_b1
    den = torch.clamp_min(h.to(compute), 0) * rho_bs + eps
    q = (mc + 0.0) / den
    u = torch.where(q > 1, 1.0, torch.where(q < -1, -1.0, q)) + t * weight_decay
    param.copy_(t - u * lr)
    m.copy_(mc)
    # r = min(|m| / den, 1) < 1 exactly where |m / den| < 1
    return (torch.abs(q) < 1).sum(dtype=count_dtype)


def compiled_kernel(dtype: torch.dtype) -> Any:
    """The compiled :func:`fused_update` for parameters of ``dtype``, built on first use and cached.

    Each dtype gets its own copy of the code object, so that dynamo's
    per-function recompile limit counts each dtype on its own and one dtype
    never evicts another's compiled graph. The copy counts in int32 (cheaper in
    the vector loop); callers keep each call below ``2**31`` elements. The
    options pin what the contract needs whatever the environment says: no
    floating-point contraction or unsafe math in the C++ kernel, and no fp
    fusion (FMA) in a Triton kernel, which inductor turns off only when it
    emulates eager's rounding.
    """
    kernel = COMPILED_KERNELS.get(dtype)
    if kernel is None:
        name = f"fused_update_{str(dtype).replace('torch.', '')}"
        code = fused_update.__code__.replace(co_name=name)
        fn = types.FunctionType(code, fused_update.__globals__, name, (torch.int32,))
        kernel = COMPILED_KERNELS[dtype] = torch.compile(
            fn, dynamic=True, fullgraph=True, options=_KERNEL_OPTIONS
        )
    return kernel


def _packed_update(
    small: list[tuple[Tensor, ...]], kernel: Any, coeffs: tuple[Tensor, ...]
) -> Tensor:
    """Small (or non-contiguous) tensors through one call on flat copies, copied back after."""
    params, grads, ms, hs = (list(x) for x in zip(*small))
    flat_p, flat_g, flat_m, flat_h = (
        torch.cat([x.reshape(-1) for x in xs]) for xs in (params, grads, ms, hs)
    )
    n = flat_p.numel()
    # torch.compile specialises sizes 0 and 1: those go through the eager expression
    body = kernel if 1 < n < 2**31 else fused_update
    wins = body(flat_p, flat_g, flat_m, flat_h, *coeffs)
    sizes = [x.numel() for x in params]
    torch._foreach_copy_(params, [v.view(x.shape) for v, x in zip(flat_p.split(sizes), params)])
    torch._foreach_copy_(ms, [v.view(x.shape) for v, x in zip(flat_m.split(sizes), ms)])
    return wins


def fused_sophia_g(group: DeviceGroup, hyper: Hyperparameters) -> list[Tensor]:
    """The fused body on one (device, dtype); returns win counts."""
    device, dtype = group.device, group.dtype
    if device.type not in FUSED_DEVICES:
        raise RuntimeError(
            f"SophiaG fused=True supports devices {FUSED_DEVICES}, not {device.type!r}"
        )
    coeffs = hyper.coefficients(compute_dtype(dtype), device)
    native = _native.fused_step_op() if device.type == "cpu" and dtype in _NATIVE_DTYPES else None
    counts: list[Tensor] = []
    whole: list[tuple[Tensor, ...]] = []
    small: list[tuple[Tensor, ...]] = []
    with torch.no_grad():  # one compiled graph whatever the caller's grad mode
        for xs in zip(group.params, group.grads, group.exp_avgs, group.hessians):
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
                whole.extend(flat_slices(tuple(x.view(-1) for x in xs), _KERNEL_SLICE))
        if native is not None and whole:
            counts.append(native(*(list(x) for x in zip(*whole)), torch.stack(coeffs)))
        elif whole:
            kernel = compiled_kernel(dtype)
            counts.extend(kernel(*piece, *coeffs) for piece in whole)
        if small:
            counts.append(_packed_update(small, compiled_kernel(dtype), coeffs))
    return counts


def sophia_g_under_compile(group: DeviceGroup, hyper: Hyperparameters) -> list[Tensor]:
    """Every body inside an outer ``torch.compile``: :func:`fused_update`, traced there."""
    coeffs = hyper.coefficients(compute_dtype(group.dtype), group.device)
    tensors = zip(group.params, group.grads, group.exp_avgs, group.hessians)
    # viewed here whatever has_complex says, as the fused expression needs real tensors
    return [fused_update(*(real_view(x) for x in xs), *coeffs) for xs in tensors]

"""The fused body: one pass per tensor that reads ``param, grad, exp_avg, hessian``, writes two.

On CPU the pass is the native C++ kernel over all tensors of a (device, dtype)
group at once (:mod:`sophia.torch._native`); elsewhere, and on CPU where the
native kernel cannot be built, it is :func:`fused_update` compiled once per
dtype (dynamic shapes) and cached, one call per tensor, with small and
non-contiguous tensors sharing one call on packed copies. Inside an outer
``torch.compile`` every implementation traces :func:`fused_update` instead
(:func:`sophia_g_under_compile`).

Narrow state (:mod:`sophia.narrow`: ``mu_dtype``, ``hessian_dtype``) takes the
same routes: the native kernel's ``fused_step_narrow_`` op, or
:func:`~sophia.torch._fused_narrow.fused_update_narrow` compiled once per state
layout, which rounds and decodes inside the pass as well. A group whose state
has the parameters' dtype and no stochastic form runs the default kernels unchanged.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor

from sophia.torch import _narrow, _native
from sophia.torch._blocks import DeviceGroup, flat_slices
from sophia.torch._fused_narrow import (
    NarrowForm,
    fused_update_narrow,
    mu_keys,
    narrow_form,
    packed_coordinates,
)
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
#: Inductor settings of the compiled kernels (see :func:`compiled_kernel`): no contraction
#: into FMAs and no unsafe math in C++, eager's rounding of every cast (which also keeps
#: Triton from fusing multiply-adds). The narrow kernel's integer hashing is exact anyway.
_KERNEL_OPTIONS = {
    "cpp.enable_floating_point_contract_flag": "off",
    "cpp.enable_unsafe_math_opt_flag": False,
    "emulate_precision_casts": True,
}
#: The compiled kernel of each parameter dtype, built on first use; the narrow kernel's
#: under ``(dtype, m dtype, h dtype, stochastic_mu, block8)``.
COMPILED_KERNELS: dict[Any, Any] = {}


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


def _compiled_copy(fn: Any, name: str, defaults: tuple[Any, ...]) -> Any:
    """``fn`` compiled as its own code object ``name`` (own dynamo cache), with ``defaults``."""
    code = fn.__code__.replace(co_name=name)
    copy = types.FunctionType(code, fn.__globals__, name, defaults)
    return torch.compile(copy, dynamic=True, fullgraph=True, options=_KERNEL_OPTIONS)


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
        kernel = COMPILED_KERNELS[dtype] = _compiled_copy(fused_update, name, (torch.int32,))
    return kernel


def compiled_narrow_kernel(
    dtype: torch.dtype, m_dtype: torch.dtype, h_dtype: torch.dtype, form: NarrowForm
) -> Any:
    """The compiled :func:`~sophia.torch._fused_narrow.fused_update_narrow` of one state layout.

    One code object per (parameter dtype, ``m`` dtype, ``h`` dtype, form), as
    :func:`compiled_kernel` has per dtype.
    """
    key = (dtype, m_dtype, h_dtype, form.stochastic_mu, form.block8)
    kernel = COMPILED_KERNELS.get(key)
    if kernel is None:
        name = (
            "_".join(["fused_update_narrow"] + [str(x).replace("torch.", "") for x in key[:3]])
            + "_sr" * form.stochastic_mu
            + "_block8" * form.block8
        )
        defaults = (torch.int32, form.stochastic_mu, form.block8)
        kernel = COMPILED_KERNELS[key] = _compiled_copy(fused_update_narrow, name, defaults)
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


def _check_device(device: torch.device) -> None:
    if device.type not in FUSED_DEVICES:
        raise RuntimeError(
            f"SophiaG fused=True supports devices {FUSED_DEVICES}, not {device.type!r}"
        )


def fused_sophia_g(
    group: DeviceGroup,
    hyper: Hyperparameters,
    *,
    hessian_scales: list[Tensor] | None = None,
    mu_dtype: str | None = None,
    hessian_dtype: str | None = None,
    seed: int = 0,
) -> list[Tensor]:
    """The fused body on one (device, dtype); returns win counts.

    ``mu_dtype``, ``hessian_dtype`` (canonical names or ``None``) and ``seed``
    are the group's narrow state (:mod:`sophia.narrow`); ``hessian_scales``
    the block8 scales, one float32 tensor per tensor of ``group``. The step
    index of each tensor is its ``group.state_steps`` entry (before this
    step's increment).
    """
    device, dtype = group.device, group.dtype
    _check_device(device)
    form = narrow_form(group, hessian_scales, mu_dtype, hessian_dtype, seed)
    if form is not None:
        return _fused_narrow(group, hyper, form)
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


def _fused_narrow(group: DeviceGroup, hyper: Hyperparameters, form: NarrowForm) -> list[Tensor]:
    """:func:`fused_sophia_g` over narrow state: the native op, or the compiled narrow kernel."""
    device, dtype = group.device, group.dtype
    coeffs = hyper.coefficients(compute_dtype(dtype), device)
    native = None
    if device.type == "cpu" and dtype in _NATIVE_DTYPES:
        native = _native.fused_step_narrow_op()
    scales = form.hessian_scales if form.block8 else [None] * len(group.params)
    counts: list[Tensor] = []
    whole: list[int] = []
    small: list[int] = []
    with torch.no_grad():
        for i, xs in enumerate(zip(group.params, group.grads, group.exp_avgs, group.hessians)):
            n = xs[0].numel()
            if n == 0:
                continue
            if not all(x.is_contiguous() for x in xs):
                small.append(i)
            elif native is not None or n >= _PACK_BELOW:
                whole.append(i)
            else:
                small.append(i)
        lists = (group.params, group.grads, group.exp_avgs, group.hessians)
        if native is not None and whole:
            tensors = [[xs[i] for i in whole] for xs in lists]
            block_scales = [scales[i] for i in whole] if form.block8 else []
            steps = [group.state_steps[i] for i in whole] if form.stochastic_mu else []
            coeff_vector = torch.stack(coeffs)
            counts.append(
                native(*tensors, block_scales, steps, coeff_vector, form.seed, form.stochastic_mu)
            )
        elif whole:
            counts += _compiled_narrow(group, whole, form, scales, coeffs)
        if small:
            counts.append(_packed_narrow(group, small, form, scales, coeffs))
    return counts


def _compiled_narrow(
    group: DeviceGroup,
    indices: list[int],
    form: NarrowForm,
    scales: list[Tensor | None],
    coeffs: tuple[Tensor, ...],
) -> list[Tensor]:
    """Large contiguous tensors through the compiled narrow kernel, in flat slices."""
    device = group.device
    steps = [group.state_steps[i] for i in indices]
    keys = mu_keys(steps, form.seed, device) if form.stochastic_mu else None
    first = torch.zeros((), dtype=torch.int64, device=device)
    no_scale = torch.zeros(0, dtype=torch.float32, device=device)
    i0 = indices[0]
    kernel = compiled_narrow_kernel(
        group.dtype, group.exp_avgs[i0].dtype, group.hessians[i0].dtype, form
    )
    counts = []
    for j, i in enumerate(indices):
        flat = [x[i].view(-1) for x in (group.params, group.grads, group.exp_avgs, group.hessians)]
        scale = scales[i] if form.block8 else no_scale
        key = keys[j] if keys is not None else first
        for start in range(0, flat[0].numel(), _KERNEL_SLICE):
            piece = [x[start : start + _KERNEL_SLICE] for x in flat]
            offset = first if start == 0 else torch.full_like(first, start)
            # torch.compile specialises sizes 0 and 1: those go through the eager expression
            body = kernel if piece[0].numel() > 1 else fused_update_narrow
            extra = {} if body is kernel else _eager_forms(form)
            counts.append(body(*piece, scale, key, offset, *coeffs, **extra))
    return counts


def _eager_forms(form: NarrowForm) -> dict[str, Any]:
    """The form arguments an uncompiled call passes (a compiled copy has them as defaults)."""
    return {"stochastic_mu": form.stochastic_mu, "block8": form.block8}


def _packed_narrow(
    group: DeviceGroup,
    indices: list[int],
    form: NarrowForm,
    scales: list[Tensor | None],
    coeffs: tuple[Tensor, ...],
) -> Tensor:
    """Small (or non-contiguous) tensors through one narrow call on flat copies.

    Block8 codes are decoded into the copy of ``h`` (small tensors: the copy
    is made anyway), so the call reads float32 ``h``; each element carries its
    coordinate and, for stochastic rounding, its tensor's key.
    """
    device = group.device
    lists = (group.params, group.grads, group.exp_avgs, group.hessians)
    params, grads, ms, hs = ([xs[i] for i in indices] for xs in lists)
    if form.block8:
        hs = [_narrow.decode_block8(h, scales[i]) for h, i in zip(hs, indices)]
    flat_p, flat_g, flat_m, flat_h = (
        torch.cat([x.reshape(-1) for x in xs]) for xs in (params, grads, ms, hs)
    )
    sizes = [x.numel() for x in params]
    zero = torch.zeros((), dtype=torch.int64, device=device)
    key, first = zero, zero
    if form.stochastic_mu:
        steps = [group.state_steps[i] for i in indices]
        key, first = packed_coordinates(mu_keys(steps, form.seed, device), sizes)
    unpacked = form._replace(block8=False)
    n = flat_p.numel()
    if 1 < n < 2**31:
        kernel = compiled_narrow_kernel(group.dtype, flat_m.dtype, flat_h.dtype, unpacked)
        wins = kernel(flat_p, flat_g, flat_m, flat_h, zero, key, first, *coeffs)
    else:  # torch.compile specialises sizes 0 and 1: those go through the eager expression
        wins = fused_update_narrow(
            flat_p, flat_g, flat_m, flat_h, zero, key, first, *coeffs, **_eager_forms(unpacked)
        )
    torch._foreach_copy_(params, [v.view(x.shape) for v, x in zip(flat_p.split(sizes), params)])
    torch._foreach_copy_(ms, [v.view(x.shape) for v, x in zip(flat_m.split(sizes), ms)])
    return wins


def sophia_g_under_compile(
    group: DeviceGroup,
    hyper: Hyperparameters,
    *,
    hessian_scales: list[Tensor] | None = None,
    mu_dtype: str | None = None,
    hessian_dtype: str | None = None,
    seed: int = 0,
) -> list[Tensor]:
    """Every body inside an outer ``torch.compile``: :func:`fused_update`, traced there.

    With narrow state (arguments as :func:`fused_sophia_g`'s), its narrow form.
    """
    coeffs = hyper.coefficients(compute_dtype(group.dtype), group.device)
    tensors = list(zip(group.params, group.grads, group.exp_avgs, group.hessians))
    form = narrow_form(group, hessian_scales, mu_dtype, hessian_dtype, seed)
    if form is None:
        # viewed here whatever has_complex says, as the fused expression needs real tensors
        return [fused_update(*(real_view(x) for x in xs), *coeffs) for xs in tensors]
    keys = mu_keys(group.state_steps, form.seed, group.device) if form.stochastic_mu else None
    zero = torch.zeros((), dtype=torch.int64, device=group.device)
    counts = []
    for i, xs in enumerate(tensors):
        scale = form.hessian_scales[i] if form.block8 else zero
        key = keys[i] if keys is not None else zero
        views = (real_view(x) for x in xs)
        counts.append(fused_update_narrow(*views, scale, key, zero, *coeffs, **_eager_forms(form)))
    return counts

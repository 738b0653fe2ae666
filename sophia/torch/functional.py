r"""Functional SophiaG for PyTorch: for-loop, foreach and fused implementations.

:func:`sophia_g` (alias :func:`sophiag`) is the functional form of
:class:`sophia.torch.SophiaG`, split the way ``torch.optim.adamw`` is: one
dispatcher and three bodies,

* ``_single_tensor_sophia_g``: a Python loop over the tensors,
* ``_multi_tensor_sophia_g``: ``torch._foreach_*`` kernels per (device, dtype),
* ``_fused_sophia_g``: one ``torch.compile``-d kernel per tensor, compiled once
  (dynamic shapes) per dtype and cached; it reads ``param, grad, exp_avg,
  hessian`` and writes ``param, exp_avg`` in one pass.

All three follow the arithmetic contract of :mod:`sophia.spec` to the bit:
the math runs in the compute dtype (float32 for float32/bfloat16/float16,
float64 for float64), scalars are rounded to it first, derived scalars
(``1 - b1``, ``rho * bs``) are computed in it, ``eps`` is floored at its
smallest normal number, and every operation is rounded on its own (no
``addcmul``/``lerp``/``alpha=`` forms, which may use fused multiply-adds).
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, _default_to_fused_or_foreach

from sophia import spec

__all__ = ["hessian_ema", "sophia_g", "sophiag"]

_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
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
    """The for-loop body: one tensor at a time, two temporaries per tensor."""
    del capturable, has_complex  # every path is host-sync free; complex is viewed per tensor
    n_win = None
    coeffs: dict[tuple[torch.dtype, torch.device], tuple[Scalar, ...]] = {}
    for i in range(len(params)):
        param, grad, m, h = _real(params[i], grads[i], exp_avgs[i], hessians[i])
        state_steps[i] += 1
        cd = compute_dtype(param.dtype)
        key = (cd, param.device)
        if key not in coeffs:
            coeffs[key] = _coefficients(
                cd,
                param.device,
                lr=lr,
                beta1=beta1,
                rho=rho,
                bs=bs,
                weight_decay=weight_decay,
                eps=eps,
            )
        b1, omb1, rho_bs, eps_c, wd, lr_c = coeffs[key]

        t = param if param.dtype == cd else param.to(cd)
        g = grad.to(cd)
        if maximize:
            g = torch.neg(g)
        # m <- b1 m + (1 - b1) g, each product and the sum rounded on their own
        mc = m if m.dtype == cd else m.to(cd)
        buf = torch.mul(g, omb1)
        mc.mul_(b1).add_(buf)
        # den <- rho bs max(h, 0) + eps; r <- min(|m| / den, 1)
        torch.clamp_min(h.to(cd), 0, out=buf)
        buf.mul_(rho_bs).add_(eps_c)
        r = torch.abs(mc).div_(buf).clamp_max_(1)
        wins = (r < 1).sum()
        n_win = wins if n_win is None else n_win + wins.to(n_win.device)
        # u <- sign(m) r + wd theta; theta <- theta - lr u
        r.mul_(torch.sign(mc, out=buf))
        r.add_(torch.mul(t, wd, out=buf))
        t.sub_(r.mul_(lr_c))
        if t is not param:
            param.copy_(t)
        if mc is not m:
            m.copy_(mc)
    return n_win if n_win is not None else torch.zeros((), dtype=torch.int64)


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
    """The foreach body: ``torch._foreach_*`` kernels on each (device, dtype) bucket."""
    del capturable
    if len(params) == 0:
        return torch.zeros((), dtype=torch.int64)
    out_device = params[0].device
    n_win = torch.zeros((), dtype=torch.int64, device=out_device)
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, hessians, state_steps]  # type: ignore[list-item]
    )
    for (device, dtype), ((d_params, d_grads, d_ms, d_hs, d_steps), _) in grouped.items():
        d_params, d_grads, d_ms, d_hs = (list(x) for x in (d_params, d_grads, d_ms, d_hs))
        if has_complex:
            d_params, d_grads, d_ms, d_hs = (
                [torch.view_as_real(x) if torch.is_complex(x) else x for x in xs]
                for xs in (d_params, d_grads, d_ms, d_hs)
            )
        torch._foreach_add_(d_steps, 1)
        cd = compute_dtype(dtype)
        b1, omb1, rho_bs, eps_c, wd, lr_c = _coefficients(
            cd, device, lr=lr, beta1=beta1, rho=rho, bs=bs, weight_decay=weight_decay, eps=eps
        )
        low = d_params[0].dtype != cd
        ts = [x.to(cd) for x in d_params] if low else d_params
        ms = [x.to(cd) for x in d_ms] if low else d_ms
        gs = [x.to(cd) for x in d_grads] if d_grads[0].dtype != cd else d_grads
        hs = [x.to(cd) for x in d_hs] if d_hs[0].dtype != cd else d_hs
        if maximize:
            gs = torch._foreach_neg(gs)
        buf = torch._foreach_mul(gs, omb1)
        torch._foreach_mul_(ms, b1)
        torch._foreach_add_(ms, buf)
        del buf
        den = torch._foreach_clamp_min(hs, 0.0)
        torch._foreach_mul_(den, rho_bs)
        torch._foreach_add_(den, eps_c)
        r = torch._foreach_abs(ms)
        torch._foreach_div_(r, den)
        torch._foreach_clamp_max_(r, 1.0)
        for x in r:
            n_win = n_win + (x < 1).sum().to(out_device)
        # den is free: reuse it for sign(m), then for wd * theta
        torch._foreach_copy_(den, ms)
        torch._foreach_sign_(den)
        torch._foreach_mul_(r, den)
        torch._foreach_copy_(den, ts)
        torch._foreach_mul_(den, wd)
        torch._foreach_add_(r, den)
        del den
        torch._foreach_mul_(r, lr_c)
        torch._foreach_sub_(ts, r)
        if low:
            torch._foreach_copy_(d_params, ts)
            torch._foreach_copy_(d_ms, ms)
    return n_win


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
    sign: Tensor,
) -> Tensor:
    """One tensor's update as a pure expression, for ``torch.compile`` to fuse into one loop.

    ``sign`` is ``-1`` for ``maximize`` and ``1`` otherwise; multiplying by it
    is an exact negation, and keeping it a tensor avoids a second compile.
    """
    cd = compute_dtype(param.dtype)
    t = param.to(cd)
    g = grad.to(cd) * sign
    mc = m.to(cd) * b1 + g * omb1
    den = torch.clamp_min(h.to(cd), 0) * rho_bs + eps
    r = torch.clamp_max(torch.abs(mc) / den, 1)
    u = torch.sign(mc) * r + t * wd
    param.copy_(t - u * lr)
    m.copy_(mc)
    return (r < 1).sum()


_FUSED_KERNELS: dict[torch.dtype, Any] = {}


def _fused_kernel(dtype: torch.dtype) -> Any:
    """The compiled kernel for parameters of ``dtype``, built on first use and cached.

    Each dtype gets its own copy of the code object, so that dynamo's
    per-function recompile limit counts each dtype on its own and one dtype
    never evicts another's compiled graph.
    """
    kernel = _FUSED_KERNELS.get(dtype)
    if kernel is None:
        name = f"_fused_body_{str(dtype).replace('torch.', '')}"
        code = _fused_body.__code__.replace(co_name=name)
        fn = types.FunctionType(code, _fused_body.__globals__, name)
        kernel = _FUSED_KERNELS[dtype] = torch.compile(fn, dynamic=True, fullgraph=True)
    return kernel


#: Device types the compiled kernel supports (torch.compile's inductor backends).
FUSED_DEVICES = ("cpu", "cuda", "xpu")


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
    """The fused body: one compiled pass per tensor (read p, g, m, h; write p, m)."""
    del capturable
    if len(params) == 0:
        return torch.zeros((), dtype=torch.int64)
    # inside an outer torch.compile (e.g. of SophiaG.step) the body is traced and fused there
    compiling = torch.compiler.is_compiling()
    out_device = params[0].device
    n_win = torch.zeros((), dtype=torch.int64, device=out_device)
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, hessians, state_steps]  # type: ignore[list-item]
    )
    for (device, dtype), ((d_params, d_grads, d_ms, d_hs, d_steps), _) in grouped.items():
        if not compiling and device.type not in FUSED_DEVICES:
            raise RuntimeError(
                f"SophiaG fused=True supports devices {FUSED_DEVICES}, not {device.type!r}"
            )
        torch._foreach_add_(d_steps, 1)
        cd = compute_dtype(dtype)
        coeffs = _coefficients(
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
        sign = torch.full((), -1.0 if maximize else 1.0, dtype=cd, device=device)
        kernel = _fused_body if compiling else _fused_kernel(dtype)
        for p, g, m, h in zip(d_params, d_grads, d_ms, d_hs):
            if has_complex:
                p, g, m, h = _real(p, g, m, h)
            if p.numel() <= 1 and not compiling:
                # torch.compile specialises sizes 0 and 1; those tensors take the eager body
                n_win = n_win + _fused_body(p, g, m, h, *coeffs, sign).to(out_device)
                continue
            if p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and h.is_contiguous():
                p, g, m, h = (x.view(-1) for x in (p, g, m, h))
            if compiling:
                n_win = n_win + kernel(p, g, m, h, *coeffs, sign).to(out_device)
            else:
                with torch.no_grad():  # one compiled graph whatever the caller's grad mode
                    n_win = n_win + kernel(p, g, m, h, *coeffs, sign).to(out_device)
    return n_win


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
    The Hessian EMA is not touched (see :func:`hessian_ema`).

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
    return func(
        params,
        grads,
        exp_avgs,
        hessians,
        state_steps,
        lr=lr,
        beta1=beta1,
        rho=rho,
        bs=bs,
        weight_decay=weight_decay,
        eps=eps,
        maximize=maximize,
        capturable=capturable,
        has_complex=has_complex,
    )


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

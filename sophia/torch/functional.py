r"""Functional SophiaG for PyTorch: the dispatcher, the for-loop and foreach bodies, the EMA of h.

:func:`sophia_g` is the functional form of :class:`sophia.torch.SophiaG`,
split the way ``torch.optim.adamw`` is: the dispatcher decides once (DTensor
shards, the implementation, an empty step, an outer ``torch.compile``) and
hands the tensors to one of three bodies that hold only the math:

* :func:`_single_tensor_sophia_g`: a Python loop over the tensors, a few eager
  kernels each into two reused buffers,
* :func:`_multi_tensor_sophia_g`: ``torch._foreach_*`` kernels per (device, dtype),
* :func:`sophia.torch._fused.fused_sophia_g`: one pass per tensor, native or compiled.

On CPU the first two run block by block (:mod:`sophia.torch._blocks`). All
follow the arithmetic contract of :mod:`sophia.spec` to the bit: the math runs
in the compute dtype, every scalar is rounded to it first
(:mod:`sophia.torch._scalars`), and every operation is rounded on its own (no
``addcmul``/``lerp``/``alpha=`` forms, which may use fused multiply-adds). The
two exact rewrites all bodies share are explained in
:func:`sophia.torch._fused.fused_update`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, _default_to_fused_or_foreach

from sophia import narrow
from sophia.torch import _dtensor, _fused
from sophia.torch._blocks import (
    BatchScratch,
    DeviceGroup,
    Workspace,
    batches,
    batches_with_origins,
    device_groups,
    flat_slices,
)
from sophia.torch._narrow_step import (
    check_state_dtypes,
    decoded_hessian,
    is_narrow,
    momentum_key,
    narrow_hessian_emas,
    store_momenta,
    store_momentum,
)
from sophia.torch._scalars import (
    Hyperparameters,
    Scalar,
    compute_dtype,
    ema_rates,
    real_view,
)
from sophia.torch._wins import count_wins, total_wins

__all__ = ["hessian_ema", "sophia_g"]


def check_not_fused_and_foreach(fused: bool | None, foreach: bool | None) -> None:
    """Raises when both implementations are asked for, as torch's optimizers do."""
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


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
    mu_dtype: str | None = None,
    hessian_dtype: str | None = None,
    seed: int = 0,
    hessian_scales: list[Tensor] | None = None,
) -> Tensor:
    r"""Functional API that performs one SophiaG step in place (see :class:`sophia.torch.SophiaG`).

    Updates ``params`` and ``exp_avgs`` as :func:`sophia.spec.sophia_update`
    does, in the compute dtype of :mod:`sophia.spec`, and increments
    ``state_steps``. The Hessian EMA is not touched (see :func:`hessian_ema`).
    DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism) are
    updated shard by shard on each rank, their states must be sharded like
    them, and the returned win count is the global one.

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
      fused: use the single-pass kernel.
      has_complex: whether any tensor is complex (viewed as real pairs).
      lr: learning rate (float or 0-dim tensor).
      beta1: momentum EMA rate.
      rho: clipping scale.
      bs: number of labels behind each Hessian estimate.
      weight_decay: decoupled weight decay.
      eps: denominator floor (raised to the compute dtype's smallest normal).
      maximize: ascend instead of descend.
      mu_dtype: the form ``exp_avgs`` are stored in (canonical names of
        :mod:`sophia.narrow`: ``None``, ``"float32"``, ``"bfloat16"``); the
        tensors must already have its dtype (see :class:`sophia.torch.SophiaG`).
      hessian_dtype: the form of ``hessians`` (also ``"block8"``: int8 codes).
      seed: the stochastic rounding's seed; each tensor's step index is its
        ``state_steps`` entry before the increment.
      hessian_scales: with ``hessian_dtype="block8"``, each Hessian's float32
        block scales.

    Returns:
      The number of coordinates with ``r < 1`` (0-dim int64 tensor on the
      first parameter's device; no host synchronisation).
    """
    lists = (params, grads, exp_avgs, hessians, state_steps)
    if hessian_dtype == narrow.BLOCK8 and (
        hessian_scales is None or len(hessian_scales) != len(params)
    ):
        raise ValueError("sophia_g: hessian_dtype='block8' needs one hessian_scales per parameter")
    _dtensor.check_forms(params, mu_dtype, hessian_dtype)
    if any(_dtensor.is_dtensor(p) for p in params):
        return _dtensor.on_local_shards(
            sophia_g,
            *lists,
            foreach=foreach,
            capturable=capturable,
            fused=fused,
            has_complex=has_complex,
            lr=lr,
            beta1=beta1,
            rho=rho,
            bs=bs,
            weight_decay=weight_decay,
            eps=eps,
            maximize=maximize,
            mu_dtype=mu_dtype,
            hessian_dtype=hessian_dtype,
            seed=seed,
        )
    if fused is None and foreach is None:
        _, foreach = _default_to_fused_or_foreach(params, False, use_fused=False)
    check_not_fused_and_foreach(fused, foreach)
    if not torch.compiler.is_compiling() and not all(isinstance(t, Tensor) for t in state_steps):
        raise RuntimeError("`state_steps` must be a list of 0-dim tensors")
    if not params:
        return torch.zeros((), dtype=torch.int64)
    hyper = Hyperparameters(
        lr, beta1, rho, bs, weight_decay, eps, maximize, mu_dtype, hessian_dtype, seed
    )
    if is_narrow(hyper) and not torch.compiler.is_compiling():
        check_state_dtypes(params, exp_avgs, hessians, hyper)
    if torch.compiler.is_compiling():
        # inside an outer torch.compile (e.g. of SophiaG.step) the step is traced and fused there
        body = _fused.sophia_g_under_compile
    elif fused:
        body = _fused.fused_sophia_g
    elif foreach:
        body = _multi_tensor_sophia_g
    else:
        return _single_tensor_sophia_g(*lists, hyper, hessian_scales)
    counts: list[Tensor] = []
    narrow_state = is_narrow(hyper)
    for group in device_groups(list(lists), has_complex, narrow_state, hessian_scales):
        if narrow_state and body is not _multi_tensor_sophia_g:
            # the fused bodies' interface to the narrow state (the foreach body reads hyper)
            counts += body(
                group,
                hyper,
                hessian_scales=group.hessian_scales,
                mu_dtype=mu_dtype,
                hessian_dtype=hessian_dtype,
                seed=seed,
            )
        else:
            counts += body(group, hyper)
        torch._foreach_add_(group.state_steps, 1)
    return total_wins(counts, params[0].device)


def _single_tensor_update(
    param: Tensor, grad: Tensor, m: Tensor, h: Tensor, ws: Workspace
) -> Tensor:
    """One tensor (or block) updated in place with eager kernels and two buffers.

    Returns the number of coordinates with ``r < 1`` (see :func:`sophia.torch._wins.count_wins`).
    """
    b1, signed_one_minus_b1, rho_bs, eps, weight_decay, lr = ws.coeffs
    compute = ws.dtype
    t = param if param.dtype == compute else param.to(compute)
    mc = m if m.dtype == compute else m.to(compute)
    g = grad if grad.dtype == compute else grad.to(compute)
    hc = h if h.dtype == compute else h.to(compute)
    tmp, q = ws.scratch(t)
    # m <- b1 m + (1 - b1) g, each product and the sum rounded on their own
    mc.mul_(b1).add_(torch.mul(g, signed_one_minus_b1, out=tmp))
    # den <- rho bs max(h, 0) + eps
    den = torch.clamp_min(hc, 0, out=tmp).mul_(rho_bs).add_(eps)
    # q <- (m + 0) / den, whose clamp to [-1, 1] is sign(m) r (see fused_update)
    torch.add(mc, ws.zero, out=q).div_(den)
    wins = count_wins(torch.abs(q, out=tmp), ws.one, tmp)
    # theta <- theta - lr (sign(m) r + weight_decay theta)
    q.clamp_(-1, 1).add_(torch.mul(t, weight_decay, out=tmp))
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
    hyper: Hyperparameters,
    hessian_scales: list[Tensor] | None = None,
) -> Tensor:
    """The for-loop body: one tensor at a time (on CPU one block at a time), two buffers."""
    counts: list[Tensor] = []
    spaces: dict[tuple[torch.dtype, torch.device], Workspace] = {}
    narrow_state = is_narrow(hyper)
    for i in range(len(params)):
        # complex tensors are viewed as real pairs one by one, so has_complex is not needed
        param, grad, m, h = (real_view(x) for x in (params[i], grads[i], exp_avgs[i], hessians[i]))
        key = momentum_key(hyper, state_steps[i]) if narrow_state else None
        state_steps[i] += 1
        if param.numel() == 0:
            continue
        compute = compute_dtype(param.dtype)
        ws = spaces.get((compute, param.device))
        if ws is None:
            coeffs = hyper.coefficients(compute, param.device)
            ws = spaces[(compute, param.device)] = Workspace(compute, param.device, coeffs)
        if not narrow_state:
            for piece in flat_slices((param, grad, m, h), ws.block):
                counts.append(_single_tensor_update(*piece, ws))
            continue
        scale = hessian_scales[i] if hessian_scales is not None else None
        offset = 0
        for p_i, g_i, m_i, h_i in flat_slices((param, grad, m, h), ws.block):
            mc = m_i if m_i.dtype == compute else m_i.to(compute)
            hc = decoded_hessian(h_i, scale, offset, compute)
            counts.append(_single_tensor_update(p_i, g_i, mc, hc, ws))
            store_momentum(m_i, mc, hyper.mu_dtype, key, offset)
            offset += p_i.numel()
    return total_wins(counts, params[0].device)


def _foreach_op_into(
    op: str, src: list[Tensor], other: Tensor | float, into: list[Tensor] | None
) -> list[Tensor]:
    """``torch._foreach_<op>(src, other)``, written into the buffers ``into`` if given.

    Into buffers it takes a copy and an in-place op, except for a single tensor
    (a block of a large one, most of the work on CPU), where the op's ``out=``
    form is that same kernel without the copy.
    """
    if into is None:
        return getattr(torch, f"_foreach_{op}")(src, other)
    if len(src) == 1:
        getattr(torch, op)(src[0], other, out=into[0])
        return into
    torch._foreach_copy_(into, src)
    getattr(torch, f"_foreach_{op}_")(into, other)
    return into


def _foreach_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    ws: Workspace,
    scratch: BatchScratch | None = None,
) -> list[Tensor]:
    """The update of a list of tensors of one device and dtype with ``torch._foreach_*`` ops.

    ``scratch`` is the CPU path's block buffers for the batch: each new value
    is copied into them and computed in place, which on CPU is cheaper than
    allocating (fresh pages from the system on every block), and the count and
    the clamp run once on the span the batch's quotients tile. Without it the
    foreach ops allocate, as on GPU. Returns win counts (see
    :func:`sophia.torch._wins.count_wins`): one per batch with ``scratch``,
    else one per tensor.
    """
    b1, signed_one_minus_b1, rho_bs, eps, weight_decay, lr = ws.coeffs
    compute = ws.dtype
    low = params[0].dtype != compute
    # a narrow body passes m already in the compute dtype
    low_m = exp_avgs[0].dtype != compute
    tc = [x.to(compute) for x in params] if low else params
    mc = [x.to(compute) for x in exp_avgs] if low_m else exp_avgs
    gc = [x if x.dtype == compute else x.to(compute) for x in grads]
    hc = [x if x.dtype == compute else x.to(compute) for x in hessians]
    tmp, quotient = (scratch.tmp, scratch.quotient) if scratch is not None else (None, None)
    # m <- b1 m + (1 - b1) g, each product and the sum rounded on their own
    a = _foreach_op_into("mul", gc, signed_one_minus_b1, tmp)
    torch._foreach_mul_(mc, b1)
    torch._foreach_add_(mc, a)
    # den <- rho bs max(h, 0) + eps
    den = _foreach_op_into("clamp_min", hc, 0.0, tmp)
    torch._foreach_mul_(den, rho_bs)
    torch._foreach_add_(den, eps)
    # q <- (m + 0) / den, whose clamp to [-1, 1] is sign(m) r (see fused_update)
    q = _foreach_op_into("add", mc, ws.zero, quotient)
    torch._foreach_div_(q, den)
    if scratch is not None:
        # the batch's quotients tile one span: count and clamp them in one go
        span = scratch.tmp_span
        wins = [count_wins(torch.abs(scratch.quotient_span, out=span), ws.one, span)]
        scratch.quotient_span.clamp_(-1, 1)
    else:
        wins = [count_wins(torch.abs(x, out=d), ws.one, d) for x, d in zip(q, den)]
        torch._foreach_clamp_min_(q, -1.0)
        torch._foreach_clamp_max_(q, 1.0)
    del a, den
    # theta <- theta - lr (sign(m) r + weight_decay theta)
    torch._foreach_add_(q, _foreach_op_into("mul", tc, weight_decay, tmp))
    torch._foreach_mul_(q, lr)
    torch._foreach_sub_(tc, q)
    if low:
        torch._foreach_copy_(params, tc)
    if low_m:
        torch._foreach_copy_(exp_avgs, mc)
    return wins


def _multi_tensor_sophia_g(group: DeviceGroup, hyper: Hyperparameters) -> list[Tensor]:
    """The foreach body on one (device, dtype), by blocks on CPU; returns win counts."""
    compute = compute_dtype(group.dtype)
    ws = Workspace(compute, group.device, hyper.coefficients(compute, group.device))
    lists = [group.params, group.grads, group.exp_avgs, group.hessians]
    counts: list[Tensor] = []
    if not is_narrow(hyper):
        for batch in batches(lists, ws.block):
            counts += _foreach_update(*batch, ws, ws.batch_scratch(batch[0]))
        return counts
    # the dispatcher increments the counters after the body: these are the steps' indices
    keys = [momentum_key(hyper, step) for step in group.state_steps]
    scales = group.hessian_scales
    for (ps, gs, ms, hs), origins in batches_with_origins(lists, ws.block):
        mcs = [m if m.dtype == compute else m.to(compute) for m in ms]
        hcs = [
            decoded_hessian(h, None if scales is None else scales[i], offset, compute)
            for h, (i, offset) in zip(hs, origins)
        ]
        counts += _foreach_update(ps, gs, mcs, hcs, ws, ws.batch_scratch(ps))
        store_momenta(ms, mcs, hyper.mu_dtype, keys, origins)
    return counts


def hessian_ema(
    hessians: list[Tensor],
    estimates: list[Tensor],
    *,
    beta2: Scalar,
    foreach: bool | None = None,
    hessian_dtype: str | None = None,
    param_dtypes: list[torch.dtype] | None = None,
    state_steps: list[Tensor] | None = None,
    seed: int = 0,
    hessian_scales: list[Tensor] | None = None,
) -> None:
    r"""The Hessian EMA of :func:`sophia.spec.hessian_ema`, in place.

    Args:
      hessians: the Hessian EMAs, updated in place (complex ones as real pairs).
      estimates: the estimates :math:`\hat h`, one per Hessian, of its shape
        (or of its real view for a complex Hessian); any floating dtype.
      beta2: the Hessian EMA rate (float or 0-dim tensor).
      foreach: use ``torch._foreach_*`` kernels (default: as torch chooses).
      hessian_dtype: the form the Hessians are stored in (:mod:`sophia.narrow`;
        ``None``: their parameters' dtype). A narrow form is written one
        tensor at a time, whatever ``foreach`` says.
      param_dtypes: with a form, each parameter's dtype, whose compute dtype
        the EMA runs in.
      state_steps: with a stochastic form, each parameter's step counter: the
        index of the step this refresh starts.
      seed: the stochastic rounding's seed.
      hessian_scales: with ``"block8"``, each Hessian's block scales (updated too).
    """
    if len(hessians) != len(estimates):
        raise ValueError(f"hessian_ema: {len(hessians)} Hessians but {len(estimates)} estimates")
    hs = [real_view(h) for h in hessians]
    es = [real_view(e) for e in estimates]
    for h, e in zip(hs, es):
        if h.shape != e.shape:
            raise ValueError(
                f"hessian_ema: estimate of shape {tuple(e.shape)} for a Hessian of shape "
                f"{tuple(h.shape)}"
            )
    if hessian_dtype is not None:
        narrow_hessian_emas(
            hs, es, beta2, hessian_dtype, param_dtypes, state_steps, seed, hessian_scales
        )
        return
    if foreach is None:
        _, foreach = _default_to_fused_or_foreach(hs, False, use_fused=False)
    if not foreach:
        for h, e in zip(hs, es):
            compute = compute_dtype(h.dtype)
            b2, one_minus_b2 = ema_rates(beta2, compute, h.device)
            hc = h if h.dtype == compute else h.to(compute)
            hc.mul_(b2).add_(torch.mul(e.to(device=h.device, dtype=compute), one_minus_b2))
            if hc is not h:
                h.copy_(hc)
        return
    grouped = Optimizer._group_tensors_by_device_and_dtype([hs, es])  # type: ignore[list-item]
    for (device, dtype), ((d_hs, d_es), _) in grouped.items():
        compute = compute_dtype(dtype)
        b2, one_minus_b2 = ema_rates(beta2, compute, device)
        hc = [x.to(compute) for x in d_hs] if dtype != compute else list(d_hs)
        ec = torch._foreach_mul([x.to(device=device, dtype=compute) for x in d_es], one_minus_b2)
        torch._foreach_mul_(hc, b2)
        torch._foreach_add_(hc, ec)
        if dtype != compute:
            torch._foreach_copy_(list(d_hs), hc)

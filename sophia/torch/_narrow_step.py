"""The narrow state inside a step: ``h`` read decoded, ``m`` and ``h`` written in their forms.

The for-loop and foreach bodies run their math on ``m`` and ``h`` in the
compute dtype. With a narrow form (:mod:`sophia.narrow`) they read a piece's
``h`` through :func:`decoded_hessian` and an upcast ``m``, run the unchanged
update, and store the new momentum with :func:`store_momentum`; the update
itself has read the unrounded momentum, as the spec says. A piece is a whole
tensor or a flat slice of one, so the random bits and block scales are taken
at the piece's offset in its tensor. The Hessian EMA writes ``h`` with the
native op on the CPU (:mod:`sophia.torch._native`), elsewhere with
:func:`narrow_hessian_ema`, one tensor at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sophia import narrow
from sophia.torch import _narrow as tn
from sophia.torch import _native
from sophia.torch._scalars import Hyperparameters, Scalar, compute_dtype, ema_rates


def is_narrow(hyper: Hyperparameters) -> bool:
    """Whether either state has a form other than the parameter's dtype."""
    return hyper.mu_dtype is not None or hyper.hessian_dtype is not None


def check_state_dtypes(
    params: list[Tensor], exp_avgs: list[Tensor], hessians: list[Tensor], hyper: Hyperparameters
) -> None:
    """Raises ``ValueError`` where a state tensor is not in the dtype its form stores."""
    for i, (p, m, h) in enumerate(zip(params, exp_avgs, hessians)):
        for name, x, form in (
            ("exp_avgs", m, hyper.mu_dtype),
            ("hessians", h, hyper.hessian_dtype),
        ):
            want = tn.storage_dtype(form, p.dtype)
            if x.dtype != want:
                key = "mu_dtype" if name == "exp_avgs" else "hessian_dtype"
                raise ValueError(
                    f"sophia_g: {name}[{i}] is {x.dtype}, but {key}={form!r} stores {want} "
                    f"for a {p.dtype} parameter"
                )


def momentum_key(hyper: Hyperparameters, step: Tensor) -> int | Tensor | None:
    """The momentum stream's key for a tensor at ``step`` (its counter before the increment).

    ``None`` where ``m`` rounds to nearest (no random bits needed).
    """
    if hyper.mu_dtype not in tn.STOCHASTIC:
        return None
    return tn.stream_key(hyper.seed, step, narrow.STREAM_MU)


def decoded_hessian(h: Tensor, scale: Tensor | None, offset: int, compute: torch.dtype) -> Tensor:
    """A piece of ``h`` in the compute dtype; ``scale``: its whole tensor's block scales (block8).

    ``offset`` is the piece's first coordinate in its tensor, a block boundary.
    """
    if scale is None:
        return h if h.dtype == compute else h.to(compute)
    first = offset // narrow.BLOCK_SIZE
    scales = scale[first : first + narrow.block_count(h.numel())]
    if _native_reads(h, scales):
        op = _native.decode_block8_op()
        if op is not None:
            return op(h, scales).to(compute)
    return tn.decode_block8(h, scales).to(compute)


def _native_reads(codes: Tensor, scales: Tensor) -> bool:
    """Whether the native decode takes a piece: plain contiguous CPU tensors, not compiling."""
    return not torch.compiler.is_compiling() and all(
        type(x) in _PLAIN and x.device.type == "cpu" and x.is_contiguous() for x in (codes, scales)
    )


def store_momentum(
    m: Tensor, mc: Tensor, form: str | None, key: int | Tensor | None, offset: int
) -> None:
    """The new momentum ``mc`` (compute dtype) stored into ``m``, a piece at ``offset``.

    Stochastically for ``"bfloat16"`` (bits of ``key``), else rounded to nearest;
    nothing to do where ``mc`` is ``m`` itself (the form is the compute dtype).
    """
    if mc is m:
        return
    if form in tn.STOCHASTIC and _native_store([(m, mc, key, offset)]):
        return
    if form in tn.STOCHASTIC:
        assert key is not None
        bits = tn.bits_of_key(key, m.numel(), m.device, offset).view(m.shape)
        m.copy_(tn.round_bfloat16(mc.to(torch.float32), bits))
    else:
        m.copy_(mc)


def store_momenta(
    ms: list[Tensor],
    mcs: list[Tensor],
    form: str | None,
    keys: list[int | Tensor | None],
    origins: list[tuple[int, int]],
) -> None:
    """:func:`store_momentum` for a foreach batch: one pass over its pieces' values and bits.

    ``keys`` is the momentum key of each tensor, ``origins`` each piece's
    (tensor index, offset). The pieces' coordinates and keys are laid out
    flat, so the batch takes the same dozen kernels as one tensor.
    """
    pairs = [(m, mc, keys[i], off) for m, mc, (i, off) in zip(ms, mcs, origins) if mc is not m]
    if form in tn.STOCHASTIC and pairs and _native_store(pairs):
        return
    if len(pairs) <= 1 or form not in tn.STOCHASTIC:
        for m, mc, key, offset in pairs:
            store_momentum(m, mc, form, key, offset)
        return
    device = pairs[0][0].device
    sizes = [m.numel() for m, *_ in pairs]
    counts = torch.tensor(sizes, device=device)
    total = sum(sizes)
    key_list = [k if isinstance(k, Tensor) else torch.tensor(k) for *_, k, _ in pairs]
    per_key = torch.stack([k.to(device=device, dtype=torch.int64) for k in key_list])
    starts = [0]
    for size in sizes[:-1]:
        starts.append(starts[-1] + size)
    # coordinate of flat element e of piece j: e - start_j + offset_j
    shift = torch.tensor([off - st for (*_, off), st in zip(pairs, starts)], device=device)
    index = torch.arange(total, device=device) + shift.repeat_interleave(counts, output_size=total)
    bits = tn.bits_at(per_key.repeat_interleave(counts, output_size=total), index)
    flat = torch.cat([mc.reshape(-1).to(torch.float32) for _, mc, *_ in pairs])
    rounded = tn.round_bfloat16(flat, bits).split(sizes)
    targets = [m for m, *_ in pairs]
    torch._foreach_copy_(targets, [v.view(m.shape) for v, m in zip(rounded, targets)])


def _native_store(pairs: list[tuple[Tensor, Tensor, int | Tensor | None, int]]) -> bool:
    """Stores ``(m, mc, key, offset)`` pieces with the native op if it takes them all.

    It takes plain contiguous CPU tensors whose keys were read on the host
    (ints), outside ``torch.compile`` (the op has no fake kernel to trace);
    returns whether it ran (else nothing is written).
    """
    if torch.compiler.is_compiling() or not all(
        isinstance(key, int)
        and type(m) in _PLAIN
        and type(mc) in _PLAIN
        and m.device.type == "cpu"
        and mc.device.type == "cpu"
        and m.is_contiguous()
        and mc.is_contiguous()
        and m.dtype == torch.bfloat16
        and mc.dtype in (torch.float32, torch.float64)
        for m, mc, key, _ in pairs
    ):
        return False
    op = _native.store_bfloat16_op()
    if op is None:
        return False
    with torch.no_grad():
        op(
            [m for m, *_ in pairs],
            [mc.detach() for _, mc, *_ in pairs],
            [int(key) for *_, key, _ in pairs],  # type: ignore[arg-type]
            [int(offset) for *_, offset in pairs],
        )
    return True


def narrow_hessian_ema(
    h: Tensor,
    scale: Tensor | None,
    estimate: Tensor,
    rates: tuple[Scalar, Scalar],
    compute: torch.dtype,
    form: str,
    seed: int,
    step: Tensor | int,
) -> None:
    """``h <- b2 h + (1 - b2) h_hat`` in ``compute``, stored in ``form`` in place.

    ``h`` is the stored tensor (int8 codes with ``scale`` for block8, a real
    view for a complex parameter); ``rates`` are ``(b2, 1 - b2)`` in
    ``compute``; ``step`` is the index of the step this refresh starts.
    """
    b2, one_minus_b2 = rates
    hc = decoded_hessian(h, scale, 0, compute)
    new = hc * b2 + estimate.to(device=h.device, dtype=compute) * one_minus_b2
    stored = tn.encode(new, form, h.dtype, seed, step, narrow.STREAM_HESSIAN)
    if isinstance(stored, tuple):
        assert scale is not None
        h.copy_(stored[0])
        scale.copy_(stored[1])
    else:
        h.copy_(stored)


def narrow_hessian_emas(
    hs: list[Tensor],
    es: list[Tensor],
    beta2: Scalar,
    form: str,
    param_dtypes: list[torch.dtype] | None,
    state_steps: list[Tensor] | None,
    seed: int,
    scales: list[Tensor] | None,
) -> None:
    """:func:`sophia.torch.functional.hessian_ema` with ``hessian_dtype``.

    CPU tensors take the native op (:func:`sophia.torch._native.hessian_ema_narrow_op`),
    one call per compute dtype, where it is built; the others, and all where it
    is not, take :func:`narrow_hessian_ema` tensor by tensor. Both give the same bits.
    """
    k = len(hs)
    for name, xs, needed in (
        ("param_dtypes", param_dtypes, True),
        ("state_steps", state_steps, form in tn.STOCHASTIC),
        ("hessian_scales", scales, form == narrow.BLOCK8),
    ):
        if needed and (xs is None or len(xs) != k):
            raise ValueError(f"hessian_ema: hessian_dtype={form!r} needs one {name} per Hessian")
    assert param_dtypes is not None
    steps = state_steps if state_steps is not None else [0] * k
    blocks = scales if scales is not None else [None] * k
    cpu = any(h.device.type == "cpu" for h in hs) and not torch.compiler.is_compiling()
    op = _native.hessian_ema_narrow_op() if cpu else None
    native: dict[torch.dtype, list[int]] = {}
    for i, (h, e) in enumerate(zip(hs, es)):
        compute = compute_dtype(param_dtypes[i])
        if op is not None and _native_takes(h, e, blocks[i], steps[i], form):
            native.setdefault(compute, []).append(i)
            continue
        rates = ema_rates(beta2, compute, h.device)
        narrow_hessian_ema(h, blocks[i], e, rates, compute, form, seed, steps[i])
    for compute, idx in native.items():
        rates = ema_rates(beta2, compute, torch.device("cpu"))
        with torch.no_grad():
            op(
                [hs[i] for i in idx],
                [blocks[i] for i in idx] if form == narrow.BLOCK8 else [],
                [es[i].detach().contiguous() for i in idx],
                [_step_index(steps[i]) for i in idx],
                torch.stack([torch.as_tensor(r, dtype=compute) for r in rates]),
                int(seed) & narrow.MASK32,
            )


#: The Hessian dtype each form stores, as the native EMA reads it.
_NATIVE_STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16, narrow.BLOCK8: torch.int8}
#: The tensor types the native EMA takes (no subclasses).
_PLAIN = (Tensor, torch.nn.Parameter)
#: The estimate dtypes the native EMA reads.
_NATIVE_ESTIMATES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _native_takes(
    h: Tensor, e: Tensor, scale: Tensor | None, step: Tensor | int, form: str
) -> bool:
    """Whether the native EMA takes this Hessian: plain CPU tensors, ``h`` contiguous.

    Plain: a tensor subclass (a ``DTensor``'s local shards, a fake tensor) takes
    the eager code, whose ops the subclass knows how to run.
    """
    cpu = [h, e] + ([scale] if scale is not None else [])
    if isinstance(step, Tensor):
        cpu.append(step)
    return (
        all(type(x) in _PLAIN and x.device.type == "cpu" for x in cpu)
        and h.is_contiguous()
        and h.dtype == _NATIVE_STORAGE.get(form)
        and e.dtype in _NATIVE_ESTIMATES
        and (scale is None or (scale.is_contiguous() and scale.dtype == torch.float32))
    )


def _step_index(step: Tensor | int) -> int:
    """A step counter (CPU tensor or int) as the int it holds."""
    return int(step.item()) if isinstance(step, Tensor) else int(step)

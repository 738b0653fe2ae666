r"""Diagonal-Hessian estimators for SophiaG (GNB) and Sophia-H (Hutchinson), in PyTorch.

They mirror :mod:`sophia.jax.estimators` and return one estimate per
parameter, ready for :meth:`sophia.torch.SophiaG.update_hessian`
(``hessian=[...]``) or :func:`sophia.torch.functional.hessian_ema`. Estimates
are in the compute dtype of :mod:`sophia.spec` (float32 for bfloat16/float16
parameters) and complex parameters get estimates of their real view.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sophia.torch._dtensor import is_dtensor
from sophia.torch._scalars import compute_dtype, real_view

__all__ = ["gnb", "hutchinson", "sample_labels", "sampled_label_grads"]


def sample_labels(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Labels drawn from the model's own predictive distribution ``softmax(logits)``.

    One uniform number per row, mapped through the row's cumulative
    distribution (inverse-CDF sampling, in the compute dtype: float32, or
    float64 for float64 logits; one ``[rows, vocab]`` buffer, as
    ``torch.multinomial`` needs for its probabilities): one draw per row
    instead of ``torch.multinomial``'s exponential per class.
    Classes of probability 0 are never drawn.

    Args:
      logits: ``[..., vocab]`` unnormalised log-probabilities.
      generator: random generator of the draw (default: torch's global one).

    Returns:
      ``int64`` labels of shape ``logits.shape[:-1]``, on the logits' device.
    """
    vocab = logits.shape[-1]
    flat = logits.detach().reshape(-1, vocab)
    if flat.shape[0] == 0:
        return torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    compute = compute_dtype(flat.dtype)
    cdf = torch.softmax(flat.to(compute), dim=-1).cumsum_(dim=-1)
    u = torch.rand((flat.shape[0], 1), generator=generator, dtype=compute, device=flat.device)
    # class j owns [cdf[j-1], cdf[j]) of [0, total): an empty interval for p_j = 0
    draws = (cdf <= u * cdf[:, -1:]).sum(dim=-1).clamp_(max=vocab - 1)
    return draws.reshape(logits.shape[:-1])


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _select(logits: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``logits`` as ``[rows, vocab]`` rows, only those ``mask`` keeps; and the row index kept."""
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    if mask is None:
        return flat, None
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"mask: expected a tensor of shape {tuple(logits.shape[:-1])}, got "
            f"{type(mask).__name__}"
        )
    if tuple(mask.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"Invalid mask: shape {tuple(mask.shape)} (allowed: logits.shape[:-1] = "
            f"{tuple(logits.shape[:-1])}, True where the position enters the loss)"
        )
    if torch.is_complex(mask):
        raise ValueError(f"Invalid mask: dtype {mask.dtype} (allowed: bool, or 0/1 numbers)")
    keep = mask.reshape(-1).to(device=logits.device) != 0
    # boolean indexing, not a multiplication by the mask: a NaN or inf logit at a padded
    # position would survive `0 * loss`, and the sampled labels would use the random
    # stream differently from the same batch with those rows removed
    index = keep.nonzero().reshape(-1)
    return flat.index_select(0, index), index


def _sampled_label_grads(
    logits: Tensor,
    params: Sequence[Tensor],
    labels: Tensor | None,
    generator: torch.Generator | None,
    mask: Tensor | None,
    retain_graph: bool,
    average_across_ranks: bool | None,
) -> tuple[list[Tensor], int | Tensor]:
    """:func:`sampled_label_grads` and the label count behind it.

    The count is a Python int, or, when averaged across ranks, a 0-dim int64
    tensor of the count summed over ranks.
    """
    rows, index = _select(logits, mask)
    if average_across_ranks is None:
        average_across_ranks = _distributed()
    count = int(rows.shape[0])
    if rows.shape[0] == 0:
        out = [torch.zeros_like(p) for p in params]
    else:
        if labels is None:
            y = sample_labels(rows, generator)
        else:
            y = labels.reshape(-1).to(logits.device)
            if index is not None:
                y = y.index_select(0, index)
        rows = rows.to(compute_dtype(rows.dtype))  # float32 for bf16/f16 logits, as in JAX
        # with a mask under data parallelism the ranks hold different numbers of labels:
        # summing here and dividing by the global count gives the global mean's gradient
        by_sum = mask is not None and average_across_ranks
        loss = F.cross_entropy(rows, y, reduction="sum" if by_sum else "mean")
        grads = torch.autograd.grad(
            loss, list(params), retain_graph=retain_graph, allow_unused=True
        )
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is None and is_dtensor(p):
                # FSDP2 all-gathers sharded parameters outside autograd, so they are never
                # in the logits' graph: zeros here would silently become a zero Hessian
                raise ValueError(
                    f"sampled_label_grads: parameter {i} is a DTensor (placements "
                    f"{p.placements}) that the logits' graph does not reach, as with FSDP2's "
                    "fully_shard; refresh FSDP2 models with a backward of the loss against "
                    "sampled labels (sophia.torch.sample_labels) followed by "
                    "SophiaG.update_hessian(), which reads the reduce-scattered .grad"
                )
        out = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    if not average_across_ranks:
        return out, count
    total = torch.tensor(count, dtype=torch.int64, device=logits.device)
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    for g in out:
        torch.distributed.all_reduce(g, op=torch.distributed.ReduceOp.SUM)
        if mask is not None:
            g.div_(total.clamp_min(1))
        else:
            g.div_(torch.distributed.get_world_size())
    return out, total


def sampled_label_grads(
    logits: Tensor,
    params: Sequence[Tensor],
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    mask: Tensor | None = None,
    retain_graph: bool = True,
    average_across_ranks: bool | None = None,
) -> list[Tensor]:
    r"""Gradient of the mean cross-entropy against labels sampled from the model.

    :math:`\hat g = \nabla_\theta \frac1N \sum_i \ell(f_i(\theta), \hat y_i)`,
    :math:`\hat y \sim \mathrm{softmax}(f(\theta))`, computed with
    :func:`torch.autograd.grad` from an existing forward (``.grad`` untouched).
    The loss is formed in float32, as on the JAX side. With ``mask`` the sum
    runs over the masked-in positions only (labels are sampled there only, and
    ``N`` is their number): the result is that of the logits with the
    masked-out rows removed.

    Args:
      logits: ``[..., vocab]`` logits attached to the graph of ``params``.
      params: the parameters to differentiate.
      labels: labels to use instead of sampling, of shape ``logits.shape[:-1]``
        (values at masked-out positions are ignored, e.g. ``-100``).
      generator: generator of the label sampling.
      mask: ``logits.shape[:-1]``, True (nonzero) where the position enters the
        loss (e.g. ``attention_mask``, or ``labels != -100`` after the causal
        shift). Selecting the rows costs one host synchronisation.
      retain_graph: keep the graph so the training loss can be backpropagated
        through the same forward afterwards.
      average_across_ranks: all-reduce the gradient over the default process
        group (``None``: whenever ``torch.distributed`` is initialised). Without
        a mask the ranks' gradients are averaged, as DDP averages; with one, the
        result is the gradient of the mean over all ranks' masked-in positions.

    Returns:
      One gradient per parameter (zeros for parameters the logits do not use).
    """
    grads, _ = _sampled_label_grads(
        logits, params, labels, generator, mask, retain_graph, average_across_ranks
    )
    return grads


def _square(g: Tensor) -> Tensor:
    """``g * g`` of the real view of ``g``, in the compute dtype: an estimate from a gradient."""
    g = real_view(g)
    g = g.to(compute_dtype(g.dtype))
    return g * g


def _gnb_with_count(*args: Any) -> tuple[list[Tensor], int | Tensor]:
    """:func:`gnb` (arguments as :func:`_sampled_label_grads`) and its label count ``N``."""
    grads, count = _sampled_label_grads(*args)
    return [_square(g) for g in grads], count


def gnb(
    logits: Tensor,
    params: Sequence[Tensor],
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    mask: Tensor | None = None,
    retain_graph: bool = True,
    average_across_ranks: bool | None = None,
) -> list[Tensor]:
    r"""Gauss-Newton-Bartlett estimate of the diagonal Hessian (Sophia-G).

    :math:`\hat h = \hat g \odot \hat g` with :math:`\hat g` from
    :func:`sampled_label_grads`. By Bartlett's identity
    :math:`N\,\mathbb E[\hat h]` is the diagonal of the Gauss-Newton matrix of
    the mean loss over the ``N`` labels (``logits.numel() / vocab``, or the
    masked-in positions), which is why SophiaG divides by ``rho * bs * h`` with
    ``bs = N``. Costs one backward and no forward when ``logits`` come from the
    training forward.

    Args:
      logits: ``[..., vocab]`` logits attached to the graph of ``params``.
      params: the parameters to estimate at.
      labels: fixed labels instead of sampled ones (tests, cross-framework runs).
      generator: generator of the label sampling.
      mask: ``logits.shape[:-1]``, True (nonzero) where the position enters the
        loss; masked-out positions contribute exactly nothing (padding, the
        ``-100`` labels of a shifted causal target).
      retain_graph: keep the graph for a later backward of the training loss.
      average_across_ranks: average :math:`\hat g` over ranks before squaring
        (``None``: whenever ``torch.distributed`` is initialised), so every
        rank gets the same estimate and ``N`` is the global label count.

    Returns:
      ``h_hat``, one tensor per parameter, in the compute dtype.
    """
    args = (logits, params, labels, generator, mask, retain_graph, average_across_ranks)
    return _gnb_with_count(*args)[0]


def _rademacher_like(p: Tensor, generator: torch.Generator | None) -> Tensor:
    bits = torch.randint(0, 2, p.shape, generator=generator, device=p.device)
    return (bits * 2 - 1).to(p.dtype)


def hutchinson(
    loss: Tensor,
    params: Sequence[Tensor],
    generator: torch.Generator | None = None,
    *,
    grads: Sequence[Tensor] | None = None,
    retain_graph: bool = False,
) -> list[Tensor]:
    r"""Hutchinson estimate of the diagonal Hessian (Sophia-H): :math:`v \odot (\nabla^2 L\, v)`.

    Unbiased for :math:`\mathrm{diag}(\nabla^2 L)` with Rademacher :math:`v`
    (it can be negative; SophiaG clips ``max(h, 0)``). The Hessian-vector
    product is a double backward, so ``loss`` must be twice differentiable.

    Args:
      loss: scalar loss on the current batch, attached to the graph of ``params``.
      params: the parameters to estimate at.
      generator: generator of the probes.
      grads: first-order gradients already computed with ``create_graph=True``
        (saves one backward); computed here otherwise.
      retain_graph: keep the graph after the Hessian-vector product.

    Returns:
      ``h_hat``, one tensor per parameter, in the compute dtype.
    """
    params = list(params)
    if grads is None:
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    pairs = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
    vs = [_rademacher_like(p, generator) for p in params]
    hvs: list[Tensor | None] = [None] * len(params)
    if pairs:
        out = torch.autograd.grad(
            [g for _, g in pairs],
            params,
            grad_outputs=[vs[i] for i, _ in pairs],
            retain_graph=retain_graph,
            allow_unused=True,
        )
        hvs = list(out)
    result = []
    for p, v, hv in zip(params, vs, hvs):
        hv = torch.zeros_like(p) if hv is None else hv
        v, hv = real_view(v), real_view(hv)
        compute = compute_dtype(v.dtype)
        result.append(v.to(compute) * hv.detach().to(compute))
    return result

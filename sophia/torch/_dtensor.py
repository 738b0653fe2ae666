"""DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism): the step on local shards.

SophiaG's update is elementwise, so updating every rank's local shard of
``param``, ``grad``, ``exp_avg`` and ``hessian`` (``to_local()`` views) with
the plain bodies is updating the DTensors, with no communication and no
DTensor dispatch per kernel; this needs the states sharded exactly like their
parameter. The only global quantity is the win count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sophia.torch._narrow import STOCHASTIC

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor, Partial, Replicate
else:  # builds without torch.distributed have no DTensors to handle
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a ``DTensor`` (never, on a build without ``torch.distributed``)."""
    return DTensor is not None and isinstance(x, DTensor)


def check_forms(params: list[Tensor], mu_dtype: str | None, hessian_dtype: str | None) -> None:
    """Raises ``ValueError`` for a stochastic form on DTensor parameters.

    The random bits are a function of each coordinate's index in the whole
    tensor, which a shard's local view does not know.
    """
    for name, form in (("mu_dtype", mu_dtype), ("hessian_dtype", hessian_dtype)):
        if form in STOCHASTIC and any(is_dtensor(p) for p in params):
            raise ValueError(
                f"Invalid {name}: {form!r} for DTensor parameters (allowed: None or "
                "'float32'): stochastic rounding needs each coordinate's index in the whole "
                "tensor, and a shard only knows its local one"
            )


def _describe(t: Tensor) -> str:
    if is_dtensor(t):
        return f"a DTensor with placements {t.placements} on {t.device_mesh}"
    return f"a plain {type(t).__name__}"


def _check_sharded_alike(
    i: int, p: Tensor, grads: list[Tensor], exp_avgs: list[Tensor], hessians: list[Tensor]
) -> None:
    if any(pl.is_partial() for pl in p.placements):
        raise ValueError(
            f"sophia_g: parameter {i} is a DTensor with Partial placements {p.placements}; "
            "an elementwise update needs Shard or Replicate placements"
        )
    for name, t in (("grad", grads[i]), ("exp_avg", exp_avgs[i]), ("hessian", hessians[i])):
        if not (is_dtensor(t) and t.device_mesh == p.device_mesh and t.placements == p.placements):
            raise ValueError(
                f"sophia_g: the {name} of parameter {i} is {_describe(t)}, but the "
                f"parameter is {_describe(p)}; it must be a DTensor on the same mesh "
                "with the same placements"
            )


def on_local_shards(
    step: Callable[..., Tensor],
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    state_steps: list[Tensor],
    **kwargs: Any,
) -> Tensor:
    """``step`` (:func:`sophia.torch.sophia_g`) on the local shards of DTensor parameters.

    Parameters are grouped by (mesh, placements) and each group is stepped on
    its local shards (plain tensors as they are). A group's win count is summed
    over the mesh dimensions it is sharded on (a ``Partial`` reduction) and
    taken as is over replicated ones, so every rank returns the global count.
    """
    classes: dict[Any, list[int]] = {}
    for i, p in enumerate(params):
        if not is_dtensor(p):
            classes.setdefault(None, []).append(i)
            continue
        _check_sharded_alike(i, p, grads, exp_avgs, hessians)
        classes.setdefault((p.device_mesh, p.placements), []).append(i)
    total: Tensor | None = None
    for key, idx in classes.items():
        local = key is not None
        lists = [
            [xs[i].to_local() if local else xs[i] for i in idx]
            for xs in (params, grads, exp_avgs, hessians)
        ]
        n = step(*lists, [state_steps[i] for i in idx], **kwargs)
        if key is not None and any(pl.is_shard() for pl in key[1]):
            mesh, placements = key
            parts = [Partial() if pl.is_shard() else Replicate() for pl in placements]
            n = DTensor.from_local(n, mesh, parts).full_tensor()
        total = n if total is None else total + n.to(total.device)
    assert total is not None
    return total

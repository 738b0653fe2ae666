"""The estimates behind one ``SophiaG.update_hessian``, checked against the parameters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sophia.torch import estimators
from sophia.torch._narrow_state import HESSIAN_SCALE
from sophia.torch._scalars import real_view
from sophia.torch.functional import hessian_ema

#: What autograd says of a graph that a backward already freed.
_FREED_GRAPH = "backward through the graph a second time"


def check_estimate_shapes(
    groups: list[dict[str, Any]],
    estimates: list[Tensor | None],
    param_name: Callable[[dict[str, Any], int], str],
) -> None:
    """Raises naming the first parameter whose estimate is not of its (real view's) shape."""
    k = 0
    for group in groups:
        for i, p in enumerate(group["params"]):
            e = estimates[k]
            k += 1
            if e is None:
                continue
            want, got = (tuple(real_view(x).shape) for x in (p, e))
            if got != want:
                raise ValueError(
                    f"update_hessian: the estimate for {param_name(group, i)} has "
                    f"shape {tuple(e.shape)}, but the parameter needs {want}"
                )


def gnb_estimates(
    logits: Tensor,
    all_params: list[Tensor],
    labels: Tensor | None,
    generator: torch.Generator | None,
    mask: Tensor | None,
) -> tuple[list[Tensor | None], int | Tensor]:
    """The GNB estimate of every parameter that requires grad (``None`` for the others).

    Returns it with its label count, and turns autograd's error for logits
    whose graph a backward already freed into one that names the fix.
    """
    wanted = [p for p in all_params if p.requires_grad]
    try:
        with torch.enable_grad():
            h_hats, count = estimators._gnb_with_count(
                logits, wanted, labels, generator, mask, True, None
            )
    except RuntimeError as e:
        if _FREED_GRAPH not in str(e):
            raise
        raise RuntimeError(
            "SophiaG.update_hessian(logits=...): the graph of these logits was already "
            "freed by a backward (loss.backward() frees it). Call update_hessian before "
            "loss.backward() (after the forward: if step % k == 0: "
            "opt.update_hessian(logits=logits)), or pass logits from a fresh forward"
        ) from e
    by_id = {id(p): h for p, h in zip(wanted, h_hats)}
    return [by_id.get(id(p)) for p in all_params], count


def group_ema(
    group: dict[str, Any],
    p_states: list[dict[str, Any]],
    param_dtypes: list[torch.dtype],
    estimates: list[Tensor],
) -> None:
    """The EMA of ``h`` of one group's parameters (their states) with their estimates.

    Stored in the group's ``hessian_dtype``; a stochastic form's step index is
    each parameter's step counter, the index of the step this refresh starts.
    """
    scales = [s[HESSIAN_SCALE] for s in p_states if HESSIAN_SCALE in s]
    hessian_ema(
        [s["hessian"] for s in p_states],
        estimates,
        beta2=group["betas"][1],
        foreach=group["foreach"],
        hessian_dtype=group["hessian_dtype"],
        param_dtypes=param_dtypes,
        state_steps=[s["step"] for s in p_states],
        seed=group["seed"],
        hessian_scales=scales or None,
    )

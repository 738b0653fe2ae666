"""The paper's diagnostics of each param group, as tensors (no host synchronisation)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sophia.torch import _group_state as gstate
from sophia.torch._dtensor import is_dtensor
from sophia.torch._narrow_state import decoded_hessian
from sophia.torch._scalars import real_view, scalar_tensor


def _combine_norms(norms: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    if not norms:
        return torch.zeros((), dtype=dtype, device=device)
    return torch.linalg.vector_norm(torch.stack(norms))


def _norms(
    state: gstate.State, params: list[Tensor], dtype: torch.dtype, device: torch.device
) -> dict[str, Tensor]:
    """The L2 norms of the group's ``hessian`` and ``exp_avg`` states, global for DTensors."""
    norms: dict[str, list[Tensor]] = {"hessian": [], "exp_avg": []}
    for p in params:
        p_state = state.get(p, {})
        # the values the step reads: block8 codes decoded
        values = {"hessian": decoded_hessian(p_state), "exp_avg": p_state.get("exp_avg")}
        for key in norms:
            if values[key] is not None:
                n = torch.linalg.vector_norm(real_view(values[key]), dtype=dtype)
                if is_dtensor(n):
                    n = n.full_tensor()  # every rank reports the global norm
                norms[key].append(n.to(device))
    return {key: _combine_norms(ns, dtype, device) for key, ns in norms.items()}


def diagnostics(state: gstate.State, groups: list[dict[str, Any]]) -> list[dict[str, Tensor]]:
    """See :meth:`sophia.torch.SophiaG.diagnostics`."""
    out = []
    for group in groups:
        params = group["params"]
        dtype = gstate.scalar_dtype(params)
        device = params[0].device if params else torch.device("cpu")
        st = state.get(params[0], {}) if params else {}
        if gstate.GROUP_RHO in st:
            win = st[gstate.GROUP_WIN_RATE]
            rho_now, count = st[gstate.GROUP_RHO], st[gstate.GROUP_STEP]
        else:  # not created yet: never create state here (it may be on the meta device)
            win = torch.zeros((), dtype=dtype, device=device)
            rho_now = scalar_tensor(group["rho"], dtype, device)
            count = torch.zeros((), dtype=torch.float32, device=device)
        rho = rho_now if group["dynamic"] else scalar_tensor(group["rho"], dtype, device)
        norms = _norms(state, params, dtype, device)
        out.append(
            {
                "win_rate": win.clone(),
                "rho": rho.clone(),
                "hessian_norm": norms["hessian"],
                "momentum_norm": norms["exp_avg"],
                "count": count.clone(),
            }
        )
    return out

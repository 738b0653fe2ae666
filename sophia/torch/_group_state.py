"""SophiaG's per-group tensors: their layout in ``Optimizer.state``, their upgrade and their rules.

Each param group keeps four 0-dim tensors in the state of its first parameter
(as torch's LBFGS keeps its optimizer-wide tensors), so that
``load_state_dict``, ``Module.to`` with swapped parameters and distributed
checkpoints move them with the parameters: the steps taken, the current rho,
the win rate of the last step and, once a GNB refresh ran, its label count.
State dicts of two older layouts still load: this class's earlier one (the
group tensors in ``param_group["sophia_state"]``) and the paper's reference
code's (per-parameter state only, a shape-(1,) step, maybe no ``hessian``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from sophia import spec
from sophia.torch._scalars import NP_DTYPES, real_numel, scalar_tensor

GROUP_STEP = "group_step"
GROUP_RHO = "group_rho"
GROUP_WIN_RATE = "group_win_rate"
GROUP_LABEL_COUNT = "group_label_count"
_GROUP_KEYS = (GROUP_STEP, GROUP_RHO, GROUP_WIN_RATE, GROUP_LABEL_COUNT)
#: Keys of the earlier layout's ``param_group["sophia_state"]``, and where they live now.
_EARLIER_GROUP_KEYS = {"step": GROUP_STEP, "rho": GROUP_RHO, "win_rate": GROUP_WIN_RATE}
#: Per-parameter keys (the paper's reference layout).
_PARAM_KEYS = ("step", "exp_avg", "hessian")

State = dict[Any, dict[str, Any]]
Group = dict[str, Any]


def scalar_dtype(params: Sequence[Tensor]) -> torch.dtype:
    """float64 if any parameter of the group is float64/complex128, else float32 (as in JAX)."""
    wide = any(p.dtype in (torch.float64, torch.complex128) for p in params)
    return torch.float64 if wide else torch.float32


def step_device(group: Group, p: Tensor) -> torch.device:
    """Where step counters live: on the parameter's device when capturable or fused.

    Otherwise on the CPU, torch's convention for ``state["step"]``: reading it
    costs no synchronisation.
    """
    return p.device if group["capturable"] or group["fused"] else torch.device("cpu")


def group_state(state: State, group: Group) -> dict[str, Any] | None:
    """The state holding ``group``'s tensors (its first parameter's), created on first use.

    ``None`` for a group without parameters.
    """
    if not group["params"]:
        return None
    host = group["params"][0]
    st = state[host]
    if GROUP_RHO not in st:
        dtype = scalar_dtype(group["params"])
        st[GROUP_STEP] = torch.zeros((), dtype=torch.float32, device=step_device(group, host))
        st[GROUP_RHO] = scalar_tensor(group["rho"], dtype, host.device).clone()
        st[GROUP_WIN_RATE] = torch.zeros((), dtype=dtype, device=host.device)
    return st


def group_steps(state: State, groups: list[Group]) -> tuple[float, ...]:
    """Each group's step counter (-1 where it has none yet), read on the host."""
    out = []
    for group in groups:
        st = state.get(group["params"][0], {}) if group["params"] else {}
        out.append(float(st[GROUP_STEP]) if GROUP_STEP in st else -1.0)
    return tuple(out)


def _cast_group_tensor(key: str, value: Tensor, group: Group, host: Tensor) -> Tensor:
    """A loaded group tensor back in its own dtype and on its device.

    ``load_state_dict`` casts floating state to the parameter's dtype; rho and
    the win rate must stay float32/float64, the label count an integer.
    """
    if key == GROUP_STEP:
        return value.detach().to(device=step_device(group, host), dtype=torch.float32)
    if key == GROUP_LABEL_COUNT:
        return value.detach().to(device=host.device, dtype=torch.int64).reshape(())
    return value.detach().to(device=host.device, dtype=scalar_dtype(group["params"])).reshape(())


def upgrade_param_state(state: State, group: Group, p: Tensor) -> None:
    """The paper's reference layout: a shape-(1,) step, or no ``hessian`` yet."""
    p_state = state.get(p)
    if not p_state or not any(k in p_state for k in _PARAM_KEYS):
        return
    step = p_state.get("step", 0.0)
    if not (torch.is_tensor(step) and step.dim() == 0):
        # the paper's code keeps a shape-(1,) step when capturable
        value = float(step.reshape(-1)[0]) if torch.is_tensor(step) else float(step)
        p_state["step"] = torch.tensor(value, dtype=torch.float32, device=step_device(group, p))
    if "hessian" not in p_state:
        p_state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def upgrade_group_state(state: State, group: Group, earlier: dict[str, Tensor] | None) -> None:
    """Group tensors from the earlier layout, or rebuilt for the reference layout."""
    if not group["params"]:
        return
    host = group["params"][0]
    if GROUP_RHO in state.get(host, {}):
        return
    if earlier is not None and all(k in earlier for k in _EARLIER_GROUP_KEYS):
        st = state[host]
        for earlier_key, key in _EARLIER_GROUP_KEYS.items():
            st[key] = _cast_group_tensor(key, earlier[earlier_key], group, host)
        return
    steps = [float(state[p]["step"]) for p in group["params"] if "step" in state.get(p, {})]
    if steps:  # the reference layout: counters from the parameters, rate unknown
        st = group_state(state, group)
        assert st is not None
        st[GROUP_STEP].fill_(max(steps))
        st[GROUP_WIN_RATE].fill_(float("nan"))


def check_saved_shapes(groups: list[Group], state_dict: dict[str, Any]) -> None:
    """Raises naming the first parameter whose saved ``exp_avg`` or ``hessian`` has another shape.

    Nothing is checked where the groups or parameter counts differ: torch names that mismatch.
    """
    saved_groups = state_dict.get("param_groups", [])
    saved_state = state_dict.get("state", {})
    ids = [i for g in saved_groups for i in g.get("params", [])]
    params = [(gi, pi, p) for gi, g in enumerate(groups) for pi, p in enumerate(g["params"])]
    if len(saved_groups) != len(groups) or len(ids) != len(params):
        return
    for saved_id, (gi, pi, p) in zip(ids, params):
        for key in ("exp_avg", "hessian"):
            value = saved_state.get(saved_id, {}).get(key)
            if torch.is_tensor(value) and value.shape != p.shape:
                raise ValueError(
                    f"SophiaG.load_state_dict: the saved {key!r} of parameter {pi} in "
                    f"param group {gi} has shape {tuple(value.shape)} but the parameter "
                    f"has shape {tuple(p.shape)}; this state dict belongs to different "
                    "parameters"
                )


def restore_group_dtypes(state: State, groups: list[Group], state_dict: dict[str, Any]) -> None:
    """After torch's ``load_state_dict``: each group tensor in its own dtype, from the saved one.

    Torch cast every floating tensor of the state to its parameter's dtype (rho
    of a bfloat16 group is float32).
    """
    saved_state = state_dict.get("state", {})
    for group, saved in zip(groups, state_dict.get("param_groups", [])):
        if not group["params"] or not saved.get("params"):
            continue
        host = group["params"][0]
        saved_host = saved_state.get(saved["params"][0], {})
        st = state.get(host, {})
        for key in _GROUP_KEYS:
            if key in saved_host and torch.is_tensor(saved_host[key]):
                st[key] = _cast_group_tensor(key, saved_host[key], group, host)


def effective_bs(group: Group, st: dict[str, Any], bs: float | Tensor | None) -> float | Tensor:
    """``step(bs=...)``, else the group's ``bs``, else the latest GNB label count."""
    if bs is not None:
        return bs
    if group["bs"] is not None:
        return group["bs"]
    return st.get(GROUP_LABEL_COUNT, spec.REFERENCE_BS)


def store_label_count(st: dict[str, Any], count: int | Tensor) -> None:
    """Keeps a refresh's label count; a refresh with no labels keeps the previous one."""
    device = st[GROUP_RHO].device
    if isinstance(count, Tensor):
        prev = st.get(GROUP_LABEL_COUNT)
        fallback = torch.full((), spec.REFERENCE_BS, dtype=torch.int64, device=device)
        new = count.to(device=device, dtype=torch.int64).reshape(())
        new = torch.where(new > 0, new, fallback if prev is None else prev)
    elif count > 0:
        new = torch.full((), count, dtype=torch.int64, device=device)
    else:
        return
    if GROUP_LABEL_COUNT in st:
        st[GROUP_LABEL_COUNT].copy_(new)
    else:
        st[GROUP_LABEL_COUNT] = new


def store_win_rate(st: dict[str, Any], n_win: Tensor, params: list[Tensor]) -> None:
    """The group's win rate from a step's win count, and one more step counted."""
    win = st[GROUP_WIN_RATE]
    n_total = sum(real_numel(p) for p in params)
    total = torch.full((), float(max(n_total, 1)), dtype=win.dtype, device=win.device)
    # a true division by a device tensor: a CPU scalar divisor may become a reciprocal
    win.copy_(n_win.to(device=total.device, dtype=win.dtype) / total)
    st[GROUP_STEP].add_(1)


def dynamic_rho(group: Group, st: dict[str, Any]) -> None:
    """The spec's dynamic-rho rule on one group, with tensor ops only (no host sync)."""
    if sum(real_numel(p) for p in group["params"]) == 0:
        return
    rho = st[GROUP_RHO]
    dtype, device = rho.dtype, rho.device
    c = NP_DTYPES[dtype]
    rho0 = scalar_tensor(group["rho"], dtype, device)
    span = torch.full((), float(c(spec.DYNAMIC_RANGE)), dtype=dtype, device=device)
    factor = torch.full((), float(c(spec.DYNAMIC_FACTOR)), dtype=dtype, device=device)
    up = torch.minimum(rho * factor, rho0 * span)
    down = torch.maximum(rho / factor, rho0 / span)
    rate = st[GROUP_WIN_RATE]
    lo, hi = (float(c(b)) for b in spec.WIN_RATE_BAND)
    moved = torch.where(rate < lo, up, torch.where(rate > hi, down, rho))
    rho.copy_(torch.where(st[GROUP_STEP].to(device) > 0, moved, rho))

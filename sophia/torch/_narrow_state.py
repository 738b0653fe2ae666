"""SophiaG's narrow state in ``Optimizer.state``: the group keys, the tensors, their checks.

A param group has ``mu_dtype`` and ``hessian_dtype`` (canonical names of
:mod:`sophia.narrow`, or ``None``) and ``seed``. Each parameter's state holds
``exp_avg`` in the momentum's form, ``hessian`` in the Hessian's (for
``"block8"`` the int8 codes, with the float32 block scales in
``hessian_scale``). Torch's ``load_state_dict`` casts every floating state
tensor to its parameter's dtype, so the saved tensors are put back in their
forms afterwards; a state dict saved with other forms is refused before
anything changes, and one saved before narrow state existed has forms
``None`` and seed 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sophia import narrow
from sophia.torch import _narrow as tn

#: The param-group keys of the narrow state, and their values before it existed.
KEYS: dict[str, Any] = {"mu_dtype": None, "hessian_dtype": None, "seed": 0}
#: Per-parameter key of the block8 form's scales.
HESSIAN_SCALE = "hessian_scale"
_ALLOWED = {"mu_dtype": narrow.MU_DTYPES, "hessian_dtype": narrow.HESSIAN_DTYPES}

Group = dict[str, Any]


def init_param_state(state: dict[str, Any], group: Group, p: Tensor) -> None:
    """Zero ``exp_avg``, ``hessian`` (and ``hessian_scale``) in the group's forms, where missing."""
    for key, form in (("exp_avg", group["mu_dtype"]), ("hessian", group["hessian_dtype"])):
        if key not in state:
            dtype = tn.storage_dtype(form, p.dtype)
            state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    if group["hessian_dtype"] == narrow.BLOCK8 and HESSIAN_SCALE not in state:
        count = narrow.block_count(p.numel())
        state[HESSIAN_SCALE] = torch.zeros(count, dtype=torch.float32, device=p.device)


def decoded_hessian(p_state: dict[str, Any]) -> Tensor | None:
    """A parameter's ``h`` values (decoded from block8), or ``None`` where it has none."""
    h = p_state.get("hessian")
    if h is None or HESSIAN_SCALE not in p_state:
        return h
    return tn.decode_block8(h, p_state[HESSIAN_SCALE])


def with_form_keys(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with the narrow keys in every saved group (an older one lacks them)."""
    groups = [{**KEYS, **g} for g in state_dict.get("param_groups", [])]
    return {**state_dict, "param_groups": groups}


def check_saved_forms(groups: list[Group], state_dict: dict[str, Any]) -> None:
    """Raises ``ValueError`` where a saved group's forms are not this optimizer's group's.

    Its state tensors would be in the wrong form (:mod:`sophia.interop` converts
    between forms, with ``convert_forms=True``). Also raises where a block8
    parameter's saved ``hessian`` comes without ``hessian_scale`` of its block count.
    """
    saved_state = state_dict.get("state", {})
    for gi, (group, saved) in enumerate(zip(groups, state_dict.get("param_groups", []))):
        for key in _ALLOWED:
            mine = group[key]
            theirs = narrow.state_dtype_name(key, saved.get(key), _ALLOWED[key])
            if mine != theirs:
                raise ValueError(
                    f"SophiaG.load_state_dict: param group {gi} was saved with "
                    f"{key}={theirs!r} but this optimizer has {key}={mine!r}; a state dict "
                    f"loads only into an optimizer with the same {key}"
                )
        if group["hessian_dtype"] != narrow.BLOCK8:
            continue
        for pi, (p, saved_id) in enumerate(zip(group["params"], saved.get("params", []))):
            saved_p = saved_state.get(saved_id, {})
            scale = saved_p.get(HESSIAN_SCALE)
            want = (narrow.block_count(p.numel()),)
            if "hessian" in saved_p and not (torch.is_tensor(scale) and scale.shape == want):
                got = tuple(scale.shape) if torch.is_tensor(scale) else scale
                raise ValueError(
                    f"SophiaG.load_state_dict: parameter {pi} of param group {gi} has block8 "
                    f"codes but its saved {HESSIAN_SCALE!r} is {got!r} (allowed: a float32 "
                    f"tensor of shape {want})"
                )


def restore_forms(state: dict[Any, Any], groups: list[Group], state_dict: dict[str, Any]) -> None:
    """After torch's ``load_state_dict``: each state tensor back in its form, from the saved one.

    Torch cast ``exp_avg``, ``hessian`` and ``hessian_scale`` to the parameter's
    dtype (int8 codes, bfloat16 momenta and float32 scales included).
    """
    saved_state = state_dict.get("state", {})
    for group, saved in zip(groups, state_dict.get("param_groups", [])):
        if group["mu_dtype"] is None and group["hessian_dtype"] is None:
            continue
        for p, saved_id in zip(group["params"], saved.get("params", [])):
            saved_p = saved_state.get(saved_id, {})
            p_state = state.get(p, {})
            forms = {
                "exp_avg": tn.storage_dtype(group["mu_dtype"], p.dtype),
                "hessian": tn.storage_dtype(group["hessian_dtype"], p.dtype),
                HESSIAN_SCALE: torch.float32,
            }
            for key, dtype in forms.items():
                if torch.is_tensor(saved_p.get(key)) and key in p_state:
                    p_state[key] = saved_p[key].detach().to(device=p.device, dtype=dtype)

"""SophiaG's hyperparameters checked once: the spec's validation, and what torch adds to it.

:func:`validate` checks the defaults once and then what each param group sets
itself; :func:`check_group` what a group's forms need of its parameters.
Both raise ``ValueError`` naming the argument, the value and what is allowed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sophia import narrow, spec
from sophia.torch import _narrow as tn
from sophia.torch._dtensor import check_forms as check_dtensor_forms
from sophia.torch._fused import FUSED_DEVICES
from sophia.torch.functional import check_not_fused_and_foreach

#: The param-group keys :func:`sophia.spec.validate` checks: its own arguments.
SPEC_KEYS = tuple(inspect.signature(spec.validate).parameters)
_FORMS = {"mu_dtype": narrow.MU_DTYPES, "hessian_dtype": narrow.HESSIAN_DTYPES}

Group = dict[str, Any]


def validate(values: dict[str, Any]) -> None:
    """Checks the hyperparameters in ``values`` (the defaults, or what a group sets itself).

    :func:`sophia.spec.validate`, plus: a tensor ``lr`` or ``rho`` has one
    element, and ``fused`` and ``foreach`` are not both on. The forms in
    ``values`` become their canonical names (a torch dtype its name).
    """
    for name in ("lr", "rho"):
        value = values.get(name)
        if isinstance(value, Tensor) and value.numel() != 1:
            raise ValueError(
                f"Invalid {name}: a tensor of shape {tuple(value.shape)} (allowed: a number "
                "or a 1-element tensor)"
            )
    if not torch.compiler.is_compiling():
        spec.validate(**{k: values[k] for k in SPEC_KEYS if k in values})
    check_not_fused_and_foreach(values.get("fused"), values.get("foreach"))
    canonical(values)


def canonical(values: dict[str, Any]) -> None:
    """``mu_dtype``/``hessian_dtype`` in ``values`` as canonical names (torch dtypes accepted)."""
    for key, allowed in _FORMS.items():
        if key in values:
            values[key] = narrow.state_dtype_name(key, values[key], allowed)


def check_group(group: Group) -> None:
    """Raises ``ValueError`` for forms this group's parameters or implementation cannot take.

    Complex parameters take ``None`` or ``"float32"``; DTensor parameters no
    stochastic form.
    The group's forms become their canonical names.
    """
    canonical(group)
    params = group["params"]
    for key in _FORMS:
        form = group[key]
        if form in tn.STOCHASTIC and any(torch.is_complex(p) for p in params):
            raise ValueError(
                f"Invalid {key}: {form!r} for complex parameters (allowed: None or 'float32' "
                "for complex parameters)"
            )
    check_dtensor_forms(params, group["mu_dtype"], group["hessian_dtype"])


def check_fused_parameter(p: Tensor, name: Callable[[], str]) -> None:
    """Raises ``RuntimeError`` for a parameter ``fused=True`` cannot step (``name()`` names it)."""
    if p.device.type not in FUSED_DEVICES or not (torch.is_floating_point(p) or p.is_complex()):
        raise RuntimeError(
            f"SophiaG fused=True needs floating-point parameters on "
            f"{'/'.join(FUSED_DEVICES)}, got {p.dtype} on {p.device.type} for {name()}"
        )

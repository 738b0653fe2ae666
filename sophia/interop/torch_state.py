"""PyTorch side of :mod:`sophia.interop`: ``SophiaG`` state dicts to and from a Checkpoint."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from sophia import narrow
from sophia.interop import forms
from sophia.interop.checkpoint import (
    Checkpoint,
    GroupState,
    fail,
    hyperparam_mismatches,
    mismatch_error,
)
from sophia.torch._group_state import GROUP_LABEL_COUNT as _COUNT
from sophia.torch._group_state import GROUP_RHO as _RHO
from sophia.torch._group_state import GROUP_STEP as _STEP
from sophia.torch._group_state import GROUP_WIN_RATE as _WIN
from sophia.torch._narrow import storage_dtype
from sophia.torch._narrow_state import HESSIAN_SCALE as _SCALE
from sophia.torch._narrow_state import KEYS as _NARROW_DEFAULTS

__all__ = ["from_torch", "to_torch", "torch_param_names", "torch_state_dict"]

_DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}
_TORCH_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}

Names = Sequence[str] | torch.nn.Module | None


def _to_numpy(t: torch.Tensor, what: str) -> tuple[np.ndarray, str]:
    name = _DTYPE_NAMES.get(t.dtype)
    if name is None:
        fail(f"sophia.interop: {what} has dtype {t.dtype} (allowed: {sorted(_TORCH_DTYPES)})")
    t = t.detach().cpu().contiguous()
    if name == "bfloat16":
        bits = t.view(torch.int16).numpy().view(np.uint16).reshape(tuple(t.shape))
        return bits.copy(), name
    return t.numpy().copy(), name


def _stored_to_numpy(st: Mapping[str, Any], key: str, what: str) -> tuple[Any, str]:
    """A state array as the checkpoint holds it: a block8 Hessian EMA as a Block8."""
    if key == "hessian" and _SCALE in st:
        codes, scale = st["hessian"].detach().cpu(), st[_SCALE].detach().cpu()
        if codes.dtype != torch.int8 or scale.dtype != torch.float32:
            fail(
                f"sophia.interop: {what} is block8 but holds {codes.dtype} codes and "
                f"{scale.dtype} scales (allowed: torch.int8 and torch.float32)"
            )
        return narrow.Block8(codes.contiguous().numpy().copy(), scale.numpy().copy()), "block8"
    return _to_numpy(st[key], what)


def _to_torch(x: Any, dtype: str) -> torch.Tensor:
    if isinstance(x, narrow.Block8):
        return torch.from_numpy(np.array(x.codes, copy=True))
    if dtype == "bfloat16":
        bits = torch.from_numpy(np.ascontiguousarray(x).view(np.int16).copy())
        return bits.view(torch.bfloat16).reshape(x.shape)
    return torch.from_numpy(np.array(x, copy=True))


def torch_param_names(optimizer: torch.optim.Optimizer, names: Names = None) -> list[str]:
    """Names of ``optimizer``'s parameters, group after group (state-dict index order).

    Args:
      optimizer: the optimizer.
      names: a module (parameters are named by ``named_parameters()``, matched by
        identity), a list of names in state-dict order, or ``None`` to use the
        ``param_names`` torch keeps when the optimizer was built from named
        parameters.

    Returns:
      One name per parameter.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if isinstance(names, torch.nn.Module):
        by_id = {id(p): n for n, p in names.named_parameters()}
        missing = [i for i, p in enumerate(params) if id(p) not in by_id]
        if missing:
            fail(
                f"sophia.interop: parameters {missing} of the optimizer are not parameters of "
                "the given module"
            )
        return [by_id[id(p)] for p in params]
    return _names_from_groups(optimizer.state_dict()["param_groups"], names)


def _names_from_groups(groups: Sequence[Mapping[str, Any]], names: Any) -> list[str]:
    n_params = sum(len(g["params"]) for g in groups)
    if names is None:
        if not all("param_names" in g for g in groups):
            fail(
                "sophia.interop: parameter names are needed: pass names=model (with the "
                "optimizer) or a list of names in state-dict order, or build the optimizer "
                "from model.named_parameters()"
            )
        names = [n for g in groups for n in g["param_names"]]
    if isinstance(names, str) or not isinstance(names, Sequence):
        fail(f"sophia.interop: names must be a list of strings, got {type(names).__name__}")
    names = list(names)
    if len(names) != n_params:
        fail(f"sophia.interop: got {len(names)} names for {n_params} parameters")
    if len(set(names)) != len(names):
        fail("sophia.interop: parameter names must be unique")
    return names


def _forms(group: Mapping[str, Any]) -> dict[str, Any]:
    """The group's narrow state configuration; a group saved before it existed has the defaults."""
    out = {k: group.get(k, v) for k, v in _NARROW_DEFAULTS.items()}
    out["mu_dtype"] = narrow.state_dtype_name("mu_dtype", out["mu_dtype"], narrow.MU_DTYPES)
    out["hessian_dtype"] = narrow.state_dtype_name(
        "hessian_dtype", out["hessian_dtype"], narrow.HESSIAN_DTYPES
    )
    out["seed"] = int(out["seed"])
    return out


def _hyperparams(group: Mapping[str, Any]) -> dict[str, Any]:
    def num(x: Any) -> float:
        return float(x.item()) if isinstance(x, torch.Tensor) else float(x)

    b1, b2 = group["betas"]
    out = {
        "lr": num(group["lr"]),
        "b1": num(b1),
        "b2": num(b2),
        "rho": num(group["rho"]),
        "weight_decay": num(group["weight_decay"]),
        "eps": num(group["eps"]),
        "maximize": bool(group["maximize"]),
        "dynamic": bool(group["dynamic"]),
    }
    if group["bs"] is not None:  # None: the label count of the refresh, not a hyperparameter
        out["bs"] = num(group["bs"])
    return out | _forms(group)


def _zeros(st: dict[str, Any], key: str, form: str | None, shape: tuple, dtype: Any) -> None:
    """The zeros the optimizer creates for a parameter without state, in the group's form."""
    st[key] = torch.zeros(shape, dtype=storage_dtype(form, dtype))
    if key == "hessian" and form == narrow.BLOCK8:
        st[_SCALE] = torch.zeros(narrow.block_count(math.prod(shape)), dtype=torch.float32)


def from_torch(
    optimizer: torch.optim.Optimizer | Mapping[str, Any], names: Names = None
) -> Checkpoint:
    """A :class:`Checkpoint` of a ``sophia.torch.SophiaG`` optimizer or of its state dict.

    Per parameter: ``exp_avg`` and ``hessian`` as stored (with ``hessian_scale``
    for the ``"block8"`` form); per group: the step counter,
    the current ``rho``, the last win rate and the hyperparameters. A
    parameter without state (no step taken, no Hessian refresh) gets zeros,
    as the optimizer would create them (needs the optimizer, for the shape).
    torch's per-parameter ``step`` does not enter the update; the group's
    counter is kept (and given back to every parameter by :func:`to_torch`).
    The group tensors are read from the state of each group's first parameter,
    or from ``param_group["sophia_state"]`` (the earlier layout); a state dict
    in the paper's reference layout (neither) is read the way
    ``SophiaG.load_state_dict`` reads it. The label count of the latest GNB
    refresh (what ``bs=None`` uses) is kept when there is one.

    Args:
      optimizer: a ``SophiaG`` or a state dict it returned.
      names: parameter names, see :func:`torch_param_names` (a module needs
        the optimizer itself).

    Returns:
      The checkpoint (NumPy copies; the optimizer is not changed).
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        names = torch_param_names(optimizer, names)
        shapes = [(tuple(p.shape), p.dtype) for g in optimizer.param_groups for p in g["params"]]
        sd = optimizer.state_dict()
    else:
        if isinstance(names, torch.nn.Module):
            fail("sophia.interop: names=module needs the optimizer, not its state dict")
        sd = optimizer
        if not isinstance(sd, Mapping) or not {"state", "param_groups"} <= set(sd):
            fail("sophia.interop: expected an optimizer or a state dict with state/param_groups")
        names = _names_from_groups(sd["param_groups"], names)
        shapes = None
    state = sd["state"]
    groups = []
    k = 0
    for gi, group in enumerate(sd["param_groups"]):
        where = f"sophia.interop: param group {gi}"
        missing = [h for h in ("betas", "rho", "bs", "eps", "dynamic") if h not in group]
        if missing:
            fail(f"{where} lacks {missing}: not a sophia.torch.SophiaG state dict")
        g_names, mu, hess, dtypes = [], {}, {}, {}
        per_param_steps = []
        wide = False
        narrow_forms = _forms(group)
        for pid in group["params"]:
            n = names[k]
            st = dict(state.get(pid, {}))
            for kind, key in (("mu", "exp_avg"), ("hessian", "hessian")):
                if st.get(key) is None:
                    if shapes is None:
                        fail(
                            f"{where}: parameter {n!r} has no {key!r}; pass the optimizer "
                            "(not its state dict) so its shape is known"
                        )
                    _zeros(st, key, narrow_forms[forms.FORM_KEYS[kind]], *shapes[k])
                arr, dt = _stored_to_numpy(st, key, f"{key} of {n!r}")
                (mu if kind == "mu" else hess)[n] = arr
                dtypes[f"{kind}/{n}"] = dt
                wide |= dt == "float64"
            wide |= shapes is not None and shapes[k][1] == torch.float64
            if "step" in st:
                per_param_steps.append(float(st["step"]))
            g_names.append(n)
            k += 1
        host = state.get(group["params"][0], {}) if group["params"] else {}
        if _RHO in host:  # the group's own scalar dtype (narrow forms can hide a float64 one)
            wide |= host[_RHO].dtype == torch.float64
        sdt = np.float64 if wide else np.float32
        # the group tensors: in the first parameter's state, or (earlier layout) in the group
        gs = {k: host[k] for k in (_STEP, _RHO, _WIN) if k in host}
        if len(gs) < 3 and "sophia_state" in group:
            old = group["sophia_state"]
            gs = {_STEP: old["step"], _RHO: old["rho"], _WIN: old["win_rate"]}
        count = host.get(_COUNT)
        if len(gs) == 3:
            step = float(gs[_STEP])
            rho = np.asarray(gs[_RHO].detach().cpu().numpy(), sdt).reshape(())
            win = np.asarray(gs[_WIN].detach().cpu().numpy(), sdt).reshape(())
        else:  # the paper's layout (or no step yet): as SophiaG.__setstate__ rebuilds it
            step = max(per_param_steps, default=0.0)
            rho = np.asarray(float(group["rho"]), sdt).reshape(())
            win = np.asarray(math.nan if step else 0.0, sdt)
        if step != int(step):
            fail(f"{where}: step {step} is not an integer")
        groups.append(
            GroupState(
                names=g_names,
                step=int(step),
                rho=rho,
                win_rate=win,
                mu=mu,
                hessian=hess,
                dtypes=dtypes,
                hyperparams=_hyperparams(group),
                label_count=None if count is None else int(count),
            )
        )
    ckpt = Checkpoint(groups)
    ckpt.validate()
    return ckpt


def _plan_arrays(
    cg: GroupState, g_names: list[str], group: Mapping[str, Any], by_name: dict, convert: bool
) -> dict[tuple[str, str], Any]:
    """Each of the group's arrays as this optimizer stores it; raises before anything changes.

    Arrays whose storage matches are carried as they are; the others are
    converted (with ``convert``, see :mod:`sophia.interop.forms`) or refused.
    """
    target_forms = _forms(group)
    out = {}
    for n in g_names:
        p = by_name[n]
        param_dtype = _DTYPE_NAMES.get(p.dtype)
        if param_dtype is None:
            fail(f"sophia.interop: parameter {n!r} is {p.dtype} (allowed: {sorted(_TORCH_DTYPES)})")
        for kind in ("mu", "hessian"):
            x, dt = getattr(cg, kind)[n], cg.dtypes[f"{kind}/{n}"]
            if forms.array_shape(x) != tuple(p.shape):
                fail(
                    f"sophia.interop: the checkpoint's {kind} of {n!r} has shape "
                    f"{forms.array_shape(x)} but the parameter has shape {tuple(p.shape)}"
                )
            form = target_forms[forms.FORM_KEYS[kind]]
            storage = forms.storage_of(form, param_dtype)
            says = f"the parameter is {p.dtype} and this optimizer keeps its {kind} as {storage}"
            stored = (dt, forms.recorded_form(cg.hyperparams, kind))
            where = "sophia.interop"
            how = forms.plan(where, kind, n, stored, (storage, form), convert, says)
            if how == "convert":
                seed = target_forms["seed"]
                x = forms.convert(x, dt, form, param_dtype, seed=seed, step=cg.step, kind=kind)
                dt = storage
            out[(kind, n)] = (x, dt)
    return out


def torch_state_dict(
    checkpoint: Checkpoint,
    optimizer: torch.optim.Optimizer,
    names: Names = None,
    *,
    check_hyperparams: bool = True,
    convert_forms: bool = False,
) -> dict[str, Any]:
    """The state dict that makes ``optimizer`` continue from ``checkpoint``.

    Groups are matched by their sets of parameter names; every shape and
    storage dtype is checked against the optimizer's parameters and narrow
    forms before anything is built. The optimizer's hyperparameters stay in
    force (they are in the returned dict); with ``check_hyperparams`` they
    must equal the recorded ones (the ``seed`` among them).

    Args:
      checkpoint: the state to load.
      optimizer: a ``sophia.torch.SophiaG`` over the matching parameters.
      names: parameter names, see :func:`torch_param_names`.
      check_hyperparams: raise if a recorded hyperparameter differs.
      convert_forms: where the checkpoint's ``mu_dtype``/``hessian_dtype``
        differ from the optimizer's, decode the arrays and re-encode them in the
        optimizer's forms (:mod:`sophia.interop.forms`) instead of raising.

    Returns:
      A state dict for ``optimizer.load_state_dict``.
    """
    checkpoint.validate()
    names = torch_param_names(optimizer, names)
    template = optimizer.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    by_name = dict(zip(names, params))
    ids = [pid for g in template["param_groups"] for pid in g["params"]]
    id_of = dict(zip(names, ids))
    if set(checkpoint.names) != set(names):
        only_ck = sorted(set(checkpoint.names) - set(names))
        only_opt = sorted(set(names) - set(checkpoint.names))
        fail(
            "sophia.interop: the checkpoint's parameters do not match the optimizer's "
            f"(only in the checkpoint: {only_ck}; only in the optimizer: {only_opt})"
        )
    k = 0
    new_state: dict[int, dict[str, torch.Tensor]] = {}
    new_groups = []
    for gi, (group, tgroup) in enumerate(zip(optimizer.param_groups, template["param_groups"])):
        g_names = names[k : k + len(group["params"])]
        k += len(group["params"])
        matches = [c for c in checkpoint.groups if set(c.names) == set(g_names)]
        if len(matches) != 1:
            fail(
                f"sophia.interop: param group {gi} of the optimizer ({g_names}) matches no "
                "group of the checkpoint; groups must hold the same parameters on both sides "
                "(in JAX: one ScaleBySophiaState per group, e.g. with optax.multi_transform)"
            )
        cg = matches[0]
        if check_hyperparams:
            diffs = hyperparam_mismatches(cg.hyperparams, _hyperparams(group), cg.scalar_dtype)
            if diffs:
                raise mismatch_error(f"sophia.interop: param group {gi}", diffs)
        arrays = _plan_arrays(cg, g_names, group, by_name, convert_forms)
        sdt = torch.float64 if cg.scalar_dtype == "float64" else torch.float32
        if any(p.dtype == torch.float64 for p in group["params"]) != (sdt == torch.float64):
            fail(f"sophia.interop: param group {gi}: scalar dtype {cg.scalar_dtype} mismatch")
        for n in g_names:
            (mu, mu_dt), (h, h_dt) = arrays[("mu", n)], arrays[("hessian", n)]
            st = {
                "step": torch.tensor(float(cg.step), dtype=torch.float32),
                "exp_avg": _to_torch(mu, mu_dt),
                "hessian": _to_torch(h, h_dt),
            }
            if isinstance(h, narrow.Block8):
                st[_SCALE] = torch.from_numpy(np.array(h.scale, copy=True))
            new_state[id_of[n]] = st
        if g_names:  # the group tensors live in the state of the group's first parameter
            host = new_state[id_of[g_names[0]]]
            host[_STEP] = torch.tensor(float(cg.step), dtype=torch.float32)
            host[_RHO] = torch.from_numpy(np.array(cg.rho, copy=True)).to(sdt).reshape(())
            host[_WIN] = torch.from_numpy(np.array(cg.win_rate, copy=True)).to(sdt).reshape(())
            if cg.label_count is not None:
                host[_COUNT] = torch.tensor(int(cg.label_count), dtype=torch.int64)
        new_groups.append(dict(tgroup))
    return {"state": new_state, "param_groups": new_groups}


def to_torch(
    checkpoint: Checkpoint,
    optimizer: torch.optim.Optimizer,
    names: Names = None,
    *,
    check_hyperparams: bool = True,
    convert_forms: bool = False,
) -> None:
    """Loads ``checkpoint`` into ``optimizer``, or raises ``ValueError`` and changes nothing.

    Args:
      checkpoint: the state to load (e.g. from :func:`sophia.interop.load` or
        :func:`sophia.interop.from_jax`).
      optimizer: a ``sophia.torch.SophiaG`` over the matching parameters.
      names: parameter names, see :func:`torch_param_names`.
      check_hyperparams: raise if a recorded hyperparameter differs from the
        optimizer's.
      convert_forms: re-encode arrays whose narrow form differs from the
        optimizer's instead of raising (see :func:`torch_state_dict`).
    """
    sd = torch_state_dict(
        checkpoint,
        optimizer,
        names,
        check_hyperparams=check_hyperparams,
        convert_forms=convert_forms,
    )
    optimizer.load_state_dict(sd)

"""JAX side of :mod:`sophia.interop`: ``ScaleBySophiaState`` to and from a Checkpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sophia import narrow, spec
from sophia.interop import forms
from sophia.interop.checkpoint import (
    RECORDED_KEYS,
    Checkpoint,
    GroupState,
    fail,
    hyperparam_mismatches,
    mismatch_error,
    storage_array,
)
from sophia.interop.jax_tree import (
    Names,
    group_leaves,
    is_leaf,
    is_masked,
    jax_param_names,
    sophia_states,
    walk,
)
from sophia.jax import narrow as jnarrow
from sophia.jax.real_pairs import sq_norm
from sophia.jax.state import ScaleBySophiaState

__all__ = ["from_jax", "to_jax"]

_DTYPES = ("float16", "bfloat16", "float32", "float64")
_INT32_MAX = 2**31 - 1

HyperParams = spec.SophiaHyperParams | Mapping[str, Any] | None


def _hp_dict(hp: HyperParams) -> dict[str, Any] | None:
    if hp is None:
        return None
    if isinstance(hp, spec.SophiaHyperParams):
        d = dataclasses.asdict(hp)
        b1, b2 = d.pop("betas")
        d.pop("hessian_update_interval")
        d.update(b1=b1, b2=b2)
        return d
    if isinstance(hp, Mapping):
        d = dict(hp)
        if "betas" in d:
            d["b1"], d["b2"] = d.pop("betas")
        if "learning_rate" in d:
            d["lr"] = d.pop("learning_rate")
        unknown = set(d) - set(RECORDED_KEYS)
        if unknown:
            fail(f"sophia.interop: unknown hyperparameters {sorted(unknown)}")
        return {k: _hp_value(k, v) for k, v in d.items()}
    fail(f"sophia.interop: hyperparams must be a SophiaHyperParams or a dict, got {hp!r}")
    return None


def _hp_value(key: str, value: Any) -> Any:
    """A given hyperparameter as a checkpoint records it (forms by their canonical names)."""
    if key in ("maximize", "dynamic"):
        return bool(value)
    if key == "mu_dtype":
        return narrow.state_dtype_name(key, value, narrow.MU_DTYPES)
    if key == "hessian_dtype":
        return narrow.state_dtype_name(key, value, narrow.HESSIAN_DTYPES)
    if key == "seed":
        return int(value)
    return float(value)


def _template_hp(s: ScaleBySophiaState) -> dict[str, Any]:
    """What a fresh state (``tx.init(params)``) knows of its hyperparameters: the configured rho.

    The configuration lives in the transform, not in the state; a fresh state's
    ``rho`` is the configured one (the dynamic rule has not moved it yet).
    """
    return {"rho": float(s.rho)} if int(s.count) == 0 else {}


def _to_numpy(x: Any, what: str) -> tuple[Any, str]:
    if isinstance(x, narrow.Block8):
        codes, scale = np.array(x.codes, copy=True), np.array(x.scale, copy=True)
        return narrow.Block8(codes, scale), narrow.BLOCK8
    name = jnp.dtype(x.dtype).name
    if name not in _DTYPES:
        fail(f"sophia.interop: {what} has dtype {name} (allowed: {_DTYPES})")
    return storage_array(np.array(x, copy=True), name), name


def _from_numpy(x: Any, dtype: str) -> Any:
    if isinstance(x, narrow.Block8):
        return narrow.Block8(jnp.asarray(x.codes), jnp.asarray(x.scale))
    if dtype == "bfloat16":
        return jnp.asarray(x.view(jnp.bfloat16))
    return jnp.asarray(x)


def _per_state(
    hyperparams: HyperParams | Sequence[HyperParams], n_states: int
) -> list[dict[str, Any] | None]:
    """One hyperparameter dict (or ``None``) per Sophia state: a list of them, or one for all."""
    if isinstance(hyperparams, (list, tuple)):
        hps = [_hp_dict(h) for h in hyperparams]
        if len(hps) != n_states:
            fail(f"sophia.interop: {len(hps)} hyperparams for {n_states} Sophia states")
        return hps
    return [_hp_dict(hyperparams)] * n_states


def from_jax(
    opt_state: optax.OptState,
    params: optax.Params,
    *,
    hyperparams: HyperParams | Sequence[HyperParams] = None,
    names: Names = None,
) -> Checkpoint:
    """A :class:`Checkpoint` of the state of :func:`sophia.jax.sophia_g` (or of any chain).

    Every ``ScaleBySophiaState`` in ``opt_state`` becomes one group (a plain
    ``sophia_g`` has one; ``optax.multi_transform`` over several ``sophia_g``
    has one per label, the counterpart of torch param groups), holding the
    parameters it does not mask. The PRNG key of the built-in estimator is
    kept.

    The state holds no hyperparameters (they live in the transform): pass
    ``hyperparams`` (a :class:`sophia.spec.SophiaHyperParams` or a dict, or one
    per group) to record them, so that :func:`sophia.interop.to_torch` and
    :func:`to_jax` can check the optimizer they load into. Without them the
    checkpoint records none.

    Args:
      opt_state: the optimizer state.
      params: the parameter pytree (for the names and the masking).
      hyperparams: the hyperparameters the transform was built with.
      names: how leaves are named, see :func:`jax_param_names`.

    Returns:
      The checkpoint (NumPy copies).
    """
    names = jax_param_names(params, names)
    states = sophia_states(opt_state)
    if not states:
        fail(
            "sophia.interop: opt_state holds no ScaleBySophiaState; pass the state of "
            "sophia_g / sophia_h (or of a chain or multi_transform containing one)"
        )
    hps = _per_state(hyperparams, len(states))
    groups = []
    for s, hp in zip(states, hps):
        mu, hess, dtypes = {}, {}, {}
        mu_leaves = group_leaves(s, names, "mu")
        for n, x in mu_leaves:
            mu[n], dtypes[f"mu/{n}"] = _to_numpy(x, f"mu of {n!r}")
        for n, x in group_leaves(s, names, "hessian"):
            hess[n], dtypes[f"hessian/{n}"] = _to_numpy(x, f"hessian of {n!r}")
        key, impl = s.key, None
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            impl = str(jax.random.key_impl(key))
            key = jax.random.key_data(key)
        groups.append(
            GroupState(
                names=[n for n, _ in mu_leaves],
                step=int(s.count),
                rho=np.array(s.rho, copy=True).reshape(()),
                win_rate=np.array(s.win_rate, copy=True).reshape(()),
                mu=mu,
                hessian=hess,
                dtypes=dtypes,
                hyperparams={} if hp is None else hp,
                key=np.array(key, dtype=np.uint32, copy=True),
                key_impl=impl,
                # bs=None: the count the state's bs follows (torch keeps it as group_label_count)
                label_count=None if s.label_count is None else int(s.label_count),
            )
        )
    ckpt = Checkpoint(groups)
    ckpt.validate()
    return ckpt


def _target_form(given: dict[str, Any] | None, kind: str, storage: str, param_dtype: str) -> Any:
    """The template's form of ``kind``: as ``hyperparams=`` gives it, or as its storage tells.

    The storage tells all but one case: an array in the parameter's dtype may be
    ``None`` or the narrow form of that dtype (``"bfloat16"`` of a bfloat16
    parameter); read as ``None`` (round to nearest) unless ``hyperparams=`` says.
    """
    form = forms.recorded_form(given, kind)
    if form is not forms.NOT_RECORDED:
        return form
    return None if storage == param_dtype else storage


def _plan_arrays(
    cg: GroupState,
    s: ScaleBySophiaState,
    names: list[str],
    param_dtypes: dict[str, str],
    given: dict[str, Any] | None,
    convert: bool,
    si: int,
) -> dict[tuple[str, str], Any]:
    """Each array of Sophia state ``si`` as the template stores it; raises before any change."""
    out = {}
    for kind in ("mu", "hessian"):
        for n, x in group_leaves(s, names, kind):
            y, dt = getattr(cg, kind)[n], cg.dtypes[f"{kind}/{n}"]
            shape = forms.array_shape(x)
            if forms.array_shape(y) != shape:
                fail(
                    f"sophia.interop: the checkpoint's {kind} of {n!r} has shape "
                    f"{forms.array_shape(y)} but the state's has shape {shape}"
                )
            storage = narrow.BLOCK8 if isinstance(x, narrow.Block8) else jnp.dtype(x.dtype).name
            param_dtype = param_dtypes[n]
            if param_dtype not in _DTYPES:
                fail(f"sophia.interop: parameter {n!r} is {param_dtype} (allowed: {_DTYPES})")
            form = _target_form(given, kind, storage, param_dtype)
            if forms.storage_of(form, param_dtype) != storage:
                fail(
                    f"sophia.interop: hyperparams give {forms.FORM_KEYS[kind]}={form!r}, but "
                    f"Sophia state {si} stores the {kind} of {n!r} as {storage}"
                )
            stored = (dt, forms.recorded_form(cg.hyperparams, kind))
            says = f"the state's is {storage}"
            how = forms.plan("sophia.interop", kind, n, stored, (storage, form), convert, says)
            if how == "convert":
                seed = (given or {}).get("seed", 0)
                y = forms.convert(y, dt, form, param_dtype, seed=seed, step=cg.step, kind=kind)
                dt = storage
            out[(kind, n)] = (y, dt)
    return out


def to_jax(
    checkpoint: Checkpoint,
    template: optax.OptState,
    params: optax.Params,
    *,
    names: Names = None,
    hyperparams: HyperParams | Sequence[HyperParams] = None,
    check_hyperparams: bool = True,
    convert_forms: bool = False,
) -> optax.OptState:
    """The optimizer state that continues from ``checkpoint``, shaped like ``template``.

    ``template`` is a fresh state of the target transform (``tx.init(params)``);
    each of its ``ScaleBySophiaState`` is matched to the checkpoint group with
    the same set of parameter names and gets its step, momentum, Hessian EMA,
    current rho, win rate and (if the checkpoint has one) PRNG key; a
    learning-rate schedule's counter in the same chain gets the step too. The
    ``hessian_norm``/``momentum_norm`` diagnostics are recomputed. Everything is
    checked (names, shapes, dtypes, and with ``check_hyperparams`` the
    checkpoint's recorded hyperparameters against ``hyperparams`` and the
    template's configured ``rho``) before the state is built; nothing is
    modified in place.

    Args:
      checkpoint: the state to load.
      template: ``tx.init(params)`` of the target optimizer.
      params: the parameter pytree (names and masking).
      names: how leaves are named, see :func:`jax_param_names`.
      hyperparams: the target transform's hyperparameters (as for
        :func:`from_jax`, or one per Sophia state), to check against the
        checkpoint's; the template itself knows only its configured ``rho``.
      check_hyperparams: raise if a hyperparameter known on both sides differs.
      convert_forms: where the checkpoint's narrow forms differ from the
        template's, decode the arrays and re-encode them in the template's forms
        (:mod:`sophia.interop.forms`; the stochastic forms with ``seed`` from
        ``hyperparams``, 0 where it gives none) instead of raising.

    Returns:
      The new optimizer state.
    """
    checkpoint.validate()
    names = jax_param_names(params, names)
    states = sophia_states(template)
    if not states:
        fail("sophia.interop: the template holds no ScaleBySophiaState (pass tx.init(params))")
    targets = _per_state(hyperparams, len(states))
    param_dtypes = dict(zip(names, (jnp.dtype(x.dtype).name for x in jax.tree.leaves(params))))
    claimed: set[str] = set()
    plans: dict[int, GroupState] = {}
    arrays: dict[int, dict[tuple[str, str], Any]] = {}
    for si, s in enumerate(states):
        g_names = [n for n, _ in group_leaves(s, names, "mu")]
        matches = [c for c in checkpoint.groups if set(c.names) == set(g_names)]
        if len(matches) != 1:
            fail(
                f"sophia.interop: Sophia state {si} of the template holds parameters {g_names}, "
                f"which match no group of the checkpoint (groups: "
                f"{[c.names for c in checkpoint.groups]})"
            )
        cg = matches[0]
        claimed.update(cg.names)
        sd = jnp.dtype(s.rho.dtype).name
        if sd != cg.scalar_dtype:
            fail(
                f"sophia.interop: Sophia state {si} has {sd} scalars but the checkpoint's group "
                f"has {cg.scalar_dtype} (float64 parameters on one side only?)"
            )
        if cg.step > _INT32_MAX:
            fail(f"sophia.interop: step {cg.step} does not fit JAX's int32 counter")
        if check_hyperparams:
            known = _template_hp(s) | (targets[si] or {})
            diffs = hyperparam_mismatches(cg.hyperparams, known, sd)
            if diffs:
                raise mismatch_error(f"sophia.interop: Sophia state {si}", diffs)
        arrays[si] = _plan_arrays(cg, s, names, param_dtypes, targets[si], convert_forms, si)
        if cg.key is not None:
            typed = jnp.issubdtype(s.key.dtype, jax.dtypes.prng_key)
            want = jax.random.key_data(s.key).shape if typed else s.key.shape
            impl = str(jax.random.key_impl(s.key)) if typed else None
            if cg.key.shape != want or cg.key_impl != impl:
                fail(
                    f"sophia.interop: the checkpoint's PRNG key ({cg.key_impl or 'raw'} "
                    f"{cg.key.shape}) does not fit the state's ({impl or 'raw'} {want})"
                )
        plans[si] = cg
    unused = sorted(set(checkpoint.names) - claimed)
    if unused:
        fail(f"sophia.interop: the template has no Sophia state for the parameters {unused}")

    counter = iter(range(len(states)))

    def fill(s: ScaleBySophiaState) -> ScaleBySophiaState:
        si = next(counter)
        cg, planned = plans[si], arrays[si]
        sd = s.rho.dtype

        def tree(field: str) -> Any:
            leaves, treedef = jax.tree.flatten(getattr(s, field), is_leaf=is_leaf)
            out = []
            for n, x in zip(names, leaves):
                out.append(x if is_masked(x) else _from_numpy(*planned[(field, n)]))
            return jax.tree.unflatten(treedef, out)

        mu, hessian = tree("mu"), tree("hessian")
        # the norm of the values h holds, as the refresh computes it
        values = jax.tree.map(
            lambda h: jnarrow.decode_block8(h) if jnarrow.is_block8(h) else h,
            hessian,
            is_leaf=is_leaf,
        )
        key = s.key
        if cg.key is not None:
            data = jnp.asarray(cg.key)
            typed = jnp.issubdtype(s.key.dtype, jax.dtypes.prng_key)
            key = jax.random.wrap_key_data(data, impl=cg.key_impl) if typed else data
        follow = s.label_count is not None and cg.label_count is not None
        return s._replace(
            label_count=jnp.asarray(cg.label_count, sd) if follow else s.label_count,
            count=jnp.asarray(cg.step, jnp.int32),
            mu=mu,
            hessian=hessian,
            key=key,
            rho=jnp.asarray(cg.rho, sd),
            win_rate=jnp.asarray(cg.win_rate, sd),
            hessian_norm=jnp.sqrt(sq_norm(values, sd)),
            momentum_norm=jnp.sqrt(sq_norm(mu, sd)),
        )

    def set_count(node: Any, s: ScaleBySophiaState) -> Any:
        return node._replace(count=jnp.asarray(s.count, jnp.asarray(node.count).dtype))

    return walk(template, fill, set_count)

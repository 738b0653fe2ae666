"""JAX side of :mod:`sophia.interop`: ``ScaleBySophiaState`` to and from a Checkpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sophia import spec
from sophia.interop.checkpoint import (
    HYPERPARAM_KEYS,
    Checkpoint,
    GroupState,
    fail,
    hyperparam_mismatches,
    mismatch_error,
    storage_array,
)
from sophia.jax.real_pairs import sq_norm
from sophia.jax.state import ScaleBySophiaState

__all__ = ["from_jax", "jax_param_names", "to_jax"]

_DTYPES = ("float16", "bfloat16", "float32", "float64")
_INT32_MAX = 2**31 - 1

Names = Sequence[str] | Callable[[tuple[Any, ...]], str] | None
HyperParams = spec.SophiaHyperParams | Mapping[str, Any] | None


def _key_name(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def jax_param_names(params: optax.Params, names: Names = None) -> list[str]:
    """One name per leaf of ``params`` (in ``jax.tree.leaves`` order).

    Args:
      params: the parameter pytree.
      names: ``None``: the leaf's path, its dict keys, sequence indices and
        attribute names joined by ``"."`` (``{"fc1": {"weight": w}}`` gives
        ``"fc1.weight"``, as ``named_parameters()`` does; a flat dict keyed by
        torch names gives those names); a function of the path
        (``jax.tree_util`` keys) returning the name; or a list of names.

    Returns:
      The names.
    """
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    if names is None:
        out = [".".join(_key_name(k) for k in p) for p in paths]
    elif callable(names):
        out = [names(p) for p in paths]
    else:
        if isinstance(names, str):
            fail("sophia.interop: names must be a list of strings, not a string")
        out = list(names)
        if len(out) != len(paths):
            fail(f"sophia.interop: got {len(out)} names for {len(paths)} parameter leaves")
    if not all(isinstance(n, str) and n for n in out):
        fail("sophia.interop: parameter names must be non-empty strings")
    if len(set(out)) != len(out):
        dup = sorted({n for n in out if out.count(n) > 1})
        fail(f"sophia.interop: parameter names are not unique: {dup}")
    return out


# ------------------------------------------------------------------------ state traversal


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode) or x is None


def _walk(node: Any, on_state: Callable[[Any], Any], on_count: Callable[[Any, Any], Any]) -> Any:
    """Rebuilds ``node`` with ``on_state`` applied to every ``ScaleBySophiaState``.

    ``on_count(node, new_sophia_state)`` is applied to step counters that run
    alongside a Sophia state: an ``optax.ScaleByScheduleState`` in the same chain
    (a learning-rate schedule) and the ``count`` of an
    ``optax.inject_hyperparams`` state wrapping one.
    """
    if isinstance(node, ScaleBySophiaState):
        return on_state(node)
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        new = type(node)(*(_walk(c, on_state, on_count) for c in node))
        if "count" in node._fields and "inner_state" in node._fields:
            inner = [s for s in _states(new.inner_state)]
            if inner:
                new = on_count(new, inner[0])
        return new
    if isinstance(node, (tuple, list)):
        children = [_walk(c, on_state, on_count) for c in node]
        direct = [c for c in children if isinstance(c, ScaleBySophiaState)]
        if direct:
            children = [
                on_count(c, direct[0]) if isinstance(c, optax.ScaleByScheduleState) else c
                for c in children
            ]
        return type(node)(children)
    if isinstance(node, dict):
        return {k: _walk(v, on_state, on_count) for k, v in node.items()}
    return node


def _states(tree: Any) -> list[ScaleBySophiaState]:
    found: list[ScaleBySophiaState] = []

    def visit(s: ScaleBySophiaState) -> ScaleBySophiaState:
        found.append(s)
        return s

    _walk(tree, visit, lambda n, s: n)
    return found


def _group_leaves(state: ScaleBySophiaState, names: list[str], field: str) -> list[tuple]:
    leaves, _ = jax.tree.flatten(getattr(state, field), is_leaf=_is_masked)
    if len(leaves) != len(names):
        fail(
            f"sophia.interop: the state's {field} has {len(leaves)} leaves but the parameters "
            f"have {len(names)}; pass the parameter pytree the state was made for"
        )
    return [(n, x) for n, x in zip(names, leaves) if not _is_masked(x)]


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
        unknown = set(d) - set(HYPERPARAM_KEYS)
        if unknown:
            fail(f"sophia.interop: unknown hyperparameters {sorted(unknown)}")
        return {k: (bool(v) if k in ("maximize", "dynamic") else float(v)) for k, v in d.items()}
    fail(f"sophia.interop: hyperparams must be a SophiaHyperParams or a dict, got {hp!r}")
    return None


def _template_hp(s: ScaleBySophiaState) -> dict[str, Any]:
    """What a fresh state (``tx.init(params)``) knows of its hyperparameters: the configured rho.

    The configuration lives in the transform, not in the state; a fresh state's
    ``rho`` is the configured one (the dynamic rule has not moved it yet).
    """
    return {"rho": float(s.rho)} if int(s.count) == 0 else {}


def _to_numpy(x: jax.Array, what: str) -> tuple[np.ndarray, str]:
    name = jnp.dtype(x.dtype).name
    if name not in _DTYPES:
        fail(f"sophia.interop: {what} has dtype {name} (allowed: {_DTYPES})")
    return storage_array(np.array(x, copy=True), name), name


def _from_numpy(x: np.ndarray, dtype: str) -> jax.Array:
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
    states = _states(opt_state)
    if not states:
        fail(
            "sophia.interop: opt_state holds no ScaleBySophiaState; pass the state of "
            "sophia_g / sophia_h (or of a chain or multi_transform containing one)"
        )
    hps = _per_state(hyperparams, len(states))
    groups = []
    for s, hp in zip(states, hps):
        mu, hess, dtypes = {}, {}, {}
        mu_leaves = _group_leaves(s, names, "mu")
        for n, x in mu_leaves:
            mu[n], dtypes[f"mu/{n}"] = _to_numpy(x, f"mu of {n!r}")
        for n, x in _group_leaves(s, names, "hessian"):
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


def to_jax(
    checkpoint: Checkpoint,
    template: optax.OptState,
    params: optax.Params,
    *,
    names: Names = None,
    hyperparams: HyperParams | Sequence[HyperParams] = None,
    check_hyperparams: bool = True,
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

    Returns:
      The new optimizer state.
    """
    checkpoint.validate()
    names = jax_param_names(params, names)
    states = _states(template)
    if not states:
        fail("sophia.interop: the template holds no ScaleBySophiaState (pass tx.init(params))")
    targets = _per_state(hyperparams, len(states))
    claimed: set[str] = set()
    plans: dict[int, GroupState] = {}
    for si, s in enumerate(states):
        g_names = [n for n, _ in _group_leaves(s, names, "mu")]
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
        for field, kind in (("mu", "mu"), ("hessian", "hessian")):
            for n, x in _group_leaves(s, names, field):
                y, dt = getattr(cg, kind)[n], cg.dtypes[f"{kind}/{n}"]
                if tuple(y.shape) != tuple(x.shape):
                    fail(
                        f"sophia.interop: the checkpoint's {kind} of {n!r} has shape "
                        f"{tuple(y.shape)} but the state's has shape {tuple(x.shape)}"
                    )
                if dt != jnp.dtype(x.dtype).name:
                    fail(
                        f"sophia.interop: the checkpoint's {kind} of {n!r} is {dt} but the "
                        f"state's is {jnp.dtype(x.dtype).name}"
                    )
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
        cg = plans[next(counter)]
        sd = s.rho.dtype

        def tree(field: str) -> Any:
            leaves, treedef = jax.tree.flatten(getattr(s, field), is_leaf=_is_masked)
            out = []
            for n, x in zip(names, leaves):
                if _is_masked(x):
                    out.append(x)
                else:
                    out.append(_from_numpy(getattr(cg, field)[n], cg.dtypes[f"{field}/{n}"]))
            return jax.tree.unflatten(treedef, out)

        mu, hessian = tree("mu"), tree("hessian")
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
            hessian_norm=jnp.sqrt(sq_norm(hessian, sd)),
            momentum_norm=jnp.sqrt(sq_norm(mu, sd)),
        )

    def set_count(node: Any, s: ScaleBySophiaState) -> Any:
        return node._replace(count=jnp.asarray(s.count, jnp.asarray(node.count).dtype))

    return _walk(template, fill, set_count)

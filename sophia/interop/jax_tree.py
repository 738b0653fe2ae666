"""JAX pytrees for :mod:`sophia.interop`: parameter names, the Sophia states in an optax state."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

from sophia import narrow
from sophia.interop.checkpoint import fail
from sophia.jax.state import ScaleBySophiaState

__all__ = [
    "Names",
    "group_leaves",
    "is_leaf",
    "is_masked",
    "jax_param_names",
    "sophia_states",
    "walk",
]

#: How leaves are named: a list, a function of the path, or ``None`` (the path).
Names = Sequence[str] | Callable[[tuple[Any, ...]], str] | None


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


def is_masked(x: Any) -> bool:
    """A masked-out leaf (``optax.masked``) of a state tree."""
    return isinstance(x, optax.MaskedNode) or x is None


def is_leaf(x: Any) -> bool:
    """A leaf of a state tree: masked, or a block-form Hessian EMA (a NamedTuple, one leaf)."""
    return is_masked(x) or isinstance(x, narrow.Block8)


def walk(node: Any, on_state: Callable[[Any], Any], on_count: Callable[[Any, Any], Any]) -> Any:
    """Rebuilds ``node`` with ``on_state`` applied to every ``ScaleBySophiaState``.

    ``on_count(node, new_sophia_state)`` is applied to step counters that run
    alongside a Sophia state: an ``optax.ScaleByScheduleState`` in the same chain
    (a learning-rate schedule) and the ``count`` of an
    ``optax.inject_hyperparams`` state wrapping one.
    """
    if isinstance(node, ScaleBySophiaState):
        return on_state(node)
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        new = type(node)(*(walk(c, on_state, on_count) for c in node))
        if "count" in node._fields and "inner_state" in node._fields:
            inner = [s for s in sophia_states(new.inner_state)]
            if inner:
                new = on_count(new, inner[0])
        return new
    if isinstance(node, (tuple, list)):
        children = [walk(c, on_state, on_count) for c in node]
        direct = [c for c in children if isinstance(c, ScaleBySophiaState)]
        if direct:
            children = [
                on_count(c, direct[0]) if isinstance(c, optax.ScaleByScheduleState) else c
                for c in children
            ]
        return type(node)(children)
    if isinstance(node, dict):
        return {k: walk(v, on_state, on_count) for k, v in node.items()}
    return node


def sophia_states(tree: Any) -> list[ScaleBySophiaState]:
    """Every ``ScaleBySophiaState`` in ``tree``, in the order :func:`walk` visits them."""
    found: list[ScaleBySophiaState] = []

    def visit(s: ScaleBySophiaState) -> ScaleBySophiaState:
        found.append(s)
        return s

    walk(tree, visit, lambda n, s: n)
    return found


def group_leaves(state: ScaleBySophiaState, names: list[str], field: str) -> list[tuple]:
    """``(name, leaf)`` of a state's ``mu`` or ``hessian``, masked leaves left out."""
    leaves, _ = jax.tree.flatten(getattr(state, field), is_leaf=is_leaf)
    if len(leaves) != len(names):
        fail(
            f"sophia.interop: the state's {field} has {len(leaves)} leaves but the parameters "
            f"have {len(names)}; pass the parameter pytree the state was made for"
        )
    return [(n, x) for n, x in zip(names, leaves) if not is_masked(x)]

"""Optimizer states read back from checkpoints, including those of an earlier state layout.

Checkpoint libraries restore a state either into a target of the current
structure (which fails on an older layout with the library's own message) or
as a raw tree of dicts and lists (orbax's ``restore`` without a target, flax's
state dicts). :func:`state_from_raw` turns the raw form into the structure of a
freshly initialized state, upgrading a :class:`ScaleBySophiaState` saved in
layout version 1 and naming both versions for anything else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sophia.jax.state import STATE_LAYOUT_VERSION, ScaleBySophiaState

__all__ = ["V1_CONFIG_FIELDS", "state_from_raw", "upgrade_fields"]

#: Fields of a layout-version-1 :class:`ScaleBySophiaState` that held configuration;
#: version 2 keeps it in the transform's closure.
V1_CONFIG_FIELDS = ("b2", "rho0", "dynamic", "bs", "eps", "step_diagnostics", "bs_from_refresh")


def upgrade_fields(fields: Mapping[str, Any], like: ScaleBySophiaState) -> dict[str, Any]:
    """The fields of a saved Sophia state in the current layout (version 1 upgraded).

    Args:
      fields: the saved state's fields by name.
      like: a state of the current layout, from ``tx.init`` of the same transform.

    Returns:
      The fields of ``like``'s layout: unchanged for a version-2 state; for a
      version-1 state its configuration fields dropped and its ``bs`` (the one in
      force) kept as ``label_count`` where the transform follows the refresh
      (``bs=None``).

    Raises:
      ValueError: the fields are those of neither layout.
    """
    current = set(like._fields)
    if set(fields) == current or set(fields) == current - {"label_count"}:
        return dict(fields)
    v2 = current - {"label_count"}
    if set(fields) != v2 | set(V1_CONFIG_FIELDS):
        raise ValueError(
            f"sophia: a saved ScaleBySophiaState with fields {sorted(fields)} is neither "
            f"layout version 1 nor {STATE_LAYOUT_VERSION} (fields {list(like._fields)})"
        )
    follows = like.label_count is not None
    return {k: fields[k] for k in v2} | {"label_count": fields["bs"] if follows else None}


def state_from_raw(raw: Any, like: Any) -> Any:
    """An optimizer state restored without a target, in the structure of ``like``.

    ``raw`` is what a checkpoint library gives back without a target: named
    tuples as dicts of their fields, tuples as lists (orbax's
    ``PyTreeCheckpointer().restore(path)``). Sophia states saved in layout
    version 1 are upgraded (:func:`upgrade_fields`).

    Args:
      raw: the restored tree.
      like: a state of the current layout, e.g. ``tx.init(params)``.

    Returns:
      ``like``'s structure holding ``raw``'s arrays.

    Raises:
      ValueError: ``raw`` does not match ``like`` (naming where), or holds a
        Sophia state of an unknown layout (naming the versions).
    """
    return _walk(raw, like, "state")


def _walk(raw: Any, like: Any, where: str) -> Any:
    if isinstance(like, tuple) and hasattr(like, "_fields"):  # a NamedTuple
        if not like._fields:
            return like  # optax's EmptyState and kin: nothing was saved
        if not isinstance(raw, Mapping):
            raise ValueError(f"sophia: {where} should be {type(like).__name__}, got {type(raw)}")
        fields = upgrade_fields(raw, like) if isinstance(like, ScaleBySophiaState) else raw
        missing = set(like._fields) - set(fields)
        if missing - {"label_count"} or (missing and like.label_count is not None):
            raise ValueError(f"sophia: {where} lacks the fields {sorted(missing)}")
        return type(like)(
            **{f: _walk(fields.get(f), getattr(like, f), f"{where}.{f}") for f in like._fields}
        )
    if isinstance(like, (tuple, list)):
        if not isinstance(raw, (tuple, list, Mapping)) or len(raw) != len(like):
            raise ValueError(f"sophia: {where} should hold {len(like)} entries, got {raw!r:.80}")
        items = raw.values() if isinstance(raw, Mapping) else raw
        return type(like)(_walk(r, x, f"{where}[{i}]") for i, (r, x) in enumerate(zip(items, like)))
    if isinstance(like, Mapping):
        if not isinstance(raw, Mapping) or set(raw) != set(like):
            raise ValueError(f"sophia: {where} should have the keys {sorted(like)}")
        return type(like)({k: _walk(raw[k], like[k], f"{where}[{k!r}]") for k in like})
    if like is None:
        return None
    return raw

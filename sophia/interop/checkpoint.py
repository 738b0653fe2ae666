"""The framework-neutral SophiaG optimizer state: groups of NumPy arrays, checked whole.

NumPy only. Its file format is :mod:`sophia.interop.checkpoint_file`; how the
narrow state's forms are stored and converted is :mod:`sophia.interop.forms`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any, NoReturn

import numpy as np

from sophia import narrow, spec
from sophia.interop import forms

__all__ = [
    "HYPERPARAM_KEYS",
    "NARROW_KEYS",
    "RECORDED_KEYS",
    "Checkpoint",
    "GroupState",
]

#: The numeric and boolean hyperparameters a checkpoint can record per group (any
#: may be missing, e.g. ``lr`` when JAX used a schedule). ``rho`` is the
#: configured value (the centre of the dynamic range); the current one is
#: :attr:`GroupState.rho`.
HYPERPARAM_KEYS = ("lr", "b1", "b2", "rho", "weight_decay", "eps", "bs", "maximize", "dynamic")
#: The narrow state's configuration (:mod:`sophia.narrow`): the forms (a canonical
#: name or ``None``, the parameter's dtype) and the rounding seed.
NARROW_KEYS = ("mu_dtype", "hessian_dtype", "seed")
#: Everything a group's ``hyperparams`` may hold.
RECORDED_KEYS = HYPERPARAM_KEYS + NARROW_KEYS

_SCALAR_DTYPES = ("float32", "float64")


def fail(msg: str) -> NoReturn:
    """Raises ``ValueError(msg)``: how every part of :mod:`sophia.interop` refuses input."""
    raise ValueError(msg)


def storage_array(x: np.ndarray, dtype: str) -> np.ndarray:
    """How an array of logical dtype ``dtype`` is held: bfloat16 as uint16 bits.

    Args:
      x: an array whose dtype is ``dtype`` (an ``ml_dtypes.bfloat16`` array or
        uint16 bits for ``"bfloat16"``).
      dtype: the logical dtype name.

    Returns:
      A NumPy array with a NumPy-native dtype.
    """
    x = np.asarray(x)
    if dtype == "bfloat16":
        if x.dtype == np.uint16:
            return x
        if x.dtype.name != "bfloat16":
            fail(f"expected a bfloat16 array, got {x.dtype}")
        return x.view(np.uint16)
    return x


def _expected_storage(dtype: str) -> np.dtype:
    return np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)


def _check_array(x: Any, dt: Any, kind: str, where: str) -> None:
    """Raises unless ``x`` holds a ``kind`` array stored as ``dt``."""
    allowed = forms.MU_STORAGE if kind == "mu" else forms.HESSIAN_STORAGE
    if dt not in allowed:
        fail(f"{where} has dtype {dt!r} (allowed: {allowed})")
    if dt == narrow.BLOCK8:
        forms.check_block8(x, where)
    elif not isinstance(x, np.ndarray) or x.dtype != _expected_storage(dt):
        got = getattr(x, "dtype", type(x).__name__)
        fail(f"{where} is declared {dt} but holds {got} (expected {_expected_storage(dt)})")


@dataclasses.dataclass
class GroupState:
    """State of one torch param group, i.e. of one JAX ``ScaleBySophiaState``.

    Attributes:
      names: the group's parameter names, in the group's order.
      step: steps taken (torch's group step, JAX's ``count``).
      rho: current rho, a 0-d float32/float64 array (the group's scalar dtype).
      win_rate: fraction of coordinates with ``r < 1`` in the last step, 0-d,
        same dtype as ``rho`` (NaN where unknown).
      mu: momentum per name (torch ``exp_avg``, JAX ``mu``), as stored.
      hessian: Hessian EMA per name, as stored: an array, or for the
        ``"block8"`` form a :class:`sophia.narrow.Block8` of NumPy arrays (torch
        ``hessian`` and ``hessian_scale``).
      dtypes: how each array is stored, keyed ``"mu/<name>"`` and
        ``"hessian/<name>"``: a dtype name (``"bfloat16"`` arrays are held as
        uint16 bits) or ``"block8"``.
      hyperparams: the recorded hyperparameters (keys from
        :data:`RECORDED_KEYS`; missing keys are unknown), the narrow state's
        forms and seed among them.
      key: raw ``uint32`` data of the JAX PRNG key of the built-in estimator,
        or ``None`` (a torch state has none).
      key_impl: the JAX PRNG implementation name of a typed key, or ``None``
        for a raw ``uint32`` key.
      label_count: the number of labels of the latest GNB refresh (the ``bs``
        a ``bs=None`` optimizer uses), or ``None`` if unknown.
    """

    names: list[str]
    step: int
    rho: np.ndarray
    win_rate: np.ndarray
    mu: dict[str, np.ndarray]
    hessian: dict[str, np.ndarray]
    dtypes: dict[str, str]
    hyperparams: dict[str, Any]
    key: np.ndarray | None = None
    key_impl: str | None = None
    label_count: int | None = None

    @property
    def scalar_dtype(self) -> str:
        """``"float64"`` if any parameter is float64, else ``"float32"`` (as in the spec)."""
        return str(np.asarray(self.rho).dtype)

    def array(self, kind: str, name: str) -> np.ndarray:
        """``mu`` or ``hessian`` of ``name`` in its logical dtype (bfloat16 needs ``ml_dtypes``).

        Args:
          kind: ``"mu"`` or ``"hessian"``.
          name: a parameter name of this group.

        Returns:
          The array (a :class:`sophia.narrow.Block8` for the ``"block8"`` form).
        """
        x = getattr(self, kind)[name]
        if self.dtypes[f"{kind}/{name}"] == "bfloat16":
            import ml_dtypes

            return x.view(ml_dtypes.bfloat16)
        return x


@dataclasses.dataclass
class Checkpoint:
    """SophiaG optimizer state in NumPy, independent of either framework.

    Attributes:
      groups: one :class:`GroupState` per torch param group / JAX
        ``ScaleBySophiaState``.
    """

    groups: list[GroupState]

    @property
    def names(self) -> list[str]:
        """All parameter names, group after group."""
        return [n for g in self.groups for n in g.names]

    def group_of(self, name: str) -> GroupState:
        """The group holding parameter ``name``.

        Args:
          name: a parameter name.

        Returns:
          The :class:`GroupState`.
        """
        for g in self.groups:
            if name in g.mu:
                return g
        raise KeyError(name)

    def validate(self) -> None:
        """Checks the whole checkpoint; raises ``ValueError`` naming the first problem."""
        if not isinstance(self.groups, list) or not self.groups:
            fail("sophia checkpoint: no param groups")
        seen: set[str] = set()
        for gi, g in enumerate(self.groups):
            where = f"sophia checkpoint, group {gi}"
            if not isinstance(g, GroupState):
                fail(f"{where}: expected a GroupState, got {type(g).__name__}")
            if not isinstance(g.names, list) or not all(isinstance(n, str) and n for n in g.names):
                fail(f"{where}: names must be a list of non-empty strings")
            for n in g.names:
                if n in seen:
                    fail(f"{where}: parameter name {n!r} appears twice")
                seen.add(n)
            if isinstance(g.step, bool) or not isinstance(g.step, (int, np.integer)):
                fail(f"{where}: step must be an integer, got {g.step!r}")
            if g.step < 0:
                fail(f"{where}: step must be >= 0, got {g.step}")
            for kind in ("mu", "hessian"):
                arrays = getattr(g, kind)
                if not isinstance(arrays, Mapping) or set(arrays) != set(g.names):
                    got = sorted(arrays) if isinstance(arrays, Mapping) else arrays
                    fail(f"{where}: {kind} must have exactly the names {g.names}, got {got}")
            _validate_hyperparams(g.hyperparams, where)
            wide = False
            for n in g.names:
                shapes = []
                for kind in ("mu", "hessian"):
                    dt = g.dtypes.get(f"{kind}/{n}")
                    _check_array(getattr(g, kind)[n], dt, kind, f"{where}: {kind} of {n!r}")
                    shapes.append(forms.array_shape(getattr(g, kind)[n]))
                    wide |= dt == "float64"
                if shapes[0] != shapes[1]:
                    fail(
                        f"{where}: mu of {n!r} has shape {shapes[0]} but its hessian has "
                        f"shape {shapes[1]}"
                    )
            extra = set(g.dtypes) - {f"{k}/{n}" for k in ("mu", "hessian") for n in g.names}
            if extra:
                fail(f"{where}: dtypes for unknown arrays {sorted(extra)}")
            _check_scalars(g, wide, where)
            if g.key is not None:
                if not isinstance(g.key, np.ndarray) or g.key.dtype != np.uint32:
                    fail(f"{where}: key must be a uint32 array of raw PRNG key data")
            if g.key_impl is not None and (g.key is None or not isinstance(g.key_impl, str)):
                fail(f"{where}: key_impl needs a key and must be a string")
            lc = g.label_count
            if lc is not None and (
                isinstance(lc, bool) or not isinstance(lc, (int, np.integer)) or lc < 1
            ):
                fail(f"{where}: label_count must be an integer >= 1 or None, got {lc!r}")


def _check_scalars(g: GroupState, wide: bool, where: str) -> None:
    """Checks ``rho`` and ``win_rate``: 0-d arrays of the group's scalar dtype, in range.

    float64 where a state array is; float32 where both forms are recorded as
    ``None`` (arrays in the parameters' dtype) and none is float64. Otherwise
    (narrow forms can hide a float64 parameter) either; the loaders check it
    against the target's parameters.
    """
    in_param_dtype = all(g.hyperparams.get(k, "") is None for k in forms.FORM_KEYS.values())
    allowed = ("float64",) if wide else ("float32",) if in_param_dtype else _SCALAR_DTYPES
    want = " or ".join(allowed)
    for field in ("rho", "win_rate"):
        x = getattr(g, field)
        ok = isinstance(x, np.ndarray) and x.shape == () and str(x.dtype) in allowed
        if not ok or x.dtype != np.asarray(g.rho).dtype:
            got = (getattr(x, "dtype", type(x).__name__), getattr(x, "shape", None))
            fail(
                f"{where}: {field} must be a 0-d {want} array (the scalar dtype of "
                f"the group's parameters), got {got}"
            )
    if not float(g.rho) > 0 or math.isinf(float(g.rho)):
        fail(f"{where}: rho must be a number in (0, inf), got {float(g.rho)!r}")
    wr = float(g.win_rate)
    if not (math.isnan(wr) or 0.0 <= wr <= 1.0):
        fail(f"{where}: win_rate must be in [0, 1] (or NaN), got {wr!r}")


def _validate_hyperparams(hp: Any, where: str) -> None:
    if not isinstance(hp, Mapping):
        fail(f"{where}: hyperparams must be a mapping, got {type(hp).__name__}")
    unknown = set(hp) - set(RECORDED_KEYS)
    if unknown:
        fail(f"{where}: unknown hyperparameters {sorted(unknown)} (allowed: {RECORDED_KEYS})")
    kw: dict[str, Any] = {}
    for k, v in hp.items():
        if k in forms.FORM_KEYS.values():
            if v is not None and not isinstance(v, str):
                fail(f"{where}: hyperparameter {k} must be a form's name or None, got {v!r}")
        elif k == "seed":
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                fail(f"{where}: hyperparameter seed must be an integer, got {v!r}")
        elif k in ("maximize", "dynamic"):
            if not isinstance(v, bool):
                fail(f"{where}: hyperparameter {k} must be true or false, got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            fail(f"{where}: hyperparameter {k} must be a number, got {v!r}")
        if k not in ("b1", "b2"):
            kw[k] = v
    betas = (hp.get("b1", spec.DEFAULTS.betas[0]), hp.get("b2", spec.DEFAULTS.betas[1]))
    try:
        spec.validate(betas=betas, **kw)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def hyperparam_mismatches(
    recorded: Mapping[str, Any], actual: Mapping[str, Any], scalar_dtype: str = "float64"
) -> list[tuple[str, Any, Any]]:
    """``(name, recorded, actual)`` for every hyperparameter both know and that differs.

    Numbers are compared after rounding to ``scalar_dtype``, the dtype the update
    uses them in (see :mod:`sophia.spec`): a float32 group reads ``0.99`` and
    ``float32(0.99)`` alike. The seed is compared exactly; the forms are not
    compared here but by :func:`sophia.interop.forms.plan`, whose remedy differs
    (``convert_forms=True``).

    Args:
      recorded: the checkpoint's hyperparameters.
      actual: the target's.
      scalar_dtype: ``"float32"`` or ``"float64"``.

    Returns:
      The differences.
    """
    c = np.dtype(scalar_dtype).type
    out = []
    for k in (*HYPERPARAM_KEYS, "seed"):
        if k not in recorded or k not in actual:
            continue
        a, b = recorded[k], actual[k]
        exact = k == "seed" or isinstance(a, bool) or isinstance(b, bool)
        same = a == b if exact else c(a) == c(b)
        if not same:
            out.append((k, a, b))
    return out


def mismatch_error(where: str, diffs: list[tuple[str, Any, Any]]) -> ValueError:
    """The ``ValueError`` for differing hyperparameters.

    Args:
      where: what is being loaded into.
      diffs: from :func:`hyperparam_mismatches`.

    Returns:
      The error, to raise.
    """
    parts = ", ".join(f"{k}: checkpoint {a!r} vs {b!r}" for k, a, b in diffs)
    return ValueError(
        f"{where}: hyperparameters differ from the checkpoint's ({parts}); the trajectory would "
        "not continue. Build the optimizer with the checkpoint's values, or pass "
        "check_hyperparams=False to change them on purpose"
    )

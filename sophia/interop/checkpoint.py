"""The framework-neutral SophiaG optimizer state and its safetensors file format.

NumPy only (``safetensors`` is imported by :func:`save` and :func:`load`).

File layout (format version 1). Tensors, for every parameter ``name`` and
param group ``i``:

* ``mu/<name>``, ``hessian/<name>``: momentum and Hessian EMA, in their storage
  dtype (bfloat16 as its uint16 bit pattern, since NumPy has no bfloat16);
* ``group<i>/rho``, ``group<i>/win_rate``: 0-d, the group's scalar dtype;
* ``group<i>/step``: 0-d int64;
* ``group<i>/key``: optional, the raw ``uint32`` data of a JAX PRNG key;
* ``group<i>/label_count``: optional, 0-d int64, the label count of the latest
  GNB refresh (the ``bs`` that ``bs=None`` follows).

The safetensors metadata holds ``format`` (:data:`FORMAT_NAME`),
``format_version`` (:data:`FORMAT_VERSION`) and ``sophia``: JSON with, per
group, the parameter names, the hyperparameters, the logical dtypes of the
arrays and the PRNG key implementation. :func:`load` checks all of it before
returning anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any, NoReturn

import numpy as np

from sophia import spec

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HYPERPARAM_KEYS",
    "Checkpoint",
    "GroupState",
    "load",
    "save",
]

#: The ``format`` entry of the file's metadata.
FORMAT_NAME = "sophiag-optimizer-state"
#: The version this module writes and the only one it reads.
FORMAT_VERSION = 1
#: Hyperparameters a checkpoint can record per group (any may be missing, e.g.
#: ``lr`` when JAX used a schedule). ``rho`` is the configured value (the
#: centre of the dynamic range); the current one is :attr:`GroupState.rho`.
HYPERPARAM_KEYS = ("lr", "b1", "b2", "rho", "weight_decay", "eps", "bs", "maximize", "dynamic")

_DTYPES = ("float16", "bfloat16", "float32", "float64")
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


@dataclasses.dataclass
class GroupState:
    """State of one torch param group, i.e. of one JAX ``ScaleBySophiaState``.

    Attributes:
      names: the group's parameter names, in the group's order.
      step: steps taken (torch's group step, JAX's ``count``).
      rho: current rho, a 0-d float32/float64 array (the group's scalar dtype).
      win_rate: fraction of coordinates with ``r < 1`` in the last step, 0-d,
        same dtype as ``rho`` (NaN where unknown).
      mu: momentum per name (torch ``exp_avg``, JAX ``mu``).
      hessian: Hessian EMA per name.
      dtypes: logical dtype per array, keyed ``"mu/<name>"`` and
        ``"hessian/<name>"`` (``"bfloat16"`` arrays are held as uint16 bits).
      hyperparams: the recorded hyperparameters (keys from
        :data:`HYPERPARAM_KEYS`; missing keys are unknown).
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
          The array.
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
            wide = False
            for n in g.names:
                shapes = []
                for kind in ("mu", "hessian"):
                    x = getattr(g, kind)[n]
                    dt = g.dtypes.get(f"{kind}/{n}")
                    if dt not in _DTYPES:
                        fail(f"{where}: {kind} of {n!r} has dtype {dt!r} (allowed: {_DTYPES})")
                    if not isinstance(x, np.ndarray) or x.dtype != _expected_storage(dt):
                        got = getattr(x, "dtype", type(x).__name__)
                        fail(
                            f"{where}: {kind} of {n!r} is declared {dt} but holds {got} "
                            f"(expected {_expected_storage(dt)})"
                        )
                    shapes.append(x.shape)
                if shapes[0] != shapes[1]:
                    fail(
                        f"{where}: mu of {n!r} has shape {shapes[0]} but its hessian has "
                        f"shape {shapes[1]}"
                    )
                wide |= g.dtypes[f"hessian/{n}"] == "float64"
            extra = set(g.dtypes) - {f"{k}/{n}" for k in ("mu", "hessian") for n in g.names}
            if extra:
                fail(f"{where}: dtypes for unknown arrays {sorted(extra)}")
            want_sd = "float64" if wide else "float32"
            for field in ("rho", "win_rate"):
                x = getattr(g, field)
                if not isinstance(x, np.ndarray) or x.shape != () or str(x.dtype) != want_sd:
                    got = (getattr(x, "dtype", type(x).__name__), getattr(x, "shape", None))
                    fail(
                        f"{where}: {field} must be a 0-d {want_sd} array (the scalar dtype of "
                        f"the group's parameters), got {got}"
                    )
            if not float(g.rho) > 0 or math.isinf(float(g.rho)):
                fail(f"{where}: rho must be a number in (0, inf), got {float(g.rho)!r}")
            wr = float(g.win_rate)
            if not (math.isnan(wr) or 0.0 <= wr <= 1.0):
                fail(f"{where}: win_rate must be in [0, 1] (or NaN), got {wr!r}")
            _validate_hyperparams(g.hyperparams, where)
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


def _validate_hyperparams(hp: Any, where: str) -> None:
    if not isinstance(hp, Mapping):
        fail(f"{where}: hyperparams must be a mapping, got {type(hp).__name__}")
    unknown = set(hp) - set(HYPERPARAM_KEYS)
    if unknown:
        fail(f"{where}: unknown hyperparameters {sorted(unknown)} (allowed: {HYPERPARAM_KEYS})")
    kw: dict[str, Any] = {}
    for k, v in hp.items():
        if k in ("maximize", "dynamic"):
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
    ``float32(0.99)`` alike.

    Args:
      recorded: the checkpoint's hyperparameters.
      actual: the target's.
      scalar_dtype: ``"float32"`` or ``"float64"``.

    Returns:
      The differences.
    """
    c = np.dtype(scalar_dtype).type
    out = []
    for k in HYPERPARAM_KEYS:
        if k not in recorded or k not in actual:
            continue
        a, b = recorded[k], actual[k]
        same = a == b if isinstance(a, bool) or isinstance(b, bool) else c(a) == c(b)
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


# ---------------------------------------------------------------------------- file format


def save(path: str | os.PathLike, checkpoint: Checkpoint) -> None:
    """Writes ``checkpoint`` as a safetensors file (see the module docstring).

    Args:
      path: file to write.
      checkpoint: a valid :class:`Checkpoint` (checked first).
    """
    from safetensors.numpy import save_file

    checkpoint.validate()
    tensors: dict[str, np.ndarray] = {}
    groups = []
    for gi, g in enumerate(checkpoint.groups):
        for n in g.names:
            tensors[f"mu/{n}"] = np.array(g.mu[n], order="C")  # 0-d stays 0-d
            tensors[f"hessian/{n}"] = np.array(g.hessian[n], order="C")
        tensors[f"group{gi}/rho"] = np.asarray(g.rho)
        tensors[f"group{gi}/win_rate"] = np.asarray(g.win_rate)
        tensors[f"group{gi}/step"] = np.asarray(int(g.step), np.int64)
        if g.key is not None:
            tensors[f"group{gi}/key"] = np.array(g.key, order="C")
        if g.label_count is not None:
            tensors[f"group{gi}/label_count"] = np.asarray(int(g.label_count), np.int64)
        groups.append(
            {
                "names": list(g.names),
                "hyperparams": dict(g.hyperparams),
                "dtypes": dict(g.dtypes),
                "has_key": g.key is not None,
                "key_impl": g.key_impl,
            }
        )
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "sophia": json.dumps({"groups": groups}),
    }
    save_file(tensors, os.fspath(path), metadata=metadata)


def load(path: str | os.PathLike) -> Checkpoint:
    """Reads a file written by :func:`save`, checking everything first.

    Needs NumPy and ``safetensors`` only.

    Args:
      path: file to read.

    Returns:
      The :class:`Checkpoint`.

    Raises:
      ValueError: not a SophiaG state file, another format version, or any key,
        shape or dtype that does not fit the header.
    """
    from safetensors import safe_open

    where = f"sophia checkpoint {os.fspath(path)!r}"
    try:
        with safe_open(os.fspath(path), framework="np") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: not a readable safetensors file ({e})") from None
    except Exception as e:  # noqa: BLE001 - safetensors' own error types vary across versions
        raise ValueError(f"{where}: not a readable safetensors file ({e})") from None
    if metadata.get("format") != FORMAT_NAME:
        fail(f"{where}: not a SophiaG optimizer state (format {metadata.get('format')!r})")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        fail(
            f"{where}: format version {metadata.get('format_version')!r} is not supported "
            f"(this sophia reads version {FORMAT_VERSION})"
        )
    try:
        header = json.loads(metadata.get("sophia", ""))
        raw_groups = header["groups"]
        if not isinstance(raw_groups, list):
            raise TypeError("groups is not a list")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where}: malformed 'sophia' header ({e})") from None
    expected: set[str] = set()
    groups = []
    for gi, rg in enumerate(raw_groups):
        if not isinstance(rg, dict) or not {"names", "hyperparams", "dtypes"} <= set(rg):
            fail(f"{where}: header of group {gi} lacks names/hyperparams/dtypes")
        names = rg["names"]
        if not isinstance(names, list) or not isinstance(rg["dtypes"], dict):
            fail(f"{where}: header of group {gi} is malformed")
        keys = [f"{k}/{n}" for n in names for k in ("mu", "hessian")]
        keys += [f"group{gi}/{k}" for k in ("rho", "win_rate", "step")]
        if rg.get("has_key"):
            keys.append(f"group{gi}/key")
        if f"group{gi}/label_count" in tensors:
            keys.append(f"group{gi}/label_count")
        missing = [k for k in keys if k not in tensors]
        if missing:
            fail(f"{where}: missing tensors {missing}")
        expected.update(keys)
        step = tensors[f"group{gi}/step"]
        if step.dtype != np.int64 or step.shape != ():
            fail(f"{where}: group{gi}/step must be a 0-d int64, got {step.dtype} {step.shape}")
        count = tensors.get(f"group{gi}/label_count")
        if count is not None and (count.dtype != np.int64 or count.shape != ()):
            fail(
                f"{where}: group{gi}/label_count must be a 0-d int64, got {count.dtype} "
                f"{count.shape}"
            )
        groups.append(
            GroupState(
                names=list(names),
                step=int(step),
                rho=tensors[f"group{gi}/rho"],
                win_rate=tensors[f"group{gi}/win_rate"],
                mu={n: tensors[f"mu/{n}"] for n in names},
                hessian={n: tensors[f"hessian/{n}"] for n in names},
                dtypes=dict(rg["dtypes"]),
                hyperparams=dict(rg["hyperparams"]),
                key=tensors.get(f"group{gi}/key") if rg.get("has_key") else None,
                key_impl=rg.get("key_impl"),
                label_count=None if count is None else int(count),
            )
        )
    extra = sorted(set(tensors) - expected)
    if extra:
        fail(f"{where}: unexpected tensors {extra}")
    ckpt = Checkpoint(groups)
    try:
        ckpt.validate()
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return ckpt

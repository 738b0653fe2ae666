"""The safetensors file of a :class:`sophia.interop.Checkpoint`, with its versioned JSON header.

NumPy and ``safetensors`` only. File layout (format version 2). Tensors, for
every parameter ``name`` and param group ``i``:

* ``mu/<name>``, ``hessian/<name>``: momentum and Hessian EMA as stored
  (bfloat16 as its uint16 bit pattern, since NumPy has no bfloat16; a
  ``"block8"`` Hessian EMA as its int8 codes);
* ``hessian_scale/<name>``: the float32 scales of a ``"block8"`` Hessian EMA,
  one per block of :data:`sophia.narrow.BLOCK_SIZE` coordinates;
* ``group<i>/rho``, ``group<i>/win_rate``: 0-d, the group's scalar dtype;
* ``group<i>/step``: 0-d int64;
* ``group<i>/key``: optional, the raw ``uint32`` data of a JAX PRNG key;
* ``group<i>/label_count``: optional, 0-d int64, the label count of the latest
  GNB refresh (the ``bs`` that ``bs=None`` follows).

The safetensors metadata holds ``format`` (:data:`FORMAT_NAME`),
``format_version`` (:data:`FORMAT_VERSION`) and ``sophia``: JSON with, per
group, the parameter names, the hyperparameters (the narrow state's
``mu_dtype``, ``hessian_dtype`` and ``seed`` among them), how each array is
stored and the PRNG key implementation. :func:`load` checks all of it before
returning anything.

Version 1 (before the narrow state) had no ``"block8"`` arrays and no narrow
hyperparameters; its files still load, their forms recorded as ``None`` (the
parameter's dtype, all that version 1 could hold).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from sophia import narrow
from sophia.interop.checkpoint import NARROW_KEYS, Checkpoint, GroupState, fail

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "READABLE_VERSIONS", "load", "save"]

#: The ``format`` entry of the file's metadata.
FORMAT_NAME = "sophiag-optimizer-state"
#: The version this module writes.
FORMAT_VERSION = 2
#: The versions :func:`load` reads.
READABLE_VERSIONS = (1, 2)


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
            h = g.hessian[n]
            if isinstance(h, narrow.Block8):
                tensors[f"hessian/{n}"] = np.array(h.codes, order="C")
                tensors[f"hessian_scale/{n}"] = np.array(h.scale, order="C")
            else:
                tensors[f"hessian/{n}"] = np.array(h, order="C")
        tensors[f"group{gi}/rho"] = np.asarray(g.rho)
        tensors[f"group{gi}/win_rate"] = np.asarray(g.win_rate)
        tensors[f"group{gi}/step"] = np.asarray(int(g.step), np.int64)
        if g.key is not None:
            tensors[f"group{gi}/key"] = np.array(g.key, order="C")
        if g.label_count is not None:
            tensors[f"group{gi}/label_count"] = np.asarray(int(g.label_count), np.int64)
        hp = {k: int(v) if k == "seed" else v for k, v in g.hyperparams.items()}
        groups.append(
            {
                "names": list(g.names),
                "hyperparams": hp,
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


def _read(path: str | os.PathLike, where: str) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="np") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: not a readable safetensors file ({e})") from None
    except Exception as e:  # noqa: BLE001 - safetensors' own error types vary across versions
        raise ValueError(f"{where}: not a readable safetensors file ({e})") from None
    return metadata, tensors


def _version(metadata: dict[str, str], where: str) -> int:
    if metadata.get("format") != FORMAT_NAME:
        fail(f"{where}: not a SophiaG optimizer state (format {metadata.get('format')!r})")
    text = metadata.get("format_version")
    readable = {str(v): v for v in READABLE_VERSIONS}
    if text not in readable:
        fail(
            f"{where}: format version {text!r} is not supported "
            f"(this sophia reads versions {', '.join(readable)})"
        )
    return readable[text]


def _scalar_int(tensors: dict[str, np.ndarray], key: str, where: str) -> int | None:
    x = tensors.get(key)
    if x is None:
        return None
    if x.dtype != np.int64 or x.shape != ():
        fail(f"{where}: {key} must be a 0-d int64, got {x.dtype} {x.shape}")
    return int(x)


def _group(
    gi: int, rg: Any, tensors: dict[str, np.ndarray], version: int, where: str
) -> tuple[GroupState, list[str]]:
    """Group ``gi`` of the header and the tensor keys it uses."""
    if not isinstance(rg, dict) or not {"names", "hyperparams", "dtypes"} <= set(rg):
        fail(f"{where}: header of group {gi} lacks names/hyperparams/dtypes")
    names, dtypes, hp = rg["names"], rg["dtypes"], rg["hyperparams"]
    if not isinstance(names, list) or not isinstance(dtypes, dict) or not isinstance(hp, dict):
        fail(f"{where}: header of group {gi} is malformed")
    block8 = [n for n in names if dtypes.get(f"hessian/{n}") == narrow.BLOCK8]
    if version == 1:
        narrow_keys = [k for k in NARROW_KEYS if k in hp]
        if block8 or narrow_keys:
            fail(
                f"{where}: a version-1 file holds no narrow state, but group {gi} has "
                f"{'block8 arrays' if block8 else narrow_keys}"
            )
        hp = {**hp, "mu_dtype": None, "hessian_dtype": None}  # all that version 1 could hold
    keys = [f"{k}/{n}" for n in names for k in ("mu", "hessian")]
    keys += [f"hessian_scale/{n}" for n in block8]
    keys += [f"group{gi}/{k}" for k in ("rho", "win_rate", "step")]
    if rg.get("has_key"):
        keys.append(f"group{gi}/key")
    if f"group{gi}/label_count" in tensors:
        keys.append(f"group{gi}/label_count")
    missing = [k for k in keys if k not in tensors]
    if missing:
        fail(f"{where}: missing tensors {missing}")
    step = _scalar_int(tensors, f"group{gi}/step", where)
    count = _scalar_int(tensors, f"group{gi}/label_count", where)

    def hessian(n: str) -> Any:
        if n in block8:
            return narrow.Block8(tensors[f"hessian/{n}"], tensors[f"hessian_scale/{n}"])
        return tensors[f"hessian/{n}"]

    group = GroupState(
        names=list(names),
        step=int(step),
        rho=tensors[f"group{gi}/rho"],
        win_rate=tensors[f"group{gi}/win_rate"],
        mu={n: tensors[f"mu/{n}"] for n in names},
        hessian={n: hessian(n) for n in names},
        dtypes=dict(dtypes),
        hyperparams=dict(hp),
        key=tensors.get(f"group{gi}/key") if rg.get("has_key") else None,
        key_impl=rg.get("key_impl"),
        label_count=count,
    )
    return group, keys


def load(path: str | os.PathLike) -> Checkpoint:
    """Reads a file written by :func:`save` (any of :data:`READABLE_VERSIONS`), checking it first.

    Needs NumPy and ``safetensors`` only.

    Args:
      path: file to read.

    Returns:
      The :class:`Checkpoint`.

    Raises:
      ValueError: not a SophiaG state file, an unsupported format version, or
        any key, shape or dtype that does not fit the header.
    """
    where = f"sophia checkpoint {os.fspath(path)!r}"
    metadata, tensors = _read(path, where)
    version = _version(metadata, where)
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
        group, keys = _group(gi, rg, tensors, version, where)
        expected.update(keys)
        groups.append(group)
    extra = sorted(set(tensors) - expected)
    if extra:
        fail(f"{where}: unexpected tensors {extra}")
    ckpt = Checkpoint(groups)
    try:
        ckpt.validate()
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return ckpt

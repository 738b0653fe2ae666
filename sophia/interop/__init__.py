"""Optimizer state that moves between :mod:`sophia.torch` and :mod:`sophia.jax`.

The one place in the package that knows both frameworks. Everything goes
through a framework-neutral :class:`Checkpoint` of NumPy arrays:

* :func:`from_torch` / :func:`to_torch`: a ``SophiaG`` optimizer (or its state
  dict) and a :class:`Checkpoint`, parameters matched by name
  (``model.named_parameters()``);
* :func:`from_jax` / :func:`to_jax`: the state of :func:`sophia.jax.sophia_g`
  (or of any optax state holding ``ScaleBySophiaState``, e.g. an
  ``optax.multi_transform``) for a parameter pytree whose leaves are named by
  their paths (``{"fc1": {"weight": w}}`` is ``"fc1.weight"``);
* :func:`save` / :func:`load`: a safetensors file with a JSON header (format
  version, hyperparameters, parameter names) that either side reads with
  NumPy and ``safetensors`` only.

The narrow state (``mu_dtype``, ``hessian_dtype``, ``seed``; :mod:`sophia.narrow`)
crosses as it is stored, bit for bit: bfloat16 or float32 arrays, and a
``"block8"`` Hessian EMA as int8 codes with float32 scales (torch ``hessian`` and
``hessian_scale``, JAX :class:`sophia.narrow.Block8` leaves). Loading into a
target whose forms differ is a ``ValueError`` naming both, unless
``convert_forms=True`` asks for the values to be decoded and re-encoded
(:mod:`sophia.interop.forms` says with which random bits).

``import sophia.interop`` imports neither framework; each function imports the
one it needs when it is first used. Example (PyTorch to JAX)::

    from sophia import interop

    ckpt = interop.from_torch(opt, model)  # or interop.load("opt.safetensors")
    state = interop.to_jax(ckpt, tx.init(params), params)
"""

from __future__ import annotations

import importlib
from typing import Any

from sophia.interop.checkpoint import (
    HYPERPARAM_KEYS,
    NARROW_KEYS,
    RECORDED_KEYS,
    Checkpoint,
    GroupState,
)
from sophia.interop.checkpoint_file import FORMAT_NAME, FORMAT_VERSION, load, save

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HYPERPARAM_KEYS",
    "NARROW_KEYS",
    "RECORDED_KEYS",
    "Checkpoint",
    "GroupState",
    "from_jax",
    "from_torch",
    "jax_param_names",
    "load",
    "save",
    "to_jax",
    "to_torch",
    "torch_param_names",
    "torch_state_dict",
]

_LAZY = {
    "from_torch": "sophia.interop.torch_state",
    "to_torch": "sophia.interop.torch_state",
    "torch_state_dict": "sophia.interop.torch_state",
    "torch_param_names": "sophia.interop.torch_state",
    "from_jax": "sophia.interop.jax_state",
    "to_jax": "sophia.interop.jax_state",
    "jax_param_names": "sophia.interop.jax_tree",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sophia.interop' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

"""SophiaG: one spec, an Optax reference (:mod:`sophia.jax`) and a torch port (:mod:`sophia.torch`).

``import sophia`` needs neither framework. ``sophia.SophiaG`` resolves lazily
to :class:`sophia.torch.SophiaG`, so the seed's ``from sophia import SophiaG``
works and only then imports torch.
"""

from __future__ import annotations

from typing import Any

from sophia import spec
from sophia.spec import DEFAULTS, SophiaHyperParams, validate

__all__ = ["DEFAULTS", "SophiaG", "SophiaHyperParams", "spec", "validate"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "SophiaG":
        from sophia.torch import SophiaG

        return SophiaG
    raise AttributeError(f"module 'sophia' has no attribute {name!r}")

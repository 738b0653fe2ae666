"""Finding a framework's demo backend, ``sophia.demo.train_<framework>``, with a clear error."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from sophia.demo.config import FRAMEWORKS

__all__ = ["BackendUnavailable", "load_backend"]


class BackendUnavailable(RuntimeError):
    """The requested framework, its Sophia port or its demo backend cannot be imported."""


def load_backend(framework: str) -> Any:
    """The backend module ``sophia.demo.train_<framework>``.

    Raises:
      BackendUnavailable: the framework, its Sophia port or its backend module
        is missing; the message says which.
    """
    if framework not in FRAMEWORKS:
        raise ValueError(f"Invalid framework: {framework!r} (allowed: {', '.join(FRAMEWORKS)})")
    needs = {"jax": ("jax", "optax", "sophia.jax"), "torch": ("torch", "sophia.torch")}[framework]
    for mod in needs:
        try:
            found = importlib.util.find_spec(mod) is not None
        except ImportError:
            found = False
        if not found:
            raise BackendUnavailable(
                f"--framework {framework}: {mod} is not importable: install it "
                f"(pip install 'sophiag[{framework},demo]')"
            )
    name = f"sophia.demo.train_{framework}"
    if importlib.util.find_spec(name) is None:
        others = " or ".join(f"--framework {fw}" for fw in FRAMEWORKS if fw != framework)
        raise BackendUnavailable(
            f"--framework {framework}: the demo's {framework} backend ({name}) is missing from "
            f"this installation; run with {others}"
        )
    return importlib.import_module(name)

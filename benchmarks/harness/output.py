"""Results as JSON (NumPy scalars made plain, non-finite numbers ``null``) and printed figures."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np


def jsonable(x: Any) -> Any:
    """``x`` with NumPy scalars as Python numbers and NaN or infinities as ``None``."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_json(path: Path, data: Any) -> None:
    """Writes ``data`` to ``path`` (folders created) through a temporary file.

    A run killed mid-write leaves the previous file whole.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(data), indent=2) + "\n")
    os.replace(tmp, path)


def fmt(x: float | None, spec: str = ".3f") -> str:
    """``x`` formatted, or ``n/a`` for a figure that could not be computed."""
    return "n/a" if x is None else format(x, spec)

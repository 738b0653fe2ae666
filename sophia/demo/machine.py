"""What a run's record says about the machine: the CPU, the host and each backend's device."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["cpu_name", "machine_info"]


def cpu_name() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(backends: Sequence[Any] = ()) -> dict[str, Any]:
    """Host, CPU, Python and NumPy, plus each backend's ``device_info()``.

    Args:
      backends: backend modules (see :func:`sophia.demo.backends.load_backend`).

    Returns:
      JSON-ready data; each backend's ``device_info()`` under its framework's name.
    """
    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    for backend in backends:
        d = backend.device_info()
        info[d.get("framework", backend.__name__)] = d
    return info

"""The machine a result was measured on, recorded with every result."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from sophia.demo.machine import machine_info


def usable_cores() -> int | None:
    """The cores this process may run on (its affinity mask), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def memory_bytes() -> dict[str, int]:
    """``MemTotal`` and ``MemAvailable`` from ``/proc/meminfo`` (empty where there is none)."""
    mem = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, value = line.split(":", 1)
                if key in ("MemTotal", "MemAvailable"):
                    mem[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return mem


def host_info(backends: Sequence[Any] = ()) -> dict[str, Any]:
    """The demo's :func:`~sophia.demo.machine.machine_info`, plus what load can change.

    Usable cores, memory, the thread and XLA settings from the environment and
    the load average now (``loadavg_start``; a script adds ``loadavg_end``), so
    that a figure can be read against how busy the machine was.

    Args:
      backends: demo backend modules whose ``device_info()`` to include.
    """
    info = machine_info(backends)
    mem = memory_bytes()
    info.update(
        usable_cores=usable_cores(),
        mem_total_bytes=mem.get("MemTotal"),
        mem_available_bytes_start=mem.get("MemAvailable"),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", ""),
        XLA_FLAGS=os.environ.get("XLA_FLAGS", ""),
        loadavg_start=list(os.getloadavg()),
    )
    return info

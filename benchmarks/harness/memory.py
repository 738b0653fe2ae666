"""The extra resident memory one call needs at its peak, read from ``/proc/self``.

Meant for a fresh process holding only what the call works on: the kernel's
peak-RSS mark is reset (``echo 5 > /proc/self/clear_refs``), the call runs,
and ``VmHWM`` minus the RSS before it is what the call added at its peak.
Where ``clear_refs`` cannot be written, a thread samples ``VmRSS`` every
0.5 ms instead (which can miss short peaks; the method is reported).
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable

#: glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, which would
#: hide temporaries from RSS; a fixed threshold sends every block of 64 KiB or more to
#: mmap/munmap, so RSS follows what is live. The environment of a probe process.
PROBE_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
CLEAR_REFS = "clear_refs"
SAMPLED = "VmRSS sampled every 0.5 ms"


def status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return status_kib("VmHWM") <= status_kib("VmRSS") + 64
    except OSError:
        return False


def _sampled_peak(fn: Callable[[], object]) -> int:
    peak = [status_kib("VmRSS")]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], status_kib("VmRSS"))
            time.sleep(0.0005)

    th = threading.Thread(target=sample)
    th.start()
    fn()
    done.set()
    th.join()
    return max(peak[0], status_kib("VmRSS"))


def peak_extra_bytes(fn: Callable[[], object], repeats: int) -> tuple[list[int], str]:
    """Bytes of RSS above the pre-call RSS at the peak of each of ``repeats`` calls.

    Returns:
      ``(one figure per call, the method)``: :data:`CLEAR_REFS` or :data:`SAMPLED`.
    """
    extras, method = [], CLEAR_REFS
    for _ in range(repeats):
        gc.collect()
        before = status_kib("VmRSS")
        if _reset_peak():
            fn()
            extras.append(status_kib("VmHWM") - before)
        else:
            method = SAMPLED
            extras.append(_sampled_peak(fn) - before)
    return [x * 1024 for x in extras], method

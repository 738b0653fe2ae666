"""The memory-bandwidth floor: the least time an optimizer step can take on this machine.

An elementwise step over N float32 parameters must stream its operands
through memory at least once. Its floor is those bytes at the best streaming
bandwidth measured in the same run by trivial kernels (logical bytes, no
write-allocate traffic counted), so a step's time over its floor says how far
it is from what the memory allows.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

#: SophiaG reads theta, g, m and h and writes theta and m: 6 float32 per parameter.
SOPHIA_BYTES_PER_PARAM = 6 * 4
#: AdamW reads theta, g, m and v and writes theta, m and v: 7 float32 per parameter.
ADAMW_BYTES_PER_PARAM = 7 * 4
#: A copy reads one float32 and writes one per element.
COPY_BYTES_PER_ELEMENT = 2 * 4


def bandwidth(bytes_per_call: float, samples_ms: Sequence[float]) -> dict[str, float]:
    """Bytes per second of a kernel: at its fastest call and at its median one."""
    return {
        "best": bytes_per_call / (min(samples_ms) / 1e3),
        "median": bytes_per_call / (statistics.median(samples_ms) / 1e3),
    }


def floor_ms(bytes_per_step: float, bytes_per_s: float) -> float:
    """Milliseconds to move ``bytes_per_step`` at ``bytes_per_s``."""
    return 1e3 * bytes_per_step / bytes_per_s

"""The memory part of benchmarks/narrow_state.py: peak extra memory of a torch step per state form.

The issue asks that the fused kernels read and write the narrow state directly,
with no full-size float32 temporaries of ``m`` or ``h`` during a step. Each
variant runs in a fresh process (started with
:data:`harness.memory.PROBE_ENV`, so that glibc returns every block of 64 KiB
or more to the system when it is freed) holding only its own parameters,
gradients, ``h_hat`` and optimizer state, as ``benchmarks/step_time_torch.py``
measures it (the process is ``narrow_state.py --memory-probe VARIANT``):

* ``torch_fused_<form>``: ``SophiaG(fused=True).step()``, plain steps;
* ``torch_refresh_<form>``: ``SophiaG(fused=True).update_hessian(hessian=h_hat)``
  alone, the EMA write into ``h``'s form (repeated with ``allow_repeat=True``);
* ``torch_adamw_fused``: ``torch.optim.AdamW(fused=True).step()``.

After the warm-up calls the kernel's peak-RSS mark is reset and each call's
peak resident memory above the RSS before it is read
(:func:`harness.memory.peak_extra_bytes`); the lowest of the repeats is the
figure. A full-size float32 temporary of ``m`` or ``h`` made per tensor would
show as about one float32 copy of the largest tensor, so that is the yardstick
(``extra_over_largest_f32``); below a quarter of it (a margin for the page
accounting, as tests/torch/test_torch_fused_narrow.py draws it) counts as no
full-size temporary (even a bfloat16 one would show as a half).

Run by :func:`run_probes`; one by hand: ``python benchmarks/narrow_state.py
--memory-probe torch_fused_bf16_block8 --small``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from harness.memory import PROBE_ENV, peak_extra_bytes
from harness.shapes import Shapes, n_params
from narrow_variants import LR, WD, torch_sophia, torch_tensors

ADAMW = "torch_adamw_fused"
#: Peak extra bytes below this share of one float32 copy of the largest tensor: no full-size
#: temporary (of any dtype of at least 2 bytes) was alive at the peak.
NO_TEMPORARY_BELOW = 0.25


def variants(forms: Sequence[str]) -> list[str]:
    """The probed variants: each form's fused step and refresh, then AdamW's fused step."""
    return [f"torch_{kind}_{f}" for f in forms for kind in ("fused", "refresh")] + [ADAMW]


def make_call(variant: str, params: list[Any], h_hat: list[Any]) -> Callable[[], Any]:
    """The call ``variant`` measures, its state built (a refresh and a step) beforehand."""
    import torch

    if variant == ADAMW:
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, fused=True)
        opt.step()
        return opt.step
    kind, form = variant.removeprefix("torch_").split("_", 1)
    if kind not in ("fused", "refresh"):
        raise ValueError(f"variant {variant!r}: allowed are {variants(['<form>'])}")
    opt = torch_sophia(params, form, fused=True)
    opt.update_hessian(hessian=h_hat)
    opt.step()
    if kind == "fused":
        return opt.step
    return lambda: opt.update_hessian(hessian=h_hat, allow_repeat=True)


def probe(variant: str, table: Shapes, warmup: int, repeats: int) -> dict[str, Any]:
    """In this (fresh) process: the peak extra bytes of ``variant``'s call, and yardsticks."""
    import torch

    torch.set_grad_enabled(False)
    n = n_params(table)
    params, h_hat = torch_tensors(table)
    call = make_call(variant, params, h_hat)
    for _ in range(warmup):
        call()
    extras, method = peak_extra_bytes(call, repeats)
    extra = min(extras)
    largest_f32 = max(math.prod(s) for s in table.values()) * 4
    return {
        "method": method,
        "extra_bytes": extra,
        "extra_bytes_all": extras,
        "extra_bytes_per_param": extra / n,
        "parameters": n,
        "largest_f32_tensor_bytes": largest_f32,
        "extra_over_largest_f32": extra / largest_f32,
        "no_full_size_temporary": extra < NO_TEMPORARY_BELOW * largest_f32,
    }


def run_probes(
    names: Sequence[str], script: Path, script_args: list[str], log: Callable[[str], None]
) -> dict[str, Any]:
    """Each of ``names`` probed in a fresh process; ``{name: record}``, failures under ``error``.

    The process is ``script --memory-probe NAME *script_args``, which must call
    :func:`probe` and print its record as the last line of its output.
    """
    out: dict[str, Any] = {}
    for name in names:
        cmd = [sys.executable, str(script), "--memory-probe", name, *script_args]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=PROBE_ENV)
        if res.returncode != 0:
            out[name] = {"error": res.stderr.strip()[-2000:]}
            log(f"  memory {name}: failed ({res.stderr.strip().splitlines()[-1:]})")
            continue
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
        log(
            f"  memory {name}: +{out[name]['extra_bytes'] / 2**20:.1f} MiB peak "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    return out

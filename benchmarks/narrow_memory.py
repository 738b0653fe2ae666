"""The memory part of benchmarks/narrow_state.py: peak extra memory of a torch step per state form.

The issue asks that the fused kernels read and write the narrow state directly,
with no full-size float32 temporaries of ``m`` or ``h`` during a step. Each
variant runs in a fresh process (this script, started with
:data:`harness.memory.PROBE_ENV`, so that glibc returns every block of 64 KiB
or more to the system when it is freed) holding only its own parameters,
gradients, ``h_hat`` and optimizer state, as ``benchmarks/step_time_torch.py``
measures it:

* ``torch_fused_<form>``: ``SophiaG(fused=True).step()``, plain steps;
* ``torch_refresh_<form>``: ``SophiaG(fused=True).update_hessian(hessian=h_hat)``
  alone, the EMA write into ``h``'s form (repeated with ``allow_repeat=True``);
* ``torch_adamw_fused``: ``torch.optim.AdamW(fused=True).step()``.

After the warm-up calls the kernel's peak-RSS mark is reset and each call's
peak resident memory above the RSS before it is read
(:func:`harness.memory.peak_extra_bytes`); the lowest of the repeats is the
figure. A full-size float32 temporary of ``m`` or ``h`` made per tensor would
show as at least one float32 copy of the largest tensor, so that is the
yardstick (``extra_over_largest_f32``).

Run by :func:`run_probes`; by hand: ``python benchmarks/narrow_memory.py
torch_fused_bf16_block8 --size small``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# this checkout's sophia, and the harness beside this script (also when run by path)
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from harness.memory import PROBE_ENV, peak_extra_bytes  # noqa: E402
from harness.shapes import n_params  # noqa: E402
from narrow_variants import LR, WD, model_table, torch_sophia, torch_tensors  # noqa: E402

SIZES = ("full", "small", "tiny")
ADAMW = "torch_adamw_fused"


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


def probe(variant: str, size: str, warmup: int, repeats: int) -> dict[str, Any]:
    """In this (fresh) process: the peak extra bytes of ``variant``'s call, and yardsticks."""
    import torch

    torch.set_grad_enabled(False)
    table = model_table(small=size == "small", tiny=size == "tiny")
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
        "no_full_size_f32_temporary": extra < largest_f32,
    }


def run_probes(
    names: Sequence[str],
    size: str,
    warmup: int,
    repeats: int,
    threads: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Each of ``names`` probed in a fresh process; ``{name: record}``, failures under ``error``."""
    out: dict[str, Any] = {}
    for name in names:
        cmd = [sys.executable, str(Path(__file__).resolve()), name, "--size", size]
        cmd += ["--warmup", str(warmup), "--repeats", str(repeats), "--threads", str(threads)]
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


def main(argv: list[str] | None = None) -> None:
    """Probes one variant in this process and prints its record as one JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variant", help="torch_fused_<form>, torch_refresh_<form> or " + ADAMW)
    ap.add_argument("--size", choices=SIZES, default="full", help="narrow_state.py's shapes")
    ap.add_argument("--warmup", type=int, default=1, help="calls before the measured ones")
    ap.add_argument("--repeats", type=int, default=2, help="measured calls (the lowest counts)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(json.dumps(probe(args.variant, args.size, args.warmup, args.repeats)))


if __name__ == "__main__":
    main()

"""PyTorch optimizer step time on GPT-2-small shapes, against AdamW and a bandwidth floor.

Run as ``./dev bench step_time_torch`` or ``.venv/bin/python benchmarks/step_time_torch.py``
(``--small`` divides the model width, vocabulary and context by 4, so the
parameter count by about 16, keeping the 148 tensors).

One run times, interleaved round-robin (the order rotates every round, so
background load hits every variant alike), one ``step()`` per sample:

* ``sophia_forloop`` / ``sophia_foreach`` / ``sophia_fused``:
  :class:`sophia.torch.SophiaG` with ``foreach=False`` / ``foreach=True`` /
  ``fused=True``; plain steps, no Hessian refresh. The three optimizers share
  one state (the same ``exp_avg`` and ``hessian`` tensors), so they stream the
  same memory. The fused path compiles on its first (warm-up) step.
* ``adamw_forloop`` / ``adamw_foreach`` / ``adamw_fused``:
  :class:`torch.optim.AdamW` with ``foreach=False`` / ``foreach=True`` /
  ``fused=True``, sharing one state likewise.
* ``reference_forloop``: the paper's single-tensor SophiaG step re-typed from
  the algorithm the way the authors' code does it (a Python loop per tensor,
  ``exp_avg.mul_(b1).add_(grad, alpha=1-b1)``, ``param.mul_(1 - lr*wd)``, a
  clipped ratio and ``param.addcmul_(sign, ratio, value=-lr)``), on the same
  ``exp_avg``/``hessian`` tensors as the SophiaG variants.
* bandwidth kernels over three flat float32 buffers of N elements each (N =
  the parameter count): ``copy`` (``a.copy_(b)``, 2 x 4N bytes), ``scale``
  (``a.mul_(s)``, 2 x 4N), ``add`` (``a.add_(b)``, 3 x 4N) and ``triad``
  (``torch.add(b, c, alpha=s, out=a)``, 3 x 4N), all torch eager ops on the
  same intra-op threads as the optimizers. Logical bytes (no write-allocate
  traffic counted); the best bandwidth over kernels and repeats gives the
  floor: ``6 * 4 * N`` bytes (SophiaG reads theta, g, m, h and writes theta,
  m) divided by it, so the floor is the lowest one can claim.

With ``sophia_fused``, a reference pass ``stream_4r2w_compiled`` is timed too:
a ``torch.compile``-d kernel per tensor (the fused path's calls) that reads
theta, g, m, h and writes theta, m with trivial arithmetic, i.e. what the fused
step would cost if its arithmetic were free. It is information, not a target.

Every figure is the median and the minimum over ``--repeats`` timed samples
after ``--warmup`` untimed ones, in wall-clock time and in process CPU time
(``time.process_time``: on a shared machine, the time this process actually
ran). Ratios against a target are given of the medians, of the minima, as the
median of per-round ratios (both variants ran within seconds of each other, so
load drifts cancel) and of the CPU-time medians; the verdict uses the medians.
``--threads 1`` avoids OpenMP barrier stalls when other processes load the
machine (the floor is then measured with one thread too).

Peak extra memory: each optimizer variant runs in a fresh subprocess holding
only its own parameters, gradients and state; after the warm-up steps the
kernel's peak-RSS mark is reset (``echo 5 > /proc/self/clear_refs``), one
``step()`` runs, and ``VmHWM - VmRSS`` (read from ``/proc/self/status``) is the
extra resident memory the step needed at its peak. The probe runs with
``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc hands every block of 64 KiB or
more straight to ``mmap``/``munmap`` and torch's temporaries show up in RSS
exactly while they live. Best (lowest) of ``--memory-repeats`` steps; the
target reads "at most one parameter-sized buffer" as at most the bytes of the
largest parameter tensor. Where
``clear_refs`` cannot be written, a thread samples ``VmRSS`` every 0.5 ms
instead (which can miss short peaks; the method is recorded).

Results go to ``benchmarks/results/step_time_torch.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# this checkout's sophia, and the harness beside this script (also when imported by path)
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402
from harness import floor  # noqa: E402
from harness.machine import host_info  # noqa: E402
from harness.memory import PROBE_ENV, peak_extra_bytes  # noqa: E402
from harness.output import write_json  # noqa: E402
from harness.stats import describe, ratio  # noqa: E402
from harness.timing import interleave  # noqa: E402
from torch_variants import (  # noqa: E402
    BETAS,
    BS,
    EPS,
    KERNEL_ARRAYS,
    KERNELS,
    LR,
    RHO,
    SOPHIA,
    VARIANTS,
    WD,
    make_kernels,
    make_optimizers,
    make_stream_pass,
    make_tensors,
    model_shapes,
)

RESULTS = Path(__file__).resolve().parent / "results" / "step_time_torch.json"

# --------------------------------------------------------------------------- memory


def memory_probe(variant: str, small: bool, warmup: int, repeats: int) -> dict[str, Any]:
    """Runs in a fresh process: peak RSS above the pre-step RSS during one ``step()``."""
    table, n = model_shapes(small)
    params, _, ms, hs = make_tensors(table)
    step = make_optimizers([variant], params, ms, hs)[variant]
    for _ in range(warmup):
        step()
    extras, method = peak_extra_bytes(step, repeats)
    largest = max(math.prod(s) for s in table.values()) * 4
    extra = min(extras)
    return {
        "method": method,
        "extra_bytes": extra,
        "extra_bytes_all": extras,
        "param_bytes": n * 4,
        "largest_tensor_bytes": largest,
        "extra_over_param_bytes": extra / (n * 4),
        "extra_over_largest_tensor": extra / largest,
    }


def run_memory_probes(
    variants: Iterable[str],
    small: bool,
    warmup: int,
    repeats: int,
    threads: int | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    out = {}
    for v in variants:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--memory-probe",
            v,
            "--warmup",
            str(warmup),
            "--memory-repeats",
            str(repeats),
        ] + (["--small"] if small else [])
        if threads:
            cmd += ["--threads", str(threads)]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=PROBE_ENV)
        if res.returncode != 0:
            raise RuntimeError(f"memory probe {v} failed:\n{res.stderr[-4000:]}")
        out[v] = json.loads(res.stdout.strip().splitlines()[-1])
        log(
            f"  memory {v}: +{out[v]['extra_bytes'] / 2**20:.1f} MiB peak during step "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    return out


# --------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    """:func:`harness.machine.host_info` with torch's version, CPU capability and threads."""
    info = host_info()
    info["cpu_model"] = info.pop("cpu")  # this record's field name
    info.update(
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
    )
    return info


def _compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Timings ``a / b``: of medians, of minima, paired per round, of CPU-time medians."""
    wall = ratio(a["samples_ms"], b["samples_ms"])
    return {
        "ratio_median": wall["of_medians"],
        "ratio_min": wall["of_minima"],
        "ratio_paired_median": wall["paired_median"],
        "ratio_cpu_median": ratio(a["cpu_samples_ms"], b["cpu_samples_ms"])["of_medians"],
    }


def _over_floor(a: dict[str, Any], floor: dict[str, Any]) -> dict[str, float]:
    """Timings ``a`` over the bandwidth floor (wall and CPU time)."""
    return {
        "ratio_median": a["median_ms"] / floor["floor_ms"],
        "ratio_min": a["min_ms"] / floor["floor_ms"],
        "ratio_cpu_median": a["cpu_median_ms"] / floor["cpu_floor_ms"],
    }


def _ratio(
    steps: dict[str, Any], num: str, den: str | None, floor: dict[str, Any], target: float, le: bool
) -> dict[str, Any]:
    """``num / den`` (or ``/ floor``) of medians, of minima, paired per round, of CPU time."""
    if den is None:
        r = {**_over_floor(steps[num], floor), "ratio_paired_median": None}
    else:
        r = _compare(steps[num], steps[den])
    med, mn = r["ratio_median"], r["ratio_min"]
    ok = (lambda r: r <= target) if le else (lambda r: r >= target)
    return {
        "ratio_median": med,
        "ratio_min": mn,
        "ratio_paired_median": r["ratio_paired_median"],
        "ratio_cpu_median": r["ratio_cpu_median"],
        "target": target,
        "target_kind": "<=" if le else ">=",
        "met_median": ok(med),
        "met_min": ok(mn),
    }


def ratios(res: dict[str, Any]) -> dict[str, Any]:
    steps = res["steps"]
    floor = res["floor"]
    out: dict[str, Any] = {}
    if {"sophia_fused", "adamw_fused"} <= steps.keys():
        out["sophia_fused / adamw_fused"] = _ratio(
            steps, "sophia_fused", "adamw_fused", floor, 0.9, True
        )
    if "sophia_fused" in steps:
        out["sophia_fused / floor"] = _ratio(steps, "sophia_fused", None, floor, 1.15, True)
    if {"sophia_foreach", "adamw_foreach"} <= steps.keys():
        out["sophia_foreach / adamw_foreach"] = _ratio(
            steps, "sophia_foreach", "adamw_foreach", floor, 1.0, True
        )
    for v in SOPHIA:
        if v in steps and "reference_forloop" in steps:
            out[f"reference_forloop / {v}"] = _ratio(
                steps, "reference_forloop", v, floor, 4.0, False
            )
    sp = res.get("stream_pass")
    if sp is not None and "sophia_fused" in steps:
        out["sophia_fused / stream_4r2w_compiled"] = _compare(steps["sophia_fused"], sp)
        out["stream_4r2w_compiled / floor"] = _over_floor(sp, floor)
        if "adamw_fused" in steps:
            out["stream_4r2w_compiled / adamw_fused"] = _compare(sp, steps["adamw_fused"])
    out["x floor"] = {v: _over_floor(steps[v], floor) for v in VARIANTS if v in steps}
    mem = res.get("memory", {}).get("sophia_fused")
    if mem is not None:
        out["sophia_fused peak extra memory / largest parameter tensor"] = {
            "ratio": mem["extra_over_largest_tensor"],
            "target": 1.0,
            "target_kind": "<=",
            "met": mem["extra_over_largest_tensor"] <= 1.0,
        }
    return out


def print_table(res: dict[str, Any]) -> None:
    m = res["machine"]
    print(
        f"\nmachine: {m['cpu_model']}, {m['usable_cores']} usable cores, torch {m['torch']} "
        f"({m['cpu_capability']}), {m['torch_threads']} intra-op thread(s), python {m['python']}"
    )
    print(
        f"load average (1 min): start {m['loadavg_start'][0]:.2f}, "
        f"end {res['loadavg_end'][0]:.2f}; {res['config']['n_tensors']} tensors, "
        f"{res['config']['n_params']:,} float32 parameters; {res['config']['repeats']} rounds"
    )
    floor = res["floor"]["floor_ms"]
    head = f"\n{'variant':<19}{'median ms':>11}{'min ms':>9}{'cpu med ms':>12}{'x floor':>9}"
    print(head + f"{'peak extra MiB':>16}")
    for v, s in res["steps"].items():
        mem = res.get("memory", {}).get(v)
        mem_s = f"{mem['extra_bytes'] / 2**20:16.1f}" if mem else f"{'-':>16}"
        print(
            f"{v:<19}{s['median_ms']:11.1f}{s['min_ms']:9.1f}{s['cpu_median_ms']:12.1f}"
            f"{s['median_ms'] / floor:9.2f}{mem_s}"
        )
    sp = res.get("stream_pass")
    if sp is not None:
        print(
            f"{'(4r2w pass)':<19}{sp['median_ms']:11.1f}{sp['min_ms']:9.1f}"
            f"{sp['cpu_median_ms']:12.1f}{sp['median_ms'] / floor:9.2f}"
            "   compiled theta,g,m,h -> theta,m pass, trivial arithmetic"
        )
    bw = res["floor"]
    print(
        f"{'floor':<19}{floor:11.1f}{floor:9.1f}{'':12}{1.0:9.2f}"
        f"   (6 x 4 B x N at {bw['best_gbps']:.2f} GB/s, best: {bw['best_kernel']})"
    )
    print(
        f"{'floor (CPU time)':<19}{'':20}{bw['cpu_floor_ms']:12.1f}"
        f"{'':9}   (at {bw['cpu_best_gbps']:.2f} GB/s of process CPU time)"
    )
    print("\nstreaming bandwidth (logical bytes, torch eager over 3 flat buffers of N floats):")
    for k, s in bw["kernels"].items():
        print(f"  {k:<8} best {s['best_gbps']:6.2f} GB/s   median {s['median_gbps']:6.2f} GB/s")
    print("\ntargets: ratio of medians [of minima] {paired per round, of CPU-time medians}")
    for k, r in res["ratios"].items():
        if "target" not in r:
            if "/" in k and "ratio_cpu_median" in r:
                paired = r.get("ratio_paired_median")
                extra = f"{{{paired:.3f}, " if paired is not None else "{-, "
                extra += f"{r['ratio_cpu_median']:.3f}}}"
                print(
                    f"  {k:<36} {r['ratio_median']:7.3f} [{r['ratio_min']:.3f}] {extra:<16} (info)"
                )
            continue
        if "ratio" in r:
            verdict = "met" if r["met"] else "MISSED"
            goal = f"target {r['target_kind']} {r['target']}"
            print(f"  {k:<56} {r['ratio']:7.3f}  {goal}: {verdict}")
            continue
        paired = r["ratio_paired_median"]
        extra = f"{{{paired:.3f}, " if paired is not None else "{-, "
        extra += f"{r['ratio_cpu_median']:.3f}}}"
        verdict = "met" if r["met_median"] else "MISSED"
        verdict += f" [{'met' if r['met_min'] else 'MISSED'}]"
        print(
            f"  {k:<36} {r['ratio_median']:7.3f} [{r['ratio_min']:.3f}] {extra:<16} "
            f"target {r['target_kind']} {r['target']}: {verdict}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="sizes / 16 (width, vocab, context / 4)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--memory-repeats", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    ap.add_argument(
        "--no-stream-pass", action="store_true", help="skip the compiled 4-read/2-write reference"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        probe = memory_probe(args.memory_probe, args.small, args.warmup, args.memory_repeats)
        print(json.dumps(probe))
        return 0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    info = machine()
    table, n = model_shapes(args.small)
    log(f"{len(table)} tensors, {n:,} parameters; load {info['loadavg_start']}")

    memory = {}
    if not args.no_memory:
        log("memory probes (one fresh process per variant):")
        memory = run_memory_probes(
            variants, args.small, args.warmup, args.memory_repeats, args.threads, log
        )

    torch.set_grad_enabled(False)
    params, _, ms, hs = make_tensors(table)
    fns: dict[str, Callable[[], Any]] = dict(make_optimizers(variants, params, ms, hs))
    if not args.no_stream_pass and "sophia_fused" in variants:
        fns["stream_4r2w_compiled"] = make_stream_pass(params, ms, hs)
    kernels = make_kernels(n)
    fns.update({f"bw_{k}": kernels[k] for k in KERNELS})
    log("timing (round-robin):")
    timed = interleave(fns, args.repeats, warmup=args.warmup, log=log)
    samples, cpu_samples = timed.wall_ms, timed.cpu_ms

    kernel_stats = {}
    for k in KERNELS:
        bytes_ = KERNEL_ARRAYS[k] * 4 * n
        xs, cs = samples[f"bw_{k}"], cpu_samples[f"bw_{k}"]
        wall = floor.bandwidth(bytes_, xs)
        kernel_stats[k] = {
            "bytes": bytes_,
            "best_gbps": wall["best"] / 1e9,
            "median_gbps": wall["median"] / 1e9,
            # a call too short for the CPU clock's resolution counts as 1 ns
            "cpu_best_gbps": floor.bandwidth(bytes_, [max(min(cs), 1e-6)])["best"] / 1e9,
            **describe(xs, cs),
        }
    best_kernel = max(kernel_stats, key=lambda k: kernel_stats[k]["best_gbps"])
    best_bw = kernel_stats[best_kernel]["best_gbps"]
    best_cpu_bw = max(s["cpu_best_gbps"] for s in kernel_stats.values())
    sophia_bytes = floor.SOPHIA_BYTES_PER_PARAM * n
    res: dict[str, Any] = {
        "machine": info,
        "config": {
            "small": args.small,
            "n_tensors": len(table),
            "n_params": n,
            "dtype": "float32",
            "warmup": args.warmup,
            "repeats": args.repeats,
            "lr": LR,
            "betas": BETAS,
            "rho": RHO,
            "weight_decay": WD,
            "bs": BS,
            "eps": EPS,
            "variants": variants,
        },
        "steps": {v: describe(samples[v], cpu_samples[v]) for v in variants},
        "stream_pass": (
            {
                "description": "compiled per-tensor pass reading theta, g, m, h and writing "
                "theta, m with trivial arithmetic (the fused path's traffic and calls)",
                **describe(samples["stream_4r2w_compiled"], cpu_samples["stream_4r2w_compiled"]),
            }
            if "stream_4r2w_compiled" in samples
            else None
        ),
        "floor": {
            "bytes": sophia_bytes,
            "best_kernel": best_kernel,
            "best_gbps": best_bw,
            "floor_ms": floor.floor_ms(sophia_bytes, best_bw * 1e9),
            "cpu_best_gbps": best_cpu_bw,
            "cpu_floor_ms": floor.floor_ms(sophia_bytes, best_cpu_bw * 1e9),
            "method": "6 x 4 B x N / best logical bandwidth of torch copy/scale/add/triad "
            "over three flat float32 buffers of N elements, best of the repeats (cpu_: the "
            "same with process CPU time, the floor for CPU-time figures)",
            "kernels": kernel_stats,
        },
        "memory": memory,
        "memory_method": (
            "fresh subprocess per variant with MALLOC_MMAP_THRESHOLD_=65536; after warm-up, reset "
            "the peak RSS via /proc/self/clear_refs and read VmHWM - VmRSS around one step() "
            "(lowest of the memory repeats)"
        ),
        "loadavg_end": list(os.getloadavg()),
    }
    res["ratios"] = ratios(res)
    write_json(args.out, res)
    print_table(res)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The optimizers ``gpu_check.py``'s step-time part times, in each framework, and their figures.

Each unit times one framework's optimizers on one shape list, interleaved
with a device-to-device copy of N floats (:func:`harness.timing.interleave`):
the copy's bandwidth gives every optimizer its floor (:mod:`harness.floor`).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

from harness.floor import (
    ADAMW_BYTES_PER_PARAM,
    COPY_BYTES_PER_ELEMENT,
    SOPHIA_BYTES_PER_PARAM,
    bandwidth,
    floor_ms,
)
from harness.shapes import Shapes
from harness.stats import ratio
from harness.timing import Clock, interleave, wall_and_cpu

from gpu.environment import Frameworks

#: The step-time optimizers' hyperparameters (the step-time benchmarks' values).
STEP_HP = {"lr": 1e-4, "betas": (0.965, 0.99), "rho": 0.04, "weight_decay": 0.1, "bs": 5120.0}


def summarize_times(
    times: dict[str, list[float]], n: int, required: dict[str, int]
) -> dict[str, Any]:
    """Medians, the copy's bandwidth, and each optimizer against its bandwidth floor.

    ``required`` maps an optimizer to the bytes per parameter it must move in
    a step; its floor is those bytes at the bandwidth of the copy (``copy``,
    2 x 4 bytes per element) measured in the same rounds.
    """
    copy = bandwidth(COPY_BYTES_PER_ELEMENT * n, times["copy"])
    variants = {}
    for name, xs in times.items():
        med = statistics.median(xs)
        d: dict[str, Any] = {"median_ms": med, "min_ms": min(xs), "samples_ms": xs}
        if name in required:
            floor = floor_ms(required[name] * n, copy["median"])
            d.update(
                bytes_per_step=required[name] * n,
                floor_ms=floor,
                over_floor=med / floor,
                achieved_bytes_per_s=required[name] * n / (med / 1e3),
                fraction_of_copy_bandwidth=floor / med,
            )
        variants[name] = d
    return {
        "n_params": n,
        "copy": {
            "bytes_per_call": COPY_BYTES_PER_ELEMENT * n,
            "bandwidth_bytes_per_s": copy["median"],
            "best_bandwidth_bytes_per_s": copy["best"],
        },
        "variants": variants,
    }


def ratios(times: dict[str, list[float]], *pairs: tuple[str, str]) -> dict[str, Any]:
    """:func:`harness.stats.ratio` of each pair whose two variants were timed."""
    return {f"{a} / {b}": ratio(times[a], times[b]) for a, b in pairs if a in times and b in times}


def first_calls(fns: dict[str, Callable[[], Any]]) -> dict[str, str]:
    """Calls each variant once; drops (and returns the errors of) those that fail.

    One optimizer that does not run on this machine (an inductor option its
    torch lacks, say) must not cost the others their figures.
    """
    errors = {}
    for k in list(fns):
        try:
            fns[k]()
        except Exception as e:  # noqa: BLE001
            errors[k] = f"{type(e).__name__}: {e}"
            del fns[k]
    if "copy" not in fns:
        raise RuntimeError(f"the copy, the floor of every figure, failed: {errors['copy']}")
    return errors


def cuda_clock(torch: Any) -> Clock:
    """Times each call on an idle device between CUDA events: the device's time, launch gaps in.

    The CPU time of the call is measured too (what the host spent launching).
    """

    def clock(fn: Callable[[], object]) -> tuple[float, float]:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        c0 = time.process_time()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, time.process_time() - c0

    return clock


def count_launches(torch: Any, device: Any, fn: Callable[[], Any]) -> dict[str, Any]:
    """What one call of ``fn`` launches, from ``torch.profiler``.

    On CUDA: the kernels (memory copies and sets counted apart). On the CPU
    there are no launches; the operators ``fn`` calls directly are counted
    instead, so the figure is still there.
    """
    from torch.profiler import DeviceType, ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    if cuda:
        on_device = [e for e in events if e.device_type == DeviceType.CUDA]
        kernels = [e for e in on_device if not e.name.startswith(("Memcpy", "Memset"))]
        return {
            "kind": "CUDA kernels per step",
            "count": len(kernels),
            "memcpy_memset": len(on_device) - len(kernels),
            "distinct_kernels": len({e.name for e in kernels}),
        }
    calls = [e for e in events if e.cpu_parent is not None and e.cpu_parent.cpu_parent is None]
    return {"kind": "operators called by one step (CPU: no kernel launches)", "count": len(calls)}


def torch_step_time(fw: Frameworks, shapes: Shapes, warmup: int, repeats: int) -> dict[str, Any]:
    """SophiaG fused/foreach against AdamW fused/foreach and a copy, on one shape list."""
    torch = fw.need_torch()
    from sophia.torch import SophiaG

    device = fw.torch_device
    n = sum(math.prod(s) for s in shapes.values())
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(shape: tuple[int, ...], scale: float, normal: bool = True) -> Any:
        x = torch.empty(shape, device=device)
        (x.normal_ if normal else x.uniform_)(generator=gen)
        return x.mul_(scale)

    with torch.no_grad():
        params = [torch.nn.Parameter(rand(s, 0.02)) for s in shapes.values()]
        for p in params:
            p.grad = rand(p.shape, 1e-2)
        copy = {"src": rand((n,), 1.0), "dst": torch.empty(n, device=device)}
    sophia = STEP_HP
    adamw = {"lr": STEP_HP["lr"], "weight_decay": STEP_HP["weight_decay"]}
    opts = {
        "sophia_fused": SophiaG(params, **sophia, fused=True),
        "sophia_foreach": SophiaG(params, **sophia, foreach=True, fused=False),
        "adamw_fused": torch.optim.AdamW(params, **adamw, fused=True),
        "adamw_foreach": torch.optim.AdamW(params, **adamw, foreach=True),
    }
    for name in ("sophia_fused", "sophia_foreach"):
        # half the coordinates clipped, as in training
        opts[name].update_hessian(hessian=[rand(p.shape, 1e-4, normal=False) for p in params])
    fns: dict[str, Callable[[], Any]] = {k: o.step for k, o in opts.items()}
    fns["copy"] = lambda: copy["dst"].copy_(copy["src"])
    t0 = time.perf_counter()
    errors = first_calls(fns)  # the fused kernels compile here
    clock = cuda_clock(torch) if device.type == "cuda" else wall_and_cpu
    times = interleave(fns, repeats, warmup=warmup, clock=clock).wall_ms
    res = summarize_times(
        times,
        n,
        {
            k: SOPHIA_BYTES_PER_PARAM if k.startswith("sophia") else ADAMW_BYTES_PER_PARAM
            for k in fns
        },
    )
    res["errors"] = errors
    res["timing_s"] = round(time.perf_counter() - t0, 2)
    res["n_tensors"] = len(shapes)
    res["ratios"] = ratios(
        times,
        ("sophia_fused", "adamw_fused"),
        ("sophia_foreach", "adamw_foreach"),
        ("sophia_fused", "sophia_foreach"),
    )
    res["launches"] = {}
    for k in fns.keys() & opts.keys():
        try:
            res["launches"][k] = count_launches(torch, device, opts[k].step)
        except Exception as e:  # noqa: BLE001 (a profiler that fails must not lose the timings)
            res["launches"][k] = {"error": f"{type(e).__name__}: {e}"}
    launches = {k: v.get("count") for k, v in res["launches"].items()}
    over = res["ratios"].get("sophia_fused / adamw_fused", {}).get("of_medians")
    if launches.get("sophia_fused") is not None and over is not None:
        fused = launches["sophia_fused"]
        res["fused_launch_summary"] = (
            f"SophiaG(fused=True): {fused} {res['launches']['sophia_fused']['kind']} for "
            f"{len(shapes)} tensors ({fused / len(shapes):.2f} per tensor); AdamW(fused=True): "
            f"{launches.get('adamw_fused')}; SophiaG fused takes {over:.3f}x AdamW fused's "
            "median time"
        )
    res["settings"] = {
        "warmup": warmup,
        "repeats": repeats,
        "timer": "CUDA events" if device.type == "cuda" else "wall clock",
        "hyperparameters": STEP_HP,
    }
    del opts, fns, params
    copy.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def jax_step_time(fw: Frameworks, shapes: Shapes, warmup: int, repeats: int) -> dict[str, Any]:
    """Jitted ``sophia_g`` (and ``step_diagnostics=False``) against ``optax.adamw`` and a copy."""
    jax = fw.need_jax()
    import jax.numpy as jnp
    import optax
    from harness.jax_step import Case, optimizer_step, random_trees

    import sophia.jax as sj

    n = sum(math.prod(s) for s in shapes.values())
    hp = STEP_HP

    params, grads, h_hat = random_trees(
        shapes, (0.02, 1e-3, 1e-6), nonnegative=(False, False, True)
    )
    pool: dict[str, Any] = {"params": params, "grads": grads}
    del params, grads

    def sophia(**kw: Any) -> Any:
        return sj.sophia_g(
            hp["lr"],
            *hp["betas"],
            hp["rho"],
            hp["weight_decay"],
            bs=hp["bs"],
            hessian_update_interval=None,
            **kw,
        )

    tx, tx_fast = sophia(), sophia(step_diagnostics=False)
    tx_adamw = optax.adamw(hp["lr"], b1=hp["betas"][0], weight_decay=hp["weight_decay"])

    def states(p: Any, g: Any, h: Any) -> tuple[Any, ...]:
        # after a step that refreshed (a Hessian EMA that is not all zeros), in one compiled
        # call: eager init would compile every op for every shape
        fresh = [t.update(g, t.init(p), p, hessian=h)[1] for t in (tx, tx_fast)]
        return (*fresh, tx_adamw.init(p))

    init = jax.jit(states)(pool["params"], pool["grads"], h_hat)
    pool["sophia_state"], pool["fast_state"], pool["adamw_state"] = init
    del h_hat, init
    pool["a"] = jnp.zeros((n,), jnp.float32)
    pool["b"] = jax.random.normal(jax.random.PRNGKey(4), (n,), jnp.float32)
    scale = jnp.float32(0.999)
    state = {"sophia_g": "sophia_state", "sophia_g_fast": "fast_state", "adamw": "adamw_state"}
    steps = {"sophia_g": tx, "sophia_g_fast": tx_fast, "adamw": tx_adamw}
    cases, errors = [], {}
    for name in [*steps, "copy"]:
        try:
            if name == "copy":
                case = Case(name, lambda a, b: b * scale, pool, ["a", "b"], ["a"])
            else:
                args = ["params", state[name], "grads"]
                case = Case(name, optimizer_step(steps[name]), pool, args, args[:2])
            case()  # one call before the clock, as for torch
            cases.append(case)
        except Exception as e:  # noqa: BLE001 (one variant that fails must not hide the others)
            errors[name] = f"{type(e).__name__}: {e}"
    if "copy" in errors:
        raise RuntimeError(f"the copy, the floor of every figure, failed: {errors['copy']}")
    t0 = time.perf_counter()
    times = interleave({c.name: c for c in cases}, repeats, warmup=warmup).wall_ms
    required = {
        "sophia_g": SOPHIA_BYTES_PER_PARAM,
        "sophia_g_fast": SOPHIA_BYTES_PER_PARAM,
        "adamw": ADAMW_BYTES_PER_PARAM,
    }
    res = summarize_times(times, n, {k: v for k, v in required.items() if k in times})
    res["errors"] = errors
    res["timing_s"] = round(time.perf_counter() - t0, 2)
    res["n_tensors"] = len(shapes)
    res["ratios"] = ratios(times, ("sophia_g", "adamw"), ("sophia_g_fast", "adamw"))
    for c in cases:
        res["variants"][c.name].update(compile_s=c.compile_s, entry_fusions=c.fusions)
    res["settings"] = {
        "warmup": warmup,
        "repeats": repeats,
        "timer": "wall clock to block_until_ready",
        "hyperparameters": STEP_HP,
        "device": str(jax.devices()[0]),
    }
    del cases, pool
    gc.collect()
    return res

"""Optimizer step time over GPT-2-small parameter shapes, against AdamW and a bandwidth floor.

Run as ``./dev bench step_time`` or ``.venv/bin/python benchmarks/step_time.py``.

One run measures, interleaved round-robin so that background load hits every
variant alike:

* ``sophia_g``: :func:`sophia.jax.sophia_g` with ``hessian_update_interval=None``,
  a jitted ``update`` + :func:`optax.apply_updates` with donated params and
  state, i.e. a plain step (no Hessian refresh);
* ``sophia_g_fast``: the same with ``step_diagnostics=False`` (the win rate and
  momentum norm are computed at Hessian refreshes instead of every step);
* ``sophia_g_refresh``: the same step preceded, inside the same jit, by
  :func:`sophia.jax.update_hessian` with a fixed ``h_hat`` argument, so the
  refresh (EMA + Hessian norm) is timed and the estimator's cost is not;
* ``sophia_g_interval``: ``hessian_update_interval=2**30`` with an estimator that
  returns a fixed ``h_hat`` from the extra arguments: only the first (warm-up)
  step refreshes, the timed steps are non-refresh steps of the built-in path
  (they show the cost of its ``lax.cond``);
* ``adamw``: :func:`optax.adamw` under the same conditions;
* ``optax_contrib_sophia``: :func:`optax.contrib.sophia` with
  ``update_interval=2**30`` and a ``hessian_diagonal_fn`` that returns a fixed
  ``h_hat`` (its refresh branch has to be traceable; the default Hutchinson
  estimator, ``--contrib-hutchinson``, takes ~40 s to compile and is not what
  is timed): only the first (warm-up) step refreshes, the timed steps are its
  plain steps;
* a memory-bandwidth floor: the bytes a SophiaG step must move (read theta, g,
  m, h; write theta, m: ``6 * 4 * N`` bytes for N float32 parameters) divided
  by the best streaming bandwidth measured in this run by jitted in-place
  kernels over flat float32 arrays of N elements (scale, add, triad and a
  3-read-1-write kernel; logical bytes, best of the repeats, the fastest
  kernel wins, so the floor is the lowest one).

Every figure is the median and the minimum over ``--repeats`` timed calls after
``--warmup`` untimed ones, each call ended by ``block_until_ready``, in wall
time and in this process's CPU time (all threads; less sensitive to other
processes taking the cores, though not to them taking memory bandwidth); the
load average at the start and the end is recorded. Results go to
``benchmarks/results/step_time.json``. ``--small`` runs the same 148 tensors
at 1/16 of the parameters (width, vocabulary and context divided by 4) for a
smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sophia.jax as sj  # noqa: E402
from sophia.demo.machine import cpu_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "step_time.json"
LR = 1e-4
WD = 0.1
HUGE_INTERVAL = 2**30


def gpt2_shapes(div: int = 1) -> dict[str, tuple[int, ...]]:
    """GPT-2 small (lm_head tied to wte): 148 tensors, 124,439,808 parameters.

    ``div`` divides the model width, vocabulary and context by ``sqrt(div)``
    (rounded), so the parameter count shrinks by about ``div`` and the tensor
    count stays 148.
    """
    f = int(round(div**0.5))
    d, vocab, ctx, layers = 768 // f, 50257 // f, 1024 // f, 12
    shapes: dict[str, tuple[int, ...]] = {"wte": (vocab, d), "wpe": (ctx, d)}
    for i in range(layers):
        p = f"h.{i}."
        shapes.update(
            {
                p + "ln_1.w": (d,),
                p + "ln_1.b": (d,),
                p + "attn.c_attn.w": (d, 3 * d),
                p + "attn.c_attn.b": (3 * d,),
                p + "attn.c_proj.w": (d, d),
                p + "attn.c_proj.b": (d,),
                p + "ln_2.w": (d,),
                p + "ln_2.b": (d,),
                p + "mlp.c_fc.w": (d, 4 * d),
                p + "mlp.c_fc.b": (4 * d,),
                p + "mlp.c_proj.w": (4 * d, d),
                p + "mlp.c_proj.b": (d,),
            }
        )
    shapes["ln_f.w"] = (d,)
    shapes["ln_f.b"] = (d,)
    return shapes


def random_tree(shapes: dict[str, tuple[int, ...]], seed: int, scale: float, positive: bool):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
    out = {}
    for k, (name, shape) in zip(keys, shapes.items()):
        x = jax.random.normal(k, shape, jnp.float32) * jnp.float32(scale)
        out[name] = jnp.abs(x) if positive else x
    return jax.block_until_ready(out)


def machine_info() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": cpu_name(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "device": str(jax.devices()[0]),
        "platform": jax.devices()[0].platform,
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
        "optax": optax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "loadavg_start": list(os.getloadavg()),
    }


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:  # noqa: BLE001
        return None


class Case:
    """A jitted step timed call by call, on named buffers of a shared pool.

    The donated buffers named in ``donate`` are replaced in the pool by the
    step's outputs (in that order), so cases that share a buffer (the SophiaG
    variants share parameters and state, the kernels their arrays) keep the
    benchmark's memory to a few copies of the model.
    """

    def __init__(
        self,
        name: str,
        fn: Callable[..., Any],
        pool: dict[str, Any],
        names: list[str],
        donate: list[str],
        bytes_moved: float | None = None,
        note: str = "",
    ):
        self.name, self.pool, self.names, self.donate = name, pool, names, donate
        self.bytes_moved, self.note = bytes_moved, note
        t0 = time.perf_counter()
        argnums = tuple(i for i, k in enumerate(names) if k in donate)
        jitted = jax.jit(fn, donate_argnums=argnums, keep_unused=True)
        self.compiled = jitted.lower(*[pool[k] for k in names]).compile()
        self.compile_s = time.perf_counter() - t0
        entry = self.compiled.as_text().split("\nENTRY ", 1)[-1]
        self.fusions = entry.count(" fusion(")
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        print(f"  compiled {name} in {self.compile_s:.1f} s", file=sys.stderr, flush=True)

    def call(self) -> tuple[float, float]:
        """Runs one step: ``(wall seconds, CPU seconds of this process, all threads)``."""
        args = [self.pool[k] for k in self.names]
        c0, t0 = time.process_time(), time.perf_counter()
        out = self.compiled(*args)
        jax.block_until_ready(out)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        outs = out if isinstance(out, tuple) else (out,)
        for k, v in zip(self.donate, outs):
            self.pool[k] = v
        return dt, dc

    def summary(self) -> dict[str, Any]:
        t, c = self.times, self.cpu_times
        d: dict[str, Any] = {
            "median_ms": 1e3 * statistics.median(t),
            "min_ms": 1e3 * min(t),
            "max_ms": 1e3 * max(t),
            "cpu_median_ms": 1e3 * statistics.median(c),
            "cpu_min_ms": 1e3 * min(c),
            "repeats": len(t),
            "compile_s": self.compile_s,
            "entry_fusions": self.fusions,
            "note": self.note,
        }
        if self.bytes_moved is not None:
            d["bytes"] = self.bytes_moved
            d["best_GBps"] = self.bytes_moved / min(t) / 1e9
            d["median_GBps"] = self.bytes_moved / statistics.median(t) / 1e9
        return d


def optimizer_step(tx: optax.GradientTransformation, **extra: Any):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    return step


def build_cases(
    shapes: dict[str, tuple[int, ...]], only: set[str] | None, contrib_hutchinson: bool
) -> tuple[list[Case], int]:
    """The variants, on one pool of buffers.

    One set of parameters, gradients and ``h_hat``; one SophiaG state shared by
    three of its variants (``sophia_g_fast`` has its own); AdamW's and
    optax.contrib.sophia's states; three flat arrays for the kernels: about 14
    copies of the model in all. The timing
    does not depend on the values as long as they stay normal numbers.
    """
    n = sum(int(np.prod(s)) for s in shapes.values())
    pool: dict[str, Any] = {
        "params": random_tree(shapes, 1, 0.02, False),
        "grads": random_tree(shapes, 2, 1e-3, False),
        "h_hat": random_tree(shapes, 3, 1e-6, True),
    }
    tx = sj.sophia_g(LR, weight_decay=WD, hessian_update_interval=None)

    def sophia_state() -> None:
        if "sophia_state" not in pool:
            pool["sophia_state"] = jax.jit(sj.update_hessian)(
                tx.init(pool["params"]), pool["h_hat"]
            )

    def sophia_plain() -> Case:
        # Manual refresh mode: no lax.cond in the step.
        sophia_state()
        return Case(
            "sophia_g",
            optimizer_step(tx),
            pool,
            ["params", "sophia_state", "grads"],
            ["params", "sophia_state"],
            note="sophia.jax.sophia_g(hessian_update_interval=None): plain step, no refresh",
        )

    def sophia_fast() -> Case:
        tx_f = sj.sophia_g(
            LR, weight_decay=WD, hessian_update_interval=None, step_diagnostics=False
        )
        # its own state: step_diagnostics is part of the state's pytree structure
        pool["fast_state"] = jax.jit(sj.update_hessian)(tx_f.init(pool["params"]), pool["h_hat"])
        return Case(
            "sophia_g_fast",
            optimizer_step(tx_f),
            pool,
            ["params", "fast_state", "grads"],
            ["params", "fast_state"],
            note="sophia_g(..., step_diagnostics=False): plain step, win rate and momentum "
            "norm left to the refreshes",
        )

    def sophia_refresh() -> Case:
        def refresh_step(params, state, grads, hh):
            state = sj.update_hessian(state, hh)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        sophia_state()
        return Case(
            "sophia_g_refresh",
            refresh_step,
            pool,
            ["params", "sophia_state", "grads", "h_hat"],
            ["params", "sophia_state"],
            note="update_hessian(state, fixed h_hat) + plain step in one jit "
            "(EMA and Hessian norm timed, estimator excluded)",
        )

    def sophia_interval() -> Case:
        def fixed_estimator(params, key, *, h_hat=None, **_):
            return h_hat

        tx_i = sj.sophia_g(
            LR, weight_decay=WD, hessian_update_interval=HUGE_INTERVAL, estimator=fixed_estimator
        )
        sophia_state()  # same state structure as tx's
        return Case(
            "sophia_g_interval",
            lambda p, s, g, hh: optimizer_step(tx_i, h_hat=hh)(p, s, g),
            pool,
            ["params", "sophia_state", "grads", "h_hat"],
            ["params", "sophia_state"],
            note=f"hessian_update_interval={HUGE_INTERVAL}, estimator returning a fixed h_hat, "
            "on the state of sophia_g (step count > 0): non-refresh steps through lax.cond",
        )

    def adamw() -> Case:
        tx_a = optax.adamw(LR, weight_decay=WD)
        pool["adamw_state"] = tx_a.init(pool["params"])
        return Case(
            "adamw",
            optimizer_step(tx_a),
            pool,
            ["params", "adamw_state", "grads"],
            ["params", "adamw_state"],
            note="optax.adamw(1e-4, weight_decay=0.1)",
        )

    def contrib() -> Case:
        names = ["params", "contrib_state", "grads"]
        if contrib_hutchinson:

            def obj_fn(p):
                return sum(0.5 * jnp.vdot(x, x) for x in jax.tree.leaves(p))

            tx_c = optax.contrib.sophia(LR, weight_decay=WD, update_interval=HUGE_INTERVAL)
            what = "its default Hutchinson estimator (obj_fn: a quadratic)"

            def step(p, s, g):
                return optimizer_step(tx_c, obj_fn=obj_fn)(p, s, g)

        else:

            def fixed_diag(updates, state, params=None, *, h_hat=None, **_):
                return h_hat, state

            diag = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), fixed_diag)
            tx_c = optax.contrib.sophia(
                LR, weight_decay=WD, update_interval=HUGE_INTERVAL, hessian_diagonal_fn=diag
            )
            what = "a hessian_diagonal_fn returning a fixed h_hat"
            names.append("h_hat")

            def step(p, s, g, hh):
                return optimizer_step(tx_c, h_hat=hh)(p, s, g)

        pool["contrib_state"] = tx_c.init(pool["params"])
        return Case(
            "optax_contrib_sophia",
            step,
            pool,
            names,
            ["params", "contrib_state"],
            note=f"optax.contrib.sophia(update_interval={HUGE_INTERVAL}) with {what}: step 0 "
            "(warm-up) refreshes, timed steps are plain steps",
        )

    # Streaming kernels over flat arrays of n float32, in place into the donated `a`.
    def flat(name: str, seed: int) -> None:
        if name not in pool:
            pool[name] = jax.block_until_ready(jax.random.normal(jax.random.PRNGKey(seed), (n,)))

    s = jnp.float32(0.999)
    kernels = {
        "bw_scale": (lambda a, b, c: a * s, 8.0, "a <- s*a"),
        "bw_add": (lambda a, b, c: a + b, 12.0, "a <- a + b"),
        "bw_triad": (lambda a, b, c: b + s * c, 12.0, "a <- b + s*c"),
        "bw_3r1w": (lambda a, b, c: a + s * b + s * c, 16.0, "a <- a + s*b + s*c"),
    }

    def kernel(name: str) -> Callable[[], Case]:
        fn, nbytes, note = kernels[name]

        def build() -> Case:
            for i, k in enumerate("abc"):
                flat(k, 10 + i)
            return Case(name, fn, pool, ["a", "b", "c"], ["a"], nbytes * n, note)

        return build

    builders: dict[str, Callable[[], Case]] = {
        "sophia_g": sophia_plain,
        "sophia_g_fast": sophia_fast,
        "sophia_g_refresh": sophia_refresh,
        "sophia_g_interval": sophia_interval,
        "adamw": adamw,
        "optax_contrib_sophia": contrib,
        **{k: kernel(k) for k in kernels},
    }
    if only:
        unknown = only - builders.keys()
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}; known: {sorted(builders)}")
    return [b() for k, b in builders.items() if not only or k in only], n


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="1/16 of the sizes (smoke test)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls per variant")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    ap.add_argument("--only", default="", help="comma-separated variants (development)")
    ap.add_argument(
        "--contrib-hutchinson",
        action="store_true",
        help="give optax.contrib.sophia its default Hutchinson estimator (slow to compile)",
    )
    args = ap.parse_args(argv)
    repeats = args.repeats or (5 if args.small else 15)

    info = machine_info()
    shapes = gpt2_shapes(16 if args.small else 1)
    only = {x for x in args.only.split(",") if x}
    cases, n = build_cases(shapes, only or None, args.contrib_hutchinson)
    for case in cases:
        for _ in range(args.warmup):
            case.call()
    for _ in range(repeats):  # round-robin: background load hits every variant alike
        for case in cases:
            wall, cpu = case.call()
            case.times.append(wall)
            case.cpu_times.append(cpu)
    info["loadavg_end"] = list(os.getloadavg())

    res = {c.name: c.summary() for c in cases}
    n_bytes = 6 * 4 * n
    bw = {k: v for k, v in res.items() if k.startswith("bw_")}
    floor: dict[str, Any] = {
        "bytes": n_bytes,
        "definition": "6 * 4 * N bytes (read theta, g, m, h; write theta, m) / best "
        "streaming bandwidth of the bw_* kernels in this run",
    }
    if bw:
        best = max(bw, key=lambda k: bw[k]["best_GBps"])
        floor.update(
            bandwidth_GBps=bw[best]["best_GBps"],
            bandwidth_kernel=best,
            ms=1e3 * n_bytes / (bw[best]["best_GBps"] * 1e9),
        )
    floor_case = {"median_ms": floor.get("ms"), "min_ms": floor.get("ms")}

    def ratio(a: str, b: str, stat: str) -> float | None:
        x = res.get(a, {}).get(stat)
        y = floor_case[stat] if b == "floor" else res.get(b, {}).get(stat)
        return None if x is None or y is None else x / y

    out = {
        "machine": info,
        "model": {
            "shapes": "gpt2-small/16" if args.small else "gpt2-small",
            "tensors": len(shapes),
            "parameters": n,
            "dtype": "float32",
            "tied_lm_head": True,
        },
        "settings": {
            "warmup": args.warmup,
            "repeats": repeats,
            "lr": LR,
            "weight_decay": WD,
            "order": "round-robin over variants, one timed call each per round",
        },
        "results": res,
        "floor": floor,
        "ratios": {
            "sophia_over_adamw_median": ratio("sophia_g", "adamw", "median_ms"),
            "sophia_over_adamw_min": ratio("sophia_g", "adamw", "min_ms"),
            "sophia_over_floor_median": ratio("sophia_g", "floor", "median_ms"),
            "sophia_over_floor_min": ratio("sophia_g", "floor", "min_ms"),
            "sophia_fast_over_adamw_median": ratio("sophia_g_fast", "adamw", "median_ms"),
            "sophia_fast_over_adamw_min": ratio("sophia_g_fast", "adamw", "min_ms"),
            "sophia_fast_over_floor_median": ratio("sophia_g_fast", "floor", "median_ms"),
            "sophia_fast_over_floor_min": ratio("sophia_g_fast", "floor", "min_ms"),
            "sophia_refresh_over_plain_median": ratio("sophia_g_refresh", "sophia_g", "median_ms"),
            "sophia_interval_over_plain_median": ratio(
                "sophia_g_interval", "sophia_g", "median_ms"
            ),
            "contrib_sophia_over_adamw_median": ratio("optax_contrib_sophia", "adamw", "median_ms"),
            "adamw_over_floor_median": ratio("adamw", "floor", "median_ms"),
            "sophia_over_adamw_cpu_median": ratio("sophia_g", "adamw", "cpu_median_ms"),
            "sophia_over_adamw_cpu_min": ratio("sophia_g", "adamw", "cpu_min_ms"),
        },
        "targets": {"sophia_over_adamw": 0.75, "sophia_over_floor": 1.15},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    report(out)
    return out


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def report(out: dict[str, Any]) -> None:
    m, mod, r = out["machine"], out["model"], out["results"]
    print(
        f"machine: {m['cpu_model']}, {m['cpu_count']} cores ({m['usable_cores']} usable), "
        f"{m['device']}; jax {m['jax']}, jaxlib {m['jaxlib']}, optax {m['optax']}, "
        f"numpy {m['numpy']}, python {m['python']}; "
        f"loadavg {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}"
    )
    print(
        f"model: {mod['shapes']}, {mod['tensors']} float32 tensors, {mod['parameters']:,} "
        f"parameters; {out['settings']['warmup']} warm-up + {out['settings']['repeats']} "
        "timed calls each, round-robin"
    )
    print(
        f"{'variant':22s} {'median ms':>10s} {'min ms':>10s} {'cpu med ms':>11s} "
        f"{'fusions':>8s}  note"
    )
    for name, d in r.items():
        extra = f" [{d['best_GBps']:.1f} GB/s best]" if "best_GBps" in d else ""
        print(
            f"{name:22s} {d['median_ms']:10.2f} {d['min_ms']:10.2f} {d['cpu_median_ms']:11.2f} "
            f"{d['entry_fusions']:8d}  {d['note']}{extra}"
        )
    f, q, t = out["floor"], out["ratios"], out["targets"]
    if "ms" in f:
        print(
            f"{'floor':22s} {f['ms']:10.2f} {f['ms']:10.2f} {'':11s} {'':8s}  "
            f"{f['bytes'] / 1e9:.3f} GB "
            f"at {f['bandwidth_GBps']:.1f} GB/s ({f['bandwidth_kernel']})"
        )
    print(
        f"sophia/adamw  median {_fmt(q['sophia_over_adamw_median'])}  "
        f"min {_fmt(q['sophia_over_adamw_min'])}  (target <= {t['sophia_over_adamw']})"
    )
    print(
        f"sophia/floor  median {_fmt(q['sophia_over_floor_median'])}  "
        f"min {_fmt(q['sophia_over_floor_min'])}  (target <= {t['sophia_over_floor']})"
    )
    for name in ("adamw", "floor"):
        print(
            f"sophia_fast/{name}  median {_fmt(q[f'sophia_fast_over_{name}_median'])}  "
            f"min {_fmt(q[f'sophia_fast_over_{name}_min'])}  "
            f"(target <= {t[f'sophia_over_{name}']})"
        )
    print(
        f"sophia/adamw in process CPU time (less sensitive to other processes): median "
        f"{_fmt(q['sophia_over_adamw_cpu_median'])}  min {_fmt(q['sophia_over_adamw_cpu_min'])}"
    )


if __name__ == "__main__":
    main()

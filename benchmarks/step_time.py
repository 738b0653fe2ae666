"""Optimizer step time over GPT-2-small parameter shapes, against AdamW and a bandwidth floor.

Run as ``./dev bench step_time`` or ``.venv/bin/python benchmarks/step_time.py``.

One run times, interleaved (:func:`harness.timing.interleave`):

* ``sophia_g``: :func:`sophia.jax.sophia_g` with ``hessian_update_interval=None``,
  a jitted ``update`` + :func:`optax.apply_updates` with donated params and
  state, i.e. a plain step (no Hessian refresh);
* ``sophia_g_fast``: the same with ``step_diagnostics=False`` (the win rate and
  momentum norm are computed at Hessian refreshes instead of every step);
* ``sophia_g_refresh``: the same step given a fixed estimate
  (``update(..., hessian=h_hat)``), so the step's refresh (EMA + Hessian norm)
  is timed and the estimator's cost is not;
* ``sophia_g_interval``: ``hessian_update_interval=2**30`` with an estimator that
  returns a fixed ``h_hat`` from the extra arguments: only the first (warm-up)
  step refreshes, the timed steps are non-refresh steps of the built-in path;
* ``adamw``: :func:`optax.adamw` under the same conditions;
* ``optax_contrib_sophia``: :func:`optax.contrib.sophia` with
  ``update_interval=2**30`` and a ``hessian_diagonal_fn`` that returns a fixed
  ``h_hat`` (its refresh branch has to be traceable; its default Hutchinson
  estimator, ``--contrib-hutchinson``, is slow to compile and not what is
  timed): only the first (warm-up) step refreshes, the timed steps are its
  plain steps;
* the bandwidth floor (:mod:`harness.floor`): SophiaG's ``6 * 4 * N`` bytes at
  the best streaming bandwidth of jitted in-place kernels over flat float32
  arrays of N elements (scale, add, triad and a 3-read-1-write kernel).

Every figure is the median and the minimum over ``--repeats`` timed calls after
``--warmup`` untimed ones, each call ended by ``block_until_ready``, in wall
time and in this process's CPU time; the load average at the start and the end
is recorded. Results go to ``benchmarks/results/step_time.json``. ``--small``
times the 148 tensors of :func:`harness.shapes.gpt2_small` at its small size,
the same model ``step_time_torch.py --small`` times.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# this checkout's sophia, and the harness beside this script (also when imported by path)
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from harness import floor, shapes  # noqa: E402
from harness.jax_step import Case, optimizer_step, random_trees  # noqa: E402
from harness.machine import host_info  # noqa: E402
from harness.output import fmt, write_json  # noqa: E402
from harness.stats import describe  # noqa: E402
from harness.timing import interleave  # noqa: E402

import sophia.jax as sj  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "step_time.json"
LR = 1e-4
WD = 0.1
BS = 5120
HUGE_INTERVAL = 2**30
TARGETS = {"sophia_over_adamw": 0.75, "sophia_over_floor": 1.15}
#: Streaming kernels over flat float32 arrays a, b, c, in place into the donated ``a``:
#: the function, its logical bytes per element, what it does.
_S = jnp.float32(0.999)
KERNELS: dict[str, tuple[Callable[..., Any], float, str]] = {
    "bw_scale": (lambda a, b, c: a * _S, 8.0, "a <- s*a"),
    "bw_add": (lambda a, b, c: a + b, 12.0, "a <- a + b"),
    "bw_triad": (lambda a, b, c: b + _S * c, 12.0, "a <- b + s*c"),
    "bw_3r1w": (lambda a, b, c: a + _S * b + _S * c, 16.0, "a <- a + s*b + s*c"),
}


def machine() -> dict[str, Any]:
    """:func:`harness.machine.host_info` with JAX's device and versions."""
    import jaxlib

    info = host_info()
    info["cpu_model"] = info.pop("cpu")  # this record's field name
    info.update(
        device=str(jax.devices()[0]),
        device_platform=jax.devices()[0].platform,
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        optax=optax.__version__,
    )
    return info


def build_cases(
    table: shapes.Shapes, only: set[str] | None, contrib_hutchinson: bool
) -> tuple[dict[str, Case], dict[str, str], int]:
    """The variants on one pool of buffers: ``(cases, their notes, N)``.

    One set of parameters, gradients and ``h_hat``; one SophiaG state shared by
    three of its variants (``sophia_g_fast`` has its own: ``step_diagnostics``
    is part of the state's structure); AdamW's and optax.contrib.sophia's
    states; three flat arrays for the kernels.
    """
    n = shapes.n_params(table)
    trees = random_trees(table, (0.02, 1e-3, 1e-6), nonnegative=(False, False, True))
    pool: dict[str, Any] = dict(zip(("params", "grads", "h_hat"), trees))
    del trees
    step_args = ["params", "sophia_state", "grads"]
    with_h_hat = [*step_args, "h_hat"]
    notes: dict[str, str] = {}

    def sophia(**kw: Any) -> optax.GradientTransformationExtraArgs:
        return sj.sophia_g(LR, weight_decay=WD, bs=BS, **{"hessian_update_interval": None, **kw})

    def state(key: str, tx: optax.GradientTransformationExtraArgs) -> None:
        # after one step that refreshed: a Hessian EMA that is not all zeros
        def first(p: Any, g: Any, h: Any) -> Any:
            return tx.update(g, tx.init(p), p, hessian=h)[1]

        if key not in pool:
            pool[key] = jax.jit(first)(pool["params"], pool["grads"], pool["h_hat"])

    tx = sophia()

    def sophia_plain() -> Case:
        state("sophia_state", tx)
        notes["sophia_g"] = "sophia.jax.sophia_g(hessian_update_interval=None): plain step"
        return Case("sophia_g", optimizer_step(tx), pool, step_args, step_args[:2])

    def sophia_fast() -> Case:
        tx_fast = sophia(step_diagnostics=False)
        state("fast_state", tx_fast)
        notes["sophia_g_fast"] = (
            "sophia_g(..., step_diagnostics=False): plain step, win rate and momentum norm "
            "left to the refreshes"
        )
        args = ["params", "fast_state", "grads"]
        return Case("sophia_g_fast", optimizer_step(tx_fast), pool, args, args[:2])

    def sophia_refresh() -> Case:
        def refresh_step(params: Any, st: Any, grads: Any, hh: Any) -> tuple[Any, Any]:
            return optimizer_step(tx, hessian=hh)(params, st, grads)

        state("sophia_state", tx)
        notes["sophia_g_refresh"] = (
            "update(..., hessian=fixed h_hat): a step that refreshes "
            "(EMA and Hessian norm timed, estimator excluded)"
        )
        return Case("sophia_g_refresh", refresh_step, pool, with_h_hat, step_args[:2])

    def sophia_interval() -> Case:
        def fixed_estimator(params: Any, key: Any, *, h_hat: Any = None, **_: Any) -> Any:
            return h_hat

        tx_i = sophia(hessian_update_interval=HUGE_INTERVAL, estimator=fixed_estimator)
        state("sophia_state", tx)  # the same structure as tx_i's, its step count past 0
        notes["sophia_g_interval"] = (
            f"hessian_update_interval={HUGE_INTERVAL}, estimator returning a fixed h_hat, "
            "on the state of sophia_g (step count > 0): non-refresh steps of the built-in path"
        )

        def step(p: Any, s: Any, g: Any, hh: Any) -> tuple[Any, Any]:
            return optimizer_step(tx_i, h_hat=hh)(p, s, g)

        return Case("sophia_g_interval", step, pool, with_h_hat, step_args[:2])

    def adamw() -> Case:
        tx_a = optax.adamw(LR, weight_decay=WD)
        pool["adamw_state"] = tx_a.init(pool["params"])
        notes["adamw"] = f"optax.adamw({LR}, weight_decay={WD})"
        args = ["params", "adamw_state", "grads"]
        return Case("adamw", optimizer_step(tx_a), pool, args, args[:2])

    def contrib() -> Case:
        args = ["params", "contrib_state", "grads"]
        if contrib_hutchinson:

            def obj_fn(p: Any) -> jax.Array:
                return sum(0.5 * jnp.vdot(x, x) for x in jax.tree.leaves(p))

            tx_c = optax.contrib.sophia(LR, weight_decay=WD, update_interval=HUGE_INTERVAL)
            what = "its default Hutchinson estimator (obj_fn: a quadratic)"
            step = optimizer_step(tx_c, obj_fn=obj_fn)
        else:

            def fixed_diag(
                updates: Any, st: Any, params: Any = None, *, h_hat: Any = None, **_: Any
            ):
                return h_hat, st

            diag = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), fixed_diag)
            tx_c = optax.contrib.sophia(
                LR, weight_decay=WD, update_interval=HUGE_INTERVAL, hessian_diagonal_fn=diag
            )
            what = "a hessian_diagonal_fn returning a fixed h_hat"
            args.append("h_hat")

            def step(p: Any, s: Any, g: Any, hh: Any) -> tuple[Any, Any]:
                return optimizer_step(tx_c, h_hat=hh)(p, s, g)

        pool["contrib_state"] = tx_c.init(pool["params"])
        notes["optax_contrib_sophia"] = (
            f"optax.contrib.sophia(update_interval={HUGE_INTERVAL}) with {what}: step 0 "
            "(warm-up) refreshes, timed steps are plain steps"
        )
        return Case("optax_contrib_sophia", step, pool, args, args[:2])

    def kernel(name: str) -> Callable[[], Case]:
        def build() -> Case:
            for i, k in enumerate("abc"):
                if k not in pool:
                    pool[k] = jax.random.normal(jax.random.PRNGKey(10 + i), (n,))
            notes[name] = KERNELS[name][2]
            return Case(name, KERNELS[name][0], pool, ["a", "b", "c"], ["a"])

        return build

    builders: dict[str, Callable[[], Case]] = {
        "sophia_g": sophia_plain,
        "sophia_g_fast": sophia_fast,
        "sophia_g_refresh": sophia_refresh,
        "sophia_g_interval": sophia_interval,
        "adamw": adamw,
        "optax_contrib_sophia": contrib,
        **{k: kernel(k) for k in KERNELS},
    }
    if only and only - builders.keys():
        raise SystemExit(
            f"unknown variants {sorted(only - builders.keys())}; known: {sorted(builders)}"
        )
    cases = {k: b() for k, b in builders.items() if not only or k in only}
    return cases, notes, n


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Times the variants, writes the JSON and prints the table; returns the record."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="the small GPT-2 shapes (smoke test)")
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

    info = machine()
    table = shapes.gpt2_small(args.small)
    only = {x for x in args.only.split(",") if x}
    cases, notes, n = build_cases(table, only or None, args.contrib_hutchinson)
    samples = interleave(cases, repeats, warmup=args.warmup)
    info["loadavg_end"] = list(os.getloadavg())

    res: dict[str, Any] = {}
    for name, case in cases.items():
        d = describe(samples.wall_ms[name], samples.cpu_ms[name])
        d.update(compile_s=case.compile_s, entry_fusions=case.fusions, note=notes[name])
        if name in KERNELS:
            d["bytes"] = KERNELS[name][1] * n
            bw = floor.bandwidth(d["bytes"], samples.wall_ms[name])
            d.update(best_GBps=bw["best"] / 1e9, median_GBps=bw["median"] / 1e9)
        res[name] = d
    step_bytes = floor.SOPHIA_BYTES_PER_PARAM * n
    floor_rec: dict[str, Any] = {
        "bytes": step_bytes,
        "definition": "6 * 4 * N bytes (read theta, g, m, h; write theta, m) / best "
        "streaming bandwidth of the bw_* kernels in this run",
    }
    bw_names = [k for k in res if k in KERNELS]
    if bw_names:
        best = max(bw_names, key=lambda k: res[k]["best_GBps"])
        floor_rec.update(
            bandwidth_GBps=res[best]["best_GBps"],
            bandwidth_kernel=best,
            ms=floor.floor_ms(step_bytes, res[best]["best_GBps"] * 1e9),
        )

    def ratio(a: str, b: str, stat: str) -> float | None:
        x = res.get(a, {}).get(stat)
        y = floor_rec.get("ms") if b == "floor" else res.get(b, {}).get(stat)
        return None if x is None or y is None else x / y

    ratios = {
        f"{label}_over_{den}_{stat}": ratio(num, den, f"{stat}_ms")
        for label, num in (("sophia", "sophia_g"), ("sophia_fast", "sophia_g_fast"))
        for den in ("adamw", "floor")
        for stat in ("median", "min")
    }
    ratios.update(
        sophia_refresh_over_plain_median=ratio("sophia_g_refresh", "sophia_g", "median_ms"),
        sophia_interval_over_plain_median=ratio("sophia_g_interval", "sophia_g", "median_ms"),
        contrib_sophia_over_adamw_median=ratio("optax_contrib_sophia", "adamw", "median_ms"),
        adamw_over_floor_median=ratio("adamw", "floor", "median_ms"),
        sophia_over_adamw_cpu_median=ratio("sophia_g", "adamw", "cpu_median_ms"),
        sophia_over_adamw_cpu_min=ratio("sophia_g", "adamw", "cpu_min_ms"),
    )
    out = {
        "machine": info,
        "model": {
            "shapes": "gpt2-small (small)" if args.small else "gpt2-small",
            "tensors": len(table),
            "parameters": n,
            "dtype": "float32",
            "tied_lm_head": True,
        },
        "settings": {
            "warmup": args.warmup,
            "repeats": repeats,
            "lr": LR,
            "weight_decay": WD,
            "bs": BS,
            "order": "interleaved: one timed call of each variant per round, rotating order",
        },
        "results": res,
        "floor": floor_rec,
        "ratios": ratios,
        "targets": TARGETS,
    }
    write_json(args.out, out)
    report(out)
    return out


def report(out: dict[str, Any]) -> None:
    """Prints the machine, every variant's times, the floor and the ratios against the targets."""
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
        "timed calls each, interleaved"
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
            f"{f['bytes'] / 1e9:.3f} GB at {f['bandwidth_GBps']:.1f} GB/s ({f['bandwidth_kernel']})"
        )
    for label in ("sophia", "sophia_fast"):
        for den in ("adamw", "floor"):
            print(
                f"{label}/{den}  median {fmt(q[f'{label}_over_{den}_median'])}  "
                f"min {fmt(q[f'{label}_over_{den}_min'])}  (target <= {t[f'sophia_over_{den}']})"
            )
    print(
        f"sophia/adamw in process CPU time (less sensitive to other processes): median "
        f"{fmt(q['sophia_over_adamw_cpu_median'])}  min {fmt(q['sophia_over_adamw_cpu_min'])}"
    )


if __name__ == "__main__":
    main()

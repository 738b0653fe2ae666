"""Hessian-refresh cost in the demo's training step: SophiaG plain and refresh steps vs AdamW.

Run as ``./dev bench refresh_cost`` or ``.venv/bin/python benchmarks/refresh_cost.py``
(issue #6: with forward reuse a refresh should cost about one extra backward;
target: SophiaG's average step at ``k = 10`` at most 1.08x AdamW's).

For the demo GPT of a :data:`sophia.demo.config.PRESETS` entry (``--preset``,
default ``default``; ``--small`` is the ``tiny`` preset, for a smoke test) and
for each framework (``--framework jax|torch|both``), one run times complete
training steps exactly as the demo trains: each sample is one call of the
backend's ``Trainer.step(x, y)`` (:class:`sophia.demo.train_jax.JaxTrainer`,
:class:`sophia.demo.train_torch.TorchTrainer`), the call the demo's loop times,
i.e. host-to-device copy of the batch, forward, backward, global-norm clipping,
the optimizer update (with the learning-rate schedule and the decay mask) and
the wait for the loss. The variants:

* ``adamw``: the preset's AdamW trainer;
* ``sophia_plain`` and ``sophia_refresh``: one SophiaG trainer of the preset
  with ``k = 2``, so its steps alternate refresh (``step % k == 0``), plain,
  refresh, ... and both are the same compiled step (JAX: the ``lax.cond`` of
  the built-in refresh; torch: ``update_hessian(logits=...)`` on the training
  forward's logits), exactly what a ``k = 10`` run executes on its refresh
  and plain steps. A refresh reuses the training forward: it samples labels
  from the logits and runs one extra backward (GNB); with ``--hessian-batch N``
  (or a preset that sets ``hessian_batch``) it runs its own forward and
  backward on the batch's first ``N`` sequences instead, ``N / batch_size``
  of a training step's work. During the warm-up the Hessian norm is checked
  to change on refresh steps and only on them;
* ``sophia_k10``: a second SophiaG trainer of the preset at ``k = 10``,
  stepped once a round, so any 10 consecutive rounds hold exactly one of
  its refresh steps and nine plain steps: the run the target speaks of,
  timed as it runs (a plain step right after a refresh included);
* ``fwd_bwd``: the training step's forward and backward alone (JAX: the
  ``jax.vjp`` + ``value_and_grad`` of ``JaxTrainer``'s step, jitted with the
  demo's compiler options, the gradient returned; torch: ``model(x)``, the
  loss, ``backward()``), with the same batch conversion, and no optimizer;
* ``forward``: the forward and the loss alone (torch: with autograd recording,
  as in training), so ``fwd_bwd - forward`` estimates one backward.

The variants run interleaved, every round in a fresh random order (seeded by
``--seed``; the ``k = 2`` SophiaG trainer stepped twice a round), so background
load hits them alike and no variant always follows the same one (a fixed
rotation always ran the ``k = 10`` trainer right after the ``k = 2`` one, and
the first felt the second's memory traffic). Every variant sees the same batch
within a round (random tokens: the timing does not depend on them). The
frameworks run one after the other.
Each variant's figure is the median and the minimum over ``--repeats`` timed
samples after ``--warmup`` untimed rounds (``first_call_s``: the first call,
JAX's compilation included). The derived figures, each of the medians, of the
minima and as the median over rounds of the per-round value (``paired``: the
variants of a round ran within seconds of each other, so load drifts cancel):

* ``refresh_over_plain``: refresh step / plain step;
* ``extra_ms``: refresh - plain, the refresh's cost;
* ``extra_over_fwd_bwd``: (refresh - plain) / fwd_bwd;
* ``backward_ms``: fwd_bwd - forward, and ``extra_over_backward``:
  (refresh - plain) / that (about 1 plus the label sampling and the EMA when a
  refresh costs one extra backward);
* ``plain_over_adamw``: plain step / AdamW step;
* ``k10_over_adamw``: SophiaG's average step at ``k = 10`` composed from the
  ``k = 2`` trainer's steps, ``(9 * plain + refresh) / 10``, over AdamW's step.

And ``k10_run_over_adamw``, from ``sophia_k10``: over each cycle of 10
consecutive timed rounds, the sum of its step times over the sum of AdamW's
in the same rounds; ``paired`` is the median over the cycles, ``total`` the
ratio of the sums over all whole cycles (``None`` below one cycle). The
verdict against the 1.08 target is this figure's ``paired`` value (the
composed figure where there is no whole cycle): it times the average step of
a ``k = 10`` run directly, where the composition assumes that every plain
step costs what a plain step right after a refresh costs.

The machine (CPU, cores, load average at the start and end of each framework,
framework versions, threads) is recorded with the results in
``benchmarks/results/refresh_cost.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# this checkout's sophia, and the harness beside this script (also when imported by path)
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from harness.machine import host_info  # noqa: E402
from harness.output import write_json  # noqa: E402
from harness.stats import describe  # noqa: E402
from harness.timing import Order, interleave, shuffled  # noqa: E402
from train_step_parts import REFERENCES, Step  # noqa: E402

from sophia.demo.backends import load_backend  # noqa: E402
from sophia.demo.config import FRAMEWORKS, PRESETS, OptimConfig, RunConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "refresh_cost.json"
#: The refresh interval of the target figure.
K = 10
#: The refresh interval the SophiaG trainer runs at: every other step refreshes.
K_TIMED = 2
TARGET_K10_OVER_ADAMW = 1.08
#: Distinct batches cycled through (one per round).
N_BATCHES = 8
VARIANTS = ("adamw", "sophia_plain", "sophia_refresh", "sophia_k10", "fwd_bwd", "forward")


# Each derived figure from one set of per-variant times (ms): the medians, the
# minima, or one round's samples.
FIGURES: dict[str, Callable[[Mapping[str, float]], float]] = {
    "refresh_over_plain": lambda t: t["sophia_refresh"] / t["sophia_plain"],
    "extra_ms": lambda t: t["sophia_refresh"] - t["sophia_plain"],
    "extra_over_fwd_bwd": lambda t: (t["sophia_refresh"] - t["sophia_plain"]) / t["fwd_bwd"],
    "backward_ms": lambda t: t["fwd_bwd"] - t["forward"],
    "extra_over_backward": lambda t: (
        (t["sophia_refresh"] - t["sophia_plain"]) / (t["fwd_bwd"] - t["forward"])
    ),
    "plain_over_adamw": lambda t: t["sophia_plain"] / t["adamw"],
    "k10_over_adamw": lambda t: (
        ((K - 1) * t["sophia_plain"] + t["sophia_refresh"]) / K / t["adamw"]
    ),
}


class SophiaSteps:
    """One SophiaG trainer at refresh interval ``k``, its calls told apart as refresh or plain.

    Args:
      backend: the demo backend module.
      cfg: the run.
      k: the refresh interval.
    """

    def __init__(self, backend: Any, cfg: RunConfig, k: int = K_TIMED) -> None:
        self.opt: OptimConfig = dataclasses.replace(cfg.sophia, k=k)
        self.trainer = backend.make_trainer(cfg, self.opt)
        self.steps = 0

    def next_variant(self) -> str:
        """The variant the next call is: ``sophia_refresh`` or ``sophia_plain``."""
        return "sophia_refresh" if self.opt.refreshes(self.steps) else "sophia_plain"

    def step(self, x: np.ndarray, y: np.ndarray) -> None:
        """One training step (the demo's ``Trainer.step``)."""
        self.trainer.step(x, y)
        self.steps += 1

    def checked_step(self, x: np.ndarray, y: np.ndarray) -> None:
        """A step that fails unless the Hessian changed exactly when a refresh was due."""
        due = self.opt.refreshes(self.steps)
        before = self.trainer.diagnostics()["hessian_norm"]
        self.step(x, y)
        changed = self.trainer.diagnostics()["hessian_norm"] != before
        if changed != due:
            raise RuntimeError(
                f"SophiaG step {self.steps - 1} (k={self.opt.k}): refresh due {due}, "
                f"Hessian changed {changed}: the variants would be mislabelled"
            )


def refresh_first(order: Order) -> Order:
    """``order`` with ``sophia_refresh`` moved before ``sophia_plain`` where it falls after.

    The ``k = 2`` trainer takes both calls of a round, its refresh step
    first: which of its two places in a random order is the refresh does not
    matter, only that the first of them is.
    """

    def ordered(names: Sequence[str], r: int) -> list[str]:
        out = order(names, r)
        i, j = out.index("sophia_refresh"), out.index("sophia_plain")
        if i > j:
            out[i], out[j] = out[j], out[i]
        return out

    return ordered


def bench_framework(
    framework: str, cfg: RunConfig, warmup: int, repeats: int, seed: int
) -> dict[str, Any]:
    """Times the variants of one framework, interleaved; returns their times and figures."""
    backend = load_backend(framework)
    load_start = list(os.getloadavg())
    rng = np.random.default_rng(seed)
    shape = (cfg.batch_size, cfg.model.block_size + 1)
    windows = [
        rng.integers(0, cfg.model.vocab_size, shape).astype(np.int32) for _ in range(N_BATCHES)
    ]
    batches = [(w[:, :-1], w[:, 1:]) for w in windows]

    print(f"{framework}: building the trainers", file=sys.stderr, flush=True)
    sophia = SophiaSteps(backend, cfg)
    sophia_k10 = SophiaSteps(backend, cfg, K)
    adamw = backend.make_trainer(cfg, cfg.adamw)
    steps: dict[str, Step] = {"adamw": adamw.step, **REFERENCES[framework](cfg)}
    steps["sophia_k10"] = sophia_k10.step
    first_call_s: dict[str, float] = {}
    for i in range(warmup):
        x, y = batches[i % N_BATCHES]
        for slot in ("adamw", "sophia", "sophia_k10", "fwd_bwd", "sophia", "forward"):
            name = sophia.next_variant() if slot == "sophia" else slot
            trainer = {"sophia": sophia, "sophia_k10": sophia_k10}.get(slot)
            t0 = time.perf_counter()
            (trainer.checked_step if trainer else steps[slot])(x, y)
            first_call_s.setdefault(name, time.perf_counter() - t0)
        print(f"  warm-up round {i + 1}/{warmup}", file=sys.stderr, flush=True)

    batch = list(batches[0])

    def sophia_step(variant: str) -> Callable[[], None]:
        def call() -> None:
            if sophia.next_variant() != variant:  # refresh_first keeps the refresh first
                raise RuntimeError(f"{variant} timed on a {sophia.next_variant()} step")
            sophia.step(*batch)

        return call

    calls: dict[str, Callable[[], object]] = {k: (lambda f=f: f(*batch)) for k, f in steps.items()}
    calls.update(
        sophia_refresh=sophia_step("sophia_refresh"), sophia_plain=sophia_step("sophia_plain")
    )
    samples = interleave(
        {v: calls[v] for v in VARIANTS},
        repeats,
        order=refresh_first(shuffled([seed, 1])),
        before_round=lambda r: batch.__setitem__(slice(None), batches[r % N_BATCHES]),
    )
    times = samples.wall_ms
    rounds = [{v: times[v][r] for v in VARIANTS} for r in range(repeats)]
    results = {v: {**describe(t), "first_call_s": first_call_s.get(v)} for v, t in times.items()}
    medians = {v: r["median_ms"] for v, r in results.items()}
    minima = {v: r["min_ms"] for v, r in results.items()}
    figures = {
        name: {
            "median": fn(medians),
            "min": fn(minima),
            "paired": statistics.median(fn(row) for row in rounds),
        }
        for name, fn in FIGURES.items()
    }
    figures["k10_run_over_adamw"] = k10_run_figure(times["sophia_k10"], times["adamw"])
    verdict = figures["k10_run_over_adamw"]["paired"]
    if verdict is None:
        verdict = figures["k10_over_adamw"]["median"]
    return {
        "device": backend.device_info(),
        "n_params": sophia.trainer.n_params,
        "loadavg_start": load_start,
        "loadavg_end": list(os.getloadavg()),
        "results": results,
        "figures": figures,
        "verdict_k10_over_adamw": verdict,
        "meets_target": verdict <= TARGET_K10_OVER_ADAMW,
    }


def k10_run_figure(sophia_ms: list[float], adamw_ms: list[float]) -> dict[str, float | None]:
    """``k10_run_over_adamw`` from the per-round times of the ``k = 10`` trainer and AdamW.

    Cycles are whole runs of ``K`` consecutive rounds (each holds one refresh);
    a partial last cycle is left out.
    """
    cycles = [
        sum(sophia_ms[i : i + K]) / sum(adamw_ms[i : i + K])
        for i in range(0, len(sophia_ms) - K + 1, K)
    ]
    whole = len(cycles) * K
    return {
        "paired": statistics.median(cycles) if cycles else None,
        "total": sum(sophia_ms[:whole]) / sum(adamw_ms[:whole]) if cycles else None,
        "cycles": len(cycles),
    }


def machine(frameworks: list[str]) -> dict[str, Any]:
    """:func:`harness.machine.host_info` with each framework's device, threads and versions."""
    info = host_info([load_backend(fw) for fw in frameworks])
    if "jax" in frameworks:
        import jaxlib

        info["jax"]["jaxlib"] = jaxlib.__version__
    if "torch" in frameworks:
        import torch

        info["torch"]["interop_threads"] = str(torch.get_num_interop_threads())
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--framework", choices=[*FRAMEWORKS, "both"], default="both")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--small", action="store_true", help="the tiny preset (smoke test)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds (the first compiles)")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0, help="seeds the random batches")
    ap.add_argument(
        "--hessian-batch",
        type=int,
        default=None,
        metavar="N",
        help="refresh on the first N sequences (own forward) instead of the preset's choice",
    )
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    args = ap.parse_args(argv)
    preset = "tiny" if args.small else args.preset
    repeats = args.repeats or (5 if args.small else 60)
    if args.warmup < 1 or repeats < 1:
        ap.error("--warmup and --repeats must be at least 1")
    frameworks = list(FRAMEWORKS) if args.framework == "both" else [args.framework]
    if "torch" in frameworks and args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)

    cfg = PRESETS[preset]
    if args.hessian_batch is not None:
        try:
            cfg = dataclasses.replace(cfg, hessian_batch=args.hessian_batch)
        except ValueError as e:  # RunConfig's check
            ap.error(f"--hessian-batch: {e}")
    info = machine(frameworks)
    per_fw = {fw: bench_framework(fw, cfg, args.warmup, repeats, args.seed) for fw in frameworks}
    info["loadavg_end"] = list(os.getloadavg())
    out = {
        "machine": info,
        "preset": preset,
        "model": {
            **dataclasses.asdict(cfg.model),
            "batch_size": cfg.batch_size,
            "tokens_per_step": cfg.tokens_per_step,
            "hessian_batch": cfg.hessian_batch,
            "hessian_tokens": cfg.hessian_tokens,
        },
        "settings": {
            "warmup": args.warmup,
            "repeats": repeats,
            "k_timed": K_TIMED,
            "k_target": K,
            "torch_threads": args.torch_threads,
            "seed": args.seed,
            "order": "a seeded random order every round; frameworks one after the other",
            "sophia": dataclasses.asdict(cfg.sophia),
            "adamw": dataclasses.asdict(cfg.adamw),
        },
        "target": {"k10_over_adamw": TARGET_K10_OVER_ADAMW},
        "frameworks": per_fw,
    }
    write_json(args.out, out)
    report(out)
    return out


def report(out: dict[str, Any]) -> None:
    """Prints the machine and a side-by-side table of the frameworks."""
    m, fws = out["machine"], out["frameworks"]
    versions = "; ".join(
        ", ".join(f"{k} {v}" for k, v in m[fw].items() if k != "framework") for fw in fws
    )
    print(
        f"machine: {m['cpu']}, {m['cpu_count']} cores ({m['usable_cores']} usable), "
        f"python {m['python']}, numpy {m['numpy']}; {versions}; "
        f"OMP_NUM_THREADS={m['OMP_NUM_THREADS'] or 'unset'}; "
        f"loadavg {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}"
    )
    s, mod = out["settings"], out["model"]
    n_params = next(iter(fws.values()))["n_params"]
    print(
        f"preset {out['preset']}: {mod['n_layer']} layers, width {mod['n_embd']}, "
        f"{n_params:,} parameters, {mod['tokens_per_step']} tokens/step; Hessian refresh on "
        + (
            "the whole batch (forward reused); "
            if mod.get("hessian_batch") in (None, mod["batch_size"])
            else f"the first {mod['hessian_batch']} of {mod['batch_size']} sequences; "
        )
        + f"{s['warmup']} warm-up + {s['repeats']} timed rounds, random order"
    )
    head = "".join(f"{fw + ' median':>14s}{fw + ' min':>12s}" for fw in fws)
    print(f"{'step (ms)':22s}{head}")
    for v in VARIANTS:
        cells = "".join(
            f"{fws[fw]['results'][v]['median_ms']:14.3f}{fws[fw]['results'][v]['min_ms']:12.3f}"
            for fw in fws
        )
        print(f"{v:22s}{cells}")
    head = "".join(f"{fw + ' median':>14s}{'min':>8s}{'paired':>8s}" for fw in fws)
    print(f"{'figure':22s}{head}")
    for name in FIGURES:
        cells = "".join(
            "{median:14.3f}{min:8.3f}{paired:8.3f}".format(**fws[fw]["figures"][name]) for fw in fws
        )
        print(f"{name:22s}{cells}")

    def cell(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    cells = "".join(
        f"{'total ' + cell(run['total']):>14s}{'':8s}{cell(run['paired']):>8s}"
        for run in (fws[fw]["figures"]["k10_run_over_adamw"] for fw in fws)
    )
    print(f"{'k10_run_over_adamw':22s}{cells}")
    target = out["target"]["k10_over_adamw"]
    for fw, d in fws.items():
        verdict = "meets" if d["meets_target"] else "misses"
        run = d["figures"]["k10_run_over_adamw"]
        how = (
            f"k=10 trainer, median of {run['cycles']} cycles of {K} steps"
            if run["paired"] is not None
            else "composed from medians, no whole cycle"
        )
        print(
            f"{fw}: SophiaG at k={K} over AdamW {d['verdict_k10_over_adamw']:.3f} ({how}) "
            f"{verdict} the target <= {target}; "
            f"loadavg {d['loadavg_start'][0]:.2f} -> {d['loadavg_end'][0]:.2f}"
        )


if __name__ == "__main__":
    main()

"""SophiaG on an accelerator in one run: correctness, optimizer step time, training.

Run as ``./dev bench gpu_check`` or, where the project's virtual environment
cannot be built (a machine with no package registry), as
``python benchmarks/gpu_check.py`` with any Python that imports torch and/or
JAX: the checkout's ``sophia`` is imported from the source tree, and whatever
is missing (torch, a CUDA build of it, jax, its GPU plugin, optax,
matplotlib) is printed at the start and its checks are skipped with a note.
Docs: ``docs/gpu_check.md``.

Three parts, in this order, each written to ``results.json`` in the output
folder (``--out``, default ``benchmarks/results/gpu_check-<timestamp>/``) as
soon as each of its units finishes, so that a run cut off still leaves what
it finished; ``log.txt`` there repeats the console:

1. **correctness**: every torch path (for-loop, foreach, fused) and jitted
   JAX, on the accelerator, in float32 and bfloat16, against the NumPy
   reference :func:`sophia.spec.sophia_update` / :func:`sophia.spec.hessian_ema`
   for 50 steps with a Hessian refresh every 5 (estimates and gradients from a
   seeded RNG). Every step feeds each implementation the reference's state,
   so each pair (implementation against the reference, and JAX against each
   torch path) is compared on the same inputs; the largest distance in ulps
   (bit patterns: -0 is one ulp from +0) per pair, the win-rate mismatches,
   and the distance in ulps of the largest operand, the measure of the
   fused-multiply-add bound. Each implementation is also run on its own for
   the 50 steps and compared with the reference trajectory. Two more units
   run the narrow state (bfloat16 m with bfloat16 / block8 h, float32
   parameters, 20 steps) in lockstep with the reference's forms, seed and
   step (``gpu/narrow.py``).
2. **step time**: GPT-2-small shapes (148 tensors, 124.4M parameters) and
   TinyLlama-1.1B shapes (201 tensors, 1.1B parameters), float32.
   ``SophiaG(fused=True)`` and ``(foreach=True)`` against
   ``torch.optim.AdamW(fused=True)`` and ``(foreach=True)``, jitted
   ``sophia_g`` (and ``step_diagnostics=False``) against ``optax.adamw``, and a
   device-to-device copy of N floats timed in the same interleaved rounds: the
   bandwidth floor. CUDA events (torch) and ``block_until_ready`` (JAX),
   warm-up, rounds in rotating order, medians. The bytes each optimizer must
   move per step (SophiaG reads theta, g, m, h and writes theta, m: 24 B per
   parameter; AdamW reads theta, g, m, v and writes theta, m, v: 28 B) over its
   time, as a fraction of the copy's bandwidth. ``torch.profiler`` counts the
   CUDA kernels one step of each torch optimizer launches.
3. **training**: the demo's GPT (:mod:`sophia.demo`) with SophiaG (k = 10)
   and AdamW, stepped alternately on the same batches (same tokens) in each
   framework, torch under bfloat16 autocast on CUDA; the largest preset
   whose run fits the part's time; loss curves (``training_loss.png``),
   tokens per second, the refresh's share of the step time and SophiaG's
   average step over AdamW's.

``--budget-s`` (default 450) bounds the whole run: each part gets a share of
what is left when it starts (correctness a quarter, step time 40%, training
the rest), a unit that would start past its part's share is skipped with a
note, and a part that would start past the budget is skipped. The first
correctness unit always runs, so every run leaves a result. ``--smoke`` runs
every part at tiny sizes on the CPU (JAX forced to the CPU), for the test
suite.

The parts live in ``benchmarks/gpu/`` (one module each) on the shared
``benchmarks/harness/``; this script is their command line.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(1, str(HERE))

from gpu.correctness import correctness  # noqa: E402
from gpu.environment import probe  # noqa: E402
from gpu.record import DEFAULT_BUDGET_S, PARTS, Part, Run, run_part  # noqa: E402
from gpu.step_time import step_time  # noqa: E402
from gpu.training import training  # noqa: E402


def print_summary(run: Run) -> None:
    """The parts' states and the verdicts."""
    run.log("\nparts:")
    for name, rec in run.data["parts"].items():
        run.log(f"  {name:<12} {rec['status']:<8} {rec.get('note', '')}")
        for key, u in rec.get("units", {}).items():
            if u["status"] != "done":
                run.log(f"    {key}: {u['status']}: {u.get('note') or u.get('error')}")
    run.log("\nverdicts (value, target <=):")
    for v in run.data["verdicts"]:
        state = {True: "met", False: "MISSED", None: "n/a"}[v["met"]]
        value = "n/a" if v["value"] is None else f"{v['value']:.4g}"
        run.log(f"  {state:<7} {v['what']}: {value} (<= {v['target']:g}) {v['note']}".rstrip())
    run.log(f"\nresults in {run.out}")


def main(argv: list[str] | None = None) -> int:
    """Runs the parts; returns 1 when a unit or part failed with an error, else 0."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default: benchmarks/results/gpu_check-<timestamp>/)",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="seconds for the whole run (default %(default)s)",
    )
    ap.add_argument("--smoke", action="store_true", help="every part at tiny sizes on the CPU")
    ap.add_argument(
        "--allow-cpu",
        action="store_true",
        help="run a framework that has no accelerator on the CPU",
    )
    ap.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}"
    )
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    for p in parts:
        if p not in PARTS:
            ap.error(f"--parts: unknown part {p!r} (allowed: {', '.join(PARTS)})")
    if not args.budget_s >= 0:
        ap.error(f"--budget-s: {args.budget_s} (allowed: a number of seconds >= 0)")
    if args.smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"  # before jax is imported
    # JAX would take 75% of the GPU up front and leave torch too little
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or HERE / "results" / f"gpu_check-{stamp}"
    run = Run(out, args.budget_s, sys.argv[1:] if argv is None else argv)
    run.data["smoke"] = args.smoke
    fw, env = probe(args.smoke, args.allow_cpu)
    run.data["environment"] = env
    run.log(
        f"python {env['python']} ({env['executable']}); torch {env.get('torch', '-')} on "
        f"{env['torch_runs_on']}; jax {env.get('jax', '-')} on {env['jax_runs_on']}; "
        f"budget {args.budget_s:g} s; results in {out}"
    )
    for m in env["missing"]:
        run.log(f"MISSING: {m}")
    if not args.smoke and not fw.accelerator:
        run.log("WARNING: no framework runs on an accelerator here; nothing but skips will follow")
    run.save()
    bodies: dict[str, Callable[[Part], None]] = {
        "correctness": lambda p: correctness(p, fw, args.smoke),
        "step_time": lambda p: step_time(p, fw, args.smoke),
        "training": lambda p: training(p, fw, args.smoke),
    }
    first = True
    for name in PARTS:
        if name not in parts:
            run.data["parts"][name] = {"status": "skipped", "note": "not in --parts"}
            continue
        run_part(run, name, bodies[name], first=first)
        first = False
    run.data["finished"] = True
    run.save()
    print_summary(run)
    run.close()
    failed = any(
        rec["status"] == "error"
        or any(u["status"] == "error" for u in rec.get("units", {}).values())
        for rec in run.data["parts"].values()
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

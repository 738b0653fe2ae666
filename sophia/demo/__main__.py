"""``python -m sophia.demo``: SophiaG against AdamW on a small GPT, then a table, a plot, a JSON.

Examples::

    python -m sophia.demo                          # the default run, JAX, a few minutes on a CPU
    python -m sophia.demo --framework torch        # the same run in PyTorch
    python -m sophia.demo --framework both         # JAX then PyTorch: one table per framework
    python -m sophia.demo --preset tiny            # seconds: a smoke test
    python -m sophia.demo --preset gpt2-small      # the paper's model shape, for an accelerator
    python -m sophia.demo --text input.txt         # any text file instead of the stdlib source
    python -m sophia.demo --sweep                  # the learning-rate (and rho) sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from sophia.demo.data import DEFAULT_MAX_BYTES
from sophia.demo.train import (
    PRESETS,
    SWEEP_ADAMW_LRS,
    SWEEP_RHOS,
    SWEEP_SOPHIA_LRS,
    BackendUnavailable,
    RunConfig,
    run_comparison,
    run_sweep,
)

__all__ = ["build_config", "main", "parser"]


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(
        prog="sophia-demo",
        description="Train a small character-level GPT with SophiaG and with AdamW (same init, "
        "data order and schedule) and compare: validation loss, steps to AdamW's final loss, "
        "time per step, Hessian-refresh overhead, optimizer memory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--framework",
        choices=("jax", "torch", "both"),
        default="jax",
        help="backend; 'both' runs JAX then PyTorch from the same weights and batches",
    )
    p.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default="default",
        help="run shape and optimizer settings; the flags below override it",
    )
    g = p.add_argument_group("run (defaults from --preset)")
    g.add_argument("--steps", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--block-size", type=int)
    g.add_argument("--n-layer", type=int)
    g.add_argument("--n-head", type=int)
    g.add_argument("--n-embd", type=int)
    g.add_argument("--warmup", type=int, help="warm-up steps")
    g.add_argument("--grad-clip", type=float, help="global-norm gradient clipping (both)")
    g.add_argument("--eval-interval", type=int)
    g.add_argument("--eval-batches", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument(
        "--hessian-batch",
        type=int,
        metavar="N",
        help="SophiaG's Hessian refresh on the first N sequences of the batch (own forward) "
        "instead of the whole batch (training forward reused); bs follows",
    )
    g.add_argument("--text", metavar="PATH", help="train on this file instead of the stdlib")
    g.add_argument(
        "--max-bytes",
        type=int,
        help=f"cap on corpus bytes, 0 for none (default preset: {DEFAULT_MAX_BYTES:,})",
    )
    o = p.add_argument_group("optimizers (defaults from --preset)")
    o.add_argument("--sophia-lr", type=float, help="SophiaG peak learning rate")
    o.add_argument("--rho", type=float, help="SophiaG rho")
    o.add_argument("--hessian-interval", type=int, help="SophiaG k (Hessian refresh interval)")
    o.add_argument("--sophia-b2", type=float, help="SophiaG b2 (EMA rate of the Hessian)")
    o.add_argument("--adamw-lr", type=float, help="AdamW peak learning rate")
    s = p.add_argument_group("sweep")
    s.add_argument(
        "--sweep",
        action="store_true",
        help="grid-search SophiaG's lr x rho and AdamW's lr on this run shape, write sweep.json",
    )
    s.add_argument("--sweep-sophia-lrs", type=_floats, default=SWEEP_SOPHIA_LRS)
    s.add_argument("--sweep-rhos", type=_floats, default=SWEEP_RHOS)
    s.add_argument("--sweep-adamw-lrs", type=_floats, default=SWEEP_ADAMW_LRS)
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def build_config(args: argparse.Namespace) -> RunConfig:
    """The preset with the flags that were given applied on top."""
    cfg = PRESETS[args.preset]
    model = dataclasses.replace(
        cfg.model,
        **{
            k: v
            for k, v in {
                "n_layer": args.n_layer,
                "n_head": args.n_head,
                "n_embd": args.n_embd,
                "block_size": args.block_size,
            }.items()
            if v is not None
        },
    )
    sophia = cfg.sophia
    for field, value in (
        ("lr", args.sophia_lr),
        ("rho", args.rho),
        ("k", args.hessian_interval),
        ("b2", args.sophia_b2),
    ):
        if value is not None:
            sophia = dataclasses.replace(sophia, **{field: value})
    adamw = cfg.adamw if args.adamw_lr is None else dataclasses.replace(cfg.adamw, lr=args.adamw_lr)
    run = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "warmup": args.warmup,
        "grad_clip": args.grad_clip,
        "eval_interval": args.eval_interval,
        "eval_batches": args.eval_batches,
        "seed": args.seed,
        "text": args.text,
        "max_bytes": args.max_bytes,
    }
    # checked here, before RunConfig checks it, so that the message names the flags
    hessian_batch = cfg.hessian_batch if args.hessian_batch is None else args.hessian_batch
    batch_size = cfg.batch_size if args.batch_size is None else args.batch_size
    if hessian_batch is not None and not 1 <= hessian_batch <= max(batch_size, 1):
        source = "" if args.hessian_batch is not None else f", the {args.preset} preset's"
        raise ValueError(
            f"Invalid --hessian-batch: {hessian_batch}{source} "
            f"(allowed: 1 <= N <= --batch-size, {batch_size})"
        )
    cfg = dataclasses.replace(
        cfg,
        model=model,
        sophia=sophia,
        adamw=adamw,
        hessian_batch=hessian_batch,
        **{k: v for k, v in run.items() if v is not None},
    )
    for name in ("steps", "batch_size", "eval_interval", "eval_batches"):
        if getattr(cfg, name) < 1:
            raise ValueError(
                f"Invalid --{name.replace('_', '-')}: {getattr(cfg, name)} (allowed: >= 1)"
            )
    if cfg.warmup < 0:
        raise ValueError(f"Invalid --warmup: {cfg.warmup} (allowed: >= 0)")
    if not 0.0 <= cfg.sophia.b2 < 1.0:
        raise ValueError(f"Invalid --sophia-b2: {cfg.sophia.b2} (allowed: 0 <= b2 < 1)")
    if cfg.grad_clip <= 0:
        raise ValueError(f"Invalid --grad-clip: {cfg.grad_clip} (allowed: > 0)")
    if cfg.sophia.k < 1:
        raise ValueError(f"Invalid --hessian-interval: {cfg.sophia.k} (allowed: >= 1)")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m sophia.demo`` and ``sophia-demo``; returns the exit status."""
    p = parser()
    args = p.parse_args(argv)
    try:
        cfg = build_config(args)
    except ValueError as e:
        p.error(str(e))
    frameworks = ("jax", "torch") if args.framework == "both" else (args.framework,)
    try:
        if args.sweep:
            if len(frameworks) > 1:
                p.error("--sweep runs one framework; pick --framework jax or torch")
            run_sweep(
                cfg,
                frameworks[0],
                args.out,
                sophia_lrs=args.sweep_sophia_lrs,
                rhos=args.sweep_rhos,
                adamw_lrs=args.sweep_adamw_lrs,
                progress=not args.no_progress,
            )
        else:
            run_comparison(cfg, frameworks, args.out, progress=not args.no_progress)
    except BackendUnavailable as e:
        # a framework that is not installed (e.g. sophiag[jax,demo] without torch)
        print(f"sophia-demo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sophia-demo: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

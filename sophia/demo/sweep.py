"""The learning-rate sweep: SophiaG over ``lr x rho``, AdamW over ``lr``, ranked by final loss."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from sophia.demo.compare import prepare_run
from sophia.demo.config import RunConfig
from sophia.demo.report import format_value, write_json
from sophia.demo.train import finite_or_none

__all__ = ["SWEEP_ADAMW_LRS", "SWEEP_RHOS", "SWEEP_SOPHIA_LRS", "run_sweep"]


#: The sweep's default grid (peak learning rates; SophiaG's rho).
SWEEP_SOPHIA_LRS: tuple[float, ...] = (2.5e-4, 5e-4, 1e-3)
SWEEP_RHOS: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
SWEEP_ADAMW_LRS: tuple[float, ...] = (1e-3, 2e-3, 4e-3, 8e-3)


def run_sweep(
    cfg: RunConfig,
    framework: str = "jax",
    out_dir: str | os.PathLike[str] | None = "runs/demo",
    *,
    sophia_lrs: Sequence[float] = SWEEP_SOPHIA_LRS,
    rhos: Sequence[float] = SWEEP_RHOS,
    adamw_lrs: Sequence[float] = SWEEP_ADAMW_LRS,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Grid search: SophiaG over ``lr x rho``, AdamW over ``lr``; everything else from ``cfg``.

    Each configuration is a full run of ``cfg`` (same init, data order and
    schedule), ranked by its final validation loss. Writes ``sweep.json``.

    Args:
      cfg: the run every configuration uses (``cfg.sophia``/``cfg.adamw``
        give the settings that are not swept).
      framework: the backend.
      out_dir: where ``sweep.json`` goes (``None``: nowhere).
      sophia_lrs: SophiaG's peak learning rates.
      rhos: SophiaG's rho values.
      adamw_lrs: AdamW's peak learning rates.
      progress: show a tqdm bar per run.
      log: where the console lines go.

    Returns:
      ``{"config", "machine", "runs": [...], "best": {"sophiag": ..., "adamw": ...}, "table"}``.

    Raises:
      BackendUnavailable: before any training, if the framework cannot run.
      ConfigError: before any training, if ``out_dir`` cannot be written or the
        corpus is too short for the model's context.
    """
    start = time.perf_counter()
    out, (backend,), corpus, info = prepare_run(cfg, (framework,), out_dir, log)
    opts = [dataclasses.replace(cfg.sophia, lr=lr, rho=rho) for lr in sophia_lrs for rho in rhos]
    opts += [dataclasses.replace(cfg.adamw, lr=lr) for lr in adamw_lrs]
    runs = []
    for i, opt in enumerate(opts):
        log(f"[{i + 1}/{len(opts)}] {opt.label}: {opt.describe()}")
        r = backend.run(cfg, opt, corpus, progress=progress)
        log(
            f"    final val {r.final_val:.4f}, best {min(r.val_loss, default=math.inf):.4f}"
            f"{' (diverged)' if r.diverged else ''}, {r.timings()['ms_per_step']:.0f} ms/step, "
            f"{r.wall_s:.0f} s"
        )
        runs.append(
            {
                "optimizer": opt.name,
                "lr": opt.lr,
                "rho": opt.rho if opt.name == "sophiag" else None,
                "final_val": finite_or_none(r.final_val),
                "best_val": finite_or_none(min(r.val_loss, default=math.inf)),
                "diverged": r.diverged,
                "val_steps": r.val_steps,
                "val_loss": [finite_or_none(v) for v in r.val_loss],
                "ms_per_step": r.timings()["ms_per_step"],
            }
        )
    best = {}
    for name in ("sophiag", "adamw"):
        cands = [r for r in runs if r["optimizer"] == name and r["final_val"] is not None]
        best[name] = min(cands, key=lambda r: r["final_val"]) if cands else None
    table = _sweep_table(runs, best)
    log("")
    log(table)
    flags = []
    if best["sophiag"]:
        flags.append(f"--sophia-lr {best['sophiag']['lr']:g} --rho {best['sophiag']['rho']:g}")
    if best["adamw"]:
        flags.append(f"--adamw-lr {best['adamw']['lr']:g}")
    log("best: " + " ".join(flags))
    elapsed = time.perf_counter() - start
    log(f"elapsed {elapsed:.1f} s")
    record = {
        "config": cfg.to_dict(),
        "framework": framework,
        "machine": info,
        "runs": runs,
        "best": best,
        "table": table,
        "elapsed_s": elapsed,
    }
    if out is not None:
        write_json(record, out / "sweep.json")
        log(f"wrote {out / 'sweep.json'}")
    return record


def _sweep_cell(run: dict[str, Any]) -> str:
    """A run's entry in the sweep's table: its final validation loss, or ``diverged``."""
    return "diverged" if run["diverged"] else format_value(run["final_val"], ".4f")


def _sweep_table(runs: Sequence[dict[str, Any]], best: dict[str, Any]) -> str:
    lines = []
    s_runs = [r for r in runs if r["optimizer"] == "sophiag"]
    if s_runs:
        lrs = list(dict.fromkeys(r["lr"] for r in s_runs))
        rhos = list(dict.fromkeys(r["rho"] for r in s_runs))
        lines.append("SophiaG final val loss (rows: lr, columns: rho)")
        lines.append("lr \\ rho".ljust(10) + "".join(f"{rho:>10g}" for rho in rhos))
        for lr in lrs:
            cells = []
            for rho in rhos:
                r = next(x for x in s_runs if x["lr"] == lr and x["rho"] == rho)
                mark = "*" if r is best.get("sophiag") else " "
                cells.append(f"{_sweep_cell(r):>9}{mark}")
            lines.append(f"{lr:<10g}" + "".join(cells))
    a_runs = [r for r in runs if r["optimizer"] == "adamw"]
    if a_runs:
        lines.append("")
        lines.append("AdamW final val loss")
        lines.append("lr".ljust(10) + "".join(f"{r['lr']:>10g}" for r in a_runs))
        cells = []
        for r in a_runs:
            mark = "*" if r is best.get("adamw") else " "
            cells.append(f"{_sweep_cell(r):>9}{mark}")
        lines.append(" " * 10 + "".join(cells))
    return "\n".join(lines)

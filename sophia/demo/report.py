"""What a run reports: the output directory, the console lines, the summary table, the JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sophia.demo.config import FRAMEWORKS, REFRESH_RULE, ConfigError, RunConfig
from sophia.demo.data import Corpus
from sophia.demo.model import n_params
from sophia.demo.train import RunResult, finite_or_none

__all__ = [
    "BEHIND_NOTE",
    "behind_note",
    "describe_machine",
    "describe_run",
    "format_table",
    "format_value",
    "prepare_out_dir",
    "summarize",
    "write_json",
]


#: Said under the table and in the plot's title when SophiaG does not reach AdamW's loss.
BEHIND_NOTE: str = (
    "SophiaG behind AdamW is the expected result at this scale (the paper's gains are at "
    'GPT-2 scale over 100K+ steps): see "The main job" in README.md and docs/demo_findings.md'
)


def prepare_out_dir(path: str | os.PathLike[str]) -> Path:
    """Creates the output directory and checks that files can be written there.

    Called before the first training step, so that an unwritable directory is
    found at once instead of after the whole run.

    Args:
      path: the directory (created with its parents when missing).

    Returns:
      The directory as an absolute path.

    Raises:
      ConfigError: it cannot be created or written to; the message says why.
    """
    out = Path(path).expanduser().absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(f"cannot write to {out}: {reason}") from e
    return out


def behind_note(summary: dict[str, dict[str, Any]]) -> str | None:
    """:data:`BEHIND_NOTE` when SophiaG did not reach AdamW's final loss in some framework."""
    behind = any(
        "steps_to_adamw_final" in row and row["steps_to_adamw_final"] is None
        for row in summary.values()
    )
    return BEHIND_NOTE if behind else None


def summarize(results: Sequence[RunResult]) -> dict[str, dict[str, Any]]:
    """Per framework: each optimizer's numbers and SophiaG against AdamW.

    ``steps_to_adamw_final`` is the first evaluation step at which SophiaG's
    validation loss is at or below AdamW's final one (``None``: not reached);
    ``steps_ratio`` divides it by AdamW's step count. ``time_ratio`` is
    SophiaG's mean ms/step over AdamW's, ``refresh_overhead`` SophiaG's mean
    refresh-step time over its plain-step time.
    """
    out: dict[str, dict[str, Any]] = {}
    for fw in dict.fromkeys(r.framework for r in results):
        runs = {r.optimizer.name: r for r in results if r.framework == fw}
        row: dict[str, Any] = {}
        for name, r in runs.items():
            t = r.timings()
            row[name] = {
                "final_val": finite_or_none(r.final_val),
                "best_val": finite_or_none(min(r.val_loss, default=math.inf)),
                "steps": len(r.train_loss),
                "diverged": r.diverged,
                "ms_per_step": t["ms_per_step"],
                "tokens_per_s": 1e3 * r.tokens_per_step / t["ms_per_step"],
                "opt_state_bytes": r.opt_state_bytes,
                "opt_state_per_param_bytes": r.opt_state_bytes / max(r.n_params, 1),
                **{k: t[k] for k in ("plain_ms", "refresh_ms") if k in t},
            }
            if "plain_ms" in t:
                row[name]["refresh_overhead"] = t["refresh_ms"] / t["plain_ms"]
            if r.diagnostics and "win_rate" in r.diagnostics[-1]:
                rates = [d["win_rate"] for d in r.diagnostics[1:]] or [math.nan]
                row[name]["final_win_rate"] = r.diagnostics[-1]["win_rate"]
                row[name]["mean_win_rate"] = float(np.mean(rates))
        if "sophiag" in runs and "adamw" in runs:
            sophia_run, adamw_run = runs["sophiag"], runs["adamw"]
            target = adamw_run.final_val
            evals = zip(sophia_run.val_steps, sophia_run.val_loss)
            reached = next((step for step, loss in evals if loss <= target), None)
            row["adamw_final_val"] = finite_or_none(target)
            row["steps_to_adamw_final"] = reached
            adamw_steps = max(len(adamw_run.train_loss), 1)
            row["steps_ratio"] = None if reached is None else reached / adamw_steps
            row["time_ratio"] = row["sophiag"]["ms_per_step"] / row["adamw"]["ms_per_step"]
        out[fw] = row
    return out


def format_value(x: Any, spec: str) -> str:
    """``x`` formatted with ``spec``, or ``-`` when it is missing or not finite."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """The comparison table printed at the end of a run."""
    lines = []
    for fw, row in summary.items():
        sophia_row, adamw_row = row.get("sophiag", {}), row.get("adamw", {})
        reached = row.get("steps_to_adamw_final")
        if "steps_to_adamw_final" not in row:
            reach = "-"
        elif reached is None:
            reach = "not reached"
        else:
            reach = f"{reached} ({row['steps_ratio']:.2f}x)"
        mib = 1024**2
        rows = [
            (
                "final val loss (nats)",
                format_value(sophia_row.get("final_val"), ".4f"),
                format_value(adamw_row.get("final_val"), ".4f"),
            ),
            ("steps to AdamW's final val loss", reach, format_value(adamw_row.get("steps"), "d")),
            (
                "ms/step (mean)",
                format_value(sophia_row.get("ms_per_step"), ".1f"),
                format_value(adamw_row.get("ms_per_step"), ".1f"),
            ),
            (
                "  plain / Hessian-refresh steps",
                f"{format_value(sophia_row.get('plain_ms'), '.1f')} / "
                f"{format_value(sophia_row.get('refresh_ms'), '.1f')}"
                f" ({format_value(sophia_row.get('refresh_overhead'), '.2f')}x)",
                "-",
            ),
            ("  step time vs AdamW", format_value(row.get("time_ratio"), ".2f") + "x", "1.00x"),
            (
                "SophiaG win rate (mean / last eval)",
                f"{format_value(sophia_row.get('mean_win_rate'), '.2f')} / "
                f"{format_value(sophia_row.get('final_win_rate'), '.2f')}",
                "-",
            ),
            (
                "tokens/s",
                format_value(sophia_row.get("tokens_per_s"), ",.0f"),
                format_value(adamw_row.get("tokens_per_s"), ",.0f"),
            ),
            (
                "optimizer state (MiB)",
                format_value(sophia_row.get("opt_state_bytes", math.nan) / mib, ".2f")
                + f" ({format_value(sophia_row.get('opt_state_per_param_bytes'), '.2f')} B/param)",
                format_value(adamw_row.get("opt_state_bytes", math.nan) / mib, ".2f")
                + f" ({format_value(adamw_row.get('opt_state_per_param_bytes'), '.2f')} B/param)",
            ),
        ]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len("SophiaG"), *(len(r[1]) for r in rows))
        w2 = max(len("AdamW"), *(len(r[2]) for r in rows))
        lines.append(f"[{fw}]".ljust(w0) + "  " + "SophiaG".rjust(w1) + "  " + "AdamW".rjust(w2))
        lines.append("-" * (w0 + w1 + w2 + 4))
        lines += [f"{r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]:>{w2}}" for r in rows]
        lines.append("")
    return "\n".join(lines).rstrip()


def _json_default(x: Any) -> Any:
    """NumPy scalars and arrays and dataclasses as plain JSON values."""
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _clean(x: Any) -> Any:
    """Replaces non-finite floats by ``None`` so the JSON is strict."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(data: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Writes ``data`` as strict JSON (NaN and infinity become ``null``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_clean(json.loads(json.dumps(data, default=_json_default))), indent=1)
    path.write_text(text + "\n")
    return path


def describe_run(cfg: RunConfig, corpus: Corpus) -> list[str]:
    """The console lines that say what a run trains on, and how."""
    m = cfg.model
    return [
        f"data: {corpus.describe()}",
        f"model: GPT {m.n_layer} layers, {m.n_head} heads, width {m.n_embd}, context "
        f"{m.block_size}, {n_params(m):,} parameters",
        f"run: {cfg.steps} steps x {cfg.batch_size} x {m.block_size} = "
        f"{cfg.tokens_per_step:,} tokens/step, warm-up {cfg.warmup}, cosine to "
        f"{cfg.min_lr_ratio:g} lr, clip {cfg.grad_clip:g}, eval every {cfg.eval_interval} "
        f"on {cfg.eval_batches} batches, seed {cfg.seed}",
        f"SophiaG Hessian refresh: {REFRESH_RULE} (k = {cfg.sophia.k}); "
        + (
            "whole batch, training forward reused"
            if cfg.reuses_forward
            else f"first {cfg.hessian_batch} of {cfg.batch_size} sequences, own forward"
        )
        + f", bs {cfg.hessian_tokens:,}",
    ]


def describe_machine(info: dict[str, Any]) -> list[str]:
    """The console lines of :func:`sophia.demo.machine.machine_info`'s record."""
    lines = [
        f"machine: {info['cpu']} ({info['cpu_count']} cpus), {info['platform']}, "
        f"Python {info['python']}, NumPy {info['numpy']}"
    ]
    for fw in FRAMEWORKS:
        if fw in info:
            lines.append(
                f"{fw}: " + ", ".join(f"{k} {v}" for k, v in info[fw].items() if k != "framework")
            )
    return lines

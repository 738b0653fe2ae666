"""Part 2 of ``gpu_check.py``: optimizer step time against AdamW and the bandwidth floor.

GPT-2 small and TinyLlama 1.1B shapes (:mod:`harness.shapes`), each framework's
optimizers timed by :mod:`gpu.step_variants`, verdicts against the targets and
a plot of every median step against its floor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from harness.shapes import Shapes, gpt2_small, shrink, tinyllama_1b

from gpu.environment import Frameworks
from gpu.record import Part
from gpu.step_variants import jax_step_time, torch_step_time

#: Each framework's step against AdamW's and against its bandwidth floor (<=).
TARGETS = {
    "torch_fused_over_adamw": 1.0,
    "torch_fused_over_floor": 1.15,
    "jax_sophia_over_adamw": 1.0,
    "jax_sophia_over_floor": 1.15,
}


def shape_lists(smoke: bool) -> dict[str, Shapes]:
    """The two shape lists (in smoke mode one block of each, dimensions / 16 and / 32)."""
    gpt2, llama = gpt2_small(), tinyllama_1b()
    if smoke:
        gpt2, llama = shrink(gpt2, 16), shrink(llama, 32)
    return {"gpt2-small": gpt2, "tinyllama-1.1b": llama}


def step_time(part: Part, fw: Frameworks, smoke: bool) -> None:
    """Part 2 (see the module docstring)."""
    lists = shape_lists(smoke)
    warmup, repeats = (1, 3) if smoke else (3, 15)
    done: dict[str, dict[str, Any]] = {}
    for label, shapes in lists.items():
        reps = repeats if smoke or label == "gpt2-small" else max(repeats * 2 // 3, 3)
        for framework, fn in (("torch", torch_step_time), ("jax", jax_step_time)):
            res = part.unit(
                f"{framework} {label}",
                lambda fn=fn, shapes=shapes, reps=reps: fn(fw, shapes, warmup, reps),
            )
            if res is not None:
                done[f"{framework} {label}"] = res
    for key, res in done.items():
        framework, label = key.split(" ", 1)
        sophia, adamw = (
            ("sophia_fused", "adamw_fused") if framework == "torch" else ("sophia_g", "adamw")
        )
        names = {
            "torch": ("torch SophiaG fused", "AdamW fused", "torch_fused"),
            "jax": ("JAX sophia_g", "optax.adamw", "jax_sophia"),
        }[framework]
        why = "; ".join(f"{k}: {e}" for k, e in res["errors"].items())
        over = res["ratios"].get(f"{sophia} / {adamw}", {}).get("of_medians")
        floor = res["variants"].get(sophia, {}).get("over_floor")
        for what, value, target in (
            (f"{names[0]} / {names[1]}", over, TARGETS[f"{names[2]}_over_adamw"]),
            (f"{names[0]} / bandwidth floor", floor, TARGETS[f"{names[2]}_over_floor"]),
        ):
            part.run.verdict(
                f"step time {label}: {what}",
                value,
                target,
                res.get("fused_launch_summary", "") if value is not None else why,
                met=False if value is None else None,
            )
    if done:
        plot_step_time(done, part.run.out / "step_time.png", part.record)


def plot_step_time(done: dict[str, dict[str, Any]], path: Path, record: dict[str, Any]) -> None:
    """Median step time of every optimizer against its bandwidth floor, one panel per unit."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        record["plot"] = None
        return
    fig, axes = plt.subplots(1, len(done), figsize=(4.2 * len(done), 3.8), squeeze=False)
    for ax, (key, res) in zip(axes[0], done.items()):
        names = [k for k in res["variants"] if k != "copy"]
        ms = [res["variants"][k]["median_ms"] for k in names]
        floors = [res["variants"][k]["floor_ms"] for k in names]
        x = np.arange(len(names))
        ax.bar(x, ms, color="tab:blue", label="median step")
        ax.scatter(x, floors, color="black", marker="_", s=400, zorder=3, label="bandwidth floor")
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("ms")
        ax.set_title(f"{key} ({res['n_params'] / 1e6:.0f}M)", fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    record["plot"] = path.name

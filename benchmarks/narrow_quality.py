"""The quality part of benchmarks/narrow_state.py: the demo's SophiaG run in each state form.

Each framework trains the demo's model (:mod:`sophia.demo`, a preset) with
SophiaG in every form of :data:`narrow_variants.FORMS`, from the same weights,
batches and schedule; the figure is each form's final validation loss minus
the float32 run's (the target: within 0.01 nats). One framework also trains
``long_factor`` times longer per form (the schedule stretched with it), for
drift that only builds up over many refreshes. The optimizer-state bytes are
the demo's own measurement of the trained optimizer's state.

One run's difference mixes the form's effect with the chaotic divergence any
perturbation of a training run causes; ``seeds > 1`` repeats the runs at the
demo seeds ``0 .. seeds-1`` (each seed its own weights, batches, label
sampling and rounding), so a form's mean difference over seeds can be read
against its spread and against float32's own spread across seeds.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from narrow_variants import FORMS

from sophia.demo.backends import load_backend
from sophia.demo.config import RunConfig
from sophia.demo.data import load_corpus

#: The quality target: a narrow form's final validation loss within this of float32's.
TARGET_NATS = 0.01


def stretched(cfg: RunConfig, factor: int) -> RunConfig:
    """``cfg`` ``factor`` times longer: steps, warm-up and evaluation interval alike."""
    return dataclasses.replace(
        cfg,
        steps=cfg.steps * factor,
        warmup=cfg.warmup * factor,
        eval_interval=cfg.eval_interval * factor,
    )


def run_forms(
    cfg: RunConfig, framework: str, forms: Sequence[str], log: Callable[[str], None]
) -> dict[str, Any]:
    """Trains SophiaG in each form; the records and each form's difference to the first.

    Returns:
      ``{"runs": {form: record}, "missing": {form: error}}``; a record holds the
      final and per-evaluation validation losses, their difference to the
      float32 run's, the measured state bytes per parameter and the time.
    """
    backend = load_backend(framework)
    corpus = load_corpus(cfg.text, cfg.max_bytes)
    runs: dict[str, Any] = {}
    missing: dict[str, str] = {}
    for form in forms:
        mu, h = FORMS[form]
        opt = dataclasses.replace(cfg.sophia, mu_dtype=mu, hessian_dtype=h)
        t0 = time.perf_counter()
        try:
            res = backend.run(cfg, opt, corpus, progress=False)
        except (TypeError, ValueError, NotImplementedError) as e:
            missing[form] = f"{type(e).__name__}: {e}"
            log(f"  {framework} {form}: missing ({missing[form]})")
            continue
        runs[form] = {
            "final_val": res.final_val,
            "val_steps": res.val_steps,
            "val_loss": res.val_loss,
            "diverged": res.diverged,
            "state_bytes_per_param": res.opt_state_bytes / res.n_params,
            "n_params": res.n_params,
            "wall_s": time.perf_counter() - t0,
            "ms_per_step_median": res.timings()["ms_per_step_median"],
        }
        log(
            f"  {framework} {form}: {cfg.steps} steps, final val {res.final_val:.4f}, "
            f"{runs[form]['state_bytes_per_param']:.2f} B/param, {runs[form]['wall_s']:.0f} s"
        )
    base = runs.get(forms[0])
    for r in runs.values():
        if base is None or r["diverged"] or base["diverged"]:
            continue
        r["final_val_minus_f32"] = r["final_val"] - base["final_val"]
        diffs = [a - b for a, b in zip(r["val_loss"], base["val_loss"])]
        r["max_abs_val_minus_f32"] = max(abs(d) for d in diffs)
        r["within_target"] = abs(r["final_val_minus_f32"]) <= TARGET_NATS
    return {"runs": runs, "missing": missing}


def over_seeds(records: Sequence[dict[str, Any]], forms: Sequence[str]) -> dict[str, Any]:
    """Each form's final losses and differences to float32 over the seeds' records.

    Returns:
      ``final_val`` and ``minus_f32`` per form (one value per seed that ran),
      the mean and sample standard deviation of ``minus_f32``, and ``f32_std``,
      float32's own spread of final losses across seeds.
    """
    out: dict[str, Any] = {"final_val": {}, "minus_f32": {}, "mean_minus_f32": {}}
    out["std_minus_f32"] = {}
    for form in forms:
        runs = [r["runs"][form] for r in records if form in r["runs"]]
        out["final_val"][form] = [r["final_val"] for r in runs]
        diffs = [r["final_val_minus_f32"] for r in runs if "final_val_minus_f32" in r]
        out["minus_f32"][form] = diffs
        out["mean_minus_f32"][form] = statistics.fmean(diffs) if diffs else None
        out["std_minus_f32"][form] = statistics.stdev(diffs) if len(diffs) > 1 else None
    f32 = out["final_val"].get(forms[0], [])
    out["f32_std"] = statistics.stdev(f32) if len(f32) > 1 else None
    return out


def quality(
    cfg: RunConfig,
    frameworks: Sequence[str],
    forms: Sequence[str],
    long_framework: str | None,
    long_factor: int,
    log: Callable[[str], None],
    seeds: int = 1,
) -> dict[str, Any]:
    """Each framework's runs at ``cfg``; ``long_framework``'s at ``long_factor`` x the steps.

    With ``seeds > 1`` each framework's runs repeat at seeds ``0 .. seeds-1``
    (:func:`over_seeds`); the records are seed 0's, the long runs seed 0 only.
    """
    out: dict[str, Any] = {
        "preset_steps": cfg.steps,
        "target_nats": TARGET_NATS,
        "seeds": seeds,
        "frameworks": {},
    }
    for fw in frameworks:
        records = []
        for seed in range(seeds):
            log(f"quality: {fw}, {cfg.steps} steps per form, seed {seed}")
            records.append(run_forms(dataclasses.replace(cfg, seed=seed), fw, forms, log))
        out["frameworks"][fw] = records[0]
        if seeds > 1:
            out["frameworks"][fw]["over_seeds"] = over_seeds(records, forms)
    if long_framework:
        long_cfg = stretched(cfg, long_factor)
        log(f"quality: {long_framework}, {long_cfg.steps} steps per form (x{long_factor})")
        out["long"] = {
            "framework": long_framework,
            "factor": long_factor,
            "steps": long_cfg.steps,
            **run_forms(long_cfg, long_framework, forms, log),
        }
    return out

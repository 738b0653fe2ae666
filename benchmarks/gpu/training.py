"""Part 3 of ``gpu_check.py``: the demo's GPT trained with SophiaG and AdamW in each framework.

Both optimizers step alternately on the same batches (the same tokens), torch
under bfloat16 autocast on CUDA, at the largest preset whose run fits the
part's time; loss curves, tokens per second, the refresh's share of the step
and SophiaG's average step over AdamW's.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time
from typing import Any

import numpy as np

from gpu.environment import Frameworks
from gpu.record import Part, Skip

#: SophiaG's average step at k = 10 over AdamW's (<=).
TARGET_K10_STEP_OVER_ADAMW = 1.05
#: Presets tried, largest first; a preset fits when at least this many steps fit its time.
TRAIN_PRESETS = ("gpt2-small", "default", "tiny")
MIN_TRAIN_STEPS = 200


def scaled_config(preset: str, steps: int, smoke: bool) -> Any:
    """The preset shortened to ``steps`` (warm-up scaled alike), with five evaluations."""
    from sophia.demo.config import PRESETS

    cfg = PRESETS[preset]
    if smoke:  # one block: the JAX trainers compile in seconds
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layer=1))
    return dataclasses.replace(
        cfg,
        steps=steps,
        warmup=max(1, round(cfg.warmup * steps / cfg.steps)),
        eval_interval=max(1, steps // 5),
        eval_batches=2 if smoke else min(cfg.eval_batches, 4),
    )


def make_trainers(fw: Frameworks, framework: str, cfg: Any) -> dict[str, Any]:
    """SophiaG's and AdamW's trainers of the demo; torch under bfloat16 autocast on CUDA."""
    from sophia.demo.backends import load_backend

    backend = load_backend(framework)
    if framework == "jax":
        return {o.name: backend.make_trainer(cfg, o) for o in cfg.optimizers}
    torch = fw.torch
    trainers = {o.name: backend.TorchTrainer(cfg, o, fw.torch_device) for o in cfg.optimizers}
    if fw.torch_device.type == "cuda":
        for tr in trainers.values():
            tr.model.forward = torch.autocast("cuda", dtype=torch.bfloat16)(tr.model.forward)
    return trainers


def precision(fw: Frameworks, framework: str) -> str:
    """How the demo model computes in ``framework`` here."""
    if framework == "torch":
        if fw.torch_device.type == "cuda":
            return "float32 parameters and optimizer state; forward under torch.autocast(bfloat16)"
        return "float32 (no autocast on the CPU)"
    return (
        "float32 parameters and activations (JAX has no autocast); dots at XLA's default "
        f"precision for float32 on {fw.jax.default_backend()}"
    )


def calibrate(fw: Frameworks, framework: str, preset: str) -> float:
    """Seconds one SophiaG step plus one AdamW step take at ``preset`` (after warm-up)."""
    from sophia.demo.config import PRESETS

    cfg = PRESETS[preset]
    trainers = make_trainers(fw, framework, cfg)
    rng = np.random.default_rng(0)
    window = rng.integers(0, cfg.model.vocab_size, (cfg.batch_size, cfg.model.block_size + 1))
    x, y = window[:, :-1].astype(np.int32), window[:, 1:].astype(np.int32)
    times: dict[str, list[float]] = {k: [] for k in trainers}
    for i in range(5):
        for name, tr in trainers.items():
            t0 = time.perf_counter()
            tr.step(x, y)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    del trainers
    _free(fw, framework)
    return sum(statistics.median(v) for v in times.values())


def _free(fw: Frameworks, framework: str) -> None:
    gc.collect()
    if framework == "torch" and fw.torch_device.type == "cuda":
        fw.torch.cuda.empty_cache()


def plan_training(
    fw: Frameworks, frameworks: list[str], deadline: float, smoke: bool
) -> dict[str, Any]:
    """The preset and step count: the largest preset whose run fits each framework's slice.

    Timed on the first framework (torch when it is there: no compilation);
    each framework gets an equal slice of what is left, less a fifth for
    compilation, evaluations and refreshes.
    """
    if smoke:
        return {"preset": "tiny", "steps": 12, "why": "--smoke"}
    tried = []
    for preset in TRAIN_PRESETS:
        pair_s = calibrate(fw, frameworks[0], preset)
        slice_s = (deadline - time.perf_counter()) / len(frameworks) * 0.8
        from sophia.demo.config import PRESETS

        steps = min(PRESETS[preset].steps, int(slice_s / pair_s))
        tried.append(
            {"preset": preset, "pair_step_s": pair_s, "slice_s": slice_s, "steps_that_fit": steps}
        )
        if steps >= MIN_TRAIN_STEPS or preset == TRAIN_PRESETS[-1]:
            return {
                "preset": preset,
                "steps": max(steps, 2),
                "calibrated_on": frameworks[0],
                "tried": tried,
            }
    raise AssertionError("unreachable")


def train_pair(
    fw: Frameworks, framework: str, cfg: Any, corpus: Any, deadline: float
) -> dict[str, Any]:
    """SophiaG and AdamW stepped alternately on the same batches; stops at ``deadline``."""
    from sophia.demo.data import BatchSampler, eval_batches
    from sophia.demo.train import RunResult

    trainers = make_trainers(fw, framework, cfg)
    opts = {o.name: o for o in cfg.optimizers}
    block = cfg.model.block_size
    sampler = BatchSampler(corpus.train, cfg.batch_size, block, cfg.seed + 1)
    val_set = eval_batches(corpus.val, cfg.eval_batches, cfg.batch_size, block, cfg.seed + 2)
    runs = {
        k: RunResult(
            framework, opts[k], [], [], [], [], [], tr.n_params, cfg.tokens_per_step, 0, 0.0
        )
        for k, tr in trainers.items()
    }
    start = time.perf_counter()

    def evaluate(step: int) -> None:
        for k, tr in trainers.items():
            runs[k].val_steps.append(step)
            runs[k].val_loss.append(float(tr.evaluate(val_set)))
            diag = tr.diagnostics()
            if diag:
                runs[k].diagnostics.append({"step": step, **diag})

    evaluate(0)
    evals, cut = set(cfg.eval_steps()), None
    names = list(trainers)
    for step in range(cfg.steps):
        if time.perf_counter() > deadline:
            cut = step
            break
        x, y = sampler.next()
        for k in names if step % 2 == 0 else names[::-1]:  # neither always runs first
            t0 = time.perf_counter()
            loss = float(trainers[k].step(x, y))
            runs[k].step_ms.append((time.perf_counter() - t0) * 1e3)
            runs[k].train_loss.append(loss)
            runs[k].refresh.append(opts[k].refreshes(step))
            runs[k].diverged |= not math.isfinite(loss)
        if any(r.diverged for r in runs.values()):
            cut = step + 1
            break
        if step + 1 in evals:
            evaluate(step + 1)
    if cut is not None and runs[names[0]].val_steps[-1] != cut:
        evaluate(cut)
    for k, tr in trainers.items():
        runs[k].opt_state_bytes = int(tr.opt_state_bytes())
        runs[k].wall_s = time.perf_counter() - start
    trainers.clear()
    _free(fw, framework)
    return {"runs": runs, "cut_at_step": cut}


def training_figures(runs: dict[str, Any], k: int, tokens_per_step: int) -> dict[str, Any]:
    """Tokens per second, the refresh's share and SophiaG's average step over AdamW's.

    The ratio sums whole cycles of ``k`` steps after the first (whose steps
    compile); with fewer than two cycles it is composed from the median plain
    and refresh steps.
    """
    s, a = runs["sophiag"], runs["adamw"]
    n = len(s.step_ms)
    lo, hi = k, k * (n // k)
    out: dict[str, Any] = {}
    for name, r in runs.items():
        t = r.timings()
        out[name] = {
            "tokens_per_s": tokens_per_step / (t["ms_per_step_median"] / 1e3),
            "final_val": r.final_val if math.isfinite(r.final_val) else None,
            **t,
        }
    ts = out["sophiag"]
    if hi - lo >= k:
        over = sum(s.step_ms[lo:hi]) / sum(a.step_ms[lo:hi])
        how = f"sum of steps {lo}..{hi - 1} ({(hi - lo) // k} whole cycles of {k}) over AdamW's"
    elif "refresh_ms_median" in ts:
        over = (
            ((k - 1) * ts["plain_ms_median"] + ts["refresh_ms_median"])
            / k
            / out["adamw"]["ms_per_step_median"]
        )
        how = "composed from median plain and refresh steps (fewer than two cycles)"
    else:
        over, how = None, "no refresh step timed"
    if "refresh_ms_median" in ts:
        extra = ts["refresh_ms_median"] - ts["plain_ms_median"]
        mean_step = ((k - 1) * ts["plain_ms_median"] + ts["refresh_ms_median"]) / k
        out["refresh"] = {
            "extra_ms": extra,
            "refresh_over_plain": ts["refresh_ms_median"] / ts["plain_ms_median"],
            "share_of_average_step": extra / k / mean_step,
        }
    out["k10_step_over_adamw"] = {"value": over, "how": how, "k": k}
    return out


def training(part: Part, fw: Frameworks, smoke: bool) -> None:
    """Part 3 (see the module docstring)."""
    from sophia.demo.data import load_corpus

    frameworks = [f for f, m in (("torch", fw.torch), ("jax", fw.jax)) if m is not None]
    plan = part.unit("plan", lambda: _plan_unit(fw, frameworks, part.deadline, smoke))
    if plan is None:
        return
    cfg = scaled_config(plan["preset"], plan["steps"], smoke)
    corpus = load_corpus(cfg.text, 1_000_000 if smoke else cfg.max_bytes)
    part.record["config"] = cfg.to_dict()
    all_runs: list[Any] = []
    for i, framework in enumerate(frameworks):
        left = part.deadline - time.perf_counter()
        deadline = time.perf_counter() + left / (len(frameworks) - i)

        def one(framework: str = framework, deadline: float = deadline) -> dict[str, Any]:
            got = train_pair(fw, framework, cfg, corpus, deadline)
            runs = got["runs"]
            all_runs.extend(runs.values())
            figs = training_figures(runs, cfg.sophia.k, cfg.tokens_per_step)
            return {
                "precision": precision(fw, framework),
                "steps_run": len(runs["sophiag"].step_ms),
                "cut_at_step": got["cut_at_step"],
                "tokens_per_optimizer": len(runs["sophiag"].step_ms) * cfg.tokens_per_step,
                "figures": figs,
                "runs": {k: r.to_dict() for k, r in runs.items()},
            }

        res = part.unit(framework, one)
        if res is not None:
            over = res["figures"]["k10_step_over_adamw"]
            part.run.verdict(
                f"training {plan['preset']} ({framework}): SophiaG k={cfg.sophia.k} / AdamW step",
                over["value"],
                TARGET_K10_STEP_OVER_ADAMW,
                over["how"],
            )
        if all_runs and _has_matplotlib():
            from sophia.demo.plot import plot_losses

            title = f"{plan['preset']}: SophiaG vs AdamW on the same batches"
            plot_losses(all_runs, part.run.out / "training_loss.png", title)
            part.record["plot"] = "training_loss.png"
            part.run.save()


def _plan_unit(
    fw: Frameworks, frameworks: list[str], deadline: float, smoke: bool
) -> dict[str, Any]:
    if not frameworks:
        raise Skip("; ".join(n for n in (fw.torch_note, fw.jax_note) if n))
    return plan_training(fw, frameworks, deadline, smoke)


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None

"""8-bit Hessian formats against SophiaG's clipping decisions, on the demo's real states.

Run as ``./dev bench narrow_codes`` or ``.venv/bin/python benchmarks/narrow_codes.py``
(``--small``: the demo's ``tiny`` preset; ``--tiny``: a smoke test).

Why: a narrow ``h`` only matters where it changes the step. SophiaG's step is
``sign(m) * r`` with ``r = min(|m| / (rho * bs * h + eps), 1)``, so what a
format can break is the clipping decision (``r = 1`` or not) and ``r`` just
below the threshold, where the step is most sensitive to ``h``.

How:

* **capture**: the demo's own torch trainer (:class:`sophia.demo.train_torch.
  TorchTrainer`, the ``default`` preset, float32 state, its batches) trains
  to the last of ``--steps``; every Hessian estimate it refreshes with is
  recorded (computed by :func:`sophia.torch.gnb` and handed to
  ``update_hessian(hessian=...)``, the same estimate the trainer's
  ``update_hessian(logits=...)`` computes), and at each of ``--steps`` the
  optimizer's ``m`` and ``h``.
* **replay**: the EMA ``h <- b2 h + (1 - b2) h_hat`` is replayed over the
  recorded estimates with ``h`` stored in each format at every refresh, as an
  optimizer holding it would (:func:`sophia.spec.hessian_ema`; the rounding
  bits of :func:`sophia.narrow.random_bits` at that refresh's step, for
  ``--seeds`` rounding seeds). The float32 replay must equal the trainer's
  ``h`` bit for bit (``replay_max_abs_diff``), which shows the recorded
  estimates are the ones it used.
* **figures**, against the float32 ``h`` with the same ``m``, ``r`` computed
  by :func:`sophia.spec.sophia_update` itself: the fraction of coordinates
  whose clip decision flips, the mean and max ``|du|`` (``du`` = the change of
  ``r``, the step in units of ``lr``) over the coordinates near the threshold
  (``0.5 <= r < 1`` with float32 ``h``), and the relative error of ``sum(h)``;
  mean and standard deviation over the rounding seeds.

The formats (:data:`FORMATS`): float32 (the reference); the spec's block8
(square-root codes, :func:`sophia.narrow.encode_block8`); linear 8-bit codes
with one float32 scale per 64, 256 or 1024 coordinates (:func:`linear_codes`,
defined here as the comparison, not a form of the library); bfloat16 rounded
stochastically (:func:`sophia.narrow.round_bfloat16`).

Results go to ``benchmarks/results/narrow_codes.json``; the table is printed
as markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# this checkout's sophia, and the harness beside this script (also when imported by path)
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from harness.machine import host_info  # noqa: E402
from harness.output import fmt, write_json  # noqa: E402

from sophia import narrow, spec  # noqa: E402
from sophia.demo.config import PRESETS, RunConfig  # noqa: E402
from sophia.demo.model import ModelConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "narrow_codes.json"
#: ``--tiny``'s model and batch (a smoke test), as benchmarks/narrow_state.py's.
TINY_MODEL = ModelConfig(n_layer=1, n_head=1, n_embd=16, block_size=16)
#: The coordinates "near the threshold": ``NEAR <= r < 1`` with float32 ``h``.
NEAR = 0.5
F32 = np.float32

#: A stored ``h`` (an array, or the spec's :class:`sophia.narrow.Block8`).
Stored = Any


# ------------------------------------------------------------------ the formats


def linear_codes(x: np.ndarray, bits: np.ndarray, block: int) -> np.ndarray:
    """``x`` (float32) through linear 8-bit codes, one scale per ``block``; the decoded values.

    Per block ``scale = max|x| / 127``; a coordinate's code is
    ``floor(x / scale + u)`` (``u`` uniform in ``[0, 1)`` from the top 24 of
    ``bits``: stochastic rounding, unbiased), its value ``code * scale``. A
    block whose scale is 0 or not finite decodes to zeros.
    """
    flat = x.reshape(-1)
    n = flat.size
    nb = -(-n // block)
    padded = np.zeros(nb * block, F32)
    padded[:n] = flat
    scale = (np.abs(padded.reshape(nb, block)).max(axis=1) / F32(127)).astype(F32)
    usable = np.repeat(np.isfinite(scale) & (scale > 0), block)[:n]
    per_coord = np.where(usable, np.repeat(scale, block)[:n], F32(1))
    u = (bits.reshape(-1) >> np.uint32(8)).astype(F32) * F32(2.0**-24)
    codes = np.clip(np.floor(flat / per_coord + u), -127, 127)
    return np.where(usable, codes * per_coord, F32(0)).astype(F32).reshape(x.shape)


@dataclasses.dataclass(frozen=True)
class Format:
    """One way to store ``h``.

    Attributes:
      label: the table's name.
      refresh: ``(h, h_hat, b2, seed, step) -> h`` stored in this format.
      nbytes: bytes of one tensor of ``n`` coordinates.
    """

    label: str
    refresh: Callable[[Stored, np.ndarray, float, int, int], Stored]
    nbytes: Callable[[int], int]


def _spec_form(form: str | None) -> Callable[[Stored, np.ndarray, float, int, int], Stored]:
    def refresh(h: Stored, h_hat: np.ndarray, b2: float, seed: int, step: int) -> Stored:
        return spec.hessian_ema(h, h_hat, b2, hessian_dtype=form, compute=F32, seed=seed, step=step)

    return refresh


def _linear(block: int) -> Format:
    def refresh(h: Stored, h_hat: np.ndarray, b2: float, seed: int, step: int) -> Stored:
        # the spec's float32 EMA, then the codes with the bits a stochastic form would draw
        x = spec.hessian_ema(h, h_hat, b2, compute=F32)
        return linear_codes(
            x, narrow.random_bits(seed, step, narrow.STREAM_HESSIAN, x.shape), block
        )

    return Format(f"linear/{block}", refresh, lambda n: n + 4 * -(-n // block))


def _state_bytes(form: str | None) -> Callable[[int], int]:
    return lambda n: narrow.state_bytes(n, form, 4)


#: The formats compared; ``float32`` is the reference the others are measured against.
FORMATS: dict[str, Format] = {
    "float32": Format("float32 (reference)", _spec_form(None), _state_bytes(None)),
    "block8": Format("block8, sqrt codes/256 (spec)", _spec_form("block8"), _state_bytes("block8")),
    "linear64": _linear(64),
    "linear256": _linear(256),
    "linear1024": _linear(1024),
    "bfloat16": Format("bfloat16, stochastic", _spec_form("bfloat16"), _state_bytes("bfloat16")),
}


# ------------------------------------------------------------------ capture


@dataclasses.dataclass
class Capture:
    """What the trainer did: its estimates and, at each captured step, its ``m`` and ``h``.

    Attributes:
      refresh_steps: the step index each refresh started.
      estimates: per refresh, one float32 estimate per parameter (``param_groups`` order).
      states: per captured step, ``{"m": [...], "h": [...], "loss": float}``.
      group_of: each parameter's ``(rho, bs, eps, b2)``.
    """

    refresh_steps: list[int]
    estimates: list[list[np.ndarray]]
    states: dict[int, dict[str, Any]]
    group_of: list[tuple[float, float, float, float]]


def capture(cfg: RunConfig, steps: list[int], log: Callable[[str], None]) -> Capture:
    """Trains the demo's torch SophiaG (float32 state) to ``max(steps)``, recording as it goes."""
    from sophia.demo.config import check_corpus
    from sophia.demo.data import BatchSampler, load_corpus
    from sophia.demo.train_torch import TorchTrainer
    from sophia.torch import gnb

    corpus = load_corpus(cfg.text, cfg.max_bytes)
    check_corpus(cfg, corpus)
    trainer = TorchTrainer(cfg, cfg.sophia, device="cpu")
    opt = trainer.optimizer
    params = [p for g in opt.param_groups for p in g["params"]]
    group_of = [
        (float(g["rho"]), float(g["bs"]), float(g["eps"]), float(g["betas"][1]))
        for g in opt.param_groups
        for _ in g["params"]
    ]
    out = Capture([], [], {}, group_of)
    refresh = opt.update_hessian

    def recording(*, logits: Any, generator: Any) -> None:
        # the trainer's update_hessian(logits=...) is this estimate, handed over
        estimates = gnb(logits, params, generator=generator)
        out.refresh_steps.append(trainer.steps)
        out.estimates.append([e.detach().cpu().numpy().astype(F32) for e in estimates])
        refresh(hessian=estimates)

    opt.update_hessian = recording  # type: ignore[method-assign]
    # the demo's batches (sophia.demo.train.train's sampler); no evaluations, which
    # draw no random numbers of the training and so change nothing of it
    sampler = BatchSampler(corpus.train, cfg.batch_size, cfg.model.block_size, cfg.seed + 1)
    t0 = time.perf_counter()
    for step in range(max(steps)):
        loss = trainer.step(*sampler.next())
        if step + 1 in steps:
            st = [opt.state[p] for p in params]
            out.states[step + 1] = {
                "m": [s["exp_avg"].detach().cpu().numpy().copy() for s in st],
                "h": [s["hessian"].detach().cpu().numpy().copy() for s in st],
                "loss": loss,
            }
            log(f"captured step {step + 1}: loss {loss:.4f} ({time.perf_counter() - t0:.1f} s)")
    return out


# ------------------------------------------------------------------ replay and figures


def replay(cap: Capture, fmt_: Format, seed: int) -> dict[int, list[Stored]]:
    """The EMA over the recorded estimates stored in ``fmt_``; ``h`` at each captured step."""
    h: list[Stored] = [np.zeros_like(e) for e in cap.estimates[0]] if cap.estimates else []
    snapshots: dict[int, list[Stored]] = {}
    done = 0
    for step in sorted(cap.states):
        while done < len(cap.refresh_steps) and cap.refresh_steps[done] < step:
            at = cap.refresh_steps[done]
            h = [
                fmt_.refresh(hi, e, g[3], seed, at)
                for hi, e, g in zip(h, cap.estimates[done], cap.group_of)
            ]
            done += 1
        snapshots[step] = list(h)
    return snapshots


def clip_ratio(m: np.ndarray, h: Stored, rho: float, bs: float, eps: float) -> np.ndarray:
    """``r = min(|m| / (rho bs max(h, 0) + eps), 1)`` exactly as :func:`sophia.spec.sophia_update`.

    That update with ``theta = 0``, ``lr = 1``, no decay and ``b1 = 1`` (``m``
    kept as it is) returns ``theta = -sign(m) r``, each operation exact.
    """
    zero = np.zeros_like(m)
    theta, _, _ = spec.sophia_update(
        zero, zero, m, h, lr=1.0, b1=1.0, rho=rho, bs=bs, weight_decay=0.0, eps=eps
    )
    return np.abs(theta)


def ratios(cap: Capture, step: int, h: list[Stored]) -> np.ndarray:
    """``r`` of every coordinate (flattened, parameters in order) with the captured ``m``."""
    m = cap.states[step]["m"]
    return np.concatenate(
        [clip_ratio(mi, hi, *g[:3]).reshape(-1) for mi, hi, g in zip(m, h, cap.group_of)]
    )


def figures(
    r: np.ndarray, r_ref: np.ndarray, h: list[Stored], ref: list[np.ndarray]
) -> dict[str, Any]:
    """Flipped clip decisions, ``|du|`` near the threshold, ``sum(h)``'s error; against ``ref``."""
    near = (r_ref >= NEAR) & (r_ref < 1)
    du = np.abs(r - r_ref)[near]
    total = sum(float(np.sum(x, dtype=np.float64)) for x in ref)
    values = sum(float(np.sum(narrow.decode(x, F32), dtype=np.float64)) for x in h)
    return {
        "flips": float(np.mean((r >= 1) != (r_ref >= 1))),
        "mean_du_near": float(du.mean()) if du.size else None,
        "max_du_near": float(du.max()) if du.size else None,
        "sum_h_rel_err": (values - total) / total if total else None,
    }


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure over the seeds: the values, mean, standard deviation and maximum.

    ``None`` where a seed has no value (no coordinate near the threshold).
    """
    out: dict[str, Any] = {}
    for key in per_seed[0]:
        vals = [d[key] for d in per_seed]
        ok = all(v is not None for v in vals)
        out[key] = {
            "per_seed": vals,
            "mean": statistics.fmean(vals) if ok else None,
            "sd": statistics.stdev(vals) if ok and len(vals) > 1 else None,
            "max": max(vals) if ok else None,
        }
    return out


def measure(
    cap: Capture, formats: dict[str, Format], seeds: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """Every format's figures at every captured step (seeds ``0 .. seeds-1``), and the context."""
    ref = replay(cap, formats["float32"], 0)
    sizes = [e.size for e in cap.estimates[0]]
    n = sum(sizes)
    r_ref = {step: ratios(cap, step, ref[step]) for step in cap.states}
    context = {}
    for step, st in cap.states.items():
        r = r_ref[step]
        context[step] = {
            "refreshes": sum(1 for s in cap.refresh_steps if s < step),
            "train_loss": st["loss"],
            "win_rate": float(np.mean(r < 1)),
            "near_fraction": float(np.mean((r >= NEAR) & (r < 1))),
            "replay_max_abs_diff": max(
                float(np.max(np.abs(a - b), initial=0.0)) for a, b in zip(ref[step], st["h"])
            ),
        }
    results: dict[int, dict[str, Any]] = {step: {} for step in cap.states}
    for key, f in formats.items():
        t0 = time.perf_counter()
        runs = [replay(cap, f, seed) for seed in range(seeds)]
        for step in cap.states:
            per_seed = [
                figures(ratios(cap, step, run[step]), r_ref[step], run[step], ref[step])
                for run in runs
            ]
            results[step][key] = summarize(per_seed)
        log(f"{key}: {seeds} seeds replayed ({time.perf_counter() - t0:.1f} s)")
    return {
        "parameters": n,
        "tensors": len(sizes),
        "bytes_per_param": {k: sum(f.nbytes(s) for s in sizes) / n for k, f in formats.items()},
        "labels": {k: f.label for k, f in formats.items()},
        "context": context,
        "results": results,
    }


# ------------------------------------------------------------------ the script


def run_config(args: argparse.Namespace) -> tuple[str, RunConfig, list[int]]:
    """The preset, its config (``--tiny``: shrunk) and the steps to capture."""
    preset = "tiny" if args.small or args.tiny else "default"
    cfg = PRESETS[preset]
    if args.tiny:
        cfg = dataclasses.replace(
            cfg, model=TINY_MODEL, batch_size=4, eval_batches=1, max_bytes=200_000
        )
    default_steps = "30,60" if args.small or args.tiny else "100,400"
    steps = sorted({int(s) for s in (args.steps or default_steps).split(",") if s})
    if not steps or steps[0] < 1:
        raise ValueError(f"Invalid --steps: {args.steps!r} (allowed: positive step counts)")
    return preset, cfg, steps


def _pm(d: dict[str, Any], scale: float, spec_: str) -> str:
    if d["mean"] is None:
        return "n/a"
    sd = "" if d["sd"] is None else f" ± {format(d['sd'] * scale, spec_.lstrip('+'))}"
    return f"{format(d['mean'] * scale, spec_)}{sd}"


def print_tables(out: dict[str, Any]) -> None:
    """The machine, each captured state's context, then one markdown table per step."""
    m = out["machine"]
    r = out["replay"]
    print(
        f"\nmachine: {m.get('cpu')}, {m.get('usable_cores')} usable cores; "
        f"loadavg {m['loadavg_start'][0]:.2f} -> {out['loadavg_end'][0]:.2f}; "
        f"{out['elapsed_s']:.0f} s"
    )
    s = out["settings"]
    print(
        f"demo preset {s['preset']} (torch, float32 state): {r['parameters']:,} parameters in "
        f"{r['tensors']} tensors; rounding seeds 0..{s['seeds'] - 1}; mean ± sd over seeds"
    )
    for step, c in r["context"].items():
        print(
            f"\nstep {step}: {c['refreshes']} refreshes replayed (float32 replay vs the trainer's "
            f"h: max |diff| {c['replay_max_abs_diff']:.1e}); win rate {c['win_rate']:.4f}, "
            f"near the threshold ({NEAR} <= r < 1) {c['near_fraction']:.4f}"
        )
        print(
            "| format | bytes/param | clip flips (%) | mean \\|du\\| near | max \\|du\\| near "
            "| sum(h) rel. err |"
        )
        print("|---|---|---|---|---|---|")
        for key, fig in r["results"][step].items():
            if key == "float32":
                continue
            print(
                f"| {r['labels'][key]} | {r['bytes_per_param'][key]:.3f} | "
                f"{_pm(fig['flips'], 100, '.3f')} | {_pm(fig['mean_du_near'], 1, '.2e')} | "
                f"{fmt(fig['max_du_near']['max'], '.2e')} | "
                f"{_pm(fig['sum_h_rel_err'], 1, '+.1e')} |"
            )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Captures, replays, writes the JSON and prints the tables; returns the record."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="the demo's tiny preset")
    ap.add_argument("--tiny", action="store_true", help="a 1-layer model (smoke test)")
    ap.add_argument("--steps", help="comma-separated steps to capture (default 100,400)")
    ap.add_argument("--seeds", type=int, default=3, help="rounding seeds 0..N-1")
    # the capture is not timed: one thread spares it the waits of a shared CPU's
    # intra-op threads (the demo's trainer says why), tens of times faster there
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: its default)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error(f"Invalid --seeds: {args.seeds} (allowed: 1 or more)")
    try:
        preset, cfg, steps = run_config(args)
    except ValueError as e:
        ap.error(str(e))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    import torch

    t0 = time.perf_counter()
    out: dict[str, Any] = {
        "machine": host_info(),
        "settings": {
            "preset": preset,
            "steps": steps,
            "seeds": args.seeds,
            "near": NEAR,
            "threads": args.threads,
        },
    }
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cap = capture(cfg, steps, log)
    finally:  # main() may run inside another program (the smoke test)
        torch.set_num_threads(threads)
    out["replay"] = measure(cap, FORMATS, args.seeds, log)
    out["loadavg_end"] = list(os.getloadavg())
    out["elapsed_s"] = time.perf_counter() - t0
    write_json(args.out, out)
    print_tables(out)
    print(f"\nwritten: {args.out}")
    return out


if __name__ == "__main__":
    main()

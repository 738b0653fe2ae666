"""SophiaG's narrow state: bytes, step time and training quality of each state form.

Run as ``./dev bench narrow_state`` or ``.venv/bin/python benchmarks/narrow_state.py``
(``--small``: GPT-2 small's shapes divided by 4 and the demo's ``tiny`` preset).

The forms (:data:`narrow_variants.FORMS`): float32 ``m`` and ``h`` (the
default), bfloat16 ``m`` and ``h``, bfloat16 ``m`` with a block8 ``h``.

* **bytes**: the state bytes per parameter, measured from the optimizers'
  real states after a refresh and a step (torch: every tensor of the
  per-parameter state; JAX: every leaf of the optimizer state), on the
  timed model; and the demo's own measurement in the quality runs.
* **speed** (GPT-2 small's shapes, :mod:`harness.shapes`): torch
  ``SophiaG(fused=True)`` and ``(foreach=True)`` per form, plain steps and
  (fused) refreshing steps, against ``torch.optim.AdamW(fused=True)``; jitted
  JAX ``sophia_g`` per form, plain and refreshing, against ``optax.adamw``;
  and two streaming kernels for the bandwidth floor (:mod:`harness.floor`,
  with each form's own bytes: :func:`narrow_variants.sophia_step_bytes`).
  All of them interleaved in one run (:func:`harness.timing.interleave`,
  rotating order), so load hits every variant alike; ratios are the medians
  of per-round ratios. A trainer refreshing every ``K = 10`` steps averages
  ``(9 plain + 1 refreshing step) / 10``, from the same run's medians
  (:func:`k_average`), against AdamW's step.
* **memory** (:mod:`narrow_memory`): the peak extra resident memory of the
  torch fused step and of the refresh alone per form, and of
  ``AdamW(fused=True)``'s step, each in a fresh process, in bytes and bytes
  per parameter, against one float32 copy of the largest tensor (what a
  full-size float32 temporary of ``m`` or ``h`` would take; "no full-size
  temporary" below a quarter of it).
* **quality**: the demo's SophiaG run (the ``default`` preset, ``tiny`` with
  ``--small``) in each form in both frameworks, its final validation loss
  against the float32 run's (target: within 0.01 nats), and one run
  ``--long-factor`` times longer per form in one framework (drift).

Results go to ``benchmarks/results/narrow_state.json``; the tables are printed
as markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# this checkout's sophia, and the harness beside this script (also when imported by path)
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import narrow_variants  # noqa: E402
from harness import floor, shapes  # noqa: E402
from harness.machine import host_info  # noqa: E402
from harness.output import fmt, write_json  # noqa: E402
from harness.stats import describe, ratio  # noqa: E402
from harness.timing import interleave  # noqa: E402
from narrow_memory import probe, run_probes  # noqa: E402
from narrow_memory import variants as memory_variants  # noqa: E402
from narrow_quality import quality  # noqa: E402
from narrow_variants import FORMS, floor_ms, jax_cases, torch_cases, torch_kernels  # noqa: E402

from sophia.demo.config import PRESETS, RunConfig  # noqa: E402
from sophia.demo.model import ModelConfig  # noqa: E402

MEMORY_METHOD = (
    "fresh subprocess per variant with MALLOC_MMAP_THRESHOLD_=65536; after warm-up, the peak "
    "RSS reset via /proc/self/clear_refs and VmHWM - VmRSS read around each call (lowest of "
    "the memory repeats)"
)
RESULTS = Path(__file__).resolve().parent / "results" / "narrow_state.json"
PARTS = ("memory", "speed", "quality")
#: The trainer whose average step :func:`k_average` reports refreshes every K steps.
K = 10


#: ``--tiny``'s demo model and batch (a smoke test: its runs' time is compilation).
TINY_MODEL = ModelConfig(n_layer=1, n_head=1, n_embd=16, block_size=16)


def model_table(args: argparse.Namespace) -> shapes.Shapes:
    """GPT-2 small's shapes; ``--small`` divides them by 4, ``--tiny`` keeps only the embeddings
    and the last LayerNorm of that, divided by 4 again."""
    return narrow_variants.model_table(args.small, args.tiny)


def quality_config(args: argparse.Namespace) -> tuple[str, RunConfig]:
    """The quality runs' preset (``default``; ``tiny`` with ``--small``) and its config."""
    preset = args.preset or ("tiny" if args.small or args.tiny else "default")
    cfg = PRESETS[preset]
    if args.tiny:
        cfg = dataclasses.replace(
            cfg, model=TINY_MODEL, batch_size=4, eval_batches=1, max_bytes=200_000
        )
    if args.steps:
        cfg = dataclasses.replace(cfg, steps=args.steps, warmup=min(cfg.warmup, args.steps))
    return preset, cfg


def speed(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    """Builds every variant, times them interleaved; bytes, samples, floor and ratios."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    table = model_table(args)
    n = shapes.n_params(table)
    forms = list(FORMS)
    log(f"speed: {len(table)} tensors, {n:,} parameters; building the variants")
    t_calls, t_bytes, t_missing = torch_cases(table, forms)
    j_cases, j_bytes, j_missing = jax_cases(table, forms)
    kernels = torch_kernels(n)
    calls: dict[str, Any] = {**t_calls, **j_cases, **{k: c for k, (c, _) in kernels.items()}}
    samples = interleave(calls, args.repeats, warmup=args.warmup, log=log)
    res = {k: describe(samples.wall_ms[k], samples.cpu_ms[k]) for k in calls}
    best = {k: floor.bandwidth(b, samples.wall_ms[k])["best"] for k, (_, b) in kernels.items()}
    bw_name = max(best, key=best.__getitem__)
    floors = {f: floor_ms(f, n, best[bw_name]) for f in forms}

    def paired(a: str, b: str) -> float | None:
        if a not in samples.wall_ms or b not in samples.wall_ms:
            return None
        return ratio(samples.wall_ms[a], samples.wall_ms[b])["paired_median"]

    ratios: dict[str, Any] = {}
    for form in forms:
        for name, adamw in (
            (f"torch_fused_{form}", "torch_adamw_fused"),
            (f"torch_foreach_{form}", "torch_adamw_fused"),
            (f"torch_fused_refresh_{form}", "torch_adamw_fused"),
            (f"jax_{form}", "jax_adamw"),
            (f"jax_refresh_{form}", "jax_adamw"),
        ):
            if name not in res:
                continue
            base = name.replace(form, "f32")
            ratios[name] = {
                "over_adamw": paired(name, adamw),
                "over_f32": paired(name, base),
                "over_floor": res[name]["median_ms"] / floors[form],
            }
    return {
        "model": {"tensors": len(table), "parameters": n, "dtype": "float32"},
        "k_average": k_average(res, forms),
        "settings": {"warmup": args.warmup, "repeats": args.repeats, "threads": args.threads},
        "state_bytes_per_param": {"torch": t_bytes, "jax": j_bytes},
        "results": res,
        "floor": {
            "bandwidth_GBps": best[bw_name] / 1e9,
            "bandwidth_kernel": bw_name,
            "ms": floors,
            "definition": "theta, g, m, h read and theta, m written in each form's bytes, at "
            "the best streaming bandwidth of the bw_* kernels in this run",
        },
        "ratios": ratios,
        "missing": {**t_missing, **j_missing},
    }


def k_average(res: dict[str, Any], forms: list[str], k: int = K) -> dict[str, Any]:
    """A trainer refreshing every ``k`` steps: its average step per framework and form.

    ``((k-1) * plain + refreshing) / k`` of the medians of one run (torch: the
    fused step; JAX: the jitted one), over the framework's AdamW median and over
    float32's average (ratios of medians); ``refresh_extra_ms`` is what one
    refresh adds to a step.
    """
    out: dict[str, Any] = {}
    for fw, plain, refreshing, adamw in (
        ("torch", "torch_fused_{}", "torch_fused_refresh_{}", "torch_adamw_fused"),
        ("jax", "jax_{}", "jax_refresh_{}", "jax_adamw"),
    ):
        rows: dict[str, Any] = {}
        for form in forms:
            a, b = plain.format(form), refreshing.format(form)
            if a not in res or b not in res or adamw not in res:
                continue
            p, r = res[a]["median_ms"], res[b]["median_ms"]
            avg = ((k - 1) * p + r) / k
            rows[form] = {
                "plain_ms": p,
                "refresh_step_ms": r,
                "refresh_extra_ms": r - p,
                "average_ms": avg,
                "over_adamw": avg / res[adamw]["median_ms"],
            }
        f32 = rows.get(forms[0])
        for row in rows.values():
            row["over_f32"] = row["average_ms"] / f32["average_ms"] if f32 else None
        if rows:
            out[fw] = {"k": k, "adamw_ms": res[adamw]["median_ms"], "forms": rows}
    return out


def print_memory(mem: dict[str, Any]) -> None:
    """The memory part's table: peak extra bytes per variant and what they compare to."""
    probes = mem["probes"]
    done = [r for r in probes.values() if "error" not in r]
    if done:
        largest = done[0]["largest_f32_tensor_bytes"]
        print(
            f"\npeak extra memory ({done[0]['parameters']:,} parameters; one float32 copy of "
            f"the largest tensor: {largest / 2**20:.1f} MiB; method {done[0]['method']})"
        )
    print("| variant | peak extra MiB | B/param | / largest f32 tensor | no full-size temporary |")
    print("|---|---|---|---|---|")
    for name, r in probes.items():
        if "error" in r:
            print(f"| {name} | failed | | | |")
            continue
        none = "yes" if r["no_full_size_temporary"] else "NO"
        print(
            f"| {name} | {r['extra_bytes'] / 2**20:.2f} | {r['extra_bytes_per_param']:.3f} | "
            f"{r['extra_over_largest_f32']:.3f} | {none} |"
        )


def print_k_average(ka: dict[str, Any]) -> None:
    """The ``k``-step trainer's average step per framework and form."""
    for fw, rec in ka.items():
        print(
            f"\n{fw}: a trainer refreshing every {rec['k']} steps, average step "
            f"(({rec['k'] - 1} plain + 1 refreshing) / {rec['k']}; AdamW {rec['adamw_ms']:.1f} ms)"
        )
        print(
            "| form | plain ms | refreshing ms | refresh adds ms | average ms | / AdamW | / f32 |"
        )
        print("|---|---|---|---|---|---|---|")
        for form, r in rec["forms"].items():
            print(
                f"| {form} | {r['plain_ms']:.1f} | {r['refresh_step_ms']:.1f} | "
                f"{r['refresh_extra_ms']:+.1f} | {r['average_ms']:.1f} | {r['over_adamw']:.2f} | "
                f"{fmt(r['over_f32'], '.2f')} |"
            )


def print_tables(out: dict[str, Any]) -> None:
    """The machine, then markdown tables: bytes, step times, quality."""
    m = out["machine"]
    print(
        f"\nmachine: {m.get('cpu')}, {m.get('usable_cores')} usable cores; "
        f"loadavg {m['loadavg_start'][0]:.2f} -> {out['loadavg_end'][0]:.2f}"
    )
    sp = out.get("speed")
    q = out.get("quality")
    if sp:
        b = sp["state_bytes_per_param"]
        demo = {
            fw: {f: r["state_bytes_per_param"] for f, r in rec["runs"].items()}
            for fw, rec in (q or {}).get("frameworks", {}).items()
        }
        print(f"\nstate bytes per parameter ({sp['model']['parameters']:,}-parameter model)")
        print("| form | torch | JAX | demo torch | demo JAX |\n|---|---|---|---|---|")
        for form in [*FORMS, "adamw"]:
            cells = [b["torch"].get(form), b["jax"].get(form)]
            cells += [demo.get(fw, {}).get(form) for fw in ("torch", "jax")]
            print(f"| {form} | " + " | ".join(fmt(c, ".3f") for c in cells) + " |")
        f = sp["floor"]
        print(
            f"\nstep time ({sp['settings']['repeats']} interleaved rounds; floor at "
            f"{f['bandwidth_GBps']:.1f} GB/s, {f['bandwidth_kernel']})"
        )
        print("| variant | median ms | min ms | / AdamW | / f32 | / floor |")
        print("|---|---|---|---|---|---|")
        for name, d in sp["results"].items():
            r = sp["ratios"].get(name, {})
            print(
                f"| {name} | {d['median_ms']:.1f} | {d['min_ms']:.1f} | "
                f"{fmt(r.get('over_adamw'), '.2f')} | {fmt(r.get('over_f32'), '.2f')} | "
                f"{fmt(r.get('over_floor'), '.2f')} |"
            )
        for k, v in sp["missing"].items():
            print(f"missing {k}: {v}")
        print_k_average(sp["k_average"])
    if "memory" in out:
        print_memory(out["memory"])
    if q:
        blocks = [(fw, rec) for fw, rec in q["frameworks"].items()]
        if "long" in q:
            blocks.append((f"{q['long']['framework']} x{q['long']['factor']}", q["long"]))
        print(f"\nquality (final validation loss; target |diff| <= {q['target_nats']} nats)")
        print("| run | form | steps | final val | - f32 | max abs diff | B/param |")
        print("|---|---|---|---|---|---|---|")
        for label, rec in blocks:
            for form, r in rec["runs"].items():
                print(
                    f"| {label} | {form} | {r['val_steps'][-1]} | {fmt(r['final_val'], '.4f')} | "
                    f"{fmt(r.get('final_val_minus_f32'), '+.4f')} | "
                    f"{fmt(r.get('max_abs_val_minus_f32'), '.4f')} | "
                    f"{r['state_bytes_per_param']:.3f} |"
                )
            for form, e in rec["missing"].items():
                print(f"missing {label} {form}: {e}")
        seeded = [(fw, rec["over_seeds"]) for fw, rec in blocks if "over_seeds" in rec]
        if seeded:
            print(f"\nover seeds 0..{q['seeds'] - 1}: final val - f32's, mean +- std (per seed)")
            print("| run | form | mean - f32 | std | per seed | f32 spread (std) |")
            print("|---|---|---|---|---|---|")
            for fw, o in seeded:
                for form in list(FORMS)[1:]:
                    per_seed = ", ".join(f"{d:+.4f}" for d in o["minus_f32"][form])
                    print(
                        f"| {fw} | {form} | {fmt(o['mean_minus_f32'][form], '+.4f')} | "
                        f"{fmt(o['std_minus_f32'][form], '.4f')} | {per_seed} | "
                        f"{fmt(o['f32_std'], '.4f')} |"
                    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the parts asked for, writes the JSON and prints the tables; returns the record."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="small shapes and the tiny preset")
    ap.add_argument("--tiny", action="store_true", help="a few small tensors (smoke test)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {PARTS}")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per variant")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    ap.add_argument("--preset", choices=tuple(PRESETS), help="the quality runs' demo preset")
    ap.add_argument("--steps", type=int, help="the quality runs' steps (default: the preset's)")
    ap.add_argument("--frameworks", default="jax,torch", help="the quality runs' frameworks")
    ap.add_argument("--long-framework", default="torch", help="the long run's ('' for none)")
    ap.add_argument("--long-factor", type=int, default=5, help="the long run's step multiple")
    ap.add_argument("--seeds", type=int, default=1, help="the quality runs' seeds 0..N-1")
    ap.add_argument("--memory-repeats", type=int, default=2, help="measured calls per probe")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    ap.add_argument("--memory-probe", help=argparse.SUPPRESS)  # a probe's own process
    args = ap.parse_args(argv)
    if args.memory_probe:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        rec = probe(args.memory_probe, model_table(args), args.warmup, args.memory_repeats)
        print(json.dumps(rec))
        return rec
    parts = [p for p in args.parts.split(",") if p]
    if set(parts) - set(PARTS):
        ap.error(f"unknown parts {sorted(set(parts) - set(PARTS))} (allowed: {PARTS})")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    out: dict[str, Any] = {"machine": host_info(), "forms": FORMS}
    if "memory" in parts:
        size = "tiny" if args.tiny else "small" if args.small else "full"
        log(f"memory: one fresh process per variant ({size} shapes)")
        flags = [f"--{size}"] if size != "full" else []
        flags += [f"--warmup={args.warmup}", f"--memory-repeats={args.memory_repeats}"]
        flags += [f"--threads={args.threads}"]
        probes = run_probes(memory_variants(list(FORMS)), Path(__file__), flags, log)
        out["memory"] = {"size": size, "probes": probes, "method": MEMORY_METHOD}
    if "speed" in parts:
        out["speed"] = speed(args, log)
    if "quality" in parts:
        preset, cfg = quality_config(args)
        frameworks = [f for f in args.frameworks.split(",") if f]
        out["quality"] = {
            "preset": preset,
            **quality(
                cfg, frameworks, list(FORMS), args.long_framework, args.long_factor, log, args.seeds
            ),
        }
    out["loadavg_end"] = list(os.getloadavg())
    out["elapsed_s"] = time.perf_counter() - t0
    write_json(args.out, out)
    print_tables(out)
    print(f"\nwritten: {args.out}")
    return out


if __name__ == "__main__":
    main()

"""Checks that ``sophia.jax.sophia_g`` steps are bit-identical to ``sophia.spec.sophia_update``.

Run as ``.venv/bin/python benchmarks/check_bitexact.py``. For float32, float64
and bfloat16 parameters (with zero-size leaves, a scalar, negative and zero
Hessian entries, coordinates on both sides of the clip, ``maximize`` on and
off) it takes four steps (two Hessian refreshes) eagerly and four jitted with
donated buffers, and after every step compares

* the new parameters and momentum with the NumPy reference fed the same inputs,
  bit for bit;
* the win rate with ``spec.win_rate`` of the reference's win count, exactly;
* the momentum norm with a float64 recomputation (a float sum in XLA's order,
  so to a relative 1e-5; the worst is reported).

XLA:CPU contracts ``a*b+c`` into fused multiply-adds inside ``jit`` whenever
the CPU has FMA, with no per-computation switch, so the jitted checks run in a
subprocess with ``XLA_FLAGS=--xla_cpu_max_isa=AVX`` (no FMA), as the test suite
does; without the cap the jitted steps are reported in ulp, not failed.
Exits non-zero on the first mismatch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ulp import ulp_diff  # noqa: E402  (bit patterns: -0 is one ulp from +0)

from sophia import spec  # noqa: E402
from sophia.jax import sophia_g, update_hessian  # noqa: E402

jax.config.update("jax_enable_x64", True)

NO_FMA = "--xla_cpu_max_isa=AVX"
SHAPES = {
    "w": (37, 129),
    "b": (129,),
    "empty": (0, 7),
    "empty1": (0,),
    "scalar": (),
    "big": (3, 50_000),
    "big2": (150_001,),  # the small leaves together pass one diagnostics chunk (2**18)
    "huge": (601, 1000),  # over two chunks, with a ragged last one
}
HP = dict(lr=3e-3, b1=0.9, rho=0.05, bs=7.0, weight_decay=0.2, eps=1e-12)


MIXED = (np.float32, np.float64, jnp.bfloat16)


def leaf_dtype(dtype, i: int):
    """``dtype``, or for ``"mixed"`` the leaves cycle through float32, float64, bfloat16."""
    return MIXED[i % 3] if isinstance(dtype, str) else dtype


def tree(rng: np.random.Generator, dtype, scale: float, kind: str) -> dict[str, jax.Array]:
    out = {}
    for i, (k, s) in enumerate(SHAPES.items()):
        n = int(np.prod(s))
        x = rng.standard_normal(n) * scale
        if kind == "hess":  # mixed signs, exact zeros and a spread of magnitudes
            x = x * np.exp(rng.uniform(-6, 6, n))
            x[rng.random(n) < 0.05] = 0.0
            x[rng.random(n) < 0.3] *= -1
        out[k] = jnp.asarray(x.reshape(s).astype(leaf_dtype(dtype, i)))
    return out


def name(dtype) -> str:
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def check(dtype, maximize: bool, jit: bool, seed: int, exact: bool) -> dict:
    rng = np.random.default_rng(seed)
    tx = sophia_g(
        HP["lr"],
        HP["b1"],
        0.95,
        HP["rho"],
        HP["weight_decay"],
        bs=HP["bs"],
        eps=HP["eps"],
        hessian_update_interval=None,
        maximize=maximize,
    )
    params = tree(rng, dtype, 1.0, "param")
    state = tx.init(params)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    stepper = jax.jit(step, donate_argnums=(0, 1)) if jit else step
    refresh = jax.jit(update_hessian) if jit else update_hessian
    n_total = sum(int(np.prod(s)) for s in SHAPES.values())
    out = {"rates": [], "norm_rel": 0.0, "ulp": 0, "rate_mismatch": 0}
    for t in range(4):
        if t % 2 == 0:
            state = refresh(state, tree(rng, dtype, 1e-2, "hess"))
        grads = tree(rng, dtype, 1e-3 * 10**t, "grad")
        s0 = state[0]
        p_np, g_np = jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, grads)
        m_np, h_np = jax.tree.map(np.asarray, s0.mu), jax.tree.map(np.asarray, s0.hessian)
        rho = float(np.asarray(s0.rho))
        params, state = stepper(params, state, grads)
        s1 = state[0]
        n_win, msq = 0, 0.0
        for i, k in enumerate(SHAPES):
            t_ref, m_ref, w = spec.sophia_update(
                p_np[k],
                g_np[k],
                m_np[k],
                h_np[k],
                lr=HP["lr"],
                b1=HP["b1"],
                rho=rho,
                bs=HP["bs"],
                weight_decay=HP["weight_decay"],
                eps=HP["eps"],
                maximize=maximize,
            )
            n_win += w
            cd = spec.compute_dtype(leaf_dtype(dtype, i))  # the norm is of m in the compute dtype
            b1 = cd.type(HP["b1"])
            gc = -g_np[k].astype(cd) if maximize else g_np[k].astype(cd)
            mc = b1 * m_np[k].astype(cd) + (cd.type(1) - b1) * gc
            msq += float(np.sum(np.square(mc.astype(np.float64))))
            for what, got, ref in (("theta", params[k], t_ref), ("m", s1.mu[k], m_ref)):
                got = np.asarray(got)
                if got.dtype != ref.dtype or got.shape != ref.shape:
                    raise SystemExit(
                        f"{k} {what}: {got.dtype}{got.shape} vs {ref.dtype}{ref.shape}"
                    )
                d = ulp_diff(got, ref)
                out["ulp"] = max(out["ulp"], d)
                if exact and d:
                    raise SystemExit(
                        f"MISMATCH {name(dtype)} maximize={maximize} jit={jit} step {t} "
                        f"leaf {k} {what}: {int(np.sum(got != ref))} of {got.size} differ"
                    )
        want = spec.win_rate(n_win, n_total, np.float64 if dtype == "mixed" else dtype)
        got_rate = np.asarray(s1.win_rate)
        if got_rate.dtype != want.dtype or got_rate != want:
            if exact:
                raise SystemExit(f"MISMATCH win_rate step {t}: {got_rate!r} != {want!r}")
            out["rate_mismatch"] += 1
        norm = float(np.asarray(s1.momentum_norm))
        rel = abs(norm - np.sqrt(msq)) / max(np.sqrt(msq), 1e-300)
        if rel > 1e-5:
            raise SystemExit(f"momentum_norm {norm} vs {np.sqrt(msq)} (rel {rel:.2e})")
        out["norm_rel"] = max(out["norm_rel"], rel)
        out["rates"].append(float(got_rate))
    return out


def check_special(jit: bool, exact: bool) -> int:
    """NaN and infinite gradients and Hessian entries: the same values and win count.

    NaN payloads and signs are not compared (NumPy and XLA make different NaNs).
    """
    rng = np.random.default_rng(7)
    n = (1 << 18) + 12345  # a chunked leaf with a tail, and a small one
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30, 1e-30], np.float32)
    g = rng.standard_normal(n).astype(np.float32) * 1e-3
    h = np.abs(rng.standard_normal(n)).astype(np.float32) * 1e-4
    g[rng.integers(0, n, 500)] = rng.choice(specials, 500)
    h[rng.integers(0, n, 500)] = rng.choice(specials, 500)
    params = {
        "a": jnp.asarray(rng.standard_normal(n).astype(np.float32)),
        "b": jnp.ones(7, jnp.float32),
    }
    grads = {"a": jnp.asarray(g), "b": jnp.asarray(g[:7])}
    tx = sophia_g(1e-3, hessian_update_interval=None)
    state = tx.init(params)
    s0 = state[0]._replace(hessian={"a": jnp.asarray(h), "b": jnp.asarray(h[-7:])})
    state = (s0,) + tuple(state[1:])

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    p_np = jax.tree.map(np.asarray, params)
    new_p, new_s = (jax.jit(step) if jit else step)(params, state, grads)
    n_win = 0
    for k in ("a", "b"):
        t_ref, m_ref, w = spec.sophia_update(
            p_np[k],
            np.asarray(grads[k]),
            np.zeros_like(p_np[k]),
            np.asarray(s0.hessian[k]),
            lr=1e-3,
        )
        n_win += w
        for got, ref in ((new_p[k], t_ref), (new_s[0].mu[k], m_ref)):
            got = np.asarray(got)
            same = (got == ref) | (np.isnan(got) & np.isnan(ref))
            if exact and not same.all():
                bad = ~same
                raise SystemExit(
                    f"MISMATCH special values jit={jit} leaf {k}: {got[bad][:4]} vs {ref[bad][:4]}"
                )
    want = spec.win_rate(n_win, n + 7)
    if new_s[0].win_rate != want:
        raise SystemExit(f"MISMATCH special values win_rate {new_s[0].win_rate} != {want}")
    return n_win


def run(jit: bool, exact: bool) -> None:
    seed = 0
    for dtype in (np.float32, np.float64, jnp.bfloat16, "mixed"):
        for maximize in (False, True):
            seed += 1
            r = check(dtype, maximize, jit, seed, exact)
            what = (
                "theta, m, win_rate bit-identical"
                if exact
                else f"max {r['ulp']} ulp, {r['rate_mismatch']} win-rate mismatches (FMA)"
            )
            print(
                f"{'ok ' if exact else 'fma'} {name(dtype):8s} maximize={maximize!s:5s} "
                f"jit={jit!s:5s} 4 steps, win rates "
                f"{', '.join(f'{x:.3f}' for x in r['rates'])}: {what}; "
                f"momentum_norm rel err {r['norm_rel']:.1e}",
                flush=True,
            )
    w = check_special(jit, exact)
    print(
        f"{'ok ' if exact else 'fma'} special values (NaN, inf, 0, -0, huge, tiny) jit={jit!s:5s}: "
        f"{w} wins, {'same values and ' if exact else ''}same win count",
        flush=True,
    )


def main() -> None:
    if "--jit-only" in sys.argv:
        run(jit=True, exact=NO_FMA in os.environ.get("XLA_FLAGS", ""))
        return
    run(jit=False, exact=True)
    run(jit=True, exact=False)
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + NO_FMA).strip())
    print(f"jitted, in a subprocess with XLA_FLAGS={env['XLA_FLAGS']}:", flush=True)
    rc = subprocess.run([sys.executable, __file__, "--jit-only"], env=env).returncode
    if rc:
        raise SystemExit(rc)
    print("all bit-identical")


if __name__ == "__main__":
    main()

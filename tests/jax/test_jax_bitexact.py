"""``sophia_g`` steps are bit for bit the spec: ``sophia_update`` and its refresh ``hessian_ema``.

For float32, float64, bfloat16 and mixed-dtype trees (an empty leaf, a scalar,
a leaf past one diagnostics chunk of 2**18 with a ragged tail; Hessian
estimates of both signs, exact zeros and eight decades, so coordinates land on
both sides of the clip), ``maximize`` on and off, three steps of which two
refresh (``update(..., hessian=h_hat)``): after every step the parameters,
momentum and Hessian EMA equal the NumPy reference fed the same inputs in
bit patterns (-0 one ulp from +0), the win rate equals ``spec.win_rate`` of
the reference's win count exactly, and the momentum norm a float64
recomputation to 1e-5 (a float sum in XLA's order). bfloat16 parameters are
held to the spec taken through their param-dtype update
(:func:`sophia.jax.to_param_dtype`, as the cross tests hold them). NaN, infinite, signed-zero,
huge and tiny gradients and Hessian entries give the same values (NaN equals
NaN: the frameworks do not agree on NaN payloads) and the same win count.

Op by op here; jitted with donated buffers (each dtype, ``maximize`` on for
half of them) in a subprocess under
``XLA_FLAGS=--xla_cpu_max_isa=AVX``: XLA:CPU contracts ``a*b+c`` into fused
multiply-adds inside ``jit`` whenever the CPU has FMA, with no per-computation
switch (docs/spec.md).
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sophia import spec
from sophia.jax import sophia_g
from tests.cross.references import through_param_dtype_update
from tests.helpers import run_module, ulp_diff

NO_FMA = "--xla_cpu_max_isa=AVX"
SHAPES = {"w": (5, 7), "b": (7,), "empty": (0, 3), "scalar": (), "long": ((1 << 18) + 5,)}
HP = dict(lr=3e-3, b1=0.9, rho=0.05, bs=7.0, weight_decay=0.2, eps=1e-12)
B2 = 0.95
MIXED = (np.float32, np.float64, jnp.bfloat16)
DTYPES = (np.float32, np.float64, jnp.bfloat16, "mixed")
#: Jitted, each dtype once and maximize on for half (every step compiles twice, with and
#: without an estimate); op by op runs every pair.
JITTED = [(d, i % 2 == 1) for i, d in enumerate(DTYPES)]


def _leaf_dtype(dtype, i: int):
    """``dtype``, or for ``"mixed"`` the leaves cycle through float32, float64, bfloat16."""
    return MIXED[i % 3] if isinstance(dtype, str) else dtype


def _tree(rng: np.random.Generator, dtype, scale: float, hessian: bool = False) -> dict:
    out = {}
    for i, (k, s) in enumerate(SHAPES.items()):
        n = int(np.prod(s))
        x = rng.standard_normal(n) * scale
        if hessian:  # mixed signs, exact zeros and a spread of magnitudes
            x = x * np.exp(rng.uniform(-9, 9, n))
            x[rng.random(n) < 0.05] = 0.0
            x[rng.random(n) < 0.3] *= -1
        out[k] = jnp.asarray(x.reshape(s).astype(_leaf_dtype(dtype, i)))
    return out


def _numpy(tree) -> dict:
    return {k: np.asarray(v) for k, v in tree.items()}


def _stepper(tx, jit: bool):
    def step(p, s, g, h_hat):
        u, s = tx.update(g, s, p) if h_hat is None else tx.update(g, s, p, hessian=h_hat)
        return optax.apply_updates(p, u), s

    return jax.jit(step, donate_argnums=(0, 1)) if jit else step


def check_steps(dtype, maximize: bool, jit: bool, seed: int) -> None:
    """Three steps, two refreshing, each held to the reference (see the module docstring)."""
    rng = np.random.default_rng(seed)
    tx = sophia_g(
        HP["lr"], HP["b1"], B2, HP["rho"], HP["weight_decay"], bs=HP["bs"], eps=HP["eps"],
        hessian_update_interval=None, maximize=maximize,
    )  # fmt: skip
    step = _stepper(tx, jit)
    params = _tree(rng, dtype, 1.0)
    state = tx.init(params)
    n_total = sum(int(np.prod(s)) for s in SHAPES.values())
    for t in range(3):
        h_hat = _tree(rng, dtype, 1e-2, hessian=True) if t % 2 == 0 else None
        grads = _tree(rng, dtype, 1e-3 * 10**t)
        core = state[0]
        p0, g0, m0, h0 = _numpy(params), _numpy(grads), _numpy(core.mu), _numpy(core.hessian)
        rho = float(np.asarray(core.rho))
        params, state = step(params, state, grads, h_hat)
        new = state[0]
        n_win, msq = 0, 0.0
        for i, k in enumerate(SHAPES):
            where = f"{np.dtype(_leaf_dtype(dtype, i)).name} maximize={maximize} step {t} {k}"
            h_ref = h0[k] if h_hat is None else spec.hessian_ema(h0[k], np.asarray(h_hat[k]), B2)
            assert ulp_diff(np.asarray(new.hessian[k]), h_ref) == 0, f"h, {where}"
            t_ref, m_ref, w = spec.sophia_update(
                p0[k], g0[k], m0[k], h_ref, **{**HP, "rho": rho}, maximize=maximize
            )
            t_ref = through_param_dtype_update(p0[k], t_ref)
            assert ulp_diff(np.asarray(params[k]), t_ref) == 0, f"theta, {where}"
            assert ulp_diff(np.asarray(new.mu[k]), m_ref) == 0, f"m, {where}"
            n_win += w
            # the norm is of m in the compute dtype, before the cast to the state's dtype
            cd = spec.compute_dtype(_leaf_dtype(dtype, i))
            b1 = cd.type(HP["b1"])
            g = -g0[k].astype(cd) if maximize else g0[k].astype(cd)
            m = b1 * m0[k].astype(cd) + (cd.type(1) - b1) * g
            msq += float(np.sum(np.square(m.astype(np.float64))))
        want = spec.win_rate(n_win, n_total, np.float64 if dtype == "mixed" else dtype)
        got = np.asarray(new.win_rate)
        assert got.dtype == want.dtype and got == want, (t, got, want)
        norm = float(np.asarray(new.momentum_norm))
        assert norm == pytest.approx(np.sqrt(msq), rel=1e-5), t


def check_special_values(jit: bool) -> None:
    """NaN, infinities, signed zeros, huge and tiny values: the same bits and the same win count."""
    rng = np.random.default_rng(7)
    n = (1 << 18) + 12345  # a chunked leaf with a tail, and a small one
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30, 1e-30], np.float32)
    g = rng.standard_normal(n).astype(np.float32) * 1e-3
    h = np.abs(rng.standard_normal(n)).astype(np.float32) * 1e-4
    g[rng.integers(0, n, 500)] = rng.choice(specials, 500)
    h[rng.integers(0, n, 500)] = rng.choice(specials, 500)
    params = {"a": jnp.asarray(rng.standard_normal(n).astype(np.float32)), "b": jnp.ones(7)}
    grads = {"a": jnp.asarray(g), "b": jnp.asarray(g[:7])}
    hessian = {"a": h, "b": h[-7:]}
    tx = sophia_g(1e-3, bs=spec.REFERENCE_BS, hessian_update_interval=None)
    state = tx.init(params)
    # the EMA set directly: the special values reach the step as they are
    state = (state[0]._replace(hessian={k: jnp.asarray(v) for k, v in hessian.items()}),
             *state[1:])  # fmt: skip
    p0 = _numpy(params)
    new_p, new_s = _stepper(tx, jit)(params, state, grads, None)
    n_win = 0
    for k in ("a", "b"):
        t_ref, m_ref, w = spec.sophia_update(
            p0[k], np.asarray(grads[k]), np.zeros_like(p0[k]), hessian[k], lr=1e-3,
            bs=spec.REFERENCE_BS,
        )  # fmt: skip
        n_win += w
        assert ulp_diff(np.asarray(new_p[k]), t_ref) == 0, f"theta {k} jit={jit}"
        assert ulp_diff(np.asarray(new_s[0].mu[k]), m_ref) == 0, f"m {k} jit={jit}"
    assert new_s[0].win_rate == spec.win_rate(n_win, n + 7)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize(
    "dtype", DTYPES, ids=lambda d: d if isinstance(d, str) else np.dtype(d).name
)
def test_op_by_op_steps_are_the_spec_bit_for_bit(dtype, maximize, x64):
    check_steps(dtype, maximize, jit=False, seed=1 + 2 * DTYPES.index(dtype) + maximize)


def test_op_by_op_special_values_are_the_spec_bit_for_bit():
    check_special_values(jit=False)


def test_jitted_without_fma_is_the_spec_bit_for_bit():
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {NO_FMA}".strip())
    proc = run_module("tests.jax.test_jax_bitexact", env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("ok ") == len(JITTED) + 1, proc.stdout


if __name__ == "__main__":  # the jitted checks, in a process started with NO_FMA
    assert NO_FMA in os.environ.get("XLA_FLAGS", ""), "run under XLA_FLAGS=" + NO_FMA
    with jax.enable_x64(True):
        for dtype, maximize in JITTED:
            check_steps(dtype, maximize, jit=True, seed=1 + 2 * DTYPES.index(dtype) + maximize)
            print(f"ok {dtype} maximize={maximize}", flush=True)
    check_special_values(jit=True)
    print("ok special values", flush=True)
    sys.exit(0)

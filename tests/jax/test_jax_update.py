"""sophia.jax against the NumPy reference of the spec, bit for bit."""

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import sophia.jax as sj
from sophia import spec
from tests.helpers import random_state, reference_step, run_module, ulp_diff, within_rounding

# XLA:CPU contracts a*b+c into fused multiply-adds inside jit, with no per-computation
# switch; only a global ISA cap without FMA turns it off. Op-by-op JAX is always
# held to 0 ulp; jitted JAX to 0 ulp under that cap (a subprocess test below) and to
# 2 ulp of the operands' scale otherwise (see docs/spec.md).
STRICT = "--xla_cpu_max_isa=AVX" in os.environ.get("XLA_FLAGS", "")

SHAPES = [(7,), (3, 5), (0,), (2, 0, 3), (), (64, 33)]
HP = dict(lr=0.05, b1=0.9, rho=0.03, bs=17.0, weight_decay=0.2, eps=1e-12)


def _tx(**over):
    kw = dict(HP, **over)
    return sj.sophia_g(
        kw["lr"], kw["b1"], over.get("b2", 0.99), kw["rho"], kw["weight_decay"], bs=kw["bs"],
        eps=kw["eps"], hessian_update_interval=None, maximize=over.get("maximize", False),
        mu_dtype=over.get("mu_dtype"),
    )  # fmt: skip


def _set_state(tx, leaves, mu_dtype=None):
    params = [jnp.asarray(t) for t, _, _, _ in leaves]
    state = tx.init(params)
    core = state[0]
    core = core._replace(
        mu=[jnp.asarray(m, mu_dtype or m.dtype) for _, _, m, _ in leaves],
        hessian=[jnp.asarray(h) for _, _, _, h in leaves],
    )
    return params, (core,) + tuple(state[1:])


def _check(ref, leaves, new_p, new_mu, exact, hp=HP):
    """New parameters and momenta against the reference.

    ``exact``: bit for bit. Otherwise each rounding step may differ as a fused
    multiply-add makes it: the momentum by 2 ulp of its operands, and the
    parameters by 2 ulp of theirs *given the momentum actually computed* (a
    momentum near cancellation moves r = |m| / den by more than an ulp).
    """
    for (t, _, m, _), (t0, g, m0, h), p, mu in zip(ref, leaves, new_p, new_mu):
        assert p.dtype == t.dtype and mu.dtype == m.dtype and p.shape == t.shape
        if exact:
            assert ulp_diff(p, t) == 0, "parameters differ from the spec"
            assert ulp_diff(mu, m) == 0, "momentum differs from the spec"
            continue
        assert within_rounding(mu, m, m0, g), "momentum beyond FMA rounding"
        # b1 = 0 makes the spec's momentum equal to the given "gradient", mu itself.
        kw = {k: v for k, v in hp.items() if k != "b1"}
        t_given_mu, _, _ = spec.sophia_update(
            t0, np.asarray(mu), np.zeros_like(m0), h, b1=0.0, **kw
        )
        assert within_rounding(p, t_given_mu, t0, hp["lr"]), "parameters beyond FMA rounding"


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("jit", [False, True])
def test_single_step_bit_identical_float32(maximize, jit):
    leaves = random_state(0, SHAPES)
    tx = _tx(maximize=maximize)
    params, state = _set_state(tx, leaves)
    grads = [jnp.asarray(g) for _, g, _, _ in leaves]

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(step) if jit else step
    new_p, new_s = step(params, state, grads)
    ref, n_win = reference_step(leaves, maximize=maximize, **HP)
    _check(ref, leaves, new_p, new_s[0].mu, exact=STRICT or not jit)
    n = sum(int(np.prod(s)) for s in SHAPES)
    assert new_s[0].win_rate == np.float32(n_win) / np.float32(n)
    assert int(new_s[0].count) == 1


def test_win_rate_counts_nan_ratios_as_clipped_jitted_and_eager():
    """A NaN ``r`` (NaN gradient or Hessian) is not ``r < 1``: clipped, jitted and op by op."""
    leaves = random_state(4, [(5, 4), (9,), ()])
    leaves[0][1][1, 2] = np.nan  # gradient
    leaves[1][3][4] = np.nan  # Hessian
    tx = _tx()
    params, state = _set_state(tx, leaves)
    grads = [jnp.asarray(g) for _, g, _, _ in leaves]
    rates = [tx.update(grads, state, params)[1][0].win_rate]
    rates.append(jax.jit(lambda g, s, p: tx.update(g, s, p)[1][0].win_rate)(grads, state, params))
    _, n_win = reference_step(leaves, **HP)
    n = sum(x[0].size for x in leaves)
    for rate in rates:
        assert rate == np.float32(n_win) / np.float32(n)
    assert n_win <= n - 2


@pytest.mark.parametrize("jit", [False, True])
def test_single_step_bit_identical_float64(x64, jit):
    leaves = random_state(1, SHAPES, dtype=np.float64)
    tx = _tx()
    params, state = _set_state(tx, leaves)
    grads = [jnp.asarray(g) for _, g, _, _ in leaves]
    u, state = (jax.jit(tx.update) if jit else tx.update)(grads, state, params)
    new_p = optax.apply_updates(params, u)
    ref, _ = reference_step(leaves, **HP)
    assert all(p.dtype == np.float64 for p in new_p)
    _check(ref, leaves, new_p, state[0].mu, exact=STRICT or not jit)
    assert state[0].rho.dtype == jnp.float64


# Jitted low-precision runs are checked bit for bit in the no-FMA subprocess only: a
# float32 FMA difference rounds either way into the storage dtype.
@pytest.mark.parametrize("jit", [False, True] if STRICT else [False])
@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_low_precision_params_follow_float32_math(dtype, jit):
    leaves = random_state(2, [(40,), (3, 4)], dtype=dtype)
    tx = _tx(eps=0.0)
    params, state = _set_state(tx, leaves)
    grads = [jnp.asarray(g) for _, g, _, _ in leaves]
    u, state = (jax.jit(tx.update) if jit else tx.update)(grads, state, params)
    assert all(x.dtype == dtype for x in u)  # optax's contract: updates in the params' dtype
    new_p = optax.apply_updates(params, u)
    ref, _ = reference_step(leaves, **dict(HP, eps=0.0))
    _check(ref, leaves, new_p, state[0].mu, exact=True)
    assert all(np.all(np.isfinite(np.asarray(p, np.float32))) for p in new_p)


def test_zero_grad_zero_hessian_no_nan_in_bf16():
    p = jnp.ones((8,), jnp.bfloat16)
    tx = sj.sophia_g(1e-3, eps=0.0, hessian_update_interval=None)
    s = tx.init(p)
    u, s = tx.update(jnp.zeros_like(p), s, p)
    out = optax.apply_updates(p, u)
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))


def test_mu_dtype():
    leaves = random_state(3, [(10,)])
    tx = _tx(mu_dtype=jnp.bfloat16)
    params = [jnp.asarray(leaves[0][0])]
    state = tx.init(params)
    assert state[0].mu[0].dtype == jnp.bfloat16
    assert state[0].hessian[0].dtype == jnp.float32
    _, state = tx.update([jnp.asarray(leaves[0][1])], state, params)
    assert state[0].mu[0].dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_state_leaves_follow_param_dtypes(dtype):
    params = {"a": jnp.zeros((3,), dtype), "b": jnp.zeros((2, 2), jnp.float32)}
    state = sj.sophia_g(hessian_update_interval=None).init(params)
    assert state[0].mu["a"].dtype == dtype and state[0].hessian["a"].dtype == dtype
    assert state[0].mu["b"].dtype == jnp.float32


@pytest.mark.parametrize("jit", [False, True])
def test_trajectory_with_manual_refreshes_matches_reference(jit):
    """30 steps, a Hessian estimate every 3 steps through update(..., hessian=)."""
    leaves = random_state(4, [(20,), (4, 6)], h_scale=0.0)
    b2 = 0.95
    tx = _tx(b2=b2)
    params, state = _set_state(tx, leaves)
    rng = np.random.default_rng(5)
    ref = leaves

    def step(p, s, g, h_hat=None):
        u, s = tx.update(g, s, p, **({} if h_hat is None else {"hessian": h_hat}))
        return optax.apply_updates(p, u), s

    step = jax.jit(step) if jit else step
    for t in range(30):
        g = [rng.normal(size=x[0].shape).astype(np.float32) for x in ref]
        h_hat = None
        if t % 3 == 0:
            h_hat = [np.abs(rng.normal(size=x[0].shape)).astype(np.float32) for x in ref]
        ref = [(t_, gi, m, h) for (t_, _, m, h), gi in zip(ref, g)]
        ref, _ = reference_step(ref, h_hat=h_hat, b2=b2, **HP)
        h_in = None if h_hat is None else [jnp.asarray(x) for x in h_hat]
        params, state = step(params, state, [jnp.asarray(x) for x in g], h_in)
        for i, (p, mu, hh) in enumerate(zip(params, state[0].mu, state[0].hessian)):
            t_, gi, m, h = ref[i]
            if jit and not STRICT:
                # FMA differences stay at rounding level; carry on from JAX's values so
                # that each step is checked on its own.
                np.testing.assert_allclose(np.asarray(p), t_, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(np.asarray(mu), m, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(np.asarray(hh), h, rtol=1e-5, atol=1e-7)
                ref[i] = (np.asarray(p), gi, np.asarray(mu), np.asarray(hh))
            else:
                np.testing.assert_array_equal(np.asarray(p), t_)
                np.testing.assert_array_equal(np.asarray(mu), m)
                np.testing.assert_array_equal(np.asarray(hh), h)


def test_refresh_happens_at_steps_multiple_of_interval_before_the_update():
    """A constant estimator: h after step t equals the EMA applied once per refresh so far."""
    k, b2 = 4, 0.5
    const = 2.0

    def est(params, key, **_):
        return jax.tree.map(lambda p: jnp.full_like(p, const), params)

    tx = sj.scale_by_sophia(b2=b2, hessian_update_interval=k, estimator=est)
    p = jnp.ones(3)
    s = tx.init(p)
    h = 0.0
    for t in range(10):
        if t % k == 0:
            h = b2 * h + (1 - b2) * const
        _, s = jax.jit(tx.update)(jnp.ones(3), s, p)
        np.testing.assert_allclose(np.asarray(s.hessian), h, rtol=0)
        assert float(s.hessian_norm) == pytest.approx(np.sqrt(3) * h, rel=1e-6)


def test_estimator_runs_only_on_refresh_steps():
    """lax.cond: the estimator's computation executes on refresh steps only."""
    calls = []

    def est(params, key, **_):
        jax.debug.callback(lambda: calls.append(1))
        return jax.tree.map(jnp.ones_like, params)

    tx = sj.scale_by_sophia(hessian_update_interval=5, estimator=est)
    p = jnp.ones(2)
    s = tx.init(p)
    upd = jax.jit(tx.update)
    for _ in range(12):
        _, s = upd(jnp.ones(2), s, p)
    jax.effects_barrier()
    assert len(calls) == 3  # steps 0, 5, 10


def test_builtin_refresh_key_advances_and_seed_matters():
    keys = []

    def est(params, key, **_):
        jax.debug.callback(lambda k: keys.append(np.asarray(k)), jax.random.key_data(key))
        return jax.tree.map(jnp.ones_like, params)

    for seed in (0, 1):
        tx = sj.scale_by_sophia(hessian_update_interval=1, estimator=est, seed=seed)
        s = tx.init(jnp.ones(2))
        for _ in range(2):
            _, s = tx.update(jnp.ones(2), s, jnp.ones(2))
    jax.effects_barrier()
    as_tuples = {tuple(k.ravel()) for k in keys}
    assert len(as_tuples) == 4


def test_no_recompilation_and_donated_buffers():
    tx = sj.sophia_g(1e-2, bs=8)
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 4))
    params = {"w": jnp.zeros((4, 3))}

    def logits_fn(p):
        return x @ p["w"]

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(
            logits_fn(p), jnp.zeros(8, int)
        ).mean()

    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p, logits_fn=logits_fn)
        return optax.apply_updates(p, u), s

    step = jax.jit(step, donate_argnums=(0, 1))
    state = tx.init(params)
    for _ in range(12):
        params, state = step(params, state)
    assert step._cache_size() == 1
    assert int(state[0].count) == 12
    assert float(loss(params)) < np.log(3)


def test_dynamic_rho_moves_in_the_right_direction():
    def est(params, key, **_):
        return jax.tree.map(jnp.ones_like, params)

    def run(grad_scale):
        tx = sj.scale_by_sophia(
            rho=0.04, bs=1.0, hessian_update_interval=1, estimator=est, dynamic=True
        )
        p = jnp.ones(100)
        s = tx.init(p)
        rhos = []
        for _ in range(4):
            _, s = tx.update(jnp.full((100,), grad_scale), s, p)
            rhos.append(float(s.rho))
        return rhos, float(s.win_rate)

    # Huge momentum: every coordinate clips, win rate 0 < 0.1, rho must grow.
    rhos, wr = run(1e3)
    assert wr == 0.0
    assert rhos[0] == pytest.approx(0.04) and rhos[1] > rhos[0] and rhos[3] > rhos[2]
    assert rhos[1] == pytest.approx(float(spec.dynamic_rho(0.04, 0.0, 0.04)), rel=1e-7)
    # Tiny momentum: no coordinate clips, win rate 1 > 0.5, rho must shrink.
    rhos, wr = run(1e-9)
    assert wr == 1.0
    assert rhos[1] < rhos[0] and rhos[3] < rhos[2]


def test_dynamic_false_keeps_rho():
    def est(params, key, **_):
        return jax.tree.map(jnp.ones_like, params)

    tx = sj.scale_by_sophia(rho=0.04, hessian_update_interval=1, estimator=est)
    s = tx.init(jnp.ones(5))
    for _ in range(3):
        _, s = tx.update(jnp.full((5,), 1e3), s, jnp.ones(5))
    assert float(s.rho) == np.float32(0.04)


def test_diagnostics_on_a_chain_state():
    tx = optax.chain(optax.clip_by_global_norm(1.0), _tx())
    p = jnp.arange(4.0)
    s = tx.init(p)
    _, s = tx.update(jnp.array([1.0, -1.0, 0.0, 2.0]), s, p)
    d = sj.diagnostics(s)
    assert set(d) == {"win_rate", "rho", "hessian_norm", "momentum_norm", "count"}
    assert int(d["count"]) == 1 and float(d["rho"]) == np.float32(HP["rho"])
    assert float(d["win_rate"]) == 0.25  # only the zero-momentum coordinate has r < 1
    g = np.array([1.0, -1.0, 0.0, 2.0]) / np.sqrt(6.0)
    assert float(d["momentum_norm"]) == pytest.approx((1 - HP["b1"]) * np.linalg.norm(g), 1e-6)
    with pytest.raises(ValueError, match="no ScaleBySophiaState"):
        sj.diagnostics(optax.adam(1e-3).init(p))


@pytest.mark.skipif(STRICT, reason="this is the subprocess that the test starts")
def test_jit_is_bit_identical_when_fma_contraction_is_off():
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_max_isa=AVX")
    dtypes_tests = os.path.join(os.path.dirname(__file__), "test_jax_dtypes.py")
    out = run_module(
        "pytest", "-q", "-p", "no:cacheprovider", __file__, dtypes_tests,
        "-k", "bit_identical or trajectory or low_precision", env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


@pytest.mark.parametrize("jit", [False, True])
def test_dynamic_rho_is_the_spec_rule_bit_for_bit(jit):
    tx = sj.sophia_g(0.1, rho=0.05, hessian_update_interval=None, dynamic=True)
    s0 = tx.init({"w": jnp.ones(4)})
    h = {"w": jnp.ones(4)}

    def refresh(s, h_hat):  # the step after the refresh leaves rho as the refresh set it
        return tx.update({"w": jnp.zeros(4)}, s, {"w": jnp.ones(4)}, hessian=h_hat)[1]

    refresh = jax.jit(refresh) if jit else refresh
    for rate in (0.0, 1.0):
        for x in np.linspace(0.001, 6.0, 60).astype(np.float32):
            core = s0[0]._replace(count=jnp.int32(1), win_rate=jnp.float32(rate), rho=x)
            got = refresh((core,) + tuple(s0[1:]), h)[0].rho
            assert np.float32(got) == spec.dynamic_rho(x, rate, 0.05), (rate, x)

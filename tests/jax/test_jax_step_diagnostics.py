"""``step_diagnostics=False``: the win rate and momentum norm move to the Hessian refreshes.

The plain step then does no reduction at all; parameters, state and the dynamic rho
stay identical to the default, and at each refresh the win rate is the one the
default records for the step before it, bit for bit.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sophia.jax as sj

K = 3


def _estimator(params, key, **_):
    # data-dependent and noisy, so h and the clipped set change from refresh to refresh
    noise = jax.random.uniform(key, params["w"].shape, params["w"].dtype)
    return {"w": 1e-3 * noise * params["w"] ** 2, "b": jnp.abs(params["b"])}


def _grads(t):
    rng = np.random.default_rng(t)
    scale = 10.0 ** rng.uniform(-6, -1)  # swings the win rate across the dynamic band
    return {
        "w": jnp.asarray(scale * rng.standard_normal((13, 7)), jnp.float32),
        "b": jnp.asarray(scale * rng.standard_normal(5), jnp.float32),
    }


def _params():
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.standard_normal((13, 7)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(5), jnp.float32),
    }


@functools.cache  # both tests below read the same four runs
def _run(step_diagnostics, jit):
    # op by op every lax.cond compiles anew: fewer steps keep the eager runs short
    steps = 24 if jit else 7
    tx = sj.sophia_g(
        0.01, rho=0.05, bs=4.0, hessian_update_interval=K, estimator=_estimator,
        dynamic=True, step_diagnostics=step_diagnostics,
    )  # fmt: skip
    params = _params()
    state = tx.init(params)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(step) if jit else step
    trace = []
    for t in range(steps):
        params, state = step(params, state, _grads(t))
        trace.append((params, state[0]))
    return trace


@pytest.mark.parametrize("jit", [False, True])
def test_trajectory_and_dynamic_rho_are_unchanged(jit):
    on, off = _run(True, jit), _run(False, jit)
    rhos = {float(s.rho) for _, s in on}
    assert len(rhos) > 2, rhos  # the dynamic rule really moved rho
    for t, ((p1, s1), (p2, s2)) in enumerate(zip(on, off)):
        a = jax.tree.leaves((p1, s1.mu, s1.hessian, s1.rho, s1.hessian_norm))
        b = jax.tree.leaves((p2, s2.mu, s2.hessian, s2.rho, s2.hessian_norm))
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"step {t}")


@pytest.mark.parametrize("jit", [False, True])
def test_win_rate_and_norm_are_those_of_the_step_before_each_refresh(jit):
    on, off = _run(True, jit), _run(False, jit)
    assert float(off[0][1].win_rate) == 0.0  # nothing to report before the first refresh
    for t in range(1, len(on)):
        _, s = off[t]
        if t % K == 0:  # step t refreshed first: it reports step t - 1
            want = on[t - 1][1]
            assert np.asarray(s.win_rate) == np.asarray(want.win_rate), t
            # a float sum: op by op the step reduces leaf by leaf, the refresh (compiled
            # inside lax.cond) in chunks, so the order, hence the last bit, may differ
            np.testing.assert_allclose(s.momentum_norm, want.momentum_norm, rtol=3e-7)
        else:  # between refreshes nothing is recomputed
            assert np.asarray(s.win_rate) == np.asarray(off[t - 1][1].win_rate), t
    assert 0.0 < float(off[-1][1].win_rate) < 1.0


def test_a_hand_refresh_catches_up_before_the_dynamic_rule():
    def tx(flag):
        return sj.sophia_g(
            0.01, rho=0.05, bs=4.0, hessian_update_interval=None, dynamic=True,
            step_diagnostics=flag,
        )  # fmt: skip

    params = _params()
    states = {flag: tx(flag).init(params) for flag in (True, False)}
    key = jax.random.PRNGKey(3)
    for t in range(10):
        key, sub = jax.random.split(key)
        h_hat = _estimator(params, sub)
        refresh = {"hessian": h_hat} if t % 2 == 0 else {}
        for flag in states:
            _, states[flag] = tx(flag).update(_grads(t), states[flag], params, **refresh)
    # the last step left the default state current and the other stale; a refresh
    # catches the stale one up with that step's diagnostics, and the rule used the
    # same win rate
    current = states[True][0]
    assert float(current.momentum_norm) != float(states[False][0].momentum_norm)
    h_hat = _estimator(params, key)
    a, b = (tx(f).update(_grads(10), states[f], params, hessian=h_hat)[1][0] for f in (True, False))
    for name in ("rho", "hessian_norm"):
        assert np.asarray(getattr(a, name)) == np.asarray(getattr(b, name)), name
    assert np.asarray(b.win_rate) == np.asarray(current.win_rate)
    np.testing.assert_allclose(b.momentum_norm, current.momentum_norm, rtol=3e-7)


def _sub_jaxprs(value):
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _sub_jaxprs(v)


def _reductions(jaxpr):
    """Names of the reduction primitives in ``jaxpr`` and every jaxpr nested in it."""
    found = []
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "reduce" or name.startswith(("reduce_", "argmax", "argmin")):
            found.append(name)
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                found += _reductions(sub)
    return found


@pytest.mark.parametrize("flag", [True, False])
def test_the_plain_step_reduces_only_with_step_diagnostics(flag):
    tx = sj.sophia_g(0.01, hessian_update_interval=None, step_diagnostics=flag)
    params = _params()
    state = tx.init(params)
    jaxpr = jax.make_jaxpr(tx.update)(_grads(0), state, params).jaxpr
    assert bool(_reductions(jaxpr)) == flag


def test_a_refresh_recomputes_the_diagnostics_only_without_step_diagnostics():
    """Known at trace time (in the transform), so the default refresh carries no extra pass."""
    params = _params()
    counts = {}
    for flag in (True, False):
        tx = sj.sophia_g(0.01, hessian_update_interval=None, step_diagnostics=flag)
        state = jax.jit(tx.init)(params)
        step = jax.make_jaxpr(tx.update)(_grads(0), state, params).jaxpr
        refresh = functools.partial(tx.update, hessian=params)
        both = jax.make_jaxpr(refresh)(_grads(0), state, params).jaxpr
        counts[flag] = len(_reductions(both)) - len(_reductions(step))  # the refresh's own
    assert 0 < counts[True] < counts[False]  # the Hessian norm; plus win count and m norm

"""GNB and Hutchinson estimators against exact second derivatives on small models."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sophia.jax as sj

N, D, H, V = 6, 3, 4, 5


def _mlp():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(k[0], (N, D))
    params = {
        "w1": jax.random.normal(k[1], (D, H)),
        "b1": jnp.zeros(H),
        "w2": jax.random.normal(k[2], (H, V)) * 0.5,
    }

    def logits_fn(p):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    return params, logits_fn


def _exact_gn_diag(params, logits_fn):
    """diag(G) of the mean cross-entropy: (1/N) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    jac = jax.jacfwd(lambda f: logits_fn(unravel(f)))(flat)  # [N, V, P]
    probs = jax.nn.softmax(logits_fn(params), axis=-1)  # [N, V]
    cov = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(probs)  # [N, V, V]
    diag = jnp.einsum("ncp,ncd,ndp->p", jac, cov, jac) / N
    return unravel(diag)


def test_gnb_expectation_is_the_gauss_newton_diagonal():
    params, logits_fn = _mlp()
    exact = _exact_gn_diag(params, logits_fn)
    keys = jax.random.split(jax.random.PRNGKey(1), 20000)
    est = jax.jit(jax.vmap(lambda k: sj.gnb(params, k, logits_fn=logits_fn)))(keys)
    mean = jax.tree.map(lambda x: N * jnp.mean(x, axis=0), est)
    for name in params:
        e, m = np.asarray(exact[name]), np.asarray(mean[name])
        # h_hat = g_hat^2 with g_hat ~ a sum of bounded terms: relative standard error of
        # the mean is about sqrt(2 / 20000) = 1%.
        np.testing.assert_allclose(m, e, rtol=0.06, atol=0.02 * np.max(e) + 1e-9)
    # The GN diagonal is not the Hessian diagonal for this model, so the test can tell.
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    y = jnp.argmax(logits_fn(params), -1)

    def loss(f):
        return optax.softmax_cross_entropy_with_integer_labels(logits_fn(unravel(f)), y).mean()

    hess_diag = unravel(jnp.diag(jax.hessian(loss)(flat)))
    assert not np.allclose(np.asarray(hess_diag["w1"]), np.asarray(exact["w1"]), rtol=0.2)


def test_gnb_with_fixed_labels_is_the_squared_gradient():
    params, logits_fn = _mlp()
    labels = jnp.arange(N) % V

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p), labels).mean()

    expect = jax.tree.map(jnp.square, jax.grad(loss)(params))
    got = sj.gnb(params, jax.random.PRNGKey(0), logits_fn=logits_fn, labels=labels)
    for name in params:
        e = np.asarray(expect[name])
        np.testing.assert_allclose(np.asarray(got[name]), e, rtol=1e-5, atol=1e-5 * e.max())


def test_gnb_forward_reuse_equals_fresh_forward():
    params, logits_fn = _mlp()
    key = jax.random.PRNGKey(3)
    logits, vjp = jax.vjp(logits_fn, params)
    a = sj.gnb(params, key, logits_fn=logits_fn)
    b = sj.gnb(params, key, logits=logits, logits_vjp=vjp)
    c = sj.gnb_from_vjp(logits, vjp, key)
    for name in params:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(c[name]))


def test_sample_labels_follow_the_softmax():
    logits = jnp.log(jnp.array([[0.7, 0.2, 0.1]]))
    labels = sj.sample_labels(jax.random.PRNGKey(0), jnp.repeat(logits, 30000, 0))
    freq = np.bincount(np.asarray(labels), minlength=3) / 30000
    np.testing.assert_allclose(freq, [0.7, 0.2, 0.1], atol=0.015)


def test_hutchinson_expectation_is_the_hessian_diagonal():
    a = jax.random.normal(jax.random.PRNGKey(0), (6, 6))
    a = a @ a.T
    params = {"x": jnp.arange(6.0) / 6}

    def obj(p):
        return 0.5 * p["x"] @ a @ p["x"] + jnp.sum(jnp.sin(p["x"]))

    exact = jnp.diag(a) - jnp.sin(params["x"])
    keys = jax.random.split(jax.random.PRNGKey(1), 20000)
    est = jax.jit(jax.vmap(lambda k: sj.hutchinson(params, k, obj_fn=obj)))(keys)
    mean = np.asarray(jnp.mean(est["x"], 0))
    scale = float(jnp.sqrt(jnp.sum(a**2, 1)).max())
    np.testing.assert_allclose(mean, np.asarray(exact), atol=0.05 * scale)
    # One probe is exact for a diagonal Hessian (v_i^2 = 1).
    one = sj.hutchinson(params, keys[0], obj_fn=lambda p: jnp.sum(3.0 * p["x"] ** 2))
    np.testing.assert_allclose(np.asarray(one["x"]), 6.0)


def test_missing_estimator_inputs_fail_at_trace_time_with_what_to_pass():
    params, logits_fn = _mlp()
    tx = sj.sophia_g(1e-3)
    s = tx.init(params)
    g = jax.tree.map(jnp.ones_like, params)
    with pytest.raises(ValueError, match="logits_fn"):
        jax.jit(tx.update)(g, s, params)
    with pytest.raises(ValueError, match="obj_fn"):
        sj.sophia_h(1e-3).update(g, sj.sophia_h(1e-3).init(params), params)
    with pytest.raises(ValueError, match="params must be passed"):
        tx.update(g, s)
    with pytest.raises(ValueError, match="logits="):
        tx.update(g, s, params, logits_vjp=lambda c: c)


def test_unknown_extra_arguments_are_ignored():
    params, logits_fn = _mlp()
    tx = sj.sophia_g(1e-3, bs=N)
    s = tx.init(params)
    g = jax.tree.map(jnp.ones_like, params)
    u1, s1 = tx.update(g, s, params, logits_fn=logits_fn)
    u2, s2 = tx.update(g, s, params, logits_fn=logits_fn, unrelated=3, obj_fn=None)
    for a, b in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u2, s2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_builtin_refresh_with_forward_reuse_matches_logits_fn():
    params, logits_fn = _mlp()
    tx = sj.sophia_g(1e-2, bs=N, hessian_update_interval=2)
    g = jax.tree.map(jnp.ones_like, params)
    s1 = s2 = tx.init(params)
    for _ in range(3):
        _, s1 = tx.update(g, s1, params, logits_fn=logits_fn)
        logits, vjp = jax.vjp(logits_fn, params)
        _, s2 = tx.update(g, s2, params, logits=logits, logits_vjp=vjp)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(s1[0].hessian_norm) > 0


def test_sophia_h_ports_optax_contrib_calls():
    """The loop written for optax.contrib.sophia (update(..., obj_fn=...)) runs unchanged."""
    target = jnp.array([1.0, -2.0, 3.0])

    def obj(p):
        return jnp.sum((p - target) ** 2 * jnp.array([1.0, 10.0, 100.0]))

    def train(tx):
        p = jnp.zeros(3)
        s = tx.init(p)
        step = jax.jit(lambda p, s: tx.update(jax.grad(obj)(p), s, p, obj_fn=obj))
        for _ in range(500):
            u, s = step(p, s)
            p = optax.apply_updates(p, u)
        return p

    p_contrib = train(optax.contrib.sophia(0.05, weight_decay=0.0))
    p_ours = train(sj.sophia_h(0.05, weight_decay=0.0))
    assert float(obj(p_contrib)) < float(obj(jnp.zeros(3)))
    # Clipped steps of size lr: within a few lr of the minimum in every coordinate.
    np.testing.assert_allclose(np.asarray(p_ours), np.asarray(target), atol=0.15)

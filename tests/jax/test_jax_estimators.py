"""GNB and Hutchinson estimators against exact second derivatives on small models."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sophia.jax as sj
from sophia import spec

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


MASK = jnp.array([True, False, True, True, False, True])


def _mlp_on(x):
    params, _ = _mlp()

    def logits_fn(p):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    return params, logits_fn


def _assert_trees_equal(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_gnb_mask_is_the_estimate_without_the_masked_out_rows():
    """Masked-out rows are dropped: the same estimate, bit for bit, as on the kept rows alone."""
    x = jax.random.normal(jax.random.PRNGKey(7), (N, D))
    params, logits_fn = _mlp_on(x)
    _, kept_fn = _mlp_on(x[MASK])
    key = jax.random.PRNGKey(3)
    sampled = sj.sample_labels(key, logits_fn(params))
    got = sj.gnb(params, key, logits_fn=logits_fn, mask=MASK)
    _assert_trees_equal(got, sj.gnb(params, key, logits_fn=kept_fn, labels=sampled[MASK]))
    # 0/1 numbers are a mask too; forward reuse takes it the same way.
    logits, vjp = jax.vjp(logits_fn, params)
    _assert_trees_equal(got, sj.gnb(params, key, logits_fn=logits_fn, mask=MASK.astype(int)))
    _assert_trees_equal(got, sj.gnb_from_vjp(logits, vjp, key, mask=MASK))
    # It is the square of the gradient of the mean cross-entropy over the kept rows.
    labels = jnp.arange(N) % V

    def masked_loss(p):
        ce = optax.softmax_cross_entropy_with_integer_labels(logits_fn(p), labels)
        return jnp.sum(jnp.where(MASK, ce, 0.0)) / jnp.sum(MASK)

    fixed = sj.gnb(params, key, logits_fn=logits_fn, labels=labels, mask=MASK)
    for name, g in jax.grad(masked_loss)(params).items():
        e = np.asarray(jnp.square(g))
        np.testing.assert_allclose(np.asarray(fixed[name]), e, rtol=1e-5, atol=1e-6 * e.max())
    assert sj.label_count(logits, MASK) == 4 and sj.label_count(logits) == N


def test_gnb_masked_out_positions_contribute_exactly_nothing():
    """Other logits, even NaN, at masked-out positions leave the estimate unchanged to the bit."""
    w = jax.random.normal(jax.random.PRNGKey(1), (N, V))  # one logit row per parameter row
    key = jax.random.PRNGKey(0)
    base = sj.gnb({"w": w}, key, logits_fn=lambda p: p["w"], mask=MASK)
    poisoned = w.at[~MASK].set(jnp.nan)
    got = sj.gnb({"w": poisoned}, key, logits_fn=lambda p: p["w"], mask=MASK)
    _assert_trees_equal(base, got)
    assert np.all(np.asarray(got["w"])[~np.asarray(MASK)] == 0)
    assert np.all(np.asarray(got["w"]).sum(-1)[np.asarray(MASK)] > 0)


def test_gnb_mask_on_a_causal_language_model_batch():
    """[batch, time] masks (padding, the shifted last position) under jit; the count is traced."""
    b, t = 2, 4
    tokens = jax.random.randint(jax.random.PRNGKey(2), (b, t), 0, V)
    params = {"emb": jax.random.normal(jax.random.PRNGKey(3), (V, V))}
    mask = jnp.array([[True, True, True, False], [True, False, False, False]])

    def logits_fn(p):
        return p["emb"][tokens]

    key = jax.random.PRNGKey(4)
    est = jax.jit(lambda p, m: sj.gnb_with_label_count(p, key, logits_fn=logits_fn, mask=m))
    h_hat, n = est(params, mask)
    assert int(n) == 4
    flat = {"emb": params["emb"]}
    kept = tokens[mask]
    sampled = sj.sample_labels(key, logits_fn(params))[mask]
    ref = jax.jit(lambda p: sj.gnb(p, key, logits_fn=lambda q: q["emb"][kept], labels=sampled))
    np.testing.assert_allclose(np.asarray(h_hat["emb"]), np.asarray(ref(flat)["emb"]), rtol=1e-6)
    # A mask with nothing in it gives a zero estimate, not a division by zero.
    zero, n0 = est(params, jnp.zeros((b, t), bool))
    assert int(n0) == 0 and not np.any(np.asarray(zero["emb"]))


def test_gnb_mask_of_the_wrong_shape_or_dtype_is_refused():
    params, logits_fn = _mlp()
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match=r"Invalid mask: shape \(5,\).*\(6,\)"):
        sj.gnb(params, key, logits_fn=logits_fn, mask=jnp.ones(5, bool))
    with pytest.raises(ValueError, match="Invalid mask: shape None"):
        sj.gnb(params, key, logits_fn=logits_fn, mask=[True] * N)
    with pytest.raises(ValueError, match="Invalid mask: dtype"):
        sj.gnb(params, key, logits_fn=logits_fn, mask=jnp.ones(N, jax.dtypes.float0))


def test_builtin_refresh_takes_the_mask():
    """tx.update(..., mask=...) refreshes with the masked estimate, jitted with a traced mask."""
    params, logits_fn = _mlp()
    tx = sj.sophia_g(1e-2, bs=4, hessian_update_interval=2, seed=5)
    g = jax.tree.map(jnp.ones_like, params)
    step = jax.jit(lambda s, m: tx.update(g, s, params, logits_fn=logits_fn, mask=m))
    s, key = tx.init(params), jax.random.PRNGKey(5)
    for t in range(3):
        h_before = s[0].hessian
        _, s = step(s, MASK)
        if t % 2 == 0:  # refreshes at the start of steps 0 and 2
            key, sub = jax.random.split(key)
            h_hat = sj.gnb(params, sub, logits_fn=logits_fn, mask=MASK)
            unmasked = sj.gnb(params, sub, logits_fn=logits_fn)
            want = jax.tree.map(lambda h, e: 0.99 * h + 0.01 * e, h_before, h_hat)
            for name in params:
                got, w = np.asarray(s[0].hessian[name]), np.asarray(want[name])
                # Jitted whole against op by op: within FMA rounding, not bit for bit.
                np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6 * w.max())
                assert not np.allclose(got, 0.99 * h_before[name] + 0.01 * unmasked[name])
        else:
            _assert_trees_equal(s[0].hessian, h_before)


def _run(tx, params, logits_fn, steps, jit=True, **extra):
    g = jax.tree.map(jnp.ones_like, params)

    def upd(s, **kw):
        return tx.update(g, s, params, logits_fn=logits_fn, **kw)

    upd = jax.jit(upd) if jit else upd
    s, out = tx.init(params), []
    for _ in range(steps):
        u, s = upd(s, **extra)
        out.append((u, s))
    return out


def test_bs_none_follows_the_label_count_of_each_refresh(recwarn):
    """bs=None: the state's bs is the refresh's label count, and the run is that of bs=N."""
    params, logits_fn = _mlp()
    follow = _run(sj.sophia_g(1e-2, hessian_update_interval=2), params, logits_fn, 3)
    fixed = _run(sj.sophia_g(1e-2, bs=N, hessian_update_interval=2), params, logits_fn, 3)
    for (u, s), (uf, sf) in zip(follow, fixed):
        assert float(s[0].label_count) == N and sf[0].label_count is None
        _assert_trees_equal((u, s[0].hessian, s[0].mu), (uf, sf[0].hessian, sf[0].mu))
    # A refresh on part of the batch counts only its labels.
    _, part_fn = _mlp_on(jax.random.normal(jax.random.PRNGKey(0), (N, D))[:2])
    ((_, s),) = _run(sj.sophia_g(1e-2), params, part_fn, 1)
    assert float(s[0].label_count) == 2
    assert not [w for w in recwarn if "bs" in str(w.message)]


def test_bs_none_follows_a_traced_mask_and_keeps_the_last_count_on_an_empty_one():
    params, logits_fn = _mlp()
    tx = sj.sophia_g(1e-2, hessian_update_interval=1)
    g = jax.tree.map(jnp.ones_like, params)
    step = jax.jit(lambda s, m: tx.update(g, s, params, logits_fn=logits_fn, mask=m))
    _, s = step(tx.init(params), MASK)
    assert float(s[0].label_count) == 4
    _, s = step(s, jnp.zeros(N, bool))  # nothing counted: the estimate is 0, bs stays
    assert float(s[0].label_count) == 4
    # The same run as bs=4 given by hand.
    fixed = _run(sj.sophia_g(1e-2, bs=4, hessian_update_interval=1), params, logits_fn, 1,
                 mask=MASK)  # fmt: skip
    _, s1 = step(tx.init(params), MASK)
    _assert_trees_equal(s1[0].hessian, fixed[0][1][0].hessian)


def test_a_hand_refresh_with_bs_none_takes_a_label_count_or_warns_once():
    params, logits_fn = _mlp()
    tx = sj.sophia_g(1e-2, hessian_update_interval=None)
    s = tx.init(params)
    key = jax.random.PRNGKey(0)
    est = sj.gnb_with_label_count(params, key, logits_fn=logits_fn, mask=MASK)
    assert int(est.label_count) == 4
    g = jax.tree.map(jnp.zeros_like, params)

    def refresh(s, h_hat, **kw):
        return tx.update(g, s, params, hessian=h_hat, **kw)[1]

    assert float(refresh(s, est)[0].label_count) == 4
    assert float(refresh(s, est.h_hat, label_count=3)[0].label_count) == 3
    with pytest.warns(sj.LabelCountWarning, match=r"bs=None .* bs=5120 .*Pass bs="):
        s2 = refresh(s, est.h_hat)
    assert float(s2[0].label_count) == spec.REFERENCE_BS
    _assert_trees_equal(s2[0].hessian, refresh(s, est)[0].hessian)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # once; and, as in torch, a count once seen stays until the next one
        assert float(refresh(refresh(s, est), est.h_hat)[0].label_count) == 4


def test_a_numeric_bs_that_differs_from_the_refresh_count_warns_once_naming_both():
    params, logits_fn = _mlp()
    g = jax.tree.map(jnp.ones_like, params)
    tx = sj.sophia_g(1e-2, bs=5120, hessian_update_interval=1)
    with pytest.warns(sj.LabelCountWarning, match=rf"bs=5120 but the GNB refresh saw {N} labels"):
        _, s = tx.update(g, tx.init(params), params, logits_fn=logits_fn)
    assert s[0].label_count is None  # warned, not overridden: the transform's bs stays
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tx.update(g, s, params, logits_fn=logits_fn)
        ok = sj.sophia_g(1e-2, bs=4, hessian_update_interval=1)
        _run(ok, params, logits_fn, 1, mask=MASK)
        jax.effects_barrier()
    # A traced count (a mask under jit) is checked on the device.
    tx = sj.sophia_g(1e-2, bs=N, hessian_update_interval=1)
    with pytest.warns(sj.LabelCountWarning, match=rf"bs={N} but the GNB refresh saw 4 labels"):
        _run(tx, params, logits_fn, 1, mask=MASK)
        jax.effects_barrier()


def test_sophia_h_keeps_bs_one_and_inject_hyperparams_takes_bs_none():
    params, logits_fn = _mlp()
    g = jax.tree.map(jnp.ones_like, params)
    h = sj.sophia_h(1e-2, hessian_update_interval=1)
    _, s = h.update(g, h.init(params), params, obj_fn=lambda p: jnp.sum(logits_fn(p) ** 2))
    assert s[0].label_count is None  # bs=1, not followed
    tx = optax.inject_hyperparams(sj.sophia_g)(learning_rate=1e-2, hessian_update_interval=1)
    ((_, s),) = _run(tx, params, logits_fn, 1, mask=MASK)
    assert float(s.inner_state[0].label_count) == 4


def _ignoring(params):
    """A logits_fn that reads the weights it closed over, not its argument (the NNX trap)."""
    x = jax.random.normal(jax.random.PRNGKey(7), (N, D))
    frozen = jax.tree.map(jnp.copy, params)
    _, logits_fn = _mlp_on(x)
    return lambda p: logits_fn(frozen)


def test_a_logits_fn_that_ignores_its_parameters_is_refused():
    """Every GNB estimate would be zero and h would stay 0 forever: an error naming the fix."""
    params, _ = _mlp()
    bad = _ignoring(params)
    key = jax.random.PRNGKey(0)
    g = jax.tree.map(jnp.ones_like, params)
    tx = sj.sophia_g(1e-2, hessian_update_interval=2)
    logits, vjp = jax.vjp(bad, params)
    calls = {
        "gnb": lambda: sj.gnb(params, key, logits_fn=bad),
        "gnb jitted": lambda: jax.jit(lambda p: sj.gnb(p, key, logits_fn=bad))(params),
        "forward reuse": lambda: sj.gnb_from_vjp(logits, vjp, key),
        "refresh op by op": lambda: tx.update(g, tx.init(params), params, logits_fn=bad),
        "refresh jitted (lax.cond)": lambda: jax.jit(
            lambda s: tx.update(g, s, params, logits=logits, logits_vjp=vjp)
        )(tx.init(params)),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"Invalid logits_fn: .*do not depend") as e:
            call()
        assert "lambda p: model(p, x)" in str(e.value) and "nnx.merge" in str(e.value), name


def test_a_logits_fn_that_uses_only_some_parameters_is_accepted():
    """A leaf the logits do not use (a frozen or unused parameter) simply gets a zero estimate."""
    params, _ = _mlp()
    x = jax.random.normal(jax.random.PRNGKey(7), (N, D))
    w1 = params["w1"]

    def some(p):
        return jnp.tanh(x @ w1 + p["b1"]) @ p["w2"]

    h_hat = sj.gnb(params, jax.random.PRNGKey(0), logits_fn=some)
    assert not np.any(np.asarray(h_hat["w1"])) and np.all(np.asarray(h_hat["w2"]) > 0)


def test_an_obj_fn_that_ignores_its_parameters_is_refused():
    params, logits_fn = _mlp()
    g = jax.tree.map(jnp.ones_like, params)
    tx = sj.sophia_h(1e-2, hessian_update_interval=1)
    with pytest.raises(ValueError, match=r"Invalid obj_fn: .*does not depend.*loss\(p, batch\)"):
        tx.update(g, tx.init(params), params, obj_fn=lambda p: jnp.sum(logits_fn(params) ** 2))
    # A loss linear in the parameters has a zero Hessian but does depend on them.
    h_hat = sj.hutchinson(params, jax.random.PRNGKey(0), obj_fn=lambda p: jnp.sum(p["w2"]))
    assert not np.any(np.asarray(h_hat["w2"]))


def test_the_dependence_check_changes_nothing_in_the_computation(monkeypatch):
    """It only reads a trace: the same jitted program, the same op-by-op results, to the bit."""
    from sophia.jax import estimators

    params, logits_fn = _mlp()
    g = jax.tree.map(jnp.ones_like, params)
    gnb_tx = sj.sophia_g(1e-2, hessian_update_interval=2)
    h_tx = sj.sophia_h(1e-2, hessian_update_interval=2)

    def obj(p):
        return jnp.sum(logits_fn(p) ** 2)

    def run():
        programs = [
            str(jax.make_jaxpr(lambda s: gnb_tx.update(g, s, params, logits_fn=logits_fn))(
                gnb_tx.init(params))),
            str(jax.make_jaxpr(lambda s: h_tx.update(g, s, params, obj_fn=obj))(
                h_tx.init(params))),
        ]  # fmt: skip
        eager = [
            gnb_tx.update(g, gnb_tx.init(params), params, logits_fn=logits_fn),
            h_tx.update(g, h_tx.init(params), params, obj_fn=obj),
        ]
        return programs, eager

    checked_programs, checked = run()
    monkeypatch.setattr(estimators, "_ignores_input", lambda *a: False)
    plain_programs, plain = run()
    assert checked_programs == plain_programs
    _assert_trees_equal(checked, plain)
    assert float(checked[0][1][0].hessian_norm) > 0 and float(checked[1][1][0].hessian_norm) > 0


def test_flax_nnx_model_that_ignores_the_parameters_is_refused_and_nnx_merge_works():
    """`lambda p: model(x)` with an NNX module (it holds its own weights) is the natural mistake."""
    from flax import nnx

    x = jax.random.normal(jax.random.PRNGKey(7), (N, D))
    y = jnp.arange(N) % V

    class Tiny(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.linear = nnx.Linear(D, V, rngs=rngs)

        def __call__(self, x):
            return self.linear(x)

    def loss(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    @nnx.jit(static_argnums=2)
    def step(model, opt, merge):
        grads = nnx.grad(loss)(model)
        if merge:
            graphdef, _, rest = nnx.split(model, nnx.Param, ...)
            opt.update(model, grads, logits_fn=lambda p: nnx.merge(graphdef, p, rest)(x))
        else:
            opt.update(model, grads, logits_fn=lambda p: model(x))

    model = Tiny(nnx.Rngs(0))
    opt = nnx.Optimizer(model, sj.sophia_g(1e-2, hessian_update_interval=1), wrt=nnx.Param)
    with pytest.raises(ValueError, match=r"Invalid logits_fn: .*nnx\.merge"):
        opt.update(model, nnx.grad(loss)(model), logits_fn=lambda p: model(x))
    with pytest.raises(ValueError, match=r"Invalid logits_fn: .*nnx\.merge"):
        step(model, opt, False)
    step(model, opt, True)
    d = sj.diagnostics(opt.opt_state)
    assert int(d["count"][...]) == 1 and float(d["hessian_norm"][...]) > 0


def test_the_followed_label_count_crosses_sophia_interop():
    """bs=None: the count the state follows is the checkpoint's label_count, and comes back."""
    from sophia import interop

    params, logits_fn = _mlp()
    tx = sj.sophia_g(1e-2, hessian_update_interval=1)
    ((_, s),) = _run(tx, params, logits_fn, 1, mask=MASK)
    ckpt = interop.from_jax(s, params)
    assert ckpt.groups[0].label_count == 4
    back = interop.to_jax(ckpt, tx.init(params), params)
    assert float(back[0].label_count) == 4
    assert float(tx.init(params)[0].label_count) == spec.REFERENCE_BS
    fixed = sj.sophia_g(1e-2, bs=4, hessian_update_interval=1)
    assert interop.from_jax(fixed.init(params), params).groups[0].label_count is None

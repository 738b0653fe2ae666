"""sophia_g inside optax pipelines: schedules, masks, wrappers, validation."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sophia.jax as sj

X = jax.random.normal(jax.random.PRNGKey(0), (16, 4))
Y = jnp.arange(16) % 3
PARAMS = {"w": jax.random.normal(jax.random.PRNGKey(1), (4, 3)) * 0.1, "b": jnp.zeros(3)}


def logits_fn(p):
    return X @ p["w"] + p["b"]


def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p), Y).mean()


def _run(tx, steps=6, params=PARAMS, apply=True, **extra):
    s = tx.init(params)
    p = params
    ups = []
    for _ in range(steps):
        u, s = tx.update(jax.grad(loss)(p), s, p, logits_fn=logits_fn, **extra)
        ups.append(u)
        if apply:
            p = optax.apply_updates(p, u)
    return p, s, ups


def _equal_trees(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_learning_rate_schedule():
    sched = optax.linear_schedule(0.1, 0.0, 10)
    _, _, ups = _run(sj.sophia_g(sched, bs=16, hessian_update_interval=2), apply=False)
    _, _, ups1 = _run(sj.sophia_g(1.0, bs=16, hessian_update_interval=2), apply=False)
    for t, (u, u1) in enumerate(zip(ups, ups1)):
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u1)):
            np.testing.assert_allclose(np.asarray(a), float(sched(t)) * np.asarray(b), rtol=1e-6)


def test_weight_decay_mask_and_decoupled_decay():
    mask = {"w": True, "b": False}
    p = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    zero = jax.tree.map(jnp.zeros_like, p)
    lr, wd = 0.1, 0.5
    tx = sj.sophia_g(lr, weight_decay=wd, weight_decay_mask=mask, hessian_update_interval=None)
    u, _ = tx.update(zero, tx.init(p), p)
    # zero gradient: sign(m) = 0, so the update is the decay alone, where the mask allows.
    np.testing.assert_allclose(np.asarray(u["w"]), -lr * wd, rtol=1e-7)
    np.testing.assert_array_equal(np.asarray(u["b"]), 0.0)
    tx_fn = sj.sophia_g(lr, weight_decay=wd, weight_decay_mask=lambda q: mask,
                        hessian_update_interval=None)  # fmt: skip
    _equal_trees(tx_fn.update(zero, tx_fn.init(p), p)[0], u)


def test_weight_decay_schedule():
    tx = sj.sophia_g(1.0, weight_decay=lambda c: 0.1 * (c + 1), hessian_update_interval=None)
    p = jnp.ones(2)
    s = tx.init(p)
    for t in range(3):
        u, s = tx.update(jnp.zeros(2), s, p)
        np.testing.assert_allclose(np.asarray(u), -0.1 * (t + 1), rtol=1e-6)


def test_inject_hyperparams_gives_identical_updates():
    plain = sj.sophia_g(0.05, rho=0.03, bs=16, hessian_update_interval=3)
    inj = optax.inject_hyperparams(sj.sophia_g)(learning_rate=0.05, rho=0.03, bs=16,
                                                hessian_update_interval=3)  # fmt: skip
    p1, s1, _ = _run(plain, steps=7)
    p2, s2, _ = _run(inj, steps=7)
    _equal_trees(p1, p2)
    _equal_trees(s1, s2.inner_state)
    # and a hyperparameter can be changed in the state between steps
    s2.hyperparams["learning_rate"] = jnp.asarray(0.0)
    u, _ = inj.update(jax.grad(loss)(p2), s2, p2, logits_fn=logits_fn)
    # lr 0: the update vanishes
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(u))


def test_inject_hyperparams_under_jit_with_a_custom_estimator_as_static_arg():
    def est(params, key, **_):
        return jax.tree.map(jnp.ones_like, params)

    tx = optax.inject_hyperparams(sj.sophia_g, static_args=("estimator",))(
        learning_rate=0.1, estimator=est, hessian_update_interval=1
    )
    s = tx.init(PARAMS)
    _, s = jax.jit(tx.update)(jax.grad(loss)(PARAMS), s, PARAMS)
    np.testing.assert_allclose(np.asarray(s.inner_state[0].hessian["w"]), 1 - 0.99, rtol=1e-6)


def test_multisteps_accumulates_then_steps_once():
    g1 = jax.tree.map(lambda x: jnp.full_like(x, 1.0), PARAMS)
    g2 = jax.tree.map(lambda x: jnp.full_like(x, -3.0), PARAMS)
    inner = sj.sophia_g(0.1, bs=16, hessian_update_interval=1)
    ms = optax.MultiSteps(inner, every_k_schedule=2)
    s = ms.init(PARAMS)
    u0, s = ms.update(g1, s, PARAMS, logits_fn=logits_fn)
    assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(u0))
    u1, s = ms.update(g2, s, PARAMS, logits_fn=logits_fn)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    ref_u, ref_s = inner.update(mean, inner.init(PARAMS), PARAMS, logits_fn=logits_fn)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(ref_u)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    assert int(s.inner_opt_state[0].count) == 1


def test_apply_if_finite_skips_nan_steps_without_touching_state():
    tx = optax.apply_if_finite(sj.sophia_g(0.1, bs=16, hessian_update_interval=2), 3)
    s = tx.init(PARAMS)
    g = jax.grad(loss)(PARAMS)
    u, s = tx.update(g, s, PARAMS, logits_fn=logits_fn)
    bad = jax.tree.map(lambda x: x * jnp.nan, g)
    u_bad, s_bad = tx.update(bad, s, PARAMS, logits_fn=logits_fn)
    assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(u_bad))
    _equal_trees(s_bad.inner_state, s.inner_state)
    assert int(s_bad.notfinite_count) == 1


def test_multi_transform_with_manual_refresh():
    labels = {"w": "sophia", "b": "adam"}
    tx = optax.multi_transform(
        {"sophia": sj.sophia_g(0.1, bs=16, hessian_update_interval=None), "adam": optax.adam(0.1)},
        labels,
    )
    s = tx.init(PARAMS)
    h_hat = sj.gnb(PARAMS, jax.random.PRNGKey(0), logits_fn=logits_fn)
    u, s = jax.jit(tx.update)(jax.grad(loss)(PARAMS), s, PARAMS, hessian=h_hat)
    core = s.inner_states["sophia"].inner_state[0]
    np.testing.assert_allclose(np.asarray(core.hessian["w"]), 0.01 * np.asarray(h_hat["w"]),
                               rtol=1e-5)  # fmt: skip
    assert isinstance(core.hessian["b"], optax.MaskedNode)
    assert float(loss(optax.apply_updates(PARAMS, u))) < float(loss(PARAMS))


def test_map_params_reaches_the_parameter_shaped_state():
    tx = sj.sophia_g(hessian_update_interval=None)
    s = optax.tree.map_params(tx, lambda x: x.astype(jnp.bfloat16), tx.init(PARAMS))
    assert s[0].mu["w"].dtype == jnp.bfloat16 and s[0].hessian["b"].dtype == jnp.bfloat16
    assert s[0].rho.dtype == jnp.float32  # scalars are not parameters


def test_the_removed_update_hessian_names_the_update_argument():
    tx = sj.sophia_g(0.1, hessian_update_interval=None)
    with pytest.raises(TypeError, match=r"tx.update\(grads, opt_state, params, hessian=h_hat\)"):
        sj.update_hessian(tx.init(PARAMS), PARAMS)
    with pytest.raises(AttributeError, match="StaticFlag was removed"):
        sj.StaticFlag  # noqa: B018


def test_hand_refresh_misuses_are_refused():
    g = jax.tree.map(jnp.ones_like, PARAMS)
    builtin = sj.sophia_g(0.1, bs=16, hessian_update_interval=2)
    with pytest.raises(ValueError, match=r"Invalid hessian: .*hessian_update_interval=2"):
        builtin.update(g, builtin.init(PARAMS), PARAMS, hessian=PARAMS, logits_fn=logits_fn)
    manual = sj.sophia_g(0.1, hessian_update_interval=None)
    with pytest.raises(ValueError, match="Invalid label_count: 3 without hessian="):
        manual.update(g, manual.init(PARAMS), PARAMS, label_count=3)
    numeric = sj.sophia_g(0.1, bs=16, hessian_update_interval=None)
    with pytest.raises(ValueError, match="a state made for bs=None given to a transform built "
                                         "with bs=16"):  # fmt: skip
        numeric.update(g, manual.init(PARAMS), PARAMS)
    with pytest.raises(ValueError, match="a state made for bs=a number"):
        manual.update(g, numeric.init(PARAMS), PARAMS)


@pytest.mark.parametrize(
    "kw,name",
    [
        ({"learning_rate": -1.0}, "lr"),
        ({"b1": 1.0}, "betas[0]"),
        ({"b2": -0.5}, "betas[1]"),
        ({"rho": 0.0}, "rho"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"bs": -3}, "bs"),
        ({"eps": -1.0}, "eps"),
        ({"hessian_update_interval": 0}, "hessian_update_interval"),
        ({"maximize": "no"}, "maximize"),
        ({"dynamic": 1}, "dynamic"),
        ({"estimator": "fisher"}, "estimator"),
        ({"estimator": 3}, "estimator"),
    ],
)
def test_sophia_g_validation(kw, name):
    with pytest.raises(
        ValueError, match=r"Invalid " + name.replace("[", r"\[").replace("]", r"\]")
    ):
        sj.sophia_g(**kw)


def test_scale_by_sophia_needs_an_estimator_for_builtin_refreshes():
    with pytest.raises(ValueError, match="Invalid estimator: None"):
        sj.scale_by_sophia(hessian_update_interval=10)
    sj.scale_by_sophia(hessian_update_interval=None)


@pytest.mark.parametrize("name", ["sophia_g", "sophia_h"])
def test_op_by_op_refresh_steps_compile_nothing_after_the_first(name, caplog):
    """Op by op the refresh is a Python branch: a lax.cond with new closures (the logits_fn
    or obj_fn of each call) was compiled anew at every refresh, over a second each."""
    if name == "sophia_g":
        tx, extra, fn = sj.sophia_g(0.1, bs=16, hessian_update_interval=1), "logits_fn", logits_fn
    else:
        tx, extra, fn = sj.sophia_h(0.1, hessian_update_interval=1), "obj_fn", loss

    def compilations(run, *args):
        caplog.clear()
        with caplog.at_level(logging.WARNING), jax.log_compiles():
            out = run(*args)
        found = [re.search("Finished .* compilation", r.getMessage()) for r in caplog.records]
        return sum(map(bool, found)), out

    def step(p, s):
        # a new closure every step, as a training loop over batches makes
        return tx.update(jax.grad(loss)(p), s, p, **{extra: lambda q: fn(q)})

    s, p, compiled = tx.init(PARAMS), PARAMS, []
    for _ in range(3):
        n, (u, s) = compilations(step, p, s)
        p = optax.apply_updates(p, u)
        compiled.append(n)
    assert compiled[1:] == [0, 0]
    assert int(s[0].count) == 3 and float(s[0].hessian_norm) > 0
    # and the log does see a compilation where there is one
    assert compilations(jax.jit(lambda a: a * 3.5), jnp.ones(7))[0] > 0

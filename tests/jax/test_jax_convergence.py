"""sophia_g / sophia_h train small problems to their optimum."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sophia.jax as sj


def _train(tx, params, loss, steps, **extra_fn):
    def step(p, s):
        g = jax.grad(loss)(p)
        extra = {k: f for k, f in extra_fn.items()}
        u, s = tx.update(g, s, p, **extra)
        return optax.apply_updates(p, u), s

    step = jax.jit(step)
    s = tx.init(params)
    for _ in range(steps):
        params, s = step(params, s)
    return params, s


def test_ill_conditioned_quadratic_with_hutchinson():
    scales = jnp.logspace(-2, 2, 10)
    target = jnp.linspace(-1, 1, 10)

    def loss(p):
        return 0.5 * jnp.sum(scales * (p - target) ** 2)

    tx = sj.sophia_h(0.05, rho=1.0, weight_decay=0.0, hessian_update_interval=1)
    p, s = _train(tx, jnp.zeros(10), loss, 400, obj_fn=loss)
    # The Hessian is exact for a diagonal quadratic: h -> scales, steps become Newton steps
    # clipped at lr, so even the flattest direction (curvature 1e-2) reaches its target.
    np.testing.assert_allclose(np.asarray(p), np.asarray(target), atol=2e-2)
    np.testing.assert_allclose(np.asarray(s[0].hessian), np.asarray(scales), rtol=0.02)


def test_rosenbrock_with_hutchinson():
    def loss(p):
        return (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2

    tx = sj.sophia_h(0.02, rho=0.05, weight_decay=0.0, hessian_update_interval=1)
    p, _ = _train(tx, jnp.array([-1.0, 1.0]), loss, 3000, obj_fn=loss)
    assert float(loss(p)) < 1e-2
    np.testing.assert_allclose(np.asarray(p), [1.0, 1.0], atol=0.15)


def _blobs(n=400, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 2
    y = rng.integers(0, k, n)
    x = centers[y] + rng.normal(size=(n, d))
    return jnp.asarray(x, jnp.float32), jnp.asarray(y)


def test_logistic_regression_with_gnb_matches_the_optimum():
    x, y = _blobs()

    def logits_fn(p):
        return x @ p["w"] + p["b"]

    def loss(p):
        ce = optax.softmax_cross_entropy_with_integer_labels(logits_fn(p), y).mean()
        return ce + 1e-2 * jnp.sum(p["w"] ** 2)

    p0 = {"w": jnp.zeros((5, 3)), "b": jnp.zeros(3)}
    # A well-converged reference optimum from L-BFGS.
    lbfgs, ref = optax.lbfgs(), p0
    ls, value_and_grad = lbfgs.init(ref), optax.value_and_grad_from_state(loss)

    @jax.jit  # op by op, the line search alone took minutes
    def lbfgs_step(ref, ls):
        v, g = value_and_grad(ref, state=ls)
        u, ls = lbfgs.update(g, ls, ref, value=v, grad=g, value_fn=loss)
        return optax.apply_updates(ref, u), ls

    for _ in range(100):
        ref, ls = lbfgs_step(ref, ls)
    assert float(optax.tree.norm(jax.grad(loss)(ref))) < 1e-4  # the reference is an optimum
    ref_loss = float(loss(ref))
    tx = sj.sophia_g(0.05, rho=0.05, weight_decay=0.0, bs=x.shape[0], hessian_update_interval=5)
    p, s = _train(tx, p0, loss, 600, logits_fn=logits_fn)
    assert float(loss(p)) < ref_loss + 2e-3
    assert float(sj.diagnostics(s)["hessian_norm"]) > 0


def test_tiny_mlp_with_gnb_beats_its_start_and_learns():
    x, y = _blobs(n=256, d=4, k=4, seed=1)
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    p0 = {
        "w1": jax.random.normal(k[0], (4, 16)) * 0.5,
        "b1": jnp.zeros(16),
        "w2": jax.random.normal(k[1], (16, 4)) * 0.5,
        "b2": jnp.zeros(4),
    }

    def logits_fn(p):
        return jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p), y).mean()

    tx = sj.sophia_g(0.02, rho=0.05, weight_decay=0.0, bs=256, hessian_update_interval=10)
    p, s = _train(tx, p0, loss, 300, logits_fn=logits_fn)
    acc = float(jnp.mean(jnp.argmax(logits_fn(p), -1) == y))
    assert float(loss(p)) < 0.3 * float(loss(p0))
    assert acc > 0.9
    d = sj.diagnostics(s)
    assert 0.0 <= float(d["win_rate"]) <= 1.0 and int(d["count"]) == 300


def test_maximize_is_descent_on_the_negated_objective():
    def obj(p):
        return -jnp.sum((p - 2.0) ** 2 * jnp.array([1.0, 3.0, 9.0]))

    def run(maximize):
        tx = sj.sophia_h(0.05, weight_decay=0.1, maximize=maximize, hessian_update_interval=2)
        f = obj if maximize else (lambda p: -obj(p))
        return _train(tx, jnp.zeros(3), f, 40, obj_fn=f)[0]

    up, down = run(True), run(False)
    np.testing.assert_array_equal(np.asarray(up), np.asarray(down))
    assert float(obj(up)) > 0.5 * float(obj(jnp.zeros(3)))  # climbed most of the way

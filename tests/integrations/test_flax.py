"""sophia.integrations.flax: SophiaG's built-in refresh under Flax NNX and linen (tiny models)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

flax = pytest.importorskip("flax")

import flax.linen as nn  # noqa: E402
from flax import nnx, serialization  # noqa: E402
from flax.training import train_state  # noqa: E402

import sophia.jax as sj  # noqa: E402
from sophia.integrations import flax as sflax  # noqa: E402

B, T, V, E = 2, 5, 7, 8
K, STEPS = 2, 5  # refreshes at the start of steps 0, 2, 4
TOKENS = jax.random.randint(jax.random.PRNGKey(0), (B, T + 1), 0, V)
X, Y = TOKENS[:, :-1], TOKENS[:, 1:]
# The second sequence is padded after 2 positions: those do not enter the loss.
MASK = jnp.arange(T)[None, :] < jnp.array([[T], [2]])


def _tx():
    return sj.sophia_g(3e-2, rho=0.05, weight_decay=0.0, hessian_update_interval=K, seed=1)


def _masked_ce(logits):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, Y)
    return jnp.sum(jnp.where(MASK, ce, 0.0)) / jnp.sum(MASK)


def _refresh_steps(h_norms):
    """The steps whose update changed the Hessian EMA (a refresh ran at their start)."""
    return [t for t, (a, b) in enumerate(zip([0.0, *h_norms], h_norms)) if a != b]


def _assert_trees_equal(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


# --------------------------------------------------------------------------- NNX


class TinyLM(nnx.Module):
    """A causal bigram-plus-context model: embedding, a causal mean over the past, a head."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(V, E, rngs=rngs)
        self.head = nnx.Linear(E, V, rngs=rngs)

    def __call__(self, tokens):
        h = self.embed(tokens)
        past = jnp.cumsum(h, axis=1) / jnp.arange(1, tokens.shape[1] + 1)[None, :, None]
        return self.head(jnp.tanh(h + past))


@nnx.jit
def _nnx_step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: _masked_ce(m(X)))(model)
    optimizer.update(model, grads, logits_fn=sflax.logits_fn(model, X), mask=MASK)
    return loss


def _nnx_run(model, optimizer, steps):
    losses, h_norms = [], []
    for _ in range(steps):
        losses.append(float(_nnx_step(model, optimizer)))
        h_norms.append(float(sflax.diagnostics(optimizer)["hessian_norm"]))
    return losses, h_norms


def test_nnx_optimizer_refreshes_from_the_model_by_the_rule_and_equals_a_plain_optax_loop():
    model = TinyLM(nnx.Rngs(0))
    graphdef, params0, rest = nnx.split(model, nnx.Param, ...)
    params0 = jax.tree.map(jnp.copy, nnx.as_pure(params0))  # split shares the model's arrays
    optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
    losses, h_norms = _nnx_run(model, optimizer, STEPS)
    assert _refresh_steps(h_norms) == [0, 2, 4]
    assert h_norms[-1] > 0 and losses[-1] < losses[0]
    d = sflax.diagnostics(optimizer)
    assert all(type(v) is type(jnp.zeros(())) for v in d.values()), d  # plain arrays
    assert int(d["count"]) == STEPS
    assert float(nnx.as_pure(optimizer.opt_state)[0].label_count) == int(MASK.sum())

    # The same pure function through a hand-written optax loop, the same seed.
    tx = _tx()
    params = params0

    def forward(p):
        return nnx.merge(graphdef, p, rest)(X)

    @jax.jit
    def step(p, s):
        grads = jax.grad(lambda q: _masked_ce(forward(q)))(p)
        updates, s = tx.update(grads, s, p, logits_fn=forward, mask=MASK)
        return optax.apply_updates(p, updates), s

    state = tx.init(params)
    for _ in range(STEPS):
        params, state = step(params, state)
    _assert_trees_equal(nnx.as_pure(nnx.state(model, nnx.Param)), params)
    _assert_trees_equal(nnx.as_pure(optimizer.opt_state), state)


def test_nnx_resume_from_serialized_state_continues_identically():
    def fresh(seed):
        model = TinyLM(nnx.Rngs(seed))
        return model, nnx.Optimizer(model, _tx(), wrt=nnx.Param)

    whole = fresh(0)
    _nnx_run(*whole, STEPS)
    first = fresh(0)
    _nnx_run(*first, 3)
    saved = serialization.to_bytes(nnx.to_pure_dict(nnx.state(first)))
    resumed = fresh(1)  # other weights, overwritten by the checkpoint
    target = nnx.state(resumed)
    nnx.replace_by_pure_dict(target, serialization.from_bytes(nnx.to_pure_dict(target), saved))
    nnx.update(resumed, target)
    _nnx_run(*resumed, STEPS - 3)
    _assert_trees_equal(nnx.as_pure(nnx.state(whole)), nnx.as_pure(nnx.state(resumed)))


def test_nnx_traps_give_clear_errors():
    model = TinyLM(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
    grads = nnx.state(model, nnx.Param)
    with pytest.raises(ValueError, match=r"wrt=optimizer\.wrt"):
        fn = sflax.logits_fn(model, X, wrt=nnx.PathContains("head"))  # not the optimizer's
        optimizer.update(model, grads, logits_fn=fn)
    with pytest.raises(TypeError, match="Invalid model: .*TrainState"):
        sflax.logits_fn(lambda x: x, X)
    with pytest.raises(ValueError, match=r"sophia\.integrations\.flax\.logits_fn\(model, x\)"):
        optimizer.update(model, grads)
    # The natural first try reads the model's own weights, not the ones it is given.
    with pytest.raises(ValueError, match=r"sophia\.integrations\.flax\.logits_fn\(model, x\)"):
        optimizer.update(model, grads, logits_fn=lambda p: model(X))


# --------------------------------------------------------------------------- linen


class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.BatchNorm(use_running_average=not train)(nn.Dense(E)(x))
        return nn.Dense(V)(jnp.tanh(h))


class State(sflax.TrainState):
    batch_stats: dict


FEATURES = jax.random.normal(jax.random.PRNGKey(2), (6, 3))
LABELS = jnp.arange(6) % V


def _linen_init(tx):
    variables = Classifier().init(jax.random.PRNGKey(3), FEATURES)
    return variables["params"], variables["batch_stats"]


def _linen_loss(apply_fn, params, batch_stats):
    logits, new = apply_fn(
        {"params": params, "batch_stats": batch_stats}, FEATURES, train=True,
        mutable=["batch_stats"],
    )  # fmt: skip
    return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean(), new


@jax.jit
def _linen_step(state):
    grads, new = jax.grad(
        lambda p: _linen_loss(state.apply_fn, p, state.batch_stats), has_aux=True
    )(state.params)
    fn = state.logits_fn(
        FEATURES, variables={"batch_stats": state.batch_stats}, train=True,
        mutable=["batch_stats"],
    )  # fmt: skip
    return state.apply_gradients(grads=grads, logits_fn=fn, batch_stats=new["batch_stats"])


def _linen_run(state, steps):
    h_norms = []
    for _ in range(steps):
        state = _linen_step(state)
        h_norms.append(float(sflax.diagnostics(state)["hessian_norm"]))
    return state, h_norms


def test_linen_train_state_forwards_the_refresh_and_equals_a_plain_optax_loop():
    params, batch_stats = _linen_init(_tx())
    state = State.create(
        apply_fn=Classifier().apply, params=params, tx=_tx(), batch_stats=batch_stats
    )
    state, h_norms = _linen_run(state, STEPS)
    assert _refresh_steps(h_norms) == [0, 2, 4] and h_norms[-1] > 0
    assert int(state.step) == STEPS and float(state.opt_state[0].label_count) == FEATURES.shape[0]
    # The batch statistics were replaced by apply_gradients, not frozen.
    assert not np.allclose(np.asarray(state.batch_stats["BatchNorm_0"]["mean"]), 0)

    tx, apply_fn = _tx(), Classifier().apply

    @jax.jit
    def step(p, s, stats):
        grads, new = jax.grad(lambda q: _linen_loss(apply_fn, q, stats), has_aux=True)(p)

        def logits_fn(q):
            variables = {"params": q, "batch_stats": stats}
            return apply_fn(variables, FEATURES, train=True, mutable=["batch_stats"])[0]

        updates, s = tx.update(grads, s, p, logits_fn=logits_fn)
        return optax.apply_updates(p, updates), s, new["batch_stats"]

    p, s, stats = params, tx.init(params), batch_stats
    for _ in range(STEPS):
        p, s, stats = step(p, s, stats)
    _assert_trees_equal((state.params, state.opt_state, state.batch_stats), (p, s, stats))


def test_linen_resume_from_serialized_state_continues_identically():
    params, batch_stats = _linen_init(_tx())

    def fresh():
        return State.create(
            apply_fn=Classifier().apply, params=params, tx=_tx(), batch_stats=batch_stats
        )

    whole, _ = _linen_run(fresh(), STEPS)
    half, _ = _linen_run(fresh(), 3)
    resumed = serialization.from_bytes(fresh(), serialization.to_bytes(half))
    resumed, _ = _linen_run(resumed, STEPS - 3)
    _assert_trees_equal(whole, resumed)


def _as_layout_v1(state_dict, bs):
    """A serialized ScaleBySophiaState as layout version 1 wrote it (configuration fields)."""
    sd = dict(state_dict)
    label_count = sd.pop("label_count")
    scalar = sd["rho"]
    return sd | {
        "b2": np.asarray(0.99, scalar.dtype), "rho0": scalar, "dynamic": np.asarray(False),
        "bs": label_count if bs is None else np.asarray(bs, scalar.dtype),
        "eps": np.asarray(1e-12, scalar.dtype), "step_diagnostics": {}, "bs_from_refresh": {},
    }  # fmt: skip


@pytest.mark.parametrize("bs", [None, 8.0])
def test_a_state_saved_in_layout_version_1_restores(bs):
    """flax checkpoints of the layout that held configuration load into the current one."""
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    tx = sj.sophia_g(0.1, bs=bs, hessian_update_interval=None)
    g = jax.tree.map(jnp.ones_like, params)
    estimate = sj.Estimate(params, 6) if bs is None else params
    _, state = tx.update(g, tx.init(params), params, hessian=estimate)
    saved = serialization.to_state_dict(state)  # the chain's tuple: {"0": Sophia's, ...}
    saved["0"] = _as_layout_v1(saved["0"], bs)
    restored = serialization.from_bytes(tx.init(params), serialization.msgpack_serialize(saved))
    _assert_trees_equal(restored, state)
    saved["0"] = dict(saved["0"], stray=np.zeros(()))
    with pytest.raises(ValueError, match="neither layout version 1 nor 2"):
        serialization.from_bytes(tx.init(params), serialization.msgpack_serialize(saved))


def test_linen_plain_train_state_trap_names_the_fix():
    params, _ = _linen_init(_tx())
    apply_fn = nn.Dense(V).apply
    dense = nn.Dense(V).init(jax.random.PRNGKey(0), FEATURES)["params"]
    plain = train_state.TrainState.create(apply_fn=apply_fn, params=dense, tx=_tx())
    with pytest.raises(ValueError, match=r"sophia\.integrations\.flax\.TrainState"):
        jax.jit(
            lambda s: s.apply_gradients(
                grads=dense, logits_fn=lambda p: apply_fn({"params": p}, FEATURES)
            )
        )(plain)
    fixed = sflax.TrainState.create(apply_fn=apply_fn, params=dense, tx=_tx())
    fixed = jax.jit(lambda s: s.apply_gradients(grads=dense, logits_fn=s.logits_fn(FEATURES)))(
        fixed
    )
    assert float(sflax.diagnostics(fixed)["hessian_norm"]) > 0

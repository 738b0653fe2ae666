"""The narrow optimizer state in sophia.jax against the NumPy spec (sophia.narrow), bit for bit.

The jnp primitives (random bits, stochastic bfloat16 and block8 rounding) equal
the spec's on special values, op by op and jitted. ``sophia_g`` stepped op by
op for 20 steps, refreshed by hand every 2 or 3 steps, holds theta, m and h
(codes and scales of a block8 ``h``) to a NumPy driver of ``spec.sophia_update``
and ``spec.hessian_ema`` with the same forms, seed and step index, for every
pair of forms on float32 parameters, a bfloat16-parameter case and complex
parameters. Jitted (and through ``optax.inject_hyperparams``, whose seed is
traced) it is held to the same bits in a subprocess without fused multiply-adds
(XLA:CPU contracts ``a*b+c`` under jit otherwise, see docs/spec.md). Also: the
built-in GNB refresh into block8, the state's bytes, optax wrappers (chain,
MultiSteps, inject_hyperparams) and bad input.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sophia.jax as sj
from sophia import narrow, spec
from sophia.jax import narrow as jn
from sophia.jax.state import find_states
from tests import block8_cases
from tests.cross.references import through_param_dtype_update
from tests.helpers import BF16, bits, real_view, run_module, ulp_diff

NO_FMA = "--xla_cpu_max_isa=AVX"
MU_FORMS = (None, "float32", "bfloat16")
H_FORMS = (None, "float32", "bfloat16", "block8")
#: 900 coordinates: three whole blocks and a partial one; a scalar; a one-block leaf.
SHAPES = {"w": (3, 300), "s": (), "b": (7,)}
HP = dict(lr=2e-2, b1=0.9, rho=0.05, bs=3.0, weight_decay=0.1, eps=1e-12)
B2 = 0.9
SEED = 12345
STEPS = 20
REFRESH = (0, 2, 5, 7, 10, 12, 15, 17)  # every 2 or 3 steps
#: Jitted in the subprocess: (mu form, h form, parameter dtype, through inject_hyperparams).
#: inject_hyperparams only with float32 parameters: it casts the hyperparameters to the
#: parameters' dtype, which for bfloat16 ones is another lr, b1, rho... than the spec's.
JITTED = [
    (None, "block8", "float32", False),
    ("float32", "bfloat16", "float32", False),
    ("bfloat16", "block8", "float32", True),
    ("bfloat16", "bfloat16", "bfloat16", False),
]


# ----------------------------------------------------------------------------- primitives


def _same(a, b) -> bool:
    """Same dtype, shape and bits (NaN equal to NaN; integer codes compared as values)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return np.array_equal(a, b) if a.dtype.kind == "i" else ulp_diff(a, b) == 0


@pytest.mark.parametrize(
    "seed,step,stream,shape",
    [(0, 0, 0, (3, 5)), (1, 0, 1, (300,)), (2**32 - 1, 10**9, 1, (2, 129)), (7, 3, 0, ()),
     (SEED, 2**31 - 1, 1, (0, 4))],
)  # fmt: skip
def test_random_bits_are_the_spec(seed, step, stream, shape):
    want = narrow.random_bits(seed, step, stream, shape)
    got = jn.random_bits(seed, step, stream, shape)
    assert got.dtype == jnp.uint32 and np.array_equal(np.asarray(got), want)
    traced = jax.jit(jn.random_bits, static_argnums=(2, 3))  # seed and step traced
    got = traced(jnp.asarray(seed, jnp.uint32), jnp.asarray(step % 2**31, jnp.int32), stream, shape)
    assert np.array_equal(np.asarray(got), narrow.random_bits(seed, step % 2**31, stream, shape))


def _special_floats(rng: np.random.Generator) -> np.ndarray:
    tiny, big = np.finfo(np.float32).tiny, np.finfo(np.float32).max
    specials = [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, big, -big, tiny, -tiny, 1e-45,
                -1e-45, 3e-39, -3e-39, 1.0, -1.0, 1.00390625, np.nextafter(big, 0)]  # fmt: skip
    wide = rng.standard_normal(2000) * np.exp(rng.uniform(-100, 88, 2000))
    return np.concatenate([np.array(specials), wide]).astype(np.float32)


@pytest.mark.parametrize("jit", [False, True])
def test_bfloat16_rounding_is_the_spec_on_special_values(jit):
    rng = np.random.default_rng(0)
    x = _special_floats(rng)
    for step in range(4):  # other bits round other values up
        b = narrow.random_bits(3, step, narrow.STREAM_MU, x.shape)
        want = narrow.round_bfloat16(x, b)
        fn = jax.jit(jn.round_bfloat16) if jit else jn.round_bfloat16
        got = np.asarray(fn(jnp.asarray(x), jnp.asarray(b)))
        assert got.dtype == BF16
        finite = ~np.isnan(x)  # NaN equals NaN; its payload is not the spec's
        assert np.array_equal(bits(got)[finite], bits(want)[finite]), step
        assert np.isnan(got[~finite].astype(np.float32)).all()


def _block_cases() -> np.ndarray:
    """Special blocks, then enough blocks that a quotient not rounded correctly would show."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((5, 256)) * np.exp(rng.uniform(-20, 20, (5, 256)))).astype(np.float32)
    x[0] = 0.0  # a zero block
    x[1] = -np.abs(x[1])  # a negative (Hutchinson) block
    x[2, 17] = np.inf  # non-finite blocks decode to NaN
    x[3, 200] = np.nan
    x[4, ::3] = 0.0
    tail = rng.standard_normal(97 * 211) * np.exp(rng.uniform(-20, 20, 97 * 211))
    return np.concatenate([x.reshape(-1), tail.astype(np.float32)])


@pytest.mark.parametrize(
    "shape,jit",
    [((1357,), False), ((), False), ((1357,), True), ((23, 59), True), ((97, 211), True),
     ((), True)],
)  # fmt: skip
def test_block8_is_the_spec(shape, jit):
    size = int(np.prod(shape))
    x = _block_cases()[:size].reshape(shape)
    b = narrow.random_bits(9, 4, narrow.STREAM_HESSIAN, shape)
    want = narrow.encode_block8(x, b)
    enc = jax.jit(jn.encode_block8) if jit else jn.encode_block8
    dec = jax.jit(jn.decode_block8) if jit else jn.decode_block8
    got = enc(jnp.asarray(x), jnp.asarray(b))
    assert _same(got.codes, want.codes) and _same(got.scale, want.scale)
    assert got.scale.shape == (narrow.block_count(size),)
    assert _same(dec(got), narrow.decode_block8(want))


@pytest.mark.parametrize("jit", [False, True])
def test_block8_square_root_edges_are_the_spec(jit):
    """v on, and one ulp either side of, every perfect square, at 127**2 and above it, below 1.

    Subnormal v are left out: XLA:CPU flushes them to zero (docs/spec.md).
    """
    x = block8_cases.square_root_edges(subnormal=False)
    enc = jax.jit(jn.encode_block8) if jit else jn.encode_block8
    dec = jax.jit(jn.decode_block8) if jit else jn.decode_block8
    for b in block8_cases.edge_bits(x):
        want = narrow.encode_block8(x, b)
        got = enc(jnp.asarray(x), jnp.asarray(b))
        assert _same(got.codes, want.codes) and _same(got.scale, want.scale)
        assert _same(dec(got), narrow.decode_block8(want))


def test_sqrt_is_correctly_rounded_next_to_every_square():
    """The premise of the codes' bit equality: XLA's float32 sqrt is NumPy's (correctly rounded)."""
    k = np.arange(1, 16130, dtype=np.float32)
    v = np.concatenate([k, np.nextafter(k, np.float32(0)), np.nextafter(k, np.float32(2**15))])
    v = np.concatenate([v, np.random.default_rng(0).uniform(0, 16130, 200_000).astype(np.float32)])
    for fn in (jnp.sqrt, jax.jit(jnp.sqrt)):
        assert _same(fn(jnp.asarray(v)), np.sqrt(v))


# ----------------------------------------------------------------------------- trajectories


def _problem(dtype, complex_: bool = False) -> tuple[dict, list, list]:
    """Parameters, 20 gradients and the estimates (of both signs, exact zeros) of REFRESH."""
    rng = np.random.default_rng(2)

    def draw(scale, hessian=False):
        out = {}
        for k, s in SHAPES.items():
            parts = []
            for _ in range(2 if complex_ else 1):
                x = rng.standard_normal(s) * scale
                if hessian:
                    x = np.abs(x) * np.exp(rng.uniform(-3, 3, s))
                    x = np.where(rng.random(s) < 0.1, -x, np.where(rng.random(s) < 0.1, 0.0, x))
                parts.append(np.asarray(x))
            x = parts[0] + 1j * parts[1] if complex_ else parts[0]
            out[k] = np.asarray(x, dtype)
        return out

    params = draw(1.0)
    grads = [draw(1e-2) for _ in range(STEPS)]
    h_hats = [draw(1e-2, hessian=True) for _ in range(STEPS)]
    return params, grads, h_hats


def _zeros(form, like: np.ndarray):
    if form == narrow.BLOCK8:
        return narrow.Block8(np.zeros(like.shape, np.int8), np.zeros(narrow.block_count(like.size),
                                                                     np.float32))  # fmt: skip
    return np.zeros(like.shape, {None: like.dtype, "float32": np.float32, "bfloat16": BF16}[form])


def _reference(params, grads, h_hats, mu_form, h_form):
    """The NumPy driver: per step, the refresh's EMA then the update, both with step = t."""
    p = {k: np.asarray(v) for k, v in params.items()}
    m = {k: _zeros(mu_form, v) for k, v in p.items()}
    h = {k: _zeros(h_form, v) for k, v in p.items()}
    trace = []
    for t in range(STEPS):
        n_win = 0
        for k in p:
            if t in REFRESH:
                h[k] = spec.hessian_ema(h[k], h_hats[t][k], B2, hessian_dtype=h_form,
                                        compute=p[k].dtype, seed=SEED, step=t)  # fmt: skip
            new, m[k], w = spec.sophia_update(
                p[k], grads[t][k], m[k], h[k], **HP, mu_dtype=mu_form, seed=SEED, step=t
            )
            p[k] = through_param_dtype_update(p[k], new)
            n_win += w
        trace.append((dict(p), dict(m), dict(h), n_win))
    return trace


def _optimizer(mu_form, h_form, inject: bool = False):
    kw = dict(bs=HP["bs"], eps=HP["eps"], hessian_update_interval=None, mu_dtype=mu_form,
              hessian_dtype=h_form, seed=SEED)  # fmt: skip
    args = (HP["lr"], HP["b1"], B2, HP["rho"], HP["weight_decay"])
    if inject:  # every number (the seed too) becomes an array, traced under jit
        names = ("learning_rate", "b1", "b2", "rho", "weight_decay")
        return optax.inject_hyperparams(sj.sophia_g)(**dict(zip(names, args)), **kw)
    return sj.sophia_g(*args, **kw)


def _core(state):
    return find_states(state)[0]


def _assert_leaf(got, want, what: str) -> None:
    if isinstance(want, narrow.Block8):
        assert isinstance(got, narrow.Block8), what
        assert _same(got.codes, want.codes), f"{what} codes"
        assert _same(got.scale, want.scale), f"{what} scale"
    else:
        assert _same(real_view(got), real_view(want)), what


def check_trajectory(mu_form, h_form, dtype, jit: bool, inject: bool = False) -> None:
    """20 steps of sophia_g (refreshes by hand), every state leaf held to the driver's bits."""
    params, grads, h_hats = _problem(dtype)
    trace = _reference(params, grads, h_hats, mu_form, h_form)
    tx = _optimizer(mu_form, h_form, inject)

    def step(p, s, g, h_hat):
        u, s = tx.update(g, s, p) if h_hat is None else tx.update(g, s, p, hessian=h_hat)
        return optax.apply_updates(p, u), s

    step = jax.jit(step) if jit else step
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(p)
    n_total = sum(int(np.prod(s)) for s in SHAPES.values())
    for t in range(STEPS):
        h_hat = {k: jnp.asarray(v) for k, v in h_hats[t].items()} if t in REFRESH else None
        p, state = step(p, state, {k: jnp.asarray(v) for k, v in grads[t].items()}, h_hat)
        want_p, want_m, want_h, n_win = trace[t]
        core = _core(state)
        for k in SHAPES:
            where = f"mu={mu_form} h={h_form} {np.dtype(dtype).name} jit={jit} step {t} {k}"
            _assert_leaf(p[k], want_p[k], f"theta, {where}")
            _assert_leaf(core.mu[k], want_m[k], f"m, {where}")
            _assert_leaf(core.hessian[k], want_h[k], f"h, {where}")
        assert float(core.win_rate) == spec.win_rate(n_win, n_total), t
        h_values = [narrow.decode(v, np.float64) for v in want_h.values()]
        norm = np.sqrt(sum(np.sum(np.square(v)) for v in h_values))
        assert float(core.hessian_norm) == pytest.approx(norm, rel=1e-5), t


@pytest.mark.parametrize("h_form", H_FORMS, ids=str)
@pytest.mark.parametrize("mu_form", MU_FORMS, ids=str)
def test_op_by_op_trajectory_is_the_spec_bit_for_bit(mu_form, h_form):
    check_trajectory(mu_form, h_form, np.float32, jit=False)


@pytest.mark.parametrize("mu_form,h_form", [("bfloat16", "block8"), (None, "bfloat16")])
def test_op_by_op_bfloat16_parameters_are_the_spec_bit_for_bit(mu_form, h_form):
    check_trajectory(mu_form, h_form, BF16, jit=False)


def test_op_by_op_inject_hyperparams_is_the_spec_bit_for_bit():
    check_trajectory("bfloat16", "block8", np.float32, jit=False, inject=True)


def test_jitted_without_fma_is_the_spec_bit_for_bit():
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {NO_FMA}".strip())
    proc = run_module("tests.jax.test_jax_narrow", env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("ok ") == len(JITTED), proc.stdout


def test_complex_parameters_take_float32_forms(x64):
    """complex128 with float32 forms: complex64 state, the spec on real pairs, bit for bit."""
    params, grads, h_hats = _problem(np.complex128, complex_=True)
    tx = _optimizer("float32", "float32")
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(p)
    m = {k: _zeros("float32", real_view(v)) for k, v in params.items()}
    h = {k: _zeros("float32", real_view(v)) for k, v in params.items()}
    ref = {k: real_view(v) for k, v in params.items()}
    for t in range(4):
        hh = {k: jnp.asarray(v) for k, v in h_hats[t].items()} if t % 2 == 0 else None
        u, state = tx.update({k: jnp.asarray(v) for k, v in grads[t].items()}, state, p, hessian=hh)
        p = optax.apply_updates(p, u)
        for k in SHAPES:
            if hh is not None:
                h[k] = spec.hessian_ema(h[k], real_view(h_hats[t][k]), B2, hessian_dtype="float32",
                                        compute=np.float64, seed=SEED, step=t)  # fmt: skip
            ref[k], m[k], _ = spec.sophia_update(ref[k], real_view(grads[t][k]), m[k], h[k], **HP,
                                                 mu_dtype="float32", seed=SEED, step=t)  # fmt: skip
            core = _core(state)
            assert core.mu[k].dtype == core.hessian[k].dtype == jnp.complex64
            assert _same(real_view(p[k]), ref[k]), (t, k)
            assert _same(real_view(core.mu[k]), m[k]) and _same(real_view(core.hessian[k]), h[k])


# ----------------------------------------------------------------------------- the rest


def _logits_problem():
    rng = np.random.default_rng(4)
    params = {"w": jnp.asarray(rng.standard_normal((6, 300)).astype(np.float32) * 0.1)}
    x = jnp.asarray(rng.standard_normal((16, 6)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 300, 16))

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(x @ p["w"], y).mean()

    return params, lambda p: x @ p["w"], loss


def test_builtin_gnb_refresh_into_block8_is_the_spec():
    params, logits_fn, loss = _logits_problem()
    tx = sj.sophia_g(1e-2, hessian_update_interval=2, hessian_dtype="block8", seed=SEED)
    state = tx.init(params)
    key = _core(state).key
    h = _zeros("block8", np.asarray(params["w"]))
    for t in range(3):
        p0 = params
        u, state = tx.update(jax.grad(loss)(params), state, params, logits_fn=logits_fn)
        params = optax.apply_updates(params, u)
        if t % 2 == 0:  # the refresh at the start of step t, from the parameters before it
            key, sub = jax.random.split(key)
            h_hat = sj.gnb(p0, sub, logits_fn=logits_fn)["w"]
            h = spec.hessian_ema(h, np.asarray(h_hat), 0.99, hessian_dtype="block8",
                                 compute=np.float32, seed=SEED, step=t)  # fmt: skip
        got = _core(state).hessian["w"]
        _assert_leaf(got, h, f"h step {t}")
    assert np.count_nonzero(np.asarray(got.codes)) > 0
    norm = np.linalg.norm(narrow.decode_block8(h))
    assert norm > 0 and float(sj.diagnostics(state)["hessian_norm"]) == pytest.approx(norm, 1e-6)


@pytest.mark.parametrize("h_form", H_FORMS, ids=str)
@pytest.mark.parametrize("mu_form", MU_FORMS, ids=str)
def test_state_dtypes_and_bytes(mu_form, h_form):
    params = {"w": jnp.zeros((3, 300), jnp.float32), "b": jnp.zeros(7, BF16)}
    core = _core(sj.sophia_g(mu_dtype=mu_form, hessian_dtype=h_form).init(params))
    for k, p in params.items():
        mu, h = core.mu[k], core.hessian[k]
        assert mu.nbytes == narrow.state_bytes(p.size, mu_form, p.dtype.itemsize)
        leaves = jax.tree.leaves(h)
        assert sum(x.nbytes for x in leaves) == narrow.state_bytes(p.size, h_form, p.dtype.itemsize)
        if h_form == "block8":
            assert h.codes.dtype == jnp.int8 and h.codes.shape == p.shape
            assert h.scale.dtype == jnp.float32 and h.scale.shape == (narrow.block_count(p.size),)
        if mu_form == "bfloat16":
            assert mu.dtype == jnp.bfloat16 and mu.nbytes == 2 * p.size
    assert narrow.state_bytes(900, "block8", 4) == 900 + 4 * 4


def test_chain_carries_the_narrow_state_bit_for_bit():
    """A transform chained in front (clipping that does not trigger) changes no bit of the state."""
    params, grads, h_hats = _problem(np.float32)
    plain = _optimizer("bfloat16", "block8")
    chained = optax.chain(optax.clip_by_global_norm(1e9), plain)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    states = [plain.init(p), chained.init(p)]
    for t in range(4):
        g = {k: jnp.asarray(v) for k, v in grads[t].items()}
        hh = {k: jnp.asarray(v) for k, v in h_hats[t].items()} if t % 2 == 0 else None
        outs = [tx.update(g, s, p, hessian=hh) for tx, s in zip((plain, chained), states)]
        states = [s for _, s in outs]
        a, b = (_core(s) for s in states)
        for k in SHAPES:
            assert _same(outs[0][0][k], outs[1][0][k]) and _same(a.mu[k], b.mu[k]), (t, k)
            assert _same(a.hessian[k].codes, b.hessian[k].codes), (t, k)
            assert _same(a.hessian[k].scale, b.hessian[k].scale), (t, k)
        p = optax.apply_updates(p, outs[0][0])


def test_multisteps_and_inject_hyperparams_carry_the_narrow_state():
    """Jitted with the built-in GNB refresh (their inner update runs under lax.cond or traced)."""
    params, logits_fn, loss = _logits_problem()
    kw = dict(hessian_update_interval=2, mu_dtype="bfloat16", hessian_dtype="block8", seed=SEED)
    for tx, inner_steps in (
        (optax.MultiSteps(sj.sophia_g(1e-2, **kw), every_k_schedule=2), 2),
        (optax.inject_hyperparams(sj.sophia_g)(learning_rate=1e-2, **kw), 4),
    ):
        p, state = params, tx.init(params)
        step = jax.jit(lambda p, s, tx=tx: tx.update(jax.grad(loss)(p), s, p, logits_fn=logits_fn))
        for _ in range(4):
            u, state = step(p, state)
            p = optax.apply_updates(p, u)
        core = _core(state)
        assert int(core.count) == inner_steps
        assert core.mu["w"].dtype == jnp.bfloat16 and isinstance(core.hessian["w"], narrow.Block8)
        assert np.count_nonzero(np.asarray(core.hessian["w"].codes)) > 0
        norm = np.linalg.norm(narrow.decode_block8(jax.device_get(core.hessian["w"])))
        assert float(core.hessian_norm) == pytest.approx(norm, rel=1e-5)
        assert bool(jnp.all(jnp.isfinite(p["w"])))
        assert not np.array_equal(np.asarray(p["w"]), np.asarray(params["w"]))


@pytest.mark.parametrize(
    "kwargs,needle",
    [({"mu_dtype": "block8"}, "Invalid mu_dtype: 'block8' (allowed: None"),
     ({"hessian_dtype": "float16"}, "Invalid hessian_dtype: 'float16' (allowed: None"),
     ({"mu_dtype": jnp.float16}, "Invalid mu_dtype"),
     ({"seed": -1}, "Invalid seed: -1 (allowed: an integer in [0, 2**32))"),
     ({"seed": 2**32}, "Invalid seed"),
     ({"seed": 1.5}, "Invalid seed: 1.5"),
     ({"seed": jax.random.PRNGKey(0), "hessian_dtype": "block8"}, "Invalid seed: a PRNG key")],
)  # fmt: skip
def test_bad_forms_and_seeds_name_the_argument(kwargs, needle):
    with pytest.raises(ValueError) as err:
        sj.sophia_g(**kwargs)
    assert needle in str(err.value)
    with pytest.raises(ValueError) as err:
        sj.scale_by_sophia(hessian_update_interval=None, **kwargs)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "name,form",
    [("mu_dtype", "bfloat16"), ("hessian_dtype", "bfloat16"), ("hessian_dtype", "block8")],
)
def test_stochastic_forms_on_complex_parameters_are_refused(name, form):
    tx = sj.sophia_g(hessian_update_interval=None, **{name: form})
    params = {"r": jnp.ones(3), "c": jnp.ones(3, jnp.complex64)}
    with pytest.raises(ValueError) as err:
        tx.init(params)
    want = f"Invalid {name}: {form} for a complex64 parameter (allowed: None or 'float32'"
    assert want in str(err.value)


def test_a_prng_key_still_seeds_the_sampling_without_stochastic_forms():
    params, logits_fn, loss = _logits_problem()
    tx = sj.sophia_g(1e-2, hessian_update_interval=1, mu_dtype="float32", seed=jax.random.key(3))
    state = tx.init(params)
    _, state = tx.update(jax.grad(loss)(params), state, params, logits_fn=logits_fn)
    assert float(_core(state).hessian_norm) > 0


if __name__ == "__main__":  # the jitted checks, in a process started with NO_FMA
    assert NO_FMA in os.environ.get("XLA_FLAGS", ""), "run under XLA_FLAGS=" + NO_FMA
    for mu_form, h_form, dtype, inject in JITTED:
        check_trajectory(mu_form, h_form, np.dtype(BF16 if dtype == "bfloat16" else dtype),
                         jit=True, inject=inject)  # fmt: skip
        print(f"ok mu={mu_form} h={h_form} {dtype} inject={inject}", flush=True)
    sys.exit(0)

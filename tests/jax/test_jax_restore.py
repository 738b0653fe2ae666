"""sj.state_from_raw: orbax checkpoints restored without a target, in this layout and the last."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sophia.jax as sj
from sophia import spec
from sophia.jax.restore import V1_CONFIG_FIELDS


class _V1State(NamedTuple):
    """ScaleBySophiaState as layout version 1 wrote it: configuration among the fields."""

    count: Any
    mu: Any
    hessian: Any
    key: Any
    rho: Any
    win_rate: Any
    hessian_norm: Any
    momentum_norm: Any
    b2: Any
    rho0: Any
    dynamic: Any
    bs: Any
    eps: Any
    step_diagnostics: Any
    bs_from_refresh: Any


def _trained(tx, steps=3):
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    state = tx.init(params)
    for t in range(steps):
        grads = jax.tree.map(lambda p, t=t: jnp.sin(p + t), params)
        h_hat = jax.tree.map(lambda p: p * p + 1.0, params)
        updates, state = tx.update(grads, state, params, hessian=h_hat)
        params = optax.apply_updates(params, updates)
    return params, state


def _save_and_restore_raw(tmp_path, tree):
    ocp = pytest.importorskip("orbax.checkpoint")
    ckptr = ocp.PyTreeCheckpointer()
    ckptr.save(tmp_path / "ckpt", tree)
    return ckptr.restore(tmp_path / "ckpt")


def _assert_same(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert np.asarray(x).dtype == np.asarray(y).dtype


def _tx(bs=None, **kw):
    return sj.sophia_g(0.1, bs=bs, hessian_update_interval=None, weight_decay=0.1, **kw)


@pytest.mark.parametrize("bs", [None, 8.0])
def test_a_raw_restore_of_this_layout_is_the_state(tmp_path, bs):
    tx = _tx(bs, mu_dtype="bfloat16", hessian_dtype="block8")
    params, state = _trained(tx)
    back = sj.state_from_raw(_save_and_restore_raw(tmp_path, state), tx.init(params))
    _assert_same(back, state)
    # and it steps on exactly as the original does
    g = jax.tree.map(jnp.cos, params)
    _assert_same(tx.update(g, back, params)[0], tx.update(g, state, params)[0])


@pytest.mark.parametrize("bs", [None, 8.0])
def test_a_layout_1_state_restores_into_this_layout(tmp_path, bs):
    tx = _tx(bs)
    params, state = _trained(tx)
    s = state[0]
    in_force = s.label_count if bs is None else jnp.float32(bs)
    old = _V1State(
        *s[:8],
        b2=jnp.float32(0.99),
        rho0=jnp.float32(0.04),
        dynamic=False,
        bs=in_force,
        eps=jnp.float32(spec.DEFAULTS.eps),
        step_diagnostics=True,
        bs_from_refresh=bs is None,
    )
    assert set(old._fields) - set(s._fields) == set(V1_CONFIG_FIELDS)
    raw = _save_and_restore_raw(tmp_path, (old, *state[1:]))
    back = sj.state_from_raw(raw, tx.init(params))
    _assert_same(back, state)


def test_an_unknown_layout_names_both_versions(tmp_path):
    tx = _tx()
    params, state = _trained(tx)
    raw = _save_and_restore_raw(tmp_path, state)
    raw[0]["unexpected"] = raw[0].pop("rho")
    with pytest.raises(ValueError, match="neither layout version 1 nor 2"):
        sj.state_from_raw(raw, tx.init(params))


def test_a_raw_tree_of_another_optimizer_is_refused_naming_where(tmp_path):
    tx = _tx()
    params, _ = _trained(tx)
    raw = _save_and_restore_raw(tmp_path, optax.adam(0.1).init(params))
    with pytest.raises(ValueError, match=r"sophia: state should hold 4 entries"):
        sj.state_from_raw(raw, tx.init(params))

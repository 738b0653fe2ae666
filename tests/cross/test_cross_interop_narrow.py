"""sophia.interop with narrow state: it crosses bit for bit, and forms change only when asked."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

import sophia.jax as sj
from sophia import interop, narrow
from sophia.interop import forms
from sophia.torch import SophiaG
from tests.cross.drivers import JaxDriver, TorchDriver, group, run
from tests.cross.problems import LeastSquares
from tests.cross.test_cross_narrow import case, parts
from tests.helpers import tree_ulp

K = 3
CASES = ["mlp-bf16", "least-squares-block8"]


def _hp(g):
    return {k: g[k] for k in interop.RECORDED_KEYS if k in g}


def _summary(d):
    return parts(d.params()), parts(d.mu()), parts(d.hessian()), d.rhos(), d.win_rates()


def _same(a, b):
    """0 and True where two runs hold the same bits (codes compared exactly)."""
    ulp = max(tree_ulp(x, y) if "codes" not in str(x.keys()) else _codes(x, y)
              for x, y in zip(a[:3], b[:3]))  # fmt: skip
    return ulp, a[3] == b[3] and a[4] == b[4]


def _codes(x, y):
    assert x.keys() == y.keys()
    return max(
        int(np.max(np.abs(x[k].astype(np.int64) - y[k].astype(np.int64)), initial=0))
        if x[k].dtype == np.int8 else tree_ulp({k: x[k]}, {k: y[k]})
        for k in x
    )  # fmt: skip


# op-by-op JAX's narrow steps are slow (see test_cross_narrow): the block8 case only this way
@pytest.mark.parametrize("name", ["least-squares-block8"])
def test_narrow_torch_then_jax_is_40_jax_steps(name, tmp_path, cross_report):
    prob, groups = case(name)
    full = JaxDriver(prob.params0, groups)
    run(full, prob.params0, prob.grad, prob.hhat, 40, K)
    first = TorchDriver(prob.params0, groups, "foreach")
    run(first, prob.params0, prob.grad, prob.hhat, 20, K)
    ckpt = interop.from_torch(first.opt, first.order)
    assert {k: ckpt.groups[0].hyperparams[k] for k in interop.NARROW_KEYS} == {
        "mu_dtype": groups[0]["mu_dtype"], "hessian_dtype": groups[0]["hessian_dtype"],
        "seed": groups[0]["seed"]}  # fmt: skip
    interop.save(tmp_path / "opt.safetensors", ckpt)
    for via_file in (False, True):
        if via_file:
            ckpt = interop.load(tmp_path / "opt.safetensors")
        second = JaxDriver(first.params(), groups)
        hps = [_hp(g) for g in groups]
        second.state = interop.to_jax(ckpt, second.state, second.p, hyperparams=hps)
        run(second, None, prob.grad, prob.hhat, 20, K, start=20)
        ulp, scalars = _same(_summary(second), _summary(full))
        cross_report(f"{name}: 20 torch -> {'file -> ' if via_file else ''}20 jax", "resumed",
                     "40 jax", ulp, None, "0 ulp")  # fmt: skip
        assert ulp == 0 and scalars


@pytest.mark.parametrize("name", CASES)
def test_narrow_jax_then_torch_is_40_torch_steps(name, tmp_path, cross_report):
    prob, groups = case(name)
    full = TorchDriver(prob.params0, groups, "loop")
    run(full, prob.params0, prob.grad, prob.hhat, 40, K)
    first = JaxDriver(prob.params0, groups)
    run(first, prob.params0, prob.grad, prob.hhat, 20, K)
    ckpt = interop.from_jax(first.state, first.p, hyperparams=[_hp(g) for g in groups])
    interop.save(tmp_path / "opt.safetensors", ckpt)
    for via_file in (False, True):
        if via_file:
            ckpt = interop.load(tmp_path / "opt.safetensors")
        second = TorchDriver(first.params(), groups, "foreach")
        interop.to_torch(ckpt, second.opt, second.order)
        st = second.opt.state[second.t[second.order[0]]]
        assert st["exp_avg"].dtype == torch.bfloat16  # the forms survive load_state_dict
        run(second, None, prob.grad, prob.hhat, 20, K, start=20)
        ulp, scalars = _same(_summary(second), _summary(full))
        cross_report(f"{name}: 20 jax -> {'file -> ' if via_file else ''}20 torch", "resumed",
                     "40 torch", ulp, None, "0 ulp")  # fmt: skip
        assert ulp == 0 and scalars


# ---------------------------------------------------------------------- forms


def _torch_opt(shapes=((300,), (3,)), **kw):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = SophiaG(params, lr=0.1, bs=1.0, **kw)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.update_hessian(hessian=[torch.rand_like(p) for p in params])
    opt.step()
    opt.update_hessian(hessian=[torch.rand_like(p) for p in params])
    opt.step()
    return opt, ["a", "b"]


def _state_bytes(opt):
    sd = opt.state_dict()
    return repr(
        {k: {n: (v.dtype, v.tolist()) for n, v in s.items()} for k, s in sd["state"].items()}
    )


def test_forms_differ_is_refused_naming_both_unless_asked():
    src, names = _torch_opt(mu_dtype="bfloat16", hessian_dtype="block8", seed=7)
    ckpt = interop.from_torch(src, names)
    dst, _ = _torch_opt(hessian_dtype="bfloat16", seed=7)
    before = _state_bytes(dst)
    with pytest.raises(ValueError, match=r"mu_dtype: checkpoint 'bfloat16' vs None"):
        interop.to_torch(ckpt, dst, names)
    assert _state_bytes(dst) == before
    params = {"a": jnp.zeros(300), "b": jnp.zeros(3)}
    tx = sj.sophia_g(0.1, bs=1.0, hessian_update_interval=None, mu_dtype="bfloat16", seed=7)
    with pytest.raises(ValueError, match=r"hessian_dtype: checkpoint 'block8' vs None"):
        interop.to_jax(ckpt, tx.init(params), params)
    with pytest.raises(ValueError, match=r"seed: checkpoint 7 vs 8"):
        interop.to_jax(ckpt, tx.init(params), params, hyperparams={"seed": 8})
    # same storage, other rounding: bfloat16 parameters, None (nearest) vs 'bfloat16'
    bf, _ = _torch_opt()
    bf = SophiaG([torch.nn.Parameter(torch.zeros(300, dtype=torch.bfloat16)),
                  torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))], lr=0.1, bs=1.0,
                 mu_dtype="bfloat16", hessian_dtype="bfloat16", seed=7)  # fmt: skip
    bf_ckpt = interop.from_torch(bf, names)
    other = SophiaG([torch.nn.Parameter(torch.zeros(300, dtype=torch.bfloat16)),
                     torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))], lr=0.1, bs=1.0,
                    seed=7)  # fmt: skip
    with pytest.raises(ValueError, match=r"mu_dtype: checkpoint 'bfloat16' vs None"):
        interop.to_torch(bf_ckpt, other, names)
    interop.to_torch(bf_ckpt, other, names, convert_forms=True)  # same bits, carried


def test_convert_forms_reencodes_as_the_spec_says_in_both_frameworks():
    src, names = _torch_opt(mu_dtype="bfloat16", hessian_dtype="block8", seed=7)
    ckpt = interop.from_torch(src, names)
    g = ckpt.groups[0]
    dst, _ = _torch_opt(mu_dtype="float32", hessian_dtype="bfloat16", seed=9)
    with pytest.raises(ValueError, match="seed: checkpoint 7 vs 9"):  # a seed is no form
        interop.to_torch(ckpt, dst, names, convert_forms=True)
    interop.to_torch(ckpt, dst, names, convert_forms=True, check_hyperparams=False)
    params = {"a": jnp.zeros(300), "b": jnp.zeros(3)}
    tx = sj.sophia_g(0.1, bs=1.0, hessian_update_interval=None, mu_dtype="float32",
                     hessian_dtype="bfloat16", seed=9)  # fmt: skip
    state = interop.to_jax(ckpt, tx.init(params), params, convert_forms=True,
                           check_hyperparams=False, hyperparams={"seed": 9})  # fmt: skip
    for n, p in zip(names, dst.param_groups[0]["params"]):
        # independently: the spec's decode, then its encode with the target's seed at step - 1
        m_want = narrow.decode(g.array("mu", n), np.float32)
        h_want = narrow.encode(narrow.decode(g.array("hessian", n), np.float32), "bfloat16",
                               np.float32, 9, g.step - 1, narrow.STREAM_HESSIAN)  # fmt: skip
        st = dst.state[p]
        assert st["exp_avg"].dtype == torch.float32 and st["hessian"].dtype == torch.bfloat16
        np.testing.assert_array_equal(st["exp_avg"].numpy(), m_want)
        got_h = st["hessian"].view(torch.int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(got_h, h_want.view(np.uint16))
        np.testing.assert_array_equal(np.asarray(state[0].mu[n]), m_want)
        np.testing.assert_array_equal(np.asarray(state[0].hessian[n]).view(np.uint16),
                                      h_want.view(np.uint16))  # fmt: skip
    assert "hessian_scale" not in dst.state[dst.param_groups[0]["params"][0]]


# ---------------------------------------------------------------------- files


def _raw(path):
    with safe_open(os.fspath(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def test_block8_file_layout_and_bad_block8_files(tmp_path):
    src, names = _torch_opt(hessian_dtype="block8", seed=3)
    good = tmp_path / "good.safetensors"
    interop.save(good, interop.from_torch(src, names))
    tensors, meta = _raw(good)
    assert meta["format_version"] == "2" and tensors["hessian/a"].dtype == np.int8
    assert tensors["hessian_scale/a"].shape == (narrow.block_count(300),)
    header = json.loads(meta["sophia"])["groups"][0]
    assert header["dtypes"]["hessian/a"] == "block8" and header["hyperparams"]["seed"] == 3
    corruptions = {
        "scale-length": (lambda t: t.update({"hessian_scale/a": np.zeros(5, np.float32)}),
                         r"block8 scales must be float32 of shape \(2,\)"),
        "code-128": (lambda t: t["hessian/a"].__setitem__(0, -128), r"codes must lie in"),
        "no-scale": (lambda t: t.pop("hessian_scale/a"), "missing tensors"),
    }  # fmt: skip
    for what, (corrupt, match) in corruptions.items():
        t = {k: v.copy() for k, v in tensors.items()}
        corrupt(t)
        save_file(t, os.fspath(tmp_path / f"{what}.safetensors"), metadata=meta)
        with pytest.raises(ValueError, match=match):
            interop.load(tmp_path / f"{what}.safetensors")


def test_version_1_files_still_load_and_hold_no_narrow_state(tmp_path):
    src, names = _torch_opt()
    interop.save(tmp_path / "v2.safetensors", interop.from_torch(src, names))
    tensors, meta = _raw(tmp_path / "v2.safetensors")
    header = json.loads(meta["sophia"])
    for g in header["groups"]:  # what version 1 wrote
        for k in interop.NARROW_KEYS:
            del g["hyperparams"][k]
    v1 = dict(meta, format_version="1", sophia=json.dumps(header))
    save_file(tensors, os.fspath(tmp_path / "v1.safetensors"), metadata=v1)
    ckpt = interop.load(tmp_path / "v1.safetensors")
    assert ckpt.groups[0].hyperparams["mu_dtype"] is None
    dst, _ = _torch_opt()
    interop.to_torch(ckpt, dst, names)
    assert _state_bytes(dst) == _state_bytes(src)
    header["groups"][0]["dtypes"]["hessian/a"] = "block8"
    save_file(tensors, os.fspath(tmp_path / "bad.safetensors"),
              metadata=dict(v1, sophia=json.dumps(header)))  # fmt: skip
    with pytest.raises(ValueError, match="a version-1 file holds no narrow state"):
        interop.load(tmp_path / "bad.safetensors")


# ---------------------------------------------------------------------- other checkpointers


def test_orbax_round_trip_of_a_narrow_jax_state(tmp_path):
    import orbax.checkpoint as ocp

    params = {"w": jnp.linspace(-1.0, 1.0, 300), "b": jnp.ones(3)}
    tx = sj.sophia_g(0.1, rho=0.05, bs=1.0, hessian_update_interval=None, mu_dtype="bfloat16",
                     hessian_dtype="block8", seed=5)  # fmt: skip
    g = jax.tree.map(lambda x: x * 0.1 + 0.3, params)
    _, state = tx.update(g, tx.init(params), params, hessian=jax.tree.map(jnp.abs, params))
    assert isinstance(state[0].hessian["w"], narrow.Block8)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "orbax", state)
    ckptr.wait_until_finished()
    like = jax.tree.map(ocp.utils.to_shape_dtype_struct, tx.init(params))
    restored = ckptr.restore(tmp_path / "orbax", like)
    assert isinstance(restored[0].hessian["w"], narrow.Block8)
    assert restored[0].mu["w"].dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    h = jax.tree.map(lambda x: jnp.abs(x) + 1, params)
    u1, s1 = tx.update(g, state, params, hessian=h)
    u2, s2 = tx.update(g, restored, params, hessian=h)
    for a, b in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u2, s2)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert interop.from_jax(restored, params).groups[0].dtypes["hessian/w"] == "block8"


def test_torch_save_of_a_narrow_torch_state(tmp_path):
    prob = LeastSquares(n=32, d=300, seed=5)
    groups = [group(list(prob.params0), lr=0.01, rho=0.05, weight_decay=0.01,
                    mu_dtype="bfloat16", hessian_dtype="block8", seed=4)]  # fmt: skip
    t = TorchDriver(prob.params0, groups, "foreach")
    run(t, prob.params0, prob.grad, prob.hhat, 7, K)
    torch.save(t.opt.state_dict(), tmp_path / "opt.pt")
    t2 = TorchDriver(t.params(), groups, "foreach")
    t2.opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    st = t2.opt.state[t2.t["w"]]
    assert st["hessian"].dtype == torch.int8 and st["exp_avg"].dtype == torch.bfloat16
    for d in (t, t2):
        run(d, None, prob.grad, prob.hhat, 8, K, start=7)
    assert _same(_summary(t), _summary(t2)) == (0, True)
    assert forms.array_shape(interop.from_torch(t2.opt, t2.order).groups[0].hessian["w"]) == (300,)

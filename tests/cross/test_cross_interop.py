"""sophia.interop: state that moves between frameworks continues the same trajectory."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from safetensors.numpy import save_file

import sophia.jax as sj
from sophia import interop
from sophia.torch import SophiaG
from tests.cross.drivers import JaxDriver, TorchDriver, group, run
from tests.cross.problems import MLP, LeastSquares
from tests.helpers import BF16, tree_ulp

K = 5


def _mlp_groups():
    return [
        group(["fc1.weight", "fc2.weight"], lr=0.02, rho=0.04, weight_decay=0.1, bs=48.0,
              dynamic=True),
        group(["fc1.bias", "fc2.bias"], lr=0.01, b1=0.95, b2=0.98, rho=0.02, bs=48.0),
    ]  # fmt: skip


def _hp(g):
    return {k: g[k] for k in interop.HYPERPARAM_KEYS}


def _summary(d):
    return d.params(), d.mu(), d.hessian(), d.rhos(), d.win_rates()


def _same(a, b):
    ulp = max(tree_ulp(x, y) for x, y in zip(a[:3], b[:3]))
    return ulp, a[3] == b[3] and a[4] == b[4]


def test_torch_then_jax_continues_the_jax_trajectory(tmp_path, cross_report):
    """20 torch steps, convert (in memory, and through a file), 20 JAX steps = 40 JAX steps."""
    prob, groups = MLP(seed=7), _mlp_groups()
    full = JaxDriver(prob.params0, groups)
    run(full, prob.params0, prob.grad, prob.hhat, 40, K)
    assert len(set(full.rhos())) == 2  # the dynamic group's rho moved
    first = TorchDriver(prob.params0, groups, "foreach")
    run(first, prob.params0, prob.grad, prob.hhat, 20, K)
    ckpt = interop.from_torch(first.opt, first.order)
    interop.save(tmp_path / "opt.safetensors", ckpt)
    for via_file in (False, True):
        if via_file:
            ckpt = interop.load(tmp_path / "opt.safetensors")
        second = JaxDriver(first.params(), groups)
        second.state = interop.to_jax(ckpt, second.state, second.p)
        assert [int(s.count) for s in second.sophia_states()] == [20, 20]
        run(second, None, prob.grad, prob.hhat, 20, K, start=20)
        ulp, scalars = _same(_summary(second), _summary(full))
        cross_report(f"20 torch -> {'file -> ' if via_file else ''}20 jax", "resumed", "40 jax",
                     ulp, None, "0 ulp")  # fmt: skip
        assert ulp == 0 and scalars


def test_jax_then_torch_continues_the_torch_trajectory(tmp_path, cross_report):
    """20 JAX steps, convert (in memory, and through a file), 20 torch steps = 40 torch steps."""
    prob, groups = MLP(seed=8), _mlp_groups()
    full = TorchDriver(prob.params0, groups, "loop")
    run(full, prob.params0, prob.grad, prob.hhat, 40, K)
    first = JaxDriver(prob.params0, groups)
    run(first, prob.params0, prob.grad, prob.hhat, 20, K)
    hps = [_hp(g) for g in groups]  # one per Sophia state, in the state's order
    ckpt = interop.from_jax(first.state, first.p, hyperparams=hps)
    interop.save(tmp_path / "opt.safetensors", ckpt)
    for via_file in (False, True):
        if via_file:
            ckpt = interop.load(tmp_path / "opt.safetensors")
        second = TorchDriver(first.params(), groups, "fused" if via_file else "foreach")
        interop.to_torch(ckpt, second.opt, second.order)
        run(second, None, prob.grad, prob.hhat, 20, K, start=20)
        ulp, scalars = _same(_summary(second), _summary(full))
        cross_report(f"20 jax -> {'file -> ' if via_file else ''}20 torch", "resumed",
                     "40 torch", ulp, None, "0 ulp")  # fmt: skip
        assert ulp == 0 and scalars
        steps = {float(second.opt.state[p]["step"]) for p in second.t.values()}
        assert steps == {40.0}


def test_bfloat16_state_crosses_bit_for_bit(tmp_path):
    prob = LeastSquares(dtype=BF16)
    groups = [group(list(prob.params0), lr=0.01, rho=0.05, weight_decay=0.01, dynamic=True)]
    t = TorchDriver(prob.params0, groups)
    run(t, prob.params0, prob.grad, prob.hhat, 25, K)
    interop.save(tmp_path / "bf16.safetensors", interop.from_torch(t.opt, t.order))
    ckpt = interop.load(tmp_path / "bf16.safetensors")
    assert ckpt.groups[0].dtypes["mu/w"] == "bfloat16"
    j = JaxDriver(t.params(), groups)
    j.state = interop.to_jax(ckpt, j.state, j.p)
    assert tree_ulp(j.mu(), t.mu()) == 0 and tree_ulp(j.hessian(), t.hessian()) == 0
    assert j.mu()["w"].dtype == BF16
    run(j, None, prob.grad, prob.hhat, 10, K, start=25)
    run(t, None, prob.grad, prob.hhat, 10, K, start=25)
    assert tree_ulp(j.params(), t.params()) == 0


def test_prng_key_and_schedule_counter_survive_a_round_trip(tmp_path):
    """The built-in GNB refresh samples with the state's key: resuming reproduces the draws."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 3)), jnp.float32)
    params = {"dense": {"kernel": jnp.ones((3, 4)) * 0.1, "bias": jnp.zeros(4)}}

    def logits_fn(p):
        return x @ p["dense"]["kernel"] + p["dense"]["bias"]

    sched = optax.linear_schedule(0.1, 0.01, 12)
    for key in (3, jax.random.key(3)):  # a raw uint32 key and a typed key
        tx = sj.sophia_g(sched, rho=0.05, bs=16.0, hessian_update_interval=2, seed=key)

        @jax.jit
        def step(p, s, tx=tx):
            g = jax.grad(lambda q: jnp.mean(logits_fn(q) ** 2))(p)
            u, s = tx.update(g, s, p, logits_fn=logits_fn)
            return optax.apply_updates(p, u), s

        p, s = params, tx.init(params)
        for _ in range(6):
            p, s = step(p, s)
        interop.save(tmp_path / "k.safetensors", interop.from_jax(s, p))
        ckpt = interop.load(tmp_path / "k.safetensors")
        assert ckpt.names == ["dense.bias", "dense.kernel"]
        s2 = interop.to_jax(ckpt, tx.init(params), p)
        assert int(s2[2].count) == 6  # the schedule's counter follows the step
        p2 = p
        for _ in range(6):
            p, s = step(p, s)
            p2, s2 = step(p2, s2)
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p2)):
            np.testing.assert_array_equal(a, b)
        fresh = interop.to_jax(interop.load(tmp_path / "k.safetensors"), tx.init(params), params)
        assert not np.array_equal(jax.random.key_data(fresh[0].key), jax.random.key_data(
            tx.init(params)[0].key))  # fmt: skip


# ---------------------------------------------------------------------- bad input, never partial


def _torch_opt(shapes=((3, 2), (2,)), dtype=torch.float32, **kw):
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    opt = SophiaG(params, lr=0.1, **kw)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.update_hessian()
    opt.step()
    return opt, ["a", "b"][: len(shapes)]


def _state_bytes(opt):
    sd = opt.state_dict()
    return repr({k: {n: v.tolist() for n, v in s.items()} for k, s in sd["state"].items()}), repr(
        sd["param_groups"]
    )


def test_wrong_shapes_fail_before_anything_is_loaded(tmp_path):
    src, names = _torch_opt()
    interop.save(tmp_path / "a.safetensors", interop.from_torch(src, names))
    dst, _ = _torch_opt(shapes=((3, 2), (3,)))
    before = _state_bytes(dst)
    with pytest.raises(ValueError, match=r"hessian of 'b'|mu of 'b'"):
        interop.to_torch(interop.load(tmp_path / "a.safetensors"), dst, names)
    assert _state_bytes(dst) == before
    params = {"a": jnp.zeros((3, 2)), "b": jnp.zeros((3,))}
    tx = sj.sophia_g(0.1, hessian_update_interval=None)
    with pytest.raises(ValueError, match="has shape"):
        interop.to_jax(interop.load(tmp_path / "a.safetensors"), tx.init(params), params)


def test_wrong_dtype_and_names_fail(tmp_path):
    src, names = _torch_opt()
    ckpt = interop.from_torch(src, names)
    dst, _ = _torch_opt(dtype=torch.float64)
    with pytest.raises(ValueError, match="float32 but the parameter is torch.float64"):
        interop.to_torch(ckpt, dst, names)
    with pytest.raises(ValueError, match="do not match"):
        interop.to_torch(ckpt, dst, ["a", "c"])
    params = {"a": jnp.zeros((3, 2), jnp.bfloat16), "b": jnp.zeros((2,), jnp.bfloat16)}
    tx = sj.sophia_g(0.1, hessian_update_interval=None)
    with pytest.raises(ValueError, match="is float32 but the state's is bfloat16"):
        interop.to_jax(ckpt, tx.init(params), params)


def _raw(path):
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda t, m: t.pop("hessian/b"), "missing tensors"),
        (lambda t, m: t.update({"mu/b": np.zeros((5,), np.float32)}), "has shape"),
        (lambda t, m: t.update({"mu/b": np.zeros((2,), np.float64)}), "declared float32"),
        (lambda t, m: t.update({"extra": np.zeros(1, np.float32)}), "unexpected tensors"),
        (lambda t, m: m.update(format_version="99"), "format version '99' is not supported"),
        (lambda t, m: m.update(format="something-else"), "not a SophiaG optimizer state"),
        (lambda t, m: m.update(sophia="{not json"), "malformed 'sophia' header"),
        (lambda t, m: t.update({"group0/rho": np.asarray(-1.0, np.float32)}), "rho must be"),
        (lambda t, m: t.update({"group0/step": np.asarray(1.0, np.float32)}), "0-d int64"),
        (lambda t, m: t.update({"group0/rho": np.asarray(0.1, np.float64)}), "0-d float32"),
    ],
    ids=[
        "missing",
        "shape",
        "dtype",
        "extra",
        "version",
        "format",
        "header",
        "rho",
        "step",
        "scalar-dtype",
    ],  # fmt: skip
)
def test_bad_files_fail_with_a_clear_error(tmp_path, corrupt, match):
    src, names = _torch_opt()
    good = tmp_path / "good.safetensors"
    interop.save(good, interop.from_torch(src, names))
    tensors, meta = _raw(good)
    corrupt(tensors, meta)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, os.fspath(bad), metadata=meta)
    with pytest.raises(ValueError, match=match):
        interop.load(bad)


def test_bad_hyperparameters_in_header_and_garbage_files(tmp_path):
    src, names = _torch_opt()
    good = tmp_path / "good.safetensors"
    interop.save(good, interop.from_torch(src, names))
    tensors, meta = _raw(good)
    header = json.loads(meta["sophia"])
    header["groups"][0]["hyperparams"]["b2"] = 1.5
    meta["sophia"] = json.dumps(header)
    save_file(tensors, os.fspath(tmp_path / "hp.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"Invalid betas\[1\]: 1.5"):
        interop.load(tmp_path / "hp.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        interop.load(tmp_path / "junk.safetensors")


def test_hyperparameter_mismatch_is_refused_unless_asked():
    src, names = _torch_opt(rho=0.04)
    ckpt = interop.from_torch(src, names)
    dst, _ = _torch_opt(rho=0.05)
    before = _state_bytes(dst)
    with pytest.raises(ValueError, match="rho: checkpoint 0.04 vs 0.05"):
        interop.to_torch(ckpt, dst, names)
    assert _state_bytes(dst) == before
    interop.to_torch(ckpt, dst, names, check_hyperparams=False)
    assert float(dst.state_dict()["state"][0]["step"]) == 1.0
    params = {"a": jnp.zeros((3, 2)), "b": jnp.zeros((2,))}
    tx = sj.sophia_g(0.1, rho=0.05, hessian_update_interval=None)
    with pytest.raises(ValueError, match="rho: checkpoint 0.04"):
        interop.to_jax(ckpt, tx.init(params), params)
    with pytest.raises(ValueError, match="match no group"):  # one group vs two Sophia states
        two = optax.multi_transform(
            {"x": sj.sophia_g(0.1, rho=0.04, hessian_update_interval=None)} | {
                "y": sj.sophia_g(0.1, rho=0.04, hessian_update_interval=None)},
            {"a": "x", "b": "y"},
        )  # fmt: skip
        interop.to_jax(ckpt, two.init(params), params)


def test_jax_states_hold_no_hyperparameters_so_they_are_passed():
    """The state knows only its rho while fresh; to_jax checks what hyperparams= says."""
    src, names = _torch_opt(rho=0.04)
    ckpt = interop.from_torch(src, names)
    params = {"a": jnp.zeros((3, 2)), "b": jnp.zeros((2,))}
    tx = sj.sophia_g(0.1, 0.965, 0.9, rho=0.04, hessian_update_interval=None)
    with pytest.raises(ValueError, match="b2: checkpoint 0.99 vs 0.9"):
        interop.to_jax(ckpt, tx.init(params), params, hyperparams={"b2": 0.9})
    state = interop.to_jax(ckpt, tx.init(params), params, hyperparams={"b2": 0.9},
                           check_hyperparams=False)  # fmt: skip
    assert int(state[0].count) == 1
    assert interop.from_jax(state, params).groups[0].hyperparams == {}
    recorded = interop.from_jax(state, params, hyperparams={"b2": 0.9, "rho": 0.04})
    assert recorded.groups[0].hyperparams == {"b2": 0.9, "rho": 0.04}


# ---------------------------------------------------------------------- other checkpointers


def test_orbax_round_trip_of_the_jax_state(tmp_path):
    import orbax.checkpoint as ocp

    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    tx = sj.sophia_g(0.1, rho=0.05, hessian_update_interval=None, dynamic=True)
    state = tx.init(params)
    g = jax.tree.map(lambda x: x * 0.1 + 0.3, params)
    u, state = tx.update(g, state, params, hessian=jax.tree.map(jnp.abs, params))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "orbax", state)
    ckptr.wait_until_finished()
    restored = ckptr.restore(tmp_path / "orbax", jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                              tx.init(params)))  # fmt: skip
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert type(restored[0]).__name__ == "ScaleBySophiaState"
    u1, s1 = tx.update(g, state, params)
    u2, s2 = tx.update(g, restored, params)
    for a, b in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u2, s2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and an orbax-restored state converts like any other
    ckpt = interop.from_jax(restored, params)
    assert ckpt.groups[0].step == 1


def test_plain_torch_save_still_works_after_an_interop_load(tmp_path):
    prob, groups = MLP(seed=9), _mlp_groups()
    j = JaxDriver(prob.params0, groups)
    run(j, prob.params0, prob.grad, prob.hhat, 6, K)
    t = TorchDriver(j.params(), groups)
    interop.to_torch(interop.from_jax(j.state, j.p, hyperparams=[_hp(g) for g in groups]),
                     t.opt, t.order)  # fmt: skip
    torch.save(t.opt.state_dict(), tmp_path / "opt.pt")
    t2 = TorchDriver(t.params(), groups)
    t2.opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for d in (t, t2):
        run(d, None, prob.grad, prob.hhat, 6, K, start=6)
    assert _same(_summary(t), _summary(t2)) == (0, True)
    # the reference layout (no group tensors, as the paper's optimizer saves) converts too
    sd = t.opt.state_dict()
    for st in sd["state"].values():
        for key in [k for k in st if k.startswith("group_")]:
            del st[key]
    ckpt = interop.from_torch(sd, t.order)
    assert [g.step for g in ckpt.groups] == [12, 12]


def test_module_names_and_named_parameter_optimizers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    opt = SophiaG(model.parameters(), lr=0.1)
    ckpt = interop.from_torch(opt, model)
    assert ckpt.names == ["0.weight", "0.bias", "1.weight", "1.bias"]
    named = SophiaG(model.named_parameters(), lr=0.1)
    assert interop.from_torch(named).names == ckpt.names  # torch's param_names
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    named.step()
    assert interop.from_torch(named.state_dict()).names == ckpt.names
    params = {"0": {"weight": jnp.zeros((2, 3)), "bias": jnp.zeros(2)},
              "1": {"weight": jnp.zeros((1, 2)), "bias": jnp.zeros(1)}}  # fmt: skip
    assert sorted(interop.jax_param_names(params)) == sorted(ckpt.names)
    tx = sj.sophia_g(0.1, hessian_update_interval=None)
    state = interop.to_jax(ckpt, tx.init(params), params)
    assert int(state[0].count) == 0
    with pytest.raises(ValueError, match="names are needed"):
        interop.from_torch(opt.state_dict())


def test_interop_imports_no_framework_and_loads_without_them(tmp_path):
    src, names = _torch_opt()
    path = tmp_path / "x.safetensors"
    interop.save(path, interop.from_torch(src, names))
    code = (
        "import sys\n"
        "sys.modules['torch'] = None; sys.modules['jax'] = None\n"
        "from sophia import interop\n"
        f"c = interop.load({os.fspath(path)!r})\n"
        "assert c.names == ['a', 'b'] and c.groups[0].step == 1\n"
        "assert c.groups[0].mu['a'].shape == (3, 2)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]

"""SophiaG as a torch.optim.Optimizer: validation, groups, state dicts, compile, dynamic rho."""

import copy
import io
import pickle

import numpy as np
import pytest
import torch

import sophia
from sophia import spec
from sophia.torch import SophiaG
from tests.helpers import random_state
from tests.torch.torchref import (
    HP,
    PATHS,
    make_optimizer_with_state,
    path_param,
    ref_update,
    reference_kwargs,
    same,
    t,
)


def _params(*shapes, dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]


# ----------------------------------------------------------------------------- validation

INVALID = [
    ({"lr": -1.0}, "lr", -1.0),
    ({"lr": float("nan")}, "lr", float("nan")),
    ({"betas": (1.0, 0.99)}, "betas[0]", 1.0),
    ({"betas": (0.9, -0.1)}, "betas[1]", -0.1),
    ({"betas": (0.9,)}, "betas", (0.9,)),
    ({"rho": 0.0}, "rho", 0.0),
    ({"rho": -0.5}, "rho", -0.5),
    ({"weight_decay": -1e-3}, "weight_decay", -1e-3),
    ({"eps": -1.0}, "eps", -1.0),
    ({"bs": 0}, "bs", 0),
    ({"bs": float("inf")}, "bs", float("inf")),
    ({"maximize": 1}, "maximize", 1),
    ({"dynamic": "yes"}, "dynamic", "yes"),
]
IDS = [f"{name}={value!r}" for _, name, value in INVALID]


@pytest.mark.parametrize(("kw", "name", "value"), INVALID, ids=IDS)
def test_invalid_hyperparameters_raise_the_spec_message(kw, name, value):
    with pytest.raises(ValueError) as expected:
        spec.validate(**kw)
    with pytest.raises(ValueError) as got:
        SophiaG(_params(3), **kw)
    assert str(got.value) == str(expected.value)
    assert str(got.value).startswith(f"Invalid {name}: {value!r} (allowed: ")


@pytest.mark.parametrize(("kw", "name", "value"), INVALID, ids=IDS)
def test_invalid_param_group_hyperparameters_raise(kw, name, value):
    with pytest.raises(ValueError) as got:
        SophiaG([{"params": _params(3)}, {"params": _params(2), **kw}])
    assert str(got.value).startswith(f"Invalid {name}: {value!r} (allowed: ")


def test_tensor_hyperparameters_are_validated_by_value():
    with pytest.raises(ValueError, match=r"^Invalid lr: tensor\(-1\.\)"):
        SophiaG(_params(3), lr=torch.tensor(-1.0))


def test_torch_specific_validation():
    with pytest.raises(ValueError, match=r"Invalid lr: a tensor of shape \(2,\)"):
        SophiaG(_params(3), lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(RuntimeError, match="cannot be `True` together"):
        SophiaG(_params(3), foreach=True, fused=True)
    p = _params(3)
    p[0].grad = torch.ones(3)
    opt = SophiaG(p)
    with pytest.raises(ValueError, match=r"^Invalid bs: -3"):
        opt.step(bs=-3)
    with pytest.raises(ValueError, match="only apply with logits"):
        opt.update_hessian(labels=torch.zeros(3, dtype=torch.long))


def test_seed_usage_and_lazy_top_level_import():
    model = torch.nn.Linear(4, 2)
    opt = sophia.SophiaG(model.parameters(), lr=0.01, betas=(0.9, 0.999), weight_decay=1e-4)
    assert isinstance(opt, SophiaG)
    d = opt.defaults
    assert (d["lr"], d["betas"], d["weight_decay"]) == (0.01, (0.9, 0.999), 1e-4)
    assert (d["rho"], d["bs"], d["eps"]) == (spec.DEFAULTS.rho, spec.DEFAULTS.bs, spec.DEFAULTS.eps)


def test_sophia_torch_does_not_import_jax():
    import subprocess
    import sys

    code = "import sys, sophia.torch, sophia; sophia.SophiaG; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- errors on inputs


@path_param
def test_sparse_gradients_raise_naming_the_parameter(path):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    lin = torch.nn.Linear(3, 1)
    model = torch.nn.Sequential(emb, lin)
    opt = SophiaG(model.named_parameters(), **PATHS[path])
    model(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"sparse gradients; '0.weight' \(parameter 0 of param"):
        opt.step()
    with pytest.raises(RuntimeError, match="sparse gradients; '0.weight'"):
        opt.update_hessian()
    opt2 = SophiaG(model.parameters())
    with pytest.raises(RuntimeError, match="parameter 0 of param group 0"):
        opt2.step()


# --------------------------------------------------------------- groups, closure, schedulers


@path_param
def test_param_groups_use_their_own_hyperparameters(path):
    leaves = random_state(20, [(4, 3), (6,)], np.float32, h_scale=0.1)
    other = {"lr": 0.2, "betas": (0.8, 0.9), "rho": 0.5, "weight_decay": 0.0, "bs": 7.0, "eps": 0.0}
    opt, params = make_optimizer_with_state(leaves, **HP, **PATHS[path])
    # move the second parameter into its own group
    opt.param_groups[0]["params"] = params[:1]
    opt.add_param_group({"params": params[1:], **other})
    opt.step()
    for (theta, g, m, h), p, hp in zip(leaves, params, (HP, other)):
        rt, rm, _ = ref_update(theta, g, m, h, **reference_kwargs(**hp))
        assert same(p, rt) and same(opt.state[p]["exp_avg"], rm)
    assert len(opt.diagnostics()) == 2


def test_closure_runs_with_grad_enabled_and_its_loss_is_returned():
    p = _params(5)[0]
    opt = SophiaG([p], lr=0.1)

    def closure():
        opt.zero_grad()
        assert torch.is_grad_enabled()
        loss = (p**2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and opt.state[p]["step"].item() == 1


@path_param
def test_lr_scheduler_drives_the_learning_rate(path):
    leaves = random_state(21, [(5, 4)], np.float32, h_scale=0.1)
    opt, (p,) = make_optimizer_with_state(leaves, **HP, **PATHS[path])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
    theta, g, m, h = leaves[0]
    rng = np.random.default_rng(0)
    for k in range(4):
        grad = rng.normal(size=theta.shape).astype(np.float32)
        p.grad = t(grad)
        opt.step()
        sched.step()
        kw = reference_kwargs(**dict(HP, lr=HP["lr"] / (1 + k)))
        theta, m, _ = ref_update(theta, grad, m, h, **kw)
        assert same(p, theta)


@path_param
def test_step_bs_overrides_the_group_bs_for_that_step(path):
    leaves = random_state(22, [(8,)], np.float32, h_scale=0.1)
    opt, (p,) = make_optimizer_with_state(leaves, **HP, **PATHS[path])
    opt.step(bs=5120)
    rt, _, _ = ref_update(*leaves[0], **reference_kwargs(**dict(HP, bs=5120)))
    assert same(p, rt) and opt.param_groups[0]["bs"] == HP["bs"]


# ----------------------------------------------------------------------------- state dicts


def _run(opt, params, steps, seed, refresh=True):
    rng = np.random.default_rng(seed)
    for k in range(steps):
        grads = [t(rng.normal(size=p.shape).astype(np.float32)) for p in params]
        if refresh and k % 2 == 0:
            opt.update_hessian(hessian=[g.abs() * 0.3 for g in grads])
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()


@path_param
@pytest.mark.parametrize("via", ["memory", "torch.save", "pickle"])
def test_state_dict_round_trip_resumes_bit_identically(path, via):
    p1 = _params((4, 3), (5,), ())
    opt1 = SophiaG(p1, lr=0.05, dynamic=True, bs=3, **PATHS[path])
    _run(opt1, p1, 5, seed=1)
    sd = opt1.state_dict()
    if via == "memory":
        sd = copy.deepcopy(sd)
    elif via == "torch.save":
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
    else:
        sd = pickle.loads(pickle.dumps(sd))
    p2 = [torch.nn.Parameter(p.detach().clone()) for p in p1]
    opt2 = SophiaG(p2, lr=0.05, dynamic=True, bs=3, **PATHS[path])
    opt2.load_state_dict(sd)
    _run(opt1, p1, 5, seed=2)
    _run(opt2, p2, 5, seed=2)
    assert all(same(a, b) for a, b in zip(p1, p2))
    for a, b in zip(p1, p2):
        for key in ("step", "exp_avg", "hessian"):
            assert same(opt1.state[a][key], opt2.state[b][key])
    d1, d2 = opt1.diagnostics()[0], opt2.diagnostics()[0]
    assert all(same(d1[k], d2[k]) for k in d1)


@pytest.mark.parametrize("ref_capturable", [False, True])
def test_reference_state_dict_loads_and_continues(ref_capturable):
    """A state dict in the layout of the paper's SophiaG (built by hand, not by its code)."""
    leaves = random_state(23, [(3, 2), (4,)], np.float32, h_scale=0.1)
    step = torch.zeros((1,)) + 7 if ref_capturable else torch.tensor(7.0)
    ref_sd = {
        "state": {
            i: {"step": step.clone(), "exp_avg": t(m), "hessian": t(h)}
            for i, (_, _, m, h) in enumerate(leaves)
        },
        "param_groups": [
            {
                "lr": HP["lr"],
                "betas": HP["betas"],
                "rho": HP["rho"],
                "weight_decay": HP["weight_decay"],
                "maximize": False,
                "capturable": ref_capturable,
                "params": [0, 1],
            }
        ],
    }
    params = [torch.nn.Parameter(t(theta)) for theta, _, _, _ in leaves]
    opt = SophiaG(params)
    opt.load_state_dict(ref_sd)
    for p, (_, g, _, _) in zip(params, leaves):
        p.grad = t(g)
    opt.step(bs=5120)  # the reference's step(bs=5120)
    group = opt.param_groups[0]
    assert group["bs"] == spec.DEFAULTS.bs and group["eps"] == spec.DEFAULTS.eps
    kw = reference_kwargs(**dict(HP, bs=5120, eps=spec.DEFAULTS.eps))
    for (theta, g, m, h), p in zip(leaves, params):
        rt, rm, _ = ref_update(theta, g, m, h, **kw)
        assert same(p, rt) and same(opt.state[p]["exp_avg"], rm)
        assert opt.state[p]["step"].shape == () and opt.state[p]["step"].item() == 8
    assert opt.diagnostics()[0]["count"].item() == 8
    # the reference's update_hessian() convention continues to work
    opt.update_hessian()
    assert torch.isfinite(opt.state[params[0]]["hessian"]).all()


def test_state_dict_of_different_parameters_fails_clearly():
    src = _params((4, 3), (5,))
    opt = SophiaG(src)
    for p in src:
        p.grad = torch.ones_like(p)
    opt.step()
    other = SophiaG(_params((4, 3), (6,)))
    with pytest.raises(ValueError, match=r"parameter 1 in param group 0 has shape \(5,\).*\(6,\)"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="different number of parameter groups"):
        SophiaG([{"params": _params(3)}, {"params": _params(2)}]).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="doesn't match the size"):
        SophiaG(_params((4, 3))).load_state_dict(opt.state_dict())


@path_param
def test_deepcopy_and_pickle_of_the_optimizer(path):
    params = _params((3, 3), (2,))
    opt = SophiaG(params, lr=0.1, **PATHS[path])
    _run(opt, params, 2, seed=3)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        cparams = [p for g in clone.param_groups for p in g["params"]]
        assert all(same(a, b) for a, b in zip(params, cparams))
        _run(clone, cparams, 2, seed=4)
    _run(opt, params, 2, seed=4)
    assert all(same(a, b) for a, b in zip(params, cparams))


# ----------------------------------------------------------------------------- dynamic rho


def _dynamic_setup(dtype=np.float32):
    torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
    p = torch.nn.Parameter(torch.linspace(-1, 1, 20, dtype=torch_dtype))
    opt = SophiaG([p], lr=1e-3, rho=0.05, bs=10, dynamic=True)
    return opt, p


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize(("h_scale", "direction"), [(1e-12, "up"), (1e6, "down")])
def test_dynamic_rho_follows_the_spec_rule_and_bounds(dtype, h_scale, direction):
    opt, p = _dynamic_setup(dtype)
    rho0 = 0.05
    # before any step the rule does not move rho
    p.grad = torch.ones_like(p)
    opt.update_hessian(hessian=[torch.full_like(p, h_scale)])
    assert opt.diagnostics()[0]["rho"].item() == np.asarray(rho0, dtype)
    rho = opt.diagnostics()[0]["rho"]
    for _ in range(30):
        p.grad = torch.ones_like(p)
        opt.step()
        rate = opt.diagnostics()[0]["win_rate"]
        opt.update_hessian(hessian=[torch.full_like(p, h_scale)])
        expect = spec.dynamic_rho(rho.item(), rate.item(), rho0, dtype, p.numel())
        rho = opt.diagnostics()[0]["rho"]
        assert rho.dtype == (torch.float64 if dtype == np.float64 else torch.float32)
        assert same(rho, np.asarray(expect))
    # 30 moves by 1.25 overshoot the range: rho is pinned at rho0 * 100 or rho0 / 100
    if direction == "up":
        assert same(rho, np.asarray(spec.dynamic_rho(1e9, 0.0, rho0, dtype)))
    else:
        assert same(rho, np.asarray(spec.dynamic_rho(1e-9, 1.0, rho0, dtype)))


@path_param
def test_dynamic_rho_is_used_by_the_next_step(path):
    leaves = random_state(24, [(30,)], np.float32, h_scale=1e-6)
    kw = dict(HP, dynamic=True)
    opt, (p,) = make_optimizer_with_state(leaves, **kw, **PATHS[path])
    opt.step()
    opt.update_hessian(hessian=[torch.zeros_like(p)])
    rho = opt.diagnostics()[0]["rho"]
    assert rho.item() > np.float32(HP["rho"])
    theta, m = p.detach().numpy().copy(), opt.state[p]["exp_avg"].numpy().copy()
    h = opt.state[p]["hessian"].numpy().copy()
    g = np.random.default_rng(0).normal(size=30).astype(np.float32)
    p.grad = t(g)
    opt.step()
    rt, _, _ = ref_update(theta, g, m, h, **reference_kwargs(**dict(HP, rho=rho.item())))
    assert same(p, rt)


def test_dynamic_false_keeps_rho_and_follows_group_rho():
    opt, p = _dynamic_setup()
    opt.param_groups[0]["dynamic"] = False
    for _ in range(3):
        p.grad = torch.ones_like(p)
        opt.step()
        opt.update_hessian(hessian=[torch.zeros_like(p)])
    assert opt.diagnostics()[0]["rho"].item() == np.float32(0.05)
    opt.param_groups[0]["rho"] = 0.5
    assert opt.diagnostics()[0]["rho"].item() == np.float32(0.5)


def test_diagnostics_values():
    leaves = random_state(25, [(4, 5), (7,)], np.float64, h_scale=0.1)
    opt, params = make_optimizer_with_state(leaves, **HP)
    opt.step()
    d = opt.diagnostics()[0]
    assert set(d) == {"win_rate", "rho", "hessian_norm", "momentum_norm", "count"}
    ms = np.concatenate([opt.state[p]["exp_avg"].numpy().ravel() for p in params])
    hs = np.concatenate([x[3].ravel() for x in leaves])
    np.testing.assert_allclose(d["momentum_norm"].item(), np.linalg.norm(ms), rtol=1e-12)
    np.testing.assert_allclose(d["hessian_norm"].item(), np.linalg.norm(hs), rtol=1e-12)
    assert d["count"].item() == 1 and d["rho"].item() == HP["rho"]


# ----------------------------------------------------------------------------- capturable / compile


@pytest.mark.parametrize("path", ["single", "foreach", "fused"])
def test_capturable_compiled_step_fullgraph_matches_eager(path):
    torch.manual_seed(0)
    m1 = torch.nn.Linear(5, 3)
    m2 = copy.deepcopy(m1)
    kw = dict(lr=torch.tensor(0.01), capturable=True, dynamic=True, bs=8, **PATHS[path])
    o1, o2 = SophiaG(m1.parameters(), **kw), SophiaG(m2.parameters(), **kw)
    compiled = torch.compile(o2.step, fullgraph=True)
    for i in range(4):
        x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
        for model, opt, step in ((m1, o1, o1.step), (m2, o2, compiled)):
            opt.zero_grad()
            logits = model(x)
            if i % 2 == 0:
                opt.update_hessian(logits=logits, labels=y)
            torch.nn.functional.cross_entropy(logits, y).backward()
            step()
    assert all(same(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    d1, d2 = o1.diagnostics()[0], o2.diagnostics()[0]
    assert all(same(d1[k], d2[k]) for k in d1)
    assert d1["rho"].item() != np.float32(spec.DEFAULTS.rho)  # the dynamic rule ran


def test_capturable_keeps_steps_on_the_parameter_device():
    p = _params(3)[0]
    p.grad = torch.ones(3)
    opt = SophiaG([p], capturable=True)
    opt.step()
    assert opt.state[p]["step"].device == p.device


@path_param
def test_grad_scaler_unscales_and_skips_non_finite_steps(path):
    """torch.amp.GradScaler drives SophiaG like AdamW: unscaled steps, inf/NaN steps skipped."""
    leaves = random_state(9, [(6, 4), (5,)], np.float32, h_scale=0.1)
    o_ref, p_ref = make_optimizer_with_state(leaves, **HP, **PATHS[path])
    o_amp, p_amp = make_optimizer_with_state(leaves, **HP, **PATHS[path])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    grads = [p.grad.clone() for p in p_amp]

    def backward(gs):  # a loss whose gradient is gs, scaled (by a power of 2: exact)
        o_amp.zero_grad(set_to_none=True)
        scaler.scale(sum((p * g).sum() for p, g in zip(p_amp, gs))).backward()

    backward(grads)
    o_ref.step()
    scaler.step(o_amp)
    scaler.update()
    assert all(same(a, b) for a, b in zip(p_ref, p_amp))
    for a, b in zip(p_ref, p_amp):
        for key in ("exp_avg", "hessian", "step"):
            assert same(o_ref.state[a][key], o_amp.state[b][key]), key
    before = [p.detach().clone() for p in p_amp]
    state_before = {k: [o_amp.state[p][k].clone() for p in p_amp] for k in ("exp_avg", "step")}
    backward([torch.full_like(grads[0], float("inf")), torch.full_like(grads[1], float("nan"))])
    scaler.step(o_amp)
    scaler.update()
    assert all(same(a, b) for a, b in zip(before, p_amp))  # skipped: nothing moved
    for k, vals in state_before.items():
        assert all(same(v, o_amp.state[p][k]) for v, p in zip(vals, p_amp)), k
    assert scaler.get_scale() == 2.0**9  # and the scaler backed off

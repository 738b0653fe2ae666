"""torch.optim contracts (as torch's OptimizerInfo matrix checks them) and misuse messages.

State-dict determinism, deepcopy/pickle, meta parameters under swap-on-conversion,
optimizer hooks and the state layout (group tensors in ``state``, the earlier
``param_groups[i]["sophia_state"]`` layout still loading), over every path; then
the warnings and errors that keep SophiaG from silently becoming something else.
"""

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sophia import spec
from sophia.torch import (
    HessianNotRefreshedWarning,
    LabelCountWarning,
    RepeatedRefreshWarning,
    SophiaG,
    SophiaGWarning,
)
from tests.torch.torchref import PATHS, path_param, same

GROUP_KEYS = ("group_step", "group_rho", "group_win_rate")


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5)).to(
        dtype
    )


def _batch(t, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(3, 4, generator=g).to(dtype), torch.randint(0, 5, (3,), generator=g)


def _train(model, opt, steps, start=0, k=2, bs_from_refresh=True):
    """The documented loop: refresh at steps t % k == 0 before the backward."""
    for t in range(start, start + steps):
        x, y = _batch(t, next(model.parameters()).dtype)
        logits = model(x)
        if t % k == 0:
            opt.update_hessian(logits=logits, generator=torch.Generator().manual_seed(t))
        F.cross_entropy(logits.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _same_state_dicts(a, b):
    """Keys, types, dtypes, devices and values (bitwise) of two state dicts."""
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        sa, sb = a["state"][i], b["state"][i]
        assert sa.keys() == sb.keys(), (i, sa.keys(), sb.keys())
        for k in sa:
            assert type(sa[k]) is type(sb[k])
            if torch.is_tensor(sa[k]):
                assert sa[k].dtype == sb[k].dtype and sa[k].device == sb[k].device, (i, k)
                assert same(sa[k], sb[k]), (i, k)


# ----------------------------------------------------------------------------- state dicts


@path_param
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_state_dict_round_trip_is_deterministic(path, dtype):
    """state_dict -> load_state_dict -> state_dict is the identity (torch's
    test_state_dict_deterministic), and the group tensors keep their own dtypes."""
    model = _model(dtype)
    opt = SophiaG(model.parameters(), lr=0.01, dynamic=True, **PATHS[path])
    _train(model, opt, 3)
    sd = opt.state_dict()
    model2 = copy.deepcopy(model)
    opt2 = SophiaG(model2.parameters(), lr=0.01, dynamic=True, **PATHS[path])
    opt2.load_state_dict(copy.deepcopy(sd))
    _same_state_dicts(sd, opt2.state_dict())
    assert opt2.param_groups[0].keys() == opt.param_groups[0].keys()
    assert opt2.defaults == opt.defaults and "differentiable" not in opt2.defaults
    host = opt2.state[next(model2.parameters())]
    sd_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert host["group_rho"].dtype == sd_dtype and host["group_win_rate"].dtype == sd_dtype
    assert host["group_step"].dtype == torch.float32
    assert host["group_label_count"].dtype == torch.int64
    # and both continue alike
    _train(model, opt, 3, start=3)
    _train(model2, opt2, 3, start=3)
    assert all(same(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    _same_state_dicts(opt.state_dict(), opt2.state_dict())


@path_param
def test_complex_parameters_and_tensor_lr_round_trip(path):
    """A complex parameter (updated as real pairs) and a tensor lr, as torch's OptimizerInfo
    matrix runs them: the round trip keeps the lr a tensor and the state bitwise."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64)),
              torch.nn.Parameter(torch.randn(5))]  # fmt: skip
    kw = dict(lr=torch.tensor(0.01), bs=2, dynamic=True, **PATHS[path])
    opt = SophiaG(params, **kw)
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = SophiaG(clone, **kw)
    for t in range(4):
        g = torch.Generator().manual_seed(t)
        grads = [torch.randn(p.shape, dtype=p.dtype, generator=g) for p in params]
        if t == 2:
            opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
        for o, ps in ((opt, params), (opt2, clone)):
            if t % 2 == 0:
                o.update_hessian(hessian=[torch.view_as_real(x).abs() if x.is_complex()
                                          else x.abs() for x in grads])  # fmt: skip
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
            o.step()
    assert all(same(torch.view_as_real(a) if a.is_complex() else a,
                    torch.view_as_real(b) if b.is_complex() else b)
               for a, b in zip(params, clone))  # fmt: skip
    lr2 = opt2.param_groups[0]["lr"]
    assert torch.is_tensor(lr2) and torch.equal(lr2, opt.param_groups[0]["lr"])
    host = opt2.state[clone[0]]
    assert host["group_rho"].dtype == torch.float32 and host["exp_avg"].dtype == torch.complex64
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    for i in sd1["state"]:
        for k, v in sd1["state"][i].items():
            w = sd2["state"][i][k]
            assert v.dtype == w.dtype and torch.equal(v, w), (i, k)


@path_param
def test_deepcopy_and_pickle_change_no_group_or_default(path):
    model = _model()
    opt = SophiaG(model.parameters(), lr=0.01, **PATHS[path])
    _train(model, opt, 2)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.defaults == opt.defaults
        assert [g.keys() for g in clone.param_groups] == [g.keys() for g in opt.param_groups]
        _same_state_dicts(clone.state_dict(), opt.state_dict())


def _to_earlier_layout(sd):
    """A state dict as SophiaG saved it before the group tensors moved into ``state``."""
    sd = copy.deepcopy(sd)
    for g in sd["param_groups"]:
        host = sd["state"][g["params"][0]]
        g["sophia_state"] = {
            "step": host.pop("group_step"),
            "rho": host.pop("group_rho"),
            "win_rate": host.pop("group_win_rate"),
        }
        host.pop("group_label_count", None)
    return sd


@path_param
def test_earlier_layout_state_dict_loads_and_continues(path):
    model = _model()
    kw = dict(lr=0.01, dynamic=True, bs=3, **PATHS[path])
    opt = SophiaG(model.parameters(), **kw)
    _train(model, opt, 5)
    old = _to_earlier_layout(opt.state_dict())
    assert not any(k.startswith("group_") for st in old["state"].values() for k in st)
    model2 = copy.deepcopy(model)
    opt2 = SophiaG(model2.parameters(), **kw)
    opt2.load_state_dict(old)
    assert "sophia_state" not in opt2.param_groups[0]
    d1, d2 = opt.diagnostics()[0], opt2.diagnostics()[0]
    assert all(same(d1[k], d2[k]) for k in d1)
    _train(model, opt, 4, start=5)
    _train(model2, opt2, 4, start=5)
    assert all(same(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert all(same(d1[k], d2[k]) for d1, d2 in zip(opt.diagnostics(), opt2.diagnostics())
               for k in d1)  # fmt: skip


def test_load_state_dict_moves_group_tensors_with_the_parameters():
    """Group tensors are state: load_state_dict puts them on the parameters' device, and an
    empty group or a group whose first parameter never had a gradient works."""
    a, b, c = (torch.nn.Parameter(torch.randn(3)) for _ in range(3))
    opt = SophiaG([{"params": [a, b]}, {"params": []}, {"params": [c]}], bs=1)
    b.grad, c.grad = torch.ones(3), torch.ones(3)
    opt.update_hessian()
    opt.step()
    assert set(opt.state[a]) == set(GROUP_KEYS)  # a: the first group's host, never a gradient
    sd = opt.state_dict()
    opt2 = SophiaG([{"params": [a, b]}, {"params": []}, {"params": [c]}], bs=1)
    opt2.load_state_dict(sd)
    _same_state_dicts(sd, opt2.state_dict())
    assert [float(d["count"]) for d in opt2.diagnostics()] == [1.0, 0.0, 1.0]


# ----------------------------------------------------------------------------- meta / swap


@path_param
@pytest.mark.parametrize("dynamic", [False, True])
def test_meta_parameters_then_to_empty_with_swap_on_conversion(path, dynamic):
    """Built on meta parameters, materialised with Module.to_empty under torch's
    swap-on-conversion: nothing of the optimizer stays on the meta device."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with torch.device("meta"):
            model = _model()
        opt = SophiaG(model.parameters(), lr=0.01, dynamic=dynamic, **PATHS[path])
        assert all(d["rho"].device.type == "meta" for d in opt.diagnostics())  # no state yet
        model.to_empty(device="cpu")
        model.load_state_dict(_model().state_dict())
        ref = _model()
        ref_opt = SophiaG(ref.parameters(), lr=0.01, dynamic=dynamic, **PATHS[path])
        _train(model, opt, 3)
        _train(ref, ref_opt, 3)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)
    assert all(same(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    for st in opt.state.values():
        assert all(v.device.type == "cpu" for v in st.values() if torch.is_tensor(v))
    for d, r in zip(opt.diagnostics(), ref_opt.diagnostics()):
        assert all(v.device.type == "cpu" and same(v, r[k]) for k, v in d.items())


# ----------------------------------------------------------------------------- hooks


@path_param
def test_optimizer_hooks(path):
    model = _model()
    opt = SophiaG(model.parameters(), lr=0.01, **PATHS[path])
    calls = []
    pre = opt.register_step_pre_hook(
        lambda o, a, kw: calls.append(("pre", int(o.diagnostics()[0]["count"])))
    )
    post = opt.register_step_post_hook(
        lambda o, a, kw: calls.append(("post", int(o.diagnostics()[0]["count"])))
    )
    _train(model, opt, 2)
    assert calls == [("pre", 0), ("post", 1), ("pre", 1), ("post", 2)]
    pre.remove()
    post.remove()
    _train(model, opt, 1, start=2)
    assert len(calls) == 4

    def sd_pre(o):
        calls.append("sd_pre")

    def sd_post(o, sd):
        sd["extra"] = "kept"
        return sd

    opt.register_state_dict_pre_hook(sd_pre)
    opt.register_state_dict_post_hook(sd_post)
    sd = opt.state_dict()
    assert calls[-1] == "sd_pre" and sd["extra"] == "kept"

    opt2 = SophiaG(copy.deepcopy(model).parameters(), lr=0.01, **PATHS[path])

    def load_pre(o, sd):
        sd = dict(sd)
        sd.pop("extra")
        return sd

    loaded = []
    opt2.register_load_state_dict_pre_hook(load_pre)
    opt2.register_load_state_dict_post_hook(lambda o: loaded.append(o.diagnostics()[0]["count"]))
    opt2.load_state_dict(sd)
    assert [float(c) for c in loaded] == [3.0]


# ----------------------------------------------------------------------------- misuse


def _steps_only(opt, params, n):
    for _ in range(n):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()


def test_steps_without_any_refresh_warn_once_naming_the_fix():
    params = list(_model().parameters())
    opt = SophiaG(params, bs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SophiaGWarning)
        _steps_only(opt, params, 19)
    with pytest.warns(HessianNotRefreshedWarning) as rec:
        _steps_only(opt, params, 30)
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "update_hessian" in msg and "step % k == 0" in msg
    assert "sophia.integrations.transformers.SophiaGCallback" in msg
    assert "sophia.integrations.lightning.SophiaGCallback" in msg
    assert rec[0].filename == __file__  # points at the caller's line
    # a loop that refreshes, however rarely, is never warned
    opt = SophiaG(params, bs=1)
    opt.update_hessian()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SophiaGWarning)
        _steps_only(opt, params, 60)


def test_update_hessian_after_backward_says_to_call_it_before():
    model = _model()
    opt = SophiaG(model.parameters())
    x, y = _batch(0)
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    with pytest.raises(RuntimeError, match=r"before loss\.backward\(\)") as e:
        opt.update_hessian(logits=logits)
    assert "second time" in str(e.value.__cause__)
    assert all(p not in opt.state or "hessian" not in opt.state[p] for p in model.parameters())


@path_param
def test_second_refresh_before_a_step_is_skipped_with_one_warning(path):
    model = _model()
    opt = SophiaG(model.parameters(), **PATHS[path])
    ref = SophiaG(copy.deepcopy(model).parameters(), **PATHS[path])
    x, _ = _batch(0)
    opt.update_hessian(logits=model(x), labels=torch.tensor([0, 1, 2]))
    h = [opt.state[p]["hessian"].clone() for p in model.parameters()]
    with pytest.warns(RepeatedRefreshWarning, match="gradient accumulation") as rec:
        for _ in range(3):  # micro-batches of one optimizer step
            opt.update_hessian(logits=model(x), labels=torch.tensor([0, 1, 2]))
    assert len(rec) == 1 and "allow_repeat=True" in str(rec[0].message)
    assert all(same(a, opt.state[p]["hessian"]) for a, p in zip(h, model.parameters()))
    # after a step the next refresh runs again
    _steps_only(opt, list(model.parameters()), 1)
    opt.update_hessian(logits=model(x), labels=torch.tensor([0, 1, 2]))
    assert not all(same(a, opt.state[p]["hessian"]) for a, p in zip(h, model.parameters()))
    # deliberate repeats: each refresh applies the EMA once more
    rmodel = list(ref.param_groups[0]["params"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RepeatedRefreshWarning)
        for _ in range(2):
            ref.update_hessian(hessian=[torch.ones_like(p) for p in rmodel], allow_repeat=True)
    b2 = np.float32(spec.DEFAULTS.betas[1])
    twice = spec.hessian_ema(
        spec.hessian_ema(np.zeros(1, np.float32), np.ones(1), b2), np.ones(1), b2
    )
    assert all(same(ref.state[p]["hessian"].flatten()[:1], twice) for p in rmodel)


# ----------------------------------------------------------------------------- bs and masks


def _lm(vocab=7, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(vocab, 5), torch.nn.Linear(5, vocab))


def _tokens(seed, shape=(3, 6), vocab=7):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_gnb_with_a_mask_equals_gnb_on_the_kept_rows():
    from sophia.torch import gnb, sampled_label_grads

    model = _lm()
    params = list(model.parameters())
    x = _tokens(0)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 0, 0]])
    logits = model(x)
    with torch.no_grad():  # masked-out positions may hold anything, NaN included
        poisoned = logits.clone()
        poisoned[mask == 0] = float("nan")
    poisoned = logits + (poisoned - logits).detach()  # same graph, NaN rows where mask == 0
    for m in (mask, mask.bool()):
        got = gnb(poisoned, params, generator=torch.Generator().manual_seed(3), mask=m)
        want = gnb(logits[mask.bool()], params, generator=torch.Generator().manual_seed(3))
        assert all(same(a, b) for a, b in zip(got, want))
    labels = torch.full(x.shape, -100)
    labels[mask.bool()] = _tokens(1, (int(mask.sum()),))
    got = sampled_label_grads(logits, params, labels=labels, mask=mask)
    want = sampled_label_grads(logits[mask.bool()], params, labels=labels[mask.bool()])
    assert all(same(a, b) for a, b in zip(got, want))
    # exact math: the gradient of the mean cross-entropy over the kept positions only
    loss = F.cross_entropy(logits[mask.bool()], labels[mask.bool()])
    exact = torch.autograd.grad(loss, params, retain_graph=True)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(got, exact))
    with pytest.raises(ValueError, match=r"Invalid mask: shape \(3, 5\)"):
        gnb(logits, params, mask=mask[:, :5])


@path_param
def test_bs_none_follows_the_label_count_of_the_refresh(path):
    """bs=None steps exactly as bs=<the latest refresh's label count>: mask.sum() with a
    mask, the number of rows without; a step with no refresh keeps the latest count."""
    masks = [_tokens(50, vocab=2), _tokens(51, vocab=2), None, "no refresh"]
    runs, counts = {}, []
    for follow in (True, False):
        model = _lm()
        opt = SophiaG(model.parameters(), lr=0.05, rho=0.5, bs=None, **PATHS[path])
        for t, mask in enumerate(masks):
            x = _tokens(t)
            logits = model(x)
            if not isinstance(mask, str):
                count = x.numel() if mask is None else int(mask.sum())
                if not follow:
                    opt.param_groups[0]["bs"] = count
                else:
                    counts.append(count)
                opt.update_hessian(logits=logits, mask=mask,
                                   generator=torch.Generator().manual_seed(t))  # fmt: skip
            F.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
            opt.step()
            opt.zero_grad()
            if follow and not isinstance(mask, str):
                host = opt.state[next(model.parameters())]
                assert host["group_label_count"].item() == count
        runs[follow] = [p.detach().clone() for p in model.parameters()]
    assert len(set(counts)) == 3
    assert all(same(a, b) for a, b in zip(runs[True], runs[False]))


def test_bs_none_without_a_count_uses_the_reference_bs_and_warns():
    runs = []
    for bs in (None, spec.REFERENCE_BS):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(10))
        opt = SophiaG([p], lr=0.1, bs=bs)
        if bs is None:
            with pytest.warns(LabelCountWarning, match=r"bs=5120.*Pass bs="):
                opt.update_hessian(hessian=[torch.full((10,), 1e-4)])
        else:
            opt.update_hessian(hessian=[torch.full((10,), 1e-4)])
        p.grad = torch.linspace(-1, 1, 10) * 1e-3
        opt.step()
        runs.append(p.detach().clone())
    assert same(runs[0], runs[1])


def test_numeric_bs_that_disagrees_with_the_refresh_warns_naming_both():
    model = _lm()
    x = _tokens(0)  # 18 labels
    opt = SophiaG(model.parameters(), bs=5)
    with pytest.warns(LabelCountWarning, match=r"bs=5, but the GNB refresh sampled 18 labels"):
        opt.update_hessian(logits=model(x))
    opt = SophiaG(model.parameters(), bs=18)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SophiaGWarning)
        opt.update_hessian(logits=model(x))
    # step(bs=...) (the reference code's API) still overrides the count
    a, b = _lm(), _lm()
    oa, ob = SophiaG(a.parameters(), lr=0.1), SophiaG(b.parameters(), lr=0.1, bs=7)
    for model, opt, kw in ((a, oa, {"bs": 7}), (b, ob, {})):
        logits = model(x)
        opt.update_hessian(logits=logits, labels=x)
        F.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LabelCountWarning)
            opt.step(**kw)
    assert all(same(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_an_empty_mask_keeps_the_previous_count():
    model = _lm()
    opt = SophiaG(model.parameters())
    x = _tokens(0)
    opt.update_hessian(logits=model(x))
    _steps_only(opt, list(model.parameters()), 1)
    opt.update_hessian(logits=model(x), mask=torch.zeros(x.shape, dtype=torch.bool))
    assert int(opt.state[next(model.parameters())]["group_label_count"]) == x.numel()


def test_label_count_survives_interop_and_files(tmp_path):
    from sophia import interop

    model = _lm()
    opt = SophiaG(model.named_parameters())
    x = _tokens(0)
    opt.update_hessian(logits=model(x), mask=x > 2)
    ckpt = interop.from_torch(opt)
    assert ckpt.groups[0].label_count == int((x > 2).sum())
    interop.save(tmp_path / "c.safetensors", ckpt)
    back = interop.load(tmp_path / "c.safetensors")
    assert back.groups[0].label_count == ckpt.groups[0].label_count
    opt2 = SophiaG(_lm().named_parameters())
    interop.to_torch(back, opt2)
    host = next(iter(opt2.param_groups[0]["params"]))
    assert int(opt2.state[host]["group_label_count"]) == ckpt.groups[0].label_count

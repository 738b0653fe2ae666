"""Every implementation against the spec's NumPy reference, to the bit."""

import os

import numpy as np
import pytest
import torch

from sophia import spec
from sophia.torch import SophiaG, hessian_ema, sophia_g
from tests.helpers import random_state
from tests.torch.torchref import (
    HP,
    PATHS,
    SHAPES,
    TORCH,
    make_optimizer_with_state,
    n,
    path_env,
    path_param,
    ref_update,
    reference_kwargs,
    same,
    t,
)

DTYPES = [np.float32, np.float64]


@path_param
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("maximize", [False, True])
def test_functional_step_is_bit_identical_to_the_reference(path, dtype, maximize):
    leaves = random_state(0, SHAPES, dtype, h_scale=0.1)
    params, grads, ms, hs = ([t(leaf[i]) for leaf in leaves] for i in range(4))
    steps = [torch.tensor(0.0) for _ in leaves]
    n_win = sophia_g(
        params,
        grads,
        ms,
        hs,
        steps,
        **PATHS[path],
        lr=HP["lr"],
        beta1=HP["betas"][0],
        rho=HP["rho"],
        bs=HP["bs"],
        weight_decay=HP["weight_decay"],
        eps=HP["eps"],
        maximize=maximize,
    )
    kw = reference_kwargs(**HP, maximize=maximize)
    total_win = 0
    for (theta, g, m, h), p, mt, ht, s in zip(leaves, params, ms, hs, steps):
        rt, rm, w = ref_update(theta, g, m, h, **kw)
        total_win += w
        assert same(p, rt) and same(mt, rm) and same(ht, h)
        assert s.item() == 1.0
    assert n_win.dtype == torch.int64 and int(n_win) == total_win
    assert 0 < total_win < sum(x[0].size for x in leaves)  # both branches of the clip taken


@path_param
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("seed", range(3))
def test_optimizer_step_is_bit_identical_on_random_shapes(path, dtype, seed):
    rng = np.random.default_rng(100 + seed)
    shapes = [tuple(int(s) for s in rng.integers(0, 9, size=rng.integers(0, 4))) for _ in range(6)]
    leaves = random_state(seed, shapes, dtype, h_scale=0.1)
    opt, params = make_optimizer_with_state(leaves, **HP, **PATHS[path])
    opt.step()
    kw = reference_kwargs(**HP)
    wins = 0
    for (theta, g, m, h), p in zip(leaves, params):
        rt, rm, w = ref_update(theta, g, m, h, **kw)
        wins += w
        assert same(p, rt) and same(opt.state[p]["exp_avg"], rm)
    total = sum(x[0].size for x in leaves)
    win_rate = opt.diagnostics()[0]["win_rate"]
    assert same(win_rate, np.asarray(spec.win_rate(wins, total, dtype)))


@path_param
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_trajectory_with_refreshes_matches_reference_and_other_paths(path, dtype):
    leaves = random_state(1, [(5, 3), (11,), (0,), ()], dtype, h_scale=0.1)
    rng = np.random.default_rng(7)
    opt, params = make_optimizer_with_state(leaves, **HP, **PATHS[path])
    ref = [list(x) for x in leaves]
    kw = reference_kwargs(**HP)
    for it in range(12):
        grads = [rng.normal(size=x[0].shape).astype(dtype) for x in leaves]
        if it % 3 == 0:
            h_hats = [np.abs(rng.normal(size=x[0].shape)).astype(dtype) * 0.1 for x in leaves]
            opt.update_hessian(hessian=[t(x) for x in h_hats])
            for r, hh in zip(ref, h_hats):
                r[3] = spec.hessian_ema(r[3], hh, HP["betas"][1])
        for p, g in zip(params, grads):
            p.grad = t(g)
        opt.step()
        for r, g in zip(ref, grads):
            r[0], r[2], _ = ref_update(r[0], g, r[2], r[3], **kw)
    for r, p in zip(ref, params):
        st = opt.state[p]
        assert same(p, r[0]) and same(st["exp_avg"], r[2]) and same(st["hessian"], r[3])
        assert st["step"].item() == 12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_paths_agree_with_each_other_and_with_float32_math(dtype):
    leaves = random_state(2, [(6, 7), (13,), (1,), (0,)], np.float32, h_scale=0.1)
    # inputs representable in the storage dtype, so the reference sees the same values
    leaves = [tuple(n(t(x).to(dtype)) for x in leaf) for leaf in leaves]
    rng = np.random.default_rng(3)
    results = {}
    for path in PATHS:
        with path_env(path):
            opt, params = make_optimizer_with_state(leaves, dtype, **HP, **PATHS[path])
            ref = [list(x) for x in leaves]
            kw = reference_kwargs(**HP)
            rng = np.random.default_rng(3)
            for it in range(6):
                grads = [n(t(rng.normal(size=x[0].shape)).to(dtype)) for x in leaves]
                if it % 2 == 0:
                    opt.update_hessian(hessian=[t(np.abs(g) * 0.3) for g in grads])
                    for r, g in zip(ref, grads):
                        h32 = spec.hessian_ema(
                            r[3].astype(np.float32), np.abs(g) * 0.3, HP["betas"][1]
                        )
                        r[3] = n(t(h32).to(dtype))
                for p, g in zip(params, grads):
                    p.grad = t(g, dtype)
                opt.step()
                for r, g in zip(ref, grads):
                    r[0], r[2], _ = ref_update(r[0], g, r[2], r[3], storage=dtype, **kw)
            for r, p in zip(ref, params):
                assert p.dtype == dtype and opt.state[p]["exp_avg"].dtype == dtype
                assert same(p, r[0]) and same(opt.state[p]["exp_avg"], r[2])
                assert same(opt.state[p]["hessian"], r[3])
            results[path] = [p.detach().clone() for p in params]
    for path in PATHS:
        assert all(same(a, b) for a, b in zip(results["single"], results[path]))


@path_param
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_zero_grad_and_hessian_give_no_nan(path, dtype):
    p = torch.nn.Parameter(torch.randn(50).to(dtype))
    p.grad = torch.zeros_like(p)
    opt = SophiaG([p], lr=1e-2, eps=0.0, **PATHS[path])
    opt.update_hessian()
    opt.step()
    assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["exp_avg"]).all()


@path_param
def test_eps_zero_never_divides_zero_by_zero(path):
    p = torch.nn.Parameter(torch.zeros(8, dtype=torch.float64))
    p.grad = torch.zeros_like(p)
    opt = SophiaG([p], lr=1.0, eps=0.0, weight_decay=0.0, **PATHS[path])
    opt.step()
    assert same(p, torch.zeros_like(p))


@path_param
def test_maximize_equals_descent_on_the_negated_gradient(path):
    leaves = random_state(4, [(9, 4), (5,)], np.float32, h_scale=0.1)
    neg = [(th, -g, m, h) for th, g, m, h in leaves]
    o1, p1 = make_optimizer_with_state(leaves, maximize=True, **HP, **PATHS[path])
    o2, p2 = make_optimizer_with_state(neg, **HP, **PATHS[path])
    o1.step()
    o2.step()
    assert all(same(a, b) for a, b in zip(p1, p2))


@path_param
@pytest.mark.parametrize("capturable", [False, True])
def test_tensor_lr_rho_and_betas_match_float_hyperparameters(path, capturable):
    leaves = random_state(5, [(6, 5), (3,)], np.float32, h_scale=0.1)
    o1, p1 = make_optimizer_with_state(leaves, **HP, **PATHS[path])
    hp = dict(
        HP,
        lr=torch.tensor(HP["lr"]),
        rho=torch.tensor(HP["rho"], dtype=torch.float64),
        betas=(torch.tensor(HP["betas"][0]), torch.tensor(HP["betas"][1], dtype=torch.float64)),
        bs=torch.tensor(float(HP["bs"])),
    )
    o2, p2 = make_optimizer_with_state(leaves, capturable=capturable, **hp, **PATHS[path])
    for _ in range(3):
        for o in (o1, o2):
            o.update_hessian(hessian=[torch.full(x[0].shape, 0.25) for x in leaves])
            o.step()
    assert all(same(a, b) for a, b in zip(p1, p2))
    assert all(same(o1.state[a]["hessian"], o2.state[b]["hessian"]) for a, b in zip(p1, p2))


@path_param
def test_complex_params_update_as_real_pairs(path):
    leaves = random_state(6, [(4, 3, 2), (5, 2)], np.float32, h_scale=0.1)
    o_real, p_real = make_optimizer_with_state(leaves, **HP, **PATHS[path])
    params = []
    for theta, g, _, _ in leaves:
        p = torch.nn.Parameter(torch.view_as_complex(t(theta)))
        p.grad = torch.view_as_complex(t(g))
        params.append(p)
    o_cplx = SophiaG(params, **HP, **PATHS[path])
    for p, (_, _, m, h) in zip(params, leaves):
        o_cplx.state[p] = {
            "step": torch.tensor(0.0),
            "exp_avg": torch.view_as_complex(t(m)),
            "hessian": torch.view_as_complex(t(h)),
        }
    o_real.step()
    o_cplx.step()
    for pr, pc in zip(p_real, params):
        assert same(torch.view_as_real(pc), pr)
        assert same(torch.view_as_real(o_cplx.state[pc]["exp_avg"]), o_real.state[pr]["exp_avg"])
    assert same(o_cplx.diagnostics()[0]["win_rate"], o_real.diagnostics()[0]["win_rate"])


@path_param
def test_params_without_grad_are_untouched_and_get_no_state(path):
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(torch.randn(3))
    before = b.detach().clone()
    a.grad = torch.randn(5)
    opt = SophiaG([a, b], lr=0.1, **PATHS[path])
    opt.step()
    opt.update_hessian()
    assert same(b, before) and b not in opt.state
    assert opt.diagnostics()[0]["win_rate"] >= 0


@path_param
def test_non_contiguous_grads_and_params(path):
    base = random_state(8, [(6, 4)], np.float32, h_scale=0.1)[0]
    theta, g, m, h = base
    ref_t, ref_m, _ = ref_update(theta.T, g.T, m.T, h.T, **reference_kwargs(**HP))
    p = torch.nn.Parameter(t(theta).T)  # a transposed, non-contiguous parameter
    p.grad = t(g).T
    opt = SophiaG([p], **HP, **PATHS[path])
    opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": t(m).T, "hessian": t(h).T}
    opt.step()
    assert same(p, ref_t) and same(opt.state[p]["exp_avg"], ref_m)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_hessian_ema_functional_matches_reference(foreach, dtype):
    rng = np.random.default_rng(9)
    hs = [t(rng.normal(size=s), dtype) for s in [(4, 3), (0,), (7,)]]
    est = [t(rng.normal(size=x.shape), torch.float32) for x in hs]
    expect = []
    for h, e in zip(hs, est):
        h32 = n(h).astype(np.float64 if dtype == torch.float64 else np.float32)
        out = spec.hessian_ema(h32, n(e), 0.973)
        expect.append(n(t(out).to(dtype)))
    hessian_ema(hs, est, beta2=0.973, foreach=foreach)
    assert all(same(h, e) for h, e in zip(hs, expect))


def test_update_hessian_without_arguments_is_the_ema_of_squared_grads():
    leaves = random_state(10, [(3, 4), (6,)], np.float64, h_scale=0.1)
    opt, params = make_optimizer_with_state(leaves, **HP)
    opt.update_hessian()
    for (_, g, _, h), p in zip(leaves, params):
        assert same(opt.state[p]["hessian"], spec.hessian_ema(h, g * g, HP["betas"][1]))


def test_update_hessian_with_estimates_skips_none_and_checks_length_and_shape():
    leaves = random_state(11, [(3,), (2, 2)], np.float32)
    opt, params = make_optimizer_with_state(leaves, **HP)
    before = opt.state[params[1]]["hessian"].clone()
    opt.update_hessian(hessian=[torch.ones(3), None])
    assert same(opt.state[params[1]]["hessian"], before)
    expect = spec.hessian_ema(leaves[0][3], np.ones(3, np.float32), HP["betas"][1])
    assert same(opt.state[params[0]]["hessian"], expect)
    with pytest.raises(ValueError, match="2 parameters"):
        opt.update_hessian(hessian=[torch.ones(3)])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        opt.update_hessian(hessian=[torch.ones(4), None])
    with pytest.raises(ValueError, match="not both"):
        opt.update_hessian(hessian=[None, None], logits=torch.zeros(2, 3))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_dtype_of_state_and_scalars(dtype):
    p = torch.nn.Parameter(torch.zeros(3, dtype=TORCH[dtype]))
    p.grad = torch.ones_like(p)
    opt = SophiaG([p])
    opt.step()
    st = opt.state[p]
    assert st["exp_avg"].dtype == p.dtype and st["hessian"].dtype == p.dtype
    assert st["step"].dtype == torch.float32 and st["step"].dim() == 0
    assert opt.diagnostics()[0]["win_rate"].dtype == TORCH[dtype]


def test_same_tells_signed_zeros_apart():
    z = np.zeros(2, np.float32)
    assert same(z, z.copy()) and same(-z, -z)
    assert not same(z, -z) and not same(t(z), t(-z))
    assert same(np.array([np.nan, -0.0]), np.array([np.nan, -0.0]))


@path_param
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.13])
def test_signed_zeros_follow_the_reference_bit_for_bit(path, maximize, weight_decay):
    # every sign combination of zero theta, g and m, with h = +0 and -0
    zeros = np.array([0.0, -0.0], np.float32)
    grid = np.array(np.meshgrid(zeros, zeros, zeros, zeros, indexing="ij")).reshape(4, -1)
    theta, g, m, h = (np.ascontiguousarray(x) for x in grid)
    hp = dict(HP, weight_decay=weight_decay)
    leaves = [(theta, g, m, h)]
    opt, (p,) = make_optimizer_with_state(leaves, maximize=maximize, **hp, **PATHS[path])
    opt.step()
    want_p, want_m, _ = ref_update(theta, g, m, h, **reference_kwargs(**hp, maximize=maximize))
    assert np.signbit(want_p).any() and np.signbit(want_m).any()  # the case is not trivial
    assert same(p, want_p) and same(opt.state[p]["exp_avg"], want_m)


@pytest.mark.parametrize("path", ["single", "foreach"])
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_blocks_cut_across_and_between_tensors_give_the_reference(path, threads, monkeypatch):
    """The CPU bodies run block by block: a block size that cuts tensors (and batches)."""
    from sophia.torch import _blocks

    monkeypatch.setattr(_blocks, "_CPU_BLOCK", 19)
    leaves = random_state(8, [(9, 7), (40,), (3,), (5, 4), (1,), (64,)], np.float32, 0.1)
    rng = np.random.default_rng(8)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert _blocks.cpu_block() == 19 * threads
        opt, params = make_optimizer_with_state(leaves, **HP, **PATHS[path])
        ref = [list(x) for x in leaves]
        kw = reference_kwargs(**HP)
        for _ in range(4):
            grads = [rng.normal(size=x[0].shape).astype(np.float32) for x in leaves]
            for p, g in zip(params, grads):
                p.grad = t(g)
            opt.step()
            wins = 0
            for r, g in zip(ref, grads):
                r[0], r[2], w = ref_update(r[0], g, r[2], r[3], **kw)
                wins += int(w)
    finally:
        torch.set_num_threads(old)
    for r, p in zip(ref, params):
        assert same(p, r[0]) and same(opt.state[p]["exp_avg"], r[2])
    want = spec.win_rate(wins, sum(x[0].size for x in leaves), np.float32)
    assert same(opt.diagnostics()[0]["win_rate"], np.asarray(want))


def test_native_cpu_kernel_is_built_on_this_machine():
    """CI has a compiler and ninja: a silent fallback to the compiled kernel would hide a break."""
    from sophia.torch import _native

    assert _native.fused_step_op() is not None


def test_native_kernel_is_off_with_the_environment_switch(monkeypatch):
    from sophia.torch import _native

    monkeypatch.setenv("SOPHIA_TORCH_NATIVE", "0")
    assert _native.fused_step_op() is None


def test_fused_cpu_step_goes_through_the_native_kernel_once_per_group(monkeypatch):
    """Contiguous tensors of one dtype share one native call; non-contiguous ones do not."""
    from sophia.torch import _native

    real = _native.fused_step_op()
    calls = []

    def spy(ps, *rest):
        calls.append(len(ps))
        return real(ps, *rest)

    monkeypatch.setattr(_native, "fused_step_op", lambda: spy)
    leaves = random_state(4, [(5, 3), (7,), (2, 2)], np.float32, 0.1)
    opt, params = make_optimizer_with_state(leaves, **HP, fused=True)
    params[2].grad = t(leaves[2][1].T.copy()).T  # a non-contiguous gradient
    opt.step()
    assert calls == [2]
    kw = reference_kwargs(**HP)
    for leaf, p in zip(leaves, params):
        want, _, _ = ref_update(*leaf, **kw)
        assert same(p, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_native_kernel_across_chunks_and_threads_gives_the_reference(dtype):
    """Tensors spanning several of the kernel's 2**16-element work items, on 2 threads."""
    leaves = random_state(9, [(2**17 + 3,), (3, 2**15 + 1), (5,)], dtype, 0.1)
    kw = reference_kwargs(**HP)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        opt, params = make_optimizer_with_state(leaves, **HP, fused=True)
        opt.step()
    finally:
        torch.set_num_threads(old)
    total = 0
    for leaf, p in zip(leaves, params):
        want_p, want_m, w = ref_update(*leaf, **kw)
        assert same(p, want_p) and same(opt.state[p]["exp_avg"], want_m)
        total += int(w)
    want_rate = spec.win_rate(total, sum(x[0].size for x in leaves), dtype)
    assert same(opt.diagnostics()[0]["win_rate"], np.asarray(want_rate))


def test_native_build_failure_warns_once_and_falls_back_to_the_same_bits(monkeypatch):
    from sophia.torch import _native

    def broken():
        raise OSError("no compiler here")

    monkeypatch.setattr(_native, "_build", broken)
    monkeypatch.setattr(_native, "_state", {})
    leaves = random_state(5, [(40, 3), (2,)], np.float32, 0.1)
    opt, params = make_optimizer_with_state(leaves, **HP, fused=True)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        opt.step()
    kw = reference_kwargs(**HP)
    for leaf, p in zip(leaves, params):
        assert same(p, ref_update(*leaf, **kw)[0])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # no second warning


def test_native_op_rejects_mismatched_inputs():
    from sophia.torch import _native

    op = _native.fused_step_op()
    p, g, m, h = (torch.zeros(4) for _ in range(4))
    coeffs = torch.zeros(6)
    with pytest.raises(RuntimeError, match="grads has 0 tensors"):
        op([p], [], [m], [h], coeffs)
    with pytest.raises(RuntimeError, match=r"hessians\[0\] must be a contiguous CPU tensor"):
        op([p], [g], [m], [torch.zeros(5)], coeffs)
    with pytest.raises(RuntimeError, match="coeffs must be 6 CPU scalars"):
        op([p], [g], [m], [h], torch.zeros(5))
    with pytest.raises(RuntimeError, match="compute dtype"):
        op([p], [g], [m], [h], torch.zeros(6, dtype=torch.float64))


def test_native_build_finds_the_ninja_package_off_path(monkeypatch):
    """An environment used without activation has ninja installed but not on PATH."""
    import ninja

    from sophia.torch import _native

    monkeypatch.setenv("PATH", "/nowhere")
    monkeypatch.setattr(_native.shutil, "which", lambda name: None)
    with _native._ninja_on_path():
        assert os.environ["PATH"].split(os.pathsep) == [ninja.BIN_DIR, "/nowhere"]
    assert os.environ["PATH"] == "/nowhere"
    monkeypatch.setattr(_native.shutil, "which", lambda name: "/usr/bin/ninja")
    with _native._ninja_on_path():
        assert os.environ["PATH"] == "/nowhere"

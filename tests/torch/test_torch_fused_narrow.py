"""The fused body over narrow state (native and compiled) against the NumPy spec, to the bit.

Twenty steps with a refresh every third (the spec's EMA, stored in the named
form), on tensors that span the native kernel's work items, the compiled
kernel's packing threshold and partial 8-bit blocks, one of them non-contiguous;
the fused body against the foreach one; and the step's peak extra memory,
measured in a fresh process as benchmarks/harness/memory.py does.
"""

import json
import os
import sys

import ml_dtypes
import numpy as np
import pytest
import torch

from sophia import narrow, spec
from sophia.torch import _fused, _native, sophia_g
from sophia.torch._blocks import DeviceGroup
from sophia.torch._scalars import Hyperparameters
from tests.helpers import REPO_ROOT, identical, run_module
from tests.torch.torchref import HP

BF16 = np.dtype(ml_dtypes.bfloat16)
NP_OF = {torch.float32: np.float32, torch.float64: np.float64, torch.bfloat16: BF16}
NP_OF[torch.float16] = np.float16
#: (7,) and (4, 5) are packed by the compiled path; (3, 12000) is over its packing size, with
#: a partial last block; 70001 spans two of the native kernel's 2**16-element work items.
NATIVE_SHAPES = [(7,), (4, 5), (3, 12000), (70001,)]
COMPILED_SHAPES = [(7,), (4, 5), (3, 12000)]
STEPS, EVERY = 20, 3
SEED = 1234


def to_torch(x):
    """A torch copy of a NumPy array, bfloat16 through its bit pattern."""
    x = np.ascontiguousarray(x)
    if x.dtype == BF16:
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(x.copy())


def to_numpy(x, dtype):
    """A NumPy copy of a tensor in ``dtype``, bfloat16 through its bit pattern."""
    x = x.detach().contiguous()
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(BF16).copy()
    return x.numpy().astype(dtype)


def stored_dtype(form, param_dtype):
    return {None: param_dtype, "float32": np.float32, "bfloat16": BF16}[form]


def spec_kwargs():
    return {
        "lr": HP["lr"],
        "b1": HP["betas"][0],
        "rho": HP["rho"],
        "bs": HP["bs"],
        "weight_decay": HP["weight_decay"],
        "eps": HP["eps"],
    }


def run(shapes, torch_dtype, mu_dtype, hessian_dtype, transposed=False):
    """STEPS fused steps and the spec's, side by side; asserts every step's bits."""
    pd = NP_OF[torch_dtype]
    rng = np.random.default_rng(7)
    theta = [rng.normal(size=s).astype(pd) for s in shapes]
    m = [rng.normal(size=s).astype(stored_dtype(mu_dtype, pd)) for s in shapes]
    if hessian_dtype == narrow.BLOCK8:
        h = [
            narrow.Block8(
                np.zeros(s, np.int8), np.zeros(narrow.block_count(np.prod(s)), np.float32)
            )
            for s in shapes
        ]
    else:
        h = [np.zeros(s, stored_dtype(hessian_dtype, pd)) for s in shapes]
    params = [to_torch(x) for x in theta]
    if transposed:  # the second tensor as a non-contiguous view of the same values
        params[1] = to_torch(theta[1].T.copy()).T
    ms = [to_torch(x) for x in m]
    steps = [torch.tensor(0.0) for _ in shapes]
    hyper = Hyperparameters(
        HP["lr"], HP["betas"][0], HP["rho"], HP["bs"], HP["weight_decay"], HP["eps"], False
    )
    wins_total = 0
    for step in range(STEPS):
        if step % EVERY == 0:
            for i, s in enumerate(shapes):
                h_hat = rng.normal(size=s).astype(pd)
                h_hat.flat[::5] = 0
                h[i] = spec.hessian_ema(
                    h[i],
                    h_hat,
                    HP["betas"][1],
                    hessian_dtype=hessian_dtype,
                    compute=pd,
                    seed=SEED,
                    step=step,
                )
        grads = [rng.normal(size=s).astype(pd) for s in shapes]
        if hessian_dtype == narrow.BLOCK8:
            hs, scales = [to_torch(x.codes) for x in h], [to_torch(x.scale) for x in h]
        else:
            hs, scales = [to_torch(x) for x in h], None
        group = DeviceGroup(
            torch.device("cpu"), torch_dtype, params, [to_torch(g) for g in grads], ms, hs, steps
        )
        counts = _fused.fused_sophia_g(
            group,
            hyper,
            hessian_scales=scales,
            mu_dtype=mu_dtype,
            hessian_dtype=hessian_dtype,
            seed=SEED,
        )
        torch._foreach_add_(steps, 1)
        wins = 0
        for i in range(len(shapes)):
            theta[i], m[i], w = spec.sophia_update(
                theta[i],
                grads[i],
                m[i],
                h[i],
                **spec_kwargs(),
                mu_dtype=mu_dtype,
                seed=SEED,
                step=step,
            )
            wins += w
            assert identical(to_numpy(params[i], pd), theta[i]), (step, i, "theta")
            assert identical(to_numpy(ms[i], m[i].dtype), m[i]), (step, i, "m")
        assert int(sum(int(c) for c in counts)) == wins, step
        wins_total += wins
    # both branches of the clip taken
    assert 0 < wins_total < STEPS * sum(int(np.prod(s)) for s in shapes)


FORMS = [
    (mu, hd)
    for mu in (None, "float32", "bfloat16")
    for hd in (None, "float32", "bfloat16", "block8")
    if (mu, hd) != (None, None)
]


@pytest.mark.parametrize("mu_dtype, hessian_dtype", FORMS)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str
)
def test_native_kernel_over_narrow_state_is_the_spec(dtype, mu_dtype, hessian_dtype, monkeypatch):
    calls = []
    real = _native.fused_step_narrow_op()
    assert real is not None
    monkeypatch.setattr(
        _native, "fused_step_narrow_op", lambda: lambda *a: calls.append(1) or real(*a)
    )
    run(NATIVE_SHAPES, dtype, mu_dtype, hessian_dtype)
    plain = mu_dtype != "bfloat16" and hessian_dtype != "block8"
    same_dtype = {None, {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype)}
    if plain and {mu_dtype, hessian_dtype} <= same_dtype:
        assert not calls  # the state is the default's: the default kernel ran
    else:
        assert len(calls) == STEPS


@pytest.mark.parametrize(
    "dtype, mu_dtype, hessian_dtype",
    [
        (torch.float32, "bfloat16", "block8"),
        (torch.float64, "float32", "bfloat16"),
        (torch.bfloat16, "bfloat16", "float32"),
    ],
    ids=str,
)
def test_compiled_kernel_over_narrow_state_is_the_spec(dtype, mu_dtype, hessian_dtype, monkeypatch):
    monkeypatch.setenv("SOPHIA_TORCH_NATIVE", "0")
    run(COMPILED_SHAPES, dtype, mu_dtype, hessian_dtype, transposed=True)


def test_native_kernel_non_contiguous_tensor_goes_through_the_packed_kernel():
    run([(7,), (9, 30), (300,)], torch.float32, "bfloat16", "block8", transposed=True)


def test_block8_without_scales_is_a_value_error():
    p = [torch.zeros(4)]
    group = DeviceGroup(
        torch.device("cpu"),
        torch.float32,
        p,
        p,
        p,
        [torch.zeros(4, dtype=torch.int8)],
        [torch.tensor(0.0)],
    )
    hyper = Hyperparameters(1e-3, 0.9, 0.04, 1.0, 0.0, 1e-12, False)
    with pytest.raises(ValueError, match="hessian_scales: None"):
        _fused.fused_sophia_g(group, hyper, hessian_dtype="block8")


def test_native_narrow_op_rejects_mismatched_inputs():
    op = _native.fused_step_narrow_op()
    p, g, m = (torch.zeros(300) for _ in range(3))
    codes, c = torch.zeros(300, dtype=torch.int8), torch.zeros(6)
    with pytest.raises(RuntimeError, match=r"hessian_scales\[0\] must be"):
        op([p], [g], [m], [codes], [torch.zeros(1)], [], c, 0, False)
    with pytest.raises(RuntimeError, match="hessian_scales has 0 tensors"):
        op([p], [g], [m], [codes], [], [], c, 0, False)
    with pytest.raises(RuntimeError, match="stochastic rounding stores exp_avgs in bfloat16"):
        op([p], [g], [m], [p.clone()], [], [torch.tensor(0.0)], c, 0, True)
    with pytest.raises(RuntimeError, match="steps has 0 tensors"):
        op([p], [g], [m.bfloat16()], [p.clone()], [], [], c, 0, True)
    with pytest.raises(RuntimeError, match="seed"):
        op([p], [g], [m], [p.clone()], [], [], c, 2**32, False)


def _foreach_and_fused_inputs(shapes):
    """(params, grads, bfloat16 m, block8 codes, scales, steps), drawn alike each call."""
    gen = np.random.default_rng(3)
    params, grads = (
        [to_torch(gen.normal(size=s).astype(np.float32)) for s in shapes] for _ in "pg"
    )
    ms = [to_torch(gen.normal(size=s).astype(BF16)) for s in shapes]
    blocks = [
        narrow.encode_block8(gen.normal(size=s).astype(np.float32), narrow.random_bits(1, 0, 1, s))
        for s in shapes
    ]
    codes, scales = [to_torch(b.codes) for b in blocks], [to_torch(b.scale) for b in blocks]
    steps = [torch.tensor(float(gen.integers(0, 50))) for _ in shapes]
    return params, grads, ms, codes, scales, steps


@pytest.mark.parametrize("native", [True, False], ids=["native", "compiled"])
def test_fused_body_equals_the_foreach_body(native, monkeypatch):
    """Same inputs through sophia_g(foreach=True) and the fused body: the same bits."""
    if not native:
        monkeypatch.setenv("SOPHIA_TORCH_NATIVE", "0")
    shapes = [(7,), (3, 12000)]
    kw = {"lr": HP["lr"], "beta1": HP["betas"][0], "rho": HP["rho"], "bs": HP["bs"]}
    kw |= {"weight_decay": HP["weight_decay"], "eps": HP["eps"], "maximize": False}
    forms = {"mu_dtype": "bfloat16", "hessian_dtype": "block8", "seed": SEED}
    pa, ga, ma, ha, sa, steps_a = _foreach_and_fused_inputs(shapes)
    wins_a = sophia_g(pa, ga, ma, ha, steps_a, foreach=True, hessian_scales=sa, **kw, **forms)
    pb, gb, mb, hb, sb, steps_b = _foreach_and_fused_inputs(shapes)
    group = DeviceGroup(torch.device("cpu"), torch.float32, pb, gb, mb, hb, steps_b)
    counts = _fused.fused_sophia_g(group, Hyperparameters(*kw.values()), hessian_scales=sb, **forms)
    assert int(wins_a) == sum(int(c) for c in counts)
    for x, y in zip(pa + ma, pb + mb):
        assert identical(to_numpy(x, np.float32), to_numpy(y, np.float32))


#: Parameters of the memory probe: four float32 tensors of 2**20 elements.
PROBE_N, PROBE_K = 1 << 20, 4


def _peak_extra(form):
    """The fused step's peak extra RSS (bytes) over 3 calls, in this (fresh) process."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from harness import memory

    gen = torch.Generator().manual_seed(0)
    n, k = PROBE_N, PROBE_K
    params, grads = ([torch.randn(n, generator=gen) for _ in range(k)] for _ in range(2))
    ms = [torch.randn(n, generator=gen).bfloat16() for _ in range(k)]
    if form == "block8":
        hs = [torch.randint(-127, 128, (n,), dtype=torch.int8, generator=gen) for _ in range(k)]
        scales = [torch.rand(narrow.block_count(n), generator=gen) for _ in range(k)]
    else:
        hs, scales = [torch.rand(n, generator=gen).bfloat16() for _ in range(k)], None
    group = DeviceGroup(
        torch.device("cpu"),
        torch.float32,
        params,
        grads,
        ms,
        hs,
        [torch.tensor(2.0) for _ in range(k)],
    )
    hyper = Hyperparameters(1e-4, 0.965, 0.04, 5120.0, 0.1, 1e-15, False)

    def step():
        _fused.fused_sophia_g(
            group, hyper, hessian_scales=scales, mu_dtype="bfloat16", hessian_dtype=form, seed=1
        )

    step()  # builds or compiles the kernel
    extras, _ = memory.peak_extra_bytes(step, 3)
    return max(extras)


def test_native_step_over_narrow_state_makes_no_full_size_temporary():
    """bfloat16 m with a bfloat16 or block8 h. (The compiled path is one inductor loop too, but
    a fresh process compiles it again, which costs more than CI's budget for this file.)"""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from harness import memory

    env = {**memory.PROBE_ENV, "SOPHIA_TORCH_NATIVE": "1"}
    res = run_module(
        "tests.torch.test_torch_fused_narrow", "bfloat16", "block8", env=env, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    peaks = json.loads(res.stdout.strip().splitlines()[-1])
    # a float32 copy of one tensor's m or h would be 4 MiB
    for form, peak in peaks.items():
        assert peak < PROBE_N, (form, peak)


if __name__ == "__main__":
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(json.dumps({form: _peak_extra(form) for form in sys.argv[1:]}))


@pytest.mark.parametrize("native", ["1", "0"], ids=["native", "compiled"])
def test_special_values_round_and_decode_as_the_spec(native, monkeypatch):
    """inf, NaN, subnormal and near-overflow momenta; a block whose scale is NaN or inf."""
    monkeypatch.setenv("SOPHIA_TORCH_NATIVE", native)
    shapes = [(7,), (3, 12000)]  # packed and whole on the compiled path
    rng = np.random.default_rng(11)
    specials = np.array([np.inf, -np.inf, np.nan, 3.3e38, -3.3e38, 1e-40, -0.0], np.float32)
    theta, g, m, h = [], [], [], []
    for s in shapes:
        n = int(np.prod(s))
        theta.append(rng.normal(size=s).astype(np.float32))
        gi = rng.normal(size=n).astype(np.float32)
        mi = rng.normal(size=n).astype(np.float32)
        gi[: specials.size], mi[: specials.size] = specials, specials
        g.append(gi.reshape(s))
        m.append(mi.reshape(s).astype(BF16))
        hv = rng.normal(size=n).astype(np.float32)
        hv[1] = np.nan  # the first block's scale is NaN
        if n > 600:
            hv[300] = np.inf  # the second block's is inf
        h.append(narrow.encode_block8(hv.reshape(s), narrow.random_bits(2, 0, 1, s)))
    params, ms = [to_torch(x) for x in theta], [to_torch(x) for x in m]
    steps = [torch.tensor(5.0) for _ in shapes]
    group = DeviceGroup(
        torch.device("cpu"),
        torch.float32,
        params,
        [to_torch(x) for x in g],
        ms,
        [to_torch(x.codes) for x in h],
        steps,
    )
    hyper = Hyperparameters(
        HP["lr"], HP["betas"][0], HP["rho"], HP["bs"], HP["weight_decay"], HP["eps"], False
    )
    scales = [to_torch(x.scale) for x in h]
    counts = _fused.fused_sophia_g(
        group, hyper, hessian_scales=scales, mu_dtype="bfloat16", hessian_dtype="block8", seed=SEED
    )
    wins = 0
    for i in range(len(shapes)):
        want_t, want_m, w = spec.sophia_update(
            theta[i], g[i], m[i], h[i], **spec_kwargs(), mu_dtype="bfloat16", seed=SEED, step=5
        )
        wins += w
        assert identical(to_numpy(params[i], np.float32), want_t)
        assert identical(to_numpy(ms[i], BF16), want_m)
    assert sum(int(c) for c in counts) == wins
    assert not np.all(np.isfinite(to_numpy(ms[0], np.float32)))  # the specials got through

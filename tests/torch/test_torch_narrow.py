"""The narrow optimizer state in torch against the NumPy spec (sophia.narrow), bit for bit.

First the rounding functions of sophia.torch._narrow (eager, and compiled by
inductor), then SophiaG and sophia_g with every pair of forms.
"""

import ml_dtypes
import numpy as np
import pytest
import torch

from sophia import narrow, spec
from sophia.torch import _narrow as tn
from tests import block8_cases
from tests.torch.torchref import n, same, t

F32 = np.float32
MAX = float(np.finfo(F32).max)
TINY_SUB = float(np.float32(1e-45))
#: Every special float32: signed zeros, subnormals, the smallest normal, the largest
#: finite, infinities, NaN, and values between bfloat16 neighbours.
SPECIALS = np.float32(
    [0.0, -0.0, TINY_SUB, -TINY_SUB, 2.0**-133, 1.1754942e-38, 1.1754944e-38, MAX, -MAX]
    + [np.inf, -np.inf, np.nan, 1.0, -2.5, 1.0 + 2**-10, -3.3, 7.1e-3, 3.3e38]
)


def _np_bits(bits):
    return torch.from_numpy(bits.astype(np.int64))


def _bf16_as_f32(x):
    """A bfloat16 array/tensor as float32 NumPy (exact), for the bitwise comparison."""
    if isinstance(x, torch.Tensor):
        return n(x)
    x = np.asarray(x)
    return x.astype(F32) if x.dtype == ml_dtypes.bfloat16 else x


# ----------------------------------------------------------------------------- random bits


@pytest.mark.parametrize(
    "seed,step,stream", [(0, 0, 0), (1, 0, 1), (2**32 - 1, 10**9, 1), (7, 3, 0)]
)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 300)])
def test_random_bits_equal_the_spec(seed, step, stream, shape):
    want = narrow.random_bits(seed, step, stream, shape).astype(np.int64)
    for s in (step, torch.tensor(step, dtype=torch.int64)):
        got = tn.random_bits(seed, s, stream, shape)
        assert got.dtype == torch.int64 and tuple(got.shape) == shape
        assert np.array_equal(got.numpy(), want)


def test_random_bits_from_a_step_tensor_kept_on_device(monkeypatch):
    """The tensor path of an accelerator's (or a compiled step's) counter: the same bits."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for step in (0.0, 5.0, 2.0**24):
        key = tn.stream_key(11, torch.tensor(step), narrow.STREAM_HESSIAN)
        assert isinstance(key, torch.Tensor)
        got = tn.bits_of_key(key, 40, torch.device("cpu"))
        want = narrow.random_bits(11, int(step), narrow.STREAM_HESSIAN, (40,))
        assert np.array_equal(got.numpy(), want.astype(np.int64))


def test_random_bits_of_a_slice_are_those_of_the_whole():
    whole = tn.random_bits(3, 2, 0, (1000,))
    assert torch.equal(tn.random_bits(3, 2, 0, (256,), offset=512), whole[512:768])


# ----------------------------------------------------------------------------- bfloat16


@pytest.mark.parametrize("step", range(6))
def test_round_bfloat16_equals_the_spec_on_special_and_random_values(step):
    rng = np.random.default_rng(step)
    x = np.concatenate(
        [
            SPECIALS,
            rng.normal(size=500).astype(F32) * F32(10.0) ** rng.integers(-40, 38, 500).astype(F32),
        ]
    )
    bits = narrow.random_bits(9, step, 0, x.shape)
    want = narrow.round_bfloat16(x, bits)
    got = tn.round_bfloat16(torch.from_numpy(x), _np_bits(bits))
    assert got.dtype == torch.bfloat16
    assert same(_bf16_as_f32(got), _bf16_as_f32(want))


# ----------------------------------------------------------------------------- 8-bit blocks


def _blocks_case(name):
    """Float32 arrays whose blocks exercise every branch of the spec's encode_block8."""
    rng = np.random.default_rng(len(name))
    normal = rng.normal(size=700).astype(F32)
    cases = {
        "random_partial_last_block": normal,
        "zero_blocks": np.zeros(600, F32),
        "negatives": -np.abs(normal),
        "signed_zeros_and_a_zero_block": np.concatenate([np.full(256, -0.0, F32), normal[:300]]),
        "non_finite_blocks": np.concatenate(
            [normal[:256], np.float32([np.inf]), normal[:255], np.float32([np.nan]), normal[:10]]
        ),
        "specials": np.tile(SPECIALS, 20),
        "largest_finite": np.float32([MAX, -MAX, 1.0, 0.0] * 70),
        "subnormals": np.float32([TINY_SUB, -TINY_SUB, 2.0**-140, 0.0] * 70),
        "one_coordinate": np.float32([-0.3]),
        "empty": np.zeros(0, F32),
        "matrix": normal[:600].reshape(20, 30),
    }
    return cases[name]


@pytest.mark.parametrize(
    "case",
    [
        "random_partial_last_block",
        "zero_blocks",
        "negatives",
        "signed_zeros_and_a_zero_block",
        "non_finite_blocks",
        "specials",
        "largest_finite",
        "subnormals",
        "one_coordinate",
        "empty",
        "matrix",
    ],
)
def test_block8_encode_and_decode_equal_the_spec(case):
    x = _blocks_case(case)
    with np.errstate(invalid="ignore", over="ignore"):
        for step in range(3):
            bits = narrow.random_bits(4, step, 1, x.shape)
            want = narrow.encode_block8(x, bits)
            codes, scale = tn.encode_block8(torch.from_numpy(x), _np_bits(bits))
            assert codes.dtype == torch.int8 and scale.dtype == torch.float32
            assert same(codes, want.codes) and same(scale, want.scale)
            assert scale.shape == (narrow.block_count(x.size),)
            assert same(tn.decode_block8(codes, scale), narrow.decode_block8(want))


@pytest.mark.parametrize("compiled", [False, True])
def test_block8_square_root_edges_equal_the_spec(compiled):
    """v on, and one ulp either side of, every perfect square, at 127**2 and above it, below 1
    (subnormal v too); eager and compiled by inductor, whose division and sqrt must stay exact."""

    def both(x, bits):
        codes, scale = tn.encode_block8(x, bits)
        return codes, scale, tn.decode_block8(codes, scale)

    fn = torch.compile(both, fullgraph=True) if compiled else both
    x = block8_cases.square_root_edges(subnormal=True)
    for bits in block8_cases.edge_bits(x):
        want = narrow.encode_block8(x, bits)
        codes, scale, h = fn(torch.from_numpy(x), _np_bits(bits))
        assert same(codes, want.codes) and same(scale, want.scale)
        assert same(h, narrow.decode_block8(want))


def test_block8_decode_of_a_slice_on_a_block_boundary():
    x = np.random.default_rng(0).normal(size=(3, 400)).astype(F32)
    codes, scale = tn.encode_block8(torch.from_numpy(x), tn.random_bits(1, 0, 1, x.shape))
    whole = tn.decode_block8(codes, scale).reshape(-1)
    piece = tn.decode_block8(codes.reshape(-1)[512:1000], scale[2:4])
    assert same(piece, whole[512:1000])


# ----------------------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("form", [None, "float32", "bfloat16", "block8"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_encode_and_decode_equal_the_spec(form, dtype):
    x = np.random.default_rng(1).normal(size=(5, 70)).astype(dtype) * dtype(1e-3)
    want = narrow.encode(x, form, dtype, 21, 4, narrow.STREAM_HESSIAN)
    got = tn.encode(t(x), form, t(x).dtype, 21, 4, narrow.STREAM_HESSIAN)
    compute = torch.float64 if dtype == np.float64 else torch.float32
    if form == "block8":
        assert same(got[0], want.codes) and same(got[1], want.scale)
    else:
        assert same(_bf16_as_f32(got), _bf16_as_f32(want))
        assert (
            got.dtype == {None: compute, "float32": torch.float32, "bfloat16": torch.bfloat16}[form]
        )
    assert same(tn.decode(got, compute), narrow.decode(want, dtype))


def test_storage_dtypes():
    assert tn.storage_dtype(None, torch.bfloat16) == torch.bfloat16
    assert tn.storage_dtype("float32", torch.bfloat16) == torch.float32
    assert tn.storage_dtype("float32", torch.complex128) == torch.complex64
    assert tn.storage_dtype("bfloat16", torch.float64) == torch.bfloat16
    assert tn.storage_dtype("block8", torch.float32) == torch.int8


def test_the_rounding_compiles_to_the_same_bits():
    """inductor on CPU (as the compiled fused path uses them): the spec's bits, step as a tensor."""

    def both(x, step):
        m = tn.encode(x, "bfloat16", torch.float32, 5, step, narrow.STREAM_MU)
        codes, scale = tn.encode(x, "block8", torch.float32, 5, step, narrow.STREAM_HESSIAN)
        return m, codes, scale, tn.decode_block8(codes, scale)

    compiled = torch.compile(both, dynamic=True, fullgraph=True)
    x = np.concatenate([SPECIALS[:9], np.random.default_rng(2).normal(size=600).astype(F32)])
    for step in (0, 7):
        m, codes, scale, h = compiled(torch.from_numpy(x), torch.tensor(float(step)))
        bits_mu = narrow.random_bits(5, step, narrow.STREAM_MU, x.shape)
        bits_h = narrow.random_bits(5, step, narrow.STREAM_HESSIAN, x.shape)
        want = narrow.encode_block8(x, bits_h)
        assert same(_bf16_as_f32(m), _bf16_as_f32(narrow.round_bfloat16(x, bits_mu)))
        assert same(codes, want.codes) and same(scale, want.scale)
        assert same(h, narrow.decode_block8(want))


def test_bfloat16_of_ml_dtypes_and_torch_agree_on_exact_values():
    """The comparison's premise: a bfloat16 value read as float32 is its exact value in both."""
    x = np.float32([1.0, -2.5, 3.0e38, 2.0**-133])
    assert same(n(torch.from_numpy(x).to(torch.bfloat16)), x.astype(ml_dtypes.bfloat16).astype(F32))


# ----------------------------------------------------------------------------- SophiaG

HYPER = {"lr": 3e-2, "betas": (0.9, 0.97), "rho": 0.037, "weight_decay": 0.13, "bs": 333}
BF16 = np.dtype(ml_dtypes.bfloat16)
NP_OF = {torch.float32: F32, torch.float64: np.float64, torch.bfloat16: BF16}
#: 561 and 1200 coordinates cut into flat slices (a partial last block each) when the CPU
#: block is patched to 512 (see sliced).
SHAPES = [(), (3, 0), (7,), (33, 17), (40, 30)]
FORMS = [
    (mu, h) for mu in (None, "float32", "bfloat16") for h in (None, "float32", "bfloat16", "block8")
]
PATHS = {"single": {"foreach": False}, "foreach": {"foreach": True}}


@pytest.fixture
def sliced(monkeypatch):
    """CPU blocks of 512 elements: the bodies' flat slices run on these small tensors too."""
    from sophia.torch import _blocks

    monkeypatch.setattr(_blocks, "_CPU_BLOCK", 512)


class NarrowReference:
    """The spec's NumPy driver: spec.hessian_ema and spec.sophia_update with narrow forms."""

    def __init__(self, thetas, mu_dtype, hessian_dtype, seed, maximize=False):
        self.p = [np.array(x) for x in thetas]
        self.mu_dtype, self.hessian_dtype, self.seed = mu_dtype, hessian_dtype, seed
        self.maximize = maximize
        self.m = [np.zeros_like(x, dtype=mu_dtype or x.dtype) for x in self.p]
        self.h = [self._zero_h(x) for x in self.p]
        self.step_index = 0

    def _zero_h(self, x):
        if self.hessian_dtype == "block8":
            return narrow.Block8(
                np.zeros(x.shape, np.int8), np.zeros(narrow.block_count(x.size), F32)
            )
        return np.zeros_like(x, dtype=self.hessian_dtype or x.dtype)

    def refresh(self, h_hats):
        self.h = [
            narrow_ema(h, e, x.dtype, self.hessian_dtype, self.seed, self.step_index)
            for h, e, x in zip(self.h, h_hats, self.p)
        ]

    def step(self, grads):
        for i, g in enumerate(grads):
            self.p[i], self.m[i], _ = spec.sophia_update(
                self.p[i],
                g,
                self.m[i],
                self.h[i],
                lr=HYPER["lr"],
                b1=HYPER["betas"][0],
                rho=HYPER["rho"],
                bs=HYPER["bs"],
                weight_decay=HYPER["weight_decay"],
                eps=spec.DEFAULTS.eps,
                maximize=self.maximize,
                mu_dtype=self.mu_dtype,
                seed=self.seed,
                step=self.step_index,
            )
        self.step_index += 1


def narrow_ema(h, h_hat, param_dtype, form, seed, step):
    return spec.hessian_ema(
        h, h_hat, HYPER["betas"][1], hessian_dtype=form, compute=param_dtype, seed=seed, step=step
    )


def _draws(seed, thetas, steps):
    rng = np.random.default_rng(seed)
    grads = [[np.asarray(rng.normal(size=x.shape), x.dtype) for x in thetas] for _ in range(steps)]
    # negative (Hutchinson-like) estimates and zeros too
    h_hats = [
        [np.asarray(rng.normal(size=x.shape) * 1e-2 + 5e-3, F32) for x in thetas]
        for _ in range(steps)
    ]
    return grads, h_hats


def _thetas(dtype, shapes=SHAPES, seed=0):
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.normal(size=s), F32).astype(NP_OF[dtype]) for s in shapes]


def _assert_state_equal(opt, params, ref):
    for i, p in enumerate(params):
        st = opt.state[p]
        assert same(
            n(p), np.asarray(ref.p[i]).astype(F32 if ref.p[i].dtype == BF16 else ref.p[i].dtype)
        ), i
        assert same(_bf16_as_f32(st["exp_avg"]), _bf16_as_f32(ref.m[i])), i
        want_h = ref.h[i]
        if isinstance(want_h, narrow.Block8):
            assert st["hessian"].dtype == torch.int8
            assert same(st["hessian"], want_h.codes) and same(st["hessian_scale"], want_h.scale), i
        else:
            assert "hessian_scale" not in st
            assert same(_bf16_as_f32(st["hessian"]), _bf16_as_f32(want_h)), i


def _run(dtype, mu, hd, path, steps=20, seed=5, maximize=False, shapes=SHAPES, **kw):
    from sophia.torch import SophiaG

    thetas = _thetas(dtype, shapes)
    grads, h_hats = _draws(seed, thetas, steps)
    names = (
        narrow.state_dtype_name(k, v, narrow.HESSIAN_DTYPES) for k, v in (("mu", mu), ("h", hd))
    )
    ref = NarrowReference(thetas, *names, seed, maximize)
    params = [torch.nn.Parameter(torch.from_numpy(x.astype(F32)).to(dtype)) for x in thetas]
    opt = SophiaG(
        params,
        **HYPER,
        maximize=maximize,
        mu_dtype=mu,
        hessian_dtype=hd,
        seed=seed,
        **PATHS[path],
        **kw,
    )
    for step in range(steps):
        if step % 3 == 0 or step == 10:  # k = 3, and once off the grid
            ref.refresh(h_hats[step])
            opt.update_hessian(
                hessian=[torch.from_numpy(e) for e in h_hats[step]], allow_repeat=True
            )
        ref.step(grads[step])
        for p, g in zip(params, grads[step]):
            p.grad = torch.from_numpy(g.astype(F32) if g.dtype == BF16 else g).to(dtype)
        opt.step()
    return opt, params, ref


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("mu,hd", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steps_equal_the_spec_bit_for_bit(dtype, mu, hd, path, sliced):
    opt, params, ref = _run(dtype, mu, hd, path)
    _assert_state_equal(opt, params, ref)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("mu,hd", [("bfloat16", "block8"), ("float32", "bfloat16")])
def test_float64_and_maximize_equal_the_spec(mu, hd, path, sliced):
    """float64 parameters round to float32 first, then stochastically (the spec's order)."""
    opt, params, ref = _run(torch.float64, mu, hd, path, steps=8, maximize=True)
    _assert_state_equal(opt, params, ref)


def test_a_torch_dtype_works_like_its_name():
    a = _run(torch.float32, torch.bfloat16, torch.bfloat16, "foreach", steps=4)
    b = _run(torch.float32, "bfloat16", "bfloat16", "foreach", steps=4)
    assert a[0].param_groups[0]["mu_dtype"] == "bfloat16" == a[0].param_groups[0]["hessian_dtype"]
    _assert_state_equal(*a)
    for pa, pb in zip(a[1], b[1]):
        assert same(pa, pb) and same(n(a[0].state[pa]["exp_avg"]), n(b[0].state[pb]["exp_avg"]))


def test_capturable_steps_equal_the_spec():
    opt, params, ref = _run(
        torch.float32, "bfloat16", "block8", "foreach", steps=7, capturable=True
    )
    _assert_state_equal(opt, params, ref)


def test_state_bytes_of_the_forms():
    from sophia.torch import SophiaG

    shapes = [(1000,), (256,), (3, 5)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = SophiaG(params, mu_dtype="bfloat16", hessian_dtype="block8")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    for p in params:
        st, size = opt.state[p], p.numel()
        assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg"].element_size() == 2
        h_bytes = st["hessian"].nbytes + st["hessian_scale"].nbytes
        assert h_bytes == size + 4 * -(-size // 256) == narrow.state_bytes(size, "block8", 4)
        assert st["exp_avg"].nbytes == narrow.state_bytes(size, "bfloat16", 4) == 2 * size


def test_gnb_refresh_with_block8_writes_a_nonzero_hessian():
    from sophia.torch import SophiaG

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 5)
    opt = SophiaG(model.parameters(), hessian_dtype="block8", mu_dtype="bfloat16", seed=3)
    logits = model(torch.randn(16, 8))
    opt.update_hessian(logits=logits, generator=torch.Generator().manual_seed(1))
    for p in model.parameters():
        st = opt.state[p]
        assert st["hessian"].dtype == torch.int8 and bool((st["hessian"] != 0).any())
        assert bool((st["hessian_scale"] > 0).all())
    diag = opt.diagnostics()[0]
    decoded = [
        tn.decode_block8(opt.state[p]["hessian"], opt.state[p]["hessian_scale"])
        for p in model.parameters()
    ]
    want = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(h) for h in decoded]))
    assert same(diag["hessian_norm"], want) and float(want) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_resumes_bit_identically(dtype):
    import copy

    from sophia.torch import SophiaG

    opt, params, _ = _run(dtype, "bfloat16", "block8", "foreach", steps=5)
    saved = copy.deepcopy(opt.state_dict())
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = SophiaG(twins, **HYPER, mu_dtype="bfloat16", hessian_dtype="block8", foreach=True)
    twin.load_state_dict(saved)
    assert twin.param_groups[0]["seed"] == 5
    for p, q in zip(params, twins):
        for key in ("exp_avg", "hessian", "hessian_scale", "step"):
            a, b = opt.state[p][key], twin.state[q][key]
            assert a.dtype == b.dtype and same(_bf16_as_f32(a), _bf16_as_f32(b)), key
    for step in range(4):
        grads = [
            torch.randn(p.shape, generator=torch.Generator().manual_seed(step)) for p in params
        ]
        if step == 1:
            for o in (opt, twin):
                o.update_hessian(hessian=[g * g for g in grads])
        for o, ps in ((opt, params), (twin, twins)):
            for p, g in zip(ps, grads):
                p.grad = g.to(dtype)
            o.step()
    for p, q in zip(params, twins):
        assert same(p, q)
        assert same(opt.state[p]["hessian"], twin.state[q]["hessian"])
        assert same(_bf16_as_f32(opt.state[p]["exp_avg"]), _bf16_as_f32(twin.state[q]["exp_avg"]))


def test_load_into_other_forms_fails_and_changes_nothing():
    from sophia.torch import SophiaG

    opt, params, _ = _run(torch.float32, "bfloat16", "block8", "single", steps=3)
    saved = opt.state_dict()
    other = SophiaG(
        [torch.nn.Parameter(p.detach().clone()) for p in params], hessian_dtype="block8"
    )
    before = copy_groups(other)
    with pytest.raises(
        ValueError, match=r"mu_dtype='bfloat16' but this optimizer has mu_dtype=None"
    ):
        other.load_state_dict(saved)
    assert copy_groups(other) == before and not other.state


def copy_groups(opt):
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def test_an_old_state_dict_loads_as_forms_none_and_seed_zero():
    from sophia.torch import SophiaG

    opt, params, _ = _run(torch.float32, None, None, "foreach", steps=3)
    saved = opt.state_dict()
    for g in saved["param_groups"]:
        for key in ("mu_dtype", "hessian_dtype", "seed"):
            del g[key]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    plain = SophiaG(twins, seed=9)
    plain.load_state_dict(saved)
    group = plain.param_groups[0]
    assert (group["mu_dtype"], group["hessian_dtype"], group["seed"]) == (None, None, 0)
    with pytest.raises(
        ValueError, match="hessian_dtype=None but this optimizer has hessian_dtype='block8'"
    ):
        SophiaG(twins, hessian_dtype="block8").load_state_dict(saved)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mu_dtype": "block8"}, r"Invalid mu_dtype: 'block8' \(allowed: None"),
        ({"hessian_dtype": "float16"}, r"Invalid hessian_dtype: 'float16'"),
        ({"hessian_dtype": torch.float16}, r"Invalid hessian_dtype: torch.float16"),
        ({"seed": -1}, r"Invalid seed: -1 \(allowed: an integer in \[0, 2\*\*32\)\)"),
        ({"seed": 1.5}, r"Invalid seed: 1.5"),
    ],
)
def test_bad_forms_fail_naming_the_argument(kwargs, match):
    from sophia.torch import SophiaG

    with pytest.raises(ValueError, match=match):
        SophiaG([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_stochastic_forms_on_complex_parameters_fail_and_change_nothing():
    from sophia.torch import SophiaG

    opt = SophiaG([torch.nn.Parameter(torch.zeros(3))], mu_dtype="bfloat16")
    z = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(
        ValueError,
        match=r"Invalid mu_dtype: 'bfloat16' for complex parameters \(allowed: None or "
        r"'float32' for complex parameters\)",
    ):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match=r"Invalid hessian_dtype: 'block8' for complex"):
        SophiaG([z], hessian_dtype="block8")


@pytest.mark.parametrize("path", list(PATHS))
def test_complex_parameters_in_float32_forms(path):
    """complex128 in the float32 forms: complex64 state, the math in float64 on real pairs."""
    from sophia.torch import SophiaG

    z = torch.nn.Parameter(
        torch.randn(6, dtype=torch.complex128, generator=torch.Generator().manual_seed(0))
    )
    real = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    opts = [
        SophiaG([z], **HYPER, mu_dtype="float32", hessian_dtype="float32", **PATHS[path]),
        SophiaG([real], **HYPER, mu_dtype="float32", hessian_dtype="float32", **PATHS[path]),
    ]
    for step in range(4):
        g = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        z.grad, real.grad = torch.view_as_complex(g.clone()), g.clone()
        if step % 2 == 0:
            opts[0].update_hessian(hessian=[g * g])
            opts[1].update_hessian(hessian=[g * g])
        for o in opts:
            o.step()
    assert opts[0].state[z]["exp_avg"].dtype == torch.complex64
    assert same(torch.view_as_real(z.detach()), real)
    assert same(torch.view_as_real(opts[0].state[z]["hessian"]), opts[1].state[real]["hessian"])


def test_functional_block8_needs_the_scales():
    from sophia.torch import sophia_g

    p = torch.zeros(3)
    with pytest.raises(ValueError, match="hessian_scales"):
        sophia_g(
            [p],
            [p],
            [p],
            [torch.zeros(3, dtype=torch.int8)],
            [torch.zeros(())],
            lr=0.1,
            beta1=0.9,
            rho=0.1,
            bs=1,
            weight_decay=0.0,
            eps=1e-12,
            maximize=False,
            hessian_dtype="block8",
        )


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_dtensor_parameters_take_float32_forms_but_no_stochastic_one(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from sophia.torch import SophiaG

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        p = torch.nn.Parameter(distribute_tensor(torch.arange(6.0), mesh, [Shard(0)]))
        for key in ("mu_dtype", "hessian_dtype"):
            with pytest.raises(ValueError, match=rf"Invalid {key}: 'bfloat16' for DTensor"):
                SophiaG([p], **{key: "bfloat16"})
        plain = torch.nn.Parameter(torch.arange(6.0))
        opts = [
            SophiaG([x], **HYPER, mu_dtype="float32", hessian_dtype="float32") for x in (p, plain)
        ]
        for o, x in zip(opts, (p, plain)):
            x.grad = torch.ones_like(x)
            o.update_hessian()
            o.step()
        assert same(p.full_tensor(), plain)
    finally:
        dist.destroy_process_group()


def test_group_forms_and_the_grad_square_refresh():
    """A group's own torch dtype becomes its name; update_hessian() writes the form too."""
    from sophia.torch import SophiaG

    a, b = (
        torch.nn.Parameter(torch.randn(300, generator=torch.Generator().manual_seed(i)))
        for i in (0, 1)
    )
    opt = SophiaG(
        [{"params": [a]}, {"params": [b], "hessian_dtype": torch.bfloat16}], **HYPER, seed=2
    )
    assert [g["hessian_dtype"] for g in opt.param_groups] == [None, "bfloat16"]
    b.grad = torch.randn(300, generator=torch.Generator().manual_seed(2))
    opt.update_hessian()
    want = narrow_ema(np.zeros(300, F32), n(b.grad) ** 2, F32, "bfloat16", 2, 0)
    assert same(n(opt.state[b]["hessian"]), want.astype(F32))
    assert a not in opt.state or "hessian" not in opt.state[a]


def test_a_foreach_batch_of_momenta_takes_the_bits_of_each_piece():
    """store_momenta (pieces laid out flat, host or device keys) is store_momentum per piece."""
    from sophia.torch._narrow_step import store_momenta, store_momentum

    g = torch.Generator().manual_seed(0)
    mcs = [torch.randn(s, generator=g) for s in [(5,), (3, 4), (300,), ()]]
    origins = [(0, 0), (1, 0), (2, 512), (3, 0)]
    host_keys = [tn.stream_key(7, step, narrow.STREAM_MU) for step in (0, 3, 9, 2**20)]
    device_keys = [torch.tensor(k) for k in host_keys]
    want = [torch.zeros(x.shape, dtype=torch.bfloat16) for x in mcs]
    for m, mc, (i, off) in zip(want, mcs, origins):
        store_momentum(m, mc, "bfloat16", host_keys[i], off)
    for keys in (host_keys, device_keys):
        got = [torch.zeros(x.shape, dtype=torch.bfloat16) for x in mcs]
        store_momenta(got, mcs, "bfloat16", keys, origins)
        assert all(same(n(a), n(b)) for a, b in zip(got, want))
    bits = tn.random_bits(7, 9, narrow.STREAM_MU, (300,), offset=512)
    assert same(n(want[2]), n(tn.round_bfloat16(mcs[2], bits)))


def test_functional_hessian_ema_in_a_form_needs_what_the_form_reads():
    from sophia.torch import hessian_ema

    h, e = torch.zeros(4, dtype=torch.int8), torch.ones(4)
    with pytest.raises(ValueError, match="needs one param_dtypes per Hessian"):
        hessian_ema([h], [e], beta2=0.9, hessian_dtype="block8")
    with pytest.raises(ValueError, match="needs one state_steps per Hessian"):
        hessian_ema([h], [e], beta2=0.9, hessian_dtype="block8", param_dtypes=[torch.float32])
    scale = torch.zeros(1)
    hessian_ema(
        [h],
        [e],
        beta2=HYPER["betas"][1],
        hessian_dtype="block8",
        param_dtypes=[torch.float32],
        state_steps=[torch.tensor(4.0)],
        seed=1,
        hessian_scales=[scale],
    )
    want = narrow_ema(
        narrow.Block8(np.zeros(4, np.int8), np.zeros(1, F32)), np.ones(4, F32), F32, "block8", 1, 4
    )
    assert same(h, want.codes) and same(scale, want.scale)


def test_block8_state_without_its_scales_is_refused():
    from sophia.torch import SophiaG

    opt, params, _ = _run(torch.float32, None, "block8", "foreach", steps=2)
    saved = opt.state_dict()
    twin = SophiaG([torch.nn.Parameter(p.detach().clone()) for p in params], hessian_dtype="block8")
    key = next(k for k, v in saved["state"].items() if v["hessian"].numel() > 256)
    for bad in (None, torch.zeros(1)):
        state = {**saved["state"], key: {**saved["state"][key], "hessian_scale": bad}}
        if bad is None:
            del state[key]["hessian_scale"]
        with pytest.raises(
            ValueError, match=r"its saved 'hessian_scale' is .* \(allowed: a float32"
        ):
            twin.load_state_dict({**saved, "state": state})
        assert not twin.state


def test_an_optimizer_pickled_before_narrow_state_unpickles_with_forms_none():
    from sophia.torch import SophiaG

    opt = SophiaG([torch.nn.Parameter(torch.zeros(3))], seed=4)
    state = opt.__getstate__()
    for d in [state["defaults"], *state["param_groups"]]:
        for key in ("mu_dtype", "hessian_dtype", "seed"):
            del d[key]
    old = SophiaG.__new__(SophiaG)
    old.__setstate__(state)
    group = old.param_groups[0]
    assert (group["mu_dtype"], group["hessian_dtype"], group["seed"]) == (None, None, 0)


def test_functional_state_in_another_dtype_than_its_form_is_refused():
    from sophia.torch import sophia_g

    p = torch.zeros(3)
    kw = {"lr": 0.1, "beta1": 0.9, "rho": 0.1, "bs": 1, "weight_decay": 0.0, "eps": 1e-12}
    with pytest.raises(
        ValueError, match=r"exp_avgs\[0\] is torch.float32, but mu_dtype='bfloat16'"
    ):
        sophia_g(
            [p],
            [p],
            [p.clone()],
            [p.clone()],
            [torch.zeros(())],
            maximize=False,
            mu_dtype="bfloat16",
            **kw,
        )

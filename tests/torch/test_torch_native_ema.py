"""The native narrow-state ops (``csrc/ema_cpu.cpp``, ``csrc/store_cpu.cpp``) against the spec.

``spec.hessian_ema`` with each form (float32, bfloat16, block8) for parameters
of every floating dtype, on tensors with special values: zero blocks, blocks
with an infinite or NaN estimate or scale, subnormals, negative (Hutchinson)
estimates, a partial last block and a tensor spanning two work items; the op
called directly and through ``functional.hessian_ema``; and
``SophiaG.update_hessian`` (for-loop, foreach, fused) with the native op
against the same optimizer on the eager fallback. The bodies' bfloat16
momentum store and block8 decode against ``narrow.round_bfloat16`` and
``narrow.decode_block8``, and the bodies with and without the native store.
"""

import ml_dtypes
import numpy as np
import pytest
import torch

from sophia import narrow, spec
from sophia.torch import SophiaG, _native
from sophia.torch.functional import hessian_ema
from tests.helpers import identical

BF16 = np.dtype(ml_dtypes.bfloat16)
TORCH_OF = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.float16): torch.float16,
    BF16: torch.bfloat16,
}
PARAM_DTYPES = [np.float32, BF16, np.float16, np.float64]
FORMS = ["float32", "bfloat16", narrow.BLOCK8]
#: 6 blocks and a partial one (special values block by block), and one that spans two of
#: the op's 2**16-coordinate work items with a partial last block.
SHAPES = [(7, 230), (70001,)]
SEED, STEP, B2 = 0xDEADBEEF, 12345, 0.99
UNAVAILABLE = "the native CPU extension is unavailable (not buildable, or SOPHIA_TORCH_NATIVE=0)"


@pytest.fixture(scope="module")
def op():
    found = _native.hessian_ema_narrow_op()
    if found is None:
        pytest.skip(UNAVAILABLE)
    return found


def to_torch(x):
    """A torch copy of a NumPy array, bfloat16 through its bit pattern."""
    x = np.ascontiguousarray(x)
    if x.dtype == BF16:
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(x.copy())


def to_numpy(x):
    """A NumPy copy of a tensor, bfloat16 through its bit pattern."""
    x = x.detach().contiguous()
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(BF16).copy()
    return x.numpy().copy()


def special_values(rng, shape, dtype):
    """float32 values of ``shape`` whose 256-blocks hold the cases the encoding tells apart.

    Block 0 ordinary, 1 zeros, 2 an inf, 3 a NaN, 4 subnormals and signed zeros, 5 a
    value near float32's largest, the rest ordinary; negatives throughout.
    """
    x = (rng.normal(size=shape) * 1e-3).astype(np.float32)
    flat = x.reshape(-1)
    b = narrow.BLOCK_SIZE
    if flat.size >= 6 * b:
        flat[b : 2 * b] = 0
        flat[2 * b + 17] = np.inf
        flat[3 * b + 3] = np.nan
        flat[4 * b : 5 * b] = rng.normal(size=b).astype(np.float32) * np.float32(1e-40)
        flat[4 * b + 1 : 4 * b + 3] = [0.0, -0.0]
        flat[5 * b + 9] = np.float32(3e38) if dtype == np.float32 else 1e4
    flat[::11] = 0
    return x


def initial_h(rng, shape, form, dtype):
    """A stored h in ``form`` with its own special blocks (NaN, inf and zero scales)."""
    values = special_values(rng, shape, dtype)
    if form != narrow.BLOCK8:
        return values.astype(np.float32 if form == "float32" else BF16)
    h = narrow.encode_block8(values, narrow.random_bits(5, 0, narrow.STREAM_HESSIAN, shape))
    h.scale[1] = 0
    if h.scale.size > 7:  # scales that are not finite, as a checkpoint may hold
        h.scale[6], h.scale[7] = np.inf, np.nan
    return h


def same(got, want):
    """Bits of the stored h (codes and scales for block8) against the spec's."""
    if isinstance(want, narrow.Block8):
        codes, scale = got
        return np.array_equal(to_numpy(codes), want.codes) and identical(
            to_numpy(scale), want.scale
        )
    return identical(to_numpy(got), np.asarray(want))


def case(shape, dtype, form, seed=0):
    rng = np.random.default_rng(seed)
    h0 = initial_h(rng, shape, form, dtype)
    estimate = special_values(rng, shape, dtype)
    estimate.reshape(-1)[::7] *= -1  # Hutchinson's estimates may be negative
    estimate = estimate.astype(dtype)
    compute = np.float64 if dtype == np.float64 else np.float32
    want = spec.hessian_ema(
        h0, estimate, B2, hessian_dtype=form, compute=compute, seed=SEED, step=STEP
    )
    return h0, estimate, want


def stored(h0):
    if isinstance(h0, narrow.Block8):
        return to_torch(h0.codes), to_torch(h0.scale)
    return to_torch(h0), None


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=lambda d: np.dtype(d).name)
def test_op_equals_spec(op, dtype, form):
    cases = [case(s, dtype, form, seed=i) for i, s in enumerate(SHAPES)]
    hs, scales = zip(*(stored(h0) for h0, _, _ in cases))
    compute = torch.float64 if dtype == np.float64 else torch.float32
    c = np.float64 if dtype == np.float64 else np.float32
    op(
        list(hs),
        list(scales) if form == narrow.BLOCK8 else [],
        [to_torch(e) for _, e, _ in cases],
        [STEP] * len(cases),
        torch.tensor([c(B2), c(1) - c(B2)], dtype=compute),
        SEED,
    )
    for h, scale, (_, _, want) in zip(hs, scales, cases):
        assert same((h, scale) if scale is not None else h, want)


@pytest.mark.parametrize("form", FORMS)
def test_functional_equals_spec(op, form):
    """Through functional.hessian_ema: float and tensor beta2, step counters as tensors."""
    for beta2 in (B2, torch.tensor(B2, dtype=torch.float64)):
        cases = [case(s, BF16, form, seed=3) for s in SHAPES]
        hs, scales = zip(*(stored(h0) for h0, _, _ in cases))
        hessian_ema(
            list(hs),
            [to_torch(e) for _, e, _ in cases],
            beta2=beta2,
            hessian_dtype=form,
            param_dtypes=[torch.bfloat16] * len(cases),
            state_steps=[torch.tensor(float(STEP)) for _ in cases],
            seed=SEED,
            hessian_scales=list(scales) if form == narrow.BLOCK8 else None,
        )
        for h, scale, (_, _, want) in zip(hs, scales, cases):
            assert same((h, scale) if scale is not None else h, want)


def test_empty_and_zero_size(op):
    """No tensors, and a zero-size Hessian, are no-ops."""
    rates = torch.tensor([0.5, 0.5])
    op([], [], [], [], rates, 0)
    codes, scale = torch.zeros(0, dtype=torch.int8), torch.zeros(0)
    op([codes], [scale], [torch.zeros(0)], [0], rates, 0)
    assert codes.numel() == 0 and scale.numel() == 0


def test_op_refuses_mismatched_inputs(op):
    rates = torch.tensor([0.5, 0.5])
    h, e = torch.zeros(300, dtype=torch.int8), torch.zeros(300)
    with pytest.raises(RuntimeError, match="one scale per 256"):
        op([h], [torch.zeros(1)], [e], [0], rates, 0)
    with pytest.raises(RuntimeError, match="one size"):
        op([torch.zeros(3)], [], [torch.zeros(4)], [0], rates, 0)
    with pytest.raises(RuntimeError, match="seed"):
        op([torch.zeros(3)], [], [torch.zeros(3)], [0], rates, 2**32)


def train(path, form, params):
    """Five steps with a refresh at steps 0 and 3 (estimates from the gradients)."""
    opt = SophiaG(
        [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}],
        lr=1e-3,
        bs=480,
        mu_dtype="bfloat16",
        hessian_dtype=form,
        seed=7,
        **path,
    )
    rng = torch.Generator().manual_seed(0)
    for step in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=rng).to(p.dtype)
        if step % 3 == 0:
            opt.update_hessian(hessian=[p.grad * p.grad for p in params])
        opt.step()
    return opt


PATHS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("path", list(PATHS))
def test_update_hessian_native_equals_eager(op, monkeypatch, path, form):
    """SophiaG's refresh on the native op and on the eager fallback: the same state."""

    def params():
        g = torch.Generator().manual_seed(1)
        shapes = [((300,), torch.float32), ((3, 7), torch.float32), ((600,), torch.bfloat16)]
        return [torch.nn.Parameter(torch.randn(s, generator=g).to(d)) for s, d in shapes]

    calls = []

    def counting():
        calls.append(1)
        return op

    monkeypatch.setattr(_native, "hessian_ema_narrow_op", counting)
    native = train(PATHS[path], form, params())
    assert calls, "the native EMA was not used"
    monkeypatch.setattr(_native, "hessian_ema_narrow_op", lambda: None)
    eager = train(PATHS[path], form, params())
    for a, b in zip(native.state.values(), eager.state.values()):
        assert set(a) == set(b)
        for key in a:
            assert same(a[key], to_numpy(b[key])), key


def test_mixed_layouts_equal_spec(op):
    """A non-contiguous h takes the eager code, a transposed estimate the op: both the spec's."""
    rng = np.random.default_rng(4)
    h0 = [special_values(rng, s, np.float32).astype(BF16) for s in ((40, 30), (30, 40))]
    est = [special_values(rng, s, np.float32) for s in ((40, 30), (30, 40))]
    want = [
        spec.hessian_ema(h, e, B2, hessian_dtype="bfloat16", seed=SEED, step=STEP)
        for h, e in zip(h0, est)
    ]
    strided = to_torch(h0[0].T.copy()).T  # the values of h0[0], not contiguous
    plain = to_torch(h0[1])
    hessian_ema(
        [strided, plain],
        [to_torch(est[0]), to_torch(est[1].T.copy()).T],
        beta2=B2,
        hessian_dtype="bfloat16",
        param_dtypes=[torch.float32] * 2,
        state_steps=[torch.tensor(STEP), torch.tensor(STEP)],
        seed=SEED,
    )
    assert same(strided, want[0]) and same(plain, want[1])


@pytest.mark.parametrize("src_dtype", [np.float32, np.float64])
def test_store_bfloat16_equals_spec(src_dtype):
    """The foreach body's native bfloat16 momentum store: the spec's rounding of each piece."""
    store = _native.store_bfloat16_op()
    if store is None:
        pytest.skip(UNAVAILABLE)
    rng = np.random.default_rng(6)
    values = special_values(rng, (70001,), np.float32).astype(src_dtype)
    values[[1, 2, 3]] = [3.4e38, -np.inf, 1e-45]  # past bfloat16's largest, inf, subnormal
    key = int(narrow.mix32(np.uint64(SEED) ^ narrow.mix32(np.uint64(4 * STEP))))
    bits = narrow.random_bits(SEED, STEP, narrow.STREAM_MU, (70001 + 300,))
    pieces = [(0, 300), (300, 70001)]  # a piece at offset 300 of a longer tensor
    outs = [torch.empty(n - a, dtype=torch.bfloat16) for a, n in pieces]
    srcs = [to_torch(values[a:n] if a else values[:n]) for a, n in pieces]
    store(outs, srcs, [key, key], [0, 300])
    for out, (a, n) in zip(outs, pieces):
        want = narrow.round_bfloat16(values[a:n].astype(np.float32), bits[a:n])
        assert identical(to_numpy(out), want)


@pytest.mark.parametrize("path", ["for-loop", "foreach"])
def test_bfloat16_momentum_native_equals_eager(monkeypatch, path):
    """The for-loop and foreach bodies with a bfloat16 m: the native store and the eager one."""
    if _native.store_bfloat16_op() is None:
        pytest.skip(UNAVAILABLE)
    states = []
    for store in (_native.store_bfloat16_op, lambda: None):
        monkeypatch.setattr(_native, "store_bfloat16_op", store)
        g = torch.Generator().manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((70001,), (3, 7))]
        params.append(torch.nn.Parameter(torch.randn(300, generator=g, dtype=torch.float64)))
        opt = SophiaG(params, lr=1e-3, bs=480, mu_dtype="bfloat16", seed=7, **PATHS[path])
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            opt.step()
        states.append([(p.detach().clone(), opt.state[p]["exp_avg"].clone()) for p in params])
    for (p, m), (q, n) in zip(*states):
        assert same(p, to_numpy(q)) and same(m, to_numpy(n))


def test_decode_block8_equals_spec():
    """The bodies' native block8 decode: the spec's values, whole and for a piece at an offset."""
    decode = _native.decode_block8_op()
    if decode is None:
        pytest.skip(UNAVAILABLE)
    h = initial_h(np.random.default_rng(8), (70001,), narrow.BLOCK8, np.float32)
    want = narrow.decode_block8(h)
    codes, scale = to_torch(h.codes), to_torch(h.scale)
    assert identical(to_numpy(decode(codes, scale)), want)
    piece = decode(codes[512:1000], scale[2:4])  # blocks 2 and 3 (3 partial)
    assert identical(to_numpy(piece), want[512:1000])

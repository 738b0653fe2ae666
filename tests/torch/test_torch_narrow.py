"""The narrow optimizer state in torch against the NumPy spec (sophia.narrow), bit for bit.

First the rounding functions of sophia.torch._narrow (eager, and compiled by
inductor), then SophiaG and sophia_g with every pair of forms.
"""

import ml_dtypes
import numpy as np
import pytest
import torch

from sophia import narrow
from sophia.torch import _narrow as tn
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

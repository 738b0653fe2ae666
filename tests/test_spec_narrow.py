"""The narrow state's spec (sophia.narrow): random bits, stochastic rounding, the 8-bit blocks."""

import math

import ml_dtypes
import numpy as np
import pytest

from sophia import narrow, spec

BF16 = np.dtype(ml_dtypes.bfloat16)
M32 = 0xFFFFFFFF


def _mix(x: int) -> int:
    """The docstring's mix, on Python ints: an independent reading of the definition."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & M32
    return x ^ (x >> 16)


def _bits(seed: int, step: int, stream: int, i: int) -> int:
    key = _mix(seed ^ _mix((4 * step + stream) & M32))
    return _mix(key ^ ((i * 0x61C88647) & M32))


@pytest.mark.parametrize(
    "seed,step,stream", [(0, 0, 0), (1, 0, 1), (2**32 - 1, 10**9, 1), (7, 3, 0)]
)
def test_random_bits_follow_the_written_definition(seed, step, stream):
    bits = narrow.random_bits(seed, step, stream, (3, 5))
    assert bits.dtype == np.uint32 and bits.shape == (3, 5)
    want = [_bits(seed, step, stream, i) for i in range(15)]
    assert bits.reshape(-1).tolist() == want


def test_random_bits_are_uniform_and_independent_across_inputs():
    n = 1 << 16
    base = narrow.random_bits(5, 2, 0, (n,))
    for other in (
        narrow.random_bits(6, 2, 0, (n,)),
        narrow.random_bits(5, 3, 0, (n,)),
        narrow.random_bits(5, 2, 1, (n,)),
    ):
        # a pair of top nibbles from two streams: chi-square with 255 degrees of freedom
        pairs = (base >> 28).astype(np.int64) * 16 + (other >> 28).astype(np.int64)
        counts = np.bincount(pairs, minlength=256)
        chi2 = float(((counts - n / 256) ** 2 / (n / 256)).sum())
        assert chi2 < 360, chi2  # p < 1e-4 for a fair generator
    ones = np.unpackbits(base.view(np.uint8)).mean()
    assert abs(ones - 0.5) < 0.005


def _neighbours(x: np.float32) -> tuple[float, float]:
    down = np.float32(x).view(np.uint32) & np.uint32(0xFFFF0000)
    lo = float(down.view(np.float32))
    hi = float((down + np.uint32(0x10000)).view(np.float32))
    return lo, hi


@pytest.mark.parametrize("x", [1.0 + 2**-10, -3.3, 1e-40, 7.1e-3, 3.3e38])
def test_bfloat16_rounding_lands_on_a_neighbour_with_the_right_odds(x):
    steps = 4000
    draws = np.array(
        [
            float(narrow.round_bfloat16(np.float32([x]), narrow.random_bits(9, t, 0, (1,)))[0])
            for t in range(steps)
        ]
    )
    lo, hi = _neighbours(np.float32(x))
    assert set(np.unique(draws)) <= {lo, hi}
    p_hi = (abs(float(np.float32(x))) - abs(lo)) / (abs(hi) - abs(lo))
    sd = math.sqrt(p_hi * (1 - p_hi) / steps)
    assert abs((draws == hi).mean() - p_hi) < 5 * sd + 1e-12


def test_bfloat16_rounding_keeps_exact_values_and_specials():
    values = np.float32([0.0, -0.0, 1.0, -2.5, np.inf, -np.inf, np.nan, 2.0**-133])
    for t in range(20):
        out = narrow.round_bfloat16(values, narrow.random_bits(1, t, 0, values.shape))
        assert out.dtype == BF16
        want = values.astype(BF16)
        same = (out.view(np.uint16) == want.view(np.uint16)) | (np.isnan(out) & np.isnan(want))
        assert same.all()


def test_block8_round_trip_keeps_zero_sign_and_the_largest_magnitude():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(600).astype(np.float32) * 1e-3  # 3 blocks, the last partial
    x[:256] = 0.0  # an all-zero block
    x[300] = -0.0
    block = narrow.encode_block8(x, narrow.random_bits(0, 0, 1, x.shape))
    assert block.codes.dtype == np.int8 and block.codes.shape == x.shape
    assert block.scale.dtype == np.float32
    assert block.scale.shape == (narrow.block_count(600),) == (3,)
    assert block.scale[0] == 0 and not block.codes[:256].any()
    assert np.abs(block.codes).max() <= narrow.CODE_MAX
    back = narrow.decode_block8(block)
    assert (np.sign(back) * np.sign(x) >= 0).all()  # never the opposite sign
    for b in (1, 2):
        part = slice(256 * b, min(256 * (b + 1), 600))
        absmax = np.abs(x[part]).max()
        assert block.scale[b] == np.float32(absmax / np.float32(127 * 127))
        # square-root codes: |x| between the levels a*a and (a+1)**2 of the scale
        level = np.abs(x[part]) / block.scale[b]
        a = np.floor(np.sqrt(level))
        c = np.abs(block.codes[part].astype(np.float64))
        assert ((c == a) | (c == a + 1) | ((a == 127) & (c == 127))).all()
        assert np.abs(back[part]).max() <= absmax * (1 + 1e-6)


def test_block8_codes_are_dense_near_zero():
    """Square-root codes: the step between levels grows with the level (2|c| + 1 scales)."""
    x = np.float32([1.0, 1e-4, 0.25])
    block = narrow.encode_block8(x, narrow.random_bits(0, 0, 1, x.shape))
    scale = float(block.scale[0])
    assert block.codes[0] == 127 and scale == np.float32(1.0) / np.float32(16129)
    # 1e-4 is 1.61 levels of 1/16129: coded 1 or 2, within one level, not rounded to zero
    assert block.codes[1] in (1, 2)
    assert block.codes[2] in (63, 64)  # 0.25 * 16129 = 4032.25, between 63**2 and 64**2


def test_block8_rounding_is_unbiased():
    x = np.float32([0.3, -0.7, 1.0, 1e-3, -1e-3, 0.5013, 3e-5])  # scale = 1/16129
    steps = 3000
    total = sum(
        narrow.decode_block8(narrow.encode_block8(x, narrow.random_bits(2, t, 1, x.shape)))
        for t in range(steps)
    )
    scale = np.float32(1) / np.float32(127 * 127)
    gap = (2 * np.floor(np.sqrt(np.abs(x) / scale)) + 1) * scale  # between the two levels
    assert (np.abs(total / steps - x) < 5 * 0.5 * gap / math.sqrt(steps)).all()


def test_block8_non_finite_block_decodes_to_nan_and_others_are_untouched():
    x = np.zeros(300, np.float32)
    x[3] = np.inf
    x[280] = 0.25
    back = narrow.decode_block8(narrow.encode_block8(x, narrow.random_bits(0, 0, 1, x.shape)))
    assert np.isnan(back[:256]).all()
    assert back[280] == np.float32(0.25) and (back[256:280] == 0).all()


def test_the_update_stores_its_momentum_in_the_named_form():
    rng = np.random.default_rng(1)
    theta, g, m, h = (rng.standard_normal(40).astype(np.float32) for _ in range(4))
    h = np.abs(h)
    plain_t, plain_m, plain_w = spec.sophia_update(theta, g, m, h)
    t16, m16, w16 = spec.sophia_update(theta, g, m, h, mu_dtype="bfloat16", seed=4, step=6)
    # the step reads the unrounded momentum: only the stored m differs
    assert (t16 == plain_t).all() and w16 == plain_w
    assert (m16 == narrow.round_bfloat16(plain_m, narrow.random_bits(4, 6, 0, (40,)))).all()
    hb = narrow.encode_block8(h, narrow.random_bits(0, 0, 1, h.shape))
    tb, mb, _ = spec.sophia_update(theta, g, m, hb)
    assert (tb == spec.sophia_update(theta, g, m, narrow.decode_block8(hb))[0]).all()
    assert mb.dtype == np.float32


def test_the_ema_stores_the_hessian_in_the_named_form():
    rng = np.random.default_rng(2)
    h, h_hat = (np.abs(rng.standard_normal(300)).astype(np.float32) for _ in range(2))
    exact = spec.hessian_ema(h, h_hat, 0.99)
    bits = narrow.random_bits(3, 10, narrow.STREAM_HESSIAN, h.shape)
    as_bf16 = spec.hessian_ema(h, h_hat, 0.99, hessian_dtype="bfloat16", seed=3, step=10)
    assert (as_bf16 == narrow.round_bfloat16(exact, bits)).all()
    as_block = spec.hessian_ema(h, h_hat, 0.99, hessian_dtype="block8", seed=3, step=10)
    want = narrow.encode_block8(exact, bits)
    assert (as_block.codes == want.codes).all() and (as_block.scale == want.scale).all()
    again = spec.hessian_ema(as_block, h_hat, 0.99, hessian_dtype="block8", seed=3, step=20)
    decoded = narrow.decode_block8(as_block)
    ema = np.float32(0.99) * decoded + (np.float32(1) - np.float32(0.99)) * h_hat
    want = narrow.encode_block8(ema, narrow.random_bits(3, 20, 1, h.shape))
    assert (again.codes == want.codes).all()


def test_state_bytes_per_parameter():
    n = 1 << 20
    assert narrow.state_bytes(n, None, 4) + narrow.state_bytes(n, None, 4) == 8 * n
    assert narrow.state_bytes(n, "bfloat16", 4) * 2 == 4 * n
    both = narrow.state_bytes(n, "bfloat16", 4) + narrow.state_bytes(n, "block8", 4)
    assert both == 3 * n + 4 * (n // 256)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"mu_dtype": "block8"}, "Invalid mu_dtype: 'block8'"),
        ({"mu_dtype": np.float16}, "Invalid mu_dtype"),
        ({"hessian_dtype": "int8"}, "Invalid hessian_dtype: 'int8'"),
        ({"seed": -1}, "Invalid seed: -1"),
        ({"seed": 2**32}, "Invalid seed"),
        ({"seed": 1.5}, "Invalid seed"),
    ],
)
def test_bad_forms_and_seeds_name_the_argument(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        spec.validate(**kwargs)


def test_forms_accept_dtypes_and_names():
    assert narrow.state_dtype_name("mu_dtype", BF16, narrow.MU_DTYPES) == "bfloat16"
    assert narrow.state_dtype_name("mu_dtype", np.float32, narrow.MU_DTYPES) == "float32"
    assert narrow.state_dtype_name("hessian_dtype", "block8", narrow.HESSIAN_DTYPES) == "block8"
    assert narrow.state_dtype_name("mu_dtype", None, narrow.MU_DTYPES) is None

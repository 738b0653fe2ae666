"""The framework-neutral spec: validation, the NumPy reference and the dynamic-rho rule."""

import subprocess
import sys

import numpy as np
import pytest

from sophia import spec

BAD = [
    ("lr", -1e-3, "[0, inf)"),
    ("lr", float("nan"), "[0, inf)"),
    ("betas", (0.9,), "a pair"),
    ("betas", "ab", "a pair"),
    ("betas", (1.0, 0.99), "betas[0]"),
    ("betas", (0.9, -0.1), "betas[1]"),
    ("rho", 0.0, "(0, inf)"),
    ("rho", -0.04, "(0, inf)"),
    ("weight_decay", -0.1, "[0, inf)"),
    ("eps", -1e-15, "[0, inf)"),
    ("bs", 0, "(0, inf)"),
    ("hessian_update_interval", 0, "an integer >= 1"),
    ("hessian_update_interval", 2.5, "an integer >= 1"),
    ("hessian_update_interval", True, "an integer >= 1"),
    ("hessian_update_interval", np.array(0), "an integer >= 1"),
    ("hessian_update_interval", np.array(3.0), "an integer >= 1"),
    ("maximize", 1, "True or False"),
    ("dynamic", "yes", "True or False"),
    ("rho", None, "(0, inf)"),
    ("lr", "0.1", "[0, inf)"),
]


@pytest.mark.parametrize("name,value,allowed", BAD)
def test_validate_names_argument_value_and_range(name, value, allowed):
    with pytest.raises(ValueError) as e:
        spec.validate(**{name: value})
    msg = str(e.value)
    stem = name.split("[")[0]
    assert stem in msg and repr(value).split("(")[0] in msg and allowed in msg


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"lr": 0.0, "weight_decay": 0.0, "eps": 0.0},
        {"hessian_update_interval": None},
        {"hessian_update_interval": np.int32(5)},
        {"hessian_update_interval": np.array(5)},
        {"betas": [0.0, 0.0]},
        {"lr": np.float32(1e-3), "rho": np.array(0.03)},
        {"lr": lambda count: 1e-3},  # a schedule: the framework evaluates it
        {"maximize": np.bool_(True), "dynamic": True},
        {"bs": None},  # the label count of the latest GNB refresh
    ],
)
def test_validate_accepts_valid(kw):
    spec.validate(**kw)


def test_defaults_are_the_seed_signature():
    d = spec.DEFAULTS
    assert (d.lr, d.betas, d.rho, d.weight_decay) == (1e-4, (0.965, 0.99), 0.04, 1e-1)
    assert (d.eps, d.bs, d.hessian_update_interval) == (1e-15, None, 10)
    assert (d.maximize, d.dynamic) == (False, False)
    with pytest.raises(ValueError, match="rho"):
        spec.SophiaHyperParams(rho=-1)


def test_reference_update_defaults_to_the_papers_label_count():
    """bs=None exists only where a refresh can supply the count; the reference takes 5120."""
    rng = np.random.default_rng(0)
    theta, g, m = (rng.normal(size=7).astype(np.float32) for _ in range(3))
    h = np.abs(rng.normal(size=7)).astype(np.float32)  # r < 1: bs matters
    assert spec.REFERENCE_BS == 5120
    got = spec.sophia_update(theta, g, m, h)
    want = spec.sophia_update(theta, g, m, h, bs=spec.REFERENCE_BS)
    other = spec.sophia_update(theta, g, m, h, bs=spec.REFERENCE_BS / 2)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    assert not np.array_equal(got[0], other[0])


def _update_by_hand(theta, g, m, h, lr, b1, rho, bs, wd, eps, maximize):
    """The update written out per coordinate with Python floats (float64 math)."""
    out_t, out_m, wins = [], [], 0
    for t, gi, mi, hi in zip(*(a.tolist() for a in (theta, g, m, h))):
        gi = -gi if maximize else gi
        mi = b1 * mi + (1 - b1) * gi
        r = min(abs(mi) / (rho * bs * max(hi, 0.0) + eps), 1.0)
        wins += r < 1
        s = (mi > 0) - (mi < 0)
        out_t.append(t - lr * (s * r + wd * t))
        out_m.append(mi)
    return np.array(out_t), np.array(out_m), wins


@pytest.mark.parametrize("maximize", [False, True])
def test_reference_matches_exact_math_float64(maximize):
    rng = np.random.default_rng(0)
    n = 257
    theta, g, m = rng.normal(size=(3, n))
    h = rng.normal(size=n) * 1e-3  # negative entries exercise max(h, 0)
    m[:5] = 0.0
    g[:5] = 0.0  # sign(0) = 0: no step beyond weight decay
    kw = dict(lr=0.01, b1=0.9, rho=0.05, bs=64, weight_decay=0.1, eps=1e-12)
    t_ref, m_ref, wins = spec.sophia_update(theta, g, m, h, maximize=maximize, **kw)
    t_hand, m_hand, wins_hand = _update_by_hand(
        theta, g, m, h, kw["lr"], kw["b1"], kw["rho"], kw["bs"], kw["weight_decay"], kw["eps"],
        maximize,
    )  # fmt: skip
    np.testing.assert_allclose(t_ref, t_hand, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(m_ref, m_hand, rtol=1e-14, atol=1e-15)
    assert wins == wins_hand
    assert 0 < wins < n


def test_reference_float32_is_float32_math():
    rng = np.random.default_rng(1)
    theta, g, m, h = rng.normal(size=(4, 100)).astype(np.float32)
    t32, m32, _ = spec.sophia_update(theta, g, m, np.abs(h), lr=0.1, bs=3)
    t64, _, _ = spec.sophia_update(*(x.astype(np.float64) for x in (theta, g, m, np.abs(h))),
                                   lr=0.1, bs=3)  # fmt: skip
    assert t32.dtype == np.float32 and m32.dtype == np.float32
    assert np.max(np.abs(t32 - t64)) < 1e-6


@pytest.mark.parametrize("eps", [0.0, 1e-300])
def test_eps_floor_prevents_zero_over_zero(eps):
    z = np.zeros(4, np.float32)
    t, m, wins = spec.sophia_update(z, z, z, z, eps=eps)
    assert np.all(np.isfinite(t)) and np.all(t == 0) and wins == 4
    assert spec.effective_eps(eps, np.float32) == np.finfo(np.float32).tiny
    assert spec.effective_eps(1e-15, np.float64) == 1e-15


def test_low_precision_storage_uses_float32_math():
    import ml_dtypes

    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(2)
    theta = rng.normal(size=64).astype(bf16)
    g = (rng.normal(size=64) * 1e-30).astype(np.float32).astype(bf16)  # tiny grads
    m = np.zeros(64, bf16)
    h = np.zeros(64, bf16)
    t, m_new, _ = spec.sophia_update(theta, g, m, h, eps=0.0, lr=1e-3)
    assert t.dtype == bf16 and m_new.dtype == bf16
    assert np.all(np.isfinite(t.astype(np.float32)))
    assert spec.compute_dtype(bf16) == np.float32
    assert spec.compute_dtype(np.float16) == np.float32
    assert spec.compute_dtype(np.float64) == np.float64
    # complex parameters are pairs of reals of their part's width
    assert spec.compute_dtype(np.complex64) == np.float32
    assert spec.compute_dtype(np.complex128) == np.float64


def test_hessian_ema_and_win_rate():
    h = np.array([1.0, 2.0, -1.0], np.float32)
    hh = np.array([3.0, 0.0, 1.0], np.float32)
    out = spec.hessian_ema(h, hh, b2=0.75)
    np.testing.assert_array_equal(out, np.float32(0.75) * h + np.float32(0.25) * hh)
    assert spec.win_rate(1, 4) == np.float32(0.25)
    assert spec.win_rate(0, 0) == 0


def test_dynamic_rho_rule():
    lo, hi = spec.WIN_RATE_BAND
    f, span = spec.DYNAMIC_FACTOR, spec.DYNAMIC_RANGE
    rho0 = 0.04
    assert spec.dynamic_rho(rho0, lo / 2, rho0) == np.float32(rho0) * np.float32(f)
    assert spec.dynamic_rho(rho0, (hi + 1) / 2, rho0) == np.float32(rho0) / np.float32(f)
    assert spec.dynamic_rho(rho0, (lo + hi) / 2, rho0) == np.float32(rho0)
    assert spec.dynamic_rho(rho0, 0.0, rho0, n_total=0) == np.float32(rho0)
    # Bounded on both sides however long the win rate stays out of the band.
    rho = rho0
    for _ in range(100):
        rho = spec.dynamic_rho(rho, 0.0, rho0)
    assert rho == np.float32(rho0) * np.float32(span)
    for _ in range(100):
        rho = spec.dynamic_rho(rho, 1.0, rho0)
    assert rho == np.float32(rho0) / np.float32(span)


def test_import_sophia_needs_no_framework():
    code = (
        "import sys; sys.modules['jax'] = None; sys.modules['torch'] = None; "
        "sys.modules['optax'] = None; import sophia; sophia.validate(); "
        "print(sophia.DEFAULTS.rho)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.04"

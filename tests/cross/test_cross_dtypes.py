"""Complex, bfloat16 and float16 parameters: NumPy reference, op-by-op JAX and every torch path.

Complex parameters are pairs of real coordinates (torch's ``view_as_real``); the
reference runs on that real view. bfloat16/float16 JAX updates come back in the
parameters' dtype and are applied with ``optax.apply_updates``; the runs here
keep every step within half the parameter's magnitude, where that reproduces
the spec's single rounding bit for bit (docs/spec.md, "Where bit-identity
holds"; tests/jax/test_jax_dtypes.py measures the steps beyond).
"""

import numpy as np
import pytest

from tests.cross import problems
from tests.cross.drivers import JaxDriver, TorchDriver, group, run, set_state
from tests.cross.references import RealViewReference, Reference, real_tree
from tests.helpers import BF16, random_leaves, tree_ulp

EXACT = ["jax", "torch-loop", "torch-foreach", "torch-fused"]


class ComplexLeastSquares:
    """0.5 * mean(|A z + c - y|^2) over complex z, c; estimates: a noisy gradient's parts squared.

    ``grad`` is d/dx + i d/dy of the loss (torch's convention, the conjugate of
    ``jax.grad``'s), which is what both frameworks' optimizers take.
    """

    def __init__(self, n=24, d=4, seed=5):
        rng = np.random.default_rng(seed)
        self.A = rng.normal(size=(n, d)) + 1j * rng.normal(size=(n, d))
        z_true = rng.normal(size=d) + 1j * rng.normal(size=d)
        self.y = self.A @ z_true + 0.3 - 0.2j + 0.1 * rng.normal(size=n)
        self.params0 = {
            "z": (rng.normal(size=d) + 1j * rng.normal(size=d)).astype(np.complex64),
            "c": np.asarray(0.0 + 0.5j, np.complex64),
        }

    def _grad(self, p, y):
        r = self.A @ p["z"].astype(np.complex128) + complex(p["c"]) - y
        return {"z": self.A.conj().T @ r / len(r), "c": np.mean(r)}

    def loss(self, p):
        r = self.A @ p["z"].astype(np.complex128) + complex(p["c"]) - self.y
        return 0.5 * float(np.mean(np.abs(r) ** 2))

    def grad(self, p):
        return {k: np.asarray(v).astype(np.complex64) for k, v in self._grad(p, self.y).items()}

    def hhat(self, p, t):
        rng = np.random.default_rng(4000 + t)
        g = self._grad(p, self.y + rng.normal(size=len(self.y)))
        return {k: (v.real**2 + 1j * v.imag**2).astype(np.complex64) for k, v in g.items()}


def _far_from_zero(dtype):
    """Least squares whose parameters start and stay at |theta| >= 1 (steps of at most ~lr)."""
    prob = problems.LeastSquares(dtype=dtype)
    rng = np.random.default_rng(11)
    d = prob.A.shape[1]
    w = rng.choice([-1.0, 1.0], size=d) * rng.uniform(1.5, 3.0, size=d)
    prob.y = prob.A @ w + 2.0 + 0.1 * rng.normal(size=len(prob.y))
    prob.params0 = {
        "w": (np.sign(w) * rng.uniform(1.0, 2.0, size=d)).astype(dtype),
        "b": np.asarray(1.0).astype(dtype),
    }
    return prob


def _trace(driver, prob, steps, k):
    snaps, rates = [], []

    def record(t, d):
        snaps.append(tuple(real_tree(x) for x in (d.params(), d.mu(), d.hessian())))
        rates.append(tuple(d.win_rates()))

    rhos = run(driver, prob.params0, prob.grad, prob.hhat, steps, k, record)
    return snaps, rates, rhos


def _check_identical(tag, prob, groups, steps, k, reference, cross_report):
    ref_driver = reference(prob.params0, groups)
    ref = _trace(ref_driver, prob, steps, k)
    assert prob.loss(ref_driver.params()) < prob.loss(prob.params0)
    drivers = {"jax": JaxDriver(prob.params0, groups)}
    for mode in ("loop", "foreach", "fused"):
        drivers[f"torch-{mode}"] = TorchDriver(prob.params0, groups, mode)
    for name, d in drivers.items():
        snaps, rates, rhos = _trace(d, prob, steps, k)
        ulps = [max(tree_ulp(a, b) for a, b in zip(s, r)) for s, r in zip(snaps, ref[0])]
        cross_report(tag, name, "numpy", max(ulps), None, "0 ulp")
        assert max(ulps) == 0, f"{name}: first difference at step {np.argmax(ulps)}"
        assert rates == ref[1], f"{name}: win rates differ"
        assert rhos == ref[2], f"{name}: rho sequence differs"
    return ref


def test_complex_trajectories_are_identical(cross_report):
    prob = ComplexLeastSquares()
    groups = [group(list(prob.params0), lr=0.02, rho=0.05, weight_decay=0.05, dynamic=True)]
    ref = _check_identical(
        "complex64 40 steps k=4: theta,m,h every step", prob, groups, 40, 4,
        RealViewReference, cross_report,
    )  # fmt: skip
    assert len(set(ref[2])) > 1, "the dynamic rule never moved rho: the win rate is untested"


@pytest.mark.parametrize("maximize", [False, True])
def test_complex_single_step_with_signed_zeros_is_identical(maximize, cross_report):
    shapes = [(7,), (3, 5), (0,), ()]
    leaves = random_leaves(3, [(*s, 2) for s in shapes])
    for i, x in enumerate(leaves[:3]):  # signed zeros in theta, g and m, both parts
        for v in x.values():
            v.flat[i::5] = 0.0
            v.flat[i + 1 :: 7] = -0.0
    theta, g, m, h = ({k: v.view(np.complex64)[..., 0] for k, v in x.items()} for x in leaves)
    groups = [group(list(theta), lr=0.05, rho=0.03, weight_decay=0.2, bs=17.0, maximize=maximize)]
    h_hat = {k: (np.abs(v.real) + 1j * np.abs(v.imag)).astype(np.complex64) for k, v in g.items()}
    ref = RealViewReference(theta, groups)
    set_state(ref, real_tree(m), real_tree(h))
    drivers = {"jax": JaxDriver(theta, groups)}
    for mode in ("loop", "foreach", "fused"):
        drivers[f"torch-{mode}"] = TorchDriver(theta, groups, mode)
    for d in (ref, *drivers.values()):
        if d is not ref:
            set_state(d, m, h)
        d.refresh(h_hat)
        d.step(g)
    want = [real_tree(x) for x in (ref.params(), ref.mu(), ref.hessian())]
    for name, d in drivers.items():
        got = [real_tree(x) for x in (d.params(), d.mu(), d.hessian())]
        worst = max(tree_ulp(a, b) for a, b in zip(got, want))
        cross_report(f"1 step complex64{' max' if maximize else ''}", name, "numpy", worst, None,
                     "0 ulp")  # fmt: skip
        assert worst == 0, name
        assert d.win_rates() == ref.win_rates()


@pytest.mark.parametrize("dtype", [BF16, np.float16], ids=["bfloat16", "float16"])
def test_low_precision_trajectories_through_apply_updates_are_identical(dtype, cross_report):
    prob = _far_from_zero(dtype)
    groups = [group(list(prob.params0), lr=0.01, rho=0.05, weight_decay=0.01, dynamic=True)]
    name = np.dtype(dtype).name
    _check_identical(
        f"{name} 50 steps k=5 apply_updates: theta,m,h", prob, groups, 50, 5, Reference,
        cross_report,
    )  # fmt: skip

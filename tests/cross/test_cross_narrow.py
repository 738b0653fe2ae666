"""Long runs with narrow optimizer state (sophia.narrow): every implementation, every step, 0 ulp.

The same gradients and Hessian estimates (NumPy functions of each run's own
parameters, see problems.py) feed the spec's NumPy reference, which stores m and
h in the named forms with stochastic rounding of (seed, step, stream,
coordinate), and each implementation. Bits are compared every step: theta, the
stored m and h (a block8 h as its int8 codes and float32 scales), rho and the
win rates.

Every implementation runs the whole length: op-by-op JAX, torch's for-loop,
foreach and fused, and the jitted JAX step with XLA's FMA contraction off (a
subprocess, since the flag must be set before JAX starts). With FMA on, one
contracted rounding of m moves a stochastic rounding to the other neighbour, and
the runs part (docs/spec.md); that is measured by the FMA tests of
test_cross_trajectory.py, not repeated here.

``python -m tests.cross.test_cross_narrow CASE...`` is that subprocess.
"""

import json
import os
import sys

import numpy as np
import pytest

from sophia import narrow
from tests.cross import problems
from tests.cross.drivers import JaxDriver, TorchDriver, group, trace
from tests.cross.references import ParamDtypeReference, Reference
from tests.helpers import BF16, run_module, ulp_diff

STEPS, K = 300, 3
MODES = ("loop", "foreach", "fused")


def case(name):
    """(problem, groups) of a named narrow run; every one refreshes every K steps, with decay."""
    if name == "mlp-bf16":  # bfloat16 m in both groups, h in one, dynamic rho in that one
        prob = problems.MLP(seed=4)
        groups = [
            group(["fc1.weight", "fc2.weight"], lr=0.02, rho=0.04, weight_decay=0.1, bs=48.0,
                  dynamic=True, mu_dtype="bfloat16", hessian_dtype="bfloat16", seed=11),
            group(["fc1.bias", "fc2.bias"], lr=0.01, b1=0.95, b2=0.98, rho=0.02, bs=48.0,
                  weight_decay=0.05, mu_dtype="bfloat16", seed=11),
        ]  # fmt: skip
        return prob, groups
    if name == "least-squares-block8":  # 300 coordinates: a whole and a partial block, and a 0-d
        prob = problems.LeastSquares(n=32, d=300, seed=5)
        groups = [group(list(prob.params0), lr=0.01, rho=0.05, weight_decay=0.01,
                        mu_dtype="bfloat16", hessian_dtype="block8", seed=2**32 - 1)]  # fmt: skip
        return prob, groups
    if name == "least-squares-bf16-f32-state":  # bfloat16 parameters, float32 m and h
        prob = problems.LeastSquares(dtype=BF16, seed=6)
        groups = [group(list(prob.params0), lr=0.01, rho=0.05, weight_decay=0.01,
                        mu_dtype="float32", hessian_dtype="float32", seed=3)]  # fmt: skip
        return prob, groups
    raise KeyError(name)


CASES = ["mlp-bf16", "least-squares-block8", "least-squares-bf16-f32-state"]


def parts(tree):
    """A state tree with each block8 array as two arrays (codes, scales), for bit comparison."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, narrow.Block8):
            out[f"{k}.codes"], out[f"{k}.scale"] = np.asarray(v.codes), np.asarray(v.scale)
        else:
            out[k] = np.asarray(v)
    return out


def max_ulp(snaps, ref_snaps):
    """The largest ulp distance of theta, m and h over every step (0: bit for bit)."""
    worst = 0
    for snap, ref in zip(snaps, ref_snaps, strict=True):
        for a, b in zip(snap, ref):
            a, b = parts(a), parts(b)
            assert a.keys() == b.keys()
            for k in a:
                assert a[k].dtype == b[k].dtype, (k, a[k].dtype, b[k].dtype)
                if a[k].dtype == np.int8:  # block8 codes: their distance in codes
                    d = np.abs(a[k].astype(np.int64) - b[k].astype(np.int64))
                    worst = max(worst, int(np.max(d, initial=0)))
                else:
                    worst = max(worst, ulp_diff(a[k], b[k]))
    return worst


def _jax_reference(prob, groups, ref):
    # sophia.jax returns bfloat16 updates for bfloat16 parameters (see test_cross_trajectory)
    if any(v.dtype.itemsize == 2 for v in prob.params0.values()):
        return trace(ParamDtypeReference(prob.params0, groups), prob, STEPS, K)
    return ref


@pytest.mark.parametrize("name", CASES)
def test_narrow_trajectories_are_identical(name, cross_report):
    prob, groups = case(name)
    ref = trace(Reference(prob.params0, groups), prob, STEPS, K)
    jax_ref = _jax_reference(prob, groups, ref)
    stored = ref[0][-1]
    for g in groups:  # the forms are what is stored
        for n in g["names"]:
            form = g.get("hessian_dtype")
            assert isinstance(stored[2][n], narrow.Block8) == (form == narrow.BLOCK8)
    if any(g["dynamic"] for g in groups):
        assert len({r[0] for r in ref[2]}) > 2, "rho never moved"
    drivers = {f"torch-{mode}": TorchDriver(prob.params0, groups, mode) for mode in MODES}
    drivers["jax"] = JaxDriver(prob.params0, groups)
    for dname, d in drivers.items():
        want = jax_ref if dname.startswith("jax") else ref
        snaps, rates, rhos = trace(d, prob, STEPS, K)
        ulp = max_ulp(snaps, want[0])
        cross_report(f"{name} {STEPS} steps k={K}: theta,m,h", dname, "numpy", ulp, None, "0 ulp")
        assert ulp == 0, dname
        assert rhos == want[2], f"{dname}: rho sequence differs"
        assert rates == want[1], f"{dname}: win rates differ"


def test_narrow_jitted_runs_without_fma_are_identical(cross_report):
    """Every case, all 300 steps, jitted (step and refresh) under --xla_cpu_max_isa=AVX: 0 ulp."""
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_max_isa=AVX")
    out = run_module("tests.cross.test_cross_narrow", *CASES, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["case"] for r in rows] == CASES
    for r in rows:
        cross_report(f"{r['case']} {STEPS} steps, no FMA", "jax-jit", "numpy", r["max_ulp"],
                     None, "0 ulp")  # fmt: skip
        assert r["max_ulp"] == 0 and r["rho_equal"] and r["rates_equal"], r


def main(names):
    """The jitted runs of ``names`` against the reference, one JSON line each (see the test)."""
    for name in names:
        prob, groups = case(name)
        ref = _jax_reference(prob, groups, trace(Reference(prob.params0, groups), prob, STEPS, K))
        got = trace(JaxDriver(prob.params0, groups, jit=True), prob, STEPS, K)
        row = dict(case=name, max_ulp=max_ulp(got[0], ref[0]))
        row.update(rho_equal=got[2] == ref[2], rates_equal=got[1] == ref[1])
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Long runs fed identical gradients and Hessian estimates: every implementation, every step.

Gradients and estimates are NumPy float64 functions of each implementation's own
current parameters (see problems.py), so as long as two implementations agree
they keep receiving identical inputs, and any difference is the optimizer's.
"""

import json
import os

import numpy as np
import pytest

from tests.cross import problems
from tests.cross.drivers import JaxDriver, TorchDriver, trace
from tests.cross.references import ParamDtypeReference, Reference
from tests.helpers import rel_diff, run_module, tree_rel, tree_ulp

CASES = ["least-squares", "logistic-maximize", "mlp-groups", "least-squares-bf16"]
# Op-by-op JAX dispatches every primitive on its own (~10 ms a step here), so it runs
# a prefix of each trajectory; the whole length is covered by the jitted step under the
# no-FMA flag (test_jitted_long_runs_without_fma_are_identical), the same computation.
OP_BY_OP_STEPS = 100


@pytest.mark.parametrize("case", CASES)
def test_long_run_trajectories_are_identical(case, cross_report):
    prob, groups, steps, k = problems.case(case)
    ref = torch_ref = trace(Reference(prob.params0, groups), prob, steps, k)
    # sophia.jax returns bfloat16 updates for bfloat16 parameters: JAX is held to the spec
    # taken through that update (the spec's value wherever an update can reach it)
    jax_ref = ref
    if any(v.dtype.itemsize == 2 for v in prob.params0.values()):
        jax_ref = trace(ParamDtypeReference(prob.params0, groups), prob, steps, k)
    drivers = {"jax": JaxDriver(prob.params0, groups)}
    for mode in ("loop", "foreach", "fused"):
        drivers[f"torch-{mode}"] = TorchDriver(prob.params0, groups, mode)
    drivers["jax-jit-step"] = JaxDriver(prob.params0, groups, jit=True, jit_refresh=False)
    dyn = [gi for gi, g in enumerate(groups) if g["dynamic"]]
    for gi in dyn:  # the dynamic rule must actually have been exercised
        assert len({r[gi] for r in ref[2][: OP_BY_OP_STEPS // k]}) > 2, "rho never moved"
    loss_ref = prob.loss(ref[0][-1][0])
    assert loss_ref < prob.loss(prob.params0) or groups[0]["maximize"]
    for name, d in drivers.items():
        n = min(OP_BY_OP_STEPS, steps) if name == "jax" else steps
        ref = jax_ref if name.startswith("jax") else torch_ref
        snaps, rates, rhos = trace(d, prob, n, k)
        ulps = [max(tree_ulp(a, b) for a, b in zip(s, r)) for s, r in zip(snaps, ref[0])]
        rels = [tree_rel(s[0], r[0]) for s, r in zip(snaps, ref[0])]
        tag = f"{case} {n} steps k={k}: theta,m,h every step"
        if name in ("jax", "torch-loop", "torch-foreach", "torch-fused"):
            cross_report(tag, name, "numpy", max(ulps), max(rels), "0 ulp")
            assert max(ulps) == 0, f"{name}: first difference at step {np.argmax(ulps)}"
            assert rhos == ref[2][: len(rhos)], f"{name}: rho sequence differs"
            assert rates == ref[1][:n], f"{name}: win rates differ"
            continue
        # jitted: XLA:CPU's FMA contraction changes roundings (docs/spec.md); measured
        first = next((t for t, u in enumerate(ulps) if u), None)
        loss_rel = abs(prob.loss(snaps[-1][0]) - loss_ref) / abs(loss_ref)
        rho_rel = max(rel_diff(a, b) for a, b in zip(rhos, ref[2]))
        note = f"first diff step {first}; final loss rel {loss_rel:.1e}; rho rel {rho_rel:.1e}"
        cross_report(tag, name, "numpy", max(ulps), max(rels), note)
        if any(g["dynamic"] for g in groups) and rho_rel > 0:
            # one rounding moved a win rate across the dynamic rule's band: rho, and with it
            # the trajectory, separate; the outcome stays close
            assert loss_rel <= 0.1
        elif case == "mlp-groups":
            assert max(rels) <= 1e-4 and loss_rel <= 1e-4
        else:  # the target is 1e-6; FMA roundings measured just above it
            assert max(rels) <= 1e-5 and loss_rel <= 1e-6


def test_jitted_long_runs_without_fma_are_identical(cross_report):
    """Under --xla_cpu_max_isa=AVX (no FMA contraction) the jitted step is 0 ulp every step.

    The jitted *refresh* is measured too: with dynamic=True XLA rewrites the dynamic
    rule's ``rho / 1.25`` into ``rho * 0.8`` (and ``rho0 / 100`` into ``rho0 * 0.01``),
    which is not the spec's correctly rounded quotient, so rho can differ by an ulp
    (a known issue in sophia.jax, reported; recorded here, not asserted).
    """
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_max_isa=AVX")
    out = run_module("tests.cross.cross_nofma", *CASES, "logistic:builtin", env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    dynamic = {"least-squares", "mlp-groups", "least-squares-bf16"}
    assert {(r["case"], r["driver"]) for r in rows} == {(c, "jax-jit-step") for c in CASES} | {
        (c, "jax-jit") for c in dynamic
    } | {("logistic:builtin", "jax-jit-builtin")}
    for r in rows:
        tag = f"{r['case']} {r['steps']} steps, no FMA: every step"
        if r["driver"] in ("jax-jit-step", "jax-jit-builtin"):
            cross_report(tag, r["driver"], "numpy", r["max_ulp"], None, "0 ulp")
            assert r["max_ulp"] == 0 and r["rho_equal"] and r["rates_equal"], r
        else:
            note = f"rho equal: {r['rho_equal']} (jitted rho/1.25 -> rho*0.8, reported)"
            cross_report(tag, "jax-jit", "numpy", r["max_ulp"], None, note)

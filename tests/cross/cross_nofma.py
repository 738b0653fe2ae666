"""``python -m tests.cross.cross_nofma CASE...`` under XLA_FLAGS=--xla_cpu_max_isa=AVX: jitted JAX
long runs against the reference.

Prints one JSON line per case: the largest ulp difference over every step and
whether the rho sequences and win rates are equal. test_cross_trajectory.py
starts it (the flag must be set before JAX initialises its CPU backend).
"""

import json
import sys

from tests.cross.drivers import JaxDriver, trace
from tests.cross.problems import case
from tests.cross.references import ParamDtypeReference
from tests.helpers import tree_ulp


def main(names):
    for name in names:
        builtin = name.endswith(":builtin")  # the transform's own refresh (lax.cond)
        prob, groups, steps, k = case(name.split(":")[0])
        ref = trace(ParamDtypeReference(prob.params0, groups), prob, steps, k)  # see references.py
        # the jitted refresh is measured where dynamic rho makes it differ (see the test)
        dynamic = any(g["dynamic"] for g in groups)
        for jit_refresh in (True,) if builtin else (False, True) if dynamic else (False,):
            kw = dict(builtin=k) if builtin else dict(jit_refresh=jit_refresh)
            d = JaxDriver(prob.params0, groups, jit=True, **kw)
            got = trace(d, prob, steps, k)
            ulps = [max(tree_ulp(a, b) for a, b in zip(s, r)) for s, r in zip(got[0], ref[0])]
            first = next((t for t, u in enumerate(ulps) if u), None)
            driver = "jax-jit-builtin" if builtin else d.name
            out = dict(case=name, driver=driver, steps=steps, max_ulp=max(ulps))
            out.update(first_diff=first, rho_equal=got[2] == ref[2], rates_equal=got[1] == ref[1])
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

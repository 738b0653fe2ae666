"""One step from identical state: NumPy reference, JAX (op by op, jitted) and every torch path."""

import numpy as np
import pytest

from sophia import spec
from tests.cross.drivers import JaxDriver, TorchDriver, group, set_state
from tests.cross.references import ParamDtypeReference, Reference
from tests.helpers import BF16, random_leaves, ulp_diff, within_rounding

SHAPES = [(7,), (3, 5), (0,), (), (64, 33), (2, 0, 3)]
HP = dict(lr=0.05, b1=0.9, b2=0.95, rho=0.03, weight_decay=0.2, eps=1e-12, bs=17.0)
EXACT = ["jax", "torch-loop", "torch-foreach", "torch-fused"]


def _drivers(params, groups):
    out = {"numpy": Reference(params, groups), "jax": JaxDriver(params, groups)}
    # sophia.jax's bfloat16 updates are bfloat16: the spec's step taken through them
    out["numpy-param-dtype"] = ParamDtypeReference(params, groups)
    out["jax-jit"] = JaxDriver(params, groups, jit=True)
    for mode in ("loop", "foreach", "fused"):
        out[f"torch-{mode}"] = TorchDriver(params, groups, mode)
    return out


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("maximize", [False, True])
def test_single_step_is_bit_identical_across_frameworks(dtype, maximize, cross_report):
    theta, g, m, h = random_leaves(0, SHAPES, dtype)
    groups = [group(list(theta), maximize=maximize, **HP)]
    drivers = _drivers(theta, groups)
    h_hat = {k: np.abs(v).astype(np.float32) for k, v in random_leaves(1, SHAPES, dtype)[3].items()}
    for d in drivers.values():
        set_state(d, m, h)
        d.refresh(h_hat)
        d.step(g)
    ref = drivers["numpy"]
    tag = f"1 step {np.dtype(dtype).name}{' max' if maximize else ''}"
    for name in EXACT:
        d = drivers[name]
        want = drivers["numpy-param-dtype"] if name == "jax" else ref
        worst = 0
        for field in ("params", "mu", "hessian"):
            a, b = getattr(d, field)(), getattr(want, field)()
            worst = max(worst, max(ulp_diff(a[k], b[k]) for k in b))
        cross_report(f"{tag}: theta, m, h", name, "numpy", worst, None, "0 ulp")
        assert worst == 0, f"{name} differs from the spec by {worst} ulp"
        assert d.win_rates() == ref.win_rates()
    # every torch path against every other (pairwise identity follows, but say it)
    for a in EXACT[2:]:
        pa, pt = drivers[a].params(), drivers["torch-loop"].params()
        assert max(ulp_diff(pa[k], pt[k]) for k in pt) == 0

    # jitted JAX: XLA:CPU contracts a*b+c into FMAs (docs/spec.md): the momentum within
    # 2 ulp of its operands, theta within 2 ulp given the momentum jit computed
    d = drivers["jax-jit"]
    p_j, m_j, h_j = d.params(), d.mu(), d.hessian()
    p_r, m_r = ref.params(), ref.mu()
    worst_p = max(ulp_diff(p_j[k], p_r[k]) for k in p_r)
    worst_m = max(ulp_diff(m_j[k], m_r[k]) for k in m_r)
    cross_report(f"{tag}: theta (m)", "jax-jit", "numpy", f"{worst_p} ({worst_m})", None,
                 "FMA: 2 ulp of operands")  # fmt: skip
    if dtype == np.float32:
        kw = {k: v for k, v in HP.items() if k not in ("b1", "b2")}
        for k in theta:
            h_new = spec.hessian_ema(h[k], h_hat[k], HP["b2"])
            assert within_rounding(h_j[k], h_new, h[k], h_hat[k]), k
            gk = -g[k] if maximize else g[k]
            assert within_rounding(m_j[k], m_r[k], m[k], gk), k
            t_given_m, _, _ = spec.sophia_update(
                theta[k], m_j[k], np.zeros_like(m[k]), h_j[k], b1=0.0, **kw
            )
            assert within_rounding(p_j[k], t_given_m, theta[k], HP["lr"]), k

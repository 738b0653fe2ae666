"""Refresh schedule, weight-decay masks vs groups, GNB with shared labels, validation messages."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import sophia.jax as sj
import sophia.torch as st
from sophia import spec
from sophia.torch import SophiaG
from tests.cross.drivers import JaxDriver, TorchDriver, group, run
from tests.cross.problems import MLP, LeastSquares
from tests.cross.references import Reference
from tests.helpers import rel_diff, tree_rel, tree_ulp


def _snapshots(driver, prob, steps, k):
    snaps = []
    rhos = run(driver, prob.params0, prob.grad, prob.hhat, steps, k,
               lambda t, d: snaps.append((d.params(), d.mu(), d.hessian())))  # fmt: skip
    return snaps, rhos


def test_builtin_refresh_schedule_matches_torch_manual_refresh(cross_report):
    """JAX's own refresh (t % k == 0, before the update) = torch's update_hessian before step t.

    The built-in refresh runs under ``lax.cond``, which compiles its branches even
    outside ``jit``, so XLA:CPU's FMA contraction applies to the EMA: here (default
    flags) the Hessian must agree to rounding at every step, which a refresh on a
    different step could not; test_cross_trajectory's no-FMA subprocess holds the same
    schedule to 0 ulp.
    """
    prob = LeastSquares(seed=3)
    groups = [group(list(prob.params0), lr=0.02, rho=0.05, weight_decay=0.01)]
    k, steps = 4, 200
    ref, _ = _snapshots(Reference(prob.params0, groups), prob, steps, k)
    torch_snaps, _ = _snapshots(TorchDriver(prob.params0, groups), prob, steps, k)
    worst = max(max(tree_ulp(a, b) for a, b in zip(s, r)) for s, r in zip(torch_snaps, ref))
    cross_report(f"refresh every {k}, {steps} steps", "torch-loop", "numpy", worst, None, "0 ulp")
    assert worst == 0
    snaps, _ = _snapshots(JaxDriver(prob.params0, groups, builtin=k, jit=True), prob, steps, k)
    h_rel = max(tree_rel(s[2], r[2]) for s, r in zip(snaps, ref))
    p_rel = max(tree_rel(s[0], r[0]) for s, r in zip(snaps, ref))
    cross_report(f"refresh every {k}, {steps} steps: h (theta)", "jax-builtin-jit", "numpy",
                 None, h_rel, f"FMA rounding; theta rel {p_rel:.1e}")  # fmt: skip
    assert h_rel <= 1e-6 and p_rel <= 1e-5


def test_weight_decay_mask_equals_param_group_without_decay(cross_report):
    prob = MLP(seed=4)
    decayed = {"fc1.weight": True, "fc1.bias": False, "fc2.weight": True, "fc2.bias": False}
    hp = dict(lr=0.02, rho=0.04, bs=48.0)
    groups = [
        group([n for n in prob.params0 if decayed[n]], weight_decay=0.1, **hp),
        group([n for n in prob.params0 if not decayed[n]], weight_decay=0.0, **hp),
    ]
    steps, k = 40, 10
    ref, _ = _snapshots(Reference(prob.params0, groups), prob, steps, k)
    for d in (
        JaxDriver(prob.params0, groups, wd_mask=(0.1, decayed)),
        TorchDriver(prob.params0, groups, "foreach"),
    ):
        snaps, _ = _snapshots(d, prob, steps, k)
        worst = max(max(tree_ulp(a, b) for a, b in zip(s, r)) for s, r in zip(snaps, ref))
        name = "jax-wd-mask" if isinstance(d, JaxDriver) else "torch-groups"
        cross_report(f"wd mask vs groups, {steps} steps", name, "numpy", worst, None, "0 ulp")
        assert worst == 0


# ------------------------------------------------------------------------------- GNB


def _linear_problem(seed=0, n=40, d=5, c=4):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = (rng.normal(size=(c, d)) * 0.7).astype(np.float32)
    b = (rng.normal(size=c) * 0.3).astype(np.float32)
    return x, w, b


def _gnb_numpy(x, w, b, labels):
    """GNB in float64: square of the gradient of the mean cross-entropy at the given labels."""
    x64, w64, b64 = (np.asarray(a, np.float64) for a in (x, w, b))
    z = x64 @ w64.T + b64
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    n = labels.shape[-1]
    r = (p - np.eye(w.shape[0])[labels]) / n  # [..., n, c]
    gw = np.einsum("...nc,nd->...cd", r, x64)
    gb = r.sum(-2)
    return gw**2, gb**2


def _jax_gnb(x, w, b, labels):
    params = {"weight": jnp.asarray(w), "bias": jnp.asarray(b)}
    h = sj.gnb(
        params,
        jax.random.PRNGKey(0),
        logits_fn=lambda p: jnp.asarray(x) @ p["weight"].T + p["bias"],
        labels=jnp.asarray(labels),
    )
    return np.asarray(h["weight"]), np.asarray(h["bias"])


def _torch_model(x, w, b):
    lin = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
        lin.bias.copy_(torch.from_numpy(b))
    return lin, torch.from_numpy(x)


def test_gnb_with_the_same_labels_gives_the_same_estimate(cross_report):
    x, w, b = _linear_problem()
    labels = np.random.default_rng(1).integers(0, w.shape[0], size=x.shape[0])
    hj = _jax_gnb(x, w, b, labels)
    lin, xt = _torch_model(x, w, b)
    ht = st.gnb(lin(xt), [lin.weight, lin.bias], labels=torch.from_numpy(labels))
    ht = [h.detach().numpy() for h in ht]
    hn = _gnb_numpy(x, w, b, labels)
    # the optimizer's own refresh with those labels (torch) applies the same estimate
    opt = SophiaG(lin.parameters(), betas=(0.9, 0.0))  # b2 = 0: h becomes the estimate
    opt.update_hessian(logits=lin(xt), labels=torch.from_numpy(labels))
    h_opt = [opt.state[p]["hessian"].numpy() for p in (lin.weight, lin.bias)]
    for i, name in enumerate(("weight", "bias")):
        jt, jn, tn = rel_diff(hj[i], ht[i]), rel_diff(hj[i], hn[i]), rel_diff(ht[i], hn[i])
        cross_report(f"GNB same labels: h_hat {name}", "jax", "torch", None, jt, "1e-6 rel")
        cross_report(f"GNB same labels: h_hat {name}", "jax", "numpy-f64", None, jn, "1e-6 rel")
        cross_report(f"GNB same labels: h_hat {name}", "torch", "numpy-f64", None, tn, "1e-6 rel")
        assert max(jt, jn, tn) <= 1e-6
        np.testing.assert_array_equal(h_opt[i], ht[i])


def test_gnb_trajectory_with_shared_labels(cross_report):
    """60 steps, GNB refresh every 5 steps from each framework's own estimator with the same labels.

    Gradients are fed (NumPy at each side's own parameters); the estimates come from JAX's
    ``gnb(labels=...)`` and torch's ``update_hessian(logits=..., labels=...)``.
    """
    x, w, b = _linear_problem(seed=2)
    rng = np.random.default_rng(3)
    y = rng.integers(0, w.shape[0], size=x.shape[0])
    hp = dict(lr=0.05, b1=0.9, b2=0.95, rho=0.05, weight_decay=0.0, eps=1e-12, bs=40.0)

    def grad_np(wv, bv):
        gw, gb = _gnb_grad(x, wv, bv, y)
        return gw.astype(np.float32), gb.astype(np.float32)

    def labels_at(t):
        return np.random.default_rng(100 + t).integers(0, w.shape[0], size=x.shape[0])

    tx = sj.sophia_g(hp["lr"], hp["b1"], hp["b2"], hp["rho"], hp["weight_decay"], bs=hp["bs"],
                     eps=hp["eps"], hessian_update_interval=None)  # fmt: skip
    pj = {"weight": jnp.asarray(w), "bias": jnp.asarray(b)}
    sj_state = tx.init(pj)
    lin, xt = _torch_model(x, w, b)
    opt = SophiaG(lin.parameters(), lr=hp["lr"], betas=(hp["b1"], hp["b2"]), rho=hp["rho"],
                  weight_decay=0.0, eps=hp["eps"], bs=hp["bs"], foreach=False)  # fmt: skip
    worst_h, worst_p = 0.0, 0.0
    for t in range(60):
        refresh = {}
        if t % 5 == 0:
            labels = labels_at(t)
            refresh["hessian"] = sj.gnb(pj, jax.random.PRNGKey(t), labels=jnp.asarray(labels),
                       logits_fn=lambda p: jnp.asarray(x) @ p["weight"].T + p["bias"])  # fmt: skip
            opt.update_hessian(logits=lin(xt), labels=torch.from_numpy(labels))
        gw, gb = grad_np(np.asarray(pj["weight"]), np.asarray(pj["bias"]))
        g = {"weight": jnp.asarray(gw), "bias": jnp.asarray(gb)}
        u, sj_state = tx.update(g, sj_state, pj, **refresh)
        pj = optax.apply_updates(pj, u)
        if refresh:  # the step leaves h as the refresh set it
            hj = {k: np.asarray(v) for k, v in sj_state[0].hessian.items()}
            ht = {"weight": opt.state[lin.weight]["hessian"].numpy(),
                  "bias": opt.state[lin.bias]["hessian"].numpy()}  # fmt: skip
            worst_h = max(worst_h, tree_rel(hj, ht))
        gw, gb = grad_np(lin.weight.detach().numpy(), lin.bias.detach().numpy())
        lin.weight.grad, lin.bias.grad = torch.from_numpy(gw), torch.from_numpy(gb)
        opt.step()
        pt = {"weight": lin.weight.detach().numpy(), "bias": lin.bias.detach().numpy()}
        worst_p = max(worst_p, tree_rel({k: np.asarray(v) for k, v in pj.items()}, pt))
    cross_report("GNB shared labels, 60 steps: h", "jax", "torch", None, worst_h, "1e-6 rel")
    cross_report("GNB shared labels, 60 steps: theta", "jax", "torch", None, worst_p, "1e-5 rel")
    assert worst_h <= 1e-6
    assert worst_p <= 1e-5


def _gnb_grad(x, w, b, labels):
    z = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T + np.asarray(b, np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    r = (p - np.eye(w.shape[0])[labels]) / len(labels)
    return r.T @ np.asarray(x, np.float64), r.sum(0)


def test_label_sampling_has_the_same_expectation_on_both_sides(cross_report):
    """Each side samples with its own PRNG; the mean estimate matches the exact expectation.

    For a linear softmax model ``E[h_hat] = sum_i x_i^2 (p_i (1 - p_i)) / N^2`` entrywise
    (the sampled residuals are independent with mean 0). Every entry of each side's mean
    over S draws must lie within 5 standard errors of it, and the two means within 5
    combined standard errors of each other.
    """
    x, w, b = _linear_problem(seed=5, n=12, d=3, c=3)
    s = 4000
    z = x.astype(np.float64) @ w.T.astype(np.float64) + b
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    n = x.shape[0]
    exact_w = (p * (1 - p)).T @ (x.astype(np.float64) ** 2) / n**2
    logits = np.broadcast_to(z.astype(np.float32), (s, *z.shape))
    yj = np.asarray(sj.sample_labels(jax.random.PRNGKey(7), jnp.asarray(logits)))
    gen = torch.Generator().manual_seed(7)
    yt = st.sample_labels(torch.from_numpy(np.ascontiguousarray(logits)), generator=gen).numpy()
    means, ses = {}, {}
    for name, y in (("jax", yj), ("torch", yt)):
        assert y.shape == (s, n)
        hw, _ = _gnb_numpy(x, w, b, y)
        means[name], ses[name] = hw.mean(0), hw.std(0) / np.sqrt(s)
        z_score = np.max(np.abs(means[name] - exact_w) / ses[name])
        cross_report("GNB sampling: mean h_hat vs exact E", name, "exact", None,
                     rel_diff(means[name], exact_w), f"max {z_score:.1f} SE (<= 5)")  # fmt: skip
        assert z_score <= 5
    z_both = np.max(np.abs(means["jax"] - means["torch"]) / np.hypot(ses["jax"], ses["torch"]))
    assert z_both <= 5


# ------------------------------------------------------------------------------- validation

BAD = [
    dict(lr=-1.0),
    dict(lr=float("inf")),
    dict(b1=1.0),
    dict(b2=-0.1),
    dict(rho=0.0),
    dict(rho=float("nan")),
    dict(weight_decay=-0.5),
    dict(eps=-1e-8),
    dict(bs=0),
    dict(maximize="yes"),
    dict(dynamic=1),
]


def _jax_kwargs(bad):
    kw = dict(learning_rate=0.1, b1=0.9, b2=0.99, rho=0.04, weight_decay=0.1, bs=10.0,
              eps=1e-12, maximize=False, dynamic=False)  # fmt: skip
    kw.update({("learning_rate" if k == "lr" else k): v for k, v in bad.items()})
    return kw


def _torch_kwargs(bad):
    kw = dict(lr=0.1, betas=(0.9, 0.99), rho=0.04, weight_decay=0.1, bs=10.0, eps=1e-12,
              maximize=False, dynamic=False)  # fmt: skip
    b1, b2 = kw["betas"]
    for k, v in bad.items():
        if k == "b1":
            b1 = v
        elif k == "b2":
            b2 = v
        else:
            kw[k] = v
    kw["betas"] = (b1, b2)
    return kw


def _message(fn):
    with pytest.raises(ValueError) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize("bad", BAD, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_validation_errors_are_the_same_on_both_sides(bad):
    p = torch.nn.Parameter(torch.zeros(3))
    m_jax = _message(lambda: sj.sophia_g(**_jax_kwargs(bad)))
    m_torch = _message(lambda: SophiaG([p], **_torch_kwargs(bad)))
    m_group = _message(lambda: SophiaG([{"params": [p], **_torch_kwargs(bad)}]))
    m_spec = _message(
        lambda: spec.SophiaHyperParams(
            **{k: v for k, v in _torch_kwargs(bad).items() if k != "bs"},
            bs=_torch_kwargs(bad)["bs"],
        )
    )
    assert m_jax == m_torch == m_group == m_spec
    assert m_jax.startswith("Invalid ")

"""SophiaG (torch) trains the same small problems as the JAX tests to their optimum."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sophia.torch import SophiaG, hutchinson


def _train_hutchinson(params, loss_fn, opt, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        opt.update_hessian(hessian=hutchinson(loss, params, gen, grads=grads))
        for p, g in zip(params, grads):
            p.grad = g.detach()
        opt.step()


def test_ill_conditioned_quadratic_with_hutchinson():
    scales = torch.logspace(-2, 2, 10)
    target = torch.linspace(-1, 1, 10)
    p = torch.nn.Parameter(torch.zeros(10))
    opt = SophiaG([p], lr=0.05, rho=1.0, bs=1, weight_decay=0.0)
    _train_hutchinson([p], lambda: 0.5 * (scales * (p - target) ** 2).sum(), opt, 400)
    # exact Hessian for a diagonal quadratic: Newton steps clipped at lr reach every target
    np.testing.assert_allclose(p.detach().numpy(), target.numpy(), atol=2e-2)
    np.testing.assert_allclose(opt.state[p]["hessian"].numpy(), scales.numpy(), rtol=0.02)


def test_rosenbrock_with_hutchinson():
    p = torch.nn.Parameter(torch.tensor([-1.0, 1.0]))

    def loss():
        return (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2

    opt = SophiaG([p], lr=0.02, rho=0.05, bs=1, weight_decay=0.0)
    _train_hutchinson([p], loss, opt, 3000)
    assert loss().item() < 1e-2
    np.testing.assert_allclose(p.detach().numpy(), [1.0, 1.0], atol=0.15)


def _blobs(n=400, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 2
    y = rng.integers(0, k, n)
    x = centers[y] + rng.normal(size=(n, d))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


@pytest.mark.parametrize("path", ["foreach", "fused"])
def test_logistic_regression_with_gnb_matches_the_lbfgs_optimum(path):
    x, y = _blobs()
    w = torch.nn.Parameter(torch.zeros(5, 3))
    b = torch.nn.Parameter(torch.zeros(3))

    def loss(logits):
        return F.cross_entropy(logits, y) + 1e-2 * (w**2).sum()

    lbfgs = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        value = loss(x @ w + b)
        value.backward()
        return value

    lbfgs.step(closure)
    ref_loss = loss(x @ w + b).item()
    with torch.no_grad():
        w.zero_()
        b.zero_()
    opt = SophiaG([w, b], lr=0.05, rho=0.05, weight_decay=0.0, bs=x.shape[0], **{path: True})
    gen = torch.Generator().manual_seed(0)
    for k in range(600):
        opt.zero_grad()
        logits = x @ w + b
        if k % 5 == 0:
            opt.update_hessian(logits=logits, generator=gen)  # reuses this forward
        loss(logits).backward()
        opt.step()
    assert loss(x @ w + b).item() < ref_loss + 2e-3
    assert opt.diagnostics()[0]["hessian_norm"].item() > 0


def test_tiny_mlp_with_gnb_learns():
    x, y = _blobs(n=256, d=4, k=4, seed=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    loss0 = F.cross_entropy(model(x), y).item()
    opt = SophiaG(model.parameters(), lr=0.02, rho=0.05, weight_decay=0.0, bs=256)
    for k in range(300):
        opt.zero_grad()
        logits = model(x)
        if k % 10 == 0:
            opt.update_hessian(logits=logits)
        F.cross_entropy(logits, y).backward()
        opt.step()
    with torch.no_grad():
        logits = model(x)
    assert F.cross_entropy(logits, y).item() < 0.3 * loss0
    assert (logits.argmax(-1) == y).float().mean().item() > 0.9
    d = opt.diagnostics()[0]
    assert 0.0 <= d["win_rate"].item() <= 1.0 and d["count"].item() == 300


def test_maximize_ascends_to_the_maximum():
    weights = torch.tensor([1.0, 3.0, 9.0])
    p = torch.nn.Parameter(torch.zeros(3))
    opt = SophiaG([p], lr=0.05, rho=1.0, bs=1, weight_decay=0.0, maximize=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        opt.zero_grad()
        obj = -((p - 2.0) ** 2 * weights).sum()
        (grad,) = torch.autograd.grad(obj, [p], create_graph=True)
        # the curvature of the objective being minimised, -obj
        opt.update_hessian(hessian=hutchinson(-obj, [p], gen, grads=[-grad]))
        p.grad = grad.detach()
        opt.step()
    np.testing.assert_allclose(p.detach().numpy(), [2.0, 2.0, 2.0], atol=2e-2)

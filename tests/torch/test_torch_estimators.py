"""GNB and Hutchinson estimators, and the one-call update_hessian(logits=...)."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sophia import spec
from sophia.torch import SophiaG, gnb, hutchinson, sample_labels, sampled_label_grads


def _softmax_model(n=6, d=3, vocab=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.nn.Parameter(torch.randn(d, vocab, generator=g, dtype=dtype))
    b = torch.nn.Parameter(torch.randn(vocab, generator=g, dtype=dtype) * 0.5)
    return x, w, b


def _gauss_newton_diagonal(x, w, b):
    """diag of the Gauss-Newton matrix of the mean CE of softmax(x w + b), in closed form."""
    with torch.no_grad():
        p = torch.softmax(x @ w + b, dim=-1)
        curv = p * (1 - p)  # diagonal of the softmax Hessian w.r.t. the logits
        n = x.shape[0]
        return (x**2).T @ curv / n, curv.sum(0) / n


def test_gnb_expectation_is_the_gauss_newton_diagonal_over_bs():
    x, w, b = _softmax_model()
    gen = torch.Generator().manual_seed(1)
    logits = x @ w + b
    k = 2000
    samples = [gnb(logits, [w, b], generator=gen) for _ in range(k)]
    n_labels = x.shape[0]
    for i, expect in enumerate(_gauss_newton_diagonal(x, w, b)):
        est = torch.stack([s[i] for s in samples]) * n_labels  # bs * h_hat
        mean, sem = est.mean(0), est.std(0) / k**0.5
        assert torch.all((mean - expect).abs() <= 5 * sem + 1e-12), (mean, expect)
        assert torch.all(expect > 0)


def test_gnb_with_fixed_labels_is_the_squared_mean_ce_gradient():
    x, w, b = _softmax_model(n=5)
    y = torch.tensor([0, 3, 1, 1, 2])
    logits = x @ w + b
    h_w, h_b = gnb(logits, [w, b], labels=y)
    with torch.no_grad():
        resid = (torch.softmax(logits, -1) - F.one_hot(y, 4).double()) / 5
        assert torch.allclose(h_w, (x.T @ resid) ** 2, rtol=1e-12, atol=0)
        assert torch.allclose(h_b, resid.sum(0) ** 2, rtol=1e-12, atol=0)


def test_sample_labels_follow_the_softmax():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]]).expand(20000, 4)
    y = sample_labels(logits, torch.Generator().manual_seed(0))
    assert y.shape == (20000,) and y.dtype == torch.int64
    freq = torch.bincount(y, minlength=4).double() / 20000
    p = torch.softmax(logits[0].double(), -1)
    assert torch.all((freq - p).abs() < 5 * (p * (1 - p) / 20000).sqrt())
    assert sample_labels(torch.zeros(2, 0, 3)).shape == (2, 0)


def test_sample_labels_never_draw_a_class_of_probability_zero():
    inf = float("inf")
    logits = torch.tensor([[-inf, 0.0, -inf, 1.0, -inf]]).expand(50000, 5)
    y = sample_labels(logits, torch.Generator().manual_seed(1))
    counts = torch.bincount(y, minlength=5)
    assert counts[[0, 2, 4]].sum() == 0  # first, middle and last class: p = 0
    p = torch.softmax(torch.tensor([0.0, 1.0], dtype=torch.float64), -1)[0]
    assert abs(counts[1] / 50000 - p) < 5 * (p * (1 - p) / 50000).sqrt()
    one = sample_labels(torch.tensor([[-inf, 3.0, -inf]]), torch.Generator().manual_seed(2))
    assert one.tolist() == [1]


def test_update_hessian_from_logits_leaves_grad_and_graph_for_the_training_backward():
    x, w, b = _softmax_model()
    opt = SophiaG([w, b], lr=0.1)
    logits = x @ w + b
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    opt.update_hessian(logits=logits, generator=torch.Generator().manual_seed(5))
    assert w.grad is None and b.grad is None
    F.cross_entropy(logits, y).backward()  # the graph is still there
    expect = gnb(x @ w + b, [w, b], generator=torch.Generator().manual_seed(5))
    for p, e in zip((w, b), expect):
        h0 = np.zeros(p.shape)
        ema = spec.hessian_ema(h0, e.numpy(), spec.DEFAULTS.betas[1])
        assert np.array_equal(opt.state[p]["hessian"].numpy(), ema)
    opt.step()


def test_update_hessian_from_logits_skips_frozen_and_zeroes_unused_params():
    x, w, b = _softmax_model()
    unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    b.requires_grad_(False)
    opt = SophiaG([w, b, unused])
    opt.update_hessian(hessian=[torch.ones_like(w), torch.ones_like(b), torch.ones_like(unused)])
    before_b = opt.state[b]["hessian"].clone()
    opt.update_hessian(logits=x @ w + b, allow_repeat=True)
    assert torch.equal(opt.state[b]["hessian"], before_b)
    b2 = spec.DEFAULTS.betas[1]
    expect = spec.hessian_ema(np.full(3, 1 - b2), np.zeros(3), b2)
    assert np.array_equal(opt.state[unused]["hessian"].numpy(), expect)


def test_gnb_for_bfloat16_params_is_float32():
    lin = torch.nn.Linear(3, 4).to(torch.bfloat16)
    logits = lin(torch.randn(5, 3, dtype=torch.bfloat16))
    est = gnb(logits, list(lin.parameters()))
    assert all(e.dtype == torch.float32 and torch.isfinite(e).all() for e in est)
    opt = SophiaG(lin.parameters())
    opt.update_hessian(logits=lin(torch.randn(5, 3, dtype=torch.bfloat16)))
    assert opt.state[lin.weight]["hessian"].dtype == torch.bfloat16


def test_hutchinson_is_exact_on_a_diagonal_quadratic():
    d = torch.tensor([1.0, -2.0, 3.5], dtype=torch.float64)
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    loss = 0.5 * (d * p**2).sum()
    (h,) = hutchinson(loss, [p], torch.Generator().manual_seed(0))
    assert torch.equal(h, d)


def test_hutchinson_expectation_is_the_hessian_diagonal():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    a = a @ a.T
    p = torch.nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))
    q = torch.nn.Parameter(torch.randn(2, generator=g, dtype=torch.float64))  # zero diagonal
    unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    k = 2000
    loss = 0.5 * p @ a @ p + q.sum() * p.sum()
    params = [p, q, unused]
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    samples = [hutchinson(loss, params, g, grads=grads, retain_graph=True) for _ in range(k)]
    for i, expect in enumerate([torch.diagonal(a), torch.zeros(2, dtype=torch.float64)]):
        est = torch.stack([s[i] for s in samples])
        mean, sem = est.mean(0), est.std(0) / k**0.5
        assert torch.all((mean - expect).abs() <= 5 * sem + 1e-12)
    assert all(torch.equal(s[2], torch.zeros(3, dtype=torch.float64)) for s in samples)


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, w, b = _softmax_model(seed=0)
        xr = x + rank  # each rank sees its own batch
        y = torch.tensor([rank, 1, 2, 3, 0, 1])
        opt = SophiaG([w, b])
        opt.update_hessian(logits=xr @ w + b, labels=y)
        grads = sampled_label_grads(xr @ w + b, [w, b], labels=y, average_across_ranks=False)
        # masks keeping 3 and 5 positions: the estimate is that of the mean over all 8
        mask = torch.arange(6) < (3 if rank == 0 else 5)
        masked = SophiaG([w, b], betas=(0.9, 0.0))  # b2 = 0: h becomes the estimate
        masked.update_hessian(logits=xr @ w + b, labels=y, mask=mask)
        loss = F.cross_entropy((xr @ w + b)[mask], y[mask], reduction="sum")
        torch.save(
            {
                "h": [opt.state[p]["hessian"] for p in (w, b)],
                "g": grads,
                "h_masked": [masked.state[p]["hessian"] for p in (w, b)],
                "count": masked.state[w]["group_label_count"],
                "g_sum": torch.autograd.grad(loss, [w, b]),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_update_hessian_from_logits_averages_the_gradient_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    args = (2, str(tmp_path / "init"), str(tmp_path))
    mp.start_processes(_ddp_worker, args=args, nprocs=2, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    b2 = spec.DEFAULTS.betas[1]
    for h0, h1, g0, g1 in zip(r0["h"], r1["h"], r0["g"], r1["g"]):
        assert torch.equal(h0, h1)  # the same Hessian on every rank
        avg = ((g0 + g1) / 2).numpy()
        expect = spec.hessian_ema(np.zeros(avg.shape), avg * avg, b2)
        np.testing.assert_allclose(h0.numpy(), expect, rtol=1e-12, atol=0)
        assert not torch.equal(g0, g1)
    assert int(r0["count"]) == int(r1["count"]) == 8  # the global label count
    for h0, h1, s0, s1 in zip(r0["h_masked"], r1["h_masked"], r0["g_sum"], r1["g_sum"]):
        assert torch.equal(h0, h1)
        np.testing.assert_allclose(h0.numpy(), (((s0 + s1) / 8) ** 2).numpy(), rtol=1e-12)

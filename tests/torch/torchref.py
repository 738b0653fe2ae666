"""What the torch tests share beyond tests.helpers: kernels, tensor copies, a reference."""

import contextlib

import numpy as np
import pytest
import torch

from sophia import spec
from tests.helpers import identical

#: The three implementations, as SophiaG / sophia_g keyword arguments. On CPU the
#: fused path has two kernels: "fused" is the native one, "fused_compiled" the
#: torch.compile one it falls back to (run with SOPHIA_TORCH_NATIVE=0, see path_env).
PATHS = {
    "single": {"foreach": False, "fused": False},
    "foreach": {"foreach": True, "fused": False},
    "fused": {"foreach": False, "fused": True},
    "fused_compiled": {"foreach": False, "fused": True},
}
path_param = pytest.mark.parametrize("path", list(PATHS))


@contextlib.contextmanager
def path_env(path):
    """The environment ``path`` needs: the native CPU kernel off for "fused_compiled"."""
    with pytest.MonkeyPatch.context() as mp:
        if path == "fused_compiled":
            mp.setenv("SOPHIA_TORCH_NATIVE", "0")
        yield


@contextlib.contextmanager
def one_torch_thread():
    """One intra-op thread: the tensors here are tiny, and CI boxes are small and shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


SHAPES = [(), (0,), (3, 0), (1,), (7,), (4, 5), (2, 3, 4), (129,), (33, 17)]

TORCH = {np.float32: torch.float32, np.float64: torch.float64}


def t(a, dtype=None):
    """A torch tensor copy of a NumPy array (optionally cast)."""
    x = torch.from_numpy(np.array(a, copy=True))
    return x if dtype is None else x.to(dtype)


def n(x):
    """A NumPy copy of a tensor (bf16/f16 go through float32, exactly)."""
    x = x.detach()
    if x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()
    return x.numpy().copy()


def same(a, b):
    """Exact equality, arrays or tensors: NaN == NaN, and -0 != +0 (the sign bit counts)."""
    return identical(*(n(x) if isinstance(x, torch.Tensor) else x for x in (a, b)))


def ref_update(theta, g, m, h, storage=None, **kw):
    """spec.sophia_update; for bf16/f16 ``storage`` runs it on the float32 values and rounds
    the results to ``storage`` with torch (one rounding, as the contract prescribes)."""
    if storage is None:
        return spec.sophia_update(theta, g, m, h, **kw)
    f = [np.asarray(x, dtype=np.float32) for x in (theta, g, m, h)]
    tn, mn, w = spec.sophia_update(*f, **kw)
    return n(t(tn).to(storage)), n(t(mn).to(storage)), w


def make_optimizer_with_state(leaves, dtype=None, **kw):
    """A SophiaG over fresh params holding ``leaves`` = [(theta, g, m, h)] as param/grad/state."""
    from sophia.torch import SophiaG

    params = []
    for theta, g, _, _ in leaves:
        p = torch.nn.Parameter(t(theta, dtype))
        p.grad = t(g, dtype)
        params.append(p)
    opt = SophiaG(params, **kw)
    for p, (_, _, m, h) in zip(params, leaves):
        opt.state[p] = {
            "step": torch.tensor(0.0),
            "exp_avg": t(m, dtype),
            "hessian": t(h, dtype),
        }
    return opt, params


def reference_kwargs(lr, betas, rho, weight_decay, bs, eps, maximize=False):
    return {
        "lr": lr,
        "b1": betas[0],
        "rho": rho,
        "bs": bs,
        "weight_decay": weight_decay,
        "eps": eps,
        "maximize": maximize,
    }


#: Hyperparameters chosen so that none is exactly representable in float32.
HP = {"lr": 3e-2, "betas": (0.9, 0.97), "rho": 0.037, "weight_decay": 0.13, "bs": 333, "eps": 1e-9}

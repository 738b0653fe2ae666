"""Shared helpers of the torch tests (imported by name; pytest puts this folder on sys.path)."""

import contextlib

import numpy as np
import pytest
import torch

from sophia import spec

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


SHAPES = [(), (0,), (3, 0), (1,), (7,), (4, 5), (2, 3, 4), (129,), (33, 17)]

TORCH = {np.float32: torch.float32, np.float64: torch.float64}


def random_state(seed, shapes, dtype=np.float32, h_scale=1e-3):
    """theta, g, m, h as NumPy arrays: h has negative entries (Hutchinson-like) and zeros."""
    rng = np.random.default_rng(seed)
    out = []
    for shape in shapes:
        theta, g, m = (np.asarray(rng.normal(size=shape)) for _ in range(3))
        h = np.asarray(rng.normal(size=shape) * h_scale)
        if h.size:
            h.flat[:: max(h.size // 5, 1)] = 0.0
        out.append(tuple(np.asarray(x, dtype=dtype) for x in (theta, g, m, h)))
    return out


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
    a = n(a) if isinstance(a, torch.Tensor) else np.asarray(a)
    b = n(b) if isinstance(b, torch.Tensor) else np.asarray(b)
    if not (a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)):
        return False
    if not np.issubdtype(a.dtype, np.floating):
        return True
    numbers = ~np.isnan(a)
    return np.array_equal(np.signbit(a[numbers]), np.signbit(b[numbers]))


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

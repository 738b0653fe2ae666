"""Shared helpers of the JAX tests (imported by name; pytest puts this folder on sys.path)."""

import numpy as np

from sophia import spec


def random_state(seed, shapes, dtype=np.float32, h_scale=1e-3):
    """theta, g, m, h as NumPy arrays: h has negative entries (Hutchinson-like) and zeros."""
    rng = np.random.default_rng(seed)
    out = []
    for shape in shapes:
        theta, g, m = (rng.normal(size=shape) for _ in range(3))
        h = rng.normal(size=shape) * h_scale
        if h.size:
            h.flat[:: max(h.size // 5, 1)] = 0.0
        out.append(tuple(x.astype(dtype) for x in (theta, g, m, h)))
    return out


def reference_step(leaves, h_hat=None, b2=spec.DEFAULTS.betas[1], **kw):
    """The spec's step over a list of (theta, g, m, h) leaves; returns new leaves and n_win."""
    out, n_win = [], 0
    for i, (theta, g, m, h) in enumerate(leaves):
        if h_hat is not None:
            h = spec.hessian_ema(h, h_hat[i], b2)
        t, m2, w = spec.sophia_update(theta, g, m, h, **kw)
        out.append((t, g, m2, h))
        n_win += w
    return out, n_win

"""The spec's NumPy reference as a cross-framework driver, plain and in two views.

:class:`Reference` steps parameter groups with ``sophia.spec``;
:class:`RealViewReference` runs it on the real view of complex parameters (as
torch's port defines them) and :class:`ParamDtypeReference` takes its new
bfloat16/float16 parameters through sophia.jax's update of their dtype.
"""

import numpy as np

from sophia import narrow, spec
from tests.helpers import BF16, bits, real_view


def state_zeros(form, like):
    """A zero state array in ``form`` (sophia.narrow) for a parameter like ``like``."""
    like = np.asarray(like)
    if form == narrow.BLOCK8:
        return narrow.Block8(
            np.zeros(like.shape, np.int8), np.zeros(narrow.block_count(like.size), np.float32)
        )
    dtype = {None: like.dtype, "float32": np.float32, "bfloat16": BF16}[form]
    return np.zeros(like.shape, dtype)


class Reference:
    """The spec's NumPy reference, group by group.

    A group's ``mu_dtype``, ``hessian_dtype`` and ``seed`` (where it sets them) are
    the narrow state's: the arrays are stored in those forms, rounded with the
    index of the step being taken.
    """

    name = "numpy"

    def __init__(self, params, groups):
        self.p = {k: np.array(v) for k, v in params.items()}
        self.groups = groups
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.h = {k: np.zeros_like(v) for k, v in params.items()}
        for g in groups:
            for n in g["names"]:
                self.m[n] = state_zeros(g.get("mu_dtype"), self.p[n])
                self.h[n] = state_zeros(g.get("hessian_dtype"), self.p[n])
        self.rho = [spec.compute_dtype(self._dt(g)).type(g["rho"]) for g in groups]
        self.wr = [spec.compute_dtype(self._dt(g)).type(0) for g in groups]
        self.count = 0

    def _dt(self, g):
        return np.float64 if any(self.p[n].dtype == np.float64 for n in g["names"]) else np.float32

    def refresh(self, h_hat):
        for gi, g in enumerate(self.groups):
            for n in g["names"]:
                self.h[n] = spec.hessian_ema(
                    self.h[n], h_hat[n], g["b2"], hessian_dtype=g.get("hessian_dtype"),
                    compute=self.p[n].dtype, seed=g.get("seed", 0), step=self.count,
                )  # fmt: skip
            if g["dynamic"] and self.count > 0:
                n_total = sum(self.p[n].size for n in g["names"])
                self.rho[gi] = spec.dynamic_rho(
                    self.rho[gi], self.wr[gi], g["rho"], self._dt(g), n_total
                )

    def step(self, grads):
        for gi, g in enumerate(self.groups):
            n_win = 0
            for n in g["names"]:
                kw = {k: g[k] for k in ("lr", "b1", "bs", "weight_decay", "eps", "maximize")}
                self.p[n], self.m[n], w = spec.sophia_update(
                    self.p[n], grads[n], self.m[n], self.h[n], rho=self.rho[gi], **kw,
                    mu_dtype=g.get("mu_dtype"), seed=g.get("seed", 0), step=self.count,
                )  # fmt: skip
                n_win += w
            n_total = sum(self.p[n].size for n in g["names"])
            self.wr[gi] = spec.win_rate(n_win, n_total, self._dt(g))
        self.count += 1

    def params(self):
        return dict(self.p)

    def mu(self):
        return dict(self.m)

    def hessian(self):
        return dict(self.h)

    def rhos(self):
        return [float(r) for r in self.rho]

    def win_rates(self):
        return [float(w) for w in self.wr]


# ----------------------------------------------------------------------------- complex


def real_tree(tree):
    return {k: real_view(v) for k, v in tree.items()}


class RealViewReference(Reference):
    """The spec's reference on the real view of complex parameters, as torch's port defines them.

    Takes and returns complex arrays; inside, every complex element is two real
    coordinates (so the win rate counts two per element).
    """

    name = "numpy-real-view"

    def __init__(self, params, groups):
        self.dtypes = {k: np.asarray(v).dtype for k, v in params.items()}
        super().__init__(real_tree(params), groups)

    def refresh(self, h_hat):
        super().refresh(real_tree(h_hat))

    def step(self, grads):
        super().step(real_tree(grads))

    def _complex(self, tree):
        return {
            k: v.reshape(-1).view(self.dtypes[k]).reshape(v.shape[:-1])
            if np.iscomplexobj(np.empty(0, self.dtypes[k]))
            else v
            for k, v in tree.items()
        }

    def params(self):
        return self._complex(self.p)

    def mu(self):
        return self._complex(self.m)

    def hessian(self):
        return self._complex(self.h)


# ----------------------------------------------------------------------------- low precision


def through_param_dtype_update(theta, new):
    """What ``optax.apply_updates`` makes of sophia.jax's update of ``theta``'s dtype.

    ``new`` is the spec's single rounding of ``theta - lr*u``. For bfloat16 and
    float16 the JAX update is ``d`` of that dtype (``sophia.jax.to_param_dtype``):
    ``round(new - theta)``, a zero of ``new``'s sign where ``new == theta``, or
    its neighbour towards ``new`` where that misses; ``theta + d`` is ``new``
    wherever any ``d`` of the dtype reaches it (docs/spec.md). Other dtypes: ``new``.
    """
    theta, new = np.asarray(theta), np.asarray(new)
    if theta.dtype.itemsize != 2:
        return new
    dt, w = theta.dtype, np.float32
    with np.errstate(all="ignore"):
        pw, nw = theta.astype(w), new.astype(w)
        d0 = np.where(nw == pw, np.copysign(w(0), nw), nw - pw).astype(dt)
        r0 = (pw + d0.astype(w)).astype(dt)
        d1 = np.nextafter(d0, np.where(r0.astype(w) < nw, w(np.inf), w(-np.inf)).astype(dt))
        r1 = (pw + d1.astype(w)).astype(dt)
    hit0 = (bits(r0) == bits(new)) | np.isnan(nw)
    hit1 = bits(r1) == bits(new)
    return np.where(hit0 | ~hit1, r0, r1).astype(dt)


class ParamDtypeReference(Reference):
    """The spec's reference, its new parameters taken through JAX's update of their dtype.

    What op-by-op ``sophia.jax`` with ``optax.apply_updates`` must match bit for
    bit for bfloat16/float16 parameters (the plain :class:`Reference` for others).
    ``misses`` counts the coordinates where that differs from the spec.
    """

    name = "numpy-param-dtype"
    misses = 0

    def step(self, grads):
        old = dict(self.p)
        super().step(grads)
        for n, t in old.items():
            out = through_param_dtype_update(t, self.p[n])
            self.misses += int(np.count_nonzero(bits(out) != bits(self.p[n])))
            self.p[n] = out

"""One driver per implementation, fed the same inputs, and the loop that feeds them.

Every driver takes the same per-group hyperparameters (:func:`group`) and is fed
the same gradients and Hessian estimates (NumPy arrays in the parameters'
storage dtype), so any difference between them is the optimizer's. The spec's
own driver is :class:`tests.cross.references.Reference`.
"""

import numpy as np

from sophia import spec
from sophia.narrow import Block8
from tests.cross.references import Reference
from tests.helpers import BF16

HP_KEYS = ("lr", "b1", "b2", "rho", "weight_decay", "eps", "bs", "maximize", "dynamic")
#: The narrow state's keys (sophia.narrow): a group passes them on only where it sets them.
NARROW_KEYS = ("mu_dtype", "hessian_dtype", "seed")


def narrow_kw(g):
    """The narrow keys a group sets, as keyword arguments for either framework."""
    return {k: g[k] for k in NARROW_KEYS if k in g}


# ----------------------------------------------------------------------------- conversions


def to_torch(x):
    import torch

    x = np.asarray(x)
    if x.dtype == BF16:
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16).reshape(x.shape)
    return torch.from_numpy(x.copy())


def from_torch(t):
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16).reshape(tuple(t.shape)).copy()
    return t.numpy().copy()


def group(names, **hp):
    out = dict(
        names=list(names), lr=0.01, b1=0.9, b2=0.99, rho=0.05, weight_decay=0.0, eps=1e-12,
        bs=1.0, maximize=False, dynamic=False,
    )  # fmt: skip
    out.update(hp)
    return out


# ----------------------------------------------------------------------------- drivers


class JaxDriver:
    """sophia.jax.sophia_g (one group) or optax.multi_transform of one per group.

    ``jit``: jit the step (and, unless ``jit_refresh=False``, the refresh steps: the
    ``update(..., hessian=h_hat)`` that refreshes then steps; with ``False`` those run op
    by op). ``builtin``: instead of ``hessian=``, the transform's own refresh every
    ``builtin`` steps with an estimator that returns the estimate passed to
    ``update``. ``wd_mask``: ``(weight_decay, mask)`` for one sophia_g with a
    weight_decay_mask instead of groups (the groups' other hyperparameters must agree).
    """

    def __init__(self, params, groups, jit=False, builtin=None, wd_mask=None, jit_refresh=None):
        import jax
        import jax.numpy as jnp
        import optax

        import sophia.jax as sj

        self.jax, self.jnp, self.optax, self.sj = jax, jnp, optax, sj
        jit_refresh = jit if jit_refresh is None else jit_refresh
        self.name = ("jax-jit" if jit_refresh else "jax-jit-step") if jit else "jax"
        self.builtin = builtin
        self.names = list(params)
        self.p = {k: jnp.asarray(v) for k, v in params.items()}

        def make(g, wd=None, mask=None):
            kw = {}
            if builtin is not None:
                kw = dict(hessian_update_interval=builtin, estimator=_fed_estimator)
            else:
                kw = dict(hessian_update_interval=None)
            return sj.sophia_g(
                g["lr"], g["b1"], g["b2"], g["rho"], g["weight_decay"] if wd is None else wd,
                bs=g["bs"], eps=g["eps"], maximize=g["maximize"], dynamic=g["dynamic"],
                weight_decay_mask=mask, **kw, **narrow_kw(g),
            )  # fmt: skip

        if wd_mask is not None:
            g0 = groups[0]
            self.tx = make(g0, wd=wd_mask[0], mask=wd_mask[1])
        elif len(groups) == 1:
            self.tx = make(groups[0])
        else:
            labels = {n: f"g{gi}" for gi, g in enumerate(groups) for n in g["names"]}
            self.tx = optax.multi_transform(
                {f"g{gi}": make(g) for gi, g in enumerate(groups)}, labels
            )
        self.state = self.tx.init(self.p)

        def step(p, s, g, h_hat=None):
            extra = {} if h_hat is None else {"h_hat": h_hat}
            u, s = self.tx.update(g, s, p, **extra)
            return optax.apply_updates(p, u), s

        def refresh_step(p, s, g, h_hat):
            u, s = self.tx.update(g, s, p, hessian=h_hat)
            return optax.apply_updates(p, u), s

        self._step = jax.jit(step) if jit else step
        self._refresh_step = jax.jit(refresh_step) if jit_refresh else refresh_step
        self._pending = None

    def refresh(self, h_hat):
        # handed to the next update: the transform's own refresh, or update(..., hessian=)
        self._pending = {k: self.jnp.asarray(v) for k, v in h_hat.items()}

    def step(self, grads):
        g = {k: self.jnp.asarray(v) for k, v in grads.items()}
        h, self._pending = self._pending, None
        if self.builtin is not None:
            if h is None:  # not a refresh step: the estimator's result is not used
                h = {k: self.jnp.zeros(v.shape, spec.compute_dtype(v.dtype)) for k, v in g.items()}
            self.p, self.state = self._step(self.p, self.state, g, h)
        elif h is not None:
            self.p, self.state = self._refresh_step(self.p, self.state, g, h)
        else:
            self.p, self.state = self._step(self.p, self.state, g)

    def sophia_states(self):
        return jax_sophia_states(self.state)

    def _tree(self, field):
        out = {}
        for s in self.sophia_states():
            for k, v in getattr(s, field).items():
                if isinstance(v, Block8):  # a block8 h: its codes and scales
                    out[k] = Block8(np.asarray(v.codes), np.asarray(v.scale))
                elif not isinstance(v, self.optax.MaskedNode):
                    out[k] = np.asarray(v)
        return out

    def params(self):
        return {k: np.asarray(v) for k, v in self.p.items()}

    def mu(self):
        return self._tree("mu")

    def hessian(self):
        return self._tree("hessian")

    def rhos(self):
        return [float(s.rho) for s in self.sophia_states()]

    def win_rates(self):
        return [float(s.win_rate) for s in self.sophia_states()]


def _fed_estimator(params, key, *, h_hat=None, **_):
    return h_hat


def jax_sophia_states(state):
    import jax

    from sophia.jax import ScaleBySophiaState

    found = []
    jax.tree.map(
        lambda x: found.append(x) if isinstance(x, ScaleBySophiaState) else None,
        state,
        is_leaf=lambda x: isinstance(x, ScaleBySophiaState),
    )
    return found


class TorchDriver:
    """sophia.torch.SophiaG with one param group per group; mode: loop, foreach or fused."""

    def __init__(self, params, groups, mode="loop"):
        import torch

        from sophia.torch import SophiaG

        self.torch = torch
        self.name = f"torch-{mode}"
        self.t = {k: torch.nn.Parameter(to_torch(v)) for k, v in params.items()}
        flags = dict(
            loop=dict(foreach=False, fused=False),
            foreach=dict(foreach=True, fused=False),
            fused=dict(foreach=False, fused=True),
        )[mode]
        pgs = []
        for g in groups:
            pgs.append(
                dict(
                    params=[self.t[n] for n in g["names"]],
                    lr=g["lr"],
                    betas=(g["b1"], g["b2"]),
                    rho=g["rho"],
                    weight_decay=g["weight_decay"],
                    eps=g["eps"],
                    bs=g["bs"],
                    maximize=g["maximize"],
                    dynamic=g["dynamic"],
                    **narrow_kw(g),
                )  # fmt: skip
            )
        self.opt = SophiaG(pgs, **flags)
        self.order = [n for g in groups for n in g["names"]]
        self.groups = groups

    def refresh(self, h_hat):
        self.opt.update_hessian(hessian=[to_torch(h_hat[n]) for n in self.order])

    def step(self, grads):
        for n, p in self.t.items():
            p.grad = to_torch(grads[n])
        self.opt.step()

    def _state(self, key):
        return {n: from_torch(self.opt.state[p][key]) for n, p in self.t.items()}

    def params(self):
        return {n: from_torch(p) for n, p in self.t.items()}

    def mu(self):
        return self._state("exp_avg")

    def hessian(self):
        out = self._state("hessian")
        for n, p in self.t.items():  # a block8 h: the codes and the hessian_scale
            if "hessian_scale" in self.opt.state[p]:
                out[n] = Block8(out[n], from_torch(self.opt.state[p]["hessian_scale"]))
        return out

    def rhos(self):
        return [float(d["rho"]) for d in self.opt.diagnostics()]

    def win_rates(self):
        return [float(d["win_rate"]) for d in self.opt.diagnostics()]


def run(driver, params0, grad_fn, hhat_fn, steps, k, record=None, start=0):
    """``steps`` steps of ``driver``: a refresh before every step ``t`` with ``t % k == 0``.

    ``grad_fn(params) -> grads`` and ``hhat_fn(params, t) -> h_hat`` are
    deterministic NumPy functions of the driver's own current parameters, so
    drivers that agree keep receiving identical inputs. ``record(t, driver)``
    is called after every step. Returns the list of rho vectors after every
    refresh.
    """
    rhos = []
    for t in range(start, start + steps):
        p = driver.params()
        if t % k == 0:
            driver.refresh(hhat_fn(p, t))
        driver.step(grad_fn(p))
        if t % k == 0:  # JAX refreshes inside the step; a step leaves rho as its refresh set it
            rhos.append(tuple(driver.rhos()))
        if record is not None:
            record(t, driver)
    return rhos


def trace(driver, prob, steps, k):
    """:func:`run` on a problem, recording every step: (params, mu, hessian) snapshots,
    win rates and the rho vectors after every refresh."""
    snaps, rates = [], []

    def record(t, d):
        snaps.append((d.params(), d.mu(), d.hessian()))
        rates.append(tuple(d.win_rates()))

    rhos = run(driver, prob.params0, prob.grad, prob.hhat, steps, k, record)
    return snaps, rates, rhos


def set_state(driver, mu, h):
    """Overwrites the momentum and Hessian EMA of a driver (all groups)."""
    if isinstance(driver, Reference):
        driver.m = {k: np.array(v) for k, v in mu.items()}
        driver.h = {k: np.array(v) for k, v in h.items()}
    elif isinstance(driver, JaxDriver):
        jnp = driver.jnp

        def fill(s):
            def tree(field, src):
                return {
                    k: v if isinstance(v, driver.optax.MaskedNode) else jnp.asarray(src[k])
                    for k, v in getattr(s, field).items()
                }

            return s._replace(mu=tree("mu", mu), hessian=tree("hessian", h))

        from sophia.jax import ScaleBySophiaState

        driver.state = driver.jax.tree.map(
            lambda x: fill(x) if isinstance(x, ScaleBySophiaState) else x,
            driver.state,
            is_leaf=lambda x: isinstance(x, ScaleBySophiaState),
        )
    else:
        for n, p in driver.t.items():
            st = driver.opt._init_state(_group_of(driver.opt, p), p)
            st["exp_avg"].copy_(to_torch(mu[n]))
            st["hessian"].copy_(to_torch(h[n]))


def _group_of(opt, p):
    return next(g for g in opt.param_groups if any(q is p for q in g["params"]))

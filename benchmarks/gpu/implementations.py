"""The implementations ``gpu_check.py``'s correctness part compares, and their inputs.

Each implementation (a torch path, jitted JAX) is driven through flat float32
arrays holding values of the storage dtype: ``load`` a state, ``refresh`` the
Hessian, ``step`` with a gradient, ``read`` the results; the NumPy reference
(:func:`sophia.spec.sophia_update`, :func:`sophia.spec.hessian_ema`) is fed
the same arrays.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from harness.ulp import bfloat16_bits, round_to_bfloat16, ulp_diff

from sophia import spec

#: Correctness hyperparameters: none is exact in float32, every branch of the clip is hit.
HP = {
    "lr": 3e-2,
    "b1": 0.9,
    "b2": 0.97,
    "rho": 0.037,
    "weight_decay": 0.13,
    "bs": 333.0,
    "eps": 1e-9,
}
REFRESH_EVERY = 5


def torch_sophia(params: list[Any], **extra: Any) -> Any:
    """``sophia.torch.SophiaG`` with the correctness hyperparameters :data:`HP` (and ``extra``)."""
    from sophia.torch import SophiaG

    return SophiaG(
        params,
        lr=HP["lr"],
        betas=(HP["b1"], HP["b2"]),
        rho=HP["rho"],
        weight_decay=HP["weight_decay"],
        bs=HP["bs"],
        eps=HP["eps"],
        **extra,
    )


def jax_sophia(**extra: Any) -> Any:
    """``sophia.jax.sophia_g`` with :data:`HP`, refreshed by hand (and ``extra``)."""
    import sophia.jax as sj

    return sj.sophia_g(
        HP["lr"],
        HP["b1"],
        HP["b2"],
        HP["rho"],
        HP["weight_decay"],
        bs=HP["bs"],
        eps=HP["eps"],
        hessian_update_interval=None,
        **extra,
    )


def storage_round(x: np.ndarray, storage: str) -> np.ndarray:
    return round_to_bfloat16(x) if storage == "bfloat16" else np.asarray(x, np.float32)


def _bits(x: np.ndarray, storage: str) -> np.ndarray:
    return bfloat16_bits(x) if storage == "bfloat16" else np.asarray(x, np.float32)


def ulp(a: np.ndarray, b: np.ndarray, storage: str) -> int:
    return ulp_diff(_bits(a, storage), _bits(b, storage))


def correctness_shapes(smoke: bool) -> list[tuple[int, ...]]:
    """Empty, scalar and small tensors (packed together by the fused path) and large ones."""
    small = [(), (1,), (7,), (0, 3), (129,), (33, 17)]
    return small + ([(300, 131)] if smoke else [(515, 256), (40_000,), (1000, 96)])


@dataclasses.dataclass
class Inputs:
    """The seeded inputs of a correctness run, flat float32 arrays of ``storage`` values."""

    storage: str
    shapes: list[tuple[int, ...]]
    theta0: np.ndarray
    m0: np.ndarray
    grads: list[np.ndarray]
    h_hats: dict[int, np.ndarray]

    @classmethod
    def make(cls, storage: str, shapes: list[tuple[int, ...]], steps: int, seed: int) -> Inputs:
        """Parameters, momenta (exact zeros and -0 among them), gradients and estimates.

        The estimates span eight decades, a tenth negative (as Hutchinson's can
        be) and some exact zeros, so that coordinates fall on both sides of the
        clip and on ``max(h, 0)``.
        """
        rng = np.random.default_rng(seed)
        n = sum(math.prod(s) for s in shapes)

        def signed_zeros(x: np.ndarray, every: int) -> np.ndarray:
            x[::every] = 0.0
            x[every // 2 :: every] = -0.0
            return x

        theta0 = signed_zeros(rng.standard_normal(n), 13)
        m0 = signed_zeros(rng.standard_normal(n) * 1e-2, 11)
        grads = [
            signed_zeros(rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 0), 17)
            for _ in range(steps)
        ]
        h_hats = {}
        for t in range(0, steps, REFRESH_EVERY):
            h = (rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 0, n)) ** 2
            h[rng.random(n) < 0.1] *= -1
            h[rng.random(n) < 0.05] = 0.0
            h_hats[t] = h
        r = lambda x: storage_round(x.astype(np.float32), storage)  # noqa: E731
        return cls(
            storage,
            shapes,
            r(theta0),
            r(m0),
            [r(g) for g in grads],
            {t: r(h) for t, h in h_hats.items()},
        )

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        """``flat`` cut into the tensors' shapes."""
        out, i = [], 0
        for s in self.shapes:
            k = math.prod(s)
            out.append(flat[i : i + k].reshape(s))
            i += k
        return out


def reference_step(
    theta: np.ndarray, g: np.ndarray, m: np.ndarray, h: np.ndarray, storage: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`sophia.spec.sophia_update` on float32 values, results rounded to ``storage``.

    For bfloat16 storage that is the spec exactly: the math runs in float32
    from the (exact) float32 values and each result is rounded once.
    """
    kw = {k: v for k, v in HP.items() if k != "b2"}
    t, mn, w = spec.sophia_update(theta, g, m, h, **kw)
    return storage_round(t, storage), storage_round(mn, storage), w


def reference_refresh(h: np.ndarray, h_hat: np.ndarray, storage: str) -> np.ndarray:
    """:func:`sophia.spec.hessian_ema` on float32 values, rounded to ``storage``."""
    return storage_round(spec.hessian_ema(h, h_hat, HP["b2"]), storage)


class TorchImpl:
    """:class:`sophia.torch.SophiaG` on one path, loaded from and read into flat arrays.

    Args:
      torch: the module.
      path: ``"for-loop"``, ``"foreach"`` or ``"fused"``.
      inputs: shapes and storage dtype.
      device: where the tensors live.
    """

    PATHS = {
        "for-loop": {"foreach": False, "fused": False},
        "foreach": {"foreach": True, "fused": False},
        "fused": {"foreach": False, "fused": True},
    }

    def __init__(self, torch: Any, path: str, inputs: Inputs, device: Any) -> None:

        self.torch, self.inputs, self.device = torch, inputs, device
        self.dtype = torch.bfloat16 if inputs.storage == "bfloat16" else torch.float32
        self.params = [
            torch.nn.Parameter(torch.zeros(s, dtype=self.dtype, device=device))
            for s in inputs.shapes
        ]
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.opt = torch_sophia(self.params, **self.PATHS[path])
        # creates the state; the step after it makes the next refresh a fresh one (SophiaG
        # skips a second refresh with no step between); load() overwrites what both did
        self.opt.update_hessian(hessian=[torch.zeros_like(p) for p in self.params])
        self.opt.step()

    def _tensors(self, flat: np.ndarray) -> list[Any]:
        t = self.torch
        return [
            t.from_numpy(np.array(x, np.float32)).to(device=self.device, dtype=self.dtype)
            for x in self.inputs.split(flat)
        ]

    def load(self, theta: np.ndarray, m: np.ndarray, h: np.ndarray) -> None:
        """Sets the parameters, momenta and Hessian EMAs."""
        with self.torch.no_grad():
            for p, th, mm, hh in zip(
                self.params, self._tensors(theta), self._tensors(m), self._tensors(h)
            ):
                p.copy_(th)
                self.opt.state[p]["exp_avg"].copy_(mm)
                self.opt.state[p]["hessian"].copy_(hh)

    def refresh(self, h_hat: np.ndarray) -> None:
        """``update_hessian(hessian=...)`` with the estimate."""
        self.opt.update_hessian(hessian=self._tensors(h_hat))

    def step(self, g: np.ndarray) -> None:
        """One ``step()`` with gradient ``g``."""
        for p, gg in zip(self.params, self._tensors(g)):
            p.grad.copy_(gg)
        self.opt.step()

    def read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """``(theta, m, h, win_rate)``, flat float32."""

        def flat(ts: list[Any]) -> np.ndarray:
            parts = [t.detach().float().cpu().numpy().reshape(-1) for t in ts]
            return np.concatenate(parts) if parts else np.zeros(0, np.float32)

        st = [self.opt.state[p] for p in self.params]
        win = float(self.opt.diagnostics()[0]["win_rate"])
        return (
            flat(self.params),
            flat([s["exp_avg"] for s in st]),
            flat([s["hessian"] for s in st]),
            win,
        )


def jitted_step_and_refresh(tx: Any) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(step(p, s, g) -> (p, s), refresh(p, s, h_hat) -> s)``, jitted, for a Sophia chain ``tx``.

    The refresh is the one that starts a step given ``hessian=``, kept alone: the
    reference refreshes and steps separately, and the units load the rest anyway.
    """
    import jax
    import jax.numpy as jnp
    import optax

    def step(p: Any, s: Any, g: Any) -> Any:
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    def refresh(p: Any, s: Any, h_hat: Any) -> Any:
        zeros = jax.tree.map(jnp.zeros_like, p)
        core = tx.update(zeros, s, p, hessian=h_hat)[1][0]
        return (s[0]._replace(hessian=core.hessian, hessian_norm=core.hessian_norm), *s[1:])

    return jax.jit(step), jax.jit(refresh)


class JaxImpl:
    """Jitted :func:`sophia.jax.sophia_g` (manual refreshes) on flat arrays in and out."""

    def __init__(self, jax: Any, inputs: Inputs) -> None:
        import jax.numpy as jnp

        self.jax, self.jnp, self.inputs = jax, jnp, inputs
        self.dtype = jnp.bfloat16 if inputs.storage == "bfloat16" else jnp.float32
        tx = jax_sophia()
        self.params = [jnp.asarray(np.zeros(s, self.dtype)) for s in inputs.shapes]
        self.state = jax.jit(tx.init)(self.params)  # eager init compiles every op per shape
        self._step, self._refresh = jitted_step_and_refresh(tx)

    def _arrays(self, flat: np.ndarray) -> list[Any]:
        # cast on the host (exact: the values are the dtype's), so nothing compiles per shape
        return [self.jnp.asarray(x.astype(self.dtype)) for x in self.inputs.split(flat)]

    def load(self, theta: np.ndarray, m: np.ndarray, h: np.ndarray) -> None:
        """Sets the parameters, momenta and Hessian EMAs."""
        self.params = self._arrays(theta)
        core = self.state[0]._replace(mu=self._arrays(m), hessian=self._arrays(h))
        self.state = (core, *self.state[1:])

    def refresh(self, h_hat: np.ndarray) -> None:
        """The Hessian EMA of ``update(..., hessian=h_hat)``, jitted, without the step."""
        self.state = self._refresh(self.params, self.state, self._arrays(h_hat))

    def step(self, g: np.ndarray) -> None:
        """One jitted update and ``apply_updates``."""
        self.params, self.state = self._step(self.params, self.state, self._arrays(g))

    def read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """``(theta, m, h, win_rate)``, flat float32."""

        def flat(xs: list[Any]) -> np.ndarray:
            parts = [np.asarray(x, np.float32).reshape(-1) for x in xs]
            return np.concatenate(parts) if parts else np.zeros(0, np.float32)

        core = self.state[0]
        return flat(self.params), flat(core.mu), flat(core.hessian), float(core.win_rate)

"""The demo's JAX backend: the GPT of :mod:`sophia.demo.model_jax` trained with Optax.

SophiaG is :func:`sophia.jax.sophia_g` with its built-in GNB estimator: the
Hessian is refreshed at the start of steps 0, k, 2k, ..., before that step's
update (``count % k == 0``). The
training step runs the forward once, ``logits, vjp = jax.vjp(forward, params)``,
takes the gradient through ``vjp`` and hands ``logits=..., logits_vjp=vjp`` to
``update``, so a Hessian-refresh step costs one extra backward and no extra
forward. AdamW is :func:`optax.adamw`. Both sit behind
:func:`optax.clip_by_global_norm` and follow :func:`sophia.demo.schedule.lr_at`.
The whole step (forward, backward, clipping, optimizer, refresh) is one
``jax.jit``-compiled function; it runs on the default JAX device (GPU/TPU when
present).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sophia.jax as sj
from sophia.demo import model_jax
from sophia.demo.config import OptimConfig, RunConfig
from sophia.demo.data import Corpus
from sophia.demo.model import ModelConfig
from sophia.demo.schedule import lr_table
from sophia.demo.train import RunResult, train

__all__ = [
    "CPU_COMPILER_OPTIONS",
    "JaxTrainer",
    "device_info",
    "jit",
    "make_optimizer",
    "make_schedule",
    "make_trainer",
    "run",
]


def make_schedule(opt: OptimConfig, cfg: RunConfig) -> Callable[[jax.Array], jax.Array]:
    """:func:`sophia.demo.schedule.lr_at` as an optax schedule (``count`` = updates so far).

    A lookup in :func:`sophia.demo.schedule.lr_table`, so that the formula lives
    in one place and both backends step with the same learning rates.
    """
    table = jnp.asarray(lr_table(opt, cfg), jnp.float32)
    last = len(table) - 1

    def schedule(count: jax.Array) -> jax.Array:
        return table[jnp.minimum(jnp.asarray(count, jnp.int32), last)]

    return schedule


def make_optimizer(opt: OptimConfig, cfg: RunConfig) -> optax.GradientTransformationExtraArgs:
    """Gradient clipping, then SophiaG or AdamW with the schedule and the decay mask.

    SophiaG's ``bs`` is ``cfg.hessian_tokens`` (the labels behind each GNB
    estimate), its label sampling (and stochastic rounding) is seeded with
    ``cfg.seed`` and its state forms are ``opt``'s
    (:meth:`~sophia.demo.config.OptimConfig.state_forms`).
    """
    schedule = make_schedule(opt, cfg)
    if opt.name == "sophiag":
        core = sj.sophia_g(
            schedule,
            b1=opt.b1,
            b2=opt.b2,
            rho=opt.rho,
            weight_decay=opt.weight_decay,
            bs=cfg.hessian_tokens,
            eps=opt.eps,
            hessian_update_interval=opt.k,
            estimator="gnb",
            weight_decay_mask=model_jax.decay_mask,
            seed=cfg.seed,
            **opt.state_forms(),
        )
    else:
        core = optax.adamw(
            schedule,
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            mask=model_jax.decay_mask,
        )
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), core)


#: XLA options for the CPU backend: LLVM's optimisation level 1 instead of 2
#: compiles the training step much faster on a small CPU, and the demo's model
#: steps no slower for it.
CPU_COMPILER_OPTIONS: dict[str, Any] = {"xla_backend_optimization_level": 1}


def jit(fun: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
    """:func:`jax.jit` with :data:`CPU_COMPILER_OPTIONS` when the default backend is the CPU."""
    if jax.default_backend() == "cpu":
        kwargs.setdefault("compiler_options", CPU_COMPILER_OPTIONS)
    return jax.jit(fun, **kwargs)


@functools.lru_cache(maxsize=8)
def _eval_loss(model: ModelConfig) -> Callable[..., jax.Array]:
    """The jitted validation loss for a model shape, shared by every trainer of that shape."""
    forward = model_jax.make_apply(model)
    return jit(lambda p, x, y: model_jax.cross_entropy(forward(p, x), y))


def _nbytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


class JaxTrainer:
    """The GPT and one optimizer, stepping with a single jit-compiled function.

    Args:
      cfg: the run (model shape, schedule, clipping, seed).
      opt: the optimizer.
    """

    def __init__(self, cfg: RunConfig, opt: OptimConfig) -> None:
        self.cfg, self.opt = cfg, opt
        forward = model_jax.make_apply(cfg.model)
        self.tx = make_optimizer(opt, cfg)
        self.params = model_jax.init_params(cfg.model, cfg.seed)
        self.opt_state = self.tx.init(self.params)
        self.n_params = model_jax.param_count(self.params)
        sophia = opt.name == "sophiag"
        tx = self.tx
        n_hess = cfg.hessian_batch

        def train_step(params, opt_state, x, y):  # noqa: ANN001, ANN202
            logits, vjp = jax.vjp(lambda p: forward(p, x), params)
            loss, dlogits = jax.value_and_grad(model_jax.cross_entropy)(logits, y)
            (grads,) = vjp(dlogits)
            if sophia and cfg.reuses_forward:
                updates, opt_state = tx.update(
                    grads, opt_state, params, logits=logits, logits_vjp=vjp
                )
            elif sophia:  # its own forward on the first sequences, inside the refresh branch
                updates, opt_state = tx.update(
                    grads, opt_state, params, logits_fn=lambda p: forward(p, x[:n_hess])
                )
            else:
                updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self._step = jit(
            train_step, donate_argnums=() if jax.default_backend() == "cpu" else (0, 1)
        )
        self._loss = _eval_loss(cfg.model)

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One update on ``(x, y)``; returns the training loss (computation finished)."""
        self.params, self.opt_state, loss = self._step(
            self.params, self.opt_state, jnp.asarray(x), jnp.asarray(y)
        )
        return float(loss)

    def evaluate(self, batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
        """Mean loss over ``batches`` at the current parameters."""
        losses = [self._loss(self.params, jnp.asarray(x), jnp.asarray(y)) for x, y in batches]
        return float(jnp.mean(jnp.stack(losses)))

    def diagnostics(self) -> dict[str, float]:
        """SophiaG's :func:`sophia.jax.diagnostics` (win rate, rho, norms); ``{}`` for AdamW.

        The win rate is the fraction of coordinates whose update was not
        clipped at the last step (the paper recommends 0.1 to 0.5).
        """
        if self.opt.name != "sophiag":
            return {}
        return {k: float(v) for k, v in sj.diagnostics(self.opt_state).items() if k != "count"}

    def opt_state_bytes(self) -> int:
        """Bytes of the optimizer state pytree (clipping's and the schedule's state included)."""
        return _nbytes(self.opt_state)


def make_trainer(cfg: RunConfig, opt: OptimConfig) -> JaxTrainer:
    """The backend hook of :mod:`sophia.demo.train`: a :class:`JaxTrainer`."""
    return JaxTrainer(cfg, opt)


def run(cfg: RunConfig, opt: OptimConfig, corpus: Corpus, *, progress: bool = True) -> RunResult:
    """Trains ``opt`` on ``corpus`` with the shared loop of :func:`sophia.demo.train.train`."""
    return train(make_trainer(cfg, opt), cfg, opt, corpus, framework="jax", progress=progress)


def device_info() -> dict[str, str]:
    """JAX and Optax versions, the backend and its devices."""
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return {
        "framework": "jax",
        "jax": jax.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "devices": f"{len(devices)} x {', '.join(kinds)}",
    }

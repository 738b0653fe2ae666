"""The parts of a demo training step that ``refresh_cost.py`` times beside whole steps.

``fwd_bwd`` (forward and backward) and ``forward`` (forward and loss) of the
demo model in each framework, run as the backend's ``Trainer.step`` runs them,
with no optimizer: a refresh's extra cost is read against one backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from sophia.demo.config import RunConfig

#: One timed call on a batch ``(x, y)``.
Step = Callable[[np.ndarray, np.ndarray], Any]


def jax_references(cfg: RunConfig) -> dict[str, Step]:
    """``fwd_bwd`` and ``forward`` of the JAX demo model, as ``JaxTrainer.step`` runs them."""
    import jax
    import jax.numpy as jnp

    from sophia.demo import model_jax, train_jax

    forward = model_jax.make_apply(cfg.model)
    params = model_jax.init_params(cfg.model, cfg.seed)

    def fwd_bwd(params: Any, x: jax.Array, y: jax.Array) -> tuple[Any, jax.Array]:
        # JaxTrainer's train_step up to the optimizer; the gradient is returned
        # so that XLA cannot drop the backward.
        logits, vjp = jax.vjp(lambda p: forward(p, x), params)
        loss, dlogits = jax.value_and_grad(model_jax.cross_entropy)(logits, y)
        (grads,) = vjp(dlogits)
        return grads, loss

    def loss_only(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return model_jax.cross_entropy(forward(params, x), y)

    def timed(fn: Callable[..., Any]) -> Step:
        compiled = train_jax.jit(fn)
        return lambda x, y: jax.block_until_ready(compiled(params, jnp.asarray(x), jnp.asarray(y)))

    return {"fwd_bwd": timed(fwd_bwd), "forward": timed(loss_only)}


def torch_references(cfg: RunConfig) -> dict[str, Step]:
    """``fwd_bwd`` and ``forward`` of the torch demo model, as ``TorchTrainer.step`` runs them."""
    import torch

    from sophia.demo import model_torch, train_torch

    device = train_torch.default_device()
    model = model_torch.init_model(cfg.model, cfg.seed, device)

    def loss_of(x: np.ndarray, y: np.ndarray) -> torch.Tensor:
        x_t = torch.from_numpy(np.asarray(x, np.int64)).to(device, non_blocking=True)
        y_t = torch.from_numpy(np.asarray(y, np.int64)).to(device, non_blocking=True)
        return model_torch.cross_entropy(model(x_t), y_t)

    def fwd_bwd(x: np.ndarray, y: np.ndarray) -> float:
        loss = loss_of(x, y)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    def forward(x: np.ndarray, y: np.ndarray) -> float:
        # Autograd records the graph, as in the training forward.
        return loss_of(x, y).item()

    return {"fwd_bwd": fwd_bwd, "forward": forward}


REFERENCES: dict[str, Callable[[RunConfig], dict[str, Step]]] = {
    "jax": jax_references,
    "torch": torch_references,
}

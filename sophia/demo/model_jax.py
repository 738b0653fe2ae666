"""A small GPT in plain JAX: parameters are a dict pytree, the forward a pure function.

The architecture is GPT-2's (Radford et al. 2019) at any size: token and
position embeddings, ``n_layer`` pre-LayerNorm blocks of causal multi-head
self-attention and a GELU MLP with residual connections, a final LayerNorm and
an ``lm_head`` tied to the token embedding. No dropout. The parameter layout
and GPT-2's initialisation live in :mod:`sophia.demo.model`, shared with the
other frameworks.

Example::

    params = init_params(cfg, seed=0)
    forward = make_apply(cfg)           # logits = forward(params, tokens)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sophia.demo.model import ModelConfig, decays, init_numpy

__all__ = [
    "apply",
    "cross_entropy",
    "decay_mask",
    "init_params",
    "loss_fn",
    "make_apply",
    "param_count",
]

Params = dict[str, Any]


def init_params(cfg: ModelConfig, seed: int) -> Params:
    """GPT-2 initialisation (:func:`sophia.demo.model.init_numpy`) as JAX arrays.

    Args:
      cfg: the model shape.
      seed: seed of the NumPy draw.

    Returns:
      The parameter pytree (float32, on the default device).
    """
    return jax.tree.map(jnp.asarray, init_numpy(cfg, seed))


def _layer_norm(p: dict[str, jax.Array], x: jax.Array, eps: float = 1e-5) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _attention(p: dict[str, jax.Array], x: jax.Array, n_head: int) -> jax.Array:
    b, t, c = x.shape
    hd = c // n_head
    qkv = x @ p["w_qkv"] + p["b_qkv"]
    q, k, v = jnp.split(qkv.reshape(b, t, 3, n_head, hd), 3, axis=2)
    q, k, v = (z[:, :, 0] for z in (q, k, v))  # [b, t, h, hd]
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
    att = jnp.where(causal, att, jnp.finfo(att.dtype).min)
    att = jax.nn.softmax(att, axis=-1)
    y = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, c)
    return y @ p["w_out"] + p["b_out"]


def _mlp(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    h = jax.nn.gelu(x @ p["w_fc"] + p["b_fc"], approximate=True)
    return h @ p["w_out"] + p["b_out"]


def _block(blk: dict[str, Any], x: jax.Array, n_head: int) -> jax.Array:
    x = x + _attention(blk["attn"], _layer_norm(blk["ln1"], x), n_head)
    return x + _mlp(blk["mlp"], _layer_norm(blk["ln2"], x))


def apply(params: Params, tokens: jax.Array, n_head: int) -> jax.Array:
    """The forward pass: logits for every position.

    The blocks run under :func:`jax.lax.scan` over the stacked layer axis.

    Args:
      params: from :func:`init_params`.
      tokens: ``int32[batch, time]`` with ``time <= block_size``.
      n_head: number of attention heads (not stored in the pytree, so that
        every leaf of ``params`` is an array).

    Returns:
      ``float32[batch, time, vocab]`` logits; position ``t`` depends only on
      ``tokens[:, : t + 1]``.
    """
    t = tokens.shape[1]
    x = params["wte"][tokens] + params["wpe"][:t]

    def body(h: jax.Array, blk: dict[str, Any]) -> tuple[jax.Array, None]:
        return _block(blk, h, n_head), None

    x, _ = jax.lax.scan(body, x, params["blocks"])
    x = _layer_norm(params["ln_f"], x)
    return x @ params["wte"].T


def make_apply(cfg: ModelConfig) -> Callable[[Params, jax.Array], jax.Array]:
    """The pure forward ``logits = f(params, tokens)`` for the shape ``cfg``."""
    n_head = cfg.n_head

    def forward(params: Params, tokens: jax.Array) -> jax.Array:
        return apply(params, tokens, n_head)

    return forward


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats) of ``logits[..., vocab]`` against ``targets``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def loss_fn(params: Params, x: jax.Array, y: jax.Array, n_head: int) -> jax.Array:
    """``cross_entropy(apply(params, x), y)``."""
    return cross_entropy(apply(params, x, n_head), y)


def decay_mask(params: Params) -> Any:
    """Weight-decay mask by :func:`sophia.demo.model.decays`: matrices and embeddings decay.

    Biases and LayerNorm parameters are excluded; ``wte`` (tied with the
    output layer), ``wpe`` and the ``w_*`` matrices decay.
    """

    def rule(path: tuple[Any, ...], _: Any) -> bool:
        return decays(str(getattr(path[-1], "key", path[-1])))

    return jax.tree_util.tree_map_with_path(rule, params)


def param_count(params: Params) -> int:
    """Number of scalars in ``params`` (the tied ``lm_head`` counted once)."""
    return sum(int(x.size) for x in jax.tree.leaves(params))

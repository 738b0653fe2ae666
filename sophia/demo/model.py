"""The demo model's framework-neutral parts: its shape, its initial weights, its decay rule.

Every framework builds the same GPT (see :mod:`sophia.demo.model_jax`) from the
same NumPy initial weights, so SophiaG and AdamW start from one point, and a
JAX run and a torch run start from the same point too.

The weights are a nested dict of ``float32`` arrays. The blocks' weights are
stacked along a leading layer axis of size ``L = n_layer`` (so JAX can
``lax.scan`` over the layers and compile one block, not ``L``); ``w_*``
matrices are ``[in, out]``, applied as ``x @ w`` (a torch ``nn.Linear`` of
layer ``i`` holds ``w[i].T``)::

    wte [vocab, C]   wpe [block_size, C]
    blocks.ln1.{scale, bias} [L, C]
    blocks.attn.w_qkv [L, C, 3C]  blocks.attn.b_qkv [L, 3C]
    blocks.attn.w_out [L, C, C]   blocks.attn.b_out [L, C]
    blocks.ln2.{scale, bias} [L, C]
    blocks.mlp.w_fc [L, C, 4C]    blocks.mlp.b_fc [L, 4C]
    blocks.mlp.w_out [L, 4C, C]   blocks.mlp.b_out [L, C]
    ln_f.{scale, bias} [C]

The ``lm_head`` is tied to ``wte`` (``logits = h @ wte.T``). The ``qkv``
columns are ``[q | k | v]``, each split into ``n_head`` heads of
``C / n_head`` consecutive columns.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from sophia.demo.data import VOCAB_SIZE

__all__ = ["ModelConfig", "decays", "init_numpy", "n_params", "named_leaves"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the GPT.

    Attributes:
      n_layer: transformer blocks.
      n_head: attention heads (must divide ``n_embd``).
      n_embd: width of the residual stream.
      block_size: context length (the position-embedding table's size).
      vocab_size: token vocabulary (256 bytes).
    """

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    vocab_size: int = VOCAB_SIZE

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r} (allowed: an integer >= 1)")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"Invalid n_head: {self.n_head!r} (allowed: a divisor of n_embd={self.n_embd})"
            )


def init_numpy(cfg: ModelConfig, seed: int) -> dict[str, Any]:
    """GPT-2's initialisation, drawn with NumPy so every framework starts from the same weights.

    Weights ``N(0, 0.02)``; the two residual output projections of each block
    ``N(0, 0.02 / sqrt(2 n_layer))``; biases zero; LayerNorm scales one. The
    draw order is fixed: ``wte``, ``wpe``, then for each layer ``w_qkv``,
    ``attn.w_out``, ``w_fc``, ``mlp.w_out``, from
    ``numpy.random.default_rng(seed)``.

    Args:
      cfg: the model shape.
      seed: seed of the draw.

    Returns:
      The parameter dict (``float32`` NumPy arrays; layout in the module docstring).
    """
    rng = np.random.default_rng(seed)
    c, n = cfg.n_embd, cfg.n_layer
    std_out = 0.02 / math.sqrt(2 * n)

    def normal(shape: tuple[int, ...], std: float = 0.02) -> np.ndarray:
        return (std * rng.standard_normal(shape)).astype(np.float32)

    def full(value: float, *shape: int) -> np.ndarray:
        return np.full(shape, value, np.float32)

    def ln(*lead: int) -> dict[str, np.ndarray]:
        return {"scale": full(1.0, *lead, c), "bias": full(0.0, *lead, c)}

    wte = normal((cfg.vocab_size, c))
    wpe = normal((cfg.block_size, c))
    mats: dict[str, list[np.ndarray]] = {"w_qkv": [], "w_attn": [], "w_fc": [], "w_mlp": []}
    for _ in range(n):
        mats["w_qkv"].append(normal((c, 3 * c)))
        mats["w_attn"].append(normal((c, c), std_out))
        mats["w_fc"].append(normal((c, 4 * c)))
        mats["w_mlp"].append(normal((4 * c, c), std_out))
    stacked = {k: np.stack(v) if v else np.zeros((0,), np.float32) for k, v in mats.items()}
    blocks = {
        "ln1": ln(n),
        "attn": {
            "w_qkv": stacked["w_qkv"],
            "b_qkv": full(0.0, n, 3 * c),
            "w_out": stacked["w_attn"],
            "b_out": full(0.0, n, c),
        },
        "ln2": ln(n),
        "mlp": {
            "w_fc": stacked["w_fc"],
            "b_fc": full(0.0, n, 4 * c),
            "w_out": stacked["w_mlp"],
            "b_out": full(0.0, n, c),
        },
    }
    return {"wte": wte, "wpe": wpe, "blocks": blocks, "ln_f": ln()}


def named_leaves(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The leaves of a parameter dict by dotted name, e.g. ``"blocks.attn.w_qkv"``."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(named_leaves(value, name + "."))
        else:
            out[name] = value
    return out


def decays(name: str) -> bool:
    """The weight-decay rule, the same for both optimizers and frameworks: matrices decay.

    ``name`` is a dotted leaf name (:func:`named_leaves`) or its last part.
    The rule is nanoGPT's and the Sophia paper code's (``p.dim() >= 2``,
    stated by name because the blocks' leaves are stacked): the embeddings
    ``wte`` (tied with the output layer) and ``wpe`` and the attention and MLP
    matrices ``w_*`` decay; biases and LayerNorm parameters do not.
    """
    last = name.rsplit(".", 1)[-1]
    return last in ("wte", "wpe") or last.startswith("w_")


def n_params(cfg: ModelConfig) -> int:
    """Number of parameters of the GPT with shape ``cfg`` (tied ``lm_head`` counted once)."""
    c, layer = cfg.n_embd, 12 * cfg.n_embd**2 + 13 * cfg.n_embd
    return (cfg.vocab_size + cfg.block_size) * c + cfg.n_layer * layer + 2 * c

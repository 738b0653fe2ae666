"""The demo's GPT in plain PyTorch: the model of :mod:`sophia.demo.model_jax` as an ``nn.Module``.

Same architecture (pre-LayerNorm blocks of causal multi-head self-attention
and a tanh-GELU MLP, LayerNorm eps 1e-5, ``lm_head`` tied to the token
embedding, no dropout) and same initial weights: :meth:`GPT.load_numpy` takes
the stacked ``[in, out]`` arrays of :func:`sophia.demo.model.init_numpy` and
puts layer ``i`` of each into its own ``nn.Linear`` (whose weight is
``[out, in]``, hence the transposes). :func:`leaf_name` maps every torch
parameter back to its NumPy leaf, which is how the decay rule
:func:`sophia.demo.model.decays` applies here.

Example::

    model = init_model(cfg, seed=0)     # the same weights as model_jax.init_params(cfg, 0)
    logits = model(tokens)              # [batch, time, vocab]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sophia.demo.model import ModelConfig, decays, init_numpy

__all__ = [
    "GPT",
    "cross_entropy",
    "decay_split",
    "init_model",
    "leaf_name",
]

#: Per-block torch parameter (without ``blocks.<i>.``) -> (NumPy leaf under
#: ``blocks.``, whether the NumPy array is the transpose of the torch tensor).
_BLOCK_LEAVES: dict[str, tuple[str, bool]] = {
    "ln1.weight": ("ln1.scale", False),
    "ln1.bias": ("ln1.bias", False),
    "attn.qkv.weight": ("attn.w_qkv", True),
    "attn.qkv.bias": ("attn.b_qkv", False),
    "attn.proj.weight": ("attn.w_out", True),
    "attn.proj.bias": ("attn.b_out", False),
    "ln2.weight": ("ln2.scale", False),
    "ln2.bias": ("ln2.bias", False),
    "mlp.fc.weight": ("mlp.w_fc", True),
    "mlp.fc.bias": ("mlp.b_fc", False),
    "mlp.proj.weight": ("mlp.w_out", True),
    "mlp.proj.bias": ("mlp.b_out", False),
}
_TOP_LEAVES: dict[str, str] = {
    "wte.weight": "wte",
    "wpe.weight": "wpe",
    "ln_f.weight": "ln_f.scale",
    "ln_f.bias": "ln_f.bias",
}


def leaf_name(name: str) -> str:
    """The NumPy leaf (:func:`sophia.demo.model.named_leaves`) of a torch parameter name.

    Args:
      name: as in ``GPT.named_parameters()``, e.g. ``"blocks.1.attn.qkv.weight"``.

    Returns:
      The dotted leaf name, e.g. ``"blocks.attn.w_qkv"`` (layer index dropped:
      the NumPy blocks are stacked).

    Raises:
      KeyError: ``name`` is not a parameter of :class:`GPT`.
    """
    if name in _TOP_LEAVES:
        return _TOP_LEAVES[name]
    parts = name.split(".", 2)
    if (
        len(parts) == 3
        and parts[0] == "blocks"
        and parts[1].isdigit()
        and parts[2] in _BLOCK_LEAVES
    ):
        return "blocks." + _BLOCK_LEAVES[parts[2]][0]
    raise KeyError(f"not a GPT parameter: {name!r}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; ``qkv`` columns are ``[q | k | v]``, heads consecutive.

    Args:
      cfg: the model shape.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        """``[b, t, c] -> [b, t, c]``; position ``t`` attends to positions ``<= t``."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [b, h, t, hd]
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    """``proj(gelu_tanh(fc(x)))`` with a ``4 * n_embd`` hidden width.

    Args:
      cfg: the model shape.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., c] -> [..., c]``."""
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``.

    Args:
      cfg: the model shape.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        """``[b, t, c] -> [b, t, c]``."""
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """The demo's GPT; build it with :func:`init_model` to get the shared initial weights.

    Args:
      cfg: the model shape.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=1e-5)

    def forward(self, tokens: Tensor) -> Tensor:
        """The logits for every position.

        Args:
          tokens: integer ``[batch, time]`` with ``time <= block_size``.

        Returns:
          ``float32[batch, time, vocab]``; position ``t`` depends only on
          ``tokens[:, : t + 1]``.
        """
        t = tokens.shape[1]
        x = self.wte(tokens) + self.wpe.weight[:t]
        for block in self.blocks:
            x = block(x)
        # the lm_head is tied: no weight of its own, so the optimizers see wte once
        return F.linear(self.ln_f(x), self.wte.weight)

    @torch.no_grad()
    def load_numpy(self, params: dict[str, Any]) -> GPT:
        """Copies in the weights of :func:`sophia.demo.model.init_numpy` (layout of that module).

        Args:
          params: the nested NumPy parameter dict.

        Returns:
          ``self``.
        """
        for name, p in self.named_parameters():
            p.copy_(torch.from_numpy(np.ascontiguousarray(self._numpy_value(params, name))))
        return self

    def to_numpy(self) -> dict[str, np.ndarray]:
        """The weights as NumPy leaves by dotted name, in the layout of :mod:`sophia.demo.model`.

        Returns:
          ``{leaf name: float32 array}``, blocks stacked along the layer axis
          and matrices ``[in, out]``; comparable with ``named_leaves(init_numpy(...))``.
        """
        top: dict[str, np.ndarray] = {}
        layers: dict[str, list[np.ndarray]] = {}
        for name, p in self.named_parameters():
            value = p.detach().cpu().numpy()
            if name.startswith("blocks."):
                transposed = _BLOCK_LEAVES[name.split(".", 2)[2]][1]
                layers.setdefault(leaf_name(name), []).append(value.T if transposed else value)
            else:
                top[leaf_name(name)] = value
        return {**top, **{k: np.stack(v) for k, v in layers.items()}}

    @staticmethod
    def _numpy_value(params: dict[str, Any], name: str) -> np.ndarray:
        node: Any = params
        for key in leaf_name(name).split("."):
            node = node[key]
        if not name.startswith("blocks."):
            return node
        _, layer, rest = name.split(".", 2)
        value = node[int(layer)]
        return value.T if _BLOCK_LEAVES[rest][1] else value


def init_model(cfg: ModelConfig, seed: int, device: str | torch.device = "cpu") -> GPT:
    """The GPT with GPT-2's initialisation from :func:`sophia.demo.model.init_numpy`.

    Args:
      cfg: the model shape.
      seed: seed of the NumPy draw.
      device: where the parameters live.

    Returns:
      The model (float32, training mode; it has no dropout, so the mode does not matter).
    """
    with torch.device("meta"):
        # torch's own random init would be overwritten: skip it
        model = GPT(cfg)
    model = model.to_empty(device="cpu").load_numpy(init_numpy(cfg, seed))
    return model.to(device)


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy (nats) of ``logits[..., vocab]`` against ``targets``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1).long())


def decay_split(model: GPT) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The parameters split by :func:`sophia.demo.model.decays`: ``(decayed, not_decayed)``.

    Matrices and the embeddings (``wte``, tied with the output layer, and
    ``wpe``) decay; biases and LayerNorm parameters do not.
    """
    decayed, kept = [], []
    for name, p in model.named_parameters():
        (decayed if decays(leaf_name(name)) else kept).append(p)
    return decayed, kept

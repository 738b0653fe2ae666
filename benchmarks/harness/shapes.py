"""The parameter shapes the step-time benchmarks time, one table per model.

Names follow Hugging Face's checkpoints (``h.0.attn.c_attn.weight``); the
values are plain shapes, so both frameworks build the same model from them.
"""

from __future__ import annotations

import math
import re

Shapes = dict[str, tuple[int, ...]]

#: GPT-2 small: 148 tensors; ``--small`` keeps them and divides width, vocabulary and
#: context by :data:`SMALL_DIVISOR` (the parameter count by about its square).
GPT2_SMALL_TENSORS = 148
GPT2_SMALL_PARAMS = 124_439_808
SMALL_DIVISOR = 4


def gpt2_small(small: bool = False) -> Shapes:
    """GPT-2 small with the LM head tied to ``wte``: 148 tensors, 124,439,808 parameters.

    Args:
      small: divide the width, vocabulary and context by :data:`SMALL_DIVISOR`
        (rounded down), keeping the 148 tensors: the smoke-test size, the same
        in every script.
    """
    f = SMALL_DIVISOR if small else 1
    d, vocab, ctx = 768 // f, 50257 // f, 1024 // f
    shapes: Shapes = {"wte.weight": (vocab, d), "wpe.weight": (ctx, d)}
    for layer in range(12):
        pre = f"h.{layer}."
        for name, shape in (
            ("ln_1", (d,)),
            ("attn.c_attn", (d, 3 * d)),
            ("attn.c_proj", (d, d)),
            ("ln_2", (d,)),
            ("mlp.c_fc", (d, 4 * d)),
            ("mlp.c_proj", (4 * d, d)),
        ):
            shapes[pre + name + ".weight"] = shape
            shapes[pre + name + ".bias"] = (shape[-1],)
    shapes["ln_f.weight"] = (d,)
    shapes["ln_f.bias"] = (d,)
    return shapes


def tinyllama_1b() -> Shapes:
    """TinyLlama-1.1B (Llama 2 layout, grouped-query attention, untied head): 201 tensors.

    Width 2048, 22 layers, MLP width 5632, 4 key/value heads of 64, a 32,000
    vocabulary: 1,100,048,384 parameters, in ``[out, in]`` layout.
    """
    d, ffn, kv, vocab = 2048, 5632, 256, 32000
    shapes: Shapes = {"embed_tokens": (vocab, d)}
    for i in range(22):
        pre = f"layers.{i}."
        for name, shape in (
            ("self_attn.q_proj", (d, d)),
            ("self_attn.k_proj", (kv, d)),
            ("self_attn.v_proj", (kv, d)),
            ("self_attn.o_proj", (d, d)),
            ("mlp.gate_proj", (ffn, d)),
            ("mlp.up_proj", (ffn, d)),
            ("mlp.down_proj", (d, ffn)),
            ("input_layernorm", (d,)),
            ("post_attention_layernorm", (d,)),
        ):
            shapes[pre + name] = shape
    shapes["norm"] = (d,)
    shapes["lm_head"] = (vocab, d)
    return shapes


def shrink(shapes: Shapes, factor: int, layers: int = 1) -> Shapes:
    """The first ``layers`` blocks and the rest, every dimension divided by ``factor`` (rounded up).

    The same kinds of tensors at a fraction of the elements and of the count
    (a jitted step compiles in time proportional to its number of tensors).
    """

    def block(name: str) -> int:
        found = re.match(r"(?:h|layers)\.(\d+)\.", name)
        return int(found.group(1)) if found else -1

    return {k: tuple(-(-d // factor) for d in s) for k, s in shapes.items() if block(k) < layers}


def n_params(shapes: Shapes) -> int:
    """The number of elements over all tensors."""
    return sum(math.prod(s) for s in shapes.values())

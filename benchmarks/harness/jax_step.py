"""A jitted JAX step timed on donated buffers, and the random trees it runs on."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from harness.shapes import Shapes, n_params


def random_trees(
    shapes: Shapes, scales: Sequence[float], nonnegative: Sequence[bool] = (), seed: int = 0
) -> list[dict[str, Any]]:
    """One normal float32 tree per scale (its absolute value where ``nonnegative``).

    Sampled in one compiled call: leaf by leaf, eagerly, would compile one
    program per shape. The timing does not depend on the values as long as
    they stay normal numbers.
    """
    n = n_params(shapes)

    def sample(key: jax.Array) -> list[dict[str, jax.Array]]:
        rows = jax.random.normal(key, (len(scales), n), jnp.float32)
        out = []
        for j, (row, scale) in enumerate(zip(rows, scales)):
            if j < len(nonnegative) and nonnegative[j]:
                row = jnp.abs(row)
            tree, i = {}, 0
            for name, s in shapes.items():
                tree[name] = (row[i : i + math.prod(s)] * scale).reshape(s)
                i += math.prod(s)
            out.append(tree)
        return out

    return jax.block_until_ready(jax.jit(sample)(jax.random.PRNGKey(seed)))


def optimizer_step(tx: optax.GradientTransformation, **extra: Any) -> Callable[..., Any]:
    """``(params, state, grads) -> (params, state)``: ``tx.update`` and ``apply_updates``."""

    def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    return step


class Case:
    """A compiled step called on named buffers of a shared pool.

    The buffers named in ``donate`` are donated and replaced in the pool by the
    step's outputs (in that order), so cases that share a buffer (optimizer
    variants sharing parameters and state, kernels their arrays) keep the
    benchmark's memory to a few copies of the model.

    Args:
      name: the variant's name.
      fn: the step, taking the buffers named in ``names``.
      pool: the buffers by name.
      names: ``fn``'s arguments.
      donate: the arguments donated and replaced by ``fn``'s outputs.
    """

    def __init__(
        self,
        name: str,
        fn: Callable[..., Any],
        pool: dict[str, Any],
        names: list[str],
        donate: list[str],
    ) -> None:
        self.name, self.pool, self.names, self.donate = name, pool, names, donate
        t0 = time.perf_counter()
        argnums = tuple(i for i, k in enumerate(names) if k in donate)
        jitted = jax.jit(fn, donate_argnums=argnums, keep_unused=True)
        self.compiled = jitted.lower(*[pool[k] for k in names]).compile()
        self.compile_s = time.perf_counter() - t0
        # the fusions of the entry computation: how many kernels one call runs
        self.fusions = self.compiled.as_text().split("\nENTRY ", 1)[-1].count(" fusion(")
        print(f"  compiled {name} in {self.compile_s:.1f} s", file=sys.stderr, flush=True)

    def __call__(self) -> None:
        """One step, returning once its outputs are ready."""
        out = jax.block_until_ready(self.compiled(*[self.pool[k] for k in self.names]))
        for k, v in zip(self.donate, out if isinstance(out, tuple) else (out,)):
            self.pool[k] = v

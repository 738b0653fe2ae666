"""Complex parameters as pairs of real coordinates, and the dtypes SophiaG computes in.

A complex parameter is a pair of real parameters, as torch's ``view_as_real``
makes it: every per-coordinate rule of :mod:`sophia.spec` (sign, clipping,
``max(h, 0)``, the win rate's count) applies to each part on its own, never to
complex numbers. This module holds that view for the other modules, and the
optax links of :func:`sophia.jax.sophia_g` that need it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sophia import spec

__all__ = ["add_decayed_weights", "on_real_pairs", "scale_by_learning_rate"]


def part_dtype(dtype: Any) -> jnp.dtype:
    """The dtype of one real coordinate: float32 for complex64, float64 for complex128."""
    dtype = jnp.dtype(dtype)
    return jnp.finfo(dtype).dtype if jnp.issubdtype(dtype, jnp.complexfloating) else dtype


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The spec's compute dtype of a leaf; a complex leaf computes in that of its parts."""
    return jnp.dtype(spec.compute_dtype(part_dtype(dtype)))


def update_dtype(dtype: Any) -> jnp.dtype:
    """The dtype of a leaf's update before rounding: complex of the compute dtype, or it."""
    cd = compute_dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.dtype(jnp.complex128 if cd == jnp.float64 else jnp.complex64)
    return cd


def scalar_dtype(params: optax.Params) -> jnp.dtype:
    """The dtype of the state's scalars: float64 if any parameter is, else float32 (the spec)."""
    leaves = jax.tree.leaves(params)
    if any(part_dtype(x.dtype) == jnp.float64 for x in leaves):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def is_complex(x: Any) -> bool:
    """Whether the array (or dtype) ``x`` is complex."""
    return jnp.issubdtype(getattr(x, "dtype", x), jnp.complexfloating)


def real_parts(x: jax.Array) -> tuple[jax.Array, ...]:
    """The real coordinates of a leaf: ``(x,)``, or ``(real, imag)`` for a complex one."""
    if is_complex(x):
        return jnp.real(x), jnp.imag(x)
    return (x,)


def join_parts(parts: Any, dtype: Any) -> jax.Array:
    """Inverse of :func:`real_parts`: the leaf of ``dtype`` made of ``parts``."""
    pd = part_dtype(dtype)
    if len(parts) == 2:
        return jax.lax.complex(parts[0].astype(pd), parts[1].astype(pd)).astype(dtype)
    return parts[0].astype(dtype)


def real_size(tree: Any) -> int:
    """Number of real coordinates in ``tree``: two per complex element, as torch counts them."""
    return sum(x.size * len(real_parts(x)) for x in jax.tree.leaves(tree))


def sq_norm(tree: Any, dtype: jnp.dtype) -> jax.Array:
    """The squared L2 norm of ``tree`` over its real coordinates, summed in ``dtype``.

    Masked leaves (``optax.MaskedNode``, ``None``) hold no arrays and add nothing.
    """
    sq = [
        jnp.sum(jnp.square(part.astype(dtype)))
        for x in jax.tree.leaves(tree)
        for part in real_parts(x)
    ]
    return sum(sq, jnp.zeros([], dtype))


def check_gradient(g: jax.Array, h: jax.Array) -> None:
    """A real gradient for a complex parameter (or the reverse) would lose or invent a part."""
    if is_complex(g) != is_complex(h):
        raise ValueError(
            f"Invalid gradient: {g.dtype} for a parameter whose Sophia state is {h.dtype} "
            "(allowed: complex gradients for complex parameters, real ones for real parameters)"
        )


def estimate_parts(h_hat: jax.Array, h: jax.Array) -> tuple[jax.Array, ...]:
    """The real parts of an estimate ``h_hat`` for the Hessian EMA ``h``.

    For a complex ``h`` the estimate is complex of ``h``'s shape (its real and
    imaginary parts estimate the two coordinates, as :func:`sophia.jax.gnb`
    returns it) or real of shape ``h.shape + (2,)`` (torch's ``view_as_real``
    layout). A complex estimate for a real ``h`` is refused rather than cut to
    its real part.
    """
    h_hat = jnp.asarray(h_hat)
    if is_complex(h) and is_complex(h_hat) and h_hat.shape == h.shape:
        return real_parts(h_hat)
    if is_complex(h) and not is_complex(h_hat) and h_hat.shape == (*h.shape, 2):
        return h_hat[..., 0], h_hat[..., 1]
    if not is_complex(h) and not is_complex(h_hat):
        return (h_hat,)
    allowed = (
        f"complex of shape {h.shape}, or real of shape {(*h.shape, 2)}"
        if is_complex(h)
        else "a real array"
    )
    raise ValueError(
        f"Invalid Hessian estimate: {h_hat.dtype} of shape {h_hat.shape} for the {h.dtype} "
        f"Hessian EMA of shape {h.shape} (allowed: {allowed})"
    )


def _stacked(x: Any) -> Any:
    """A complex leaf as a real array of ``x.shape + (2,)`` (torch's ``view_as_real``)."""
    if x is None or not is_complex(jnp.asarray(x)):
        return x
    return jnp.stack(real_parts(x), axis=-1)


def on_real_pairs(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Runs ``inner`` on complex leaves as pairs of reals, one real coordinate per part.

    optax's elementwise transforms multiply complex updates by real scalars as
    complex numbers, ``(a + bi)(c + 0i) = (ac - b*0) + (a*0 + bc)i``, which turns
    an infinite part into NaN in the other part and can flip the sign of a zero;
    SophiaG treats each part as its own coordinate (as torch's ``view_as_real``
    does). Each complex leaf of the updates (and of the params) enters
    ``inner`` as a real array of ``shape + (2,)`` and its result is put back
    together; real leaves pass unchanged. ``inner``'s state must not depend on
    the leaves' shapes (scales, schedules, weight decay).

    Args:
      inner: the transformation to wrap.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.
    """
    inner = optax.with_extra_args_support(inner)

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        is_none = lambda x: x is None  # noqa: E731
        real_u = jax.tree.map(_stacked, updates, is_leaf=is_none)
        real_p = None if params is None else jax.tree.map(_stacked, params, is_leaf=is_none)
        out, state = inner.update(real_u, state, real_p, **extra_args)

        def back(o: Any, u: Any) -> Any:
            if o is None or not is_complex(jnp.asarray(u)):
                return o
            return jax.lax.complex(o[..., 0], o[..., 1])

        return jax.tree.map(back, out, updates, is_leaf=is_none), state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def add_decayed_weights(
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformation:
    """Adds ``weight_decay * params`` in the compute dtype (see :mod:`sophia.spec`).

    The same as :func:`optax.add_decayed_weights` for float32/float64
    parameters; for bfloat16/float16 ones the product is formed in float32
    rather than rounded to the parameter dtype first, as the spec requires;
    complex parameters decay as pairs of reals (:func:`on_real_pairs`).

    Args:
      weight_decay: the decay rate, a scalar or an optax schedule.
      mask: a pytree of booleans (or a function of the params returning one)
        selecting the leaves that decay.

    Returns:
      An :class:`optax.GradientTransformation`.
    """
    base = on_real_pairs(optax.add_decayed_weights(weight_decay))

    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.OptState]:
        if params is None:
            raise ValueError(optax._src.base.NO_PARAMS_MSG)
        wide = jax.tree.map(lambda p: p.astype(update_dtype(p.dtype)), params)
        return base.update(updates, state, wide)

    tx = optax.GradientTransformation(base.init, update_fn)
    return optax.masked(tx, mask) if mask is not None else tx


def scale_by_learning_rate(
    learning_rate: optax.ScalarOrSchedule, *, flip_sign: bool = True
) -> optax.GradientTransformationExtraArgs:
    """:func:`optax.scale_by_learning_rate`, with complex leaves scaled as pairs of reals.

    Args:
      learning_rate: a scalar or an optax schedule.
      flip_sign: scale by ``-learning_rate`` (descent), as optax does by default.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; see :func:`on_real_pairs`.
    """
    return on_real_pairs(optax.scale_by_learning_rate(learning_rate, flip_sign=flip_sign))

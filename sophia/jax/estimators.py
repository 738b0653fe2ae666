r"""Diagonal-Hessian estimators for SophiaG (GNB) and Sophia-H (Hutchinson).

Both have the :data:`sophia.jax.Estimator` signature
``estimator(params, key, **extra_args) -> h_hat`` so :func:`scale_by_sophia`
can call them on refresh steps with the keyword arguments given to
``update``; arguments an estimator does not use are ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sophia import spec

__all__ = ["gnb", "gnb_from_vjp", "hutchinson", "sample_labels"]

_GNB_INPUTS = (
    "sophia_g needs the model's logits on a Hessian refresh step: pass "
    "update(grads, state, params, logits_fn=lambda p: model(p, x)) (logits_fn(params) -> "
    "logits[..., vocab]), or reuse the training forward with "
    "logits, vjp = jax.vjp(logits_fn, params); update(..., logits=logits, logits_vjp=vjp)"
)


def sample_labels(key: jax.Array, logits: jax.Array) -> jax.Array:
    """Labels drawn from the model's own predictive distribution ``softmax(logits)``.

    Args:
      key: PRNG key.
      logits: ``[..., vocab]`` unnormalised log-probabilities.

    Returns:
      Integer labels of shape ``logits.shape[:-1]``.
    """
    return jax.random.categorical(key, jax.lax.stop_gradient(logits), axis=-1)


def _square(g: jax.Array) -> jax.Array:
    """``g * g`` in the spec's compute dtype: float16 squares underflow below ~2.4e-4.

    A complex ``g`` is a pair of real coordinates (as in torch's port): the result
    is complex, its real and imaginary parts the squares of ``g``'s.
    """
    if jnp.issubdtype(g.dtype, jnp.complexfloating):
        return jax.lax.complex(_square(jnp.real(g)), _square(jnp.imag(g)))
    return jnp.square(g.astype(spec.compute_dtype(g.dtype)))


def _axis_mean(tree: optax.Params, axis_name: str) -> optax.Params:
    """Mean over a mapped axis of per-device gradients (or HVPs) of per-device losses.

    Under ``shard_map`` with replication checking, differentiating with respect to
    replicated parameters already *sums* the cotangents over the axis (the result
    no longer varies along it): divide by the axis size. Where the values still
    vary (``pmap``, ``check_vma=False``), take ``pmean``.
    """

    def mean(x: jax.Array) -> jax.Array:
        aval = jax.typeof(x)
        vma = getattr(aval, "vma", None)  # the axes a value varies along; renamed across
        if vma is None:  # JAX versions, so look in both places
            vma = getattr(getattr(aval, "mat", None), "varying", None)
        if vma is not None and axis_name not in vma:
            return x / jax.lax.axis_size(axis_name)
        return jax.lax.pmean(x, axis_name)

    return jax.tree.map(mean, tree)


def _residual(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``d mean_i CE(logits_i, labels_i) / d logits``, i.e. ``(softmax - onehot) / N``."""
    n = max(logits.size // logits.shape[-1], 1)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    return ((probs - onehot) / n).astype(logits.dtype)


def gnb_from_vjp(
    logits: jax.Array,
    logits_vjp: Callable[[jax.Array], tuple[optax.Params]],
    key: jax.Array,
    labels: jax.Array | None = None,
    axis_name: str | None = None,
) -> optax.Params:
    r"""GNB estimate from an existing forward pass: one backward, no forward.

    With ``logits, logits_vjp = jax.vjp(logits_fn, params)`` from the training
    step, the gradient of the mean cross-entropy against sampled labels is
    ``logits_vjp((softmax(logits) - onehot(y_hat)) / N)``; its square is the
    estimate. The same ``logits_vjp`` can also produce the training gradient.

    Args:
      logits: ``[..., vocab]`` logits of the current batch.
      logits_vjp: the VJP function returned by :func:`jax.vjp` with the logits.
      key: PRNG key for the label sampling.
      labels: labels to use instead of sampling (tests, cross-framework runs).
      axis_name: under ``shard_map``/``pmap`` with the batch split along this
        axis, the sampled-label gradient is averaged over it *before* squaring,
        so every device gets the estimate of the global batch (``bs`` is then
        the global label count). Not needed under plain ``jit`` with sharded
        arrays, where the mean is already global.

    Returns:
      ``h_hat``, with the structure of the parameters.
    """
    # Per-device samples differ; fold the device index into the key under an axis.
    if axis_name is not None and labels is None:
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    y = sample_labels(key, logits) if labels is None else labels
    (g_hat,) = logits_vjp(_residual(jax.lax.stop_gradient(logits), y))
    if axis_name is not None:
        g_hat = _axis_mean(g_hat, axis_name)
    return jax.tree.map(_square, g_hat)


def gnb(
    params: optax.Params,
    key: jax.Array,
    *,
    logits_fn: Callable[[optax.Params], jax.Array] | None = None,
    logits: jax.Array | None = None,
    logits_vjp: Callable[[jax.Array], tuple[optax.Params]] | None = None,
    labels: jax.Array | None = None,
    axis_name: str | None = None,
    **_: Any,
) -> optax.Params:
    r"""Gauss-Newton-Bartlett estimate of the diagonal Hessian (Sophia-G).

    Samples :math:`\hat y \sim \mathrm{softmax}(f(\theta))`, takes
    :math:`\hat g = \nabla_\theta \frac1N \sum_i \ell(f_i(\theta), \hat y_i)`
    (mean cross-entropy over the ``N = logits.size / vocab`` sampled labels)
    and returns :math:`\hat h = \hat g \odot \hat g`. By Bartlett's identity
    :math:`N\,\mathbb E[\hat h]` is the diagonal of the Gauss-Newton matrix of
    the mean loss, which is why the update divides by ``rho * bs * h`` with
    ``bs = N``.

    Args:
      params: parameters to estimate at.
      key: PRNG key for the label sampling.
      logits_fn: ``logits_fn(params) -> logits[..., vocab]`` on the current
        batch; costs one forward and one backward.
      logits: with ``logits_vjp``, the training step's logits (forward reuse).
      logits_vjp: the VJP of ``logits_fn`` at ``params`` (``jax.vjp``); with it
        a refresh costs one extra backward and no forward.
      labels: fixed labels instead of sampled ones.
      axis_name: mapped axis the batch is split along (``shard_map``/``pmap``);
        see :func:`gnb_from_vjp`.
      **_: other keyword arguments of ``update``, ignored.

    Returns:
      ``h_hat``, with the structure of ``params``.
    """
    if logits_vjp is not None:
        if logits is None:
            raise ValueError("gnb: logits_vjp=... needs the matching logits=...; " + _GNB_INPUTS)
        return gnb_from_vjp(logits, logits_vjp, key, labels, axis_name)
    if logits_fn is None:
        raise ValueError(_GNB_INPUTS)
    out, vjp = jax.vjp(logits_fn, params)
    return gnb_from_vjp(out, vjp, key, labels, axis_name)


def _rademacher_like(key: jax.Array, tree: optax.Params) -> optax.Params:
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    vs = [_rademacher(k, x) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, vs)


def _rademacher(key: jax.Array, x: jax.Array) -> jax.Array:
    """A probe like ``x``; a complex one draws its real and imaginary parts independently."""
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        v = jax.random.rademacher(key, (*x.shape, 2), dtype=jnp.real(x).dtype)
        return jax.lax.complex(v[..., 0], v[..., 1])
    return jax.random.rademacher(key, x.shape, dtype=x.dtype)


def _probe_times_hvp(v: jax.Array, hv: jax.Array) -> jax.Array:
    """``v * (H v)`` per real coordinate.

    For a complex parameter ``jax.grad`` returns ``d/dx - i d/dy``, so the
    imaginary part of its tangent ``hv`` is minus the ``y`` row of the Hessian
    of the real view times ``v``.
    """
    if jnp.issubdtype(v.dtype, jnp.complexfloating):
        return jax.lax.complex(jnp.real(v) * jnp.real(hv), -(jnp.imag(v) * jnp.imag(hv)))
    return v * hv


def hutchinson(
    params: optax.Params,
    key: jax.Array,
    *,
    obj_fn: Callable[[optax.Params], jax.Array] | None = None,
    axis_name: str | None = None,
    **_: Any,
) -> optax.Params:
    r"""Hutchinson estimate of the diagonal Hessian (Sophia-H).

    :math:`\hat h = v \odot (\nabla^2 L\, v)` with Rademacher :math:`v`, an
    unbiased estimate of :math:`\mathrm{diag}(\nabla^2 L)` (it can be
    negative). The Hessian-vector product is forward-over-reverse.

    Args:
      params: parameters to estimate at.
      key: PRNG key for the probe.
      obj_fn: ``obj_fn(params) -> scalar loss`` on the current batch, as in
        ``optax.contrib.sophia``.
      axis_name: mapped axis the batch is split along (``shard_map``/``pmap``):
        the Hessian-vector products are averaged over it, with the same probe on
        every device, giving the estimate for the global mean loss.
      **_: other keyword arguments of ``update``, ignored.

    Returns:
      ``h_hat``, with the structure of ``params``.
    """
    if obj_fn is None:
        raise ValueError(
            "sophia_h needs the loss on a Hessian refresh step: pass "
            "update(grads, state, params, obj_fn=lambda p: loss(p, batch))"
        )
    v = _rademacher_like(key, params)
    _, hv = jax.jvp(jax.grad(obj_fn), (params,), (v,))
    if axis_name is not None:
        hv = _axis_mean(hv, axis_name)
    return jax.tree.map(_probe_times_hvp, v, hv)

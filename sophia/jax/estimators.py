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
from jax.extend import core as jax_core

from sophia import spec
from sophia.jax.state import Estimate

__all__ = [
    "gnb",
    "gnb_from_vjp",
    "gnb_with_label_count",
    "hutchinson",
    "label_count",
    "sample_labels",
]

_GNB_INPUTS = (
    "sophia_g needs the model's logits on a Hessian refresh step: pass "
    "update(grads, state, params, logits_fn=lambda p: model(p, x)) (logits_fn(params) -> "
    "logits[..., vocab]), or reuse the training forward with "
    "logits, vjp = jax.vjp(logits_fn, params); update(..., logits=logits, logits_vjp=vjp). "
    "With Flax: flax.training.train_state.TrainState.apply_gradients does not pass "
    "logits_fn on to tx.update (sophia.integrations.flax.TrainState does); with NNX, "
    "optimizer.update(model, grads, logits_fn=sophia.integrations.flax.logits_fn(model, x))"
)


_NO_DEPENDENCE = (
    "Invalid {name}: the {what} not depend on the parameters it is given, so every "
    "{est} estimate is exactly zero and h (hessian_norm) stays 0: "
    "SophiaG would never see any curvature. {name} must compute from its argument: "
    "{fix}, not a function that ignores it such as {wrong} (a model that holds its own "
    "weights). With Flax NNX: graphdef, params, rest = nnx.split(model, nnx.Param, ...), "
    "then {nnx}."
)
_GNB_MISUSE = {
    "name": "logits_fn",
    "what": "logits it computes do",
    "est": "GNB",
    "fix": "logits_fn=lambda p: model(p, x) (and for logits_vjp=, "
    "logits, vjp = jax.vjp(lambda p: model(p, x), params))",
    "wrong": "lambda p: model(x)",
    "nnx": "logits_fn=lambda p: nnx.merge(graphdef, p, rest)(x), which "
    "sophia.integrations.flax.logits_fn(model, x) builds for you",
}
_HUTCHINSON_MISUSE = {
    "name": "obj_fn",
    "what": "loss it computes does",
    "est": "Hutchinson",
    "fix": "obj_fn=lambda p: loss(p, batch)",
    "wrong": "lambda p: loss(batch)",
    "nnx": "obj_fn=lambda p: loss(nnx.merge(graphdef, p, rest), batch)",
}


def _ignores_input(fn: Callable[..., Any], *args: Any) -> bool:
    """Whether ``fn(*args)`` has outputs and none of them is computed from ``args``.

    Read off ``fn``'s jaxpr: a trace, nothing runs, and under ``jit`` nothing is
    added to the compiled program. Conservative: every output of an operation
    that takes a dependent operand counts as dependent, and so do its other
    operands (a mutable reference written with a dependent value).
    """
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    live = set(jaxpr.invars)
    for eqn in jaxpr.eqns:
        ins = [v for v in eqn.invars if not isinstance(v, jax_core.Literal)]
        if any(v in live for v in ins):
            live.update(eqn.outvars)
            live.update(ins)
    outs = jaxpr.outvars
    return bool(outs) and not any(not isinstance(v, jax_core.Literal) and v in live for v in outs)


def _require_dependence(fn: Callable[..., Any], arg: Any, misuse: dict[str, str]) -> None:
    """Raises the misuse's error if ``fn(arg)`` is computed without ``arg`` (see above)."""
    if _ignores_input(fn, arg):
        raise ValueError(_NO_DEPENDENCE.format(**misuse))


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


def _residual(logits: jax.Array, labels: jax.Array, n: Any, mask: jax.Array | None) -> jax.Array:
    """``d mean_i CE(logits_i, labels_i) / d logits``, i.e. ``(softmax - onehot) / n``.

    With ``mask``, rows outside it are exactly zero (``where``, not a product, so
    that a NaN or inf in a padded row cannot leak into the estimate).
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    res = (probs - onehot) / n
    if mask is not None:
        res = jnp.where(mask[..., None], res, jnp.zeros([], res.dtype))
    return res.astype(logits.dtype)


def _check_mask(mask: Any, logits: jax.Array) -> jax.Array:
    """``mask`` as a bool array of ``logits.shape[:-1]``, or a ValueError naming what is wrong."""
    shape = getattr(mask, "shape", None)
    want = tuple(logits.shape[:-1])
    if shape is None or tuple(shape) != want:
        raise ValueError(
            f"Invalid mask: shape {shape} (allowed: a boolean array of logits.shape[:-1] = "
            f"{want}, True where the position enters the loss)"
        )
    dtype = jnp.dtype(mask.dtype)
    if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.number)):
        raise ValueError(f"Invalid mask: dtype {dtype} (allowed: bool, or 0/1 numbers)")
    return mask if dtype == jnp.bool_ else mask != 0


def label_count(
    logits: jax.Array, mask: jax.Array | None = None, axis_name: str | None = None
) -> Any:
    """Number of labels a GNB estimate on ``logits`` samples: the ``bs`` it calls for.

    ``logits.size // vocab`` (a Python int) without a mask, the (traced) number of
    True entries of ``mask`` with one; summed over ``axis_name`` under
    ``shard_map``/``pmap``, where each device holds part of the batch.
    """
    if mask is None:
        n = max(logits.size // logits.shape[-1], 1)
        return n if axis_name is None else n * jax.lax.axis_size(axis_name)
    n = jnp.sum(_check_mask(mask, logits), dtype=jnp.int32)
    return n if axis_name is None else jax.lax.psum(n, axis_name)


def gnb_from_vjp(
    logits: jax.Array,
    logits_vjp: Callable[[jax.Array], tuple[optax.Params]],
    key: jax.Array,
    labels: jax.Array | None = None,
    axis_name: str | None = None,
    mask: jax.Array | None = None,
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
      mask: boolean array of ``logits.shape[:-1]``, True where the position
        enters the loss (padding and the last position of a causal model's
        shifted labels are False). The mean is over the masked-in positions
        only, and the rest contribute exactly nothing; ``N`` is their count.

    Returns:
      ``h_hat``, with the structure of the parameters.

    Raises:
      ValueError: the logits do not depend on the parameters (``jax.vjp`` of a
        function that ignores its argument), which would make every estimate
        zero; found from the trace of ``logits_vjp``, at no run-time cost.
    """
    return _gnb_from_vjp(logits, logits_vjp, key, labels, axis_name, mask)[0]


def _gnb_from_vjp(
    logits: jax.Array,
    logits_vjp: Callable[[jax.Array], tuple[optax.Params]],
    key: jax.Array,
    labels: jax.Array | None,
    axis_name: str | None,
    mask: jax.Array | None,
) -> tuple[optax.Params, Any]:
    """:func:`gnb_from_vjp` and the label count behind it (see :func:`label_count`)."""
    if mask is not None:
        mask = _check_mask(mask, logits)
    n_labels = label_count(logits, mask, axis_name)
    n = max(logits.size // logits.shape[-1], 1)
    if mask is not None:
        # The mean over the global masked-in positions: each device divides by the
        # global count over the axis size, so that the axis mean below sums them.
        n = jnp.maximum(n_labels, 1).astype(jnp.float32)
        if axis_name is not None:
            n = n / jax.lax.axis_size(axis_name)
    # Per-device samples differ; fold the device index into the key under an axis.
    if axis_name is not None and labels is None:
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    # Sampled at every position (shapes are static under jit); the labels at masked-in
    # positions depend only on their own rows' logits, and the others are discarded.
    y = sample_labels(key, logits) if labels is None else labels
    residual = _residual(jax.lax.stop_gradient(logits), y, n, mask)
    # The VJP is linear in the residual: if no output depends on it, it is zero.
    _require_dependence(logits_vjp, residual, _GNB_MISUSE)
    (g_hat,) = logits_vjp(residual)
    if axis_name is not None:
        g_hat = _axis_mean(g_hat, axis_name)
    return jax.tree.map(_square, g_hat), n_labels


def gnb(
    params: optax.Params,
    key: jax.Array,
    *,
    logits_fn: Callable[[optax.Params], jax.Array] | None = None,
    logits: jax.Array | None = None,
    logits_vjp: Callable[[jax.Array], tuple[optax.Params]] | None = None,
    labels: jax.Array | None = None,
    mask: jax.Array | None = None,
    axis_name: str | None = None,
    **_: Any,
) -> optax.Params:
    r"""Gauss-Newton-Bartlett estimate of the diagonal Hessian (Sophia-G).

    Samples :math:`\hat y \sim \mathrm{softmax}(f(\theta))`, takes
    :math:`\hat g = \nabla_\theta \frac1N \sum_i \ell(f_i(\theta), \hat y_i)`
    (mean cross-entropy over the ``N = logits.size / vocab`` sampled labels,
    or over the ``N = mask.sum()`` masked-in ones)
    and returns :math:`\hat h = \hat g \odot \hat g`. By Bartlett's identity
    :math:`N\,\mathbb E[\hat h]` is the diagonal of the Gauss-Newton matrix of
    the mean loss, which is why the update divides by ``rho * bs * h`` with
    ``bs = N`` (what :func:`sophia.jax.sophia_g` does with ``bs=None``).

    Args:
      params: parameters to estimate at.
      key: PRNG key for the label sampling.
      logits_fn: ``logits_fn(params) -> logits[..., vocab]`` on the current
        batch; costs one forward and one backward.
      logits: with ``logits_vjp``, the training step's logits (forward reuse).
      logits_vjp: the VJP of ``logits_fn`` at ``params`` (``jax.vjp``); with it
        a refresh costs one extra backward and no forward.
      labels: fixed labels instead of sampled ones.
      mask: boolean array of ``logits.shape[:-1]``, True where the position
        enters the loss; see :func:`gnb_from_vjp`.
      axis_name: mapped axis the batch is split along (``shard_map``/``pmap``);
        see :func:`gnb_from_vjp`.
      **_: other keyword arguments of ``update``, ignored.

    Returns:
      ``h_hat``, with the structure of ``params``.

    Raises:
      ValueError: no ``logits_fn`` or ``logits``/``logits_vjp`` was given, or the
        logits do not depend on ``params`` (e.g. ``lambda p: model(x)``), which
        would make every estimate zero.
    """
    return _gnb(params, key, logits_fn, logits, logits_vjp, labels, mask, axis_name)[0]


#: The keyword arguments of ``update`` that :func:`gnb` reads, in ``_gnb``'s order.
_GNB_ARGS = ("logits_fn", "logits", "logits_vjp", "labels", "mask", "axis_name")


def _gnb(
    params: optax.Params,
    key: jax.Array,
    logits_fn: Callable[[optax.Params], jax.Array] | None,
    logits: jax.Array | None,
    logits_vjp: Callable[[jax.Array], tuple[optax.Params]] | None,
    labels: jax.Array | None,
    mask: jax.Array | None,
    axis_name: str | None,
) -> tuple[optax.Params, Any]:
    """:func:`gnb` and the label count behind it."""
    if logits_vjp is not None:
        if logits is None:
            raise ValueError("gnb: logits_vjp=... needs the matching logits=...; " + _GNB_INPUTS)
        return _gnb_from_vjp(logits, logits_vjp, key, labels, axis_name, mask)
    if logits_fn is None:
        raise ValueError(_GNB_INPUTS)
    out, vjp = jax.vjp(logits_fn, params)
    return _gnb_from_vjp(out, vjp, key, labels, axis_name, mask)


def gnb_with_label_count(params: optax.Params, key: jax.Array, **extra_args: Any) -> Estimate:
    """:func:`gnb` as an :class:`~sophia.jax.Estimate` that carries its label count.

    The estimator ``sophia_g`` refreshes with: the count becomes the state's
    ``bs`` when ``bs=None``. Takes the keyword arguments of :func:`gnb`.
    """
    return Estimate(*_gnb(params, key, *(extra_args.get(k) for k in _GNB_ARGS)))


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

    Raises:
      ValueError: no ``obj_fn`` was given, or the loss does not depend on
        ``params``, which would make every estimate zero.
    """
    if obj_fn is None:
        raise ValueError(
            "sophia_h needs the loss on a Hessian refresh step: pass "
            "update(grads, state, params, obj_fn=lambda p: loss(p, batch))"
        )
    _require_dependence(obj_fn, params, _HUTCHINSON_MISUSE)
    v = _rademacher_like(key, params)
    _, hv = jax.jvp(jax.grad(obj_fn), (params,), (v,))
    if axis_name is not None:
        hv = _axis_mean(hv, axis_name)
    return jax.tree.map(_probe_times_hvp, v, hv)

"""SophiaG in Flax training loops: NNX (``nnx.Optimizer``) and linen (``TrainState``).

SophiaG's built-in Hessian refresh differentiates the logits with respect to
the parameters that ``tx.update`` receives, so it needs the model as a function
of them: ``logits_fn(params) -> logits``. Flax hides that function in two ways,
and this module supplies it.

**NNX.** ``nnx.Optimizer.update(model, grads, **kwargs)`` passes ``kwargs`` on
to ``tx.update`` together with the model's parameters as a pure ``nnx.State``.
A ``lambda p: model(x)`` ignores ``p`` (the model reads its own variables), so
the estimate would be zero; :func:`logits_fn` merges ``p`` back into the
model's graph instead::

    from sophia.integrations import flax as sflax

    optimizer = nnx.Optimizer(model, sj.sophia_g(3e-4, rho=0.03), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads, logits_fn=sflax.logits_fn(model, x))
        return loss

    sflax.diagnostics(optimizer)  # plain jax arrays: win_rate, rho, hessian_norm, ...

**linen.** ``flax.training.train_state.TrainState.apply_gradients(grads=...,
**kwargs)`` hands ``kwargs`` to ``.replace()``, never to ``tx.update``;
:class:`TrainState` forwards the refresh's arguments::

    state = sflax.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    state = state.apply_gradients(grads=grads, logits_fn=state.logits_fn(x))

Either way the Hessian is refreshed by ``sophia_g`` itself, at the start of
optimizer steps 0, k, 2k, ... (``hessian_update_interval=k``), from the
parameters before that step's update; the other steps do not run the extra
forward (``lax.cond``). With ``mask=`` (a boolean array of the logits'
leading shape) only the positions that enter the loss count, and with the
default ``bs=None`` the update follows the refresh's label count.

This module imports only Flax, JAX, Optax and :mod:`sophia.jax`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, serialization
from flax.training import train_state

import sophia.jax as sj
from sophia.jax.restore import upgrade_fields

__all__ = ["TrainState", "diagnostics", "logits_fn"]


_restore_any_namedtuple = serialization._STATE_DICT_REGISTRY[serialization._NamedTuple][1]  # noqa: SLF001


def _restore_namedtuple(target: Any, state: dict[str, Any]) -> Any:
    """Flax's NamedTuple restore, reading Sophia states saved in layout version 1 too."""
    if isinstance(target, sj.ScaleBySophiaState):
        state = upgrade_fields(state, target)
    return _restore_any_namedtuple(target, state)


# flax.serialization (to_bytes of a TrainState, msgpack checkpoints) restores every
# NamedTuple with one handler; this one delegates to it, after turning a Sophia state
# saved in layout version 1 (with configuration fields) into the current layout.
serialization.register_serialization_state(
    serialization._NamedTuple,  # noqa: SLF001 - flax's marker for every NamedTuple
    serialization._STATE_DICT_REGISTRY[serialization._NamedTuple][0],  # noqa: SLF001
    _restore_namedtuple,
    override=True,
)

#: Keyword arguments of ``tx.update`` that feed SophiaG's Hessian refresh.
REFRESH_ARGS = ("logits_fn", "logits", "logits_vjp", "mask", "labels", "obj_fn")


def logits_fn(
    model: nnx.Module, *args: Any, wrt: Any = nnx.Param, **kwargs: Any
) -> Callable[[Any], jax.Array]:
    """The NNX model as a function of its parameters: ``p -> model'(*args, **kwargs)``.

    ``model'`` is ``model`` with the variables that ``wrt`` selects replaced by
    ``p`` (``nnx.merge`` of the model's graph, ``p`` and its other variables),
    which is what SophiaG's refresh differentiates. Pass it as
    ``optimizer.update(model, grads, logits_fn=logits_fn(model, x))``; works
    eagerly and under ``nnx.jit``, and costs nothing on steps without a refresh.

    The refresh's forward runs on that copy, so whatever the call changes in the
    model's other variables (batch statistics, RNG counters) is discarded: the
    refresh does not disturb the training state.

    Args:
      model: the ``nnx.Module`` being trained.
      *args: the model's inputs on the current batch, e.g. the token ids.
      wrt: the filter of the optimizer's parameters; the same ``wrt`` as
        ``nnx.Optimizer(model, tx, wrt=...)`` (default ``nnx.Param``).
      **kwargs: keyword inputs of the model's call.

    Returns:
      ``fn(params) -> logits``, with ``params`` the pure ``nnx.State`` that
      ``nnx.Optimizer.update`` passes to ``tx.update``.

    Raises:
      TypeError: ``model`` is not an ``nnx.Module`` (for linen, use
        :meth:`TrainState.logits_fn`).
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"Invalid model: {type(model).__name__} (allowed: a flax.nnx.Module; for a linen "
            "model use sophia.integrations.flax.TrainState and state.logits_fn(x))"
        )
    graphdef, params, rest = nnx.split(model, wrt, ...)
    want = jax.tree.structure(nnx.as_pure(params))

    def fn(p: Any) -> jax.Array:
        got = jax.tree.structure(nnx.as_pure(p))
        if got != want:
            raise ValueError(
                "sophia.integrations.flax.logits_fn: the parameters tx.update received do not "
                f"match the model's {wrt!r} variables; pass the optimizer's filter: "
                "logits_fn(model, x, wrt=optimizer.wrt)"
            )
        return nnx.merge(graphdef, p, rest)(*args, **kwargs)

    return fn


def _opt_state(obj: Any) -> Any:
    """The optax state inside an ``nnx.Optimizer``, a linen ``TrainState`` or itself."""
    if isinstance(obj, nnx.Optimizer):
        return nnx.as_pure(obj.opt_state)
    if isinstance(obj, train_state.TrainState):
        return obj.opt_state
    return nnx.as_pure(obj)


def diagnostics(obj: Any) -> dict[str, jax.Array]:
    """SophiaG's diagnostics from an ``nnx.Optimizer``, a ``TrainState`` or an optax state.

    ``nnx.Optimizer`` keeps its optax state as ``nnx`` variables
    (``OptArray``); this returns plain JAX arrays, as :func:`sophia.jax.diagnostics`
    does for an optax state.

    Args:
      obj: ``nnx.Optimizer(model, sophia_g(...), ...)``, a
        ``flax.training.train_state.TrainState`` (or :class:`TrainState`), or
        the optimizer state itself.

    Returns:
      ``{"win_rate", "rho", "hessian_norm", "momentum_norm", "count"}``.
    """
    # A state restored from a checkpoint may hold NumPy arrays: return JAX ones.
    return {k: jnp.asarray(v) for k, v in sj.diagnostics(_opt_state(obj)).items()}


class TrainState(train_state.TrainState):
    """A linen ``TrainState`` whose ``apply_gradients`` feeds SophiaG's Hessian refresh.

    ``flax.training.train_state.TrainState.apply_gradients`` calls
    ``tx.update(grads, opt_state, params)`` with no further arguments and hands
    its keyword arguments to ``.replace()``. This subclass passes the refresh's
    arguments (``logits_fn``, ``logits`` and ``logits_vjp``, ``mask``,
    ``labels``, ``obj_fn``) to ``tx.update`` and the rest to ``.replace()``, as
    before. It is a drop-in: ``TrainState.create(apply_fn=..., params=..., tx=...)``
    and serialization are those of the parent class.
    """

    def apply_gradients(self, *, grads: Any, **kwargs: Any) -> TrainState:
        """Applies one optimizer step; a SophiaG refresh gets its arguments.

        Args:
          grads: gradients with the structure of ``params``.
          **kwargs: the refresh's keyword arguments (``logits_fn=...``,
            ``logits=..., logits_vjp=...``, ``mask=...``; see
            :func:`sophia.jax.sophia_g`) go to ``tx.update``; any other is a
            field to ``.replace()``.

        Returns:
          The new state, with ``step`` incremented.
        """
        extra = {k: kwargs.pop(k) for k in REFRESH_ARGS if k in kwargs}
        owg = train_state.OVERWRITE_WITH_GRADIENT
        grads_opt, params_opt = (
            (grads["params"], self.params["params"])
            if owg in grads
            else (
                grads,
                self.params,
            )
        )
        updates, new_opt_state = self.tx.update(grads_opt, self.opt_state, params_opt, **extra)
        new_params = optax.apply_updates(params_opt, updates)
        if owg in grads:
            new_params = {"params": new_params, owg: grads[owg]}
        return self.replace(
            step=self.step + 1, params=new_params, opt_state=new_opt_state, **kwargs
        )

    def logits_fn(
        self, *args: Any, variables: dict[str, Any] | None = None, **kwargs: Any
    ) -> Callable[[Any], jax.Array]:
        """``p -> apply_fn({"params": p, **variables}, *args, **kwargs)``, for the refresh.

        Args:
          *args: the model's inputs on the current batch.
          variables: other collections the model reads (e.g.
            ``{"batch_stats": state.batch_stats}``); they are held fixed.
          **kwargs: keyword arguments of ``apply_fn`` (e.g. ``train=False``,
            ``rngs=...``).

        Returns:
          ``fn(params) -> logits`` to pass as ``apply_gradients(..., logits_fn=fn)``.
        """
        apply_fn, extra = self.apply_fn, dict(variables or {})

        def fn(p: Any) -> jax.Array:
            out = apply_fn({"params": p, **extra}, *args, **kwargs)
            # With mutable=[...] apply returns (logits, updated collections): the
            # refresh leaves the collections as they are.
            return out[0] if kwargs.get("mutable") and isinstance(out, tuple) else out

        return fn

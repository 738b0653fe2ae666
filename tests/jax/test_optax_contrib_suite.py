"""optax's own contrib-optimizer suite, run against sophia_g and sophia_h.

optax ships the tests every contrib optimizer must pass in its wheel
(``optax/contrib/_common_test.py``): convergence on four objectives, extra
update arguments, no recompilation, ``optax.inject_hyperparams``,
``optax.MultiSteps``, dtype preservation and stability, learning-rate
schedules. The suite picks optimizers by name from a module-level list and
dispatches the extra ``update`` arguments by name; ``optax.contrib.sophia`` is
the entry whose arguments fit ours (``obj_fn=``). So every case the suite runs
for that entry is run here once per registration below, with the suite's own
test body: its undecorated method is rebuilt over a private copy of the suite's
globals in which the optimizer factory is ours. Nothing in optax is modified.
"""

import dataclasses
import functools
import inspect
import types
import unittest
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
import pytest
from optax.contrib import _common_test as suite

import sophia.jax as sj

# The suite's entry whose update arguments (obj_fn=) our transforms take.
_SUITE_ENTRY = "sophia"


def _params_as_logits(params: optax.Params) -> jax.Array:
    """The parameters read as the logits of one categorical distribution."""
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(params)])


@functools.wraps(sj.sophia_g)
def _sophia_g_gnb(*args: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
    """sophia_g with the built-in GNB refresh on, fed the parameters as logits."""
    tx = sj.sophia_g(*args, **kwargs)
    return optax.GradientTransformationExtraArgs(
        tx.init, functools.partial(tx.update, logits_fn=_params_as_logits)
    )


@dataclasses.dataclass(frozen=True)
class _Registration:
    name: str
    factory: Callable[..., optax.GradientTransformation]
    opt_kwargs: dict[str, Any]


# Why each argument differs from the suite's {"learning_rate": 1e-2} for optax's sophia:
_REGISTRATIONS = (
    # Sophia-H is optax.contrib.sophia's algorithm: the same obj_fn, the same
    # refresh every 10 steps. The suite's targets assume contrib's weight decay
    # of 1e-4; our default (the paper's 0.1, decoupled) moves the minimiser of
    # the parabolas by more than the suite's tolerance.
    _Registration("sophia_h", sj.sophia_h, {"learning_rate": 1e-2, "weight_decay": 1e-4}),
    # SophiaG with the built-in refresh off: h stays 0, so every step is
    # lr * sign(m) (signSGD with momentum), the regime SophiaG falls back to
    # where the curvature is unknown. The suite's lr of 1e-2 is sized for
    # contrib's Newton-like steps; sign steps of that size keep circling
    # Rosenbrock's narrow valley about 0.1 from the minimum after 30k steps,
    # beyond the suite's tolerance, and a third of it settles inside.
    _Registration(
        "sophia_g_manual",
        sj.sophia_g,
        {"learning_rate": 3e-3, "weight_decay": 1e-4, "hessian_update_interval": None},
    ),
    # SophiaG with its built-in GNB refresh: GNB needs the logits of a model,
    # which the suite's objectives do not have and the suite cannot pass
    # (it hands over obj_fn only). The parameters themselves serve as the
    # logits of one categorical, so the refresh samples labels and runs the
    # GNB backward under jit, lax.cond, inject_hyperparams, MultiSteps and
    # every dtype of the suite. bs=1: each estimate has one sampled label. That
    # curvature is not the objective's, so most steps are clipped to sign steps,
    # and the learning rate is the one above for the same reason.
    _Registration(
        "sophia_g_gnb",
        _sophia_g_gnb,
        {"learning_rate": 3e-3, "weight_decay": 1e-4, "bs": 1, "hessian_update_interval": 2},
    ),
)


def _suite_cases() -> list[tuple[str, Callable[..., Any], dict[str, Any]]]:
    """Every case the suite runs for its ``sophia`` entry: (id, test body, parameters).

    absl's parameterized expands each test into one method per case, made with
    functools.wraps (so ``__wrapped__`` is the test body) around the case's
    parameters.
    """
    cases = []
    for method in vars(suite.ContribTest).values():
        body = getattr(method, "__wrapped__", None)
        if body is None:
            continue
        params = inspect.getclosurevars(method).nonlocals.get("testcase_params")
        if isinstance(params, dict) and params.get("opt_name") == _SUITE_ENTRY:
            extra = [
                getattr(v, "__name__", str(v))
                for k, v in params.items()
                if k not in ("opt_name", "opt_kwargs", "wrapper_name", "wrapper_kwargs")
            ]
            cases.append(("-".join([body.__name__, *extra]), body, params))
    return cases


_CASES = _suite_cases()


def _with_factory(body: Callable[..., Any], factory: Callable[..., Any]) -> Callable[..., Any]:
    """``body`` over a copy of the suite's globals whose optimizer lookup returns ``factory``."""
    scope = dict(body.__globals__, _get_opt_factory=lambda name: factory)
    return types.FunctionType(
        body.__code__, scope, body.__name__, body.__defaults__, body.__closure__
    )


def test_the_suite_still_has_the_cases_this_module_runs():
    # If optax renames its sophia entry or absl changes how it expands cases,
    # the parametrisation below would silently shrink to nothing.
    names = {body.__name__ for _, body, _ in _CASES}
    assert {
        "test_optimizers",
        "test_optimizers_accept_extra_args",
        "test_optimizers_can_be_wrapped_in_inject_hyperparams",
        "test_preserve_dtype",
        "test_gradient_accumulation",
        "test_state_shape_dtype_shard_stability",
        "test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such",
    } <= names


@pytest.mark.parametrize("reg", _REGISTRATIONS, ids=lambda r: r.name)
@pytest.mark.parametrize("case", _CASES, ids=lambda c: c[0])
def test_optax_contrib_suite(reg: _Registration, case: tuple[str, Callable[..., Any], dict]):
    _, body, params = case
    params = dict(params, opt_kwargs=reg.opt_kwargs)
    try:
        _with_factory(body, reg.factory)(suite.ContribTest(), **params)
    except unittest.SkipTest as e:
        # None of the suite's skip conditions is meant to apply to Sophia (the
        # schedule test skips optimizers whose learning_rate is not annotated
        # as a schedule): a skip here is a failure to meet the suite.
        pytest.fail(f"optax's suite skipped {reg.name}: {e}")

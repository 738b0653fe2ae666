"""SophiaG for JAX: the jit-compiled Optax reference transform.

Example::

    import optax
    import sophia.jax as sj

    tx = sj.sophia_g(3e-4, rho=0.03, weight_decay=0.2, bs=batch_tokens)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params, logits_fn=lambda p: model(p, x))
    params = optax.apply_updates(params, updates)
"""

from sophia.jax.alias import sophia_g, sophia_h
from sophia.jax.diagnostics import diagnostics
from sophia.jax.estimators import (
    gnb,
    gnb_from_vjp,
    gnb_with_label_count,
    hutchinson,
    label_count,
    sample_labels,
)
from sophia.jax.param_dtype import to_param_dtype
from sophia.jax.real_pairs import add_decayed_weights, on_real_pairs, scale_by_learning_rate
from sophia.jax.restore import state_from_raw
from sophia.jax.state import (
    STATE_LAYOUT_VERSION,
    Estimate,
    Estimator,
    LabelCountWarning,
    ScaleBySophiaState,
)
from sophia.jax.transform import scale_by_sophia, update_hessian

__all__ = [
    "Estimate",
    "Estimator",
    "LabelCountWarning",
    "STATE_LAYOUT_VERSION",
    "ScaleBySophiaState",
    "add_decayed_weights",
    "diagnostics",
    "gnb",
    "gnb_from_vjp",
    "gnb_with_label_count",
    "hutchinson",
    "label_count",
    "on_real_pairs",
    "sample_labels",
    "scale_by_learning_rate",
    "scale_by_sophia",
    "sophia_g",
    "sophia_h",
    "state_from_raw",
    "to_param_dtype",
    "update_hessian",
]


def __getattr__(name: str) -> object:
    if name == "StaticFlag":
        raise AttributeError(
            "sophia.jax.StaticFlag was removed: ScaleBySophiaState no longer holds "
            "configuration (step_diagnostics and bs=None live in the transform)"
        )
    raise AttributeError(f"module 'sophia.jax' has no attribute {name!r}")

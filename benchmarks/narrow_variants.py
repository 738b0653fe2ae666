"""What benchmarks/narrow_state.py times and weighs: SophiaG steps in each state form.

The forms (:data:`FORMS`) are float32 ``m`` and ``h`` (the default), bfloat16
``m`` and ``h``, and bfloat16 ``m`` with a block8 ``h``. For each, this module
builds real optimizers over one model table (:mod:`harness.shapes`):

* torch: :class:`sophia.torch.SophiaG` with ``fused=True`` and with
  ``foreach=True`` (sharing one state per form, as step_time_torch.py shares
  one across its variants), a plain step and, for the fused path, a step that
  refreshes first (``update_hessian(hessian=h_hat)``); against
  :class:`torch.optim.AdamW` ``(fused=True)``;
* JAX: jitted :func:`sophia.jax.sophia_g` per form, a plain step and a step
  refreshing through ``update(..., hessian=h_hat)``, on donated buffers
  (:class:`harness.jax_step.Case`); against :func:`optax.adamw`.

A form the installed optimizer does not take yet (an older checkout) is left
out and named in ``missing`` with its error, so the script still runs what
exists.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

from harness import floor, shapes
from harness.shapes import Shapes, n_params

from sophia import narrow

#: The state forms compared: ``(mu_dtype, hessian_dtype)``.
FORMS: dict[str, tuple[str | None, str | None]] = {
    "f32": (None, None),
    "bf16": ("bfloat16", "bfloat16"),
    "bf16_block8": ("bfloat16", "block8"),
}
LR, WD, BS, RHO = 1e-4, 0.1, 5120, 0.04


def model_table(small: bool, tiny: bool) -> Shapes:
    """GPT-2 small's shapes; ``small`` divides them by 4, ``tiny`` keeps only the embeddings
    and the last LayerNorm of that, divided by 4 again."""
    table = shapes.gpt2_small(small or tiny)
    return shapes.shrink(table, 4, layers=0) if tiny else table


def form_kwargs(form: str) -> dict[str, Any]:
    """The optimizer keywords of ``form``; none for float32, so the default builds as ever."""
    mu, h = FORMS[form]
    return {} if mu is None and h is None else {"mu_dtype": mu, "hessian_dtype": h}


def sophia_step_bytes(form: str, n: int) -> int:
    """Bytes a plain SophiaG step must move in ``form``: theta, g, m, h read; theta, m written.

    float32 theta and g (4 bytes each, theta twice); m read and written in its
    form, h read in its form (:func:`sophia.narrow.state_bytes`, block scales
    included; one block list over all coordinates, a slight undercount of the
    partial last blocks of each tensor).
    """
    mu, h = FORMS[form]
    return 3 * 4 * n + 2 * narrow.state_bytes(n, mu, 4) + narrow.state_bytes(n, h, 4)


def floor_ms(form: str, n: int, bytes_per_s: float) -> float:
    """The bandwidth floor of a plain step in ``form`` (:mod:`harness.floor`)."""
    return floor.floor_ms(sophia_step_bytes(form, n), bytes_per_s)


def _quiet() -> None:
    # plain steps without refreshes are the point here, not a misuse to warn about
    warnings.filterwarnings("ignore", module=r"sophia\.torch")


# --------------------------------------------------------------------------- torch


def torch_state_bytes(state: dict[Any, dict[str, Any]], params: list[Any]) -> int:
    """Bytes of every tensor in the per-parameter state of ``params`` (step counters included)."""
    import torch

    total = 0
    for p in params:
        for v in state[p].values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


def torch_tensors(table: Shapes, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """float32 parameters of ``table`` with gradients, and one ``h_hat`` (nonnegative) each."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    params, h_hat = [], []
    for shape in table.values():
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        p.grad = torch.randn(shape, generator=gen) * 1e-2
        params.append(p)
        h_hat.append(torch.rand(shape, generator=gen) * 1e-4)
    return params, h_hat


def torch_sophia(params: list[Any], form: str, **kind: bool) -> Any:
    """:class:`sophia.torch.SophiaG` over ``params`` in ``form`` (``kind``: ``fused=True`` ...)."""
    from sophia.torch import SophiaG

    _quiet()
    return SophiaG(params, lr=LR, rho=RHO, weight_decay=WD, bs=BS, **kind, **form_kwargs(form))


def torch_cases(
    table: Shapes, forms: list[str], seed: int = 0
) -> tuple[dict[str, Callable[[], Any]], dict[str, Any], dict[str, str]]:
    """Torch step callables by variant name, the state bytes per parameter and form, the missing.

    Names: ``torch_fused_<form>``, ``torch_foreach_<form>``,
    ``torch_fused_refresh_<form>``, ``torch_adamw_fused``.
    """
    import torch

    _quiet()
    params, h_hat = torch_tensors(table, seed)
    n = n_params(table)
    calls: dict[str, Callable[[], Any]] = {}
    per_param: dict[str, Any] = {}
    missing: dict[str, str] = {}
    for form in forms:
        state = None  # the fused and foreach optimizers of a form share one state
        for kind in ("fused", "foreach"):
            try:
                opt = torch_sophia(params, form, **{kind: True})
                if state is None:
                    opt.update_hessian(hessian=h_hat)
                    opt.step()  # the state exists, with a refreshed h, before any timing
                    state = opt.state
                    per_param[form] = torch_state_bytes(state, params) / n
            except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:
                missing[f"torch_{kind}_{form}"] = f"{type(e).__name__}: {e}"
                continue
            opt.state = state
            calls[f"torch_{kind}_{form}"] = opt.step
            if kind == "fused":

                def refresh(opt: Any = opt) -> None:
                    opt.update_hessian(hessian=h_hat)
                    opt.step()

                calls[f"torch_fused_refresh_{form}"] = refresh
    adamw = torch.optim.AdamW(params, lr=LR, weight_decay=WD, fused=True)
    adamw.step()
    per_param["adamw"] = torch_state_bytes(adamw.state, params) / n
    calls["torch_adamw_fused"] = adamw.step
    return calls, per_param, missing


def torch_kernels(n: int) -> dict[str, tuple[Callable[[], Any], int]]:
    """Streaming kernels for the floor: ``name -> (call, bytes per call)`` on N float32."""
    import torch

    a, b, c = torch.full((n,), 1.0), torch.full((n,), 0.5), torch.full((n,), 0.25)
    return {
        "bw_copy": (lambda: a.copy_(b), 2 * 4 * n),
        "bw_triad": (lambda: torch.add(b, c, alpha=0.999, out=a), 3 * 4 * n),
    }


# --------------------------------------------------------------------------- JAX


def jax_all_bytes(state: Any) -> int:
    """Bytes of every array leaf of an optimizer state (block8's codes and scales are leaves)."""
    import jax

    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))


def jax_cases(
    table: Shapes, forms: list[str], seed: int = 0
) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """Jitted JAX steps by variant name, the state bytes per parameter and form, the missing.

    Names: ``jax_<form>``, ``jax_refresh_<form>``, ``jax_adamw``. One pool of
    parameters, gradients and ``h_hat`` for all; each form its own state.
    """
    import jax
    import optax
    from harness.jax_step import Case, optimizer_step, random_trees

    import sophia.jax as sj

    n = n_params(table)
    trees = random_trees(table, (0.02, 1e-2, 1e-4), nonnegative=(False, False, True), seed=seed)
    pool: dict[str, Any] = dict(zip(("params", "grads", "h_hat"), trees))
    del trees
    cases: dict[str, Any] = {}
    per_param: dict[str, Any] = {}
    missing: dict[str, str] = {}
    for form in forms:
        key = f"state_{form}"
        try:
            tx = sj.sophia_g(
                LR, rho=RHO, weight_decay=WD, bs=BS, hessian_update_interval=None,
                **form_kwargs(form),
            )  # fmt: skip

            def first(p: Any, g: Any, h: Any, tx: Any = tx) -> Any:
                return tx.update(g, tx.init(p), p, hessian=h)[1]

            pool[key] = jax.jit(first)(pool["params"], pool["grads"], pool["h_hat"])
        except (TypeError, ValueError, NotImplementedError) as e:
            missing[f"jax_{form}"] = f"{type(e).__name__}: {e}"
            continue
        per_param[form] = jax_all_bytes(pool[key]) / n
        args = ["params", key, "grads"]
        cases[f"jax_{form}"] = Case(f"jax_{form}", optimizer_step(tx), pool, args, args[:2])

        def refresh(p: Any, s: Any, g: Any, h: Any, tx: Any = tx) -> tuple[Any, Any]:
            return optimizer_step(tx, hessian=h)(p, s, g)

        name = f"jax_refresh_{form}"
        cases[name] = Case(name, refresh, pool, [*args, "h_hat"], args[:2])
    tx_a = optax.adamw(LR, weight_decay=WD)
    pool["adamw_state"] = tx_a.init(pool["params"])
    per_param["adamw"] = jax_all_bytes(pool["adamw_state"]) / n
    args = ["params", "adamw_state", "grads"]
    cases["jax_adamw"] = Case("jax_adamw", optimizer_step(tx_a), pool, args, args[:2])
    return cases, per_param, missing

r"""``SophiaG`` as a ``torch.optim.Optimizer``, following :mod:`sophia.spec`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from sophia import spec
from sophia.torch import estimators
from sophia.torch.functional import DTensor, compute_dtype, hessian_ema, sophia_g

__all__ = ["SophiaG"]

_D = spec.DEFAULTS
_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
#: Keys of the per-group runtime state kept in ``param_group["sophia_state"]``.
_GROUP_STATE_KEYS = ("step", "rho", "win_rate")


def _real_numel(p: Tensor) -> int:
    return p.numel() * (2 if torch.is_complex(p) else 1)


def _group_scalar_dtype(params: Sequence[Tensor]) -> torch.dtype:
    """float64 if any parameter of the group is float64/complex128, else float32 (as in JAX)."""
    wide = any(p.dtype in (torch.float64, torch.complex128) for p in params)
    return torch.float64 if wide else torch.float32


class SophiaG(Optimizer):
    r"""SophiaG (Liu et al. 2023): clipped, diagonal-Gauss-Newton-preconditioned momentum.

    .. math::

       m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
       \theta_t &= \theta_{t-1} - \eta \left(\operatorname{sign}(m_t)
         \min\!\left(\frac{|m_t|}{\rho\, bs\, \max(h_t,0) + \epsilon}, 1\right)
         + \lambda \theta_{t-1}\right)

    with :math:`h \leftarrow \beta_2 h + (1-\beta_2)\hat h` on each
    :meth:`update_hessian`. Arithmetic, validation and the dynamic-rho rule
    are those of :mod:`sophia.spec`; results are bit-identical to
    :func:`sophia.spec.sophia_update` on every implementation (for-loop,
    foreach, fused).

    Typical loop (the paper's recipe, a Hessian refresh every ``k`` steps)::

        opt = SophiaG(model.parameters(), lr=3e-4, rho=0.03, bs=tokens_per_batch)
        for it, (x, y) in enumerate(loader):
            logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, -2), y.flatten())
            if it % k == k - 1:
                opt.update_hessian(logits=logits)  # GNB from this forward, .grad untouched
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    Args:
      params: iterable of parameters or of param-group dicts (each group may
        set its own ``lr``, ``betas``, ``rho``, ``weight_decay``, ``bs``,
        ``eps``, ``maximize``, ``dynamic``).
      lr: learning rate :math:`\eta`; a float or a 1-element tensor.
      betas: ``(b1, b2)``, EMA rates of the momentum and of the Hessian.
      rho: clipping scale :math:`\rho` (the paper's :math:`\gamma`).
      weight_decay: decoupled weight decay :math:`\lambda`.
      maximize: ascend the objective instead of descending it.
      capturable: keep the step counters on the parameters' device, as torch's
        capturable optimizers do (no path here synchronises with the host).
      dynamic: adapt each group's ``rho`` at every Hessian refresh to keep the
        win rate in :data:`sophia.spec.WIN_RATE_BAND`.
      bs: number of labels behind each Hessian estimate (tokens per batch for
        a language model); the denominator is ``rho * bs * h``.
      eps: added to the denominator; floored at the compute dtype's smallest
        normal number.
      foreach: use the ``torch._foreach_*`` implementation (default: torch's
        choice, i.e. on CUDA).
      fused: use the single-pass kernel: on CPU a native C++ kernel, built
        on first use (a C++ compiler and ninja needed; without them, or with
        ``SOPHIA_TORCH_NATIVE=0``, the compiled kernel below), on CUDA/XPU
        a ``torch.compile``-d kernel compiled once per dtype and cached.

    State: per parameter ``step``, ``exp_avg`` and ``hessian`` (the paper's
    reference layout, whose state dicts load here); per group
    ``param_group["sophia_state"]`` holds the current ``rho``, the last win
    rate and a step counter as tensors.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = _D.lr,
        betas: tuple[float, float] = _D.betas,
        rho: float | Tensor = _D.rho,
        weight_decay: float = _D.weight_decay,
        *,
        maximize: bool = False,
        capturable: bool = False,
        dynamic: bool = False,
        bs: float | None = _D.bs,
        eps: float = _D.eps,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        _validate(
            lr=lr,
            betas=betas,
            rho=rho,
            weight_decay=weight_decay,
            eps=eps,
            bs=bs,
            maximize=maximize,
            dynamic=dynamic,
        )
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "rho": rho,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "capturable": capturable,
            "dynamic": dynamic,
            "bs": bs,
            "eps": eps,
            "foreach": foreach,
            "fused": fused,
        }
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups and state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a param group, validating its hyperparameters with :func:`sophia.spec.validate`.

        Args:
          param_group: the group; missing hyperparameters come from the defaults.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_group(group)
        if group["fused"] and group["foreach"]:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if "sophia_state" not in group:
            group["sophia_state"] = self._new_group_state(group)

    @staticmethod
    def _new_group_state(group: dict[str, Any], step: float = 0.0) -> dict[str, Tensor]:
        params = group["params"]
        sd = _group_scalar_dtype(params)
        device = params[0].device if params else torch.device("cpu")
        rho = group["rho"]
        rho_t = (
            rho.detach().to(device=device, dtype=sd).reshape(()).clone()
            if isinstance(rho, Tensor)
            else torch.full((), float(_NP_DTYPES[sd](rho)), dtype=sd, device=device)
        )
        return {
            "step": torch.full((), float(step), dtype=torch.float32, device=device),
            "rho": rho_t,
            # unknown until a step is taken; a NaN rate never moves a dynamic rho
            "win_rate": torch.full((), float("nan") if step else 0.0, dtype=sd, device=device),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                step = p_state.get("step")
                if step is None and len(p_state) > 0:
                    step = 0.0
                if step is not None and not (torch.is_tensor(step) and step.dim() == 0):
                    # the paper's code keeps a shape-(1,) step when capturable
                    on_device = group["capturable"] or group["fused"]
                    p_state["step"] = torch.tensor(
                        float(step.reshape(-1)[0]) if torch.is_tensor(step) else float(step),
                        dtype=torch.float32,
                        device=p.device if on_device else "cpu",
                    )
                if len(p_state) > 0 and "hessian" not in p_state:
                    p_state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            gs = group.get("sophia_state")
            if gs is None or any(k not in gs for k in _GROUP_STATE_KEYS):
                steps = [
                    float(self.state[p]["step"])
                    for p in group["params"]
                    if p in self.state and "step" in self.state[p]
                ]
                group["sophia_state"] = self._new_group_state(group, max(steps, default=0.0))
            elif group["params"]:
                device = group["params"][0].device
                group["sophia_state"] = {k: v.to(device) for k, v in gs.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict saved by this class or by the paper's reference ``SophiaG``.

        Raises ``ValueError`` naming the first parameter whose saved ``exp_avg``
        or ``hessian`` does not have the parameter's shape (a state dict of
        different parameters) before anything is changed.

        Args:
          state_dict: as returned by :meth:`state_dict`.
        """
        saved_groups = state_dict.get("param_groups", [])
        ids = [i for g in saved_groups for i in g.get("params", [])]
        params = [
            (gi, pi, p)
            for gi, g in enumerate(self.param_groups)
            for pi, p in enumerate(g["params"])
        ]
        if len(saved_groups) == len(self.param_groups) and len(ids) == len(params):
            for saved_id, (gi, pi, p) in zip(ids, params):
                for key in ("exp_avg", "hessian"):
                    value = state_dict.get("state", {}).get(saved_id, {}).get(key)
                    if torch.is_tensor(value) and value.shape != p.shape:
                        raise ValueError(
                            f"SophiaG.load_state_dict: the saved {key!r} of parameter {pi} in "
                            f"param group {gi} has shape {tuple(value.shape)} but the parameter "
                            f"has shape {tuple(p.shape)}; this state dict belongs to different "
                            "parameters"
                        )
        super().load_state_dict(state_dict)

    def _param_name(self, group: dict[str, Any], index: int) -> str:
        gi = next(i for i, g in enumerate(self.param_groups) if g is group)
        names = group.get("param_names")
        where = f"parameter {index} of param group {gi}"
        return f"{names[index]!r} ({where})" if names else where

    def _init_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if "step" not in state:
            on_device = group["capturable"] or group["fused"]
            state["step"] = torch.zeros(
                (), dtype=torch.float32, device=p.device if on_device else "cpu"
            )
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if "hessian" not in state:
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        hessians: list[Tensor],
        state_steps: list[Tensor],
    ) -> bool:
        has_complex = False
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"SophiaG does not support sparse gradients; {self._param_name(group, i)} "
                    "has one"
                )
            if group["fused"] and not (
                p.device.type in ("cpu", "cuda", "xpu")
                and (torch.is_floating_point(p) or torch.is_complex(p))
            ):
                raise RuntimeError(
                    "SophiaG fused=True needs floating-point parameters on cpu/cuda/xpu, got "
                    f"{p.dtype} on {p.device.type} for {self._param_name(group, i)}"
                )
            has_complex |= torch.is_complex(p)
            state = self._init_state(group, p)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            hessians.append(state["hessian"])
            state_steps.append(state["step"])
        return has_complex

    # ------------------------------------------------------------------ step

    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None, bs: float | Tensor | None = None
    ) -> Any:
        """Performs one optimisation step.

        Args:
          closure: re-evaluates the model and returns the loss (run with grad
            enabled, as in torch's optimizers).
          bs: overrides every group's ``bs`` for this step, as the reference
            code's ``step(bs=...)`` does.

        Returns:
          The closure's loss, or ``None``.
        """
        if bs is not None and not torch.compiler.is_compiling():
            spec.validate(bs=bs)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._step(bs)
        return loss

    def _step(self, bs: float | Tensor | None) -> None:
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            hessians: list[Tensor] = []
            state_steps: list[Tensor] = []
            has_complex = self._init_group(group, params, grads, exp_avgs, hessians, state_steps)
            if not params:
                continue
            gs = group["sophia_state"]
            n_win = sophia_g(
                params,
                grads,
                exp_avgs,
                hessians,
                state_steps,
                foreach=group["foreach"],
                capturable=group["capturable"],
                fused=group["fused"],
                has_complex=has_complex,
                lr=group["lr"],
                beta1=group["betas"][0],
                rho=gs["rho"] if group["dynamic"] else group["rho"],
                bs=_effective_bs(group, bs),
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
            )
            sd = gs["win_rate"].dtype
            n_total = sum(_real_numel(p) for p in params)
            total = torch.full((), float(max(n_total, 1)), dtype=sd, device=gs["win_rate"].device)
            # a true division by a device tensor: a CPU scalar divisor may become a reciprocal
            gs["win_rate"].copy_(n_win.to(device=total.device, dtype=sd) / total)
            gs["step"].add_(1)

    # ------------------------------------------------------------------ Hessian

    @torch.no_grad()
    def update_hessian(
        self,
        *,
        logits: Tensor | None = None,
        hessian: Sequence[Tensor | None] | None = None,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        r"""Refreshes the Hessian EMA :math:`h \leftarrow \beta_2 h + (1-\beta_2)\hat h`.

        Three forms:

        * ``update_hessian()``: the reference code's behaviour, :math:`\hat h =`
          ``p.grad ** 2`` for every parameter with a gradient; call it after a
          backward of the loss against labels sampled from the model.
        * ``update_hessian(logits=logits)``: the whole GNB refresh in one call:
          samples labels from ``softmax(logits)``, takes the gradient of the
          mean cross-entropy with :func:`torch.autograd.grad` (``.grad`` is left
          untouched and the graph retained, so the training loss can still be
          backpropagated through the same forward) and squares it. Under
          ``torch.distributed`` the sampled-label gradient is averaged over
          ranks before squaring, as DDP's all-reduce would have done in the
          reference recipe, so every rank gets the same Hessian and ``bs`` is
          the global label count.
        * ``update_hessian(hessian=[...])``: an estimate computed elsewhere (e.g.
          :func:`sophia.torch.hutchinson`), one tensor (or ``None`` to skip) per
          parameter in ``param_groups`` order.

        With ``dynamic=True`` each group then applies the spec's dynamic-rho
        rule (once at least one step has been taken). No host synchronisation.

        Args:
          logits: ``[..., vocab]`` logits of the current batch, attached to
            the graph of the parameters.
          hessian: per-parameter estimates.
          labels: with ``logits``, labels to use instead of sampling.
          generator: with ``logits``, the generator of the label sampling.
        """
        if logits is not None and hessian is not None:
            raise ValueError("update_hessian: pass logits=... or hessian=..., not both")
        if logits is None and (labels is not None or generator is not None):
            raise ValueError("update_hessian: labels=/generator= only apply with logits=...")
        all_params = [p for g in self.param_groups for p in g["params"]]
        if hessian is not None:
            estimates = list(hessian)
            if len(estimates) != len(all_params):
                raise ValueError(
                    f"update_hessian: got {len(estimates)} estimates for {len(all_params)} "
                    "parameters (pass one tensor or None per parameter, in param_groups order)"
                )
        elif logits is not None:
            wanted = [p for p in all_params if p.requires_grad]
            with torch.enable_grad():
                h_hats = estimators.gnb(logits, wanted, labels=labels, generator=generator)
            by_id = {id(p): h for p, h in zip(wanted, h_hats)}
            estimates = [by_id.get(id(p)) for p in all_params]
        else:
            estimates = [
                None if p.grad is None else _grad_squared(p.grad, self._param_name(g, i))
                for g in self.param_groups
                for i, p in enumerate(g["params"])
            ]
        k = 0
        for group in self.param_groups:
            hs, es = [], []
            for p in group["params"]:
                e = estimates[k]
                k += 1
                if e is None:
                    continue
                hs.append(self._init_state(group, p)["hessian"])
                es.append(e)
            if hs:
                hessian_ema(hs, es, beta2=group["betas"][1], foreach=group["foreach"])
            if group["dynamic"]:
                _dynamic_rho(group)

    # ------------------------------------------------------------------ diagnostics

    @torch.no_grad()
    def diagnostics(self) -> list[dict[str, Tensor]]:
        """The paper's diagnostics per param group, as tensors (no host synchronisation).

        Keys mirror :func:`sophia.jax.diagnostics`: ``win_rate`` (fraction of
        coordinates with ``r < 1`` in the group's last step), ``rho`` (the
        current value), ``hessian_norm`` and ``momentum_norm`` (L2 norms of the
        group's ``hessian`` and ``exp_avg`` states) and ``count`` (steps taken).

        Returns:
          One dict per param group.
        """
        out = []
        for group in self.param_groups:
            gs = group["sophia_state"]
            sd = gs["win_rate"].dtype
            device = gs["win_rate"].device
            rho = gs["rho"] if group["dynamic"] else _scalar_tensor(group["rho"], sd, device)
            norms = {"hessian": [], "exp_avg": []}
            for p in group["params"]:
                st = self.state.get(p, {})
                for key in norms:
                    if key in st:
                        x = st[key]
                        x = torch.view_as_real(x) if torch.is_complex(x) else x
                        n = torch.linalg.vector_norm(x, dtype=sd)
                        if DTensor is not None and isinstance(n, DTensor):
                            n = n.full_tensor()  # every rank reports the global norm
                        norms[key].append(n.to(device))
            out.append(
                {
                    "win_rate": gs["win_rate"].clone(),
                    "rho": rho.clone(),
                    "hessian_norm": _combine_norms(norms["hessian"], sd, device),
                    "momentum_norm": _combine_norms(norms["exp_avg"], sd, device),
                    "count": gs["step"].clone(),
                }
            )
        return out


def _effective_bs(group: dict[str, Any], bs: float | Tensor | None) -> float | Tensor:
    if bs is not None:
        return bs
    return spec.REFERENCE_BS if group["bs"] is None else group["bs"]


def _combine_norms(norms: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    if not norms:
        return torch.zeros((), dtype=dtype, device=device)
    return torch.linalg.vector_norm(torch.stack(norms))


def _scalar_tensor(x: float | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to(device=device, dtype=dtype).reshape(())
    return torch.full((), float(_NP_DTYPES[dtype](x)), dtype=dtype, device=device)


def _grad_squared(grad: Tensor, name: str) -> Tensor:
    if grad.is_sparse:
        raise RuntimeError(f"SophiaG does not support sparse gradients; {name} has one")
    g = torch.view_as_real(grad) if torch.is_complex(grad) else grad
    g = g.to(compute_dtype(g.dtype))
    return g * g


def _dynamic_rho(group: dict[str, Any]) -> None:
    """The spec's dynamic-rho rule on one group, with tensor ops only (no host sync)."""
    n_total = sum(_real_numel(p) for p in group["params"])
    if n_total == 0:
        return
    gs = group["sophia_state"]
    rho = gs["rho"]
    sd, device = rho.dtype, rho.device
    c = _NP_DTYPES[sd]
    rho0 = _scalar_tensor(group["rho"], sd, device)
    span = torch.full((), float(c(spec.DYNAMIC_RANGE)), dtype=sd, device=device)
    factor = torch.full((), float(c(spec.DYNAMIC_FACTOR)), dtype=sd, device=device)
    up = torch.minimum(rho * factor, rho0 * span)
    down = torch.maximum(rho / factor, rho0 / span)
    rate = gs["win_rate"]
    lo, hi = (float(c(b)) for b in spec.WIN_RATE_BAND)
    moved = torch.where(rate < lo, up, torch.where(rate > hi, down, rho))
    rho.copy_(torch.where(gs["step"] > 0, moved, rho))


def _validate(**kwargs: Any) -> None:
    """:func:`sophia.spec.validate`, plus: a tensor ``lr`` or ``rho`` has one element."""
    for name in ("lr", "rho"):
        value = kwargs.get(name)
        if isinstance(value, Tensor) and value.numel() != 1:
            raise ValueError(
                f"Invalid {name}: a tensor of shape {tuple(value.shape)} (allowed: a number "
                "or a 1-element tensor)"
            )
    if torch.compiler.is_compiling():
        return
    spec.validate(**kwargs)


def _validate_group(group: dict[str, Any]) -> None:
    _validate(
        lr=group["lr"],
        betas=group["betas"],
        rho=group["rho"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        bs=group["bs"],
        maximize=group["maximize"],
        dynamic=group["dynamic"],
    )

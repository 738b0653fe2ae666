r"""``SophiaG`` as a ``torch.optim.Optimizer``, following :mod:`sophia.spec`."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from sophia import spec
from sophia.torch import estimators
from sophia.torch._dtensor import is_dtensor
from sophia.torch._scalars import compute_dtype
from sophia.torch.functional import hessian_ema, sophia_g

__all__ = [
    "HessianNotRefreshedWarning",
    "LabelCountWarning",
    "RepeatedRefreshWarning",
    "SophiaG",
    "SophiaGWarning",
]

_D = spec.DEFAULTS
_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
#: Per-group tensors, kept in the state of the group's first parameter (as torch's LBFGS
#: keeps its optimizer-wide tensors), so that ``load_state_dict``, ``Module.to`` with
#: swapped parameters and distributed checkpoints move them with the parameters.
_STEP, _RHO, _WIN, _COUNT = "group_step", "group_rho", "group_win_rate", "group_label_count"
_GROUP_KEYS = (_STEP, _RHO, _WIN, _COUNT)
#: Keys of the old layout's ``param_group["sophia_state"]`` (state dicts saved before the
#: group tensors moved into ``state``), and where they live now.
_OLD_GROUP_KEYS = {"step": _STEP, "rho": _RHO, "win_rate": _WIN}
#: Per-parameter keys (the paper's reference layout).
_PARAM_KEYS = ("step", "exp_avg", "hessian")
#: ``step()`` warns once when this many steps ran without any Hessian refresh: twice the
#: default refresh interval, so a loop that refreshes every k <= 20 steps never sees it.
_NO_REFRESH_STEPS = 2 * (_D.hessian_update_interval or 10)
_FREED_GRAPH = "backward through the graph a second time"
_INTEGRATIONS = (
    "sophia.integrations.transformers.SophiaGCallback (Hugging Face Trainer) or "
    "sophia.integrations.lightning.SophiaGCallback (Lightning)"
)


class SophiaGWarning(UserWarning):
    """Base class of :class:`SophiaG`'s warnings about uses that quietly change its update."""


class HessianNotRefreshedWarning(SophiaGWarning):
    """Many steps ran without a Hessian refresh: the update is sign momentum, not SophiaG."""


class RepeatedRefreshWarning(SophiaGWarning):
    """A second Hessian refresh before the next step (e.g. per micro-batch) was skipped."""


class LabelCountWarning(SophiaGWarning):
    """``bs`` does not match the number of labels behind the Hessian estimate."""


def _real_view(x: Tensor) -> Tensor:
    return torch.view_as_real(x) if torch.is_complex(x) else x


def _real_numel(p: Tensor) -> int:
    return p.numel() * (2 if torch.is_complex(p) else 1)


def _group_scalar_dtype(params: Sequence[Tensor]) -> torch.dtype:
    """float64 if any parameter of the group is float64/complex128, else float32 (as in JAX)."""
    wide = any(p.dtype in (torch.float64, torch.complex128) for p in params)
    return torch.float64 if wide else torch.float32


def _has_param_state(p_state: dict[str, Any]) -> bool:
    return any(k in p_state for k in _PARAM_KEYS)


def _step_device(group: dict[str, Any], p: Tensor) -> torch.device:
    """Where step counters live: on the parameter's device when capturable or fused.

    Otherwise on the CPU, torch's convention for ``state["step"]``: reading it costs
    no synchronisation.
    """
    return p.device if group["capturable"] or group["fused"] else torch.device("cpu")


def _group_tensor(key: str, value: Tensor, group: dict[str, Any], host: Tensor) -> Tensor:
    """A group tensor in its own dtype and on its device.

    ``load_state_dict`` casts floating state to the parameter's dtype; rho and the
    win rate must stay float32/float64, the label count an integer.
    """
    if key == _STEP:
        return value.detach().to(device=_step_device(group, host), dtype=torch.float32)
    if key == _COUNT:
        return value.detach().to(device=host.device, dtype=torch.int64).reshape(())
    sd = _group_scalar_dtype(group["params"])
    return value.detach().to(device=host.device, dtype=sd).reshape(())


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

    Typical loop (the paper's recipe): the Hessian is refreshed at the start of
    every step ``t`` with ``t % k == 0`` (steps 0, k, 2k, ...), from the
    parameters before that step's update, after the forward and before the
    training backward::

        opt = SophiaG(model.parameters(), lr=3e-4, rho=0.03)
        for step, (x, y) in enumerate(loader):
            logits = model(x)
            if step % k == 0:
                opt.update_hessian(logits=logits)  # GNB from this forward, .grad untouched
            loss = F.cross_entropy(logits.flatten(0, -2), y.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    A trainer that calls only ``step()`` never refreshes the Hessian, and SophiaG
    is then sign momentum: after a few such steps it warns
    (:class:`HessianNotRefreshedWarning`). With the Hugging Face ``Trainer`` or
    Lightning use their SophiaG callbacks (``sophia.integrations``).

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
        a language model); the denominator is ``rho * bs * h``. ``None`` (the
        default): the label count of the latest ``update_hessian(logits=...)``
        (the masked-in positions, summed over ranks), or
        :data:`sophia.spec.REFERENCE_BS` before any such refresh (with a
        warning when a refresh gives no count).
      eps: added to the denominator; floored at the compute dtype's smallest
        normal number.
      foreach: use the ``torch._foreach_*`` implementation (default: torch's
        choice, i.e. on CUDA).
      fused: use the single-pass kernel: on CPU a native C++ kernel, built
        on first use (a C++ compiler and ninja needed; without them, or with
        ``SOPHIA_TORCH_NATIVE=0``, the compiled kernel below), on CUDA/XPU
        a ``torch.compile``-d kernel compiled once per dtype and cached.

    State: per parameter ``step``, ``exp_avg`` and ``hessian`` (the paper's
    reference layout, whose state dicts load here); per group, in the state of
    its first parameter, ``group_step`` (steps taken), ``group_rho`` (the
    current rho), ``group_win_rate`` (of the last step) and, once a GNB
    refresh has run, ``group_label_count`` (its label count), all 0-dim
    tensors created at the group's first step or refresh on that parameter's
    device (``group_step`` on the CPU unless ``capturable`` or ``fused``).
    State dicts of the earlier layout (``param_group["sophia_state"]``) load too.
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
        bs: float | Tensor | None = _D.bs,
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
        self._init_bookkeeping()

    def _init_bookkeeping(self) -> None:
        """Host-side counters of the misuse checks (plain Python: no synchronisation)."""
        d = self.__dict__
        d.setdefault("_steps_without_refresh", 0)
        d.setdefault("_ever_refreshed", False)
        d.setdefault("_last_refresh_steps", None)
        d.setdefault("_warned", set())
        d.setdefault("_count_checked", False)

    def _warn_once(self, key: str, category: type[Warning], message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, category, stacklevel=5)  # the caller of step/update_hessian

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

    def _group_state(self, group: dict[str, Any]) -> dict[str, Any] | None:
        """The state holding ``group``'s tensors (its first parameter's), created on first use.

        ``None`` for a group without parameters.
        """
        if not group["params"]:
            return None
        host = group["params"][0]
        st = self.state[host]
        if _RHO not in st:
            sd = _group_scalar_dtype(group["params"])
            st[_STEP] = torch.zeros((), dtype=torch.float32, device=_step_device(group, host))
            st[_RHO] = _scalar_tensor(group["rho"], sd, host.device).clone()
            st[_WIN] = torch.zeros((), dtype=sd, device=host.device)
        return st

    def __setstate__(self, state: dict[str, Any]) -> None:
        had_differentiable = "differentiable" in state.get(
            "defaults", self.__dict__.get("defaults", {})
        )
        super().__setstate__(state)
        if not had_differentiable:
            # torch adds it for its own optimizers; here it would be a hyperparameter that
            # changes nothing, and it made a state-dict round trip add keys to every group
            self.defaults.pop("differentiable", None)
        self._init_bookkeeping()
        for group in self.param_groups:
            old = group.pop("sophia_state", None)
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            for p in group["params"]:
                self._upgrade_param_state(group, p)
            self._upgrade_group_state(group, old)

    def _upgrade_param_state(self, group: dict[str, Any], p: Tensor) -> None:
        """The paper's reference layout: a shape-(1,) step, or no ``hessian`` yet."""
        p_state = self.state.get(p)
        if not p_state or not _has_param_state(p_state):
            return
        step = p_state.get("step", 0.0)
        if not (torch.is_tensor(step) and step.dim() == 0):
            # the paper's code keeps a shape-(1,) step when capturable
            value = float(step.reshape(-1)[0]) if torch.is_tensor(step) else float(step)
            p_state["step"] = torch.tensor(
                value, dtype=torch.float32, device=_step_device(group, p)
            )
        if "hessian" not in p_state:
            p_state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _upgrade_group_state(self, group: dict[str, Any], old: dict[str, Tensor] | None) -> None:
        """Group tensors from the earlier layout, or rebuilt for the reference layout."""
        if not group["params"]:
            return
        host = group["params"][0]
        if _RHO in self.state.get(host, {}):
            return
        if old is not None and all(k in old for k in _OLD_GROUP_KEYS):
            st = self.state[host]
            for old_key, key in _OLD_GROUP_KEYS.items():
                st[key] = _group_tensor(key, old[old_key], group, host)
            return
        steps = [
            float(self.state[p]["step"])
            for p in group["params"]
            if p in self.state and "step" in self.state[p]
        ]
        if steps:  # the reference layout: counters from the parameters, rate unknown
            st = self._group_state(group)
            assert st is not None
            st[_STEP].fill_(max(steps))
            st[_WIN].fill_(float("nan"))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict saved by this class (either layout) or by the paper's ``SophiaG``.

        Raises ``ValueError`` naming the first parameter whose saved ``exp_avg``
        or ``hessian`` does not have the parameter's shape (a state dict of
        different parameters) before anything is changed.

        Args:
          state_dict: as returned by :meth:`state_dict`.
        """
        saved_groups = state_dict.get("param_groups", [])
        saved_state = state_dict.get("state", {})
        ids = [i for g in saved_groups for i in g.get("params", [])]
        params = [
            (gi, pi, p)
            for gi, g in enumerate(self.param_groups)
            for pi, p in enumerate(g["params"])
        ]
        if len(saved_groups) == len(self.param_groups) and len(ids) == len(params):
            for saved_id, (gi, pi, p) in zip(ids, params):
                for key in ("exp_avg", "hessian"):
                    value = saved_state.get(saved_id, {}).get(key)
                    if torch.is_tensor(value) and value.shape != p.shape:
                        raise ValueError(
                            f"SophiaG.load_state_dict: the saved {key!r} of parameter {pi} in "
                            f"param group {gi} has shape {tuple(value.shape)} but the parameter "
                            f"has shape {tuple(p.shape)}; this state dict belongs to different "
                            "parameters"
                        )
        super().load_state_dict(state_dict)
        # torch cast every floating tensor of the state to its parameter's dtype: the group
        # tensors get theirs back from the saved values (rho of a bfloat16 group is float32)
        for group, saved in zip(self.param_groups, saved_groups):
            if not group["params"] or not saved.get("params"):
                continue
            host = group["params"][0]
            saved_host = saved_state.get(saved["params"][0], {})
            st = self.state.get(host, {})
            for key in _GROUP_KEYS:
                if key in saved_host and torch.is_tensor(saved_host[key]):
                    st[key] = _group_tensor(key, saved_host[key], group, host)
        self._last_refresh_steps = None

    def _param_name(self, group: dict[str, Any], index: int) -> str:
        gi = next(i for i, g in enumerate(self.param_groups) if g is group)
        names = group.get("param_names")
        where = f"parameter {index} of param group {gi}"
        return f"{names[index]!r} ({where})" if names else where

    def _init_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=_step_device(group, p))
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
        if not torch.compiler.is_compiling():
            if bs is not None:
                spec.validate(bs=bs)
            self._count_step()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._step(bs)
        return loss

    def _count_step(self) -> None:
        """Warns once when steps keep coming and the Hessian was never refreshed.

        Eager steps only: a compiled step cannot update host counters.
        """
        self._steps_without_refresh += 1
        if not self._ever_refreshed and self._steps_without_refresh >= _NO_REFRESH_STEPS:
            self._warn_once(
                "no_refresh",
                HessianNotRefreshedWarning,
                f"SophiaG: {self._steps_without_refresh} steps and no Hessian refresh: with "
                "h = 0 (or a stale h) every step is the sign of the momentum, not SophiaG. "
                "Call opt.update_hessian(logits=logits) every k steps (if step % k == 0, "
                "after the forward and before loss.backward()), or, with a trainer, use "
                f"{_INTEGRATIONS}",
            )

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
            gs = self._group_state(group)
            assert gs is not None
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
                rho=gs[_RHO] if group["dynamic"] else group["rho"],
                bs=_effective_bs(group, gs, bs),
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
            )
            win = gs[_WIN]
            n_total = sum(_real_numel(p) for p in params)
            total = torch.full((), float(max(n_total, 1)), dtype=win.dtype, device=win.device)
            # a true division by a device tensor: a CPU scalar divisor may become a reciprocal
            win.copy_(n_win.to(device=total.device, dtype=win.dtype) / total)
            gs[_STEP].add_(1)

    # ------------------------------------------------------------------ Hessian

    @torch.no_grad()
    def update_hessian(
        self,
        *,
        logits: Tensor | None = None,
        hessian: Sequence[Tensor | None] | None = None,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
        mask: Tensor | None = None,
        allow_repeat: bool = False,
    ) -> None:
        r"""Refreshes the Hessian EMA :math:`h \leftarrow \beta_2 h + (1-\beta_2)\hat h`.

        Call it at the start of every step ``t`` with ``t % k == 0``, after the
        forward and before ``loss.backward()`` and :meth:`step` (see the class
        docstring). Three forms:

        * ``update_hessian(logits=logits)``: the whole GNB refresh in one call:
          samples labels from ``softmax(logits)`` (at the positions ``mask``
          keeps), takes the gradient of their mean cross-entropy with
          :func:`torch.autograd.grad` (``.grad`` is left untouched and the graph
          retained, so the training loss can still be backpropagated through
          the same forward) and squares it. The label count becomes ``bs``
          where ``bs=None``. Under ``torch.distributed`` the sampled-label
          gradient is averaged over ranks before squaring, as DDP's all-reduce
          would have done in the reference recipe, so every rank gets the same
          Hessian and the count is the global one.
        * ``update_hessian()``: the reference code's behaviour, :math:`\hat h =`
          ``p.grad ** 2`` for every parameter with a gradient; call it after a
          backward of the loss against labels sampled from the model.
        * ``update_hessian(hessian=[...])``: an estimate computed elsewhere (e.g.
          :func:`sophia.torch.hutchinson`, for which ``bs=1``), one tensor (or
          ``None`` to skip) per parameter in ``param_groups`` order.

        The last two give no label count: with ``bs=None`` the step then uses
        :data:`sophia.spec.REFERENCE_BS` (warned once). A second refresh before
        the next :meth:`step` (e.g. one per gradient-accumulation micro-batch)
        is skipped with a warning unless ``allow_repeat=True``: it would refresh
        ``h`` more often than every ``k`` steps. With ``dynamic=True`` each group
        then applies the spec's dynamic-rho rule (once at least one step has
        been taken). No host synchronisation, except one per refresh to read the
        step counters when ``capturable`` or ``fused`` keeps them on an
        accelerator (``allow_repeat=True`` skips it), one to select the rows of
        a ``mask``, and one at the first GNB refresh when ``bs`` is a number.

        Args:
          logits: ``[..., vocab]`` logits of the current batch, attached to
            the graph of the parameters.
          hessian: per-parameter estimates.
          labels: with ``logits``, labels to use instead of sampling.
          generator: with ``logits``, the generator of the label sampling.
          mask: with ``logits``, a tensor of shape ``logits.shape[:-1]``, True
            (nonzero) where the position enters the loss (``attention_mask``,
            or ``labels != -100`` after a causal model's shift); masked-out
            positions contribute exactly nothing.
          allow_repeat: refresh even if no step was taken since the last refresh.

        Raises:
          RuntimeError: ``logits`` whose graph a backward already freed (call
            ``update_hessian`` before ``loss.backward()``).
        """
        if logits is not None and hessian is not None:
            raise ValueError("update_hessian: pass logits=... or hessian=..., not both")
        if logits is None and (labels is not None or generator is not None or mask is not None):
            raise ValueError("update_hessian: labels=/generator=/mask= only apply with logits=...")
        all_params = [p for g in self.param_groups for p in g["params"]]
        if hessian is not None:
            estimates = list(hessian)
            if len(estimates) != len(all_params):
                raise ValueError(
                    f"update_hessian: got {len(estimates)} estimates for {len(all_params)} "
                    "parameters (pass one tensor or None per parameter, in param_groups order)"
                )
            self._check_estimate_shapes(estimates)
        if not torch.compiler.is_compiling() and not self._note_refresh(allow_repeat):
            return
        count: int | Tensor | None = None
        if logits is not None:
            estimates, count = self._gnb(logits, all_params, labels, generator, mask)
        elif hessian is None:
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
            gs = self._group_state(group)
            if hs:
                hessian_ema(hs, es, beta2=group["betas"][1], foreach=group["foreach"])
            if gs is None:
                continue
            if count is not None:
                _store_count(gs, count)
            if group["dynamic"]:
                _dynamic_rho(group, gs)
        if not torch.compiler.is_compiling():
            self._check_label_count(count, from_logits=logits is not None)
            self._last_refresh_steps = self._group_steps()

    def _check_estimate_shapes(self, estimates: list[Tensor | None]) -> None:
        k = 0
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                e = estimates[k]
                k += 1
                if e is None:
                    continue
                want, got = (tuple(_real_view(x).shape) for x in (p, e))
                if got != want:
                    raise ValueError(
                        f"update_hessian: the estimate for {self._param_name(group, i)} has "
                        f"shape {tuple(e.shape)}, but the parameter needs {want}"
                    )

    def _gnb(
        self,
        logits: Tensor,
        all_params: list[Tensor],
        labels: Tensor | None,
        generator: torch.Generator | None,
        mask: Tensor | None,
    ) -> tuple[list[Tensor | None], int | Tensor]:
        wanted = [p for p in all_params if p.requires_grad]
        try:
            with torch.enable_grad():
                h_hats, count = estimators._gnb_with_count(
                    logits, wanted, labels, generator, mask, True, None
                )
        except RuntimeError as e:
            if _FREED_GRAPH not in str(e):
                raise
            raise RuntimeError(
                "SophiaG.update_hessian(logits=...): the graph of these logits was already "
                "freed by a backward (loss.backward() frees it). Call update_hessian before "
                "loss.backward() (after the forward: if step % k == 0: "
                "opt.update_hessian(logits=logits)), or pass logits from a fresh forward"
            ) from e
        by_id = {id(p): h for p, h in zip(wanted, h_hats)}
        return [by_id.get(id(p)) for p in all_params], count

    def _group_steps(self) -> tuple[float, ...]:
        """Each group's step counter (-1 where it has none yet), read on the host."""
        out = []
        for group in self.param_groups:
            st = self.state.get(group["params"][0], {}) if group["params"] else {}
            out.append(float(st[_STEP]) if _STEP in st else -1.0)
        return tuple(out)

    def _note_refresh(self, allow_repeat: bool) -> bool:
        """Bookkeeping of a refresh; ``False`` if it repeats one with no step in between."""
        self._ever_refreshed = True
        self._steps_without_refresh = 0
        if allow_repeat or self._last_refresh_steps is None:
            return True
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if capturing or self._group_steps() != self._last_refresh_steps:
            return True
        self._warn_once(
            "repeat",
            RepeatedRefreshWarning,
            "SophiaG.update_hessian: a second Hessian refresh with no optimizer step since the "
            "last one was skipped. Refreshing on every micro-batch of gradient accumulation "
            "refreshes h more often than every k optimizer steps: refresh once per optimizer "
            "step (on one micro-batch, when the optimizer step count t has t % k == 0), or "
            "pass allow_repeat=True to refresh several times on purpose",
        )
        return False

    def _check_label_count(self, count: int | Tensor | None, from_logits: bool) -> None:
        if count is None:
            if from_logits:
                return
            unknown = [
                gi
                for gi, g in enumerate(self.param_groups)
                if g["bs"] is None
                and g["params"]
                and _COUNT not in self.state.get(g["params"][0], {})
            ]
            if unknown:
                self._warn_once(
                    "no_count",
                    LabelCountWarning,
                    f"SophiaG: param groups {unknown} have bs=None, which follows the label "
                    "count of update_hessian(logits=...), but this refresh (hessian=[...] or "
                    "the squared gradients) gives none: the step uses "
                    f"bs={spec.REFERENCE_BS} (sophia.spec.REFERENCE_BS, the paper's default). "
                    "Pass bs= the number of labels behind your estimate (1 for a Hutchinson "
                    "estimate)",
                )
            return
        if self._count_checked:
            return
        self._count_checked = True
        numeric = [(gi, g["bs"]) for gi, g in enumerate(self.param_groups) if g["bs"] is not None]
        if not numeric:
            return
        n = int(count)  # once per optimizer: a synchronisation only for a device count
        for gi, bs in numeric:
            value = float(bs)
            if value != n:
                self._warn_once(
                    "count_mismatch",
                    LabelCountWarning,
                    f"SophiaG: param group {gi} has bs={value:g}, but the GNB refresh "
                    f"sampled {n} labels: rho * bs * h then misjudges the curvature by "
                    f"{value / max(n, 1):.3g}x. Pass bs=None to follow the refresh's count "
                    f"(or bs={n})",
                )
                return

    # ------------------------------------------------------------------ diagnostics

    @torch.no_grad()
    def diagnostics(self) -> list[dict[str, Tensor]]:
        """The paper's diagnostics per param group, as tensors (no host synchronisation).

        Keys mirror :func:`sophia.jax.diagnostics`: ``win_rate`` (fraction of
        coordinates with ``r < 1`` in the group's last step), ``rho`` (the
        current value), ``hessian_norm`` and ``momentum_norm`` (L2 norms of the
        group's ``hessian`` and ``exp_avg`` states) and ``count`` (steps taken).
        A group that has not stepped or refreshed yet reports its initial values.

        Returns:
          One dict per param group.
        """
        out = []
        for group in self.param_groups:
            params = group["params"]
            sd = _group_scalar_dtype(params)
            device = params[0].device if params else torch.device("cpu")
            gs = self.state.get(params[0], {}) if params else {}
            if _RHO in gs:
                win, rho_now, count = gs[_WIN], gs[_RHO], gs[_STEP]
            else:  # not created yet: never create state here (it may be on the meta device)
                win = torch.zeros((), dtype=sd, device=device)
                rho_now = _scalar_tensor(group["rho"], sd, device)
                count = torch.zeros((), dtype=torch.float32, device=device)
            rho = rho_now if group["dynamic"] else _scalar_tensor(group["rho"], sd, device)
            norms: dict[str, list[Tensor]] = {"hessian": [], "exp_avg": []}
            for p in params:
                st = self.state.get(p, {})
                for key in norms:
                    if key in st:
                        x = st[key]
                        x = torch.view_as_real(x) if torch.is_complex(x) else x
                        n = torch.linalg.vector_norm(x, dtype=sd)
                        if is_dtensor(n):
                            n = n.full_tensor()  # every rank reports the global norm
                        norms[key].append(n.to(device))
            out.append(
                {
                    "win_rate": win.clone(),
                    "rho": rho.clone(),
                    "hessian_norm": _combine_norms(norms["hessian"], sd, device),
                    "momentum_norm": _combine_norms(norms["exp_avg"], sd, device),
                    "count": count.clone(),
                }
            )
        return out


def _effective_bs(
    group: dict[str, Any], gs: dict[str, Any], bs: float | Tensor | None
) -> float | Tensor:
    """``step(bs=...)``, else the group's ``bs``, else the latest GNB label count."""
    if bs is not None:
        return bs
    if group["bs"] is not None:
        return group["bs"]
    return gs.get(_COUNT, spec.REFERENCE_BS)


def _store_count(gs: dict[str, Any], count: int | Tensor) -> None:
    """Keeps a refresh's label count; a refresh with no labels keeps the previous one."""
    device = gs[_RHO].device
    if isinstance(count, Tensor):
        prev = gs.get(_COUNT)
        fallback = torch.full((), spec.REFERENCE_BS, dtype=torch.int64, device=device)
        new = count.to(device=device, dtype=torch.int64).reshape(())
        new = torch.where(new > 0, new, fallback if prev is None else prev)
    elif count > 0:
        new = torch.full((), count, dtype=torch.int64, device=device)
    else:
        return
    if _COUNT in gs:
        gs[_COUNT].copy_(new)
    else:
        gs[_COUNT] = new


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


def _dynamic_rho(group: dict[str, Any], gs: dict[str, Any]) -> None:
    """The spec's dynamic-rho rule on one group, with tensor ops only (no host sync)."""
    n_total = sum(_real_numel(p) for p in group["params"])
    if n_total == 0:
        return
    rho = gs[_RHO]
    sd, device = rho.dtype, rho.device
    c = _NP_DTYPES[sd]
    rho0 = _scalar_tensor(group["rho"], sd, device)
    span = torch.full((), float(c(spec.DYNAMIC_RANGE)), dtype=sd, device=device)
    factor = torch.full((), float(c(spec.DYNAMIC_FACTOR)), dtype=sd, device=device)
    up = torch.minimum(rho * factor, rho0 * span)
    down = torch.maximum(rho / factor, rho0 / span)
    rate = gs[_WIN]
    lo, hi = (float(c(b)) for b in spec.WIN_RATE_BAND)
    moved = torch.where(rate < lo, up, torch.where(rate > hi, down, rho))
    rho.copy_(torch.where(gs[_STEP].to(device) > 0, moved, rho))


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

r"""``SophiaG`` as a ``torch.optim.Optimizer``, following :mod:`sophia.spec`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from sophia import spec
from sophia.torch import _diagnostics, _refresh, estimators
from sophia.torch import _group_state as gstate
from sophia.torch import _narrow_state as nstate
from sophia.torch._misuse import MisuseMonitor
from sophia.torch._validation import check_fused_parameter, check_group, validate
from sophia.torch.functional import sophia_g

__all__ = ["SophiaG"]

_D = spec.DEFAULTS


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
      mu_dtype: the form ``exp_avg`` is stored in (:mod:`sophia.narrow`):
        ``None`` (the parameter's dtype), ``"float32"`` or ``"bfloat16"``
        (rounded stochastically); a torch dtype works as its name.
      hessian_dtype: the form of ``hessian``: as ``mu_dtype``, or ``"block8"``
        (int8 square-root codes, a float32 scale per 256 coordinates, stochastic).
        Complex parameters take ``None`` or ``"float32"``.
      seed: the stochastic rounding's seed (its bits are a function of the
        seed, the step, the array and the coordinate).

    State: per parameter ``step``, ``exp_avg`` and ``hessian`` (the paper's
    reference layout, whose state dicts load here; in their forms, with
    ``hessian_scale`` for ``"block8"``); per group, in the state of
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
        mu_dtype: Any = None,
        hessian_dtype: Any = None,
        seed: int = 0,
    ) -> None:
        hyperparameters = {
            "lr": lr,
            "betas": betas,
            "rho": rho,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "capturable": capturable,
            "dynamic": dynamic,
            "bs": bs,
            "eps": eps,
            "foreach": foreach,
            "fused": fused,
            "mu_dtype": mu_dtype,
            "hessian_dtype": hessian_dtype,
            "seed": seed,
        }
        # the defaults once here; each group then checks only what it sets itself
        validate(hyperparameters)
        defaults = {**hyperparameters, "betas": tuple(betas)}
        self._misuse = MisuseMonitor()
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups and state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a param group, validating its hyperparameters with :func:`sophia.spec.validate`.

        Args:
          param_group: the group; missing hyperparameters come from the defaults.
        """
        own = [k for k in param_group if k in self.defaults]
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        values = {k: group[k] for k in own}
        if "fused" in values or "foreach" in values:
            values.update(fused=group["fused"], foreach=group["foreach"])
        try:
            validate(values)
            check_group(group)
        except ValueError:
            self.param_groups.pop()  # nothing half-changed
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        had_differentiable = "differentiable" in state.get(
            "defaults", self.__dict__.get("defaults", {})
        )
        super().__setstate__(state)
        if not had_differentiable:
            # torch adds it for its own optimizers; here it would be a hyperparameter that
            # changes nothing, and it made a state-dict round trip add keys to every group
            self.defaults.pop("differentiable", None)
        self.__dict__.setdefault("_misuse", MisuseMonitor())
        for key, value in nstate.KEYS.items():  # pickled before narrow state existed
            self.defaults.setdefault(key, value)
        for group in self.param_groups:
            earlier = group.pop("sophia_state", None)
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            for p in group["params"]:
                gstate.upgrade_param_state(self.state, group, p)
            gstate.upgrade_group_state(self.state, group, earlier)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict saved by this class (either layout) or by the paper's ``SophiaG``.

        Raises ``ValueError`` naming the first parameter whose saved ``exp_avg``
        or ``hessian`` does not have the parameter's shape (a state dict of
        different parameters) before anything is changed.

        Args:
          state_dict: as returned by :meth:`state_dict`.
        """
        gstate.check_saved_shapes(self.param_groups, state_dict)
        state_dict = nstate.with_form_keys(state_dict)
        nstate.check_saved_forms(self.param_groups, state_dict)
        super().load_state_dict(state_dict)
        gstate.restore_group_dtypes(self.state, self.param_groups, state_dict)
        nstate.restore_forms(self.state, self.param_groups, state_dict)
        self._misuse.last_refresh_steps = None

    def _param_name(self, group: dict[str, Any], index: int) -> str:
        gi = next(i for i, g in enumerate(self.param_groups) if g is group)
        names = group.get("param_names")
        where = f"parameter {index} of param group {gi}"
        return f"{names[index]!r} ({where})" if names else where

    def _dense_grad(self, group: dict[str, Any], index: int) -> Tensor:
        grad = group["params"][index].grad
        if grad.is_sparse:
            raise RuntimeError(
                f"SophiaG does not support sparse gradients; {self._param_name(group, index)} "
                "has one"
            )
        return grad

    def _init_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if "step" not in state:
            device = gstate.step_device(group, p)
            state["step"] = torch.zeros((), dtype=torch.float32, device=device)
        nstate.init_param_state(state, group, p)
        return state

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        hessians: list[Tensor],
        state_steps: list[Tensor],
        hessian_scales: list[Tensor],
    ) -> bool:
        has_complex = False
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            grad = self._dense_grad(group, i)
            if group["fused"]:
                check_fused_parameter(p, partial(self._param_name, group, i))
            has_complex |= torch.is_complex(p)
            state = self._init_state(group, p)
            params.append(p)
            grads.append(grad)
            exp_avgs.append(state["exp_avg"])
            hessians.append(state["hessian"])
            state_steps.append(state["step"])
            if nstate.HESSIAN_SCALE in state:
                hessian_scales.append(state[nstate.HESSIAN_SCALE])
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
            self._misuse.count_step()
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
            scales: list[Tensor] = []
            has_complex = self._init_group(
                group, params, grads, exp_avgs, hessians, state_steps, scales
            )
            if not params:
                continue
            st = gstate.group_state(self.state, group)
            assert st is not None
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
                rho=st[gstate.GROUP_RHO] if group["dynamic"] else group["rho"],
                bs=gstate.effective_bs(group, st, bs),
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
                mu_dtype=group["mu_dtype"],
                hessian_dtype=group["hessian_dtype"],
                seed=group["seed"],
                hessian_scales=scales or None,
            )
            gstate.store_win_rate(st, n_win, params)

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
            _refresh.check_estimate_shapes(self.param_groups, estimates, self._param_name)
        compiling = torch.compiler.is_compiling()
        if not compiling and not self._misuse.note_refresh(allow_repeat, self._group_steps):
            return
        count: int | Tensor | None = None
        if logits is not None:
            estimates, count = _refresh.gnb_estimates(logits, all_params, labels, generator, mask)
        elif hessian is None:
            estimates = [
                None if p.grad is None else estimators._square(self._dense_grad(g, i))
                for g in self.param_groups
                for i, p in enumerate(g["params"])
            ]
        k = 0
        for group in self.param_groups:
            es, states, dtypes = [], [], []
            for p in group["params"]:
                e = estimates[k]
                k += 1
                if e is None:
                    continue
                states.append(self._init_state(group, p))
                es.append(e)
                dtypes.append(p.dtype)
            st = gstate.group_state(self.state, group)
            if states:
                _refresh.group_ema(group, states, dtypes, es)
            if st is None:
                continue
            if count is not None:
                gstate.store_label_count(st, count)
            if group["dynamic"]:
                gstate.dynamic_rho(group, st)
        if not compiling:
            self._misuse.check_label_count(
                count,
                logits is not None,
                self.param_groups,
                lambda g: gstate.GROUP_LABEL_COUNT not in self.state.get(g["params"][0], {}),
            )
            self._misuse.last_refresh_steps = self._group_steps()

    def _group_steps(self) -> tuple[float, ...]:
        return gstate.group_steps(self.state, self.param_groups)

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
        return _diagnostics.diagnostics(self.state, self.param_groups)

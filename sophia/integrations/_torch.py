"""What the torch trainer integrations share: find SophiaG, read logits, refresh from a forward.

Imports torch and :mod:`sophia.torch` only; each trainer module adds its framework.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from sophia.torch import SophiaG

#: Attributes under which trainers keep the optimizer they wrap: Accelerate's
#: ``AcceleratedOptimizer.optimizer``, Lightning's ``LightningOptimizer._optimizer``.
_WRAPPER_ATTRS = ("optimizer", "_optimizer")
#: HF's (and torch's cross_entropy's default) label that enters no loss.
IGNORE_INDEX = -100

#: ``mask_fn(inputs, logits)``: the forward's keyword arguments and its logits -> a
#: boolean mask of ``logits.shape[:-1]`` (True where the position enters the loss) or None.
MaskFn = Callable[[Mapping[str, Any], Tensor], "Tensor | None"]


def check_interval(interval: int, owner: str) -> int:
    """``hessian_update_interval`` must be a positive int (not a bool, not a float)."""
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(
            f"{owner}: Invalid hessian_update_interval: {interval!r} (allowed: an integer >= 1, "
            "the number of optimizer steps between Hessian refreshes)"
        )
    return interval


def find_sophia(optimizer: Any, owner: str, fix: str) -> SophiaG:
    """The :class:`SophiaG` inside ``optimizer``, unwrapping trainer wrappers.

    Raises:
      TypeError: naming the optimizer found and ``fix`` when it is not SophiaG.
    """
    found = optimizer
    for _ in range(8):  # wrappers nest a few levels at most (e.g. Accelerate over DeepSpeed)
        if isinstance(found, SophiaG):
            return found
        inner = next((getattr(found, a) for a in _WRAPPER_ATTRS if hasattr(found, a)), None)
        if inner is None or inner is found:
            break
        found = inner
    what = "no optimizer" if optimizer is None else type(found).__name__
    raise TypeError(
        f"{owner} refreshes the Hessian of sophia.torch.SophiaG, but the trainer's optimizer is "
        f"{what}; {fix}"
    )


def extract_logits(output: Any, owner: str, where: str) -> Tensor:
    """The logits in a forward's output: the output itself, ``.logits`` or ``["logits"]``.

    Raises:
      ValueError: when there are none, naming ``where`` (the module) and what it returned.
    """
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else None
    if logits is None and not isinstance(output, (Mapping, tuple, list)):
        logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    keys = f" (keys: {sorted(output)})" if isinstance(output, Mapping) else ""
    raise ValueError(
        f"{owner}: the output of {where} has no logits: got {type(output).__name__}{keys}. "
        "SophiaG's GNB refresh needs the [..., vocab] logits of the training forward: return "
        "them as the output, as its .logits or under the key 'logits'"
    )


def next_token_mask(valid: Tensor) -> Tensor:
    """Causal-LM mask: logits at position ``i`` predict token ``i + 1``, the last predicts nothing.

    Args:
      valid: ``[..., seq]`` True where the token counts (a label that is not
        ignored, or a real token of the attention mask).

    Returns:
      ``[..., seq]`` booleans, ``valid`` shifted left by one with False at the end,
      as Hugging Face's causal-LM loss pads the shifted labels with the ignore index.
    """
    valid = valid.bool()
    return torch.cat([valid[..., 1:], torch.zeros_like(valid[..., :1])], dim=-1)


def check_mask(mask: Tensor, logits: Tensor, owner: str, source: str) -> Tensor:
    """A mask must have the logits' shape without the class axis."""
    if tuple(mask.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{owner}: the refresh mask (from {source}) has shape {tuple(mask.shape)} but the "
            f"logits have shape {tuple(logits.shape)}; the mask must have shape "
            f"{tuple(logits.shape[:-1])} (one entry per predicted position): pass a mask_fn "
            "that builds it"
        )
    return mask.to(device=logits.device, dtype=torch.bool)


class ForwardRefresher:
    """Refreshes SophiaG's Hessian from a module's training forward, once per optimizer step.

    The trainer integrations call :meth:`begin_step` at the start of every
    optimizer step with the number of optimizer steps taken so far, ``t``; when
    ``t % k == 0`` the next forward of ``module`` that runs in training mode
    with grad enabled (the step's first micro-batch under gradient
    accumulation) calls ``SophiaG.update_hessian(logits=..., mask=...)`` from
    its own output, before the loss is backpropagated. :meth:`end_step` fails
    loudly when a due refresh never happened.

    Args:
      interval: ``k``, optimizer steps between refreshes.
      owner: the integration's name, for messages.
      mask_fn: ``(forward kwargs, logits) -> mask or None``.
    """

    def __init__(self, interval: int, owner: str, mask_fn: MaskFn) -> None:
        self.interval = interval
        self.owner = owner
        self.mask_fn = mask_fn
        self.optimizer: SophiaG | None = None
        self.generator: torch.Generator | None = None
        self.num_refreshes = 0
        self.last_refresh_step: int | None = None
        self._module_name = "the model"
        self._handle: RemovableHandle | None = None
        self._step: int | None = None
        self._due = False

    def attach(self, module: nn.Module, optimizer: SophiaG, name: str) -> None:
        """Hooks ``module``'s forward (replacing an earlier hook)."""
        self.detach()
        self.optimizer = optimizer
        self._module_name = name
        self._step, self._due = None, False
        self._handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def detach(self) -> None:
        """Removes the forward hook."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._due = False

    def begin_step(self, step: int) -> None:
        """Called at each micro-batch with optimizer steps taken so far; arms a due refresh once."""
        if step != self._step:
            self._step = step
            self._due = step % self.interval == 0

    def end_step(self, step: int) -> None:
        """Called before the optimizer steps: a refresh that was due must have happened."""
        if self._due:
            self._due = False
            raise RuntimeError(
                f"{self.owner}: the Hessian refresh due at optimizer step {step} (every "
                f"{self.interval} steps) did not happen: no forward of {self._module_name} ran in "
                "training mode with grad enabled during this step. The callback refreshes from "
                "that module's forward output; if the training step calls another module, "
                "point the callback at it"
            )

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if not (self._due and module.training and torch.is_grad_enabled()):
            return
        self._due = False
        logits = extract_logits(output, self.owner, self._module_name)
        mask = self.mask_fn(kwargs, logits)
        assert self.optimizer is not None
        self.optimizer.update_hessian(logits=logits, mask=mask, generator=self.generator)
        self.num_refreshes += 1
        self.last_refresh_step = self._step


class RefreshStats:
    """Refresh counters of a callback that owns a :class:`ForwardRefresher` as ``_refresher``."""

    _refresher: ForwardRefresher

    @property
    def num_refreshes(self) -> int:
        """Refreshes done by this callback."""
        return self._refresher.num_refreshes

    @property
    def last_refresh_step(self) -> int | None:
        """The optimizer step (the trainer's global step) of the latest refresh."""
        return self._refresher.last_refresh_step

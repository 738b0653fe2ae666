r"""SophiaG in ``lightning.Trainer``.

Lightning only ever calls ``optimizer.step()``, and a refresh placed in
``on_before_optimizer_step`` comes after the backward has freed the training
graph. :class:`SophiaGCallback` refreshes the Hessian from the forward of the
``LightningModule`` itself, before the backward, every ``k`` optimizer steps,
once per optimizer step whatever ``accumulate_grad_batches``::

    import lightning as L
    from sophia.integrations.lightning import SophiaGCallback, next_token_mask
    from sophia.torch import SophiaG


    class LitLM(L.LightningModule):
        def forward(self, x):
            return self.net(x)  # [batch, seq, vocab] logits

        def training_step(self, batch, batch_idx):
            logits = self(batch["x"])  # the callback refreshes from this forward
            return F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten(), ignore_index=-100)

        def configure_optimizers(self):
            return SophiaG(self.parameters(), lr=3e-4, rho=0.03)


    trainer = L.Trainer(
        callbacks=[SophiaGCallback(mask_fn=lambda batch: batch["y"] != -100)],
        accumulate_grad_batches=2,
    )

Imports ``lightning`` (and torch, :mod:`sophia.torch`) only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from sophia.integrations._torch import (
    ForwardRefresher,
    RefreshStats,
    check_interval,
    check_mask,
    find_sophia,
    next_token_mask,
)

__all__ = ["SophiaGCallback", "next_token_mask"]

_OWNER = "SophiaGCallback"
_FIX = "return a sophia.torch.SophiaG from configure_optimizers"


class SophiaGCallback(RefreshStats, pl.Callback):
    r"""Refreshes SophiaG's Hessian inside ``lightning.Trainer`` from the training forward.

    At the start of optimizer step ``t`` (``trainer.global_step``, restored on
    resume) with ``t % hessian_update_interval == 0``, the first forward of the
    hooked module in that step that runs in training mode with grad enabled
    calls ``SophiaG.update_hessian(logits=..., mask=...)`` from its output,
    before Lightning backpropagates the loss (one extra backward, no extra
    forward). Under ``accumulate_grad_batches`` that is the step's **first
    micro-batch**. Validation, test and prediction never refresh.

    The hooked module is the ``LightningModule`` (its ``forward``, i.e.
    ``self(x)`` in ``training_step``), or the submodule named by ``module``
    when ``training_step`` calls one directly (e.g. ``module="model"`` for
    ``self.model(**batch)``). Its output must be the logits, have ``.logits``
    or a ``"logits"`` key. A due refresh that found no such forward raises
    before the optimizer steps, rather than letting SophiaG run without one.

    Labels are sampled from the callback's own generator, seeded with ``seed``
    plus the process rank, and its state is saved in Lightning checkpoints so
    a resumed run draws the same labels.

    Args:
      hessian_update_interval: ``k``, optimizer steps between refreshes (at
        steps ``0, k, 2k, ...``).
      module: dotted name of the submodule whose forward gives the logits
        (``None``: the ``LightningModule``).
      mask_fn: ``mask_fn(batch)`` -> a boolean tensor of the logits' shape
        without the class axis, True where the position enters the loss
        (``None``: every position). For a causal LM whose loss shifts labels,
        ``lambda batch: next_token_mask(batch["labels"] != -100)``. With
        ``SophiaG(..., bs=None)`` (the default) ``bs`` follows its count.
      seed: seed of the label sampling; ``None``: ``torch.initial_seed()``
        when fitting starts (what ``lightning.seed_everything`` set).

    ``num_refreshes`` and ``last_refresh_step`` report what it did.
    """

    def __init__(
        self,
        hessian_update_interval: int = 10,
        *,
        module: str | None = None,
        mask_fn: Callable[[Any], Tensor | None] | None = None,
        seed: int | None = None,
    ) -> None:
        self.hessian_update_interval = check_interval(hessian_update_interval, _OWNER)
        self.module = module
        self.mask_fn = mask_fn
        self.seed = seed
        self._batch: Any = None
        self._generator_state: Tensor | None = None
        self._refresher = ForwardRefresher(self.hessian_update_interval, _OWNER, self._mask)

    def _mask(self, inputs: Mapping[str, Any], logits: Tensor) -> Tensor | None:
        if self.mask_fn is None:
            return None
        mask = self.mask_fn(self._batch)
        return None if mask is None else check_mask(mask, logits, _OWNER, "mask_fn(batch)")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Finds SophiaG among the trainer's optimizers and hooks the module's forward."""
        found = []
        for opt in trainer.optimizers:
            try:
                found.append(find_sophia(opt, _OWNER, _FIX))
            except TypeError:
                continue
        if not found:
            names = [type(o).__name__ for o in trainer.optimizers] or ["none"]
            raise TypeError(
                f"{_OWNER} refreshes the Hessian of sophia.torch.SophiaG, but the trainer's "
                f"optimizers are {', '.join(names)}; {_FIX}"
            )
        if len(found) > 1:
            raise ValueError(
                f"{_OWNER}: configure_optimizers returned {len(found)} SophiaG optimizers; the "
                "callback refreshes exactly one: give their parameters to one SophiaG as "
                "separate param groups"
            )
        name = type(pl_module).__name__
        target: torch.nn.Module = pl_module
        if self.module is not None:
            try:
                target = pl_module.get_submodule(self.module)
            except AttributeError as e:
                raise ValueError(
                    f"{_OWNER}: Invalid module: {self.module!r} is not a submodule of {name} "
                    f"(allowed: a dotted name from {name}.named_modules(), or None for {name})"
                ) from e
            name = f"{name}.{self.module}"
        seed = torch.initial_seed() if self.seed is None else self.seed
        gen = torch.Generator(device=pl_module.device)
        gen.manual_seed((seed + trainer.global_rank) % 2**63)
        if self._generator_state is not None:  # restored from a checkpoint
            gen.set_state(self._generator_state)
            self._generator_state = None
        self._refresher.generator = gen
        self._refresher.attach(target, found[0], name)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Arms the refresh at the start of optimizer steps ``0, k, 2k, ...``."""
        self._batch = batch
        self._refresher.begin_step(trainer.global_step)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Drops the reference to the batch."""
        self._batch = None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        """Fails if a due refresh found no training forward of the hooked module."""
        self._refresher.end_step(trainer.global_step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Removes the forward hook."""
        self._refresher.detach()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Removes the forward hook."""
        self._refresher.detach()

    def state_dict(self) -> dict[str, Any]:
        """The label sampler's generator state, saved in Lightning checkpoints."""
        gen = self._refresher.generator
        if gen is None:
            return {}
        return {"generator_state": gen.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the label sampler's generator state (applied when fitting starts)."""
        self._generator_state = state_dict.get("generator_state")

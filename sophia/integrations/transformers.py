r"""SophiaG in Hugging Face ``transformers.Trainer``.

``Trainer`` only ever calls ``optimizer.step()``: with SophiaG alone, nothing
refreshes the Hessian and the run is sign momentum. :class:`SophiaGCallback`
refreshes it from the training forward's own logits (no extra forward), every
``k`` optimizer steps, once per optimizer step whatever the gradient
accumulation, with a mask so that only the positions that enter the loss are
sampled::

    from sophia.integrations.transformers import SophiaGCallback, sophia_trainer_optimizer

    opt = sophia_trainer_optimizer(model, args, lr=3e-4, rho=0.03, weight_decay=0.1)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        optimizers=(opt, None),  # None: Trainer builds its scheduler from args
        callbacks=[SophiaGCallback(hessian_update_interval=10)],
    )
    trainer.train()

:func:`sophia_trainer_optimizer` builds SophiaG the way ``Trainer`` builds its
own optimizers (no weight decay on biases and normalization weights) without
``Trainer``'s ``optimizer_cls_and_kwargs`` replacing SophiaG's weight decay by
``args.weight_decay``.

Imports ``transformers`` (and torch, :mod:`sophia.torch`) only.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from sophia.integrations._torch import (
    IGNORE_INDEX,
    ForwardRefresher,
    MaskFn,
    RefreshStats,
    check_interval,
    check_mask,
    find_sophia,
    next_token_mask,
)
from sophia.torch import SophiaG, SophiaGWarning

__all__ = ["SophiaGCallback", "next_token_mask", "sophia_trainer_optimizer"]

_OWNER = "SophiaGCallback"
_FIX = (
    "pass Trainer(..., optimizers=(SophiaG(model.parameters(), ...), None)) or "
    "optimizers=(sophia_trainer_optimizer(model, args, ...), None)"
)
#: ``TrainingArguments`` fields that :func:`sophia_trainer_optimizer` maps onto SophiaG.
_MAPPED_ARGS = {"learning_rate": "lr", "weight_decay": "weight_decay"}
#: AdamW-only fields of ``TrainingArguments`` that SophiaG has no use for.
_ADAM_ARGS = {"adam_beta1": "betas", "adam_beta2": "betas", "adam_epsilon": "eps"}


def _causal_lm_names() -> set[str]:
    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, (tuple, list)) else (value,))
    return names


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model``'s loss shifts its labels (logits at ``i`` predict label ``i + 1``).

    Trainer's own rule (a class of the causal-LM auto mapping, as for its label
    smoothing), or a model whose ``loss_type`` is ``"ForCausalLM"``. PEFT
    models are judged by their base model.

    Args:
      model: the model the Trainer trains.

    Returns:
      True for a causal language model.
    """
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    name = type(base).__name__
    return name in _causal_lm_names() or getattr(base, "loss_type", None) == "ForCausalLM"


def _loss_mask(causal: bool) -> MaskFn:
    """The positions of a Hugging Face forward that enter its loss, from its own inputs."""

    def mask_fn(inputs: Mapping[str, Any], logits: Tensor) -> Tensor | None:
        shift_labels = inputs.get("shift_labels")
        if isinstance(shift_labels, Tensor):  # already aligned with the logits
            return check_mask(shift_labels != IGNORE_INDEX, logits, _OWNER, "shift_labels")
        labels = inputs.get("labels")
        if isinstance(labels, Tensor):
            valid = labels != IGNORE_INDEX
            if causal:
                return check_mask(next_token_mask(valid), logits, _OWNER, "labels, shifted")
            return check_mask(valid, logits, _OWNER, "labels")
        attention = inputs.get("attention_mask")
        # without labels (Trainer pops them for a compute_loss_func or label smoothing) the
        # attention mask says which tokens are real; it only applies to per-token logits
        if isinstance(attention, Tensor) and tuple(attention.shape) == tuple(logits.shape[:-1]):
            return next_token_mask(attention) if causal else attention.bool()
        return None

    return mask_fn


def _user_mask(fn: MaskFn) -> MaskFn:
    def mask_fn(inputs: Mapping[str, Any], logits: Tensor) -> Tensor | None:
        mask = fn(inputs, logits)
        return None if mask is None else check_mask(mask, logits, _OWNER, "mask_fn")

    return mask_fn


class SophiaGCallback(RefreshStats, TrainerCallback):
    r"""Refreshes SophiaG's Hessian inside ``transformers.Trainer`` from the training forward.

    At the start of optimizer step ``t`` (``state.global_step``, so a resumed
    run keeps its phase) with ``t % hessian_update_interval == 0``, the first
    forward of the model in that step that runs in training mode with grad
    enabled calls ``SophiaG.update_hessian(logits=outputs.logits, mask=...)``
    from a forward hook, before Trainer backpropagates the loss: the GNB
    estimate costs one extra backward and no forward. Under gradient
    accumulation that is the step's **first micro-batch** (once per optimizer
    step, so ``bs`` counts that micro-batch's labels). Evaluation and
    prediction forwards (``eval()`` mode or no grad) never refresh.

    The mask keeps the refresh to the positions the loss uses: from the
    forward's ``shift_labels``, else its ``labels`` (``-100`` ignored; shifted
    by one for causal LMs: the logits at position ``i`` predict label
    ``i + 1``, and the last position predicts nothing), else its
    ``attention_mask`` (shifted the same way), else every position. With
    ``SophiaG(..., bs=None)`` (the default) ``bs`` follows the masked-in label
    count.

    Labels are sampled from torch's global random generator, which Trainer
    seeds from ``args.seed`` and saves in its checkpoints, so a resumed run
    draws the same labels.

    The optimizer may be SophiaG itself or wrapped (Accelerate's
    ``AcceleratedOptimizer``); anything else raises ``TypeError`` when training
    starts. With ``gradient_checkpointing``, keep torch's default non-reentrant
    checkpoints: the refresh differentiates the logits with
    ``torch.autograd.grad``, which reentrant ones refuse. A weight decay that
    Trainer's ``optimizer_cls_and_kwargs`` replaced by ``args.weight_decay``
    gets a warning that names :func:`sophia_trainer_optimizer`.

    Args:
      hessian_update_interval: ``k``, optimizer steps between refreshes
        (at steps ``0, k, 2k, ...``).
      causal: whether the model's loss shifts its labels; ``None`` decides with
        :func:`is_causal_lm` (set it for models outside the causal-LM mapping
        whose loss shifts, e.g. some ``...ForConditionalGeneration``).
      mask_fn: ``mask_fn(inputs, logits)`` -> a boolean tensor of shape
        ``logits.shape[:-1]`` (True where the position enters the loss) or
        ``None`` for all positions, from the forward's keyword arguments
        ``inputs``; replaces the rule above.

    ``num_refreshes`` and ``last_refresh_step`` report what it did.
    """

    def __init__(
        self,
        hessian_update_interval: int = 10,
        *,
        causal: bool | None = None,
        mask_fn: MaskFn | None = None,
    ) -> None:
        self.hessian_update_interval = check_interval(hessian_update_interval, _OWNER)
        self.causal = causal
        self.mask_fn = mask_fn
        self._refresher = ForwardRefresher(self.hessian_update_interval, _OWNER, _loss_mask(False))

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: Any,
        control: Any,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        """Finds SophiaG behind Trainer's optimizer and hooks the model's forward."""
        sophia = find_sophia(optimizer, _OWNER, _FIX)
        _warn_replaced_weight_decay(sophia, args)
        if model is None:
            raise ValueError(f"{_OWNER}: the Trainer passed no model to its callbacks")
        if self.mask_fn is not None:
            self._refresher.mask_fn = _user_mask(self.mask_fn)
        else:
            causal = is_causal_lm(model) if self.causal is None else self.causal
            self._refresher.mask_fn = _loss_mask(causal)
        self._refresher.attach(model, sophia, type(model).__name__)

    def on_step_begin(
        self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any
    ) -> None:
        """Arms the refresh at the start of optimizer steps ``0, k, 2k, ...``."""
        self._refresher.begin_step(state.global_step)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any
    ) -> None:
        """Fails if a due refresh found no training forward of the model."""
        self._refresher.end_step(state.global_step)

    def on_train_end(
        self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any
    ) -> None:
        """Removes the forward hook."""
        self._refresher.detach()


def _warn_replaced_weight_decay(opt: SophiaG, args: TrainingArguments) -> None:
    """Trainer's ``optimizer_cls_and_kwargs`` puts ``args.weight_decay`` (and 0) in every group."""
    own = opt.defaults["weight_decay"]
    decays = {float(g["weight_decay"]) for g in opt.param_groups if g["params"]}
    if own != args.weight_decay and decays and decays <= {float(args.weight_decay), 0.0}:
        warnings.warn(
            f"SophiaG was built with weight_decay={own}, but every param group uses "
            f"{sorted(decays)}: Trainer's optimizer_cls_and_kwargs replaces it with "
            f"args.weight_decay={args.weight_decay}. Build the optimizer with "
            "sophia.integrations.transformers.sophia_trainer_optimizer(model, args, "
            f"weight_decay={own}, ...) and pass optimizers=(opt, None), or set "
            f"TrainingArguments(weight_decay={own})",
            SophiaGWarning,
            stacklevel=3,
        )


def _field_defaults() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(TrainingArguments)}


def sophia_trainer_optimizer(
    model: nn.Module, args: TrainingArguments | None = None, **sophia_kwargs: Any
) -> SophiaG:
    """SophiaG for ``Trainer(optimizers=(opt, None))``, grouped as Trainer groups its optimizers.

    Two param groups, as ``Trainer.create_optimizer`` makes them: the
    parameters of ``Trainer.get_decay_parameter_names`` decay with SophiaG's
    ``weight_decay``; biases and normalization weights do not decay. Frozen
    parameters are left out.

    ``lr`` and ``weight_decay`` follow one rule: a value passed here wins; else
    the value set in ``args`` (``learning_rate``, ``weight_decay``) when it is
    not ``TrainingArguments``'s default; else SophiaG's default. A value set in
    ``args`` that disagrees with one passed here is not used, with a warning
    (Trainer's scheduler scales the optimizer's ``lr``, not
    ``args.learning_rate``). ``args.adam_beta1``/``adam_beta2``/``adam_epsilon``
    are AdamW's and never used; a non-default one gets a warning naming
    SophiaG's ``betas``/``eps``.

    Args:
      model: the model the Trainer will train.
      args: the Trainer's arguments, or ``None`` to use only ``sophia_kwargs``.
      **sophia_kwargs: any :class:`sophia.torch.SophiaG` keyword argument
        (``lr``, ``betas``, ``rho``, ``weight_decay``, ``bs``, ``dynamic``...).

    Returns:
      The optimizer; pass it as ``Trainer(optimizers=(opt, None))`` with a
      :class:`SophiaGCallback` in ``callbacks``.
    """
    if "params" in sophia_kwargs:
        raise TypeError("sophia_trainer_optimizer: the parameters come from model, not params=")
    kwargs = dict(sophia_kwargs)
    if args is not None:
        defaults = _field_defaults()
        for field, name in _MAPPED_ARGS.items():
            value = getattr(args, field)
            if value == defaults[field]:
                continue
            if name not in kwargs:
                kwargs[name] = value
            elif kwargs[name] != value:
                warnings.warn(
                    f"sophia_trainer_optimizer: args.{field}={value} is not used: SophiaG gets "
                    f"{name}={kwargs[name]} as passed. Make them equal or drop one",
                    SophiaGWarning,
                    stacklevel=2,
                )
        for field, name in _ADAM_ARGS.items():
            if getattr(args, field) != defaults[field]:
                warnings.warn(
                    f"sophia_trainer_optimizer: args.{field}={getattr(args, field)} is AdamW's and "
                    f"not used by SophiaG; pass {name}= to sophia_trainer_optimizer instead",
                    SophiaGWarning,
                    stacklevel=2,
                )
    # Trainer's own rule for what decays (biases, LayerNorm and *norm* weights do not);
    # it reads only the model, so it is called without a Trainer instance
    decay_names = set(Trainer.get_decay_parameter_names(None, model))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if n in decay_names]
    no_decay = [p for n, p in trainable if n not in decay_names]
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ValueError(
            f"sophia_trainer_optimizer: {type(model).__name__} has no parameter with "
            "requires_grad=True to optimize"
        )
    return SophiaG(groups, **kwargs)

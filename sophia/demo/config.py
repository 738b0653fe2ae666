"""A demo run's settings: the optimizers' hyperparameters, the run's shape, the named presets."""

from __future__ import annotations

import dataclasses
from typing import Any

from sophia import narrow
from sophia.demo.data import Corpus
from sophia.demo.model import ModelConfig

__all__ = [
    "FRAMEWORKS",
    "PRESETS",
    "PRESET_NOTES",
    "REFRESH_RULE",
    "ConfigError",
    "OptimConfig",
    "RunConfig",
    "adamw_config",
    "check_corpus",
    "sophiag_config",
]

FRAMEWORKS: tuple[str, ...] = ("jax", "torch")
#: When SophiaG's Hessian is refreshed, in the words the README and the notebooks use too
#: (the rule of ``sophia.jax``'s built-in refresh, ``count % k == 0``).
REFRESH_RULE: str = (
    "the Hessian is refreshed at the start of steps 0, k, 2k, ..., before that step's update"
)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """One optimizer's hyperparameters.

    Attributes:
      name: ``"sophiag"`` or ``"adamw"``.
      lr: peak learning rate (reached after the warm-up).
      b1: first EMA rate (momentum).
      b2: second EMA rate (SophiaG: Hessian EMA; AdamW: squared gradients).
      weight_decay: decoupled weight decay, multiplied by the learning rate.
      rho: SophiaG's clipping scale (unused by AdamW).
      k: SophiaG's Hessian refresh interval (unused by AdamW).
      eps: denominator epsilon (AdamW's ``eps``; SophiaG's ``eps``).
      mu_dtype: SophiaG's momentum storage (:mod:`sophia.narrow`): ``None`` (the
        parameters' dtype), ``"float32"`` or ``"bfloat16"``; AdamW takes ``None`` only.
      hessian_dtype: SophiaG's Hessian EMA storage: ``None``, ``"float32"``,
        ``"bfloat16"`` or ``"block8"``; AdamW takes ``None`` only.
    """

    name: str
    lr: float
    b1: float
    b2: float
    weight_decay: float
    rho: float = 0.0
    k: int = 1
    eps: float = 1e-8
    mu_dtype: str | None = None
    hessian_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.name not in ("sophiag", "adamw"):
            raise ValueError(f"Invalid name: {self.name!r} (allowed: 'sophiag', 'adamw')")
        forms = (("mu_dtype", narrow.MU_DTYPES), ("hessian_dtype", narrow.HESSIAN_DTYPES))
        for field, allowed in forms:
            value = getattr(self, field)
            if self.name == "adamw" and value is not None:
                raise ValueError(f"Invalid {field}: {value!r} for AdamW (allowed: None)")
            # the canonical name, so that a NumPy dtype given here prints and compares as one
            object.__setattr__(self, field, narrow.state_dtype_name(field, value, allowed))

    @property
    def label(self) -> str:
        """Display name: ``SophiaG`` or ``AdamW``."""
        return "SophiaG" if self.name == "sophiag" else "AdamW"

    def refreshes(self, step: int) -> bool:
        """Whether update ``step`` (0-based) refreshes the Hessian first (``step % k == 0``).

        :data:`REFRESH_RULE`: the Hessian is refreshed at the start of steps 0,
        k, 2k, ..., before that step's update.
        """
        return self.name == "sophiag" and step % self.k == 0

    def state_forms(self, seed: int | None = None) -> dict[str, Any]:
        """SophiaG's narrow-state keywords, ``{}`` when both forms are the parameters' dtype.

        The default run passes nothing, so it builds SophiaG exactly as it did
        before narrow state existed.

        Args:
          seed: the stochastic rounding's seed, included when given (torch's
            ``SophiaG``; JAX's ``sophia_g`` gets the run's seed anyway).
        """
        if self.mu_dtype is None and self.hessian_dtype is None:
            return {}
        forms: dict[str, Any] = {"mu_dtype": self.mu_dtype, "hessian_dtype": self.hessian_dtype}
        return forms if seed is None else {**forms, "seed": seed}

    def describe(self) -> str:
        """Short hyperparameter string for the console."""
        s = f"lr {self.lr:g}, betas ({self.b1:g}, {self.b2:g}), wd {self.weight_decay:g}"
        if self.name != "sophiag":
            return s
        s += f", rho {self.rho:g}, k {self.k}"
        for what, form in (("m", self.mu_dtype), ("h", self.hessian_dtype)):
            s += f", {what} {form}" if form is not None else ""
        return s


def sophiag_config(
    lr: float = 3e-4, rho: float = 0.03, k: int = 10, weight_decay: float = 0.2
) -> OptimConfig:
    """SophiaG's config; the defaults are the paper's GPT-2-small recipe."""
    return OptimConfig("sophiag", lr, 0.965, 0.99, weight_decay, rho=rho, k=k, eps=1e-15)


def adamw_config(lr: float = 6e-4, weight_decay: float = 0.1) -> OptimConfig:
    """AdamW's config; the defaults are the paper's GPT-2-small recipe."""
    return OptimConfig("adamw", lr, 0.9, 0.95, weight_decay, eps=1e-8)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything about a run except the optimizer.

    Attributes:
      model: the GPT's shape.
      steps: optimizer updates.
      batch_size: sequences per batch (``tokens_per_step = batch_size * block_size``).
      warmup: linear warm-up steps of the learning rate.
      min_lr_ratio: the cosine decays to ``min_lr_ratio * lr`` at the last step.
      grad_clip: global-norm gradient clipping before the optimizer.
      eval_interval: validation every this many steps (and at 0 and the end).
      eval_batches: validation batches (fixed, the same at every evaluation).
      seed: seeds the initial weights, the batch order and SophiaG's label sampling.
      hessian_batch: sequences of each batch (the first ones) behind SophiaG's
        Hessian refresh; ``None`` means the whole batch, with the training
        forward reused. A part of the batch costs its own forward and
        backward, ``hessian_batch / batch_size`` of a training step's, and the
        estimate is noisier; ``bs`` follows it (:attr:`hessian_tokens`), so
        ``rho * bs * h`` estimates the same Gauss-Newton diagonal.
      text: a text file to train on instead of the standard library.
      max_bytes: cap on the corpus bytes.
      sophia: SophiaG's hyperparameters.
      adamw: AdamW's hyperparameters.
    """

    model: ModelConfig = ModelConfig()
    steps: int = 500
    batch_size: int = 16
    warmup: int = 25
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 25
    eval_batches: int = 8
    seed: int = 0
    hessian_batch: int | None = None
    text: str | None = None
    max_bytes: int = 8_000_000
    sophia: OptimConfig = dataclasses.field(default_factory=sophiag_config)
    adamw: OptimConfig = dataclasses.field(default_factory=adamw_config)

    def __post_init__(self) -> None:
        # a larger value would refresh on the whole batch with bs counting labels it lacks
        if self.hessian_batch is not None and not 1 <= self.hessian_batch <= self.batch_size:
            raise ValueError(
                f"Invalid hessian_batch: {self.hessian_batch} "
                f"(allowed: None or 1 <= hessian_batch <= batch_size, {self.batch_size})"
            )

    @property
    def tokens_per_step(self) -> int:
        """Tokens per batch."""
        return self.batch_size * self.model.block_size

    @property
    def hessian_tokens(self) -> int:
        """Labels behind each GNB estimate: SophiaG's ``bs``."""
        seqs = self.batch_size if self.hessian_batch is None else self.hessian_batch
        return seqs * self.model.block_size

    @property
    def reuses_forward(self) -> bool:
        """Whether the Hessian refresh reuses the training forward (it covers the whole batch)."""
        return self.hessian_batch is None or self.hessian_batch == self.batch_size

    @property
    def optimizers(self) -> tuple[OptimConfig, OptimConfig]:
        """``(sophia, adamw)``, the order runs go in."""
        return (self.sophia, self.adamw)

    def eval_steps(self) -> list[int]:
        """Steps after which the validation loss is measured: 0, every interval, the last."""
        steps = list(range(0, self.steps, max(self.eval_interval, 1)))
        return steps + [self.steps] if steps[-1] != self.steps else steps

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data."""
        return dataclasses.asdict(self)


#: Named run shapes. ``default`` is sized for a 2-core CPU (a few minutes for
#: both optimizers); its learning rates are the winners of ``--sweep`` on that
#: shape (see :data:`sophia.demo.sweep.SWEEP_SOPHIA_LRS`), and its rho the one of
#: the sweep's best that keeps the win rate inside the paper's 0.1-0.5 band
#: (smaller rho clips more). Its Hessian refresh runs on a quarter of the batch
#: (``hessian_batch=4``: a quarter of a step's work instead of one extra
#: backward, at a final loss as close to the whole-batch refresh's as runs with
#: other seeds are; docs/demo_findings.md has the runs behind both choices).
#: ``tiny`` is a seconds-long smoke run with larger, unswept learning rates.
#: ``gpt2-small`` is the paper's model shape with a byte vocabulary, for an
#: accelerator, with the paper's GPT-2-small recipes.
PRESETS: dict[str, RunConfig] = {
    "tiny": RunConfig(
        model=ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32),
        steps=60,
        batch_size=8,
        warmup=6,
        eval_interval=10,
        eval_batches=4,
        max_bytes=1_000_000,
        sophia=sophiag_config(lr=3e-3, rho=0.03),
        adamw=adamw_config(lr=3e-3),
    ),
    "default": RunConfig(
        model=ModelConfig(n_layer=4, n_head=4, n_embd=64, block_size=64),
        steps=400,
        batch_size=16,
        warmup=20,
        eval_interval=20,
        eval_batches=8,
        hessian_batch=4,
        sophia=sophiag_config(lr=5e-4, rho=0.3),
        adamw=adamw_config(lr=4e-3),
    ),
    "gpt2-small": RunConfig(
        model=ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024),
        steps=5000,
        batch_size=8,
        warmup=250,
        eval_interval=250,
        eval_batches=20,
        max_bytes=0,
        sophia=sophiag_config(),
        adamw=adamw_config(),
    ),
}


#: One line per preset, for ``--help``.
PRESET_NOTES: dict[str, str] = {
    "tiny": "seconds: a smoke run (2 layers, width 32); learning rates not swept",
    "default": "the main job: minutes on a 2-core CPU (4 layers, width 64, 220K parameters); "
    "lr and rho from --sweep; Hessian refresh on 4 of the 16 sequences",
    "gpt2-small": "the paper's GPT-2-small shape (12 layers, width 768, context 1024) and "
    "recipes, with a byte vocabulary; for an accelerator",
}


class ConfigError(ValueError):
    """A run that cannot start as configured (its data or its output directory); says why."""


def check_corpus(cfg: RunConfig, corpus: Corpus) -> None:
    """Checks that both splits of ``corpus`` hold a window of ``cfg.model.block_size`` tokens.

    Raises:
      ConfigError: a split is too short; the message names the sizes and the ways out.
    """
    need = cfg.model.block_size + 2
    for split, tokens in (("training", corpus.train), ("validation", corpus.val)):
        if len(tokens) < need:
            raise ConfigError(
                f"the {split} split of {corpus.source} has {len(tokens):,} bytes, fewer than "
                f"block_size + 2 = {need}: use a longer text, a larger max_bytes (--max-bytes) or "
                "a smaller block_size (--block-size)"
            )

"""The framework-neutral driver: configs, schedule, training loop, comparison, sweep, outputs.

A framework plugs in as a *backend* module ``sophia.demo.train_<framework>``
that provides:

* ``make_trainer(cfg: RunConfig, opt: OptimConfig) -> Trainer``: the model at
  :func:`sophia.demo.model.init_numpy` ``(cfg.model, cfg.seed)``, the optimizer
  ``opt`` behind gradient clipping at ``cfg.grad_clip``, the learning rate
  :func:`lr_at` (warm-up then cosine) and the decay rule
  :func:`sophia.demo.model.decays`; see :class:`Trainer`.
* ``device_info() -> dict[str, str]``: the framework, its version and device.
* ``run(cfg, opt, corpus, *, progress=True) -> RunResult``: normally
  ``train(make_trainer(cfg, opt), cfg, opt, corpus, framework=..., progress=progress)``.

Everything else (data order, evaluation schedule, timing, the progress bar,
the table, ``run.json`` and ``loss.png``) lives here, so the frameworks are
compared on the same terms.

What a backend must match so that its runs are comparable with the JAX ones
(:mod:`sophia.demo.train_jax` is the reference):

* the model of :mod:`sophia.demo.model_jax` (pre-LN GPT, GELU with the tanh
  approximation, LayerNorm eps 1e-5, tied ``lm_head``), loaded from
  :func:`sophia.demo.model.init_numpy`;
* the loss: mean next-byte cross-entropy over the batch;
* global-norm clipping of the gradient at ``cfg.grad_clip`` before the optimizer;
* the learning rate :func:`lr_at` at update ``step`` (0-based), with weight
  decay multiplied by it (AdamW-style decoupled decay), applied only where
  :func:`sophia.demo.model.decays` says so;
* SophiaG: ``bs = cfg.hessian_tokens``, the labels behind each GNB estimate;
  :data:`REFRESH_RULE`: the Hessian is refreshed at the start of steps 0, k,
  2k, ..., before that step's update (``step % k == 0``, steps counted from
  0), from the same batch: labels sampled from the model's own softmax, the
  gradient of their mean cross-entropy squared (GNB). Over the whole batch
  (``cfg.hessian_batch`` unset) it reuses the training forward (one extra
  backward); over the first ``cfg.hessian_batch`` sequences it runs its own
  forward and backward on them (a fraction of a training step);
* ``Trainer.step`` returns the loss as a Python float only once the update has
  finished on the device (so the driver's timing is the step's).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import os
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sophia.demo.data import BatchSampler, Corpus, load_corpus
from sophia.demo.data import eval_batches as make_eval_batches
from sophia.demo.machine import machine_info
from sophia.demo.model import ModelConfig, n_params

__all__ = [
    "BEHIND_NOTE",
    "FRAMEWORKS",
    "REFRESH_RULE",
    "PRESETS",
    "PRESET_NOTES",
    "BackendUnavailable",
    "ConfigError",
    "OptimConfig",
    "RunConfig",
    "RunResult",
    "Trainer",
    "adamw",
    "behind_note",
    "check_corpus",
    "format_table",
    "load_backend",
    "lr_at",
    "plot_losses",
    "prepare_out_dir",
    "run_comparison",
    "run_sweep",
    "sophiag",
    "summarize",
    "train",
    "write_json",
]

FRAMEWORKS: tuple[str, ...] = ("jax", "torch")
#: When SophiaG's Hessian is refreshed, in the words the README and the notebooks use too
#: (the rule of ``sophia.jax``'s built-in refresh, ``count % k == 0``).
REFRESH_RULE: str = (
    "the Hessian is refreshed at the start of steps 0, k, 2k, ..., before that step's update"
)
#: Steps at the start of a run left out of the timings (compilation, warm caches).
TIMING_SKIP: int = 2


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
    """

    name: str
    lr: float
    b1: float
    b2: float
    weight_decay: float
    rho: float = 0.0
    k: int = 1
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in ("sophiag", "adamw"):
            raise ValueError(f"Invalid name: {self.name!r} (allowed: 'sophiag', 'adamw')")

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

    def describe(self) -> str:
        """Short hyperparameter string for the console."""
        s = f"lr {self.lr:g}, betas ({self.b1:g}, {self.b2:g}), wd {self.weight_decay:g}"
        return s + (f", rho {self.rho:g}, k {self.k}" if self.name == "sophiag" else "")


def sophiag(
    lr: float = 3e-4, rho: float = 0.03, k: int = 10, weight_decay: float = 0.2
) -> OptimConfig:
    """SophiaG's config; the defaults are the paper's GPT-2-small recipe."""
    return OptimConfig("sophiag", lr, 0.965, 0.99, weight_decay, rho=rho, k=k, eps=1e-15)


def adamw(lr: float = 6e-4, weight_decay: float = 0.1) -> OptimConfig:
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
    sophia: OptimConfig = dataclasses.field(default_factory=sophiag)
    adamw: OptimConfig = dataclasses.field(default_factory=adamw)

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
#: shape (see :data:`SWEEP_SOPHIA_LRS`); its rho is 0.3: the sweep's best rhos
#: at that lr (0.1, 0.03, 0.3) end within 0.009 nats of each other, and 0.3 is
#: the one measured with a win rate inside the paper's 0.1-0.5 band (0.1 gave
#: 0.06; smaller rho clips more). Its Hessian refresh runs on a
#: quarter of the batch (``hessian_batch=4``: a quarter of a step's work instead
#: of one extra backward, the final loss within 0.013 nats of the whole-batch
#: refresh at the same rho in either framework; see docs/demo_findings.md).
#: ``tiny`` is a seconds-long
#: smoke run with larger, unswept learning rates. ``gpt2-small`` is the
#: paper's model shape with a byte vocabulary, for an accelerator, with the
#: paper's GPT-2-small recipes.
PRESETS: dict[str, RunConfig] = {
    "tiny": RunConfig(
        model=ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32),
        steps=60,
        batch_size=8,
        warmup=6,
        eval_interval=10,
        eval_batches=4,
        max_bytes=1_000_000,
        sophia=sophiag(lr=3e-3, rho=0.03),
        adamw=adamw(lr=3e-3),
    ),
    "default": RunConfig(
        model=ModelConfig(n_layer=4, n_head=4, n_embd=64, block_size=64),
        steps=400,
        batch_size=16,
        warmup=20,
        eval_interval=20,
        eval_batches=8,
        hessian_batch=4,
        sophia=sophiag(lr=5e-4, rho=0.3),
        adamw=adamw(lr=4e-3),
    ),
    "gpt2-small": RunConfig(
        model=ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024),
        steps=5000,
        batch_size=8,
        warmup=250,
        eval_interval=250,
        eval_batches=20,
        max_bytes=0,
        sophia=sophiag(),
        adamw=adamw(),
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

#: Said under the table and in the plot's title when SophiaG does not reach AdamW's loss.
BEHIND_NOTE: str = (
    "SophiaG behind AdamW is the expected result at this scale (the paper's gains are at "
    'GPT-2 scale over 100K+ steps): see "The main job" in README.md and docs/demo_findings.md'
)


class ConfigError(ValueError):
    """A run that cannot start as configured (its data or its output directory); says why."""


def prepare_out_dir(path: str | os.PathLike[str]) -> Path:
    """Creates the output directory and checks that files can be written there.

    Called before the first training step, so that an unwritable directory is
    found at once instead of after the whole run.

    Args:
      path: the directory (created with its parents when missing).

    Returns:
      The directory as an absolute path.

    Raises:
      ConfigError: it cannot be created or written to; the message says why.
    """
    out = Path(path).expanduser().absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(f"cannot write to {out}: {reason}") from e
    return out


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


def behind_note(summary: dict[str, dict[str, Any]]) -> str | None:
    """:data:`BEHIND_NOTE` when SophiaG did not reach AdamW's final loss in some framework."""
    behind = any(
        "steps_to_adamw_final" in row and row["steps_to_adamw_final"] is None
        for row in summary.values()
    )
    return BEHIND_NOTE if behind else None


def lr_at(step: int, opt: OptimConfig, cfg: RunConfig) -> float:
    """The learning rate of update ``step`` (0-based): linear warm-up, then cosine decay.

    ``lr * (step + 1) / warmup`` for ``step < warmup``; afterwards a cosine
    from ``lr`` down to ``min_lr_ratio * lr`` at step ``steps - 1``. Every
    backend must reproduce this (the JAX one is checked against it).
    """
    peak, floor = opt.lr, opt.lr * cfg.min_lr_ratio
    if step < cfg.warmup:
        return peak * (step + 1) / cfg.warmup
    span = max(cfg.steps - 1 - cfg.warmup, 1)
    frac = min(max((step - cfg.warmup) / span, 0.0), 1.0)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * frac))


class Trainer(Protocol):
    """What a backend's ``make_trainer`` returns: a model and optimizer ready to step.

    A trainer may also have ``diagnostics() -> dict[str, float]`` (SophiaG's
    ``win_rate``, ``rho``, ``hessian_norm``...); :func:`train` then records
    it at every evaluation.
    """

    n_params: int

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One update on the batch ``(x, y)``; returns the training loss, computation finished."""
        ...

    def evaluate(self, batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
        """Mean loss over ``batches`` at the current parameters (no update)."""
        ...

    def opt_state_bytes(self) -> int:
        """Bytes held by the optimizer's state."""
        ...


@dataclasses.dataclass
class RunResult:
    """What one training run recorded.

    Attributes:
      framework: ``"jax"`` or ``"torch"``.
      optimizer: the :class:`OptimConfig` used.
      train_loss: training loss of every step.
      val_steps: steps at which the validation loss was taken.
      val_loss: the validation losses.
      step_ms: wall-clock of every step (update only, no evaluation).
      refresh: whether each step refreshed the Hessian.
      n_params: model parameters.
      tokens_per_step: tokens in each batch.
      opt_state_bytes: bytes of the optimizer state.
      wall_s: wall-clock of the whole run (steps, evaluations, compilation).
      diverged: the loss became NaN or infinite and the run stopped.
      diagnostics: the trainer's ``diagnostics()`` at each evaluation, if it has them.
    """

    framework: str
    optimizer: OptimConfig
    train_loss: list[float]
    val_steps: list[int]
    val_loss: list[float]
    step_ms: list[float]
    refresh: list[bool]
    n_params: int
    tokens_per_step: int
    opt_state_bytes: int
    wall_s: float
    diverged: bool = False
    diagnostics: list[dict[str, float]] = dataclasses.field(default_factory=list)

    @property
    def final_val(self) -> float:
        """The last validation loss (``inf`` after a divergence)."""
        return self.val_loss[-1] if self.val_loss and not self.diverged else math.inf

    def timings(self) -> dict[str, float]:
        """Mean and median ms/step, and the means over refresh and plain steps.

        The first :data:`TIMING_SKIP` steps (compilation) are left out.
        """
        ms = np.asarray(self.step_ms[TIMING_SKIP:], np.float64)
        ref = np.asarray(self.refresh[TIMING_SKIP:], bool)
        out = {"ms_per_step": float(ms.mean()) if ms.size else math.nan}
        out["ms_per_step_median"] = float(np.median(ms)) if ms.size else math.nan
        out["compile_ms"] = float(self.step_ms[0]) if self.step_ms else math.nan
        if ref.any() and (~ref).any():
            out["plain_ms"] = float(ms[~ref].mean())
            out["refresh_ms"] = float(ms[ref].mean())
            out["plain_ms_median"] = float(np.median(ms[~ref]))
            out["refresh_ms_median"] = float(np.median(ms[ref]))
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record of the run."""
        d = dataclasses.asdict(self)
        d["optimizer"] = dataclasses.asdict(self.optimizer)
        d["label"] = self.optimizer.label
        d["final_val"] = _finite_or_none(self.final_val)
        d["timings"] = self.timings()
        d["val_loss"] = [_finite_or_none(v) for v in self.val_loss]
        d["train_loss"] = [_finite_or_none(v) for v in self.train_loss]
        return d


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


class _Progress:
    """A tqdm bar with loss and tokens/s, or nothing."""

    def __init__(self, enabled: bool, total: int, desc: str, tokens_per_step: int) -> None:
        self.bar = None
        self.tokens = tokens_per_step
        self.ema_loss: float | None = None
        self.val: float | None = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=True)

    def update(self, loss: float, seconds: float) -> None:
        if self.bar is None:
            return
        self.ema_loss = loss if self.ema_loss is None else 0.9 * self.ema_loss + 0.1 * loss
        post = f"loss {self.ema_loss:.3f}, {self.tokens / max(seconds, 1e-9):,.0f} tok/s"
        if self.val is not None:
            post += f", val {self.val:.3f}"
        self.bar.set_postfix_str(post, refresh=False)
        self.bar.update(1)

    def set_val(self, loss: float) -> None:
        self.val = loss
        if self.bar is not None and self.ema_loss is not None:
            self.bar.set_postfix_str(
                f"loss {self.ema_loss:.3f}, val {self.val:.3f}",
                refresh=self.bar.n == self.bar.total,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(
    trainer: Trainer,
    cfg: RunConfig,
    opt: OptimConfig,
    corpus: Corpus,
    *,
    framework: str,
    progress: bool = True,
) -> RunResult:
    """The training loop every backend shares.

    Batches come from :class:`sophia.demo.data.BatchSampler` seeded with
    ``cfg.seed + 1`` and the validation set from ``cfg.seed + 2``, so every
    optimizer and framework sees the same data in the same order. A step's
    time is measured around ``trainer.step`` (which returns a finished loss);
    evaluations are not timed. A NaN or infinite loss stops the run.

    Args:
      trainer: from the backend's ``make_trainer(cfg, opt)``.
      cfg: the run.
      opt: the optimizer the trainer was built with.
      corpus: the data.
      framework: the backend's name, for the record.
      progress: show a tqdm bar.

    Returns:
      The :class:`RunResult`.
    """
    start = time.perf_counter()
    block = cfg.model.block_size
    sampler = BatchSampler(corpus.train, cfg.batch_size, block, cfg.seed + 1)
    val_set = make_eval_batches(corpus.val, cfg.eval_batches, cfg.batch_size, block, cfg.seed + 2)
    evals = set(cfg.eval_steps())
    result = RunResult(
        framework, opt, [], [], [], [], [], trainer.n_params, cfg.tokens_per_step, 0, 0.0
    )
    bar = _Progress(progress, cfg.steps, f"{framework} {opt.label}", cfg.tokens_per_step)

    diagnostics = getattr(trainer, "diagnostics", None)

    def evaluate(step: int) -> None:
        loss = float(trainer.evaluate(val_set))
        result.val_steps.append(step)
        result.val_loss.append(loss)
        diag = diagnostics() if diagnostics is not None else None
        if diag:
            result.diagnostics.append({"step": step, **diag})
        bar.set_val(loss)

    try:
        evaluate(0)
        for step in range(cfg.steps):
            x, y = sampler.next()
            t0 = time.perf_counter()
            loss = float(trainer.step(x, y))
            dt = time.perf_counter() - t0
            result.train_loss.append(loss)
            result.step_ms.append(1e3 * dt)
            result.refresh.append(opt.refreshes(step))
            bar.update(loss, dt)
            if not math.isfinite(loss):
                result.diverged = True
                break
            if step + 1 in evals:
                evaluate(step + 1)
    finally:
        bar.close()
    result.opt_state_bytes = int(trainer.opt_state_bytes())
    result.wall_s = time.perf_counter() - start
    return result


class BackendUnavailable(RuntimeError):
    """The requested framework, its Sophia port or its demo backend cannot be imported."""


def load_backend(framework: str) -> Any:
    """The backend module ``sophia.demo.train_<framework>``.

    Raises:
      BackendUnavailable: the framework, its Sophia port or its backend module
        is missing; the message says which.
    """
    if framework not in FRAMEWORKS:
        raise ValueError(f"Invalid framework: {framework!r} (allowed: {', '.join(FRAMEWORKS)})")
    needs = {"jax": ("jax", "optax", "sophia.jax"), "torch": ("torch", "sophia.torch")}[framework]
    for mod in needs:
        try:
            found = importlib.util.find_spec(mod) is not None
        except ImportError:
            found = False
        if not found:
            raise BackendUnavailable(
                f"--framework {framework}: {mod} is not importable: install it "
                f"(pip install 'sophiag[{framework},demo]')"
            )
    name = f"sophia.demo.train_{framework}"
    if importlib.util.find_spec(name) is None:
        others = " or ".join(f"--framework {fw}" for fw in FRAMEWORKS if fw != framework)
        raise BackendUnavailable(
            f"--framework {framework}: the demo's {framework} backend ({name}) is missing from "
            f"this installation; run with {others}"
        )
    return importlib.import_module(name)


def summarize(results: Sequence[RunResult]) -> dict[str, dict[str, Any]]:
    """Per framework: each optimizer's numbers and SophiaG against AdamW.

    ``steps_to_adamw_final`` is the first evaluation step at which SophiaG's
    validation loss is at or below AdamW's final one (``None``: not reached);
    ``steps_ratio`` divides it by AdamW's step count. ``time_ratio`` is
    SophiaG's mean ms/step over AdamW's, ``refresh_overhead`` SophiaG's mean
    refresh-step time over its plain-step time.
    """
    out: dict[str, dict[str, Any]] = {}
    for fw in dict.fromkeys(r.framework for r in results):
        runs = {r.optimizer.name: r for r in results if r.framework == fw}
        row: dict[str, Any] = {}
        for name, r in runs.items():
            t = r.timings()
            row[name] = {
                "final_val": _finite_or_none(r.final_val),
                "best_val": _finite_or_none(min(r.val_loss, default=math.inf)),
                "steps": len(r.train_loss),
                "diverged": r.diverged,
                "ms_per_step": t["ms_per_step"],
                "tokens_per_s": 1e3 * r.tokens_per_step / t["ms_per_step"],
                "opt_state_bytes": r.opt_state_bytes,
                "opt_state_per_param_bytes": r.opt_state_bytes / max(r.n_params, 1),
                **{k: t[k] for k in ("plain_ms", "refresh_ms") if k in t},
            }
            if "plain_ms" in t:
                row[name]["refresh_overhead"] = t["refresh_ms"] / t["plain_ms"]
            if r.diagnostics and "win_rate" in r.diagnostics[-1]:
                rates = [d["win_rate"] for d in r.diagnostics[1:]] or [math.nan]
                row[name]["final_win_rate"] = r.diagnostics[-1]["win_rate"]
                row[name]["mean_win_rate"] = float(np.mean(rates))
        if "sophiag" in runs and "adamw" in runs:
            s, a = runs["sophiag"], runs["adamw"]
            target = a.final_val
            reached = next((st for st, v in zip(s.val_steps, s.val_loss) if v <= target), None)
            row["adamw_final_val"] = _finite_or_none(target)
            row["steps_to_adamw_final"] = reached
            row["steps_ratio"] = None if reached is None else reached / max(len(a.train_loss), 1)
            row["time_ratio"] = row["sophiag"]["ms_per_step"] / row["adamw"]["ms_per_step"]
        out[fw] = row
    return out


def _fmt(x: Any, spec: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """The comparison table printed at the end of a run."""
    lines = []
    for fw, row in summary.items():
        s, a = row.get("sophiag", {}), row.get("adamw", {})
        reached = row.get("steps_to_adamw_final")
        if "steps_to_adamw_final" not in row:
            reach = "-"
        elif reached is None:
            reach = "not reached"
        else:
            reach = f"{reached} ({row['steps_ratio']:.2f}x)"
        mib = 1024**2
        rows = [
            (
                "final val loss (nats)",
                _fmt(s.get("final_val"), ".4f"),
                _fmt(a.get("final_val"), ".4f"),
            ),
            ("steps to AdamW's final val loss", reach, _fmt(a.get("steps"), "d")),
            (
                "ms/step (mean)",
                _fmt(s.get("ms_per_step"), ".1f"),
                _fmt(a.get("ms_per_step"), ".1f"),
            ),
            (
                "  plain / Hessian-refresh steps",
                f"{_fmt(s.get('plain_ms'), '.1f')} / {_fmt(s.get('refresh_ms'), '.1f')}"
                f" ({_fmt(s.get('refresh_overhead'), '.2f')}x)",
                "-",
            ),
            ("  step time vs AdamW", _fmt(row.get("time_ratio"), ".2f") + "x", "1.00x"),
            (
                "SophiaG win rate (mean / last eval)",
                f"{_fmt(s.get('mean_win_rate'), '.2f')} / {_fmt(s.get('final_win_rate'), '.2f')}",
                "-",
            ),
            (
                "tokens/s",
                _fmt(s.get("tokens_per_s"), ",.0f"),
                _fmt(a.get("tokens_per_s"), ",.0f"),
            ),
            (
                "optimizer state (MiB)",
                _fmt(s.get("opt_state_bytes", math.nan) / mib, ".2f")
                + f" ({_fmt(s.get('opt_state_per_param_bytes'), '.1f')} B/param)",
                _fmt(a.get("opt_state_bytes", math.nan) / mib, ".2f")
                + f" ({_fmt(a.get('opt_state_per_param_bytes'), '.1f')} B/param)",
            ),
        ]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len("SophiaG"), *(len(r[1]) for r in rows))
        w2 = max(len("AdamW"), *(len(r[2]) for r in rows))
        lines.append(f"[{fw}]".ljust(w0) + "  " + "SophiaG".rjust(w1) + "  " + "AdamW".rjust(w2))
        lines.append("-" * (w0 + w1 + w2 + 4))
        lines += [f"{r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]:>{w2}}" for r in rows]
        lines.append("")
    return "\n".join(lines).rstrip()


def _smooth(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Centred running mean of a per-step loss curve: ``(steps, means)`` for plotting."""
    v = np.asarray(values, np.float64)
    w = max(3, len(v) // 40) | 1
    if len(v) < w:
        return np.arange(1, len(v) + 1), v
    means = np.convolve(v, np.ones(w) / w, mode="valid")
    return np.arange(1, len(means) + 1) + w // 2, means


def plot_losses(
    results: Sequence[RunResult], path: str | os.PathLike[str], title: str = ""
) -> Path:
    """Writes the loss curves (training, smoothed, and validation) of ``results`` to a PNG.

    The left panel shows whole runs, the right one the second half, where the
    optimizers separate. Matplotlib runs on the Agg backend (no display needed).

    Args:
      results: the runs to draw.
      path: the PNG to write.
      title: the figure's title.

    Returns:
      The path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    colors = {"sophiag": "tab:blue", "adamw": "tab:orange"}
    styles = {"jax": "-", "torch": "--"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    n_steps = max((len(r.train_loss) for r in results), default=1)
    for ax, start in zip(axes, (0, n_steps // 2)):
        for r in results:
            c, ls = colors[r.optimizer.name], styles.get(r.framework, "-.")
            name = f"{r.optimizer.label} ({r.framework})"
            steps, train_s = _smooth([v if math.isfinite(v) else np.nan for v in r.train_loss])
            keep = steps >= start
            ax.plot(
                steps[keep], train_s[keep], ls, color=c, alpha=0.35, lw=1, label=f"{name} train"
            )
            vs = np.asarray(r.val_steps)
            vl = np.asarray(r.val_loss)
            keep = vs >= start
            ax.plot(vs[keep], vl[keep], ls, color=c, marker="o", ms=3, lw=1.8, label=f"{name} val")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/byte)")
        ax.grid(alpha=0.3)
    axes[0].set_title("whole run")
    axes[1].set_title("second half")
    finals = [v for r in results for v in r.val_loss[1:] if math.isfinite(v)]
    if finals:
        axes[0].set_ylim(min(finals) - 0.1, max(finals[: len(finals)]) + 0.1)
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _clean(x: Any) -> Any:
    """Replaces non-finite floats by ``None`` so the JSON is strict."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(data: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Writes ``data`` as strict JSON (NaN and infinity become ``null``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_clean(json.loads(json.dumps(data, default=_json_default))), indent=1)
    path.write_text(text + "\n")
    return path


def _describe_run(cfg: RunConfig, corpus: Corpus) -> list[str]:
    m = cfg.model
    return [
        f"data: {corpus.describe()}",
        f"model: GPT {m.n_layer} layers, {m.n_head} heads, width {m.n_embd}, context "
        f"{m.block_size}, {n_params(m):,} parameters",
        f"run: {cfg.steps} steps x {cfg.batch_size} x {m.block_size} = "
        f"{cfg.tokens_per_step:,} tokens/step, warm-up {cfg.warmup}, cosine to "
        f"{cfg.min_lr_ratio:g} lr, clip {cfg.grad_clip:g}, eval every {cfg.eval_interval} "
        f"on {cfg.eval_batches} batches, seed {cfg.seed}",
        f"SophiaG Hessian refresh: {REFRESH_RULE} (k = {cfg.sophia.k}); "
        + (
            "whole batch, training forward reused"
            if cfg.reuses_forward
            else f"first {cfg.hessian_batch} of {cfg.batch_size} sequences, own forward"
        )
        + f", bs {cfg.hessian_tokens:,}",
    ]


def _describe_machine(info: dict[str, Any]) -> list[str]:
    lines = [
        f"machine: {info['cpu']} ({info['cpu_count']} cpus), {info['platform']}, "
        f"Python {info['python']}, NumPy {info['numpy']}"
    ]
    for fw in FRAMEWORKS:
        if fw in info:
            lines.append(
                f"{fw}: " + ", ".join(f"{k} {v}" for k, v in info[fw].items() if k != "framework")
            )
    return lines


def run_comparison(
    cfg: RunConfig,
    frameworks: Sequence[str] = ("jax",),
    out_dir: str | os.PathLike[str] | None = "runs/demo",
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The main job: SophiaG and AdamW in each framework; the table, ``run.json`` and ``loss.png``.

    Args:
      cfg: the run.
      frameworks: backends to run, in order.
      out_dir: where ``run.json`` and ``loss.png`` go (``None``: write nothing).
      progress: show tqdm bars.
      log: where the console lines go.

    Returns:
      The record written to ``run.json``.

    Raises:
      BackendUnavailable: before any training, if a framework cannot run.
      ConfigError: before any training, if ``out_dir`` cannot be written or the
        corpus is too short for the model's context.
    """
    start = time.perf_counter()
    out = prepare_out_dir(out_dir) if out_dir is not None else None
    backends = [load_backend(fw) for fw in frameworks]
    corpus = load_corpus(cfg.text, cfg.max_bytes)
    check_corpus(cfg, corpus)
    info = machine_info(backends)
    for line in _describe_machine(info) + _describe_run(cfg, corpus):
        log(line)
    results = []
    for fw, backend in zip(frameworks, backends):
        for opt in cfg.optimizers:
            log(f"{fw} {opt.label}: {opt.describe()}")
            results.append(backend.run(cfg, opt, corpus, progress=progress))
    summary = summarize(results)
    table = format_table(summary)
    elapsed = time.perf_counter() - start
    note = behind_note(summary)
    log("")
    log(table)
    if note:
        log(note)
    log(f"\nelapsed {elapsed:.1f} s on {info['cpu']} ({info['cpu_count']} cpus)")
    record = {
        "config": cfg.to_dict(),
        "frameworks": list(frameworks),
        "machine": info,
        "corpus": {
            "source": corpus.source,
            "n_files": corpus.n_files,
            "n_val_files": corpus.n_val_files,
            "train_bytes": len(corpus.train),
            "val_bytes": len(corpus.val),
            "sha256": corpus.digest,
        },
        "n_params": n_params(cfg.model),
        "summary": summary,
        "table": table,
        "results": [r.to_dict() for r in results],
        "elapsed_s": elapsed,
    }
    if out is not None:
        write_json(record, out / "run.json")
        m = cfg.model
        title = (
            f"GPT {m.n_layer}x{m.n_embd} (ctx {m.block_size}), {cfg.steps} steps of "
            f"{cfg.tokens_per_step} tokens - {Path(corpus.source).name}"
            + (" standard library" if cfg.text is None else "")
            + (f"\n{textwrap.fill(note, 110)}" if note else "")
        )
        plot_losses(results, out / "loss.png", title)
        log(f"wrote {out / 'run.json'} and {out / 'loss.png'}")
    return record


#: The sweep's default grid (peak learning rates; SophiaG's rho).
SWEEP_SOPHIA_LRS: tuple[float, ...] = (2.5e-4, 5e-4, 1e-3)
SWEEP_RHOS: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
SWEEP_ADAMW_LRS: tuple[float, ...] = (1e-3, 2e-3, 4e-3, 8e-3)


def run_sweep(
    cfg: RunConfig,
    framework: str = "jax",
    out_dir: str | os.PathLike[str] | None = "runs/demo",
    *,
    sophia_lrs: Sequence[float] = SWEEP_SOPHIA_LRS,
    rhos: Sequence[float] = SWEEP_RHOS,
    adamw_lrs: Sequence[float] = SWEEP_ADAMW_LRS,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Grid search: SophiaG over ``lr x rho``, AdamW over ``lr``; everything else from ``cfg``.

    Each configuration is a full run of ``cfg`` (same init, data order and
    schedule), ranked by its final validation loss. Writes ``sweep.json``.

    Args:
      cfg: the run every configuration uses (``cfg.sophia``/``cfg.adamw``
        give the settings that are not swept).
      framework: the backend.
      out_dir: where ``sweep.json`` goes (``None``: nowhere).
      sophia_lrs: SophiaG's peak learning rates.
      rhos: SophiaG's rho values.
      adamw_lrs: AdamW's peak learning rates.
      progress: show a tqdm bar per run.
      log: where the console lines go.

    Returns:
      ``{"config", "machine", "runs": [...], "best": {"sophiag": ..., "adamw": ...}, "table"}``.

    Raises:
      BackendUnavailable: before any training, if the framework cannot run.
      ConfigError: before any training, if ``out_dir`` cannot be written or the
        corpus is too short for the model's context.
    """
    start = time.perf_counter()
    out = prepare_out_dir(out_dir) if out_dir is not None else None
    backend = load_backend(framework)
    corpus = load_corpus(cfg.text, cfg.max_bytes)
    check_corpus(cfg, corpus)
    info = machine_info([backend])
    for line in _describe_machine(info) + _describe_run(cfg, corpus):
        log(line)
    opts = [dataclasses.replace(cfg.sophia, lr=lr, rho=rho) for lr in sophia_lrs for rho in rhos]
    opts += [dataclasses.replace(cfg.adamw, lr=lr) for lr in adamw_lrs]
    runs = []
    for i, opt in enumerate(opts):
        log(f"[{i + 1}/{len(opts)}] {opt.label}: {opt.describe()}")
        r = backend.run(cfg, opt, corpus, progress=progress)
        log(
            f"    final val {r.final_val:.4f}, best {min(r.val_loss, default=math.inf):.4f}"
            f"{' (diverged)' if r.diverged else ''}, {r.timings()['ms_per_step']:.0f} ms/step, "
            f"{r.wall_s:.0f} s"
        )
        runs.append(
            {
                "optimizer": opt.name,
                "lr": opt.lr,
                "rho": opt.rho if opt.name == "sophiag" else None,
                "final_val": _finite_or_none(r.final_val),
                "best_val": _finite_or_none(min(r.val_loss, default=math.inf)),
                "diverged": r.diverged,
                "val_steps": r.val_steps,
                "val_loss": [_finite_or_none(v) for v in r.val_loss],
                "ms_per_step": r.timings()["ms_per_step"],
            }
        )
    best = {}
    for name in ("sophiag", "adamw"):
        cands = [r for r in runs if r["optimizer"] == name and r["final_val"] is not None]
        best[name] = min(cands, key=lambda r: r["final_val"]) if cands else None
    table = _sweep_table(runs, best)
    log("")
    log(table)
    flags = []
    if best["sophiag"]:
        flags.append(f"--sophia-lr {best['sophiag']['lr']:g} --rho {best['sophiag']['rho']:g}")
    if best["adamw"]:
        flags.append(f"--adamw-lr {best['adamw']['lr']:g}")
    log("best: " + " ".join(flags))
    elapsed = time.perf_counter() - start
    log(f"elapsed {elapsed:.1f} s")
    record = {
        "config": cfg.to_dict(),
        "framework": framework,
        "machine": info,
        "runs": runs,
        "best": best,
        "table": table,
        "elapsed_s": elapsed,
    }
    if out is not None:
        write_json(record, out / "sweep.json")
        log(f"wrote {out / 'sweep.json'}")
    return record


def _sweep_cell(run: dict[str, Any]) -> str:
    return "diverged" if run["diverged"] else _fmt(run["final_val"], ".4f")


def _sweep_table(runs: Sequence[dict[str, Any]], best: dict[str, Any]) -> str:
    lines = []
    s_runs = [r for r in runs if r["optimizer"] == "sophiag"]
    if s_runs:
        lrs = list(dict.fromkeys(r["lr"] for r in s_runs))
        rhos = list(dict.fromkeys(r["rho"] for r in s_runs))
        lines.append("SophiaG final val loss (rows: lr, columns: rho)")
        lines.append("lr \\ rho".ljust(10) + "".join(f"{rho:>10g}" for rho in rhos))
        for lr in lrs:
            cells = []
            for rho in rhos:
                r = next(x for x in s_runs if x["lr"] == lr and x["rho"] == rho)
                mark = "*" if r is best.get("sophiag") else " "
                cells.append(
                    f"{_fmt(r['final_val'], '.4f') if not r['diverged'] else 'diverged':>9}{mark}"
                )
            lines.append(f"{lr:<10g}" + "".join(cells))
    a_runs = [r for r in runs if r["optimizer"] == "adamw"]
    if a_runs:
        lines.append("")
        lines.append("AdamW final val loss")
        lines.append("lr".ljust(10) + "".join(f"{r['lr']:>10g}" for r in a_runs))
        cells = []
        for r in a_runs:
            mark = "*" if r is best.get("adamw") else " "
            cells.append(
                f"{_fmt(r['final_val'], '.4f') if not r['diverged'] else 'diverged':>9}{mark}"
            )
        lines.append(" " * 10 + "".join(cells))
    return "\n".join(lines)

"""The training loop every backend shares, and what a backend must provide.

A framework plugs in as a *backend* module ``sophia.demo.train_<framework>``
that provides:

* ``make_trainer(cfg: RunConfig, opt: OptimConfig) -> Trainer``: the model at
  :func:`sophia.demo.model.init_numpy` ``(cfg.model, cfg.seed)``, the optimizer
  ``opt`` behind gradient clipping at ``cfg.grad_clip``, the learning rate
  :func:`sophia.demo.schedule.lr_at` (warm-up then cosine) and the decay rule
  :func:`sophia.demo.model.decays`; see :class:`Trainer`.
* ``device_info() -> dict[str, str]``: the framework, its version and device.
* ``run(cfg, opt, corpus, *, progress=True) -> RunResult``: normally
  ``train(make_trainer(cfg, opt), cfg, opt, corpus, framework=..., progress=progress)``.

Everything else (data order, evaluation schedule, timing, the progress bar
here; the table, ``run.json`` and ``loss.png`` in :mod:`sophia.demo.report`
and :mod:`sophia.demo.plot`) is shared, so the frameworks are compared on the
same terms.

What a backend must match so that its runs are comparable with the JAX ones
(:mod:`sophia.demo.train_jax` is the reference):

* the model of :mod:`sophia.demo.model_jax` (pre-LN GPT, GELU with the tanh
  approximation, LayerNorm eps 1e-5, tied ``lm_head``), loaded from
  :func:`sophia.demo.model.init_numpy`;
* the loss: mean next-byte cross-entropy over the batch;
* global-norm clipping of the gradient at ``cfg.grad_clip`` before the optimizer;
* the learning rate :func:`sophia.demo.schedule.lr_at` at update ``step`` (0-based), with weight
  decay multiplied by it (AdamW-style decoupled decay), applied only where
  :func:`sophia.demo.model.decays` says so;
* SophiaG: ``bs = cfg.hessian_tokens``, the labels behind each GNB estimate;
  :data:`sophia.demo.config.REFRESH_RULE`: the Hessian is refreshed at the start of steps 0, k,
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
import math
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from sophia.demo.config import OptimConfig, RunConfig
from sophia.demo.data import BatchSampler, Corpus
from sophia.demo.data import eval_batches as make_eval_batches

__all__ = ["TIMING_SKIP", "RunResult", "Trainer", "finite_or_none", "train"]

#: Steps at the start of a run left out of the timings (compilation, warm caches).
TIMING_SKIP: int = 2


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
        d["final_val"] = finite_or_none(self.final_val)
        d["timings"] = self.timings()
        d["val_loss"] = [finite_or_none(v) for v in self.val_loss]
        d["train_loss"] = [finite_or_none(v) for v in self.train_loss]
        return d


def finite_or_none(x: float) -> float | None:
    """``x`` as a float, or ``None`` when it is NaN or infinite (strict JSON has neither)."""
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

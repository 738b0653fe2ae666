"""The demo's PyTorch backend: the GPT of :mod:`sophia.demo.model_torch` with torch optimizers.

SophiaG is :class:`sophia.torch.SophiaG`. The Hessian is refreshed at the
start of steps 0, k, 2k, ..., before that step's update (the rule of
:mod:`sophia.jax`'s built-in refresh): on those steps
``update_hessian(logits=logits)``, after the forward and before
``loss.backward()`` and ``step()``, samples labels from the training forward's
logits and backpropagates their loss through the same graph, so a refresh
costs one extra backward and no extra forward. AdamW is
:class:`torch.optim.AdamW`. Both get the gradient after
:func:`torch.nn.utils.clip_grad_norm_`, the learning rate
:func:`sophia.demo.schedule.lr_at` set on every param group before each update,
and two param groups split by :func:`sophia.demo.model.decays` (weight decay
only on the first; both optimizers multiply it by the learning rate, like
the JAX backend's). Runs on CUDA when available, else on the CPU.

The model runs eagerly. On the CPU both optimizers take their fused path
(SophiaG's native kernel, torch's fused AdamW): one call over all
parameters each, where the for-loop paths launch several kernels per
tensor, which dominates at the demo's many small tensors (docs/demo_findings.md
has the timings). Elsewhere they use torch's default for the device (foreach
on CUDA). On a CPU shared with other work, torch's intra-op threads wait on
each other at every kernel: ``OMP_NUM_THREADS=1`` can then be much faster.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from sophia.demo import model_torch
from sophia.demo.config import OptimConfig, RunConfig
from sophia.demo.data import Corpus
from sophia.demo.schedule import lr_at
from sophia.demo.train import RunResult, train
from sophia.torch import SophiaG

__all__ = [
    "TorchTrainer",
    "default_device",
    "device_info",
    "make_optimizer",
    "make_trainer",
    "run",
]


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_optimizer(
    opt: OptimConfig, cfg: RunConfig, model: model_torch.GPT
) -> torch.optim.Optimizer:
    """SophiaG or AdamW over ``model`` with two param groups: decayed and not decayed.

    The learning rate starts at :func:`sophia.demo.schedule.lr_at` ``(0)``; the
    trainer sets it again before every update. SophiaG's ``bs`` is
    ``cfg.hessian_tokens`` (the labels behind each GNB estimate); its state forms
    are ``opt``'s (:meth:`~sophia.demo.config.OptimConfig.state_forms`), rounded
    with ``cfg.seed``.

    Args:
      opt: the optimizer's hyperparameters.
      cfg: the run (tokens per step, schedule).
      model: the GPT to optimize.

    Returns:
      The optimizer: fused on the CPU, torch's default implementation for
      the device elsewhere.
    """
    decayed, kept = model_torch.decay_split(model)
    groups = [
        {"params": decayed, "weight_decay": opt.weight_decay},
        {"params": kept, "weight_decay": 0.0},
    ]
    lr = lr_at(0, opt, cfg)
    fused = True if next(model.parameters()).device.type == "cpu" else None
    if opt.name == "sophiag":
        return SophiaG(
            groups,
            lr=lr,
            betas=(opt.b1, opt.b2),
            rho=opt.rho,
            bs=cfg.hessian_tokens,
            eps=opt.eps,
            fused=fused,
            **opt.state_forms(seed=cfg.seed),
        )
    return torch.optim.AdamW(groups, lr=lr, betas=(opt.b1, opt.b2), eps=opt.eps, fused=fused)


def _nbytes(x: Any) -> int:
    """Bytes of the tensors in a nest of dicts, lists and tuples."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    return 0


class TorchTrainer:
    """The GPT and one optimizer, stepping eagerly on :func:`default_device`.

    Args:
      cfg: the run (model shape, schedule, clipping, seed).
      opt: the optimizer.
      device: where to train (default: :func:`default_device`).
    """

    def __init__(
        self, cfg: RunConfig, opt: OptimConfig, device: str | torch.device | None = None
    ) -> None:
        self.cfg, self.opt = cfg, opt
        self.device = torch.device(device) if device is not None else default_device()
        torch.manual_seed(cfg.seed)
        self.model = model_torch.init_model(cfg.model, cfg.seed, self.device)
        self.params = list(self.model.parameters())
        self.n_params = sum(p.numel() for p in self.params)
        self.optimizer = make_optimizer(opt, cfg, self.model)
        # SophiaG's label sampling gets its own stream, seeded like the JAX backend's,
        # so evaluations or other torch code drawing random numbers do not shift it
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)
        self.steps = 0

    def _batch(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x_t = torch.from_numpy(np.asarray(x, np.int64)).to(self.device, non_blocking=True)
        y_t = torch.from_numpy(np.asarray(y, np.int64)).to(self.device, non_blocking=True)
        return x_t, y_t

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One update on ``(x, y)``; returns the training loss (computation finished)."""
        x_t, y_t = self._batch(x, y)
        logits = self.model(x_t)
        loss = model_torch.cross_entropy(logits, y_t)
        if self.opt.refreshes(self.steps):
            # before this update, from this batch (its forward reused, or its first
            # hessian_batch sequences); .grad is left alone
            h_logits = (
                logits if self.cfg.reuses_forward else self.model(x_t[: self.cfg.hessian_batch])
            )
            self.optimizer.update_hessian(logits=h_logits, generator=self.generator)  # type: ignore[attr-defined]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        lr = lr_at(self.steps, self.opt, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        # .item() waits for the device, so the driver times the whole update
        return loss.item()

    @torch.no_grad()
    def evaluate(self, batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
        """Mean loss over ``batches`` at the current parameters."""
        pairs = (self._batch(x, y) for x, y in batches)
        losses = [model_torch.cross_entropy(self.model(x), y) for x, y in pairs]
        return torch.stack(losses).mean().item()

    def diagnostics(self) -> dict[str, float]:
        """SophiaG's diagnostics over all parameters (win rate, rho, norms); ``{}`` for AdamW.

        :meth:`sophia.torch.SophiaG.diagnostics` reports per param group; the
        two groups are combined as one group would be (the win rate weighted
        by size, the norms in quadrature), matching the JAX backend's single
        set of numbers.
        """
        if not isinstance(self.optimizer, SophiaG):
            return {}
        per_group = self.optimizer.diagnostics()
        sizes = [sum(p.numel() for p in g["params"]) for g in self.optimizer.param_groups]
        total = max(sum(sizes), 1)

        def norm(key: str) -> float:
            return math.hypot(*(float(d[key]) for d in per_group))

        return {
            "win_rate": sum(float(d["win_rate"]) * n for d, n in zip(per_group, sizes)) / total,
            "rho": float(per_group[0]["rho"]),
            "hessian_norm": norm("hessian_norm"),
            "momentum_norm": norm("momentum_norm"),
        }

    def opt_state_bytes(self) -> int:
        """Bytes of the optimizer's per-parameter and per-group tensors (step counters too)."""
        groups = [
            {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
        ]
        return _nbytes(list(self.optimizer.state.values())) + _nbytes(groups)


def make_trainer(cfg: RunConfig, opt: OptimConfig) -> TorchTrainer:
    """The backend hook of :mod:`sophia.demo.train`: a :class:`TorchTrainer`."""
    return TorchTrainer(cfg, opt)


def run(cfg: RunConfig, opt: OptimConfig, corpus: Corpus, *, progress: bool = True) -> RunResult:
    """Trains ``opt`` on ``corpus`` with the shared loop of :func:`sophia.demo.train.train`."""
    return train(make_trainer(cfg, opt), cfg, opt, corpus, framework="torch", progress=progress)


def device_info() -> dict[str, str]:
    """The torch version, the device and the CPU threads torch uses."""
    device = default_device()
    info = {
        "framework": "torch",
        "torch": torch.__version__,
        "device": device.type,
        "threads": str(torch.get_num_threads()),
    }
    if device.type == "cuda":
        info["device"] = f"cuda ({torch.cuda.get_device_name(device)})"
    return info

"""SophiaG's misuse warnings: uses that quietly turn it into another optimizer.

Each warns once per optimizer and names the fix. The bookkeeping is plain
Python on the host (no synchronisation) and runs in eager steps only: a
compiled step cannot update host counters.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sophia import spec

#: ``step()`` warns once when this many steps ran without any Hessian refresh: twice the
#: default refresh interval, so a loop that refreshes every k <= 20 steps never sees it.
_NO_REFRESH_STEPS = 2 * (spec.DEFAULTS.hessian_update_interval or 10)
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


class MisuseMonitor:
    """One optimizer's refresh bookkeeping and the warnings it has given."""

    def __init__(self) -> None:
        self.steps_without_refresh = 0
        self.ever_refreshed = False
        #: Each group's step counter at the last refresh (see ``group_steps``).
        self.last_refresh_steps: tuple[float, ...] | None = None
        self.count_checked = False
        self._warned: set[str] = set()

    def warn_once(self, key: str, category: type[Warning], message: str) -> None:
        """Warns ``message`` the first time ``key`` comes, at the caller of step/update_hessian."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, category, stacklevel=5)

    def count_step(self) -> None:
        """Warns once when steps keep coming and the Hessian was never refreshed."""
        self.steps_without_refresh += 1
        if not self.ever_refreshed and self.steps_without_refresh >= _NO_REFRESH_STEPS:
            self.warn_once(
                "no_refresh",
                HessianNotRefreshedWarning,
                f"SophiaG: {self.steps_without_refresh} steps and no Hessian refresh: with "
                "h = 0 (or a stale h) every step is the sign of the momentum, not SophiaG. "
                "Call opt.update_hessian(logits=logits) every k steps (if step % k == 0, "
                "after the forward and before loss.backward()), or, with a trainer, use "
                f"{_INTEGRATIONS}",
            )

    def note_refresh(
        self, allow_repeat: bool, group_steps: Callable[[], tuple[float, ...]]
    ) -> bool:
        """Bookkeeping of a refresh; ``False`` if it repeats one with no step in between."""
        self.ever_refreshed = True
        self.steps_without_refresh = 0
        if allow_repeat or self.last_refresh_steps is None:
            return True
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if capturing or group_steps() != self.last_refresh_steps:
            return True
        self.warn_once(
            "repeat",
            RepeatedRefreshWarning,
            "SophiaG.update_hessian: a second Hessian refresh with no optimizer step since the "
            "last one was skipped. Refreshing on every micro-batch of gradient accumulation "
            "refreshes h more often than every k optimizer steps: refresh once per optimizer "
            "step (on one micro-batch, when the optimizer step count t has t % k == 0), or "
            "pass allow_repeat=True to refresh several times on purpose",
        )
        return False

    def check_label_count(
        self,
        count: int | Tensor | None,
        from_logits: bool,
        groups: list[dict[str, Any]],
        unknown_count: Callable[[dict[str, Any]], bool],
    ) -> None:
        """Warns once when ``bs`` and a refresh's label count disagree, or no count is known.

        Args:
          count: the refresh's label count (``None``: it gave none).
          from_logits: whether the refresh was ``update_hessian(logits=...)``.
          groups: the optimizer's param groups.
          unknown_count: whether a group holds no label count yet.
        """
        if count is None:
            if from_logits:
                return
            unknown = [
                gi
                for gi, g in enumerate(groups)
                if g["bs"] is None and g["params"] and unknown_count(g)
            ]
            if unknown:
                self.warn_once(
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
        if self.count_checked:
            return
        self.count_checked = True
        numeric = [(gi, g["bs"]) for gi, g in enumerate(groups) if g["bs"] is not None]
        if not numeric:
            return
        n = int(count)  # once per optimizer: a synchronisation only for a device count
        for gi, bs in numeric:
            value = float(bs)
            if value != n:
                self.warn_once(
                    "count_mismatch",
                    LabelCountWarning,
                    f"SophiaG: param group {gi} has bs={value:g}, but the GNB refresh "
                    f"sampled {n} labels: rho * bs * h then misjudges the curvature by "
                    f"{value / max(n, 1):.3g}x. Pass bs=None to follow the refresh's count "
                    f"(or bs={n})",
                )
                return

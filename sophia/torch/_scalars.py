"""The compute dtype and SophiaG's scalars rounded to it, as :mod:`sophia.spec` fixes them.

Every implementation (for-loop, foreach, fused, native) and the optimizer's
group tensors take their dtypes and coefficients from here, so that they all
round alike.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from sophia import spec

#: The NumPy type of each compute dtype, to round Python scalars on the host as NumPy does.
NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
Scalar = float | Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update math runs in for tensors of ``dtype`` (see :mod:`sophia.spec`).

    Args:
      dtype: storage dtype of a parameter (complex dtypes count as their real pairs).

    Returns:
      ``torch.float64`` for float64/complex128, ``torch.float32`` otherwise.
    """
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def real_view(x: Tensor) -> Tensor:
    """``x``, a complex tensor as its real pairs (``view_as_real``)."""
    return torch.view_as_real(x) if torch.is_complex(x) else x


def real_numel(x: Tensor) -> int:
    """The number of real coordinates of ``x`` (two per complex element)."""
    return x.numel() * (2 if torch.is_complex(x) else 1)


def scalar_tensor(x: Scalar, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``x`` as a detached 0-dim ``dtype`` tensor on ``device``; a float is rounded on the host."""
    if isinstance(x, Tensor):
        return x.detach().to(device=device, dtype=dtype).reshape(())
    return torch.full((), float(NP_DTYPES[dtype](x)), dtype=dtype, device=device)


def ema_rates(beta: Scalar, dtype: torch.dtype, device: torch.device) -> tuple[Scalar, Scalar]:
    """``(beta, 1 - beta)`` in ``dtype``: floats exact in it, or 0-dim tensors for a tensor beta.

    The difference is taken in ``dtype`` (on the host for a float, with a
    tensor op otherwise, so no synchronisation happens), as the spec does.
    """
    if isinstance(beta, Tensor):
        b = scalar_tensor(beta, dtype, device)
        return b, torch.ones((), dtype=dtype, device=device) - b
    c = NP_DTYPES[dtype]
    return float(c(beta)), float(c(1) - c(beta))


class StepCoefficients(NamedTuple):
    """The scalars of one step in the compute dtype, as 0-dim tensors on the step's device.

    Tensors rather than Python floats: an eager op wraps a Python scalar into
    a new tensor on every call, and a compiled kernel taking a float would
    recompile for every new learning rate.
    """

    b1: Tensor
    #: ``1 - b1``, or ``-(1 - b1)`` with ``maximize``: ``(-g) (1 - b1)`` and ``g (-(1 - b1))``
    #: are the same float (negation is exact and rounding symmetric), so no pass negates g.
    signed_one_minus_b1: Tensor
    rho_bs: Tensor
    eps: Tensor
    weight_decay: Tensor
    lr: Tensor


class Hyperparameters(NamedTuple):
    """The hyperparameters of one :func:`sophia.torch.sophia_g` call, as given."""

    lr: Scalar
    beta1: Scalar
    rho: Scalar
    bs: Scalar
    weight_decay: Scalar
    eps: Scalar
    maximize: bool
    #: The narrow state's forms (canonical names, :mod:`sophia.narrow`) and seed.
    mu_dtype: str | None = None
    hessian_dtype: str | None = None
    seed: int = 0

    def coefficients(self, dtype: torch.dtype, device: torch.device) -> StepCoefficients:
        """The step's coefficients in the compute dtype ``dtype`` on ``device``.

        Derived scalars (``1 - b1``, ``rho * bs``, ``eps`` floored at the
        smallest normal number) are computed in ``dtype``: on the host for
        floats, with tensor ops for tensors (no synchronisation).
        """
        b1, one_minus_b1 = ema_rates(self.beta1, dtype, device)
        c = NP_DTYPES[dtype]
        rho_bs: Scalar
        if isinstance(self.rho, Tensor) or isinstance(self.bs, Tensor):
            rho_bs = scalar_tensor(self.rho, dtype, device) * scalar_tensor(self.bs, dtype, device)
        else:
            rho_bs = float(c(self.rho) * c(self.bs))
        eps: Scalar
        if isinstance(self.eps, Tensor):
            eps = torch.clamp_min(scalar_tensor(self.eps, dtype, device), float(np.finfo(c).tiny))
        else:
            eps = spec.effective_eps(float(self.eps), c)
        scalars = (b1, one_minus_b1, rho_bs, eps, self.weight_decay, self.lr)
        out = [scalar_tensor(x, dtype, device) for x in scalars]
        if self.maximize:
            out[1] = torch.neg(out[1])
        return StepCoefficients(*out)

"""What ``step_time_torch.py`` times: the optimizers, the paper's step, the streaming kernels.

Each family of optimizers shares one state, so the variants stream the same
memory; the model is :func:`harness.shapes.gpt2_small`, the table the JAX
benchmark times.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from harness import shapes

from sophia.torch import SophiaG

LR = 1e-4
BETAS = (0.965, 0.99)
RHO = 0.04
WD = 0.1
BS = 5120
EPS = 1e-15

SOPHIA = ("sophia_forloop", "sophia_foreach", "sophia_fused")
ADAMW = ("adamw_forloop", "adamw_foreach", "adamw_fused")
REFERENCE = ("reference_forloop",)
VARIANTS = SOPHIA + ADAMW + REFERENCE
KERNELS = ("copy", "scale", "add", "triad")
KERNEL_ARRAYS = {"copy": 2, "scale": 2, "add": 3, "triad": 3}


def model_shapes(small: bool) -> tuple[shapes.Shapes, int]:
    """GPT-2 small's table (:func:`harness.shapes.gpt2_small`) and its parameter count, checked."""
    table = shapes.gpt2_small(small)
    n = shapes.n_params(table)
    if len(table) != shapes.GPT2_SMALL_TENSORS:
        raise AssertionError(f"{len(table)} tensors, expected {shapes.GPT2_SMALL_TENSORS}")
    if not small and n != shapes.GPT2_SMALL_PARAMS:
        raise AssertionError(f"{n} parameters, expected {shapes.GPT2_SMALL_PARAMS}")
    return table, n


# --------------------------------------------------------------------------- the paper's step


class PaperReferenceSophiaG(torch.optim.Optimizer):
    """The paper's SophiaG step as its authors' single-tensor code performs it.

    Typed from the algorithm (Liu et al. 2023, Algorithm 3 with the clipped
    ratio of their code): per tensor, decoupled decay ``theta *= 1 - lr*wd``,
    ``m = b1*m + (1-b1)*g`` with ``add_(alpha=)``, ``ratio = min(|m| / (rho*bs*h
    + 1e-15), 1)`` and ``theta += -lr * sign(m) * ratio`` with ``addcmul_``.
    Only the plain step is needed here (no Hessian refresh).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = LR,
        betas: tuple[float, float] = BETAS,
        rho: float = RHO,
        weight_decay: float = WD,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "rho": rho, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, bs: int = BS) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            plist, glist, mlist, hlist, slist = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if len(st) == 0:
                    st["step"] = torch.zeros((1,), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["hessian"] = torch.zeros_like(p)
                plist.append(p)
                glist.append(p.grad)
                mlist.append(st["exp_avg"])
                hlist.append(st["hessian"])
                slist.append(st["step"])
            b1 = group["betas"][0]
            lr, wd, rho = group["lr"], group["weight_decay"], group["rho"]
            for param, grad, exp_avg, hess, step_t in zip(plist, glist, mlist, hlist, slist):
                if torch.is_complex(param):
                    param, grad = torch.view_as_real(param), torch.view_as_real(grad)
                    exp_avg, hess = torch.view_as_real(exp_avg), torch.view_as_real(hess)
                step_t += 1
                param.mul_(1 - lr * wd)
                exp_avg.mul_(b1).add_(grad, alpha=1 - b1)
                ratio = (exp_avg.abs() / (rho * bs * hess + 1e-15)).clamp(None, 1)
                param.addcmul_(exp_avg.sign(), ratio, value=-lr)
        return loss


# --------------------------------------------------------------------------- setup


def make_tensors(
    shapes: dict[str, tuple[int, ...]], seed: int = 0
) -> tuple[list[torch.nn.Parameter], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Parameters (with ``.grad``), and a momentum and Hessian EMA per parameter.

    The Hessian scale puts roughly half the coordinates in each branch of the
    clip, as in training.
    """
    gen = torch.Generator().manual_seed(seed)
    params, ms, hs, grads = [], [], [], []
    for shape in shapes.values():
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        p.grad = torch.randn(shape, generator=gen) * 1e-2
        params.append(p)
        grads.append(p.grad)
        ms.append(torch.randn(shape, generator=gen) * 1e-2)
        hs.append(torch.rand(shape, generator=gen) * 1e-4)
    return params, grads, ms, hs


def make_optimizers(
    variants: Iterable[str],
    params: list[torch.nn.Parameter],
    ms: list[torch.Tensor],
    hs: list[torch.Tensor],
) -> dict[str, Callable[[], Any]]:
    """One ``step`` callable per variant; each family shares one state."""
    variants = list(variants)
    steps: dict[str, Callable[[], Any]] = {}
    sophia_state = None
    adamw_state = None
    for name in variants:
        if name in SOPHIA:
            kind = name.split("_")[1]
            opt = SophiaG(
                params,
                lr=LR,
                betas=BETAS,
                rho=RHO,
                weight_decay=WD,
                bs=BS,
                eps=EPS,
                foreach=kind == "foreach",
                fused=True if kind == "fused" else None,
            )
            if sophia_state is None:
                for p, m, h in zip(params, ms, hs):
                    step0 = torch.zeros((), dtype=torch.float32)
                    opt.state[p] = {"step": step0, "exp_avg": m, "hessian": h}
                sophia_state = opt.state
            opt.state = sophia_state
            steps[name] = opt.step
        elif name in ADAMW:
            kind = name.split("_")[1]
            opt = torch.optim.AdamW(
                params,
                lr=LR,
                weight_decay=WD,
                foreach=kind == "foreach",
                fused=True if kind == "fused" else None,
            )
            if adamw_state is None:
                adamw_state = opt.state
            opt.state = adamw_state
            steps[name] = opt.step
        elif name in REFERENCE:
            opt = PaperReferenceSophiaG(params)
            for p, m, h in zip(params, ms, hs):
                opt.state[p] = {"step": torch.zeros((1,)), "exp_avg": m, "hessian": h}
            steps[name] = opt.step
        else:
            raise ValueError(f"unknown variant {name!r}")
    return steps


def make_kernels(n: int) -> dict[str, Callable[[], Any]]:
    a = torch.full((n,), 1.0)
    b = torch.full((n,), 0.5)
    c = torch.full((n,), 0.25)
    s = 0.999
    return {
        "copy": lambda: a.copy_(b),
        "scale": lambda: a.mul_(s),
        "add": lambda: a.add_(b),
        "triad": lambda: torch.add(b, c, alpha=s, out=a),
    }


def _stream_body(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    h: torch.Tensor,
    one: torch.Tensor,
    zero: torch.Tensor,
) -> None:
    p.copy_(p * one + g * zero)
    m.copy_(m * one + h * zero)


def make_stream_pass(
    params: list[torch.nn.Parameter], ms: list[torch.Tensor], hs: list[torch.Tensor]
) -> Callable[[], Any]:
    """SophiaG's fused traffic with trivial arithmetic, in the fused path's calls.

    Reads theta, g, m, h and writes theta, m (values unchanged: ``x * 1 + y *
    0``, which the compiler cannot fold), one compiled call per tensor of at
    least 32768 elements and one for the smaller ones (packed once here, where
    the fused path packs them on every step): what the fused step would cost
    if its arithmetic were free.
    """
    kernel = torch.compile(_stream_body, dynamic=True, fullgraph=True)
    one, zero = torch.ones(()), torch.zeros(())
    quads = [
        tuple(x.detach().view(-1) for x in (p, p.grad, m, h)) for p, m, h in zip(params, ms, hs)
    ]
    flat = [q for q in quads if q[0].numel() >= 1 << 15]
    small = [q for q in quads if q[0].numel() < 1 << 15]
    if small:
        flat.append(tuple(torch.cat(xs) for xs in zip(*small)))

    def step() -> None:
        for xs in flat:
            kernel(*xs, one, zero)

    return step

"""Workers for tests/distributed: SophiaG under DDP and FSDP2 on CPU with gloo, on loopback.

Every worker runs in a process started by :func:`launch` (``torch.multiprocessing``
spawn), joins a gloo process group on 127.0.0.1 at a free port, writes what it
measured with ``torch.save`` to ``out_dir/<tag>_rank<r>.pt`` and always destroys
the process group. The parent (the pytest process) compares the ranks' files
with each other and with :func:`run_schedule` on one process.

The training schedule (:func:`run_schedule`) is shared by the single-process
reference and the DDP ranks, so both see the same global batches, the same fixed
"sampled" labels (passed as ``labels=`` where the API allows, and used as the
targets of the sampled-label backward otherwise) and the same Hutchinson probes.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from sophia.torch import SophiaG, gnb, hutchinson

IN, HIDDEN, VOCAB = 6, 12, 5
#: Global batch per step; divisible by every world size tested (2 and 4).
BATCH = 8
STEPS = 6
#: The Hessian refresh routes, by step: (A) ``update_hessian()`` after a backward of the
#: loss against sampled labels, (B) ``update_hessian(logits=..., labels=...)``,
#: (C) ``update_hessian(hessian=[...])`` with a Hutchinson estimate averaged over ranks.
REFRESH = {0: "grad", 2: "logits", 4: "explicit"}
#: The schedule run under FSDP2: the routes that work on sharded parameters today, with
#: (D) ``update_hessian(hessian=[p.grad * p.grad])`` after a sampled-label backward as
#: the explicit route (its estimates are DTensors sharded like the parameters).
FSDP_REFRESH = {0: "grad", 2: "explicit_grad", 4: "grad"}
HP = {"lr": 0.02, "rho": 0.04, "weight_decay": 0.1, "bs": BATCH}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model() -> nn.Module:
    """A 2-layer MLP with a softmax head (the logits), the same initial weights everywhere."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, VOCAB))


def global_batch(t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step ``t``'s global batch: inputs, true labels, and fixed "sampled" labels."""
    g = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(BATCH, IN, generator=g)
    y = torch.randint(0, VOCAB, (BATCH,), generator=g)
    y_hat = torch.randint(0, VOCAB, (BATCH,), generator=g)
    return x, y, y_hat


def _all_mean(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    if not (dist.is_available() and dist.is_initialized()):
        return ts
    for t in ts:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())
    return ts


def run_schedule(
    model: nn.Module,
    inner: nn.Module,
    opt: SophiaG,
    rank: int = 0,
    world: int = 1,
    step: Callable[[SophiaG], Any] | None = None,
    refresh: dict[int, str] = REFRESH,
) -> None:
    """STEPS training steps on this rank's shard of each global batch, refreshing h per ``refresh``.

    ``model`` is what the forward goes through (the DDP wrapper, or the module
    itself); ``inner`` the plain module (the Hutchinson estimate differentiates
    twice and bypasses DDP's hooks). ``step`` replaces ``opt.step()``.
    """
    params = [p for g in opt.param_groups for p in g["params"]]
    n = BATCH // world
    for t in range(STEPS):
        x, y, y_hat = (v[rank * n : (rank + 1) * n] for v in global_batch(t))
        route = refresh.get(t)
        if route in ("grad", "explicit_grad"):
            # the paper's recipe: backward of the sampled-label loss (DDP averages it), square
            F.cross_entropy(model(x), y_hat).backward()
            if route == "grad":
                opt.update_hessian()
            else:
                opt.update_hessian(hessian=[p.grad * p.grad for p in params])
            opt.zero_grad(set_to_none=True)
        elif route == "explicit":
            gen = torch.Generator().manual_seed(77 + t)  # the same probes on every rank
            est = hutchinson(F.cross_entropy(inner(x), y), params, generator=gen)
            opt.update_hessian(hessian=_all_mean(est))
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if route == "logits":
            opt.update_hessian(logits=logits, labels=y_hat)
        loss.backward()
        if step is None:
            opt.step()
        else:
            step(opt)
        opt.zero_grad(set_to_none=True)


def snapshot(opt: SophiaG, full: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict:
    """Parameters and optimizer state as plain tensors (``full`` gathers DTensors)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    out: dict[str, Any] = {"param": [full(p.detach()).clone() for p in params]}
    for key in ("exp_avg", "hessian", "step"):
        out[key] = [full(opt.state[p][key]).clone() for p in params]
    out["group"] = {k: v.clone() for k, v in group_tensors(opt).items()}
    return out


def group_tensors(opt: SophiaG) -> dict[str, torch.Tensor]:
    """The first group's tensors (step, rho, win_rate), kept in its first parameter's state."""
    st = opt.state[opt.param_groups[0]["params"][0]]
    return {k.removeprefix("group_"): v for k, v in st.items() if k.startswith("group_")}


IMPLS = {"foreach": {"foreach": True}, "forloop": {"foreach": False}}
#: The paths run under FSDP2: SophiaG.step on DTensor parameters.
PATHS = {**IMPLS, "fused": {"fused": True}}


# ---------------------------------------------------------------------------------- DDP


def ddp_worker(rank: int, world: int, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    result = {}
    for name, kw in IMPLS.items():
        inner = make_model()
        model = DDP(inner)
        opt = SophiaG(inner.parameters(), **HP, **kw)
        run_schedule(model, inner, opt, rank, world)
        result[name] = snapshot(opt)
    inner = make_model()  # the FSDP2 test's schedule, for a direct DDP-vs-FSDP2 comparison
    model = DDP(inner)
    opt = SophiaG(inner.parameters(), **HP, foreach=True)
    run_schedule(model, inner, opt, rank, world, refresh=FSDP_REFRESH)
    result["fsdp_schedule"] = snapshot(opt)
    torch.save(result, os.path.join(out_dir, f"ddp_rank{rank}.pt"))


def reference(impl: str, refresh: dict[int, str] = REFRESH) -> dict:
    """The single-process run on the concatenated (global) batches."""
    model = make_model()
    opt = SophiaG(model.parameters(), **HP, **IMPLS[impl])
    run_schedule(model, model, opt, refresh=refresh)
    return snapshot(opt)


# ---------------------------------------------------------------------------------- FSDP2


def _shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _attempt(fn: Callable[[], Any]) -> str | None:
    """``None`` if ``fn()`` runs, else the exception's type, message and innermost frame."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - recorded for the parent to report
        tb = traceback.extract_tb(e.__traceback__)
        ours = [f for f in tb if "/sophia/" in f.filename]
        where = f"{ours[-1].filename.split('/sophia/')[-1]}:{ours[-1].lineno}" if ours else "?"
        msg = (str(e).strip().splitlines() or [""])[0][:300]
        return f"{type(e).__name__} at sophia/{where}: {msg}"
    return None


def fsdp_worker(rank: int, world: int, out_dir: str) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.tensor import DTensor

    result: dict[str, Any] = {}
    # 1. FSDP_REFRESH's schedule (the refresh routes that work on DTensors) through
    #    SophiaG.step on every path; FSDP2 reduce-scatters the mean gradient.
    result["runs"], result["wins"], result["diagnostics"] = {}, {}, {}
    for name, kw in PATHS.items():
        model = _shard(make_model())
        opt = SophiaG(model.parameters(), **HP, **kw)
        wins: list[float] = []

        def step(o: SophiaG, wins: list[float] = wins) -> None:
            o.step()
            wins.append(float(o.diagnostics()[0]["win_rate"]))

        run_schedule(model, model, opt, rank, world, step=step, refresh=FSDP_REFRESH)
        result["runs"][name] = snapshot(opt, _full)
        result["wins"][name] = wins
        result["diagnostics"][name] = opt.diagnostics()
        if name == "foreach":
            model_f, opt_f = model, opt
    model, opt = model_f, opt_f
    params = list(model.parameters())
    result["param_types"] = [type(p).__name__ for p in params]
    result["placements_ok"] = [
        all(
            isinstance(opt.state[p][k], DTensor)
            and opt.state[p][k].placements == p.placements
            and opt.state[p][k].device_mesh == p.device_mesh
            and opt.state[p][k].to_local().shape == p.to_local().shape
            for k in ("exp_avg", "hessian")
        )
        for p in params
    ]
    result["local_numel"] = [p.to_local().numel() for p in params]
    result["local"] = {
        "param": [p.detach().to_local().clone() for p in params],
        "exp_avg": [opt.state[p]["exp_avg"].to_local().clone() for p in params],
    }

    # 2. checkpoint round trip through torch.distributed.checkpoint's helpers, sharded
    #    (DTensor values) and full (plain tensors), into a fresh model and optimizer
    sd = get_optimizer_state_dict(model, opt)
    result["sd_exp_avg_types"] = sorted({type(v["exp_avg"]).__name__ for v in sd["state"].values()})
    msd = get_model_state_dict(model)

    def fresh() -> tuple[nn.Module, SophiaG]:
        m = _shard(make_model())
        o = SophiaG(m.parameters(), **HP, foreach=True)
        set_model_state_dict(m, msd)
        return m, o

    model2, opt2 = fresh()
    set_optimizer_state_dict(model2, opt2, sd)
    equal = []
    for p, p2 in zip(params, model2.parameters()):
        same = torch.equal(p.detach().to_local(), p2.detach().to_local())
        for k in ("exp_avg", "hessian", "step"):
            a, b = opt.state[p][k], opt2.state[p2][k]
            a = a.to_local() if isinstance(a, DTensor) else a
            b = b.to_local() if isinstance(b, DTensor) else b
            same &= torch.equal(a, b) and type(opt.state[p][k]) is type(opt2.state[p2][k])
            if isinstance(opt.state[p][k], DTensor):
                same &= opt.state[p][k].placements == opt2.state[p2][k].placements
        equal.append(same)
    gs, gs2 = group_tensors(opt), group_tensors(opt2)
    equal.append(set(gs) == set(gs2) and all(torch.equal(gs[k], gs2[k]) for k in gs))
    result["ckpt_equal"] = equal
    full_opts = StateDictOptions(full_state_dict=True)
    full_sd = get_optimizer_state_dict(model, opt, options=full_opts)
    result["full_sd"] = {
        k: {kk: vv.clone() for kk, vv in v.items() if torch.is_tensor(vv)}
        for k, v in full_sd["state"].items()
    }
    model3, opt3 = fresh()
    set_optimizer_state_dict(model3, opt3, full_sd, options=full_opts)
    result["full_ckpt_equal"] = [
        torch.equal(opt.state[p][k].to_local(), opt3.state[p3][k].to_local())
        and opt.state[p][k].placements == opt3.state[p3][k].placements
        for p, p3 in zip(params, model3.parameters())
        for k in ("exp_avg", "hessian")
    ]

    # 3. what must refuse, loudly: the logits route cannot estimate FSDP2 parameters
    #    (they are not in the forward's autograd graph), and a state sharded unlike
    #    its parameter cannot be updated shard by shard
    n = BATCH // world
    x, _, y_hat = (v[rank * n : (rank + 1) * n] for v in global_batch(0))
    m = _shard(make_model())
    o = SophiaG(m.parameters(), **HP, foreach=True)
    result["logits_route_error"] = _attempt(lambda: o.update_hessian(logits=m(x), labels=y_hat))
    result["gnb_error"] = _attempt(
        lambda: gnb(m(x), list(m.parameters()), labels=y_hat, average_across_ranks=False)
    )
    F.cross_entropy(m(x), y_hat).backward()
    p0 = next(m.parameters())
    o.state[p0]["exp_avg"] = torch.zeros(p0.shape)  # a plain, unsharded tensor
    before = [p.detach().full_tensor().clone() for p in m.parameters()]
    result["plain_state_error"] = _attempt(o.step)
    result["plain_state_params_unchanged"] = all(
        torch.equal(p.detach().full_tensor(), b) for p, b in zip(m.parameters(), before)
    )
    torch.save(result, os.path.join(out_dir, f"fsdp_rank{rank}.pt"))


# ---------------------------------------------------------------------------------- launch

WORKERS = {"ddp": ddp_worker, "fsdp": fsdp_worker}


def _entry(rank: int, world: int, port: int, name: str, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        WORKERS[name](rank, world, out_dir)
    finally:
        dist.destroy_process_group()


def launch(name: str, world: int, out_dir: str) -> list[dict]:
    """Runs worker ``name`` on ``world`` processes; returns each rank's saved result."""
    mp.spawn(_entry, args=(world, free_port(), name, out_dir), nprocs=world, join=True)
    return [
        torch.load(os.path.join(out_dir, f"{name}_rank{r}.pt"), weights_only=False)
        for r in range(world)
    ]

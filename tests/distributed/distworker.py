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
from sophia.torch.functional import sophia_g

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
    gs = opt.param_groups[0]["sophia_state"]
    out["group"] = {k: v.clone() for k, v in gs.items()}
    return out


IMPLS = {"foreach": {"foreach": True}, "forloop": {"foreach": False}}


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


@torch.no_grad()
def functional_step(opt: SophiaG, local: bool = False) -> list[torch.Tensor]:
    """One step through ``sophia.torch.functional.sophia_g`` (the path ``SophiaG.step`` calls).

    With ``local`` the DTensor parameters, gradients and states are passed as their
    local shards (``to_local()``: views, so the in-place update lands in the DTensors)
    and each group's win count is summed over the ranks: the workaround for
    ``SophiaG.step`` on FSDP2 parameters, and the approach of the patch proposed in
    the report (the update is elementwise, so updating the shards is updating the
    tensors). Returns each group's global win count.
    """
    from torch.distributed.tensor import DTensor

    def unwrap(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [x.to_local() if local and isinstance(x, DTensor) else x for x in xs]

    wins = []
    for group in opt.param_groups:
        ps, gs, ms, hs, ss = [], [], [], [], []
        opt._init_group(group, ps, gs, ms, hs, ss)
        n = sophia_g(
            unwrap(ps),
            unwrap(gs),
            unwrap(ms),
            unwrap(hs),
            ss,
            foreach=group["foreach"],
            fused=group["fused"],
            lr=group["lr"],
            beta1=group["betas"][0],
            rho=group["rho"],
            bs=group["bs"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )
        if local:
            dist.all_reduce(n)  # FSDP2's Shard(0) on a 1-D mesh: every element on one rank
        wins.append(n)
    return wins


def local_shard_step(opt: SophiaG) -> list[torch.Tensor]:
    return functional_step(opt, local=True)


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
    # 1. FSDP_REFRESH's schedule (the refresh routes that work on DTensors), stepping
    #    through the foreach functional path; FSDP2 reduce-scatters the mean gradient.
    model = _shard(make_model())
    opt = SophiaG(model.parameters(), **HP, foreach=True)
    params = list(model.parameters())
    result["param_types"] = [type(p).__name__ for p in params]
    placements_ok = []
    wins: list[torch.Tensor] = []
    result["schedule_error"] = _attempt(
        lambda: run_schedule(
            model,
            model,
            opt,
            rank,
            world,
            step=lambda o: wins.extend(local_shard_step(o)),
            refresh=FSDP_REFRESH,
        )
    )
    result["wins"] = [int(w) for w in wins]
    for p in params:
        st = opt.state[p]
        placements_ok.append(
            all(
                isinstance(st[k], DTensor)
                and st[k].placements == p.placements
                and st[k].device_mesh == p.device_mesh
                and st[k].to_local().shape == p.to_local().shape
                for k in ("exp_avg", "hessian")
            )
        )
    result["placements_ok"] = placements_ok
    result["local_numel"] = [p.to_local().numel() for p in params]
    result["run"] = snapshot(opt, _full)
    result["local"] = {
        "param": [p.detach().to_local().clone() for p in params],
        "exp_avg": [opt.state[p]["exp_avg"].to_local().clone() for p in params],
    }

    # 1b. the same schedule through SophiaG.step itself (fails today: see the report)
    model_s = _shard(make_model())
    opt_s = SophiaG(model_s.parameters(), **HP, foreach=True)
    result["step_run_error"] = _attempt(
        lambda: run_schedule(model_s, model_s, opt_s, rank, world, refresh=FSDP_REFRESH)
    )
    result["step_run"] = None if result["step_run_error"] else snapshot(opt_s, _full)

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

    def primed() -> tuple[nn.Module, SophiaG]:
        # set_optimizer_state_dict initialises an empty optimizer with a zero-lr step(),
        # which fails on DTensors today (failures["load_into_fresh"]); a state-creating
        # zero refresh (h <- b2 * 0 + (1 - b2) * 0) avoids that step
        m, o = fresh()
        o.update_hessian(hessian=[torch.zeros_like(p) for p in m.parameters()])
        return m, o

    model2, opt2 = primed()
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
    gs, gs2 = opt.param_groups[0]["sophia_state"], opt2.param_groups[0]["sophia_state"]
    equal.append(all(torch.equal(gs[k], gs2[k]) for k in gs))
    result["ckpt_equal"] = equal
    full_opts = StateDictOptions(full_state_dict=True)
    full_sd = get_optimizer_state_dict(model, opt, options=full_opts)
    result["full_sd"] = {
        k: {kk: vv.clone() for kk, vv in v.items() if torch.is_tensor(vv)}
        for k, v in full_sd["state"].items()
    }
    model3, opt3 = primed()
    set_optimizer_state_dict(model3, opt3, full_sd, options=full_opts)
    result["full_ckpt_equal"] = [
        torch.equal(opt.state[p][k].to_local(), opt3.state[p3][k].to_local())
        and opt.state[p][k].placements == opt3.state[p3][k].placements
        for p, p3 in zip(params, model3.parameters())
        for k in ("exp_avg", "hessian")
    ]

    # 3. what does not work yet (each on a fresh model and optimizer): recorded, not raised
    n = BATCH // world
    x, y, y_hat = (v[rank * n : (rank + 1) * n] for v in global_batch(0))
    failures: dict[str, str | None] = {}
    m, o = fresh()
    F.cross_entropy(m(x), y).backward()  # the functional foreach body on the DTensors themselves
    failures["functional_foreach"] = _attempt(lambda: functional_step(o))
    m, o = fresh()
    failures["load_into_fresh"] = _attempt(lambda: set_optimizer_state_dict(m, o, sd))
    for name, kw in {"forloop": {"foreach": False}, "fused": {"fused": True}}.items():
        m = _shard(make_model())
        o = SophiaG(m.parameters(), **HP, **kw)
        F.cross_entropy(m(x), y).backward()
        failures[f"step_{name}"] = _attempt(o.step)
    m = _shard(make_model())
    o = SophiaG(m.parameters(), **HP, foreach=True)
    # the logits route cannot work under FSDP2 (the sharded parameters are not in the
    # forward's autograd graph): it must refuse, loudly
    result["logits_route_error"] = _attempt(lambda: o.update_hessian(logits=m(x), labels=y_hat))
    # ... and so must the estimator itself: without the all-reduce it returns zeros today
    hs: list[torch.Tensor] = []
    err = _attempt(
        lambda: hs.extend(gnb(m(x), list(m.parameters()), labels=y_hat, average_across_ranks=False))
    )
    zero = err is None and all(bool((h.to_local() == 0).all()) for h in hs)
    failures["gnb_refuses_sharded_params"] = (
        "gnb returned an all-zero estimate for FSDP2 parameters, without an error" if zero else None
    )
    result["failures"] = failures
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

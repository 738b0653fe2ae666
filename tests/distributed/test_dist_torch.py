"""SophiaG under torch.distributed on CPU (gloo, loopback): DDP with 2 and 4 processes, FSDP2.

The workers live in ``distworker.py``; each fixture below starts one process group
(``torch.multiprocessing.spawn``), runs a 6-step schedule on a 2-layer MLP with a
softmax head and collects every rank's parameters and optimizer state here.

Tolerance against the single-process run on the concatenated batch: the ranks'
gradients are averaged by an all-reduce (DDP) or a reduce-scatter (FSDP2) instead
of inside one ``mean``, so the runs differ only by floating-point reduction order.
Measured (torch 2.13.0, CPU, float32; worst tensor of |a - b| / max|b|):
DDP x2 params 2.9e-7, exp_avg 1.5e-7, hessian 1.6e-7; DDP x4 3.7e-7, 3.1e-7,
1.6e-7; the FSDP2 schedule under DDP x4 7.7e-7, 2.5e-7, 2.1e-7; FSDP2 x2 (local
shard step) 2.8e-7, 1.8e-7, 3.4e-7. ``REL_TOL = 4e-6`` is about five times the
worst. This holds for this small, well-conditioned problem: where ``h`` is tiny and
a coordinate is not clipped, ``m / (rho bs h)`` amplifies such differences (a
larger probe, 70k-parameter head, showed 1.7e-3 on parameters); ranks among
themselves are always bit-identical.
"""

from __future__ import annotations

import distworker as W
import pytest
import torch

#: Bound on |a - b| / max|b| per tensor between a distributed run and the single process.
REL_TOL = 4e-6
STATE_KEYS = ("param", "exp_avg", "hessian")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / (scale if scale > 0 else 1.0)


def _assert_close(run: dict, ref: dict, what: str) -> None:
    for key in STATE_KEYS:
        for i, (a, b) in enumerate(zip(run[key], ref[key], strict=True)):
            assert a.shape == b.shape and a.dtype == b.dtype, (what, key, i)
            err = _rel_err(a, b)
            assert err <= REL_TOL, f"{what}: {key}[{i}] differs by {err:.3g} (relative)"
    for a, b in zip(run["step"], ref["step"], strict=True):
        assert torch.equal(a, b)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def ddp(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"ddp{world}")
    return world, W.launch("ddp", world, str(out))


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    return W.launch("fsdp", 2, str(tmp_path_factory.mktemp("fsdp")))


@pytest.fixture(scope="module")
def references():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        refs = {impl: W.reference(impl) for impl in W.IMPLS}
        refs["fsdp_schedule"] = W.reference("foreach", W.FSDP_REFRESH)
    finally:
        torch.set_num_threads(threads)
    return refs


# ---------------------------------------------------------------------------------- DDP


def test_ddp_ranks_hold_bit_identical_state(ddp):
    """After refreshes through update_hessian(), (logits=, labels=) and (hessian=[...])."""
    world, ranks = ddp
    for impl in (*W.IMPLS, "fsdp_schedule"):
        first = ranks[0][impl]
        for r in range(1, world):
            other = ranks[r][impl]
            for key in (*STATE_KEYS, "step"):
                for i, (a, b) in enumerate(zip(first[key], other[key], strict=True)):
                    assert torch.equal(a, b), f"{impl}: rank {r} {key}[{i}] differs from rank 0"
            for k, v in first["group"].items():
                assert torch.equal(v, other["group"][k]), (impl, r, k)


def test_ddp_matches_single_process_on_concatenated_batch(ddp, references):
    world, ranks = ddp
    for impl in W.IMPLS:
        run, ref = ranks[0][impl], references[impl]
        _assert_close(run, ref, f"DDP x{world} {impl}")
        assert torch.equal(run["group"]["rho"], ref["group"]["rho"])
        assert torch.equal(run["group"]["step"], ref["group"]["step"])
        n_total = sum(p.numel() for p in ref["param"])
        # the win rate may differ by a coordinate whose r sits at 1 within rounding
        assert abs(float(run["group"]["win_rate"] - ref["group"]["win_rate"])) <= 1 / n_total
    # the estimate routes changed h: every refresh contributed (no all-zero Hessian)
    assert all(float(h.abs().max()) > 0 for h in ranks[0]["foreach"]["hessian"])


# ---------------------------------------------------------------------------------- FSDP2


def test_fsdp2_state_is_sharded_like_the_parameters(fsdp):
    r0, r1 = fsdp
    assert r0["schedule_error"] is None, r0["schedule_error"]
    assert r0["param_types"] == ["DTensor"] * 4
    # exp_avg and hessian are DTensors on the parameter's mesh with its placements and
    # its local shard shape: no gather to one rank, no replicated copy
    assert r0["placements_ok"] == [True] * 4 and r1["placements_ok"] == [True] * 4
    full = [p.numel() for p in r0["run"]["param"]]
    assert [a + b for a, b in zip(r0["local_numel"], r1["local_numel"])] == full
    assert r0["local_numel"] != full  # really sharded (the 5-row head unevenly: 3 + 2 rows)


def test_fsdp2_local_shard_step_matches_ddp_and_single_process(fsdp, ddp, references):
    """The foreach body on each rank's local shards (distworker.local_shard_step: the
    workaround for SophiaG.step on FSDP2 and the approach of the proposed patch), with h
    refreshed by update_hessian() and update_hessian(hessian=[DTensors]) from FSDP2's
    reduce-scattered gradients."""
    _, ranks = ddp
    for r in fsdp:
        assert r["schedule_error"] is None, r["schedule_error"]
        assert r["wins"] == fsdp[0]["wins"]  # the summed win count is global
    ref = references["fsdp_schedule"]
    n_total = sum(p.numel() for p in ref["param"])
    assert abs(fsdp[0]["wins"][-1] / n_total - float(ref["group"]["win_rate"])) <= 1 / n_total
    for run in (fsdp[0]["run"], fsdp[1]["run"]):
        _assert_close(run, references["fsdp_schedule"], "FSDP2 vs one process")
        _assert_close(run, ranks[0]["fsdp_schedule"], "FSDP2 vs DDP")
    # the shards themselves: each rank's local piece is the piece of the gathered tensor
    for key in ("param", "exp_avg"):
        for i, full in enumerate(fsdp[0]["run"][key]):
            pieces = torch.cat([fsdp[r]["local"][key][i] for r in (0, 1)])
            assert torch.equal(pieces, full), (key, i)


def test_fsdp2_sophiag_step_matches_single_process(fsdp, references):
    """SophiaG.step (foreach) on FSDP2 parameters: xfail while it raises, checked once it runs."""
    errors = [r["step_run_error"] for r in fsdp if r["step_run_error"]]
    if errors:
        pytest.xfail(f"SophiaG.step fails on DTensor parameters; rank 0: {errors[0]}")
    ref = references["fsdp_schedule"]
    for r in fsdp:
        _assert_close(r["step_run"], ref, "FSDP2 SophiaG.step vs one process")
        for k, v in r["step_run"]["group"].items():
            assert torch.equal(v, fsdp[0]["step_run"]["group"][k]), k
    n_total = sum(p.numel() for p in ref["param"])
    win = float(fsdp[0]["step_run"]["group"]["win_rate"])
    assert abs(win - float(ref["group"]["win_rate"])) <= 1 / n_total


def test_fsdp2_checkpoint_round_trip(fsdp):
    """get_/set_optimizer_state_dict, sharded and full, into a second FSDP2 model."""
    for r in fsdp:
        assert r["sd_exp_avg_types"] == ["DTensor"]
        assert all(r["ckpt_equal"]), r["ckpt_equal"]  # params, state, sophia_state
        assert all(r["full_ckpt_equal"]), r["full_ckpt_equal"]
    # the full (consolidated) state dict holds the gathered tensors, keyed by FQN
    r0 = fsdp[0]
    for key in ("exp_avg", "hessian"):
        got = [v[key] for v in r0["full_sd"].values()]
        for a, b in zip(got, r0["run"][key], strict=True):
            assert torch.equal(a, b)


def test_fsdp2_logits_refresh_refuses_loudly(fsdp):
    """update_hessian(logits=...) cannot estimate sharded parameters; it must not pass silently.

    Under FSDP2 the sharded DTensor parameters are not in the forward's autograd graph
    (FSDP2 all-gathers them outside autograd and reduce-scatters the unsharded
    gradients into ``.grad`` in its post-backward hooks), so ``torch.autograd.grad``
    returns ``None`` for every one of them. Today the call fails in the all-reduce of
    the zero-filled DTensor gradients; it must keep failing rather than store a zero
    estimate. The FSDP2 route is ``update_hessian()`` after a sampled-label backward.
    """
    for r in fsdp:
        assert r["logits_route_error"] is not None


#: What fails on FSDP2 DTensor parameters with sophia/torch as it is (torch 2.13.0, gloo),
#: and why. Each is reported as xfail while it fails and as a failure once it works
#: (then remove it from here); an error in the worker itself is an error, not an xfail.
KNOWN_FAILURES = {
    "functional_foreach": "the CPU foreach body mixes DTensors with plain cached block buffers",
    "step_forloop": "the for-loop body mixes DTensors with plain buffers and 0-dim tensors",
    "step_fused": "the fused path flattens unevenly sharded DTensors (reshape(-1))",
    "load_into_fresh": "set_optimizer_state_dict's zero-lr step() on a fresh optimizer fails",
    "gnb_refuses_sharded_params": "autograd.grad gives None for FSDP2 shards: zeros returned",
}


@pytest.mark.parametrize("piece", list(KNOWN_FAILURES))
def test_fsdp2_known_failures(fsdp, piece):
    problems = [r["failures"][piece] for r in fsdp if r["failures"][piece] is not None]
    if problems:
        pytest.xfail(f"{KNOWN_FAILURES[piece]}; rank 0: {problems[0]}")
    pytest.fail(f"{piece} works now: remove it from KNOWN_FAILURES and test it properly")

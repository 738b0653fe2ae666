"""The demo's PyTorch backend at tiny size: model vs JAX's, the trainer, ``--framework both``."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sophia.demo import __main__ as cli
from sophia.demo import (
    config,
    model,
    model_jax,
    model_torch,
    schedule,
    train_jax,
    train_torch,
)

TINY_MODEL = model.ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=16)
#: The flags that make ``--preset tiny`` the tiny run of tests/test_demo.py (20 steps).
TINY_FLAGS = [
    "--preset",
    "tiny",
    "--steps",
    "20",
    "--batch-size",
    "4",
    "--block-size",
    "16",
    "--n-embd",
    "16",
    "--warmup",
    "2",
    "--eval-interval",
    "5",
    "--eval-batches",
    "2",
    "--max-bytes",
    "200000",
    "--sophia-lr",
    "1e-2",
    "--adamw-lr",
    "1e-2",
    "--hessian-interval",
    "5",
]


@pytest.fixture(scope="module", autouse=True)
def _fast_cpu_compiles():
    """LLVM at O0 on the CPU for the JAX side: these runs are tiny and their time is compilation."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_jax, "CPU_COMPILER_OPTIONS", {"xla_backend_optimization_level": 0})
        yield


def _tokens(batch: int = 3) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (batch, TINY_MODEL.block_size)).astype(np.int32)


# ---------------------------------------------------------------- model


def test_weights_round_trip_the_numpy_layout():
    m = model_torch.init_model(TINY_MODEL, 0)
    want = model.named_leaves(model.init_numpy(TINY_MODEL, 0))
    got = m.to_numpy()
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # the tied lm_head is not a parameter of its own: counted once, like the JAX pytree
    assert sum(p.numel() for p in m.parameters()) == model.n_params(TINY_MODEL)
    decayed, kept = model_torch.decay_split(m)
    by_id = {id(p): n for n, p in m.named_parameters()}
    assert {model_torch.leaf_name(by_id[id(p)]) for p in decayed} == {
        "wte",
        "wpe",
        "blocks.attn.w_qkv",
        "blocks.attn.w_out",
        "blocks.mlp.w_fc",
        "blocks.mlp.w_out",
    }
    assert all(p.dim() == 1 for p in kept) and len(decayed) + len(kept) == len(list(m.parameters()))
    with pytest.raises(KeyError):
        model_torch.leaf_name("blocks.0.attn.nope.weight")


def test_forward_backward_shapes_and_causality():
    m = model_torch.init_model(TINY_MODEL, 0)
    tokens = torch.from_numpy(_tokens()).long()
    targets = torch.roll(tokens, 1, dims=0)
    logits = m(tokens)
    assert logits.shape == (3, TINY_MODEL.block_size, 256) and logits.dtype == torch.float32
    loss = model_torch.cross_entropy(logits, targets)
    assert abs(loss.item() - math.log(256)) < 0.1  # GPT-2 init: near-uniform predictions
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert bool(torch.isfinite(p.grad).all()), name
    assert m.wte.weight.grad.abs().sum() > 0
    t = 9
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 1) % 256
    with torch.no_grad():
        logits2 = m(changed)
    torch.testing.assert_close(logits[:, :t].detach(), logits2[:, :t], rtol=0, atol=0)
    assert (logits[:, t:].detach() - logits2[:, t:]).abs().max() > 0


@functools.cache
def _jax_forward():
    """One compiled JAX forward for every case (op-by-op dispatch would compile per op)."""
    return train_jax.jit(model_jax.make_apply(TINY_MODEL))


@pytest.mark.parametrize("perturb", [0.0, 0.3], ids=["init", "perturbed"])
def test_logits_match_jax(perturb):
    """Same weights, same tokens: the same logits; perturbed weights make every layer count."""
    params = model.init_numpy(TINY_MODEL, 0)
    if perturb:
        rng = np.random.default_rng(1)
        params = jax.tree.map(
            lambda a: (a + perturb * rng.standard_normal(a.shape)).astype(np.float32), params
        )
    tokens = _tokens()
    want = _jax_forward()(jax.tree.map(jnp.asarray, params), jnp.asarray(tokens))
    m = model_torch.GPT(TINY_MODEL).load_numpy(params)
    with torch.no_grad():
        got = m(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- trainer


def _tiny_cfg() -> config.RunConfig:
    return config.RunConfig(
        model=TINY_MODEL,
        steps=20,
        batch_size=4,
        warmup=2,
        sophia=config.sophiag_config(lr=1e-2, rho=0.03, k=5),
        adamw=config.adamw_config(lr=1e-2),
    )


def test_trainer_schedule_refresh_and_state():
    cfg = _tiny_cfg()
    trainer = train_torch.make_trainer(cfg, cfg.sophia)
    opt = trainer.optimizer
    assert isinstance(opt, train_torch.SophiaG)
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.sophia.weight_decay, 0.0]
    assert all(g["bs"] == cfg.tokens_per_step for g in opt.param_groups)
    rng = np.random.default_rng(0)
    hessians = []
    for step in range(7):
        x = rng.integers(0, 256, (cfg.batch_size, TINY_MODEL.block_size)).astype(np.int32)
        loss = trainer.step(x, np.roll(x, -1, axis=1))
        assert isinstance(loss, float) and math.isfinite(loss)
        assert opt.param_groups[0]["lr"] == schedule.lr_at(step, cfg.sophia, cfg)
        hessians.append(opt.state[trainer.model.wte.weight]["hessian"].clone())
    # refreshed at steps 0 and 5 only (k = 5), before those updates
    changed = [bool((b != a).any()) for a, b in zip(hessians, hessians[1:])]
    assert changed == [False, False, False, False, True, False]
    assert float(hessians[0].abs().sum()) > 0
    diag = trainer.diagnostics()
    assert set(diag) == {"win_rate", "rho", "hessian_norm", "momentum_norm"}
    assert 0.0 <= diag["win_rate"] <= 1.0 and diag["rho"] == pytest.approx(0.03)
    assert diag["hessian_norm"] > 0
    # exp_avg + hessian per parameter, plus 0-dim counters
    assert 8 * trainer.n_params <= trainer.opt_state_bytes() < 8 * trainer.n_params + 1024
    adamw = train_torch.make_trainer(cfg, cfg.adamw)
    assert isinstance(adamw.optimizer, torch.optim.AdamW) and adamw.diagnostics() == {}
    # on the CPU both take their fused path (SophiaG's native kernel, torch's fused AdamW)
    assert trainer.device.type == "cpu"
    assert all(g["fused"] is True for g in opt.param_groups)
    assert all(g["fused"] is True for g in adamw.optimizer.param_groups)


@pytest.mark.parametrize("hessian_batch", [None, 2])
def test_trainer_refresh_logits_cover_the_labels_behind_bs(hessian_batch, monkeypatch):
    """The refresh gets the logits of the whole batch (the training forward's) or of its first
    ``hessian_batch`` sequences at the pre-update weights, and ``bs`` is their label count."""
    cfg = dataclasses.replace(_tiny_cfg(), hessian_batch=hessian_batch)
    trainer = train_torch.make_trainer(cfg, cfg.sophia)
    opt = trainer.optimizer
    assert all(g["bs"] == cfg.hessian_tokens for g in opt.param_groups)
    seen = []
    real = opt.update_hessian

    def spy(**kwargs):
        seen.append(kwargs["logits"].detach().clone())
        return real(**kwargs)

    monkeypatch.setattr(opt, "update_hessian", spy)
    x = _tokens(cfg.batch_size)
    with torch.no_grad():
        want = trainer.model(torch.from_numpy(x.astype(np.int64)))
    trainer.step(x, np.roll(x, -1, axis=1))
    (logits,) = seen
    seqs = cfg.batch_size if hessian_batch is None else hessian_batch
    assert logits.shape[:-1] == (seqs, TINY_MODEL.block_size)
    assert logits[..., 0].numel() == cfg.hessian_tokens
    torch.testing.assert_close(logits, want[:seqs], rtol=0, atol=1e-6)
    assert float(opt.state[trainer.model.wte.weight]["hessian"].abs().sum()) > 0


# ---------------------------------------------------------------- --framework both


@pytest.fixture(scope="module")
def both_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_both")
    assert cli.main(["--framework", "both", *TINY_FLAGS, "--no-progress", "--out", str(out)]) == 0
    return out, json.loads((out / "run.json").read_text())


def test_torch_run_lowers_the_loss(both_run):
    _, record = both_run
    runs = {r["optimizer"]["name"]: r for r in record["results"] if r["framework"] == "torch"}
    assert set(runs) == {"sophiag", "adamw"}
    for r in runs.values():
        assert len(r["train_loss"]) == 20 and not r["diverged"]
        assert np.mean(r["train_loss"][-5:]) < np.mean(r["train_loss"][:5]) - 0.3
        assert r["val_loss"][-1] < r["val_loss"][0] - 0.3
        assert r["val_steps"] == [0, 5, 10, 15, 20]
    assert runs["sophiag"]["refresh"][:6] == [True, False, False, False, False, True]
    diags = runs["sophiag"]["diagnostics"]
    assert [d["step"] for d in diags] == [0, 5, 10, 15, 20] and diags[-1]["hessian_norm"] > 0
    assert runs["adamw"]["diagnostics"] == []


def test_both_frameworks_in_run_json_and_png(both_run):
    out, record = both_run
    assert record["frameworks"] == ["jax", "torch"]
    assert [(r["framework"], r["optimizer"]["name"]) for r in record["results"]] == [
        ("jax", "sophiag"),
        ("jax", "adamw"),
        ("torch", "sophiag"),
        ("torch", "adamw"),
    ]
    assert record["machine"]["torch"]["torch"] == torch.__version__
    assert set(record["summary"]) == {"jax", "torch"}
    for fw in ("jax", "torch"):
        assert "time_ratio" in record["summary"][fw]
        assert {"plain_ms", "refresh_ms", "refresh_overhead"} <= record["summary"][fw][
            "sophiag"
        ].keys()
        assert f"[{fw}]" in record["table"]
    s_jax, s_torch = record["summary"]["jax"], record["summary"]["torch"]
    for name in ("sophiag", "adamw"):
        assert s_torch[name]["opt_state_bytes"] == pytest.approx(
            s_jax[name]["opt_state_bytes"], rel=0.02
        )
    # same weights, batches and schedule: the same starting losses, and AdamW (no
    # sampling) follows the same trajectory up to float32 rounding
    res = {(r["framework"], r["optimizer"]["name"]): r for r in record["results"]}
    for name in ("sophiag", "adamw"):
        j, t = res["jax", name], res["torch", name]
        assert t["val_loss"][0] == pytest.approx(j["val_loss"][0], abs=1e-5)
        assert t["train_loss"][0] == pytest.approx(j["train_loss"][0], abs=1e-5)
    np.testing.assert_allclose(
        res["torch", "adamw"]["val_loss"], res["jax", "adamw"]["val_loss"], atol=2e-3
    )
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trainer_stores_the_narrow_state_and_reports_its_bytes():
    """bf16 m and block8 h in the fused demo optimizer: the state's forms, the measured bytes."""
    from sophia import narrow

    cfg = _tiny_cfg()
    forms = dataclasses.replace(cfg.sophia, mu_dtype="bfloat16", hessian_dtype="block8")
    plain = train_torch.make_trainer(cfg, cfg.sophia)
    trainer = train_torch.make_trainer(dataclasses.replace(cfg, sophia=forms), forms)
    assert all(g["mu_dtype"] == "bfloat16" for g in trainer.optimizer.param_groups)
    assert all(g["hessian_dtype"] == "block8" for g in trainer.optimizer.param_groups)
    assert all(g["seed"] == cfg.seed for g in trainer.optimizer.param_groups)
    rng = np.random.default_rng(0)
    for t in (plain, trainer):
        for _ in range(2):
            x = rng.integers(0, 256, (cfg.batch_size, TINY_MODEL.block_size)).astype(np.int32)
            assert math.isfinite(t.step(x, np.roll(x, -1, axis=1)))
    state = trainer.optimizer.state[trainer.model.wte.weight]
    assert state["exp_avg"].dtype == torch.bfloat16 and state["hessian"].dtype == torch.int8
    assert state["hessian_scale"].numel() == narrow.block_count(trainer.model.wte.weight.numel())
    assert bool((state["hessian"] != 0).any())  # refreshed at step 0
    # measured from the state: smaller than float32's by what the forms say, to the byte
    sizes = [p.numel() for p in trainer.params]
    want = sum(
        narrow.state_bytes(n, "bfloat16", 4) + narrow.state_bytes(n, "block8", 4) for n in sizes
    )
    assert plain.opt_state_bytes() - trainer.opt_state_bytes() == 8 * sum(sizes) - want > 0

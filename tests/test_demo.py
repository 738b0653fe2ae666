"""The demo's pieces at tiny size: data, model, schedule, driver, a short run of each optimizer."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sophia.demo import __main__ as cli
from sophia.demo import (
    compare,
    config,
    data,
    model,
    model_jax,
    report,
    schedule,
    sweep,
    train,
    train_jax,
)

TINY = config.RunConfig(
    model=model.ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=16),
    steps=20,
    batch_size=4,
    warmup=2,
    eval_interval=5,
    eval_batches=2,
    max_bytes=200_000,
    sophia=config.sophiag_config(lr=1e-2, rho=0.03, k=5),
    adamw=config.adamw_config(lr=1e-2),
)


@pytest.fixture(scope="module", autouse=True)
def _fast_cpu_compiles():
    """LLVM at O0 on the CPU: these runs are tiny and their time is XLA compilation."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_jax, "CPU_COMPILER_OPTIONS", {"xla_backend_optimization_level": 0})
        yield


# ---------------------------------------------------------------- data


def _fake_stdlib(root):
    for i in range(25):
        sub = root / ("pkg" if i % 3 == 0 else "")
        sub.mkdir(exist_ok=True)
        (sub / f"mod{i:02d}.py").write_bytes(f"# file {i:02d}\n".encode() * 3)
    for skipped in ("test", "site-packages", "encodings", "pkg/tests"):
        (root / skipped).mkdir(parents=True, exist_ok=True)
        (root / skipped / "skipme.py").write_bytes(b"# SKIPPED\n")
    (root / "notes.txt").write_bytes(b"not python\n")


def test_stdlib_files_sorted_and_skipping(tmp_path):
    _fake_stdlib(tmp_path)
    files = data.stdlib_files(tmp_path)
    rel = [f.relative_to(tmp_path).as_posix() for f in files]
    assert rel == sorted(rel)
    assert len(rel) == 25
    assert not any("skipme" in r for r in rel)


def test_split_by_file_is_disjoint_and_deterministic(tmp_path):
    _fake_stdlib(tmp_path)
    c1 = data.load_stdlib(max_bytes=0, val_every=10, root=tmp_path)
    c2 = data.load_stdlib(max_bytes=0, val_every=10, root=tmp_path)
    assert c1.digest == c2.digest
    np.testing.assert_array_equal(c1.train, c2.train)
    np.testing.assert_array_equal(c1.val, c2.val)
    files = data.stdlib_files(tmp_path)
    train_text, val_text = c1.train.tobytes(), c1.val.tobytes()
    assert c1.n_files == 25 and c1.n_val_files == 2
    for i, f in enumerate(files):
        marker = f.read_bytes()[:10]
        in_val, in_train = marker in val_text, marker in train_text
        assert in_val != in_train, f.name
        assert in_val == (i % 10 == 9), f.name
    assert b"SKIPPED" not in train_text + val_text


def test_stdlib_corpus_cap_and_determinism():
    c1 = data.load_stdlib(max_bytes=150_000)
    c2 = data.load_stdlib(max_bytes=150_000)
    assert c1.digest == c2.digest
    assert c1.n_val_files >= 1
    # the cap counts file bytes; the joins add two bytes per file
    assert len(c1.train) + len(c1.val) <= 150_000 + 2 * c1.n_files
    assert c1.train.dtype == np.uint8 and c1.vocab_size == 256


def test_load_text_splits_by_position(tmp_path):
    path = tmp_path / "input.txt"
    path.write_bytes(bytes(range(200)) * 5)
    c = data.load_text(path)
    assert len(c.train) == 900 and len(c.val) == 100
    np.testing.assert_array_equal(
        np.concatenate([c.train, c.val]), np.frombuffer(path.read_bytes(), np.uint8)
    )
    corpus = data.load_corpus(str(path), max_bytes=500)
    assert len(corpus.train) + len(corpus.val) == 500


def test_batch_sampler_is_seeded_and_shifted():
    tokens = np.arange(1000, dtype=np.int64).astype(np.uint8)
    a = data.BatchSampler(tokens, 4, 8, seed=3)
    b = data.BatchSampler(tokens, 4, 8, seed=3)
    c = data.BatchSampler(tokens, 4, 8, seed=4)
    xa, ya = zip(*(a.next() for _ in range(3)))
    xb, yb = zip(*(b.next() for _ in range(3)))
    xc, _ = c.next()
    for u, v in zip(xa + ya, xb + yb):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(xa[0], xc)
    assert xa[0].shape == (4, 8) and xa[0].dtype == np.int32
    np.testing.assert_array_equal(xa[0][:, 1:], ya[0][:, :-1])
    np.testing.assert_array_equal((xa[0].astype(np.int64) + 1) % 256, ya[0])
    with pytest.raises(ValueError):
        data.BatchSampler(tokens[:5], 1, 8, 0)


# ---------------------------------------------------------------- model


def test_init_is_seeded_and_counts_match():
    cfg = TINY.model
    p1, p2, p3 = model.init_numpy(cfg, 0), model.init_numpy(cfg, 0), model.init_numpy(cfg, 1)
    l1, l2, l3 = (model.named_leaves(p) for p in (p1, p2, p3))
    assert l1.keys() == l2.keys()
    assert all(np.array_equal(l1[k], l2[k]) for k in l1)
    assert not np.array_equal(l1["wte"], l3["wte"])
    assert sum(v.size for v in l1.values()) == model.n_params(cfg)
    assert l1["blocks.attn.w_qkv"].shape == (2, 16, 48)
    assert abs(float(l1["wte"].std()) - 0.02) < 0.005
    np.testing.assert_array_equal(l1["blocks.ln1.scale"], 1.0)
    np.testing.assert_array_equal(l1["blocks.mlp.b_fc"], 0.0)


def test_decay_rule():
    mask = model.named_leaves(model_jax.decay_mask(model_jax.init_params(TINY.model, 0)))
    decayed = sorted(k for k, v in mask.items() if v)
    assert decayed == [
        "blocks.attn.w_out",
        "blocks.attn.w_qkv",
        "blocks.mlp.w_fc",
        "blocks.mlp.w_out",
        "wpe",
        "wte",
    ]


def test_model_config_validation():
    with pytest.raises(ValueError, match="n_head"):
        model.ModelConfig(n_head=3, n_embd=16)
    with pytest.raises(ValueError, match="n_layer"):
        model.ModelConfig(n_layer=0)


def test_forward_backward_shapes_and_causality():
    cfg = TINY.model
    params = model_jax.init_params(cfg, 0)
    forward = model_jax.make_apply(cfg)

    def logits_loss_grads(params, tokens, targets):
        def loss(p):
            logits = forward(p, tokens)
            return model_jax.cross_entropy(logits, targets), logits

        (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return logits, value, grads

    run = train_jax.jit(logits_loss_grads)  # one compile for everything below
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, cfg.block_size)), jnp.int32)
    targets = jnp.roll(tokens, 1, axis=0)
    logits, loss, grads = run(params, tokens, targets)
    assert logits.shape == (3, cfg.block_size, 256) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert abs(float(loss) - math.log(256)) < 0.1  # GPT-2 init: near-uniform predictions
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params)):
        assert g.shape == p.shape and bool(jnp.all(jnp.isfinite(g)))
    assert float(jnp.abs(grads["wte"]).sum()) > 0
    # changing token t changes no logit before t, and changes the logits from t on
    t = 9
    logits2, _, _ = run(params, tokens.at[:, t].set((tokens[:, t] + 1) % 256), targets)
    np.testing.assert_array_equal(np.asarray(logits[:, :t]), np.asarray(logits2[:, :t]))
    assert float(jnp.max(jnp.abs(logits[:, t:] - logits2[:, t:]))) > 0


# ---------------------------------------------------------------- schedule and optimizer


def test_jax_schedule_matches_lr_at():
    for opt in TINY.optimizers:
        sched = train_jax.make_schedule(opt, TINY)
        got = np.asarray(jax.vmap(sched)(jnp.arange(TINY.steps + 3)))
        want = [schedule.lr_at(s, opt, TINY) for s in range(TINY.steps + 3)]
        np.testing.assert_allclose(got, want, rtol=1e-5)
    opt = TINY.sophia
    assert schedule.lr_at(TINY.warmup - 1, opt, TINY) == pytest.approx(opt.lr)
    assert schedule.lr_at(TINY.steps - 1, opt, TINY) == pytest.approx(opt.lr * TINY.min_lr_ratio)


def test_refresh_steps():
    assert [s for s in range(12) if TINY.sophia.refreshes(s)] == [0, 5, 10]
    assert not any(TINY.adamw.refreshes(s) for s in range(12))
    assert TINY.eval_steps() == [0, 5, 10, 15, 20]
    assert dataclasses.replace(TINY, steps=12).eval_steps() == [0, 5, 10, 12]


# ---------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    record = compare.run_comparison(TINY, ("jax",), out, progress=False, log=lambda s: None)
    return out, record


def test_each_optimizer_lowers_the_loss(tiny_run):
    _, record = tiny_run
    results = {r["optimizer"]["name"]: r for r in record["results"]}
    assert set(results) == {"sophiag", "adamw"}
    for r in results.values():
        assert len(r["train_loss"]) == TINY.steps and not r["diverged"]
        assert np.mean(r["train_loss"][-5:]) < np.mean(r["train_loss"][:5]) - 0.3
        assert r["val_loss"][-1] < r["val_loss"][0] - 0.3
        assert r["val_steps"] == TINY.eval_steps()
    # same init and same validation batches: the two runs start from the same loss
    assert results["sophiag"]["val_loss"][0] == results["adamw"]["val_loss"][0]
    assert results["sophiag"]["train_loss"][0] == results["adamw"]["train_loss"][0]
    assert results["sophiag"]["refresh"][:6] == [True, False, False, False, False, True]
    diags = results["sophiag"]["diagnostics"]
    assert [d["step"] for d in diags] == TINY.eval_steps()
    assert all(0.0 <= d["win_rate"] <= 1.0 for d in diags) and diags[-1]["hessian_norm"] > 0
    assert results["adamw"]["diagnostics"] == []


def test_run_json_and_png_written(tiny_run):
    out, record = tiny_run
    saved = json.loads((out / "run.json").read_text())
    for key in ("config", "machine", "corpus", "summary", "table", "results", "elapsed_s"):
        assert key in saved
    summary = saved["summary"]["jax"]
    for key in ("adamw_final_val", "steps_to_adamw_final", "steps_ratio", "time_ratio"):
        assert key in summary
    for name in ("sophiag", "adamw"):
        for key in ("final_val", "ms_per_step", "tokens_per_s", "opt_state_bytes"):
            assert key in summary[name]
    assert {"plain_ms", "refresh_ms", "refresh_overhead", "final_win_rate"} <= summary[
        "sophiag"
    ].keys()
    assert summary["sophiag"]["opt_state_bytes"] >= 2 * 4 * record["n_params"]
    assert saved["machine"]["jax"]["backend"] == jax.default_backend()
    assert saved["config"]["model"]["n_embd"] == 16
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "final val loss" in record["table"]


# ---------------------------------------------------------------- driver logic without a framework


def _result(name, val_loss, step_ms=None, refresh=None, steps=40):
    opt = config.sophiag_config() if name == "sophiag" else config.adamw_config()
    n = steps
    return train.RunResult(
        framework="fake",
        optimizer=opt,
        train_loss=[1.0] * n,
        val_steps=[0, 10, 20, 30, 40][: len(val_loss)],
        val_loss=val_loss,
        step_ms=step_ms or [100.0] * n,
        refresh=refresh or [name == "sophiag" and s % 10 == 0 for s in range(n)],
        n_params=10,
        tokens_per_step=100,
        opt_state_bytes=80,
        wall_s=1.0,
    )


def test_summary_steps_to_reach_and_overhead():
    ms = [1000.0, 500.0] + [100.0 if s % 10 else 150.0 for s in range(2, 40)]
    s = _result("sophiag", [5.0, 3.0, 2.4, 2.0, 1.9], step_ms=ms)
    a = _result("adamw", [5.0, 3.5, 2.8, 2.5, 2.4])
    row = report.summarize([s, a])["fake"]
    assert row["steps_to_adamw_final"] == 20 and row["steps_ratio"] == 0.5
    assert row["sophiag"]["refresh_ms"] == 150.0 and row["sophiag"]["plain_ms"] == 100.0
    assert row["sophiag"]["refresh_overhead"] == 1.5
    table = report.format_table(report.summarize([s, a]))
    assert "20 (0.50x)" in table and "1.50x" in table
    slow = _result("sophiag", [5.0, 3.6, 2.9, 2.6, 2.5])
    row = report.summarize([slow, a])["fake"]
    assert row["steps_to_adamw_final"] is None and row["steps_ratio"] is None
    assert "not reached" in report.format_table(report.summarize([slow, a]))


def test_diverged_run_is_reported():
    r = _result("sophiag", [5.0, 3.0])
    r.diverged = True
    assert r.final_val == math.inf
    assert r.to_dict()["final_val"] is None


class _FakeTrainer:
    """Loss falls faster with a larger lr, diverges above 0.05: exercises the sweep."""

    n_params = 10

    def __init__(self, cfg, opt):
        self.opt, self.loss = opt, 5.0

    def step(self, x, y):
        self.loss = math.nan if self.opt.lr > 0.05 else self.loss * (1 - self.opt.lr - self.opt.rho)
        return self.loss

    def evaluate(self, batches):
        return self.loss

    def opt_state_bytes(self):
        return 80


class _FakeBackend:
    __name__ = "fake"

    @staticmethod
    def device_info():
        return {"framework": "fake", "device": "none"}

    @staticmethod
    def run(cfg, opt, corpus, *, progress=True):
        return train.train(
            _FakeTrainer(cfg, opt), cfg, opt, corpus, framework="fake", progress=progress
        )


def test_sweep_picks_the_best_and_writes_json(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "load_backend", lambda fw: _FakeBackend)
    record = sweep.run_sweep(
        TINY,
        "fake",
        tmp_path,
        sophia_lrs=(0.01, 0.02, 0.1),
        rhos=(0.0, 0.01),
        adamw_lrs=(0.01, 0.03),
        progress=False,
        log=lambda s: None,
    )
    assert len(record["runs"]) == 8
    assert record["best"]["sophiag"]["lr"] == 0.02 and record["best"]["sophiag"]["rho"] == 0.01
    assert record["best"]["adamw"]["lr"] == 0.03
    assert "diverged" in record["table"]
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["best"]["adamw"]["lr"] == 0.03


# ---------------------------------------------------------------- CLI


def test_cli_flags_override_the_preset():
    args = cli.parser().parse_args(
        [
            "--preset",
            "tiny",
            "--steps",
            "7",
            "--n-embd",
            "48",
            "--rho",
            "0.05",
            "--adamw-lr",
            "1e-3",
        ]
    )
    cfg = cli.build_config(args)
    tiny = config.PRESETS["tiny"]
    assert cfg.steps == 7 and cfg.model.n_embd == 48 and cfg.model.n_layer == tiny.model.n_layer
    assert cfg.sophia.rho == 0.05 and cfg.sophia.lr == tiny.sophia.lr and cfg.adamw.lr == 1e-3
    assert cfg.tokens_per_step == tiny.batch_size * tiny.model.block_size
    default = cli.build_config(cli.parser().parse_args([]))
    assert default == config.PRESETS["default"]
    assert cli.main(["--steps", "0"]) == 2


def test_cli_reports_a_missing_backend(monkeypatch, capsys):
    real = importlib.util.find_spec
    missing = {"sophia.demo.train_torch"}

    def find_spec(name, *args):
        return None if name in missing else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    for fw in ("torch", "both"):
        assert cli.main(["--framework", fw, "--preset", "tiny", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "missing from this installation" in err and "--framework jax" in err
    # torch itself not installed: the extra to install
    missing.add("torch")
    assert cli.main(["--framework", "torch", "--preset", "tiny", "--no-progress"]) == 2
    assert "pip install 'sophiag[torch,demo]'" in capsys.readouterr().err


@pytest.mark.parametrize("hessian_batch", [None, 3])
def test_jax_sophia_refresh_is_gnb_over_the_labels_behind_bs(hessian_batch, monkeypatch):
    """The demo's SophiaG: ``bs`` equals the labels behind the mean loss the GNB differentiates.

    One update with ``k=1`` refreshes ``h`` from zero, so ``h == (1 - b2) * g_hat**2``
    with ``g_hat`` the gradient, at the pre-update parameters, of the mean
    cross-entropy against labels sampled from the model's softmax (the key the
    optimizer's seed gives) over the whole batch, or over its first
    ``hessian_batch`` sequences when that is set; and the transform's ``bs`` is
    that label count, ``cfg.hessian_tokens``. A ``bs`` set from the sequence
    count, or an estimate over another part of the batch, fails here.
    """
    import sophia.jax as sj

    cfg = dataclasses.replace(
        TINY, sophia=dataclasses.replace(TINY.sophia, k=1), hessian_batch=hessian_batch
    )
    built = {}  # the bs lives in the transform, not in its state: read it where it is given
    sophia_g = sj.sophia_g
    monkeypatch.setattr(sj, "sophia_g", lambda *a, **kw: built.update(kw) or sophia_g(*a, **kw))
    trainer = train_jax.make_trainer(cfg, cfg.sophia)
    params0 = trainer.params
    sampler = data.BatchSampler(
        np.arange(5000, dtype=np.int64).astype(np.uint8) * 7,
        cfg.batch_size,
        cfg.model.block_size,
        seed=0,
    )
    x, y = sampler.next()
    trainer.step(x, y)
    (state,) = [
        s
        for s in jax.tree.leaves(
            trainer.opt_state, is_leaf=lambda s: isinstance(s, sj.ScaleBySophiaState)
        )
        if isinstance(s, sj.ScaleBySophiaState)
    ]
    seqs = cfg.batch_size if hessian_batch is None else hessian_batch
    assert cfg.reuses_forward == (hessian_batch is None)
    assert built["bs"] == cfg.hessian_tokens == seqs * cfg.model.block_size
    xh = jnp.asarray(x[:seqs])
    forward = model_jax.make_apply(cfg.model)
    _, sub = jax.random.split(jax.random.PRNGKey(cfg.seed))
    labels = jax.random.categorical(sub, forward(params0, xh), axis=-1)
    assert labels.size == cfg.hessian_tokens
    g_hat = jax.grad(lambda p: model_jax.cross_entropy(forward(p, xh), labels))(params0)
    b2 = cfg.sophia.b2
    for got, g in zip(jax.tree.leaves(state.hessian), jax.tree.leaves(g_hat), strict=True):
        np.testing.assert_allclose(
            np.asarray(got), (1 - b2) * np.square(np.asarray(g)), rtol=2e-3, atol=1e-14
        )


def test_cli_sophia_b2_and_grad_clip_flags():
    """``--sophia-b2`` and ``--grad-clip`` (the knobs of docs/demo_findings.md) reach the config."""
    cfg = cli.build_config(
        cli.parser().parse_args(["--preset", "tiny", "--sophia-b2", "0.9", "--grad-clip", "2.5"])
    )
    tiny = config.PRESETS["tiny"]
    assert cfg.sophia.b2 == 0.9 and cfg.grad_clip == 2.5
    assert cfg.adamw == tiny.adamw and cfg.sophia.rho == tiny.sophia.rho
    for bad in (["--sophia-b2", "1.0"], ["--grad-clip", "0"]):
        assert cli.main(["--preset", "tiny", *bad]) == 2


def test_cli_hessian_batch_flag():
    """``--hessian-batch N``: the refresh's sequences reach the config, bs follows, N is checked."""
    tiny = config.PRESETS["tiny"]
    cfg = cli.build_config(cli.parser().parse_args(["--preset", "tiny", "--hessian-batch", "2"]))
    assert cfg.hessian_batch == 2 and not cfg.reuses_forward
    assert cfg.hessian_tokens == 2 * tiny.model.block_size < cfg.tokens_per_step
    assert tiny.hessian_tokens == tiny.tokens_per_step and tiny.reuses_forward
    full = cli.build_config(
        cli.parser().parse_args(["--preset", "tiny", "--hessian-batch", str(tiny.batch_size)])
    )
    assert full.reuses_forward and full.hessian_tokens == tiny.tokens_per_step
    for bad in ("0", str(tiny.batch_size + 1)):
        with pytest.raises(ValueError, match=f"Invalid --hessian-batch: {bad} "):
            cli.build_config(cli.parser().parse_args(["--preset", "tiny", "--hessian-batch", bad]))
    # the default preset's quarter batch does not fit a smaller --batch-size: named, not clipped
    with pytest.raises(ValueError, match="Invalid --hessian-batch: 4, the default preset's "):
        cli.build_config(cli.parser().parse_args(["--batch-size", "2"]))
    small = cli.build_config(cli.parser().parse_args(["--batch-size", "2", "--hessian-batch", "1"]))
    assert small.hessian_batch == 1 and small.hessian_tokens == small.model.block_size
    # RunConfig itself refuses a refresh batch larger than the batch (bs would count
    # labels the refresh never sees)
    for bad in (0, tiny.batch_size + 1):
        with pytest.raises(ValueError, match=f"Invalid hessian_batch: {bad} "):
            dataclasses.replace(tiny, hessian_batch=bad)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--text", "{tmp}/missing.txt"], "Invalid --text: {tmp}/missing.txt (no such file;"),
        (["--text", "{tmp}"], "Invalid --text: {tmp} (not a file;"),
        (["--text", "{tmp}/empty.txt"], "Invalid --text: {tmp}/empty.txt (the file is empty;"),
        (["--rho", "-1"], "Invalid --rho: -1 (allowed: a finite number > 0)"),
        (["--sophia-lr", "nan"], "Invalid --sophia-lr: nan (allowed: a finite number > 0)"),
        (["--adamw-lr", "0"], "Invalid --adamw-lr: 0 (allowed: a finite number > 0)"),
        # the default preset refreshes on 4 sequences: the batch size is at fault, not that
        (["--batch-size", "0"], "Invalid --batch-size: 0 (allowed: an integer >= 1)"),
        (["--n-head", "3"], "Invalid --n-head: 3 (allowed: a divisor of --n-embd, 64)"),
        (["--max-bytes", "-1"], "Invalid --max-bytes: -1 (allowed: an integer >= 0)"),
        (["--hessian-interval", "0"], "Invalid --hessian-interval: 0 (allowed: an integer >= 1)"),
        (["--sweep-rhos", "0.1,0"], "Invalid --sweep-rhos: 0 (allowed: finite numbers > 0)"),
        (["--out", "{tmp}/empty.txt/run"], "Invalid --out: cannot write to {tmp}/empty.txt/run:"),
        (["--sweep", "--framework", "both"], "--sweep runs one framework"),
    ],
)
def test_cli_bad_values_are_one_line_naming_the_flag(flags, message, tmp_path, monkeypatch, capsys):
    """Exit status 2 and one line: the flag, the value and what is allowed; nothing runs."""
    (tmp_path / "empty.txt").write_bytes(b"")
    monkeypatch.setattr(cli, "run_comparison", _must_not_run)
    monkeypatch.setattr(cli, "run_sweep", _must_not_run)
    flags = [f.format(tmp=tmp_path) for f in flags]
    assert cli.main(flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sophia-demo: error: "), err
    assert message.format(tmp=tmp_path) in err


def _must_not_run(*args, **kwargs):
    raise AssertionError("training started despite a bad flag")


def test_cli_paths_resolve_against_the_callers_directory(tmp_path, monkeypatch):
    """``./dev`` runs the demo from the checkout with ``SOPHIA_CALLER_DIR`` set to where it was
    started: relative ``--out``/``--text`` land there, absolute, and ``--out`` exists before
    training starts."""
    seen = {}

    def fake_run(cfg, frameworks, out, *, progress):
        seen.update(cfg=cfg, out=out, exists=out.is_dir())

    monkeypatch.setattr(cli, "run_comparison", fake_run)
    caller, elsewhere = tmp_path / "caller", tmp_path / "checkout"
    caller.mkdir()
    elsewhere.mkdir()
    (caller / "input.txt").write_bytes(b"hello world\n" * 100)
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv(cli.CALLER_DIR_ENV, str(caller))
    assert cli.main(["--preset", "tiny", "--text", "input.txt", "--out", "runs/x"]) == 0
    assert seen["out"] == caller / "runs" / "x" and seen["exists"]
    assert seen["cfg"].text == str(caller / "input.txt")
    # without it, the working directory
    monkeypatch.delenv(cli.CALLER_DIR_ENV)
    (elsewhere / "input.txt").write_bytes(b"other text\n" * 100)
    assert cli.main(["--preset", "tiny", "--text", "input.txt", "--out", "o"]) == 0
    assert seen["out"] == elsewhere / "o" and seen["cfg"].text == str(elsewhere / "input.txt")


def test_unwritable_out_dir_fails_before_the_backend_loads(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    monkeypatch.setattr(compare, "load_backend", _must_not_run)
    for run in (
        lambda: compare.run_comparison(TINY, ("jax",), blocker / "out", log=lambda s: None),
        lambda: sweep.run_sweep(TINY, "jax", blocker / "out", log=lambda s: None),
    ):
        with pytest.raises(config.ConfigError, match=f"cannot write to {blocker / 'out'}: "):
            run()


def test_a_text_too_short_for_the_context_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "short.txt").write_bytes(b"x" * 300)  # 30 validation bytes, context 32
    monkeypatch.setattr(compare, "load_backend", lambda fw: _FakeBackend)
    args = ["--preset", "tiny", "--text", str(tmp_path / "short.txt"), "--out", str(tmp_path)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "validation split" in err and "--block-size" in err, err


def test_help_shows_each_presets_values_and_describes_the_presets():
    text = cli.parser().format_help()
    assert "(default: None)" not in text
    flat = " ".join(text.split())
    steps = ", ".join(f"{name}: {cfg.steps}" for name, cfg in config.PRESETS.items())
    assert f"optimizer updates ({steps})" in flat
    assert "(tiny: whole batch, default: 4, gpt2-small: whole batch)" in flat
    assert "SophiaG b2 (EMA rate of the Hessian) (every preset: 0.99)" in flat
    assert config.PRESET_NOTES.keys() == config.PRESETS.keys()
    for name, note in config.PRESET_NOTES.items():
        assert f"{name} {note}" in flat


@pytest.mark.parametrize("behind", [True, False])
def test_the_expected_result_is_said_under_the_table_and_in_the_plot(behind, tmp_path, monkeypatch):
    """When SophiaG does not reach AdamW's final loss, the console line under the table and the
    plot's title say that this is expected at this scale and where the evidence is."""
    monkeypatch.setattr(compare, "load_backend", lambda fw: _FakeBackend)
    titles = []
    monkeypatch.setattr(compare, "plot_losses", lambda results, path, title: titles.append(title))
    # the fake's loss falls by (lr + rho) per step: SophiaG's rho decides who wins
    cfg = dataclasses.replace(
        TINY, sophia=dataclasses.replace(TINY.sophia, rho=0.0 if behind else 0.03)
    )
    cfg = dataclasses.replace(cfg, sophia=dataclasses.replace(cfg.sophia, lr=0.005))
    lines = []
    record = compare.run_comparison(cfg, ("fake",), tmp_path, progress=False, log=lines.append)
    reached = record["summary"]["fake"]["steps_to_adamw_final"]
    assert (reached is None) == behind
    table_at = lines.index(record["table"])
    if behind:
        assert lines[table_at + 1] == report.BEHIND_NOTE
        assert " ".join(titles[0].split()).endswith(report.BEHIND_NOTE)
        assert "docs/demo_findings.md" in report.BEHIND_NOTE and "expected" in report.BEHIND_NOTE
    else:
        assert report.BEHIND_NOTE not in lines and "expected" not in titles[0]


# ---------------------------------------------------------------- Ctrl-C


class _Demo:
    """``python -m sophia.demo`` in its own process group, its output collected as it comes."""

    def __init__(self, args, cwd, **env):
        # JAX_LOG_COMPILES: jax says when a compilation starts and ends, so the test can aim
        env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "PYTHONFAULTHANDLER": "1",
            "JAX_LOG_COMPILES": "1",
            **env,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sophia.demo", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's Ctrl-C signals the whole group
        )
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        while chunk := self.proc.stdout.read1(4096):
            self.chunks.append(chunk)

    @property
    def output(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def wait_for(self, text, timeout=120.0):
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert self.proc.poll() is None, f"ended before {text!r}:\n{self.output}"
            assert time.monotonic() < deadline, f"no {text!r} in {timeout} s:\n{self.output}"
            time.sleep(0.02)

    def interrupt(self, timeout=60.0):
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.reader.join(5)
        return code


@pytest.mark.parametrize("moment", ["at once", "framework import", "first compile", "training"])
def test_ctrl_c_ends_cleanly_at_any_moment(moment, tmp_path):
    """Ctrl-C gives status 130, the line ``sophia-demo: interrupted`` and no traceback or crash.

    Interrupted in an XLA compilation, the demo used to end in a segmentation fault:
    jaxlib raises the KeyboardInterrupt while the compile goes on in a worker thread, which
    the interpreter's shutdown then pulls the rug from under.
    """
    args = ["--preset", "tiny", "--steps", "100000", "--n-layer", "1", "--out", str(tmp_path)]
    # at once: python -v lists the imports, so the test can aim at the demo's own
    verbose = moment in ("at once", "framework import")
    demo = _Demo(args, tmp_path, **({"PYTHONVERBOSE": "1"} if verbose else {}))
    if moment == "first compile":  # inside XLA's compilation of the training step
        demo.wait_for("Finished jaxpr to MLIR module conversion jit(train_step)")
        time.sleep(0.1)
    elif moment == "framework import":  # jaxlib's extension modules initialising
        demo.wait_for("import 'jaxlib.version'")
    elif moment == "training":
        demo.wait_for("Finished XLA compilation of jit(train_step)")
        time.sleep(1.0)
    else:  # the demo's first imports, before jax's
        demo.wait_for("import 'sophia.demo.data'")  # by sophia.demo.config
    code = demo.interrupt()
    out = demo.output
    assert code == 130, f"exit status {code}:\n{out}"
    assert out.rstrip().endswith("sophia-demo: interrupted"), out
    assert "Traceback" not in out and "Fatal Python error" not in out, out


# ---------------------------------------------------------------- ./dev

DEV = Path(__file__).resolve().parents[1] / "dev"


def _dev_stamp() -> str:
    root = DEV.parent
    data = (root / "constraints" / "dev.txt").read_bytes() + (root / "pyproject.toml").read_bytes()
    return hashlib.sha256(data).hexdigest()


def _script(path: Path, text: str) -> Path:
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)
    return path


def test_dev_says_what_it_does_while_it_builds_the_environment(tmp_path):
    """The first ``./dev`` run prints one line per phase on stderr (it was silent for minutes);
    a later one, with the environment current, prints nothing. The venv and pip are fakes."""
    venv = tmp_path / "venv"
    fake = _script(
        tmp_path / "python3",
        'mkdir -p "$3/bin"\n'  # called as: python3 -m venv DIR
        'printf \'#!/bin/sh\\necho "$*" >> "%s/calls"\\n\' "$3" > "$3/bin/python"\n'
        'chmod +x "$3/bin/python"\n',
    )
    env = {**os.environ, "SOPHIA_VENV": str(venv), "PYTHON": str(fake)}
    first = subprocess.run([DEV, "setup"], env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    lines = first.stderr.splitlines()
    assert [line.split(" ")[1] for line in lines] == ["creating", "installing", "environment"]
    assert all(line.startswith("dev: ") for line in lines) and str(venv) in lines[0]
    assert "-m pip install -q -c constraints/dev.txt -e .[dev]" in (venv / "calls").read_text()
    assert (venv / ".sophia-setup").read_text().strip() == _dev_stamp()
    again = subprocess.run([DEV, "setup"], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stderr == ""


def test_dev_demo_takes_paths_from_where_it_was_started(tmp_path):
    """``./dev`` changes to the checkout; a relative ``--text`` still means the caller's file,
    and the message names it by its absolute path."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    _script(venv / "bin" / "python", f'exec {sys.executable} "$@"\n')
    (venv / ".sophia-setup").write_text(_dev_stamp() + "\n")
    caller = tmp_path / "somewhere"
    caller.mkdir()
    run = subprocess.run(
        [DEV, "demo", "--preset", "tiny", "--text", "missing.txt"],
        cwd=caller,
        env={**os.environ, "SOPHIA_VENV": str(venv)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr == (
        f"sophia-demo: error: Invalid --text: {caller / 'missing.txt'} "
        "(no such file; allowed: a readable, non-empty file)\n"
    )


# ---------------------------------------------------------------- narrow state


def test_cli_state_dtype_flags():
    """``--mu-dtype`` and ``--hessian-dtype`` reach SophiaG's config only; unset means None."""
    cfg = cli.build_config(
        cli.parser().parse_args(
            ["--preset", "tiny", "--mu-dtype", "bfloat16", "--hessian-dtype", "block8"]
        )
    )
    tiny = config.PRESETS["tiny"]
    assert (cfg.sophia.mu_dtype, cfg.sophia.hessian_dtype) == ("bfloat16", "block8")
    assert dataclasses.replace(cfg.sophia, mu_dtype=None, hessian_dtype=None) == tiny.sophia
    assert cfg.adamw == tiny.adamw
    assert cfg.sophia.state_forms() == {"mu_dtype": "bfloat16", "hessian_dtype": "block8"}
    assert cfg.sophia.state_forms(seed=3)["seed"] == 3
    assert "m bfloat16, h block8" in cfg.sophia.describe()
    default = cli.build_config(cli.parser().parse_args([]))
    assert default.sophia.mu_dtype is None and default.sophia.hessian_dtype is None
    # the default run builds SophiaG as before narrow state: no new keywords at all
    assert default.sophia.state_forms(seed=0) == {} and ", m " not in default.sophia.describe()
    # a NumPy dtype is read as its name; block8 is for h only; AdamW has no narrow state
    fp32 = dataclasses.replace(tiny.sophia, mu_dtype=np.dtype(np.float32))
    assert fp32.mu_dtype == "float32"
    with pytest.raises(ValueError, match="Invalid mu_dtype: 'block8' "):
        dataclasses.replace(tiny.sophia, mu_dtype="block8")
    with pytest.raises(ValueError, match="Invalid hessian_dtype: 'bfloat16' for AdamW"):
        dataclasses.replace(tiny.adamw, hessian_dtype="bfloat16")
    flat = " ".join(cli.parser().format_help().split())
    assert "--mu-dtype {float32,bfloat16}" in flat
    assert "--hessian-dtype {float32,bfloat16,block8}" in flat


@pytest.mark.parametrize("flags", [["--mu-dtype", "block8"], ["--hessian-dtype", "float16"]])
def test_cli_bad_state_dtype_is_refused(flags, monkeypatch, capsys):
    """A form the argument does not take: argparse's status 2 naming the choices; nothing runs."""
    monkeypatch.setattr(cli, "run_comparison", _must_not_run)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--preset", "tiny", *flags])
    assert exit_.value.code == 2
    assert f"argument {flags[0]}: invalid choice: '{flags[1]}'" in capsys.readouterr().err


def _state_bytes_difference(sizes, mu_dtype, hessian_dtype):
    """What narrow m and h take over float32 m and h, per leaf sizes, by sophia.narrow's count."""
    from sophia import narrow

    return sum(
        narrow.state_bytes(n, mu_dtype, 4) + narrow.state_bytes(n, hessian_dtype, 4) - 8 * n
        for n in sizes
    )


def test_jax_trainer_stores_the_narrow_state_and_reports_its_bytes():
    """bf16 m and block8 h: the state holds those forms, and the measured bytes shrink by them."""
    import sophia.jax as sj
    from sophia import narrow

    forms = dataclasses.replace(TINY.sophia, mu_dtype="bfloat16", hessian_dtype="block8")
    cfg = dataclasses.replace(TINY, sophia=forms)
    plain = train_jax.make_trainer(TINY, TINY.sophia)
    trainer = train_jax.make_trainer(cfg, cfg.sophia)
    rng = np.random.default_rng(0)
    for _ in range(2):
        x = rng.integers(0, 256, (cfg.batch_size, cfg.model.block_size)).astype(np.int32)
        assert math.isfinite(trainer.step(x, np.roll(x, -1, axis=1)))
    (state,) = [
        s
        for s in jax.tree.leaves(
            trainer.opt_state, is_leaf=lambda s: isinstance(s, sj.ScaleBySophiaState)
        )
        if isinstance(s, sj.ScaleBySophiaState)
    ]
    params = jax.tree.leaves(trainer.params)
    assert [m.dtype for m in jax.tree.leaves(state.mu)] == [jnp.bfloat16] * len(params)
    blocks = jax.tree.leaves(state.hessian, is_leaf=lambda x: isinstance(x, narrow.Block8))
    assert all(isinstance(b, narrow.Block8) and b.codes.dtype == jnp.int8 for b in blocks)
    assert any(np.any(np.asarray(b.codes) != 0) for b in blocks)  # refreshed at step 0
    sizes = [p.size for p in params]
    saved = plain.opt_state_bytes() - trainer.opt_state_bytes()
    assert saved == -_state_bytes_difference(sizes, "bfloat16", "block8") > 0

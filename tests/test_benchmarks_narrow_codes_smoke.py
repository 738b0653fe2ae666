"""Smoke test of benchmarks/narrow_codes.py at a tiny size: every format reported, figures finite.

Exact checks where the figures are exact: bytes per parameter against
:func:`sophia.narrow.state_bytes` and the linear codes' count, the float32
reference against itself (all zero), the float32 replay against the trainer's
own ``h`` (bit for bit), the recording trainer against the demo's plain one,
and the block8 row's state being what :func:`sophia.narrow.encode_block8`
returned.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from sophia import narrow

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "narrow_codes.py"
FORMATS = ("float32", "block8", "linear64", "linear256", "linear1024", "bfloat16")
FIGURES = ("flips", "mean_du_near", "max_du_near", "sum_h_rel_err")


def _load():
    spec = importlib.util.spec_from_file_location("narrow_codes_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # its dataclasses look their module up by name while being defined
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    import torch

    # the benchmark's own setting (--threads 1), for this module's captures too
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _load()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def result(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "narrow_codes.json"
    bench.main(["--tiny", "--seeds", "2", "--out", str(out)])
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny(bench):
    args = bench.argparse.Namespace(small=False, tiny=True, steps="12,30")
    _, cfg, steps = bench.run_config(args)
    return cfg, bench.capture(cfg, steps, lambda msg: None)


def test_every_format_is_reported_with_finite_figures(result):
    r = result["replay"]
    assert result["settings"]["steps"] == [30, 60] and result["settings"]["threads"] == 1
    assert "cpu" in result["machine"]
    assert set(r["context"]) == {"30", "60"}
    for step, c in r["context"].items():
        assert c["refreshes"] == int(step) // 10  # refreshes at steps 0, 10, ...
        assert c["replay_max_abs_diff"] == 0.0
        assert c["near_fraction"] > 0  # so the |du| figures exist
        assert set(r["results"][step]) == set(FORMATS)
        for key in FORMATS:
            for fig in FIGURES:
                d = r["results"][step][key][fig]
                assert len(d["per_seed"]) == 2
                assert all(math.isfinite(d[k]) for k in ("mean", "sd", "max"))
        for fig in FIGURES:  # the reference against itself
            assert r["results"][step]["float32"][fig]["per_seed"] == [0.0, 0.0]
        # narrower formats disturb h, and so r near the threshold
        assert r["results"][step]["linear1024"]["mean_du_near"]["mean"] > 0


def test_bytes_per_param_are_each_formats_own(result, tiny):
    _, cap = tiny
    sizes = [e.size for e in cap.estimates[0]]
    n = sum(sizes)
    b = result["replay"]["bytes_per_param"]
    assert result["replay"]["parameters"] == n
    assert b["float32"] == 4.0 and b["bfloat16"] == 2.0
    assert b["block8"] == sum(narrow.state_bytes(s, "block8", 4) for s in sizes) / n
    for block in (64, 256, 1024):
        assert b[f"linear{block}"] == sum(s + 4 * math.ceil(s / block) for s in sizes) / n


def test_block8_row_is_sophia_narrow_encode_block8(bench, tiny, monkeypatch):
    _, cap = tiny
    returned = []
    encode = narrow.encode_block8

    def recording(x, bits):
        returned.append(encode(x, bits))
        return returned[-1]

    monkeypatch.setattr(narrow, "encode_block8", recording)
    snapshots = bench.replay(cap, bench.FORMATS["block8"], 0)
    assert len(returned) == len(cap.refresh_steps) * len(cap.group_of)
    last = snapshots[30]
    assert all(isinstance(h, narrow.Block8) for h in last)
    assert all(any(h is x for x in returned[-len(last) :]) for h in last)


def test_capture_trains_as_the_demo_does(bench, tiny):
    """The recording refresh changes nothing: m and h equal the plain trainer's, bit for bit."""
    from sophia.demo.data import BatchSampler, load_corpus
    from sophia.demo.train_torch import TorchTrainer

    cfg, cap = tiny
    trainer = TorchTrainer(cfg, cfg.sophia, device="cpu")
    sampler = BatchSampler(
        load_corpus(cfg.text, cfg.max_bytes).train,
        cfg.batch_size,
        cfg.model.block_size,
        cfg.seed + 1,
    )
    for _ in range(12):
        trainer.step(*sampler.next())
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        st = trainer.optimizer.state[p]
        np.testing.assert_array_equal(st["exp_avg"].numpy(), cap.states[12]["m"][i])
        np.testing.assert_array_equal(st["hessian"].numpy(), cap.states[12]["h"][i])


def test_clip_ratio_is_the_update_rule(bench):
    rng = np.random.default_rng(0)
    m = rng.standard_normal(1000).astype(np.float32)
    h = np.abs(rng.standard_normal(1000)).astype(np.float32) * np.float32(0.01)
    h[:10] = np.float32(-1.0)  # max(h, 0)
    rho, bs, eps = 0.3, 256.0, 1e-15
    f = np.float32
    want = np.minimum(np.abs(m) / ((f(rho) * f(bs)) * np.maximum(h, f(0)) + f(eps)), f(1))
    np.testing.assert_array_equal(bench.clip_ratio(m, h, rho, bs, eps), want)


def test_linear_codes_bracket_each_value_on_its_block_grid(bench):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(300) * np.exp(rng.standard_normal(300))).astype(np.float32)
    x[256:] = 0.0  # a block of zeros decodes to zeros
    bits = narrow.random_bits(0, 0, narrow.STREAM_HESSIAN, x.shape)
    y = bench.linear_codes(x, bits, 128)
    for lo in (0, 128, 256):
        xb, yb = x[lo : lo + 128], y[lo : lo + 128]
        scale = np.float32(np.abs(xb).max() / np.float32(127))
        if scale == 0:
            assert not yb.any()
            continue
        codes = yb / scale
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
        assert np.all(np.abs(codes) <= 127)
        assert np.all(np.abs(codes - xb / scale) < 1 + 1e-3)


def test_bad_steps_are_refused(bench):
    for steps in ("0,10", ","):
        args = bench.argparse.Namespace(small=False, tiny=True, steps=steps)
        with pytest.raises(ValueError, match="--steps"):
            bench.run_config(args)

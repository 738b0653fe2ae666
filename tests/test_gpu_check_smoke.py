"""benchmarks/gpu_check.py: its --smoke run on the CPU leaves every part, and its helpers' math.

The smoke run is the accelerator script at tiny sizes; what it must show on a
CPU is fixed by the arithmetic contract (docs/spec.md): every torch path is
bit-identical to the NumPy reference, and jitted JAX (default XLA flags, so
with fused multiply-adds) stays within the FMA bound. No timing threshold:
only that every figure is there and is a number.
"""

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("jax")
torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
TORCH_PATHS = ["torch-for-loop", "torch-foreach", "torch-fused"]
NARROW_UNITS = ["narrow m=bfloat16 h=bfloat16", "narrow m=bfloat16 h=block8"]


def _module(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _run(out, *args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # default flags: FMA on
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=900, env=env,
    )  # fmt: skip
    return proc, json.loads((out / "results.json").read_text())


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _positive(x):
    return _number(x) and x > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc, res = _run(out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc, res


def test_smoke_every_part_done(smoke):
    out, proc, res = smoke
    assert res["finished"] is True and res["smoke"] is True
    env = res["environment"]
    assert env["torch_runs_on"] == "cpu" and env["jax_runs_on"] == "cpu"
    for name in ("correctness", "step_time", "training"):
        part = res["parts"][name]
        assert part["status"] == "done", (name, part)
        assert all(u["status"] == "done" for u in part["units"].values()), (name, part["units"])
    assert (out / "log.txt").read_text().count("verdicts") == 1
    assert "verdicts" in proc.stdout
    for v in res["verdicts"]:
        assert v["met"] in (True, False) and v["target"] >= 0, v


def test_smoke_correctness_follows_the_cpu_contract(smoke):
    _, _, res = smoke
    units = res["parts"]["correctness"]["units"]
    assert set(units) == {"float32", "bfloat16", *NARROW_UNITS}
    for storage in ("float32", "bfloat16"):
        unit = units[storage]
        assert unit["steps"] >= 10 and unit["errors"] == {}, storage
        pairs = unit["pairs"]
        for path in TORCH_PATHS:
            row = pairs[f"{path} vs numpy"]
            # eager torch and the native fused kernel: bit for bit, every step
            assert row["expected"] == "exact" and row["met"] is True, (storage, path, row)
            assert row["max_ulp"] == 0 and row["win_mismatches"] == 0, (storage, path)
            assert row["free_run"] == {"theta_ulp": 0, "m_ulp": 0, "h_ulp": 0}, (storage, path)
        for i, a in enumerate(TORCH_PATHS):
            for b in TORCH_PATHS[i + 1 :]:
                assert pairs[f"{a} vs {b}"]["max_ulp"] == 0, (storage, a, b)
        jax_row = pairs["jax-jit vs numpy"]
        # XLA:CPU contracts multiply-adds under default flags: the bound, not bit identity
        assert jax_row["expected"] == "fma" and jax_row["within_fma_bound"] is True, jax_row
        assert jax_row["met"] is True and _number(jax_row["theta_ulps_of_operands"])
        for path in TORCH_PATHS:
            assert _number(pairs[f"{path} vs jax-jit"]["max_ulp"]), (storage, path)


def test_smoke_narrow_state_follows_the_cpu_contract(smoke):
    """bfloat16 m with bfloat16 / block8 h in lockstep with the spec: torch bit for bit."""
    _, _, res = smoke
    units = res["parts"]["correctness"]["units"]
    for key in NARROW_UNITS:
        unit = units[key]
        assert unit["status"] == "done" and unit["errors"] == {}, (key, unit)
        block8 = unit["hessian_dtype"] == "block8"
        assert unit["mu_dtype"] == "bfloat16" and unit["seed"] != 0, key
        assert unit["steps"] >= 5 and unit["refresh_every"] < unit["steps"], key
        for path in TORCH_PATHS:
            row = unit["pairs"][f"{path} vs numpy"]
            assert row["expected"] == "exact" and row["met"] is True, (key, path, row)
            assert row["steps"] == unit["steps"] and row["refreshes"] >= 2, (key, path)
            for k in ("theta_ulp", "m_ulp", "h_ulp", "codes_differing", "scale_ulp"):
                assert row[k] == 0, (key, path, k, row)
            assert row["win_mismatches"] == 0, (key, path)
        jax_row = unit["pairs"]["jax-jit vs numpy"]
        # XLA:CPU contracts the momentum and the EMA into FMAs: within the bounds, not exact
        assert jax_row["expected"] == "fma" and jax_row["met"] is True, (key, jax_row)
        assert jax_row["m_ulp"] <= 1 and jax_row["h_ulp"] <= 1, (key, jax_row)
        assert jax_row["code_max_diff"] <= 1 and _number(jax_row["theta_ulps_of_operands"])
        if not block8:
            assert jax_row["codes_differing"] == 0 and jax_row["scale_ulp"] == 0, key
    what = {v["what"] for v in res["verdicts"]}
    for key in NARROW_UNITS:
        for path in TORCH_PATHS:
            assert f"correctness {key}: {path} vs numpy max difference" in what, (key, path)


def test_narrow_lockstep_catches_a_wrong_step_index():
    """A path rounding with the bits of the wrong step misses: the unit can fail."""
    narrow = _module("gpu.narrow")
    environment = _module("gpu.environment")
    fw, _ = environment.probe(True, False)
    fw.jax = None
    load = narrow.NarrowTorch.load
    try:
        narrow.NarrowTorch.load = lambda self, th, m, h, step: load(self, th, m, h, step + 1)
        res = narrow.check_narrow(fw, ("bfloat16", "block8"), 3, smoke=True)
    finally:
        narrow.NarrowTorch.load = load
    for path in TORCH_PATHS:
        row = res["pairs"][f"{path} vs numpy"]
        assert row["met"] is False and row["m_ulp"] >= 1 and row["codes_differing"] > 0, row


def test_smoke_step_time_measures_the_floor(smoke):
    out, _, res = smoke
    part = res["parts"]["step_time"]
    assert set(part["units"]) == {
        f"{fw} {shapes}" for fw in ("torch", "jax") for shapes in ("gpt2-small", "tinyllama-1.1b")
    }
    for key, unit in part["units"].items():
        copy = unit["copy"]
        assert _positive(copy["bandwidth_bytes_per_s"]) and _positive(copy["bytes_per_call"]), key
        for name, v in unit["variants"].items():
            assert _positive(v["median_ms"]) and v["min_ms"] <= v["median_ms"], (key, name)
            if name == "copy":
                continue
            assert _positive(v["floor_ms"]) and _positive(v["over_floor"]), (key, name)
            assert v["fraction_of_copy_bandwidth"] == pytest.approx(1 / v["over_floor"])
            per_param = 24 if name.startswith("sophia") else 28
            assert v["bytes_per_step"] == per_param * unit["n_params"], (key, name)
        for name, r in unit["ratios"].items():
            assert _positive(r["of_medians"]) and _positive(r["paired_median"]), (key, name)
        if key.startswith("torch"):
            assert set(unit["launches"]) == {
                "sophia_fused", "sophia_foreach", "adamw_fused", "adamw_foreach"
            }  # fmt: skip
            assert all(_positive(x["count"]) for x in unit["launches"].values()), key
        else:
            assert unit["variants"]["sophia_g"]["entry_fusions"] >= 1, key
    assert (out / "step_time.png").stat().st_size > 0 and part["plot"] == "step_time.png"


def test_smoke_training_both_frameworks(smoke):
    out, _, res = smoke
    part = res["parts"]["training"]
    plan = part["units"]["plan"]
    assert plan["preset"] == "tiny" and plan["steps"] == 12
    for fw in ("torch", "jax"):
        unit = part["units"][fw]
        assert unit["steps_run"] == plan["steps"] and unit["cut_at_step"] is None, fw
        assert (
            unit["tokens_per_optimizer"]
            == plan["steps"]
            * part["config"]["batch_size"]
            * (part["config"]["model"]["block_size"])
        )
        figs = unit["figures"]
        for opt in ("sophiag", "adamw"):
            assert _positive(figs[opt]["tokens_per_s"]), (fw, opt)
            run = unit["runs"][opt]
            assert len(run["train_loss"]) == plan["steps"], (fw, opt)
            assert all(_positive(x) for x in run["train_loss"]), (fw, opt)
            assert run["val_steps"][0] == 0 and run["val_steps"][-1] == plan["steps"], (fw, opt)
        assert (
            _positive(figs["k10_step_over_adamw"]["value"])
            and figs["k10_step_over_adamw"]["k"] == 10
        )
        assert _number(figs["refresh"]["share_of_average_step"]), fw
        # the same batches: both optimizers start from the same model on the same data
        assert unit["runs"]["sophiag"]["val_loss"][0] == unit["runs"]["adamw"]["val_loss"][0]
    assert (out / "training_loss.png").stat().st_size > 0


def test_tiny_budget_keeps_finished_units_and_marks_the_rest(tmp_path):
    proc, res = _run(tmp_path, "--budget-s", "0")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    correctness = res["parts"]["correctness"]
    # the first unit always runs, so a run always leaves a result
    assert correctness["status"] == "partial"
    assert correctness["units"]["float32"]["status"] == "done"
    assert correctness["units"]["float32"]["pairs"]["torch-fused vs numpy"]["max_ulp"] == 0
    assert correctness["units"]["bfloat16"]["status"] == "skipped"
    assert "budget" in correctness["units"]["bfloat16"]["note"]
    for name in ("step_time", "training"):
        assert res["parts"][name]["status"] == "skipped"
        assert "--budget-s 0 was spent" in res["parts"][name]["note"]
    assert res["finished"] is True


# ----------------------------------------------------------------------------- helpers


def test_ulp_counts_bit_patterns():
    ulp = _module("harness.ulp")
    f32 = np.float32
    assert ulp.ulp_diff(np.array([-0.0], f32), np.array([0.0], f32)) == 1
    assert ulp.ulp_diff(np.array([np.nan], f32), np.array([-np.nan], f32)) == 0
    one = np.array([1.0], f32)
    assert ulp.ulp_diff(one, np.nextafter(one, f32(2))) == 1
    # across zero: the smallest subnormals on each side are 3 apart (-tiny, -0, +0, +tiny)
    tiny = np.array([np.nextafter(f32(0), f32(1))], f32)
    assert ulp.ulp_diff(tiny, -tiny) == 3
    f64 = np.array([1.0, -0.0])
    assert ulp.ulp_diff(f64, np.array([1.0, 0.0])) == 1
    with pytest.raises(ValueError, match="ulp_diff"):
        ulp.ulp_diff(one, np.array([1.0]))


def test_bfloat16_rounding_matches_torch():
    ulp = _module("harness.ulp")
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(10_000) * 10.0 ** rng.uniform(-40, 38, 10_000)).astype(np.float32)
    # ties: the low 16 bits exactly half-way, with even and odd bfloat16 neighbours
    high = np.arange(0x3F80, 0x3F80 + 200, dtype=np.uint32)  # bfloat16 patterns from 1.0 up
    ties = ((high << 16) | 0x8000).view(np.float32)
    x = np.concatenate([x, ties, -ties, np.float32([0.0, -0.0, np.inf, -np.inf, 3.4e38])])
    want = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    got = ulp.round_to_bfloat16(x)
    assert ulp.ulp_diff(got, want) == 0
    assert np.array_equal(ulp.bfloat16_bits(got), want.view(np.uint32) >> 16)
    with pytest.raises(ValueError, match="not bfloat16"):
        ulp.bfloat16_bits(np.float32([1.0 + 2**-20]))


def test_ulps_of_operands_scale():
    ulp = _module("harness.ulp")
    x = np.float32([1.0, 4.0])
    ref = np.float32([1.0, 4.0]) + np.float32([2**-23, 0.0])
    # one ulp of 1.0 off, measured against an operand of 2.0: half an ulp of the operand
    assert ulp.ulps_of_operands(x, ref, "float32", np.float32([2.0, 0.0])) == 0.5
    assert ulp.ulps_of_operands(x, ref, "bfloat16") == pytest.approx(2**-16)


def test_summarize_times_floor_math():
    gc = _module("gpu.step_variants")
    n = 1000
    times = {"copy": [2.0, 1.0, 3.0], "sophia": [6.0, 7.0, 5.0], "adamw": [14.0, 14.0, 14.0]}
    res = gc.summarize_times(times, n, {"sophia": 24, "adamw": 28})
    bandwidth = 8 * n / 2e-3  # the copy's median: 2 ms for 8 bytes per element
    assert res["copy"]["bandwidth_bytes_per_s"] == pytest.approx(bandwidth)
    assert res["copy"]["best_bandwidth_bytes_per_s"] == pytest.approx(8 * n / 1e-3)
    sophia = res["variants"]["sophia"]
    assert sophia["floor_ms"] == pytest.approx(24 * n / bandwidth * 1e3)  # 3x the copy
    assert sophia["over_floor"] == pytest.approx(6.0 / 6.0)
    assert res["variants"]["adamw"]["over_floor"] == pytest.approx(14.0 / 7.0)
    r = _module("harness.stats").ratio(times["sophia"], times["adamw"])
    assert r["of_medians"] == pytest.approx(6 / 14) and r["paired_median"] == pytest.approx(6 / 14)


def test_shape_lists():
    gc = _module("gpu.step_time")
    full = gc.shape_lists(smoke=False)
    gpt2, llama = full["gpt2-small"], full["tinyllama-1.1b"]
    assert len(gpt2) == 148
    d, layers, vocab, ctx = 768, 12, 50257, 1024
    assert sum(math.prod(s) for s in gpt2.values()) == (
        vocab * d + ctx * d + layers * (12 * d * d + 13 * d) + 2 * d
    )
    d, ffn, kv, vocab, layers = 2048, 5632, 256, 32000, 22
    assert len(llama) == 1 + 9 * layers + 2
    per_layer = 2 * d * d + 2 * kv * d + 3 * ffn * d + 2 * d
    assert sum(math.prod(s) for s in llama.values()) == 2 * vocab * d + layers * per_layer + d
    small = gc.shape_lists(smoke=True)
    assert len(small["gpt2-small"]) == 2 + 12 + 2 and len(small["tinyllama-1.1b"]) == 9 + 3
    assert small["tinyllama-1.1b"]["layers.0.mlp.down_proj"] == (64, 176)

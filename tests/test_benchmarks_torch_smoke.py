"""Smoke test of benchmarks/step_time_torch.py: it runs (``--small``) and writes every figure.

No timing thresholds: the numbers depend on the machine and its load.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "step_time_torch.py"
VARIANTS = [
    "sophia_forloop",
    "sophia_foreach",
    "sophia_fused",
    "adamw_forloop",
    "adamw_foreach",
    "adamw_fused",
    "reference_forloop",
]
TARGETS = [
    "sophia_fused / adamw_fused",
    "sophia_fused / floor",
    "sophia_foreach / adamw_foreach",
    "reference_forloop / sophia_forloop",
    "reference_forloop / sophia_foreach",
    "reference_forloop / sophia_fused",
]


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_step_time_torch_small_writes_all_figures(tmp_path):
    out = tmp_path / "step_time_torch.json"
    cmd = [sys.executable, str(SCRIPT), "--small", "--repeats", "2", "--warmup", "1"]
    cmd += ["--threads", "1", "--memory-repeats", "1", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "targets:" in res.stdout
    data = json.loads(out.read_text())

    m = data["machine"]
    for key in ("cpu_model", "usable_cores", "torch", "torch_threads", "loadavg_start"):
        assert m[key] not in (None, "")
    assert m["torch_threads"] == 1
    assert data["config"]["n_tensors"] == 148 and data["config"]["small"] is True
    assert 7_000_000 < data["config"]["n_params"] < 9_000_000  # ~124.4M / 16
    assert len(data["loadavg_end"]) == 3

    assert list(data["steps"]) == VARIANTS
    for s in data["steps"].values():
        for key in ("median_ms", "min_ms", "cpu_median_ms", "cpu_min_ms"):
            assert _positive(s[key])
        assert len(s["samples_ms"]) == len(s["cpu_samples_ms"]) == 2
        assert s["min_ms"] <= s["median_ms"]

    sp = data["stream_pass"]
    assert _positive(sp["median_ms"]) and _positive(sp["cpu_median_ms"])
    assert _positive(data["ratios"]["sophia_fused / stream_4r2w_compiled"]["ratio_median"])

    floor = data["floor"]
    assert floor["bytes"] == 6 * 4 * data["config"]["n_params"]
    assert _positive(floor["floor_ms"]) and _positive(floor["best_gbps"])
    assert _positive(floor["cpu_floor_ms"]) and _positive(floor["cpu_best_gbps"])
    assert set(floor["kernels"]) == {"copy", "scale", "add", "triad"}
    assert floor["best_kernel"] in floor["kernels"]
    assert all(_positive(k["best_gbps"]) for k in floor["kernels"].values())

    assert list(data["memory"]) == VARIANTS
    for mem in data["memory"].values():
        assert mem["method"] in ("clear_refs", "VmRSS sampled every 0.5 ms")
        assert isinstance(mem["extra_bytes"], int)
        assert mem["param_bytes"] == 4 * data["config"]["n_params"]
        assert _positive(mem["largest_tensor_bytes"])

    for key in TARGETS:
        r = data["ratios"][key]
        assert _positive(r["ratio_median"]) and _positive(r["ratio_min"])
        assert _positive(r["ratio_cpu_median"])
        assert isinstance(r["met_median"], bool) and isinstance(r["met_min"], bool)
        assert r["target"] in (0.9, 1.15, 1.0, 4.0)
    mem_target = data["ratios"]["sophia_fused peak extra memory / largest parameter tensor"]
    assert isinstance(mem_target["met"], bool)
    for v in VARIANTS:
        assert _positive(data["ratios"]["x floor"][v]["ratio_median"])
        assert _positive(data["ratios"]["x floor"][v]["ratio_cpu_median"])

"""The step-time benchmark runs end to end at 1/16 size and reports every figure.

It asserts no timing threshold: the figures depend on the machine and its load.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = [
    "sophia_g",
    "sophia_g_fast",
    "sophia_g_refresh",
    "sophia_g_interval",
    "adamw",
    "optax_contrib_sophia",
    "bw_scale",
    "bw_add",
    "bw_triad",
    "bw_3r1w",
]


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_step_time_small_writes_every_figure(tmp_path):
    out = tmp_path / "step_time.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_time.py"), "--small",
         "--warmup", "1", "--repeats", "2", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())

    m = res["machine"]
    for key in ("cpu_model", "cpu_count", "device", "jax", "optax", "loadavg_start"):
        assert m[key], key
    assert res["model"]["tensors"] == 148
    assert res["model"]["parameters"] == 7_800_192  # GPT-2 small at 1/4 width, vocab, context

    for name in VARIANTS:
        r = res["results"][name]
        assert r["repeats"] == 2
        for key in ("median_ms", "min_ms", "max_ms", "cpu_median_ms", "cpu_min_ms"):
            assert _positive(r[key]), (name, key)
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        if name.startswith("bw_"):
            assert _positive(r["best_GBps"]), name

    f = res["floor"]
    assert f["bytes"] == 24 * res["model"]["parameters"]
    assert _positive(f["bandwidth_GBps"]) and _positive(f["ms"])
    assert f["bandwidth_kernel"] in VARIANTS
    for key, value in res["ratios"].items():
        assert _positive(value), key
    assert res["targets"] == {"sophia_over_adamw": 0.75, "sophia_over_floor": 1.15}

    printed = proc.stdout
    for word in ("machine:", "sophia/adamw", "sophia/floor", "sophia_fast/adamw", "floor",
                 *VARIANTS):  # fmt: skip
        assert word in printed, word


def test_dev_bench_refuses_a_part_that_is_not_a_benchmark():
    """``./dev bench torch_variants`` (a module of step_time_torch.py) used to run nothing."""
    env = {"SOPHIA_VENV": sys.prefix, "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [str(ROOT / "dev"), "bench", "torch_variants"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 2
    assert "no benchmark named 'torch_variants'" in out.stderr
    assert "step_time_torch" in out.stderr and "gpu_check" in out.stderr

"""Smoke test of benchmarks/refresh_cost.py: it runs (``--small``) and writes every figure.

No timing thresholds: the numbers depend on the machine and its load.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")
pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "refresh_cost.py"
VARIANTS = ["adamw", "sophia_plain", "sophia_refresh", "sophia_k10", "fwd_bwd", "forward"]
# Ratios of step times: positive whatever the load.
RATIOS = ["refresh_over_plain", "plain_over_adamw", "k10_over_adamw"]
# Built on a difference of two times: 2 samples on a loaded machine can invert a
# small difference, so only finiteness is certain.
DIFFERENCES = ["extra_ms", "extra_over_fwd_bwd", "backward_ms", "extra_over_backward"]


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _positive(x):
    return _finite(x) and x > 0


def test_refresh_cost_small_writes_every_figure(tmp_path):
    out = tmp_path / "refresh_cost.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--warmup", "1", "--repeats", "2",
         "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())

    m = res["machine"]
    for key in ("cpu", "cpu_count", "usable_cores", "python", "loadavg_start", "loadavg_end"):
        assert m[key], key
    assert m["jax"]["jax"] and m["torch"]["torch"] and m["torch"]["threads"]
    assert res["preset"] == "tiny"
    assert res["settings"]["repeats"] == 2 and res["settings"]["k_target"] == 10
    assert res["target"] == {"k10_over_adamw": 1.08}

    assert set(res["frameworks"]) == {"jax", "torch"}
    for fw, d in res["frameworks"].items():
        assert d["n_params"] == 34_688, fw
        assert isinstance(d["meets_target"], bool), fw
        assert len(d["loadavg_start"]) == 3 and len(d["loadavg_end"]) == 3, fw
        assert list(d["results"]) == VARIANTS, fw
        for name, r in d["results"].items():
            assert r["repeats"] == 2, (fw, name)
            for key in ("median_ms", "min_ms", "max_ms", "first_call_s"):
                assert _positive(r[key]), (fw, name, key)
            assert r["min_ms"] <= r["median_ms"] <= r["max_ms"], (fw, name)
        assert set(d["figures"]) == set(RATIOS + DIFFERENCES + ["k10_run_over_adamw"]), fw
        # 2 rounds hold no whole cycle of 10 steps: the verdict is the composed figure
        run = d["figures"].pop("k10_run_over_adamw")
        assert run == {"paired": None, "total": None, "cycles": 0}, fw
        assert d["verdict_k10_over_adamw"] == d["figures"]["k10_over_adamw"]["median"], fw
        assert d["meets_target"] == (d["verdict_k10_over_adamw"] <= 1.08), fw
        for name, stats in d["figures"].items():
            assert set(stats) == {"median", "min", "paired"}, (fw, name)
            check = _positive if name in RATIOS else _finite
            for stat, value in stats.items():
                assert check(value), (fw, name, stat, value)

    printed = proc.stdout
    for word in ("machine:", "loadavg", "k10_over_adamw", "target <= 1.08", *VARIANTS):
        assert word in printed, word


def _bench_module():
    spec = importlib.util.spec_from_file_location("refresh_cost", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_k10_run_figure_is_per_cycle_sums_over_whole_cycles():
    """Cycles of 10 consecutive rounds: sum over sum, the median over cycles, the rest dropped."""
    rc = _bench_module()
    assert rc.K == 10
    adamw = [1.0] * 25
    sophia = [2.0] + [1.0] * 9 + [1.5] + [1.0] * 9 + [100.0] * 5  # 5 rounds past 2 cycles
    fig = rc.k10_run_figure(sophia, adamw)
    assert fig["cycles"] == 2
    assert fig["paired"] == pytest.approx((11.0 / 10 + 10.5 / 10) / 2)
    assert fig["total"] == pytest.approx(21.5 / 20)
    assert rc.k10_run_figure(sophia[:9], adamw[:9]) == {"paired": None, "total": None, "cycles": 0}

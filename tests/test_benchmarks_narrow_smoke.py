"""Smoke test of benchmarks/narrow_state.py at a tiny size: every part runs, every figure is there.

No timing or memory thresholds (the numbers depend on the machine and its
load; at this size the peak-memory probes only prove they run). The bytes are
checked exactly: what the script measures from the optimizers' states must
differ between forms by what :func:`sophia.narrow.state_bytes` says the forms
take; the k-step average and the memory ratios are checked as arithmetic.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from sophia import narrow

pytest.importorskip("torch")
pytest.importorskip("jax")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "narrow_state.py"
FORMS = ("f32", "bf16", "bf16_block8")


def _load():
    spec = importlib.util.spec_from_file_location("narrow_state_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    from sophia.demo import train_jax

    out = tmp_path_factory.mktemp("bench") / "narrow_state.json"
    with pytest.MonkeyPatch.context() as mp:
        # tiny runs: their time is XLA compilation, which LLVM at O0 shortens
        mp.setattr(train_jax, "CPU_COMPILER_OPTIONS", {"xla_backend_optimization_level": 0})
        bench = _load()
        args = ["--tiny", "--repeats", "2", "--warmup", "0", "--steps", "3"]
        bench.main([*args, "--long-factor", "2", "--out", str(out)])
    return bench, json.loads(out.read_text())


def _bytes_over_f32(sizes, form):
    mu, h = {"bf16": ("bfloat16", "bfloat16"), "bf16_block8": ("bfloat16", "block8")}[form]
    return sum(narrow.state_bytes(n, mu, 4) + narrow.state_bytes(n, h, 4) - 8 * n for n in sizes)


def test_every_variant_ran_and_was_timed(result):
    _, data = result
    sp = data["speed"]
    assert sp["missing"] == {}
    kinds = ("torch_fused_", "torch_foreach_", "torch_fused_refresh_", "jax_", "jax_refresh_")
    names = [k + f for k in kinds for f in FORMS]
    assert set(sp["results"]) == {*names, "torch_adamw_fused", "jax_adamw", "bw_copy", "bw_triad"}
    for d in sp["results"].values():
        assert d["repeats"] == 2 and all(x > 0 for x in d["samples_ms"])
    for name in names:
        r = sp["ratios"][name]
        assert all(
            math.isfinite(r[k]) and r[k] > 0 for k in ("over_adamw", "over_f32", "over_floor")
        )
    # each form's floor counts its own bytes: narrower state, lower floor
    ms = sp["floor"]["ms"]
    assert ms["f32"] > ms["bf16"] > ms["bf16_block8"] > 0


def test_state_bytes_are_measured_and_match_the_forms(result):
    bench, data = result
    sp = data["speed"]
    sizes = [
        math.prod(s)
        for s in bench.model_table(bench.argparse.Namespace(small=False, tiny=True)).values()
    ]
    n = sum(sizes)
    assert sp["model"]["parameters"] == n
    for fw in ("torch", "jax"):
        b = sp["state_bytes_per_param"][fw]
        assert 8 <= b["f32"] < 8.01 and 8 <= b["adamw"] < 8.01
        for form in ("bf16", "bf16_block8"):
            assert round((b[form] - b["f32"]) * n) == _bytes_over_f32(sizes, form)


def test_quality_runs_each_form_in_both_frameworks_and_a_long_one(result):
    _, data = result
    q = data["quality"]
    assert q["preset"] == "tiny" and q["target_nats"] == 0.01
    blocks = [q["frameworks"]["jax"], q["frameworks"]["torch"], q["long"]]
    assert q["long"]["steps"] == 6 and q["long"]["framework"] == "torch"
    for rec in blocks:
        assert rec["missing"] == {} and set(rec["runs"]) == set(FORMS)
        runs = rec["runs"]
        assert runs["f32"]["final_val_minus_f32"] == 0.0
        for r in runs.values():
            assert math.isfinite(r["final_val"]) and not r["diverged"]
            assert isinstance(r["within_target"], bool)
        # the demo's own measurement of the trained state shrinks with the form
        per_param = [runs[f]["state_bytes_per_param"] for f in FORMS]
        assert 8 <= per_param[0] and per_param[0] - 4 == pytest.approx(per_param[1], abs=0.01)
        assert per_param[2] == pytest.approx(3 + 4 / narrow.BLOCK_SIZE + per_param[0] - 8, abs=0.01)


def test_k_average_is_nine_plain_steps_and_one_refreshing_step_over_ten(result):
    _, data = result
    sp = data["speed"]
    res = sp["results"]
    for fw, plain, refreshing, adamw in (
        ("torch", "torch_fused_", "torch_fused_refresh_", "torch_adamw_fused"),
        ("jax", "jax_", "jax_refresh_", "jax_adamw"),
    ):
        rec = sp["k_average"][fw]
        assert rec["k"] == 10 and set(rec["forms"]) == set(FORMS)
        assert rec["adamw_ms"] == res[adamw]["median_ms"]
        for form, row in rec["forms"].items():
            p, r = res[plain + form]["median_ms"], res[refreshing + form]["median_ms"]
            assert (row["plain_ms"], row["refresh_step_ms"]) == (p, r)
            assert row["average_ms"] == (9 * p + r) / 10
            assert row["refresh_extra_ms"] == r - p
            assert row["over_adamw"] == row["average_ms"] / res[adamw]["median_ms"]
            assert row["over_f32"] == row["average_ms"] / rec["forms"]["f32"]["average_ms"]


def test_memory_probes_ran_for_every_form_and_adamw(result):
    """Each probe ran in its own process; its figures are the arithmetic of its measurement."""
    bench, data = result
    from harness.memory import CLEAR_REFS, SAMPLED
    from narrow_memory import NO_TEMPORARY_BELOW

    mem = data["memory"]
    assert mem["size"] == "tiny"
    probes = mem["probes"]
    names = [f"torch_{k}_{f}" for f in FORMS for k in ("fused", "refresh")]
    assert list(probes) == [*names, "torch_adamw_fused"]
    table = bench.model_table(bench.argparse.Namespace(small=False, tiny=True))
    n = sum(math.prod(s) for s in table.values())
    largest = max(math.prod(s) for s in table.values()) * 4
    for r in probes.values():
        assert "error" not in r, r.get("error")
        assert r["method"] in (CLEAR_REFS, SAMPLED) and len(r["extra_bytes_all"]) == 2
        assert r["extra_bytes"] == min(r["extra_bytes_all"]) and r["extra_bytes"] % 1024 == 0
        assert r["parameters"] == n and r["largest_f32_tensor_bytes"] == largest
        assert r["extra_bytes_per_param"] == r["extra_bytes"] / n
        assert r["extra_over_largest_f32"] == r["extra_bytes"] / largest
        assert r["no_full_size_temporary"] == (r["extra_bytes"] < NO_TEMPORARY_BELOW * largest)


def test_over_seeds_summarizes_each_forms_differences(result):
    """--seeds: per-seed differences to float32 at the same seed, their mean and spread."""
    del result  # loading the script put benchmarks/ on sys.path, where its parts live
    from narrow_quality import over_seeds

    def record(f32, bf16):
        return {
            "runs": {
                "f32": {"final_val": f32, "final_val_minus_f32": 0.0},
                "bf16": {"final_val": bf16, "final_val_minus_f32": bf16 - f32},
            }
        }

    out = over_seeds([record(2.0, 2.5), record(3.0, 3.0), record(4.0, 4.25)], ["f32", "bf16"])
    assert out["minus_f32"]["bf16"] == [0.5, 0.0, 0.25]
    assert out["mean_minus_f32"]["bf16"] == 0.25
    assert out["std_minus_f32"]["bf16"] == 0.25  # sqrt((0.0625 + 0.0625 + 0) / 2)
    assert out["f32_std"] == 1.0
    assert over_seeds([record(2.0, 2.5)], ["f32", "bf16"])["std_minus_f32"]["bf16"] is None

"""sophia.jax on 8 virtual CPU devices (a subprocess, so this session keeps one device)."""

import os
import subprocess
import sys

CHECKS = [
    "data_parallel_matches_one_device",
    "fully_sharded_state_follows_params",
    "shard_map_axis_name_gives_the_global_estimate",
    "shard_map_hutchinson_axis_name",
]


def test_multidevice_checks():
    here = os.path.dirname(__file__)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run(
        [sys.executable, os.path.join(here, "multidevice_checks.py")],
        capture_output=True, text=True, env=env, cwd=here, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for name in CHECKS:
        assert f"ok {name}" in out.stdout, out.stdout
    assert f"{len(CHECKS)} checks ok" in out.stdout

"""sophia.jax on 8 virtual CPU devices (a subprocess, so this session keeps one device)."""

import os

from tests.helpers import run_module

CHECKS = [
    "data_parallel_matches_one_device",
    "fully_sharded_state_follows_params",
    "shard_map_axis_name_gives_the_global_estimate",
    "shard_map_hutchinson_axis_name",
]


def test_multidevice_checks():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = run_module("tests.jax.multidevice_checks", env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for name in CHECKS:
        assert f"ok {name}" in out.stdout, out.stdout
    assert f"{len(CHECKS)} checks ok" in out.stdout

"""Each torch integration imports only its own framework; ``sophia.integrations`` imports none."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers", reason="the [transformers] extra is not installed")
pytest.importorskip("lightning", reason="the [lightning] extra is not installed")

CHECK = """
import sys

def loaded(*names):
    return [n for n in names if n in sys.modules]

import sophia.integrations
assert not loaded("torch", "transformers", "lightning", "jax", "flax"), loaded(
    "torch", "transformers", "lightning", "jax", "flax"
)
import sophia.integrations.transformers
assert not loaded("lightning", "jax", "flax"), loaded("lightning", "jax", "flax")
import sophia.integrations.lightning
assert not loaded("jax", "flax"), loaded("jax", "flax")
print("ok")
"""


def test_each_integration_imports_only_its_framework():
    out = subprocess.run(
        [sys.executable, "-c", CHECK],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]

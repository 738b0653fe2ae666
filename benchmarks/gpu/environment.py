"""What the machine offers ``gpu_check.py``: each framework, its device, or why it cannot run."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import shutil
import subprocess
import sys
from typing import Any

import numpy as np

from gpu.record import Skip


@dataclasses.dataclass
class Frameworks:
    """What this machine offers: each framework's module and device, or why not."""

    torch: Any = None
    torch_device: Any = None
    torch_note: str = ""
    jax: Any = None
    jax_note: str = ""
    smoke: bool = False

    def need_torch(self) -> Any:
        """The torch module, or :class:`Skip` with the reason."""
        if self.torch is None:
            raise Skip(self.torch_note)
        return self.torch

    def need_jax(self) -> Any:
        """The jax module, or :class:`Skip` with the reason."""
        if self.jax is None:
            raise Skip(self.jax_note)
        return self.jax

    @property
    def accelerator(self) -> bool:
        """Whether some framework runs on an accelerator."""
        on_torch = self.torch_device is not None and self.torch_device.type != "cpu"
        return on_torch or (self.jax is not None and self.jax.default_backend() != "cpu")


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001
        return None


def _probe_torch(fw: Frameworks, env: dict[str, Any], allow_cpu: bool) -> str:
    """Fills in torch and its device; returns why torch checks cannot run ("" when they can)."""
    import torch

    import sophia.torch  # noqa: F401

    env["torch"] = torch.__version__
    env["torch_cuda_build"] = torch.version.cuda
    if fw.smoke or (allow_cpu and not torch.cuda.is_available()):
        if fw.smoke:  # tiny tensors: threads only wait on each other, the more so under load
            torch.set_num_threads(1)
        fw.torch, fw.torch_device = torch, torch.device("cpu")
        env["torch_threads"] = torch.get_num_threads()
        return ""
    if not torch.cuda.is_available():
        return (
            f"torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA device; "
            "torch checks skipped (--allow-cpu runs them on the CPU)"
        )
    fw.torch, fw.torch_device = torch, torch.device("cuda")
    props = torch.cuda.get_device_properties(0)
    env["torch_device"] = {
        "name": props.name,
        "memory_bytes": props.total_memory,
        "multiprocessors": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
    }
    return ""


def _probe_jax(fw: Frameworks, env: dict[str, Any], allow_cpu: bool) -> str:
    """Fills in JAX and its backend; returns why JAX checks cannot run ("" when they can)."""
    import jax

    import sophia.jax  # noqa: F401  (needs optax too)

    env.update(
        jax=jax.__version__,
        jaxlib=_version("jaxlib"),
        optax=_version("optax"),
        jax_backend=jax.default_backend(),
        jax_devices=[str(d) for d in jax.devices()],
        jax_default_matmul_precision=str(jax.config.jax_default_matmul_precision),
    )
    if jax.default_backend() == "cpu" and not (fw.smoke or allow_cpu):
        return (
            f"jax {jax.__version__} has only the CPU backend (no GPU plugin such as "
            "jax-cuda13-plugin, or no visible GPU); JAX checks skipped (--allow-cpu: on the CPU)"
        )
    fw.jax = jax
    return ""


def probe(smoke: bool, allow_cpu: bool) -> tuple[Frameworks, dict[str, Any]]:
    """Imports what is there and says what is missing (printed and recorded)."""
    fw = Frameworks(smoke=smoke)
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "matplotlib": _version("matplotlib"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "missing": [],
    }
    for kind, check in (("torch", _probe_torch), ("jax", _probe_jax)):
        try:
            note = check(fw, env, allow_cpu)
        except Exception as e:  # noqa: BLE001 (not installed, or broken: say which)
            note = f"{kind} checks skipped: {type(e).__name__}: {e}"
            setattr(fw, kind, None)
        setattr(fw, f"{kind}_note", note)
        if note:
            env["missing"].append(note)
    if env["matplotlib"] is None:
        env["missing"].append("matplotlib is not importable: no plots (the JSON has the numbers)")
    if shutil.which("nvidia-smi"):
        q = "name,driver_version,memory.total,clocks.max.sm,clocks.max.mem"
        with contextlib.suppress(Exception):
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
    env["torch_runs_on"] = None if fw.torch_device is None else str(fw.torch_device)
    env["jax_runs_on"] = None if fw.jax is None else fw.jax.default_backend()
    return fw, env


def xla_without_fma(backend: str) -> str | None:
    """The ``XLA_FLAGS`` that keep XLA:CPU from fused multiply-adds, if they are set; else None.

    Jitted JAX is then held to the exact contract; otherwise to the FMA bound.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    capped = any(f"--xla_cpu_max_isa={isa}" in flags for isa in ("AVX", "SSE4_2"))
    return flags if backend == "cpu" and capped else None

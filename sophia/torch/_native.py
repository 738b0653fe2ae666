"""The native CPU kernels (``csrc/``), built on first use.

``fused=True`` on CPU runs one C++ pass over every tensor of a (device, dtype)
group: read ``param, grad, exp_avg, hessian``, write ``param, exp_avg``, spread
over torch's intra-op threads, like ``torch.optim.AdamW(fused=True)``'s native
CPU kernel (``fused_cpu.cpp``); a second op of the same build takes the narrow
state (:mod:`sophia.narrow`). A third (``ema_cpu.cpp``) writes the Hessian EMA
of ``update_hessian`` into a narrow ``hessian_dtype``, whatever ``fused`` says,
and ``store_cpu.cpp`` the for-loop and foreach bodies' new momenta into
``mu_dtype="bfloat16"`` and their decoded block8 ``h``.
The sources are compiled with ``torch.utils.cpp_extension`` (a C++17 compiler
and ninja are needed) into torch's extension cache the first time they are
needed, and loaded from there afterwards. Where they cannot be built,
:func:`fused_step_op` warns once and returns ``None``, and the fused path uses
its ``torch.compile``-d kernel instead, the EMA its eager code; all give the
same bits.

Set ``SOPHIA_TORCH_NATIVE=0`` to skip the native kernels.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "fused_step_narrow_op",
    "fused_step_op",
    "hessian_ema_narrow_op",
    "decode_block8_op",
    "native_enabled",
    "store_bfloat16_op",
]

_CSRC = Path(__file__).parent / "csrc"
#: The step kernels, the narrow Hessian EMA and the foreach body's narrow state
#: reads and writes; ``narrow.h`` holds what they share.
_SOURCES = [_CSRC / "fused_cpu.cpp", _CSRC / "ema_cpu.cpp", _CSRC / "store_cpu.cpp"]
#: Rounding must be operation by operation (see the sources' header comments).
#: ``-fno-math-errno`` changes no result (``sqrt`` stays correctly rounded); it
#: only spares a ``sqrt`` the errno check that keeps a loop from vectorising.
_CFLAGS = [
    "-O3",
    "-std=c++17",
    "-ffp-contract=off",
    "-fno-fast-math",
    "-fno-math-errno",
    "-fopenmp",
]
#: Vector ISA flags per ``torch.backends.cpu.get_cpu_capability()``: the kernel is
#: built for what torch itself dispatches to on this CPU, not for ``-march=native``,
#: so a cached build never runs instructions a machine lacks.
_ISA_FLAGS = {
    "AVX512": ["-mavx2", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
    "AVX2": ["-mavx2"],
}

_lock = threading.Lock()
_state: dict[str, Any] = {}


def native_enabled() -> bool:
    """Whether the environment allows the native kernel (``SOPHIA_TORCH_NATIVE`` is not 0)."""
    return os.environ.get("SOPHIA_TORCH_NATIVE", "1").strip().lower() not in ("0", "false", "no")


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """``PATH`` with the ``ninja`` package's binary while building, if ``ninja`` is not on it.

    ``cpp_extension`` runs ``ninja`` by name; an environment used without being
    activated (a notebook kernel, ``venv/bin/python script.py``) has the pip
    package installed but not on ``PATH``.
    """
    if shutil.which("ninja") is not None:
        yield
        return
    try:
        import ninja
    except ImportError:
        yield
        return
    old = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join(x for x in (ninja.BIN_DIR, old) if x)
    try:
        yield
    finally:
        if old is None:
            del os.environ["PATH"]
        else:
            os.environ["PATH"] = old


def _build() -> Any:
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability()
    isa = _ISA_FLAGS.get(capability, [])
    with _ninja_on_path():
        cpp_extension.load(
            name=f"sophia_native_{capability.lower()}",
            sources=[str(x) for x in _SOURCES],
            extra_include_paths=[str(_CSRC)],
            extra_cflags=_CFLAGS + isa,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    return torch.ops.sophia_native.fused_step_


def fused_step_op() -> Any:
    """``torch.ops.sophia_native.fused_step_``, building it on first use; ``None`` if unavailable.

    The op takes ``(params, grads, exp_avgs, hessians, coeffs)``: four lists of
    contiguous CPU tensors of one floating dtype and matching sizes, and a
    1-D tensor ``(b1, +-(1 - b1), rho * bs, eps, weight_decay, lr)`` in the
    compute dtype. It updates ``params`` and ``exp_avgs`` in place and returns
    the number of coordinates with ``r < 1`` (0-dim int64).
    """
    if not native_enabled():
        return None
    if "op" in _state:
        return _state["op"]
    with _lock:
        if "op" not in _state:
            try:
                _state["op"] = _build()
            except Exception as e:  # no compiler, no ninja, a read-only cache, ...
                _state["op"] = None
                warnings.warn(
                    "SophiaG: the native CPU kernels could not be built "
                    f"({type(e).__name__}: {str(e).strip()[:300]}); fused=True on CPU "
                    "uses the torch.compile kernel instead, and a narrow hessian_dtype's "
                    "EMA its eager code (same results, slower).",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _state["op"]


def fused_step_narrow_op() -> Any:
    """``torch.ops.sophia_native.fused_step_narrow_``, the native kernel over narrow state.

    Built with :func:`fused_step_op` (``None`` where that is). The op takes
    ``(params, grads, exp_avgs, hessians, hessian_scales, steps, coeffs, seed,
    stochastic_mu)``: the lists of :func:`fused_step_op`, except that
    ``exp_avgs`` may be float32 or bfloat16 and ``hessians`` float32, bfloat16
    or the int8 codes of ``"block8"``, whose float32 scales ``hessian_scales``
    holds (one tensor per parameter; empty otherwise); ``steps`` are the
    0-dim step counters before this step's increment, read only with
    ``stochastic_mu`` (empty otherwise), which stores ``exp_avgs`` in bfloat16
    rounded stochastically with ``seed`` as :mod:`sophia.narrow` says.
    """
    if fused_step_op() is None:
        return None
    return torch.ops.sophia_native.fused_step_narrow_


def hessian_ema_narrow_op() -> Any:
    """``torch.ops.sophia_native.hessian_ema_narrow_``, the native narrow Hessian EMA.

    Built with :func:`fused_step_op` (``None`` where that is). The op takes
    ``(hessians, hessian_scales, estimates, steps, rates, seed)`` and returns
    nothing: ``h <- b2 h + (1 - b2) h_hat`` for every Hessian, as
    :func:`sophia.spec.hessian_ema` computes it in the compute dtype of
    ``rates`` (``(b2, 1 - b2)``, float32 or float64) and stores it in the
    form the Hessians' dtype names: float32 (round to nearest), bfloat16
    (stochastic) or int8 codes of ``"block8"`` with their float32 scales in
    ``hessian_scales`` (one tensor per Hessian; empty otherwise), rounded
    with the Hessian stream's bits of ``seed`` and each Hessian's ``steps``
    entry (the index of the step the refresh starts). Every tensor is a
    contiguous CPU tensor; ``estimates`` are float32, float64, bfloat16 or
    float16, one of each Hessian's size.
    """
    if fused_step_op() is None:
        return None
    return torch.ops.sophia_native.hessian_ema_narrow_


def store_bfloat16_op() -> Any:
    """``torch.ops.sophia_native.store_bfloat16_``, the native stochastic bfloat16 store.

    Built with :func:`fused_step_op` (``None`` where that is). The op takes
    ``(out, src, keys, offsets)`` and returns nothing: every ``out`` (a
    contiguous bfloat16 CPU tensor) receives its ``src`` (float32 or float64,
    of its size) converted to float32 and rounded stochastically as
    :func:`sophia.narrow.round_bfloat16` does, with the bits of the stream
    ``keys[i]`` (:func:`sophia.torch._narrow.stream_key`) at the coordinates
    ``offsets[i] + j``.
    """
    if fused_step_op() is None:
        return None
    return torch.ops.sophia_native.store_bfloat16_


def decode_block8_op() -> Any:
    """``torch.ops.sophia_native.decode_block8``, the native block8 decode.

    Built with :func:`fused_step_op` (``None`` where that is). The op takes
    ``(codes, scales)``, contiguous int8 codes and the float32 scales of the
    blocks they cover (a piece starting on a block boundary), and returns
    :func:`sophia.narrow.decode_block8` of them: a new float32 tensor of the
    codes' shape.
    """
    if fused_step_op() is None:
        return None
    return torch.ops.sophia_native.decode_block8

"""SophiaG on an accelerator in one run: correctness, optimizer step time, training.

Run as ``./dev bench gpu_check`` or, where the project's virtual environment
cannot be built (a machine with no package registry), as
``python benchmarks/gpu_check.py`` with any Python that imports torch and/or
JAX: the checkout's ``sophia`` is imported from the source tree, and whatever
is missing (torch, a CUDA build of it, jax, its GPU plugin, optax,
matplotlib) is printed at the start and its checks are skipped with a note.
Docs: ``docs/gpu_check.md``.

Three parts, in this order, each written to ``results.json`` in the output
folder (``--out``, default ``benchmarks/results/gpu_check-<timestamp>/``) as
soon as each of its units finishes, so that a run cut off still leaves what
it finished; ``log.txt`` there repeats the console:

1. **correctness**: every torch path (for-loop, foreach, fused) and jitted
   JAX, on the accelerator, in float32 and bfloat16, against the NumPy
   reference :func:`sophia.spec.sophia_update` / :func:`sophia.spec.hessian_ema`
   for 50 steps with a Hessian refresh every 5 (estimates and gradients from a
   seeded RNG). Every step feeds each implementation the reference's state,
   so each pair (implementation against the reference, and JAX against each
   torch path) is compared on the same inputs; the largest distance in ulps
   (bit patterns: -0 is one ulp from +0) per pair, the win-rate mismatches,
   and the distance in ulps of the largest operand, the measure of the
   fused-multiply-add bound. Each implementation is also run on its own for
   the 50 steps and compared with the reference trajectory.
2. **step time**: GPT-2-small shapes (148 tensors, 124.4M parameters) and
   TinyLlama-1.1B shapes (201 tensors, 1.1B parameters), float32.
   ``SophiaG(fused=True)`` and ``(foreach=True)`` against
   ``torch.optim.AdamW(fused=True)`` and ``(foreach=True)``, jitted
   ``sophia_g`` (and ``step_diagnostics=False``) against ``optax.adamw``, and a
   device-to-device copy of N floats timed in the same interleaved rounds: the
   bandwidth floor. CUDA events (torch) and ``block_until_ready`` (JAX),
   warm-up, rounds in rotating order, medians. The bytes each optimizer must
   move per step (SophiaG reads theta, g, m, h and writes theta, m: 24 B per
   parameter; AdamW reads theta, g, m, v and writes theta, m, v: 28 B) over its
   time, as a fraction of the copy's bandwidth. ``torch.profiler`` counts the
   CUDA kernels one step of each torch optimizer launches.
3. **training**: the demo's GPT (:mod:`sophia.demo`) with SophiaG (k = 10)
   and AdamW, stepped alternately on the same batches (same tokens) in each
   framework, torch under bfloat16 autocast on CUDA; the largest preset
   whose run fits the part's time; loss curves (``training_loss.png``),
   tokens per second, the refresh's share of the step time and SophiaG's
   average step over AdamW's.

``--budget-s`` (default 450) bounds the whole run: each part gets a share of
what is left when it starts (correctness a quarter, step time 40%, training
the rest), a unit that would start past its part's share is skipped with a
note, and a part that would start past the budget is skipped. The first
correctness unit always runs, so every run leaves a result. ``--smoke`` runs
every part at tiny sizes on the CPU (JAX forced to the CPU), for the test
suite.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(HERE))

from harness.ulp import (  # noqa: E402
    bfloat16_bits,
    round_to_bfloat16,
    ulp_diff,
    ulps_of_operands,
)

from sophia import spec  # noqa: E402

PARTS = ("correctness", "step_time", "training")
#: Each part's share of the budget left when it starts.
SHARES = {"correctness": 0.25, "step_time": 0.4, "training": 1.0}
DEFAULT_BUDGET_S = 450.0
#: The fused-multiply-add bound, in ulps of each result's largest operand. m and h come out
#: of one contractible operation each (b1*m + (1-b1)*g, b2*h + (1-b2)*h_hat), and one
#: contraction moves a result by at most 2 such ulps (docs/spec.md). Three feed theta:
#: den = rho*bs*h + eps, u = clamp(m/den) + wd*theta and theta - lr*u; the first two reach
#: theta scaled by lr (< 1), each by about one ulp of theta's operands, the last by 2.
FMA_BOUND_ULPS = {"m": 2.0, "h": 2.0, "theta": 4.0}
TARGETS = {
    "torch_fused_over_adamw": 1.0,
    "torch_fused_over_floor": 1.15,
    "jax_sophia_over_adamw": 1.0,
    "jax_sophia_over_floor": 1.15,
    "k10_step_over_adamw": 1.05,
}
#: Correctness hyperparameters: none is exact in float32, every branch of the clip is hit.
HP = {
    "lr": 3e-2,
    "b1": 0.9,
    "b2": 0.97,
    "rho": 0.037,
    "weight_decay": 0.13,
    "bs": 333.0,
    "eps": 1e-9,
}
REFRESH_EVERY = 5
#: Bytes per float32 parameter each optimizer must read and write in a step.
SOPHIA_BYTES = 6 * 4
ADAMW_BYTES = 7 * 4
COPY_BYTES = 2 * 4


class Skip(Exception):
    """A unit that cannot run here (a framework or device is missing); the message says why."""


# ----------------------------------------------------------------------------- the run record


class Run:
    """The results folder, the budget and the record written after every unit.

    Args:
      out: the results folder (created).
      budget_s: seconds the whole run may take.
      argv: the command line, for the record.
    """

    def __init__(self, out: Path, budget_s: float, argv: list[str]) -> None:
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + budget_s
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self._log = open(out / "log.txt", "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.data: dict[str, Any] = {
            "script": "benchmarks/gpu_check.py",
            "argv": argv,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "budget_s": budget_s,
            "environment": {},
            "parts": {p: {"status": "pending"} for p in PARTS},
            "verdicts": [],
        }

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.t0

    def left(self) -> float:
        """Seconds of the budget left (negative once spent)."""
        return self.deadline - time.perf_counter()

    def log(self, msg: str) -> None:
        """Prints ``msg`` and appends it to ``log.txt``."""
        print(msg, flush=True)
        self._log.write(msg + "\n")
        self._log.flush()

    def save(self) -> None:
        """Writes ``results.json`` atomically (a run killed mid-write leaves the previous one)."""
        self.data["elapsed_s"] = round(self.elapsed(), 2)
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(_jsonable(self.data), indent=2) + "\n")
        os.replace(tmp, self.out / "results.json")

    def verdict(
        self, what: str, value: float | None, target: float, note: str = "", met: bool | None = None
    ) -> None:
        """Records a figure against its ``<=`` target (``met`` overrides the comparison)."""
        if met is None and value is not None and math.isfinite(value):
            met = bool(value <= target)
        self.data["verdicts"].append(
            {"what": what, "value": value, "target": target, "met": met, "note": note}
        )

    def close(self) -> None:
        """Closes the log."""
        self._log.close()


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


@dataclasses.dataclass
class Part:
    """One part's record and its share of the budget."""

    run: Run
    name: str
    deadline: float

    @property
    def record(self) -> dict[str, Any]:
        """The part's entry in ``results.json``."""
        return self.run.data["parts"][self.name]

    def unit(self, key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """Runs one unit and records it: done, skipped (budget or missing piece) or error.

        The first unit of a part always runs; a later one is skipped once the
        part's share of the budget is spent.
        """
        units = self.record.setdefault("units", {})
        if units and time.perf_counter() > self.deadline:
            units[key] = {"status": "skipped", "note": "the part's share of --budget-s was spent"}
            self.run.log(f"  {key}: skipped (budget)")
            self.run.save()
            return None
        self.run.log(f"  {key} ...")
        t0 = time.perf_counter()
        try:
            res: dict[str, Any] | None = {"status": "done", **fn()}
        except Skip as e:
            res = {"status": "skipped", "note": str(e)}
        except Exception as e:  # noqa: BLE001 (a failing unit must not end the run)
            res = {
                "status": "error",
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-4000:],
            }
        res["wall_s"] = round(time.perf_counter() - t0, 2)
        units[key] = res
        note = res.get("note") or res.get("error") or ""
        self.run.log(f"  {key}: {res['status']} ({res['wall_s']:.1f} s) {note}".rstrip())
        self.run.save()
        return res if res["status"] == "done" else None


def run_part(run: Run, name: str, body: Callable[[Part], None], first: bool = False) -> None:
    """Runs one part with its share of what is left of the budget, or marks it skipped."""
    rec = run.data["parts"][name]
    left = run.left()
    if left <= 0 and not first:
        rec.update(
            status="skipped",
            note=f"--budget-s {run.data['budget_s']:g} was spent ({run.elapsed():.1f} s "
            "elapsed) before this part started",
        )
        run.log(f"{name}: skipped (budget spent)")
        run.save()
        return
    part = Part(run, name, time.perf_counter() + max(left, 0.0) * SHARES[name])
    rec.update(status="running", started_at_s=round(run.elapsed(), 2))
    run.log(f"{name}: (up to {max(left, 0.0) * SHARES[name]:.0f} s)")
    run.save()
    t0 = time.perf_counter()
    try:
        body(part)
        states = {u["status"] for u in rec.get("units", {}).values()}
        rec["status"] = "done" if states <= {"done"} else "partial"
    except Exception as e:  # noqa: BLE001
        rec.update(status="error", error=f"{type(e).__name__}: {e}")
        rec["traceback"] = traceback.format_exc()[-4000:]
        run.log(f"{name}: error {type(e).__name__}: {e}")
    rec["wall_s"] = round(time.perf_counter() - t0, 2)
    run.save()


# ----------------------------------------------------------------------------- environment


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


# ----------------------------------------------------------------------------- part 1: correctness


def _storage_round(x: np.ndarray, storage: str) -> np.ndarray:
    return round_to_bfloat16(x) if storage == "bfloat16" else np.asarray(x, np.float32)


def _bits(x: np.ndarray, storage: str) -> np.ndarray:
    return bfloat16_bits(x) if storage == "bfloat16" else np.asarray(x, np.float32)


def _ulp(a: np.ndarray, b: np.ndarray, storage: str) -> int:
    return ulp_diff(_bits(a, storage), _bits(b, storage))


def correctness_shapes(smoke: bool) -> list[tuple[int, ...]]:
    """Empty, scalar and small tensors (packed together by the fused path) and large ones."""
    small = [(), (1,), (7,), (0, 3), (129,), (33, 17)]
    return small + ([(300, 131)] if smoke else [(515, 256), (40_000,), (1000, 96)])


@dataclasses.dataclass
class Inputs:
    """The seeded inputs of a correctness run, flat float32 arrays of ``storage`` values."""

    storage: str
    shapes: list[tuple[int, ...]]
    theta0: np.ndarray
    m0: np.ndarray
    grads: list[np.ndarray]
    h_hats: dict[int, np.ndarray]

    @classmethod
    def make(cls, storage: str, shapes: list[tuple[int, ...]], steps: int, seed: int) -> Inputs:
        """Parameters, momenta (exact zeros and -0 among them), gradients and estimates.

        The estimates span eight decades, a tenth negative (as Hutchinson's can
        be) and some exact zeros, so that coordinates fall on both sides of the
        clip and on ``max(h, 0)``.
        """
        rng = np.random.default_rng(seed)
        n = sum(math.prod(s) for s in shapes)

        def signed_zeros(x: np.ndarray, every: int) -> np.ndarray:
            x[::every] = 0.0
            x[every // 2 :: every] = -0.0
            return x

        theta0 = signed_zeros(rng.standard_normal(n), 13)
        m0 = signed_zeros(rng.standard_normal(n) * 1e-2, 11)
        grads = [
            signed_zeros(rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 0), 17)
            for _ in range(steps)
        ]
        h_hats = {}
        for t in range(0, steps, REFRESH_EVERY):
            h = (rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 0, n)) ** 2
            h[rng.random(n) < 0.1] *= -1
            h[rng.random(n) < 0.05] = 0.0
            h_hats[t] = h
        r = lambda x: _storage_round(x.astype(np.float32), storage)  # noqa: E731
        return cls(
            storage,
            shapes,
            r(theta0),
            r(m0),
            [r(g) for g in grads],
            {t: r(h) for t, h in h_hats.items()},
        )

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        """``flat`` cut into the tensors' shapes."""
        out, i = [], 0
        for s in self.shapes:
            k = math.prod(s)
            out.append(flat[i : i + k].reshape(s))
            i += k
        return out


def reference_step(
    theta: np.ndarray, g: np.ndarray, m: np.ndarray, h: np.ndarray, storage: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`sophia.spec.sophia_update` on float32 values, results rounded to ``storage``.

    For bfloat16 storage that is the spec exactly: the math runs in float32
    from the (exact) float32 values and each result is rounded once.
    """
    kw = {k: v for k, v in HP.items() if k != "b2"}
    t, mn, w = spec.sophia_update(theta, g, m, h, **kw)
    return _storage_round(t, storage), _storage_round(mn, storage), w


def reference_refresh(h: np.ndarray, h_hat: np.ndarray, storage: str) -> np.ndarray:
    """:func:`sophia.spec.hessian_ema` on float32 values, rounded to ``storage``."""
    return _storage_round(spec.hessian_ema(h, h_hat, HP["b2"]), storage)


class TorchImpl:
    """:class:`sophia.torch.SophiaG` on one path, loaded from and read into flat arrays.

    Args:
      torch: the module.
      path: ``"for-loop"``, ``"foreach"`` or ``"fused"``.
      inputs: shapes and storage dtype.
      device: where the tensors live.
    """

    PATHS = {
        "for-loop": {"foreach": False, "fused": False},
        "foreach": {"foreach": True, "fused": False},
        "fused": {"foreach": False, "fused": True},
    }

    def __init__(self, torch: Any, path: str, inputs: Inputs, device: Any) -> None:
        from sophia.torch import SophiaG

        self.torch, self.inputs, self.device = torch, inputs, device
        self.dtype = torch.bfloat16 if inputs.storage == "bfloat16" else torch.float32
        self.params = [
            torch.nn.Parameter(torch.zeros(s, dtype=self.dtype, device=device))
            for s in inputs.shapes
        ]
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.opt = SophiaG(
            self.params,
            lr=HP["lr"],
            betas=(HP["b1"], HP["b2"]),
            rho=HP["rho"],
            weight_decay=HP["weight_decay"],
            bs=HP["bs"],
            eps=HP["eps"],
            **self.PATHS[path],
        )
        # creates the state; the step after it makes the next refresh a fresh one (SophiaG
        # skips a second refresh with no step between); load() overwrites what both did
        self.opt.update_hessian(hessian=[torch.zeros_like(p) for p in self.params])
        self.opt.step()

    def _tensors(self, flat: np.ndarray) -> list[Any]:
        t = self.torch
        return [
            t.from_numpy(np.array(x, np.float32)).to(device=self.device, dtype=self.dtype)
            for x in self.inputs.split(flat)
        ]

    def load(self, theta: np.ndarray, m: np.ndarray, h: np.ndarray) -> None:
        """Sets the parameters, momenta and Hessian EMAs."""
        with self.torch.no_grad():
            for p, th, mm, hh in zip(
                self.params, self._tensors(theta), self._tensors(m), self._tensors(h)
            ):
                p.copy_(th)
                self.opt.state[p]["exp_avg"].copy_(mm)
                self.opt.state[p]["hessian"].copy_(hh)

    def refresh(self, h_hat: np.ndarray) -> None:
        """``update_hessian(hessian=...)`` with the estimate."""
        self.opt.update_hessian(hessian=self._tensors(h_hat))

    def step(self, g: np.ndarray) -> None:
        """One ``step()`` with gradient ``g``."""
        for p, gg in zip(self.params, self._tensors(g)):
            p.grad.copy_(gg)
        self.opt.step()

    def read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """``(theta, m, h, win_rate)``, flat float32."""

        def flat(ts: list[Any]) -> np.ndarray:
            parts = [t.detach().float().cpu().numpy().reshape(-1) for t in ts]
            return np.concatenate(parts) if parts else np.zeros(0, np.float32)

        st = [self.opt.state[p] for p in self.params]
        win = float(self.opt.diagnostics()[0]["win_rate"])
        return (
            flat(self.params),
            flat([s["exp_avg"] for s in st]),
            flat([s["hessian"] for s in st]),
            win,
        )


class JaxImpl:
    """Jitted :func:`sophia.jax.sophia_g` (manual refreshes) on flat arrays in and out."""

    def __init__(self, jax: Any, inputs: Inputs) -> None:
        import jax.numpy as jnp
        import optax

        import sophia.jax as sj

        self.jax, self.jnp, self.inputs = jax, jnp, inputs
        self.dtype = jnp.bfloat16 if inputs.storage == "bfloat16" else jnp.float32
        tx = sj.sophia_g(
            HP["lr"],
            HP["b1"],
            HP["b2"],
            HP["rho"],
            HP["weight_decay"],
            bs=HP["bs"],
            eps=HP["eps"],
            hessian_update_interval=None,
        )
        self.params = [jnp.asarray(np.zeros(s, self.dtype)) for s in inputs.shapes]
        self.state = jax.jit(tx.init)(self.params)  # eager init compiles every op per shape

        def step(p: Any, s: Any, g: Any) -> Any:
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        self._step = jax.jit(step)
        self._refresh = jax.jit(sj.update_hessian)

    def _arrays(self, flat: np.ndarray) -> list[Any]:
        # cast on the host (exact: the values are the dtype's), so nothing compiles per shape
        return [self.jnp.asarray(x.astype(self.dtype)) for x in self.inputs.split(flat)]

    def load(self, theta: np.ndarray, m: np.ndarray, h: np.ndarray) -> None:
        """Sets the parameters, momenta and Hessian EMAs."""
        self.params = self._arrays(theta)
        core = self.state[0]._replace(mu=self._arrays(m), hessian=self._arrays(h))
        self.state = (core, *self.state[1:])

    def refresh(self, h_hat: np.ndarray) -> None:
        """``update_hessian(state, h_hat)``, jitted."""
        self.state = self._refresh(self.state, self._arrays(h_hat))

    def step(self, g: np.ndarray) -> None:
        """One jitted update and ``apply_updates``."""
        self.params, self.state = self._step(self.params, self.state, self._arrays(g))

    def read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """``(theta, m, h, win_rate)``, flat float32."""

        def flat(xs: list[Any]) -> np.ndarray:
            parts = [np.asarray(x, np.float32).reshape(-1) for x in xs]
            return np.concatenate(parts) if parts else np.zeros(0, np.float32)

        core = self.state[0]
        return flat(self.params), flat(core.mu), flat(core.hessian), float(core.win_rate)


def expectation(name: str, fw: Frameworks) -> tuple[str, str]:
    """``("exact" | "fma", why)``: what the arithmetic contract promises for ``name`` here."""
    if name.startswith("torch"):
        on = "CUDA" if fw.torch_device.type == "cuda" else fw.torch_device.type
        if "fused" not in name:
            return "exact", (
                f"eager kernels on {on}: one kernel per operation, each rounding once, and no "
                "alpha=/addcmul/lerp forms that one kernel could contract; IEEE division"
            )
        if fw.torch_device.type == "cpu":
            return "exact", "native C++ kernel (or inductor C++ with FP contraction off)"
        return "exact", (
            "inductor Triton kernel with fp fusion off (the library compiles with "
            "emulate_precision_casts=True); the division is div.full.f32 (approximate) unless "
            "inductor's eager_numerics.division_rounding is on, which the fused-div_rn row tests"
        )
    backend = fw.jax.default_backend()
    flags = os.environ.get("XLA_FLAGS", "")
    if backend == "cpu" and any(f"--xla_cpu_max_isa={isa}" in flags for isa in ("AVX", "SSE4_2")):
        return "exact", f"XLA:CPU under XLA_FLAGS={flags} (no FMA instructions)"
    where = "XLA:CPU" if backend == "cpu" else f"XLA:{backend.upper()} (LLVM backend)"
    return "fma", (
        f"{where} contracts a*b+c into fused multiply-adds inside jit: each rounding step may "
        "differ by up to 2 ulps of its largest operand (docs/spec.md); theta, fed by three "
        f"such operations, by up to {FMA_BOUND_ULPS['theta']:g}"
    )


@dataclasses.dataclass
class PairStats:
    """The worst differences between two implementations over a run."""

    theta_ulp: int = 0
    m_ulp: int = 0
    h_ulp: int = 0
    win_mismatches: int = 0
    #: Against the reference only: distances in ulps of the largest operand (the FMA bound).
    m_ulps_of_operands: float = 0.0
    theta_ulps_of_operands: float = 0.0
    h_ulps_of_operands: float = 0.0

    def merge(self, **kw: float) -> None:
        """Keeps the larger of each figure (win mismatches add up)."""
        for k, v in kw.items():
            if k == "win_mismatches":
                self.win_mismatches += int(v)
            else:
                setattr(self, k, max(getattr(self, k), v))

    @property
    def max_ulp(self) -> int:
        """The largest distance of theta, m and h."""
        return max(self.theta_ulp, self.m_ulp, self.h_ulp)

    @property
    def within_fma_bound(self) -> bool:
        """Each result within its :data:`FMA_BOUND_ULPS` ulps of its largest operand."""
        return all(
            getattr(self, f"{k}_ulps_of_operands") <= bound for k, bound in FMA_BOUND_ULPS.items()
        )


def _theta_bound(
    theta: np.ndarray,
    theta0: np.ndarray,
    m: np.ndarray,
    h: np.ndarray,
    ref: np.ndarray,
    storage: str,
) -> float:
    """Theta's distance in ulps of its largest operand, given the momentum it computed.

    A one-rounding difference in a momentum that cancelled moves ``|m| / den``
    by more than an ulp, so in float32 theta is checked against the reference
    fed the momentum the implementation produced (``b1 = 0`` makes the
    reference's momentum the "gradient" passed, as the test suite does). In
    bfloat16 the float32 momentum behind theta is not stored: theta is checked
    against the reference's.
    """
    if storage == "float32":
        kw = {k: v for k, v in HP.items() if k not in ("b1", "b2")}
        ref, _, _ = spec.sophia_update(theta0, m, np.zeros_like(m), h, b1=0.0, **kw)
    return ulps_of_operands(theta, ref, storage, theta0, HP["lr"])


def check_correctness(fw: Frameworks, storage: str, steps: int, smoke: bool) -> dict[str, Any]:
    """Every available implementation against the reference and each other (one storage dtype)."""
    inputs = Inputs.make(
        storage, correctness_shapes(smoke), steps, seed=1 if storage == "float32" else 2
    )
    impls: dict[str, Any] = {}
    notes = []
    if fw.torch is not None:
        for path in TorchImpl.PATHS:
            impls[f"torch-{path}"] = lambda path=path: TorchImpl(
                fw.torch, path, inputs, fw.torch_device
            )
    else:
        notes.append(fw.torch_note)
    if fw.jax is not None:
        impls["jax-jit"] = lambda: JaxImpl(fw.jax, inputs)
    else:
        notes.append(fw.jax_note)
    if not impls:
        raise Skip("; ".join(notes))
    return compare_implementations(fw, inputs, impls, steps, notes)


def compare_implementations(
    fw: Frameworks,
    inputs: Inputs,
    makers: dict[str, Callable[[], Any]],
    steps: int,
    notes: list[str],
) -> dict[str, Any]:
    """Lockstep (same inputs every step) and free-running comparisons of ``makers``' results."""
    storage, n = inputs.storage, inputs.theta0.size
    impls, errors = {}, {}
    for name, make in makers.items():
        try:
            impls[name] = make()
        except Exception as e:  # noqa: BLE001 (one broken path must not hide the others)
            errors[name] = f"{type(e).__name__}: {e}"
    vs_ref = {name: PairStats() for name in impls}
    names = list(impls)
    pairs = {(a, b): PairStats() for i, a in enumerate(names) for b in names[i + 1 :]}
    theta, m, h = inputs.theta0, inputs.m0, np.zeros_like(inputs.theta0)
    trajectory = []
    for t in range(steps):
        if t in inputs.h_hats:
            h_hat = inputs.h_hats[t]
            h_new = reference_refresh(h, h_hat, storage)
            outs = {}
            for name, impl in list(impls.items()):
                try:
                    impl.load(theta, m, h)
                    impl.refresh(h_hat)
                    outs[name] = impl.read()[2]
                except Exception as e:  # noqa: BLE001
                    errors[name] = f"refresh at step {t}: {type(e).__name__}: {e}"
                    del impls[name]
            for name, got in outs.items():
                vs_ref[name].merge(
                    h_ulp=_ulp(got, h_new, storage),
                    h_ulps_of_operands=ulps_of_operands(got, h_new, storage, h, h_hat),
                )
            for (a, b), st in pairs.items():
                if a in outs and b in outs:
                    st.merge(h_ulp=_ulp(outs[a], outs[b], storage))
            h = h_new
        g = inputs.grads[t]
        theta_new, m_new, n_win = reference_step(theta, g, m, h, storage)
        want_rate = float(spec.win_rate(n_win, n, np.float32))
        outs = {}
        for name, impl in list(impls.items()):
            try:
                impl.load(theta, m, h)
                impl.step(g)
                outs[name] = impl.read()
            except Exception as e:  # noqa: BLE001
                errors[name] = f"step {t}: {type(e).__name__}: {e}"
                del impls[name]
        for name, (th, mm, _, rate) in outs.items():
            vs_ref[name].merge(
                theta_ulp=_ulp(th, theta_new, storage),
                m_ulp=_ulp(mm, m_new, storage),
                win_mismatches=int(rate != want_rate),
                m_ulps_of_operands=ulps_of_operands(mm, m_new, storage, m, g),
                theta_ulps_of_operands=_theta_bound(th, theta, mm, h, theta_new, storage),
            )
        for (a, b), st in pairs.items():
            if a in outs and b in outs:
                st.merge(
                    theta_ulp=_ulp(outs[a][0], outs[b][0], storage),
                    m_ulp=_ulp(outs[a][1], outs[b][1], storage),
                    win_mismatches=int(outs[a][3] != outs[b][3]),
                )
        theta, m = theta_new, m_new
        trajectory.append((theta, m, h))

    free = {}
    for name, impl in impls.items():
        worst = {"theta_ulp": 0, "m_ulp": 0, "h_ulp": 0}
        try:
            impl.load(inputs.theta0, inputs.m0, np.zeros_like(inputs.theta0))
            for t in range(steps):
                if t in inputs.h_hats:
                    impl.refresh(inputs.h_hats[t])
                impl.step(inputs.grads[t])
                got = impl.read()
                for key, a, b in zip(worst, got[:3], trajectory[t]):
                    worst[key] = max(worst[key], _ulp(a, b, storage))
            free[name] = worst
        except Exception as e:  # noqa: BLE001
            errors[name] = f"free run: {type(e).__name__}: {e}"

    def report(name: str, st: PairStats, expect: str, why: str) -> dict[str, Any]:
        met = (
            st.max_ulp == 0 and st.win_mismatches == 0 if expect == "exact" else st.within_fma_bound
        )
        return {
            **dataclasses.asdict(st),
            "max_ulp": st.max_ulp,
            "expected": expect,
            "why": why,
            "within_fma_bound": st.within_fma_bound,
            "met": met,
        }

    rows = {}
    for name, st in vs_ref.items():
        if name in errors:
            continue
        expect, why = expectation(name, fw)
        rows[f"{name} vs numpy"] = {**report(name, st, expect, why), "free_run": free.get(name)}
    exp = {name: expectation(name, fw)[0] for name in names}
    for (a, b), st in pairs.items():
        if a in errors or b in errors:
            continue
        both = "exact" if exp[a] == exp[b] == "exact" else "fma"
        d = dataclasses.asdict(st)
        for k in ("m_ulps_of_operands", "theta_ulps_of_operands", "h_ulps_of_operands"):
            d.pop(k)
        rows[f"{a} vs {b}"] = {
            **d,
            "max_ulp": st.max_ulp,
            "expected": both,
            "met": (st.max_ulp == 0 and st.win_mismatches == 0) if both == "exact" else None,
        }
    return {
        "storage": storage,
        "steps": steps,
        "refresh_every": REFRESH_EVERY,
        "n_elements": n,
        "shapes": [list(s) for s in inputs.shapes],
        "hyperparameters": HP,
        "pairs": rows,
        "errors": errors,
        "notes": [x for x in notes if x],
    }


@contextlib.contextmanager
def fused_kernel_config(torch: Any, patch: dict[str, Any]) -> Iterator[None]:
    """The fused torch path recompiled under extra inductor settings, restored afterwards."""
    import torch._inductor.config as inductor_config

    from sophia.torch import _fused

    def fresh() -> None:
        _fused.COMPILED_KERNELS.clear()  # compiled per dtype on first use: compile again
        torch._dynamo.reset()

    fresh()
    try:
        with inductor_config.patch(patch):
            yield
    finally:
        fresh()


def correctness(part: Part, fw: Frameworks, smoke: bool) -> None:
    """Part 1 (see the module docstring)."""
    steps = 12 if smoke else 50
    results = {}
    for storage in ("float32", "bfloat16"):
        res = part.unit(
            storage, lambda storage=storage: check_correctness(fw, storage, steps, smoke)
        )
        if res is not None:
            results[storage] = res
    if fw.torch_device is not None and fw.torch_device.type == "cuda":

        def div_rn() -> dict[str, Any]:
            out = {}
            patch = {"eager_numerics.division_rounding": True}
            with fused_kernel_config(fw.torch, patch):
                for storage in ("float32", "bfloat16"):
                    inputs = Inputs.make(storage, correctness_shapes(smoke), steps, seed=3)
                    out[storage] = compare_implementations(
                        fw,
                        inputs,
                        {
                            "torch-fused": lambda i=inputs: TorchImpl(
                                fw.torch, "fused", i, fw.torch_device
                            )
                        },
                        steps,
                        [],
                    )
            return {"inductor_patch": patch, "runs": out}

        part.unit("torch-fused with division_rounding", div_rn)
    met = all(row["met"] is not False for res in results.values() for row in res["pairs"].values())
    errors = any(res["errors"] for res in results.values())
    part.record["summary"] = {
        "all_met": (met and not errors) if results else None,
        "bound": (
            "exact pairs: 0 ulp (bit patterns, -0 one ulp from +0) and the same win rate; FMA "
            f"pairs: m and h within {FMA_BOUND_ULPS['m']:g} ulps of their largest operand, theta "
            f"within {FMA_BOUND_ULPS['theta']:g} (in float32 given the momentum the "
            "implementation computed); see FMA_BOUND_ULPS for why"
        ),
    }
    for storage, res in results.items():
        for name, err in res["errors"].items():
            part.run.verdict(f"correctness {storage}: {name} runs", None, 0, err, met=False)
        for pair, row in res["pairs"].items():
            if " vs numpy" not in pair:
                continue
            wins = f"{row['win_mismatches']} win-rate mismatches"
            if row["expected"] == "exact":
                part.run.verdict(
                    f"correctness {storage}: {pair} max ulp",
                    row["max_ulp"],
                    0,
                    wins,
                    met=row["met"],
                )
                continue
            for key in ("theta", "m"):
                other = "h" if key == "m" else None
                value = row[f"{key}_ulps_of_operands"]
                if other:
                    value = max(value, row[f"{other}_ulps_of_operands"])
                part.run.verdict(
                    f"correctness {storage}: {pair} {key}{'/h' if other else ''} ulps of "
                    "largest operand",
                    value,
                    FMA_BOUND_ULPS[key],
                    f"max ulp {row['max_ulp']}, {wins}",
                )


# ----------------------------------------------------------------------------- part 2: step time

#: The step-time optimizers' hyperparameters (the step-time benchmarks' values).
STEP_HP = {"lr": 1e-4, "betas": (0.965, 0.99), "rho": 0.04, "weight_decay": 0.1, "bs": 5120.0}


def gpt2_small_shapes() -> dict[str, tuple[int, ...]]:
    """The step-time benchmarks' GPT-2-small table: 148 tensors, 124,439,808 parameters."""
    try:
        from step_time_torch import gpt2_small_shapes as table
    except ImportError:  # no torch: the JAX benchmark's copy of the table
        from step_time import gpt2_shapes as table
    return table()


def tinyllama_1b_shapes() -> dict[str, tuple[int, ...]]:
    """TinyLlama-1.1B (Llama 2 layout, grouped-query attention, untied head): 201 tensors.

    Width 2048, 22 layers, MLP width 5632, 4 key/value heads of 64, a 32,000
    vocabulary: 1,100,048,384 parameters, in ``[out, in]`` layout.
    """
    d, ffn, kv, vocab = 2048, 5632, 256, 32000
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens": (vocab, d)}
    for i in range(22):
        pre = f"layers.{i}."
        for name, shape in (
            ("self_attn.q_proj", (d, d)),
            ("self_attn.k_proj", (kv, d)),
            ("self_attn.v_proj", (kv, d)),
            ("self_attn.o_proj", (d, d)),
            ("mlp.gate_proj", (ffn, d)),
            ("mlp.up_proj", (ffn, d)),
            ("mlp.down_proj", (d, ffn)),
            ("input_layernorm", (d,)),
            ("post_attention_layernorm", (d,)),
        ):
            shapes[pre + name] = shape
    shapes["norm"] = (d,)
    shapes["lm_head"] = (vocab, d)
    return shapes


def shrink(
    shapes: dict[str, tuple[int, ...]], factor: int, layers: int = 1
) -> dict[str, tuple[int, ...]]:
    """The first ``layers`` blocks and the rest, every dimension divided by ``factor`` (rounded up).

    The same kinds of tensors at a fraction of the elements and of the count
    (a jitted step compiles in time proportional to its number of tensors).
    """

    def block(name: str) -> int:
        found = re.match(r"(?:h|layers)\.(\d+)\.", name)
        return int(found.group(1)) if found else -1

    return {k: tuple(-(-d // factor) for d in s) for k, s in shapes.items() if block(k) < layers}


def shape_lists(smoke: bool) -> dict[str, dict[str, tuple[int, ...]]]:
    """The two shape lists (in smoke mode one block of each, dimensions / 16 and / 32)."""
    gpt2, llama = gpt2_small_shapes(), tinyllama_1b_shapes()
    if smoke:
        gpt2, llama = shrink(gpt2, 16), shrink(llama, 32)
    return {"gpt2-small": gpt2, "tinyllama-1.1b": llama}


def summarize_times(
    times: dict[str, list[float]], n: int, required: dict[str, int]
) -> dict[str, Any]:
    """Medians, the copy's bandwidth, and each optimizer against its bandwidth floor.

    ``required`` maps an optimizer to the bytes per parameter it must move in
    a step; its floor is those bytes at the bandwidth of the copy (``copy``,
    2 x 4 bytes per element) measured in the same rounds.
    """
    copy_ms = statistics.median(times["copy"])
    bandwidth = COPY_BYTES * n / (copy_ms / 1e3)
    variants = {}
    for name, xs in times.items():
        med = statistics.median(xs)
        d: dict[str, Any] = {"median_ms": med, "min_ms": min(xs), "samples_ms": xs}
        if name in required:
            floor_ms = required[name] * n / bandwidth * 1e3
            d.update(
                bytes_per_step=required[name] * n,
                floor_ms=floor_ms,
                over_floor=med / floor_ms,
                achieved_bytes_per_s=required[name] * n / (med / 1e3),
                fraction_of_copy_bandwidth=floor_ms / med,
            )
        variants[name] = d
    return {
        "n_params": n,
        "copy": {
            "bytes_per_call": COPY_BYTES * n,
            "bandwidth_bytes_per_s": bandwidth,
            "best_bandwidth_bytes_per_s": COPY_BYTES * n / (min(times["copy"]) / 1e3),
        },
        "variants": variants,
    }


def ratio(times: dict[str, list[float]], a: str, b: str) -> dict[str, float]:
    """``a / b``: of the medians, and the median of the per-round ratios."""
    return {
        "of_medians": statistics.median(times[a]) / statistics.median(times[b]),
        "paired_median": statistics.median(x / y for x, y in zip(times[a], times[b])),
    }


def ratios(times: dict[str, list[float]], *pairs: tuple[str, str]) -> dict[str, Any]:
    """:func:`ratio` of each pair whose two variants were timed."""
    return {f"{a} / {b}": ratio(times, a, b) for a, b in pairs if a in times and b in times}


def first_calls(fns: dict[str, Callable[[], Any]]) -> dict[str, str]:
    """Calls each variant once; drops (and returns the errors of) those that fail.

    One optimizer that does not run on this machine (an inductor option its
    torch lacks, say) must not cost the others their figures.
    """
    errors = {}
    for k in list(fns):
        try:
            fns[k]()
        except Exception as e:  # noqa: BLE001
            errors[k] = f"{type(e).__name__}: {e}"
            del fns[k]
    if "copy" not in fns:
        raise RuntimeError(f"the copy, the floor of every figure, failed: {errors['copy']}")
    return errors


def time_torch(
    torch: Any, device: Any, fns: dict[str, Callable[[], Any]], warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Milliseconds per call: ``repeats`` rounds in rotating order, each call from an idle device.

    On CUDA each call is bracketed by CUDA events after a synchronisation, so
    the time is the device's, launch gaps included; on the CPU, wall time.
    """
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for fn in fns.values():
        for _ in range(warmup):
            fn()
        sync()
    names = list(fns)
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            if cuda:
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                fns[k]()
                end.record()
                end.synchronize()
                out[k].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fns[k]()
                out[k].append((time.perf_counter() - t0) * 1e3)
    return out


def count_launches(torch: Any, device: Any, fn: Callable[[], Any]) -> dict[str, Any]:
    """What one call of ``fn`` launches, from ``torch.profiler``.

    On CUDA: the kernels (memory copies and sets counted apart). On the CPU
    there are no launches; the operators ``fn`` calls directly are counted
    instead, so the figure is still there.
    """
    from torch.profiler import DeviceType, ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    if cuda:
        on_device = [e for e in events if e.device_type == DeviceType.CUDA]
        kernels = [e for e in on_device if not e.name.startswith(("Memcpy", "Memset"))]
        return {
            "kind": "CUDA kernels per step",
            "count": len(kernels),
            "memcpy_memset": len(on_device) - len(kernels),
            "distinct_kernels": len({e.name for e in kernels}),
        }
    calls = [e for e in events if e.cpu_parent is not None and e.cpu_parent.cpu_parent is None]
    return {"kind": "operators called by one step (CPU: no kernel launches)", "count": len(calls)}


def torch_step_time(
    fw: Frameworks, shapes: dict[str, tuple[int, ...]], warmup: int, repeats: int
) -> dict[str, Any]:
    """SophiaG fused/foreach against AdamW fused/foreach and a copy, on one shape list."""
    torch = fw.need_torch()
    from sophia.torch import SophiaG

    device = fw.torch_device
    n = sum(math.prod(s) for s in shapes.values())
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(shape: tuple[int, ...], scale: float, normal: bool = True) -> Any:
        x = torch.empty(shape, device=device)
        (x.normal_ if normal else x.uniform_)(generator=gen)
        return x.mul_(scale)

    with torch.no_grad():
        params = [torch.nn.Parameter(rand(s, 0.02)) for s in shapes.values()]
        for p in params:
            p.grad = rand(p.shape, 1e-2)
        copy = {"src": rand((n,), 1.0), "dst": torch.empty(n, device=device)}
    hp = STEP_HP
    sophia = {
        "lr": hp["lr"],
        "betas": hp["betas"],
        "rho": hp["rho"],
        "weight_decay": hp["weight_decay"],
        "bs": hp["bs"],
    }
    adamw = {"lr": hp["lr"], "weight_decay": hp["weight_decay"]}
    opts = {
        "sophia_fused": SophiaG(params, **sophia, fused=True),
        "sophia_foreach": SophiaG(params, **sophia, foreach=True, fused=False),
        "adamw_fused": torch.optim.AdamW(params, **adamw, fused=True),
        "adamw_foreach": torch.optim.AdamW(params, **adamw, foreach=True),
    }
    for name in ("sophia_fused", "sophia_foreach"):
        # half the coordinates clipped, as in training
        opts[name].update_hessian(hessian=[rand(p.shape, 1e-4, normal=False) for p in params])
    fns: dict[str, Callable[[], Any]] = {k: o.step for k, o in opts.items()}
    fns["copy"] = lambda: copy["dst"].copy_(copy["src"])
    t0 = time.perf_counter()
    errors = first_calls(fns)  # the fused kernels compile here
    times = time_torch(torch, device, fns, warmup, repeats)
    res = summarize_times(
        times, n, {k: SOPHIA_BYTES if k.startswith("sophia") else ADAMW_BYTES for k in fns}
    )
    res["errors"] = errors
    res["timing_s"] = round(time.perf_counter() - t0, 2)
    res["n_tensors"] = len(shapes)
    res["ratios"] = ratios(
        times,
        ("sophia_fused", "adamw_fused"),
        ("sophia_foreach", "adamw_foreach"),
        ("sophia_fused", "sophia_foreach"),
    )
    res["launches"] = {}
    for k in fns.keys() & opts.keys():
        try:
            res["launches"][k] = count_launches(torch, device, opts[k].step)
        except Exception as e:  # noqa: BLE001 (a profiler that fails must not lose the timings)
            res["launches"][k] = {"error": f"{type(e).__name__}: {e}"}
    launches = {k: v.get("count") for k, v in res["launches"].items()}
    over = res["ratios"].get("sophia_fused / adamw_fused", {}).get("of_medians")
    if launches.get("sophia_fused") is not None and over is not None:
        fused = launches["sophia_fused"]
        res["fused_launch_summary"] = (
            f"SophiaG(fused=True): {fused} {res['launches']['sophia_fused']['kind']} for "
            f"{len(shapes)} tensors ({fused / len(shapes):.2f} per tensor); AdamW(fused=True): "
            f"{launches.get('adamw_fused')}; SophiaG fused takes {over:.3f}x AdamW fused's "
            "median time"
        )
    res["settings"] = {
        "warmup": warmup,
        "repeats": repeats,
        "timer": "CUDA events" if device.type == "cuda" else "wall clock",
        "hyperparameters": STEP_HP,
    }
    del opts, fns, params
    copy.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def jax_step_time(
    fw: Frameworks, shapes: dict[str, tuple[int, ...]], warmup: int, repeats: int
) -> dict[str, Any]:
    """Jitted ``sophia_g`` (and ``step_diagnostics=False``) against ``optax.adamw`` and a copy."""
    jax = fw.need_jax()
    import jax.numpy as jnp
    import optax
    from harness.jax_step import Case, optimizer_step
    from harness.timing import interleave

    import sophia.jax as sj

    n = sum(math.prod(s) for s in shapes.values())
    hp = STEP_HP

    def trees(key: Any) -> list[dict[str, Any]]:
        # one compiled call and one sampling op (per-leaf sampling compiles one per shape)
        flat = jax.random.normal(key, (3, n), jnp.float32)
        out = []
        for row, scale in zip(flat, (0.02, 1e-3, 1e-6)):
            tree, i = {}, 0
            for name, s in shapes.items():
                tree[name] = (row[i : i + math.prod(s)] * scale).reshape(s)
                i += math.prod(s)
            out.append(tree)
        out[2] = jax.tree.map(jnp.abs, out[2])  # a Hessian estimate: non-negative
        return out

    params, grads, h_hat = jax.jit(trees)(jax.random.PRNGKey(0))
    pool: dict[str, Any] = {"params": params, "grads": grads}
    del params, grads

    def sophia(**kw: Any) -> Any:
        return sj.sophia_g(
            hp["lr"],
            *hp["betas"],
            hp["rho"],
            hp["weight_decay"],
            bs=hp["bs"],
            hessian_update_interval=None,
            **kw,
        )

    tx, tx_fast = sophia(), sophia(step_diagnostics=False)
    tx_adamw = optax.adamw(hp["lr"], b1=hp["betas"][0], weight_decay=hp["weight_decay"])

    def states(p: Any, h: Any) -> tuple[Any, ...]:
        # one compiled call again: eager init would compile every op for every shape
        fresh = (sj.update_hessian(tx.init(p), h), sj.update_hessian(tx_fast.init(p), h))
        return (*fresh, tx_adamw.init(p))

    init = jax.jit(states)(pool["params"], h_hat)
    pool["sophia_state"], pool["fast_state"], pool["adamw_state"] = init
    del h_hat, init
    pool["a"] = jnp.zeros((n,), jnp.float32)
    pool["b"] = jax.random.normal(jax.random.PRNGKey(4), (n,), jnp.float32)
    scale = jnp.float32(0.999)
    state = {"sophia_g": "sophia_state", "sophia_g_fast": "fast_state", "adamw": "adamw_state"}
    steps = {"sophia_g": tx, "sophia_g_fast": tx_fast, "adamw": tx_adamw}
    cases, errors = [], {}
    for name in [*steps, "copy"]:
        try:
            if name == "copy":
                case = Case(name, lambda a, b: b * scale, pool, ["a", "b"], ["a"])
            else:
                args = ["params", state[name], "grads"]
                case = Case(name, optimizer_step(steps[name]), pool, args, args[:2])
            case()  # one call before the clock, as for torch
            cases.append(case)
        except Exception as e:  # noqa: BLE001 (one variant that fails must not hide the others)
            errors[name] = f"{type(e).__name__}: {e}"
    if "copy" in errors:
        raise RuntimeError(f"the copy, the floor of every figure, failed: {errors['copy']}")
    t0 = time.perf_counter()
    times = interleave({c.name: c for c in cases}, repeats, warmup=warmup).wall_ms
    required = {"sophia_g": SOPHIA_BYTES, "sophia_g_fast": SOPHIA_BYTES, "adamw": ADAMW_BYTES}
    res = summarize_times(times, n, {k: v for k, v in required.items() if k in times})
    res["errors"] = errors
    res["timing_s"] = round(time.perf_counter() - t0, 2)
    res["n_tensors"] = len(shapes)
    res["ratios"] = ratios(times, ("sophia_g", "adamw"), ("sophia_g_fast", "adamw"))
    for c in cases:
        res["variants"][c.name].update(compile_s=c.compile_s, entry_fusions=c.fusions)
    res["settings"] = {
        "warmup": warmup,
        "repeats": repeats,
        "timer": "wall clock to block_until_ready",
        "hyperparameters": STEP_HP,
        "device": str(jax.devices()[0]),
    }
    del cases, pool
    gc.collect()
    return res


def step_time(part: Part, fw: Frameworks, smoke: bool) -> None:
    """Part 2 (see the module docstring)."""
    lists = shape_lists(smoke)
    warmup, repeats = (1, 3) if smoke else (3, 15)
    done: dict[str, dict[str, Any]] = {}
    for label, shapes in lists.items():
        reps = repeats if smoke or label == "gpt2-small" else max(repeats * 2 // 3, 3)
        for framework, fn in (("torch", torch_step_time), ("jax", jax_step_time)):
            res = part.unit(
                f"{framework} {label}",
                lambda fn=fn, shapes=shapes, reps=reps: fn(fw, shapes, warmup, reps),
            )
            if res is not None:
                done[f"{framework} {label}"] = res
    for key, res in done.items():
        framework, label = key.split(" ", 1)
        sophia, adamw = (
            ("sophia_fused", "adamw_fused") if framework == "torch" else ("sophia_g", "adamw")
        )
        names = {
            "torch": ("torch SophiaG fused", "AdamW fused", "torch_fused"),
            "jax": ("JAX sophia_g", "optax.adamw", "jax_sophia"),
        }[framework]
        why = "; ".join(f"{k}: {e}" for k, e in res["errors"].items())
        over = res["ratios"].get(f"{sophia} / {adamw}", {}).get("of_medians")
        floor = res["variants"].get(sophia, {}).get("over_floor")
        for what, value, target in (
            (f"{names[0]} / {names[1]}", over, TARGETS[f"{names[2]}_over_adamw"]),
            (f"{names[0]} / bandwidth floor", floor, TARGETS[f"{names[2]}_over_floor"]),
        ):
            part.run.verdict(
                f"step time {label}: {what}",
                value,
                target,
                res.get("fused_launch_summary", "") if value is not None else why,
                met=False if value is None else None,
            )
    if done:
        plot_step_time(done, part.run.out / "step_time.png", part.record)


def plot_step_time(done: dict[str, dict[str, Any]], path: Path, record: dict[str, Any]) -> None:
    """Median step time of every optimizer against its bandwidth floor, one panel per unit."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        record["plot"] = None
        return
    fig, axes = plt.subplots(1, len(done), figsize=(4.2 * len(done), 3.8), squeeze=False)
    for ax, (key, res) in zip(axes[0], done.items()):
        names = [k for k in res["variants"] if k != "copy"]
        ms = [res["variants"][k]["median_ms"] for k in names]
        floors = [res["variants"][k]["floor_ms"] for k in names]
        x = np.arange(len(names))
        ax.bar(x, ms, color="tab:blue", label="median step")
        ax.scatter(x, floors, color="black", marker="_", s=400, zorder=3, label="bandwidth floor")
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("ms")
        ax.set_title(f"{key} ({res['n_params'] / 1e6:.0f}M)", fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    record["plot"] = path.name


# ----------------------------------------------------------------------------- part 3: training

#: Presets tried, largest first; a preset fits when at least this many steps fit its time.
TRAIN_PRESETS = ("gpt2-small", "default", "tiny")
MIN_TRAIN_STEPS = 200


def scaled_config(preset: str, steps: int, smoke: bool) -> Any:
    """The preset shortened to ``steps`` (warm-up scaled alike), with five evaluations."""
    from sophia.demo.config import PRESETS

    cfg = PRESETS[preset]
    if smoke:  # one block: the JAX trainers compile in seconds
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layer=1))
    return dataclasses.replace(
        cfg,
        steps=steps,
        warmup=max(1, round(cfg.warmup * steps / cfg.steps)),
        eval_interval=max(1, steps // 5),
        eval_batches=2 if smoke else min(cfg.eval_batches, 4),
    )


def make_trainers(fw: Frameworks, framework: str, cfg: Any) -> dict[str, Any]:
    """SophiaG's and AdamW's trainers of the demo; torch under bfloat16 autocast on CUDA."""
    from sophia.demo.backends import load_backend

    backend = load_backend(framework)
    if framework == "jax":
        return {o.name: backend.make_trainer(cfg, o) for o in cfg.optimizers}
    torch = fw.torch
    trainers = {o.name: backend.TorchTrainer(cfg, o, fw.torch_device) for o in cfg.optimizers}
    if fw.torch_device.type == "cuda":
        for tr in trainers.values():
            tr.model.forward = torch.autocast("cuda", dtype=torch.bfloat16)(tr.model.forward)
    return trainers


def precision(fw: Frameworks, framework: str) -> str:
    """How the demo model computes in ``framework`` here."""
    if framework == "torch":
        if fw.torch_device.type == "cuda":
            return "float32 parameters and optimizer state; forward under torch.autocast(bfloat16)"
        return "float32 (no autocast on the CPU)"
    return (
        "float32 parameters and activations (JAX has no autocast); dots at XLA's default "
        f"precision for float32 on {fw.jax.default_backend()}"
    )


def calibrate(fw: Frameworks, framework: str, preset: str) -> float:
    """Seconds one SophiaG step plus one AdamW step take at ``preset`` (after warm-up)."""
    from sophia.demo.config import PRESETS

    cfg = PRESETS[preset]
    trainers = make_trainers(fw, framework, cfg)
    rng = np.random.default_rng(0)
    window = rng.integers(0, cfg.model.vocab_size, (cfg.batch_size, cfg.model.block_size + 1))
    x, y = window[:, :-1].astype(np.int32), window[:, 1:].astype(np.int32)
    times: dict[str, list[float]] = {k: [] for k in trainers}
    for i in range(5):
        for name, tr in trainers.items():
            t0 = time.perf_counter()
            tr.step(x, y)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    del trainers
    _free(fw, framework)
    return sum(statistics.median(v) for v in times.values())


def _free(fw: Frameworks, framework: str) -> None:
    gc.collect()
    if framework == "torch" and fw.torch_device.type == "cuda":
        fw.torch.cuda.empty_cache()


def plan_training(
    fw: Frameworks, frameworks: list[str], deadline: float, smoke: bool
) -> dict[str, Any]:
    """The preset and step count: the largest preset whose run fits each framework's slice.

    Timed on the first framework (torch when it is there: no compilation);
    each framework gets an equal slice of what is left, less a fifth for
    compilation, evaluations and refreshes.
    """
    if smoke:
        return {"preset": "tiny", "steps": 12, "why": "--smoke"}
    tried = []
    for preset in TRAIN_PRESETS:
        pair_s = calibrate(fw, frameworks[0], preset)
        slice_s = (deadline - time.perf_counter()) / len(frameworks) * 0.8
        from sophia.demo.config import PRESETS

        steps = min(PRESETS[preset].steps, int(slice_s / pair_s))
        tried.append(
            {"preset": preset, "pair_step_s": pair_s, "slice_s": slice_s, "steps_that_fit": steps}
        )
        if steps >= MIN_TRAIN_STEPS or preset == TRAIN_PRESETS[-1]:
            return {
                "preset": preset,
                "steps": max(steps, 2),
                "calibrated_on": frameworks[0],
                "tried": tried,
            }
    raise AssertionError("unreachable")


def train_pair(
    fw: Frameworks, framework: str, cfg: Any, corpus: Any, deadline: float
) -> dict[str, Any]:
    """SophiaG and AdamW stepped alternately on the same batches; stops at ``deadline``."""
    from sophia.demo.data import BatchSampler, eval_batches
    from sophia.demo.train import RunResult

    trainers = make_trainers(fw, framework, cfg)
    opts = {o.name: o for o in cfg.optimizers}
    block = cfg.model.block_size
    sampler = BatchSampler(corpus.train, cfg.batch_size, block, cfg.seed + 1)
    val_set = eval_batches(corpus.val, cfg.eval_batches, cfg.batch_size, block, cfg.seed + 2)
    runs = {
        k: RunResult(
            framework, opts[k], [], [], [], [], [], tr.n_params, cfg.tokens_per_step, 0, 0.0
        )
        for k, tr in trainers.items()
    }
    start = time.perf_counter()

    def evaluate(step: int) -> None:
        for k, tr in trainers.items():
            runs[k].val_steps.append(step)
            runs[k].val_loss.append(float(tr.evaluate(val_set)))
            diag = tr.diagnostics()
            if diag:
                runs[k].diagnostics.append({"step": step, **diag})

    evaluate(0)
    evals, cut = set(cfg.eval_steps()), None
    names = list(trainers)
    for step in range(cfg.steps):
        if time.perf_counter() > deadline:
            cut = step
            break
        x, y = sampler.next()
        for k in names if step % 2 == 0 else names[::-1]:  # neither always runs first
            t0 = time.perf_counter()
            loss = float(trainers[k].step(x, y))
            runs[k].step_ms.append((time.perf_counter() - t0) * 1e3)
            runs[k].train_loss.append(loss)
            runs[k].refresh.append(opts[k].refreshes(step))
            runs[k].diverged |= not math.isfinite(loss)
        if any(r.diverged for r in runs.values()):
            cut = step + 1
            break
        if step + 1 in evals:
            evaluate(step + 1)
    if cut is not None and runs[names[0]].val_steps[-1] != cut:
        evaluate(cut)
    for k, tr in trainers.items():
        runs[k].opt_state_bytes = int(tr.opt_state_bytes())
        runs[k].wall_s = time.perf_counter() - start
    trainers.clear()
    _free(fw, framework)
    return {"runs": runs, "cut_at_step": cut}


def training_figures(runs: dict[str, Any], k: int, tokens_per_step: int) -> dict[str, Any]:
    """Tokens per second, the refresh's share and SophiaG's average step over AdamW's.

    The ratio sums whole cycles of ``k`` steps after the first (whose steps
    compile); with fewer than two cycles it is composed from the median plain
    and refresh steps.
    """
    s, a = runs["sophiag"], runs["adamw"]
    n = len(s.step_ms)
    lo, hi = k, k * (n // k)
    out: dict[str, Any] = {}
    for name, r in runs.items():
        t = r.timings()
        out[name] = {
            "tokens_per_s": tokens_per_step / (t["ms_per_step_median"] / 1e3),
            "final_val": r.final_val if math.isfinite(r.final_val) else None,
            **t,
        }
    ts = out["sophiag"]
    if hi - lo >= k:
        over = sum(s.step_ms[lo:hi]) / sum(a.step_ms[lo:hi])
        how = f"sum of steps {lo}..{hi - 1} ({(hi - lo) // k} whole cycles of {k}) over AdamW's"
    elif "refresh_ms_median" in ts:
        over = (
            ((k - 1) * ts["plain_ms_median"] + ts["refresh_ms_median"])
            / k
            / out["adamw"]["ms_per_step_median"]
        )
        how = "composed from median plain and refresh steps (fewer than two cycles)"
    else:
        over, how = None, "no refresh step timed"
    if "refresh_ms_median" in ts:
        extra = ts["refresh_ms_median"] - ts["plain_ms_median"]
        mean_step = ((k - 1) * ts["plain_ms_median"] + ts["refresh_ms_median"]) / k
        out["refresh"] = {
            "extra_ms": extra,
            "refresh_over_plain": ts["refresh_ms_median"] / ts["plain_ms_median"],
            "share_of_average_step": extra / k / mean_step,
        }
    out["k10_step_over_adamw"] = {"value": over, "how": how, "k": k}
    return out


def training(part: Part, fw: Frameworks, smoke: bool) -> None:
    """Part 3 (see the module docstring)."""
    from sophia.demo.data import load_corpus

    frameworks = [f for f, m in (("torch", fw.torch), ("jax", fw.jax)) if m is not None]
    plan = part.unit("plan", lambda: _plan_unit(fw, frameworks, part.deadline, smoke))
    if plan is None:
        return
    cfg = scaled_config(plan["preset"], plan["steps"], smoke)
    corpus = load_corpus(cfg.text, 1_000_000 if smoke else cfg.max_bytes)
    part.record["config"] = cfg.to_dict()
    all_runs: list[Any] = []
    for i, framework in enumerate(frameworks):
        left = part.deadline - time.perf_counter()
        deadline = time.perf_counter() + left / (len(frameworks) - i)

        def one(framework: str = framework, deadline: float = deadline) -> dict[str, Any]:
            got = train_pair(fw, framework, cfg, corpus, deadline)
            runs = got["runs"]
            all_runs.extend(runs.values())
            figs = training_figures(runs, cfg.sophia.k, cfg.tokens_per_step)
            return {
                "precision": precision(fw, framework),
                "steps_run": len(runs["sophiag"].step_ms),
                "cut_at_step": got["cut_at_step"],
                "tokens_per_optimizer": len(runs["sophiag"].step_ms) * cfg.tokens_per_step,
                "figures": figs,
                "runs": {k: r.to_dict() for k, r in runs.items()},
            }

        res = part.unit(framework, one)
        if res is not None:
            over = res["figures"]["k10_step_over_adamw"]
            part.run.verdict(
                f"training {plan['preset']} ({framework}): SophiaG k={cfg.sophia.k} / AdamW step",
                over["value"],
                TARGETS["k10_step_over_adamw"],
                over["how"],
            )
        if all_runs and _has_matplotlib():
            from sophia.demo.plot import plot_losses

            title = f"{plan['preset']}: SophiaG vs AdamW on the same batches"
            plot_losses(all_runs, part.run.out / "training_loss.png", title)
            part.record["plot"] = "training_loss.png"
            part.run.save()


def _plan_unit(
    fw: Frameworks, frameworks: list[str], deadline: float, smoke: bool
) -> dict[str, Any]:
    if not frameworks:
        raise Skip("; ".join(n for n in (fw.torch_note, fw.jax_note) if n))
    return plan_training(fw, frameworks, deadline, smoke)


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


# ----------------------------------------------------------------------------- main


def print_summary(run: Run) -> None:
    """The parts' states and the verdicts."""
    run.log("\nparts:")
    for name, rec in run.data["parts"].items():
        run.log(f"  {name:<12} {rec['status']:<8} {rec.get('note', '')}")
        for key, u in rec.get("units", {}).items():
            if u["status"] != "done":
                run.log(f"    {key}: {u['status']}: {u.get('note') or u.get('error')}")
    run.log("\nverdicts (value, target <=):")
    for v in run.data["verdicts"]:
        state = {True: "met", False: "MISSED", None: "n/a"}[v["met"]]
        value = "n/a" if v["value"] is None else f"{v['value']:.4g}"
        run.log(f"  {state:<7} {v['what']}: {value} (<= {v['target']:g}) {v['note']}".rstrip())
    run.log(f"\nresults in {run.out}")


def main(argv: list[str] | None = None) -> int:
    """Runs the parts; returns 1 when a unit or part failed with an error, else 0."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default: benchmarks/results/gpu_check-<timestamp>/)",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="seconds for the whole run (default %(default)s)",
    )
    ap.add_argument("--smoke", action="store_true", help="every part at tiny sizes on the CPU")
    ap.add_argument(
        "--allow-cpu",
        action="store_true",
        help="run a framework that has no accelerator on the CPU",
    )
    ap.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}"
    )
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    for p in parts:
        if p not in PARTS:
            ap.error(f"--parts: unknown part {p!r} (allowed: {', '.join(PARTS)})")
    if not args.budget_s >= 0:
        ap.error(f"--budget-s: {args.budget_s} (allowed: a number of seconds >= 0)")
    if args.smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"  # before jax is imported
    # JAX would take 75% of the GPU up front and leave torch too little
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or HERE / "results" / f"gpu_check-{stamp}"
    run = Run(out, args.budget_s, sys.argv[1:] if argv is None else argv)
    run.data["smoke"] = args.smoke
    fw, env = probe(args.smoke, args.allow_cpu)
    run.data["environment"] = env
    run.log(
        f"python {env['python']} ({env['executable']}); torch {env.get('torch', '-')} on "
        f"{env['torch_runs_on']}; jax {env.get('jax', '-')} on {env['jax_runs_on']}; "
        f"budget {args.budget_s:g} s; results in {out}"
    )
    for m in env["missing"]:
        run.log(f"MISSING: {m}")
    if not args.smoke and not fw.accelerator:
        run.log("WARNING: no framework runs on an accelerator here; nothing but skips will follow")
    run.save()
    bodies: dict[str, Callable[[Part], None]] = {
        "correctness": lambda p: correctness(p, fw, args.smoke),
        "step_time": lambda p: step_time(p, fw, args.smoke),
        "training": lambda p: training(p, fw, args.smoke),
    }
    first = True
    for name in PARTS:
        if name not in parts:
            run.data["parts"][name] = {"status": "skipped", "note": "not in --parts"}
            continue
        run_part(run, name, bodies[name], first=first)
        first = False
    run.data["finished"] = True
    run.save()
    print_summary(run)
    run.close()
    failed = any(
        rec["status"] == "error"
        or any(u["status"] == "error" for u in rec.get("units", {}).values())
        for rec in run.data["parts"].values()
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

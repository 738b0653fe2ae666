"""PyTorch optimizer step time on GPT-2-small shapes, against AdamW and a bandwidth floor.

Run as ``./dev bench step_time_torch`` or ``.venv/bin/python benchmarks/step_time_torch.py``
(``--small`` divides the model width, vocabulary and context by 4, so the
parameter count by about 16, keeping the 148 tensors).

One run times, interleaved round-robin (the order rotates every round, so
background load hits every variant alike), one ``step()`` per sample:

* ``sophia_forloop`` / ``sophia_foreach`` / ``sophia_fused``:
  :class:`sophia.torch.SophiaG` with ``foreach=False`` / ``foreach=True`` /
  ``fused=True``; plain steps, no Hessian refresh. The three optimizers share
  one state (the same ``exp_avg`` and ``hessian`` tensors), so they stream the
  same memory. The fused path compiles on its first (warm-up) step.
* ``adamw_forloop`` / ``adamw_foreach`` / ``adamw_fused``:
  :class:`torch.optim.AdamW` with ``foreach=False`` / ``foreach=True`` /
  ``fused=True``, sharing one state likewise.
* ``reference_forloop``: the paper's single-tensor SophiaG step re-typed from
  the algorithm the way the authors' code does it (a Python loop per tensor,
  ``exp_avg.mul_(b1).add_(grad, alpha=1-b1)``, ``param.mul_(1 - lr*wd)``, a
  clipped ratio and ``param.addcmul_(sign, ratio, value=-lr)``), on the same
  ``exp_avg``/``hessian`` tensors as the SophiaG variants.
* bandwidth kernels over three flat float32 buffers of N elements each (N =
  the parameter count): ``copy`` (``a.copy_(b)``, 2 x 4N bytes), ``scale``
  (``a.mul_(s)``, 2 x 4N), ``add`` (``a.add_(b)``, 3 x 4N) and ``triad``
  (``torch.add(b, c, alpha=s, out=a)``, 3 x 4N), all torch eager ops on the
  same intra-op threads as the optimizers. Logical bytes (no write-allocate
  traffic counted); the best bandwidth over kernels and repeats gives the
  floor: ``6 * 4 * N`` bytes (SophiaG reads theta, g, m, h and writes theta,
  m) divided by it, so the floor is the lowest one can claim.

With ``sophia_fused``, a reference pass ``stream_4r2w_compiled`` is timed too:
a ``torch.compile``-d kernel per tensor (the fused path's calls) that reads
theta, g, m, h and writes theta, m with trivial arithmetic, i.e. what the fused
step would cost if its arithmetic were free. It is information, not a target.

Every figure is the median and the minimum over ``--repeats`` timed samples
after ``--warmup`` untimed ones, in wall-clock time and in process CPU time
(``time.process_time``: on a shared machine, the time this process actually
ran). Ratios against a target are given of the medians, of the minima, as the
median of per-round ratios (both variants ran within seconds of each other, so
load drifts cancel) and of the CPU-time medians; the verdict uses the medians.
``--threads 1`` avoids OpenMP barrier stalls when other processes load the
machine (the floor is then measured with one thread too).

Peak extra memory: each optimizer variant runs in a fresh subprocess holding
only its own parameters, gradients and state; after the warm-up steps the
kernel's peak-RSS mark is reset (``echo 5 > /proc/self/clear_refs``), one
``step()`` runs, and ``VmHWM - VmRSS`` (read from ``/proc/self/status``) is the
extra resident memory the step needed at its peak. The probe runs with
``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc hands every block of 64 KiB or
more straight to ``mmap``/``munmap`` and torch's temporaries show up in RSS
exactly while they live. Best (lowest) of ``--memory-repeats`` steps; the
target reads "at most one parameter-sized buffer" as at most the bytes of the
largest parameter tensor. Where
``clear_refs`` cannot be written, a thread samples ``VmRSS`` every 0.5 ms
instead (which can miss short peaks; the method is recorded).

Results go to ``benchmarks/results/step_time_torch.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sophia.demo.machine import cpu_name  # noqa: E402
from sophia.torch import SophiaG  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "step_time_torch.json"
LR = 1e-4
BETAS = (0.965, 0.99)
RHO = 0.04
WD = 0.1
BS = 5120
EPS = 1e-15
N_TENSORS = 148
N_PARAMS_FULL = 124_439_808

SOPHIA = ("sophia_forloop", "sophia_foreach", "sophia_fused")
ADAMW = ("adamw_forloop", "adamw_foreach", "adamw_fused")
REFERENCE = ("reference_forloop",)
VARIANTS = SOPHIA + ADAMW + REFERENCE
KERNELS = ("copy", "scale", "add", "triad")
KERNEL_ARRAYS = {"copy": 2, "scale": 2, "add": 3, "triad": 3}
SOPHIA_ARRAYS = 6  # read theta, g, m, h; write theta, m


# --------------------------------------------------------------------------- shapes


def gpt2_small_shapes(small: bool = False) -> dict[str, tuple[int, ...]]:
    """GPT-2 small with the LM head tied to ``wte``: 148 tensors, 124,439,808 parameters.

    ``small`` divides width, vocabulary and context by 4 (the parameter count
    by about 16) and keeps the 148 tensors.
    """
    f = 4 if small else 1
    d, vocab, ctx = 768 // f, -(-50257 // f), 1024 // f
    shapes: dict[str, tuple[int, ...]] = {"wte": (vocab, d), "wpe": (ctx, d)}
    for layer in range(12):
        pre = f"h.{layer}."
        shapes[pre + "ln_1.weight"] = (d,)
        shapes[pre + "ln_1.bias"] = (d,)
        shapes[pre + "attn.c_attn.weight"] = (d, 3 * d)
        shapes[pre + "attn.c_attn.bias"] = (3 * d,)
        shapes[pre + "attn.c_proj.weight"] = (d, d)
        shapes[pre + "attn.c_proj.bias"] = (d,)
        shapes[pre + "ln_2.weight"] = (d,)
        shapes[pre + "ln_2.bias"] = (d,)
        shapes[pre + "mlp.c_fc.weight"] = (d, 4 * d)
        shapes[pre + "mlp.c_fc.bias"] = (4 * d,)
        shapes[pre + "mlp.c_proj.weight"] = (4 * d, d)
        shapes[pre + "mlp.c_proj.bias"] = (d,)
    shapes["ln_f.weight"] = (d,)
    shapes["ln_f.bias"] = (d,)
    return shapes


def check_shapes(shapes: dict[str, tuple[int, ...]], small: bool) -> int:
    n = sum(math.prod(s) for s in shapes.values())
    if len(shapes) != N_TENSORS:
        raise AssertionError(f"{len(shapes)} tensors, expected {N_TENSORS}")
    if not small and n != N_PARAMS_FULL:
        raise AssertionError(f"{n} parameters, expected {N_PARAMS_FULL}")
    return n


# --------------------------------------------------------------------------- the paper's step


class PaperReferenceSophiaG(torch.optim.Optimizer):
    """The paper's SophiaG step as its authors' single-tensor code performs it.

    Typed from the algorithm (Liu et al. 2023, Algorithm 3 with the clipped
    ratio of their code): per tensor, decoupled decay ``theta *= 1 - lr*wd``,
    ``m = b1*m + (1-b1)*g`` with ``add_(alpha=)``, ``ratio = min(|m| / (rho*bs*h
    + 1e-15), 1)`` and ``theta += -lr * sign(m) * ratio`` with ``addcmul_``.
    Only the plain step is needed here (no Hessian refresh).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = LR,
        betas: tuple[float, float] = BETAS,
        rho: float = RHO,
        weight_decay: float = WD,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "rho": rho, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, bs: int = BS) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            plist, glist, mlist, hlist, slist = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if len(st) == 0:
                    st["step"] = torch.zeros((1,), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["hessian"] = torch.zeros_like(p)
                plist.append(p)
                glist.append(p.grad)
                mlist.append(st["exp_avg"])
                hlist.append(st["hessian"])
                slist.append(st["step"])
            b1 = group["betas"][0]
            lr, wd, rho = group["lr"], group["weight_decay"], group["rho"]
            for param, grad, exp_avg, hess, step_t in zip(plist, glist, mlist, hlist, slist):
                if torch.is_complex(param):
                    param, grad = torch.view_as_real(param), torch.view_as_real(grad)
                    exp_avg, hess = torch.view_as_real(exp_avg), torch.view_as_real(hess)
                step_t += 1
                param.mul_(1 - lr * wd)
                exp_avg.mul_(b1).add_(grad, alpha=1 - b1)
                ratio = (exp_avg.abs() / (rho * bs * hess + 1e-15)).clamp(None, 1)
                param.addcmul_(exp_avg.sign(), ratio, value=-lr)
        return loss


# --------------------------------------------------------------------------- setup


def make_tensors(
    shapes: dict[str, tuple[int, ...]], seed: int = 0
) -> tuple[list[torch.nn.Parameter], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Parameters (with ``.grad``), and a momentum and Hessian EMA per parameter.

    The Hessian scale puts roughly half the coordinates in each branch of the
    clip, as in training.
    """
    gen = torch.Generator().manual_seed(seed)
    params, ms, hs, grads = [], [], [], []
    for shape in shapes.values():
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        p.grad = torch.randn(shape, generator=gen) * 1e-2
        params.append(p)
        grads.append(p.grad)
        ms.append(torch.randn(shape, generator=gen) * 1e-2)
        hs.append(torch.rand(shape, generator=gen) * 1e-4)
    return params, grads, ms, hs


def make_optimizers(
    variants: Iterable[str],
    params: list[torch.nn.Parameter],
    ms: list[torch.Tensor],
    hs: list[torch.Tensor],
) -> dict[str, Callable[[], Any]]:
    """One ``step`` callable per variant; each family shares one state."""
    variants = list(variants)
    steps: dict[str, Callable[[], Any]] = {}
    sophia_state = None
    adamw_state = None
    for name in variants:
        if name in SOPHIA:
            kind = name.split("_")[1]
            opt = SophiaG(
                params,
                lr=LR,
                betas=BETAS,
                rho=RHO,
                weight_decay=WD,
                bs=BS,
                eps=EPS,
                foreach=kind == "foreach",
                fused=True if kind == "fused" else None,
            )
            if sophia_state is None:
                for p, m, h in zip(params, ms, hs):
                    step0 = torch.zeros((), dtype=torch.float32)
                    opt.state[p] = {"step": step0, "exp_avg": m, "hessian": h}
                sophia_state = opt.state
            opt.state = sophia_state
            steps[name] = opt.step
        elif name in ADAMW:
            kind = name.split("_")[1]
            opt = torch.optim.AdamW(
                params,
                lr=LR,
                weight_decay=WD,
                foreach=kind == "foreach",
                fused=True if kind == "fused" else None,
            )
            if adamw_state is None:
                adamw_state = opt.state
            opt.state = adamw_state
            steps[name] = opt.step
        elif name in REFERENCE:
            opt = PaperReferenceSophiaG(params)
            for p, m, h in zip(params, ms, hs):
                opt.state[p] = {"step": torch.zeros((1,)), "exp_avg": m, "hessian": h}
            steps[name] = opt.step
        else:
            raise ValueError(f"unknown variant {name!r}")
    return steps


def make_kernels(n: int) -> dict[str, Callable[[], Any]]:
    a = torch.full((n,), 1.0)
    b = torch.full((n,), 0.5)
    c = torch.full((n,), 0.25)
    s = 0.999
    return {
        "copy": lambda: a.copy_(b),
        "scale": lambda: a.mul_(s),
        "add": lambda: a.add_(b),
        "triad": lambda: torch.add(b, c, alpha=s, out=a),
    }


def _stream_body(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    h: torch.Tensor,
    one: torch.Tensor,
    zero: torch.Tensor,
) -> None:
    p.copy_(p * one + g * zero)
    m.copy_(m * one + h * zero)


def make_stream_pass(
    params: list[torch.nn.Parameter], ms: list[torch.Tensor], hs: list[torch.Tensor]
) -> Callable[[], Any]:
    """SophiaG's fused traffic with trivial arithmetic, in the fused path's calls.

    Reads theta, g, m, h and writes theta, m (values unchanged: ``x * 1 + y *
    0``, which the compiler cannot fold), one compiled call per tensor of at
    least 32768 elements and one for the smaller ones (packed once here, where
    the fused path packs them on every step): what the fused step would cost
    if its arithmetic were free.
    """
    kernel = torch.compile(_stream_body, dynamic=True, fullgraph=True)
    one, zero = torch.ones(()), torch.zeros(())
    quads = [
        tuple(x.detach().view(-1) for x in (p, p.grad, m, h)) for p, m, h in zip(params, ms, hs)
    ]
    flat = [q for q in quads if q[0].numel() >= 1 << 15]
    small = [q for q in quads if q[0].numel() < 1 << 15]
    if small:
        flat.append(tuple(torch.cat(xs) for xs in zip(*small)))

    def step() -> None:
        for xs in flat:
            kernel(*xs, one, zero)

    return step


# --------------------------------------------------------------------------- timing


def time_round_robin(
    fns: dict[str, Callable[[], Any]], warmup: int, repeats: int, log: Callable[[str], None]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process CPU seconds of each call, ``repeats`` rounds in rotating order."""
    names = list(fns)
    for name in names:
        t0 = time.perf_counter()
        for _ in range(warmup):
            fns[name]()
        log(f"  warm-up {name}: {time.perf_counter() - t0:.2f} s for {warmup} call(s)")
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            c0 = time.process_time()
            t0 = time.perf_counter()
            fns[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        log(f"  round {r + 1}/{repeats} done, load {os.getloadavg()[0]:.2f}")
    return wall, cpu


def summary(wall: list[float], cpu: list[float]) -> dict[str, Any]:
    return {
        "median_ms": statistics.median(wall) * 1e3,
        "min_ms": min(wall) * 1e3,
        "cpu_median_ms": statistics.median(cpu) * 1e3,
        "cpu_min_ms": min(cpu) * 1e3,
        "samples_ms": [x * 1e3 for x in wall],
        "cpu_samples_ms": [x * 1e3 for x in cpu],
    }


# --------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status_kb("VmHWM") <= _status_kb("VmRSS") + 64
    except OSError:
        return False


def memory_probe(variant: str, small: bool, warmup: int, repeats: int) -> dict[str, Any]:
    """Runs in a fresh process: peak RSS above the pre-step RSS during one ``step()``."""
    shapes = gpt2_small_shapes(small)
    n = check_shapes(shapes, small)
    params, _, ms, hs = make_tensors(shapes)
    step = make_optimizers([variant], params, ms, hs)[variant]
    for _ in range(warmup):
        step()
    extras = []
    method = "clear_refs"
    for _ in range(repeats):
        gc.collect()
        if _reset_hwm():
            before = _status_kb("VmRSS")
            step()
            extras.append(_status_kb("VmHWM") - before)
        else:
            method = "VmRSS sampled every 0.5 ms"
            before = _status_kb("VmRSS")
            peak = [before]
            done = threading.Event()

            def sample(peak: list[int] = peak, done: threading.Event = done) -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], _status_kb("VmRSS"))
                    time.sleep(0.0005)

            th = threading.Thread(target=sample)
            th.start()
            step()
            done.set()
            th.join()
            peak[0] = max(peak[0], _status_kb("VmRSS"))
            extras.append(peak[0] - before)
    largest = max(math.prod(s) for s in shapes.values()) * 4
    extra = min(extras) * 1024
    return {
        "method": method,
        "extra_bytes": extra,
        "extra_bytes_all": [x * 1024 for x in extras],
        "param_bytes": n * 4,
        "largest_tensor_bytes": largest,
        "extra_over_param_bytes": extra / (n * 4),
        "extra_over_largest_tensor": extra / largest,
    }


#: glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, which would
#: hide temporaries from RSS; a fixed threshold sends every block of 64 KiB or more to
#: mmap/munmap, so RSS follows what is live.
_PROBE_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


def run_memory_probes(
    variants: Iterable[str],
    small: bool,
    warmup: int,
    repeats: int,
    threads: int | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    out = {}
    for v in variants:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--memory-probe",
            v,
            "--warmup",
            str(warmup),
            "--memory-repeats",
            str(repeats),
        ] + (["--small"] if small else [])
        if threads:
            cmd += ["--threads", str(threads)]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=_PROBE_ENV)
        if res.returncode != 0:
            raise RuntimeError(f"memory probe {v} failed:\n{res.stderr[-4000:]}")
        out[v] = json.loads(res.stdout.strip().splitlines()[-1])
        log(
            f"  memory {v}: +{out[v]['extra_bytes'] / 2**20:.1f} MiB peak during step "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    return out


# --------------------------------------------------------------------------- report


def machine_info() -> dict[str, Any]:
    mem = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                k, v = line.split(":", 1)
                if k in ("MemTotal", "MemAvailable"):
                    mem[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return {
        "cpu_model": cpu_name(),
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mem_total_bytes": mem.get("MemTotal"),
        "mem_available_bytes_start": mem.get("MemAvailable"),
        "loadavg_start": list(os.getloadavg()),
    }


def _compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Timings ``a / b``: of medians, of minima, paired per round, of CPU-time medians."""
    return {
        "ratio_median": a["median_ms"] / b["median_ms"],
        "ratio_min": a["min_ms"] / b["min_ms"],
        "ratio_paired_median": statistics.median(
            x / y for x, y in zip(a["samples_ms"], b["samples_ms"])
        ),
        "ratio_cpu_median": a["cpu_median_ms"] / b["cpu_median_ms"],
    }


def _over_floor(a: dict[str, Any], floor: dict[str, Any]) -> dict[str, float]:
    """Timings ``a`` over the bandwidth floor (wall and CPU time)."""
    return {
        "ratio_median": a["median_ms"] / floor["floor_ms"],
        "ratio_min": a["min_ms"] / floor["floor_ms"],
        "ratio_cpu_median": a["cpu_median_ms"] / floor["cpu_floor_ms"],
    }


def _ratio(
    steps: dict[str, Any], num: str, den: str | None, floor: dict[str, Any], target: float, le: bool
) -> dict[str, Any]:
    """``num / den`` (or ``/ floor``) of medians, of minima, paired per round, of CPU time."""
    if den is None:
        r = {**_over_floor(steps[num], floor), "ratio_paired_median": None}
    else:
        r = _compare(steps[num], steps[den])
    med, mn = r["ratio_median"], r["ratio_min"]
    ok = (lambda r: r <= target) if le else (lambda r: r >= target)
    return {
        "ratio_median": med,
        "ratio_min": mn,
        "ratio_paired_median": r["ratio_paired_median"],
        "ratio_cpu_median": r["ratio_cpu_median"],
        "target": target,
        "target_kind": "<=" if le else ">=",
        "met_median": ok(med),
        "met_min": ok(mn),
    }


def ratios(res: dict[str, Any]) -> dict[str, Any]:
    steps = res["steps"]
    floor = res["floor"]
    out: dict[str, Any] = {}
    if {"sophia_fused", "adamw_fused"} <= steps.keys():
        out["sophia_fused / adamw_fused"] = _ratio(
            steps, "sophia_fused", "adamw_fused", floor, 0.9, True
        )
    if "sophia_fused" in steps:
        out["sophia_fused / floor"] = _ratio(steps, "sophia_fused", None, floor, 1.15, True)
    if {"sophia_foreach", "adamw_foreach"} <= steps.keys():
        out["sophia_foreach / adamw_foreach"] = _ratio(
            steps, "sophia_foreach", "adamw_foreach", floor, 1.0, True
        )
    for v in SOPHIA:
        if v in steps and "reference_forloop" in steps:
            out[f"reference_forloop / {v}"] = _ratio(
                steps, "reference_forloop", v, floor, 4.0, False
            )
    sp = res.get("stream_pass")
    if sp is not None and "sophia_fused" in steps:
        out["sophia_fused / stream_4r2w_compiled"] = _compare(steps["sophia_fused"], sp)
        out["stream_4r2w_compiled / floor"] = _over_floor(sp, floor)
        if "adamw_fused" in steps:
            out["stream_4r2w_compiled / adamw_fused"] = _compare(sp, steps["adamw_fused"])
    out["x floor"] = {v: _over_floor(steps[v], floor) for v in VARIANTS if v in steps}
    mem = res.get("memory", {}).get("sophia_fused")
    if mem is not None:
        out["sophia_fused peak extra memory / largest parameter tensor"] = {
            "ratio": mem["extra_over_largest_tensor"],
            "target": 1.0,
            "target_kind": "<=",
            "met": mem["extra_over_largest_tensor"] <= 1.0,
        }
    return out


def print_table(res: dict[str, Any]) -> None:
    m = res["machine"]
    print(
        f"\nmachine: {m['cpu_model']}, {m['usable_cores']} usable cores, torch {m['torch']} "
        f"({m['cpu_capability']}), {m['torch_threads']} intra-op thread(s), python {m['python']}"
    )
    print(
        f"load average (1 min): start {m['loadavg_start'][0]:.2f}, "
        f"end {res['loadavg_end'][0]:.2f}; {res['config']['n_tensors']} tensors, "
        f"{res['config']['n_params']:,} float32 parameters; {res['config']['repeats']} rounds"
    )
    floor = res["floor"]["floor_ms"]
    head = f"\n{'variant':<19}{'median ms':>11}{'min ms':>9}{'cpu med ms':>12}{'x floor':>9}"
    print(head + f"{'peak extra MiB':>16}")
    for v, s in res["steps"].items():
        mem = res.get("memory", {}).get(v)
        mem_s = f"{mem['extra_bytes'] / 2**20:16.1f}" if mem else f"{'-':>16}"
        print(
            f"{v:<19}{s['median_ms']:11.1f}{s['min_ms']:9.1f}{s['cpu_median_ms']:12.1f}"
            f"{s['median_ms'] / floor:9.2f}{mem_s}"
        )
    sp = res.get("stream_pass")
    if sp is not None:
        print(
            f"{'(4r2w pass)':<19}{sp['median_ms']:11.1f}{sp['min_ms']:9.1f}"
            f"{sp['cpu_median_ms']:12.1f}{sp['median_ms'] / floor:9.2f}"
            "   compiled theta,g,m,h -> theta,m pass, trivial arithmetic"
        )
    bw = res["floor"]
    print(
        f"{'floor':<19}{floor:11.1f}{floor:9.1f}{'':12}{1.0:9.2f}"
        f"   ({SOPHIA_ARRAYS} x 4 B x N at {bw['best_gbps']:.2f} GB/s, best: {bw['best_kernel']})"
    )
    print(
        f"{'floor (CPU time)':<19}{'':20}{bw['cpu_floor_ms']:12.1f}"
        f"{'':9}   (at {bw['cpu_best_gbps']:.2f} GB/s of process CPU time)"
    )
    print("\nstreaming bandwidth (logical bytes, torch eager over 3 flat buffers of N floats):")
    for k, s in bw["kernels"].items():
        print(f"  {k:<8} best {s['best_gbps']:6.2f} GB/s   median {s['median_gbps']:6.2f} GB/s")
    print("\ntargets: ratio of medians [of minima] {paired per round, of CPU-time medians}")
    for k, r in res["ratios"].items():
        if "target" not in r:
            if "/" in k and "ratio_cpu_median" in r:
                paired = r.get("ratio_paired_median")
                extra = f"{{{paired:.3f}, " if paired is not None else "{-, "
                extra += f"{r['ratio_cpu_median']:.3f}}}"
                print(
                    f"  {k:<36} {r['ratio_median']:7.3f} [{r['ratio_min']:.3f}] {extra:<16} (info)"
                )
            continue
        if "ratio" in r:
            verdict = "met" if r["met"] else "MISSED"
            goal = f"target {r['target_kind']} {r['target']}"
            print(f"  {k:<56} {r['ratio']:7.3f}  {goal}: {verdict}")
            continue
        paired = r["ratio_paired_median"]
        extra = f"{{{paired:.3f}, " if paired is not None else "{-, "
        extra += f"{r['ratio_cpu_median']:.3f}}}"
        verdict = "met" if r["met_median"] else "MISSED"
        verdict += f" [{'met' if r['met_min'] else 'MISSED'}]"
        print(
            f"  {k:<36} {r['ratio_median']:7.3f} [{r['ratio_min']:.3f}] {extra:<16} "
            f"target {r['target_kind']} {r['target']}: {verdict}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="sizes / 16 (width, vocab, context / 4)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--memory-repeats", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    ap.add_argument(
        "--no-stream-pass", action="store_true", help="skip the compiled 4-read/2-write reference"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        probe = memory_probe(args.memory_probe, args.small, args.warmup, args.memory_repeats)
        print(json.dumps(probe))
        return 0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    machine = machine_info()
    shapes = gpt2_small_shapes(args.small)
    n = check_shapes(shapes, args.small)
    log(f"{len(shapes)} tensors, {n:,} parameters; load {machine['loadavg_start']}")

    memory = {}
    if not args.no_memory:
        log("memory probes (one fresh process per variant):")
        memory = run_memory_probes(
            variants, args.small, args.warmup, args.memory_repeats, args.threads, log
        )

    torch.set_grad_enabled(False)
    params, _, ms, hs = make_tensors(shapes)
    fns: dict[str, Callable[[], Any]] = dict(make_optimizers(variants, params, ms, hs))
    if not args.no_stream_pass and "sophia_fused" in variants:
        fns["stream_4r2w_compiled"] = make_stream_pass(params, ms, hs)
    kernels = make_kernels(n)
    fns.update({f"bw_{k}": kernels[k] for k in KERNELS})
    log("timing (round-robin):")
    samples, cpu_samples = time_round_robin(fns, args.warmup, args.repeats, log)

    kernel_stats = {}
    for k in KERNELS:
        bytes_ = KERNEL_ARRAYS[k] * 4 * n
        xs = samples[f"bw_{k}"]
        cs = cpu_samples[f"bw_{k}"]
        kernel_stats[k] = {
            "bytes": bytes_,
            "best_gbps": bytes_ / min(xs) / 1e9,
            "median_gbps": bytes_ / statistics.median(xs) / 1e9,
            "cpu_best_gbps": bytes_ / max(min(cs), 1e-9) / 1e9,
            **summary(xs, cs),
        }
    best_kernel = max(kernel_stats, key=lambda k: kernel_stats[k]["best_gbps"])
    best_bw = kernel_stats[best_kernel]["best_gbps"]
    best_cpu_bw = max(s["cpu_best_gbps"] for s in kernel_stats.values())
    sophia_bytes = SOPHIA_ARRAYS * 4 * n
    res: dict[str, Any] = {
        "machine": machine,
        "config": {
            "small": args.small,
            "n_tensors": len(shapes),
            "n_params": n,
            "dtype": "float32",
            "warmup": args.warmup,
            "repeats": args.repeats,
            "lr": LR,
            "betas": BETAS,
            "rho": RHO,
            "weight_decay": WD,
            "bs": BS,
            "eps": EPS,
            "variants": variants,
        },
        "steps": {v: summary(samples[v], cpu_samples[v]) for v in variants},
        "stream_pass": (
            {
                "description": "compiled per-tensor pass reading theta, g, m, h and writing "
                "theta, m with trivial arithmetic (the fused path's traffic and calls)",
                **summary(samples["stream_4r2w_compiled"], cpu_samples["stream_4r2w_compiled"]),
            }
            if "stream_4r2w_compiled" in samples
            else None
        ),
        "floor": {
            "bytes": sophia_bytes,
            "best_kernel": best_kernel,
            "best_gbps": best_bw,
            "floor_ms": sophia_bytes / (best_bw * 1e9) * 1e3,
            "cpu_best_gbps": best_cpu_bw,
            "cpu_floor_ms": sophia_bytes / (best_cpu_bw * 1e9) * 1e3,
            "method": "6 x 4 B x N / best logical bandwidth of torch copy/scale/add/triad "
            "over three flat float32 buffers of N elements, best of the repeats (cpu_: the "
            "same with process CPU time, the floor for CPU-time figures)",
            "kernels": kernel_stats,
        },
        "memory": memory,
        "memory_method": (
            "fresh subprocess per variant with MALLOC_MMAP_THRESHOLD_=65536; after warm-up, reset "
            "the peak RSS via /proc/self/clear_refs and read VmHWM - VmRSS around one step() "
            "(lowest of the memory repeats)"
        ),
        "loadavg_end": list(os.getloadavg()),
    }
    res["ratios"] = ratios(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print_table(res)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

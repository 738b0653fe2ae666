"""Part 1 of ``gpu_check.py``: every implementation against the NumPy reference and each other.

Every step feeds each implementation the reference's state, so each pair is
compared on the same inputs (lockstep); each implementation also runs on its
own and is compared with the reference's trajectory (free run). Distances are
in ulps of bit patterns (-0 one ulp from +0), and, for paths allowed to
contract multiply-adds, in ulps of each result's largest operand.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from harness.ulp import ulps_of_operands

from gpu.environment import Frameworks, xla_without_fma
from gpu.implementations import (
    HP,
    REFRESH_EVERY,
    Inputs,
    JaxImpl,
    TorchImpl,
    correctness_shapes,
    reference_refresh,
    reference_step,
    ulp,
)
from gpu.narrow import FMA_BOUNDS, FORMS, check_narrow
from gpu.record import Part, Skip
from sophia import spec

#: The fused-multiply-add bound, in ulps of each result's largest operand. m and h come out
#: of one contractible operation each (b1*m + (1-b1)*g, b2*h + (1-b2)*h_hat), and one
#: contraction moves a result by at most 2 such ulps (docs/spec.md). Three feed theta:
#: den = rho*bs*h + eps, u = clamp(m/den) + wd*theta and theta - lr*u; the first two reach
#: theta scaled by lr (< 1), each by about one ulp of theta's operands, the last by 2.
FMA_BOUND_ULPS = {"m": 2.0, "h": 2.0, "theta": 4.0}


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
    flags = xla_without_fma(backend)
    if flags is not None:
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
                    h_ulp=ulp(got, h_new, storage),
                    h_ulps_of_operands=ulps_of_operands(got, h_new, storage, h, h_hat),
                )
            for (a, b), st in pairs.items():
                if a in outs and b in outs:
                    st.merge(h_ulp=ulp(outs[a], outs[b], storage))
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
                theta_ulp=ulp(th, theta_new, storage),
                m_ulp=ulp(mm, m_new, storage),
                win_mismatches=int(rate != want_rate),
                m_ulps_of_operands=ulps_of_operands(mm, m_new, storage, m, g),
                theta_ulps_of_operands=_theta_bound(th, theta, mm, h, theta_new, storage),
            )
        for (a, b), st in pairs.items():
            if a in outs and b in outs:
                st.merge(
                    theta_ulp=ulp(outs[a][0], outs[b][0], storage),
                    m_ulp=ulp(outs[a][1], outs[b][1], storage),
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
                    worst[key] = max(worst[key], ulp(a, b, storage))
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
    narrow_results = {}
    for forms in FORMS:
        key = f"narrow m={forms[0]} h={forms[1]}"
        res = part.unit(key, lambda forms=forms: check_narrow(fw, forms, 6 if smoke else 20, smoke))
        if res is not None:
            narrow_results[key] = res
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
    every = [*results.values(), *narrow_results.values()]
    met = all(row["met"] is not False for res in every for row in res["pairs"].values())
    errors = any(res["errors"] for res in every)
    part.record["summary"] = {
        "all_met": (met and not errors) if every else None,
        "bound": (
            "exact pairs: 0 ulp (bit patterns, -0 one ulp from +0) and the same win rate; FMA "
            f"pairs: m and h within {FMA_BOUND_ULPS['m']:g} ulps of their largest operand, theta "
            f"within {FMA_BOUND_ULPS['theta']:g} (in float32 given the momentum the "
            "implementation computed); see FMA_BOUND_ULPS for why. Narrow units: exact rows "
            "0 ulp in theta, m and h, no block8 code or scale different; FMA rows within "
            f"{FMA_BOUNDS} (see gpu.narrow.FMA_BOUNDS)"
        ),
    }
    narrow_verdicts(part, narrow_results)
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


def narrow_verdicts(part: Part, results: dict[str, dict[str, Any]]) -> None:
    """One verdict per narrow row: its largest figure against 0 (exact) or its bound (FMA)."""
    for key, res in results.items():
        for name, err in res["errors"].items():
            part.run.verdict(f"correctness {key}: {name} runs", None, 0, err, met=False)
        for pair, row in res["pairs"].items():
            figures = (
                f"theta {row['theta_ulp']} ulp, m {row['m_ulp']}, h {row['h_ulp']}, "
                f"{row['codes_differing']} block8 codes differ (max {row['code_max_diff']}), "
                f"scales {row['scale_ulp']} ulp, {row['win_mismatches']} win-rate mismatches"
            )
            if row["expected"] == "exact":
                value = max(row["theta_ulp"], row["m_ulp"], row["h_ulp"], row["codes_differing"],
                            row["scale_ulp"], row["win_mismatches"])  # fmt: skip
                part.run.verdict(f"correctness {key}: {pair} max difference", value, 0, figures,
                                 met=row["met"])  # fmt: skip
                continue
            worst = max(row[k] / bound for k, bound in FMA_BOUNDS.items())
            part.run.verdict(f"correctness {key}: {pair} m/h/codes/scales over their FMA bounds",
                             worst, 1, figures, met=row["met"])  # fmt: skip

"""Part 1 of ``gpu_check.py``, narrow state: every path with bfloat16 m and bfloat16/block8 h.

The optimizer state forms of :mod:`sophia.narrow` (``mu_dtype``,
``hessian_dtype``, stochastic rounding from counter-based bits) against the
NumPy reference :func:`sophia.spec.sophia_update` /
:func:`sophia.spec.hessian_ema` with the same forms, seed and step, in
lockstep: before every refresh and step each implementation is loaded with
the reference's state (theta, m, h and the step counter), so every figure is
one step's difference. float32 parameters (the case narrow state is for).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_dtypes
import numpy as np
from harness.ulp import ulp_diff, ulps_of_operands

from gpu.environment import Frameworks, xla_without_fma
from gpu.implementations import (
    HP,
    TorchImpl,
    correctness_shapes,
    jax_sophia,
    jitted_step_and_refresh,
    torch_sophia,
)
from gpu.record import Skip
from sophia import narrow, spec

#: (mu_dtype, hessian_dtype) pairs checked: every stochastic form of each array.
FORMS = (("bfloat16", "bfloat16"), ("bfloat16", narrow.BLOCK8))
#: The rounding seed: not 0, so that a path ignoring the seed shows.
SEED = 2_654_435_761
REFRESH_EVERY = 5
#: The bound of the rows that may contract multiply-adds (JAX outside XLA:CPU without
#: FMA): a float32 momentum or EMA a few ulps off lands on the other bfloat16 neighbour
#: (or code) only where the random threshold falls between the two values, so stored
#: values stay within one bfloat16 ulp / one code (unless a result cancelled to below
#: 2**-15 of its operands); a block's scale, max|h| / 127**2, within 2 float32 ulps from
#: the EMA (its largest |h| presumed not to cancel) and 1 from the division. theta is
#: recorded, not judged: a momentum that cancelled makes |m| / den sensitive to its last
#: bit, and the unrounded momentum behind JAX's theta is not stored (the float32 unit
#: judges theta given the momentum it computed).
FMA_BOUNDS = {"m_ulp": 1, "h_ulp": 1, "code_max_diff": 1, "scale_ulp": 3}

Flat = list[np.ndarray]
Hessian = list[Any]  # per tensor: a bfloat16 array or a narrow.Block8 of NumPy arrays


def _bf16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16)


def _bits(x: np.ndarray) -> np.ndarray:
    return np.array(x, order="C").view(np.uint16)  # (ascontiguousarray makes a 0-d array 1-d)


@dataclasses.dataclass
class NarrowInputs:
    """Seeded per-tensor inputs of one run: float32 parameters and gradients, estimates."""

    shapes: list[tuple[int, ...]]
    theta0: Flat
    m0: Flat  # bfloat16
    grads: list[Flat]
    h_hats: dict[int, Flat]

    @classmethod
    def make(cls, shapes: list[tuple[int, ...]], steps: int, seed: int) -> NarrowInputs:
        """Values as the plain correctness run's (signed zeros, estimates over eight decades)."""
        rng = np.random.default_rng(seed)

        def tensors(scale: float = 1.0) -> Flat:
            out = []
            for s in shapes:
                x = np.asarray(rng.standard_normal(s) * scale, np.float32).reshape(s)
                x.reshape(-1)[::13] = 0.0
                x.reshape(-1)[6::13] = -0.0
                out.append(x)
            return out

        def estimate() -> Flat:
            out = []
            for s in shapes:
                h = np.array((rng.standard_normal(s) * 10.0 ** rng.uniform(-4, 0, s)) ** 2)
                h[np.asarray(rng.random(s) < 0.1)] *= -1
                h[np.asarray(rng.random(s) < 0.05)] = 0.0
                out.append(np.asarray(h, np.float32).reshape(s))
            return out

        theta0 = tensors()
        m0 = [_bf16(x) for x in tensors(1e-2)]
        grads = [tensors(10.0 ** rng.uniform(-3, 0)) for _ in range(steps)]
        h_hats = {t: estimate() for t in range(0, steps, REFRESH_EVERY)}
        return cls(shapes, theta0, m0, grads, h_hats)


def zero_hessian(shapes: list[tuple[int, ...]], form: str) -> Hessian:
    """h before the first refresh, in ``form``."""
    if form == narrow.BLOCK8:
        return [
            narrow.Block8(
                np.zeros(s, np.int8), np.zeros(narrow.block_count(np.prod(s)), np.float32)
            )
            for s in shapes
        ]
    return [np.zeros(s, ml_dtypes.bfloat16) for s in shapes]


def reference_refresh(h: Hessian, h_hat: Flat, form: str, step: int) -> Hessian:
    """:func:`sophia.spec.hessian_ema` of every tensor (float32 parameters)."""
    return [
        spec.hessian_ema(
            hh, e, HP["b2"], hessian_dtype=form, compute=np.float32, seed=SEED, step=step
        )
        for hh, e in zip(h, h_hat)
    ]


def reference_step(
    theta: Flat, g: Flat, m: Flat, h: Hessian, mu_form: str, step: int
) -> tuple[Flat, Flat, int]:
    """:func:`sophia.spec.sophia_update` of every tensor; the total of coordinates with r < 1."""
    kw = {k: v for k, v in HP.items() if k != "b2"}
    out_t, out_m, wins = [], [], 0
    for th, gg, mm, hh in zip(theta, g, m, h):
        t, mn, w = spec.sophia_update(th, gg, mm, hh, mu_dtype=mu_form, seed=SEED, step=step, **kw)
        out_t.append(t)
        out_m.append(mn)
        wins += w
    return out_t, out_m, wins


class NarrowTorch:
    """:class:`sophia.torch.SophiaG` on one path with narrow state, loaded and read per tensor."""

    def __init__(self, torch: Any, path: str, shapes: list, device: Any, forms: tuple) -> None:

        self.torch, self.device, self.forms = torch, device, forms
        self.params = [
            torch.nn.Parameter(torch.zeros(s, dtype=torch.float32, device=device)) for s in shapes
        ]
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.opt = torch_sophia(
            self.params,
            mu_dtype=forms[0],
            hessian_dtype=forms[1],
            seed=SEED,
            **TorchImpl.PATHS[path],
        )
        self.opt.step()  # creates the state (and the group's tensors); load() overwrites it

    def _put(self, x: np.ndarray) -> Any:
        t = self.torch
        if x.dtype == ml_dtypes.bfloat16:
            return t.from_numpy(_bits(x).view(np.int16).copy()).view(t.bfloat16).to(self.device)
        return t.from_numpy(np.array(x, order="C")).to(self.device)

    def _get(self, t: Any) -> np.ndarray:
        if t.dtype == self.torch.bfloat16:
            return t.detach().view(self.torch.int16).cpu().numpy().view(ml_dtypes.bfloat16)
        return t.detach().cpu().numpy()

    def load(self, theta: Flat, m: Flat, h: Hessian, step: int) -> None:
        """Sets the parameters, m, h and every step counter (the rounding's step index)."""
        from sophia.torch._group_state import GROUP_STEP

        with self.torch.no_grad():
            for p, th, mm, hh in zip(self.params, theta, m, h):
                st = self.opt.state[p]
                p.copy_(self._put(th))
                st["exp_avg"].copy_(self._put(mm))
                if isinstance(hh, narrow.Block8):
                    st["hessian"].copy_(self._put(hh.codes))
                    st["hessian_scale"].copy_(self._put(hh.scale))
                else:
                    st["hessian"].copy_(self._put(hh))
                st["step"].fill_(step)
                if GROUP_STEP in st:
                    st[GROUP_STEP].fill_(step)

    def refresh(self, h_hat: Flat) -> None:
        """``update_hessian(hessian=...)`` (``allow_repeat``: load() rewinds the counters)."""
        self.opt.update_hessian(hessian=[self._put(e) for e in h_hat], allow_repeat=True)

    def step(self, g: Flat) -> None:
        """One ``step()`` with gradient ``g``."""
        for p, gg in zip(self.params, g):
            p.grad.copy_(self._put(gg))
        self.opt.step()

    def read(self) -> tuple[Flat, Flat, Hessian, float]:
        """``(theta, m, h, win_rate)`` per tensor, h as bfloat16 or Block8."""
        st = [self.opt.state[p] for p in self.params]
        h: Hessian = []
        for s in st:
            if self.forms[1] == narrow.BLOCK8:
                h.append(narrow.Block8(self._get(s["hessian"]), self._get(s["hessian_scale"])))
            else:
                h.append(self._get(s["hessian"]))
        win = float(self.opt.diagnostics()[0]["win_rate"])
        return [self._get(p) for p in self.params], [self._get(s["exp_avg"]) for s in st], h, win


class NarrowJax:
    """Jitted :func:`sophia.jax.sophia_g` with narrow state (manual refreshes), per tensor."""

    def __init__(self, jax: Any, shapes: list, forms: tuple) -> None:
        import jax.numpy as jnp

        self.jax, self.jnp, self.forms = jax, jnp, forms
        tx = jax_sophia(
            mu_dtype=forms[0],
            hessian_dtype=forms[1],
            seed=SEED,
        )
        self.params = [jnp.zeros(s, jnp.float32) for s in shapes]
        self.state = jax.jit(tx.init)(self.params)

        self._step, self._refresh = jitted_step_and_refresh(tx)

    def load(self, theta: Flat, m: Flat, h: Hessian, step: int) -> None:
        """Sets the parameters, m, h and ``count`` (the rounding's step index)."""
        jnp = self.jnp
        self.params = [jnp.asarray(x) for x in theta]
        hs = [
            narrow.Block8(jnp.asarray(x.codes), jnp.asarray(x.scale))
            if isinstance(x, narrow.Block8)
            else jnp.asarray(x)
            for x in h
        ]
        core = self.state[0]._replace(
            mu=[jnp.asarray(x) for x in m], hessian=hs, count=jnp.asarray(step, jnp.int32)
        )
        self.state = (core, *self.state[1:])

    def refresh(self, h_hat: Flat) -> None:
        """The Hessian EMA of ``update(..., hessian=h_hat)``, jitted, without the step."""
        self.state = self._refresh(self.params, self.state, [self.jnp.asarray(e) for e in h_hat])

    def step(self, g: Flat) -> None:
        """One jitted update and ``apply_updates``."""
        self.params, self.state = self._step(
            self.params, self.state, [self.jnp.asarray(x) for x in g]
        )

    def read(self) -> tuple[Flat, Flat, Hessian, float]:
        """``(theta, m, h, win_rate)`` per tensor, h as bfloat16 or Block8 of NumPy arrays."""
        core = self.state[0]
        h = [
            narrow.Block8(np.asarray(x.codes), np.asarray(x.scale))
            if isinstance(x, narrow.Block8)
            else np.asarray(x)
            for x in core.hessian
        ]
        return (
            [np.asarray(x) for x in self.params],
            [np.asarray(x) for x in core.mu],
            h,
            float(core.win_rate),
        )


@dataclasses.dataclass
class NarrowStats:
    """The worst differences of one implementation from the reference over a run."""

    theta_ulp: int = 0
    theta_ulps_of_operands: float = 0.0
    m_ulp: int = 0  # bfloat16 bit patterns
    h_ulp: int = 0  # bfloat16 bit patterns (hessian_dtype="bfloat16")
    codes_differing: int = 0  # block8: codes unequal to the reference's, summed over refreshes
    code_max_diff: int = 0
    scale_ulp: int = 0  # block8: float32 scales
    win_mismatches: int = 0
    refreshes: int = 0
    steps: int = 0

    def hessian(self, got: Hessian, want: Hessian) -> None:
        """Folds in one refresh's h."""
        self.refreshes += 1
        for a, b in zip(got, want):
            if isinstance(b, narrow.Block8):
                d = np.abs(a.codes.astype(np.int32) - b.codes.astype(np.int32))
                self.codes_differing += int(np.count_nonzero(d))
                self.code_max_diff = max(self.code_max_diff, int(d.max(initial=0)))
                self.scale_ulp = max(self.scale_ulp, ulp_diff(a.scale, b.scale))
            else:
                self.h_ulp = max(self.h_ulp, ulp_diff(_bits(a), _bits(b)))

    def step(self, got: tuple, want_theta: Flat, want_m: Flat, theta0: Flat, rate: float) -> None:
        """Folds in one step's theta, m and win rate."""
        self.steps += 1
        for a, b, t0 in zip(got[0], want_theta, theta0):
            self.theta_ulp = max(self.theta_ulp, ulp_diff(a, b))
            if a.size:
                self.theta_ulps_of_operands = max(
                    self.theta_ulps_of_operands,
                    ulps_of_operands(a, b, "float32", t0, HP["lr"]),
                )
        for a, b in zip(got[1], want_m):
            self.m_ulp = max(self.m_ulp, ulp_diff(_bits(a), _bits(b)))
        self.win_mismatches += int(got[3] != rate)


def expectation(name: str, fw: Frameworks) -> tuple[str, str]:
    """``("exact" | "fma", why)`` for a narrow row."""
    if name.startswith("torch"):
        cuda = fw.torch_device.type == "cuda"
        if "fused" not in name:
            return "exact", (
                "eager kernels: the bits in int64 (every product masked), bfloat16 by integer "
                "add and shift, block8's division and sqrt one correctly rounded kernel each"
            )
        if not cuda:
            return "exact", "native C++ kernel (or inductor C++ with FP contraction off)"
        return "exact", (
            "inductor Triton kernel (sophia/torch/_fused_narrow.py) with fp fusion off: exact "
            "unless Triton's float32 division (div.full.f32) or sqrt is not correctly "
            "rounded; a miss here with eager rows exact is that"
        )
    backend = fw.jax.default_backend()
    flags = xla_without_fma(backend)
    if flags is not None:
        return "exact", f"XLA:CPU under XLA_FLAGS={flags} (no FMA instructions)"
    return "fma", (
        f"XLA:{backend.upper()} contracts the momentum and EMA into fused multiply-adds "
        "inside jit: a stochastic rounding whose threshold falls between the two float32 "
        f"values differs (bounds {FMA_BOUNDS}); block8's divisions are kept from XLA's "
        "reciprocal rewrite, so a larger code difference means XLA's division or sqrt differ"
    )


def met(stats: NarrowStats, expect: str) -> bool:
    """Exact: every figure 0 and the same win rates; FMA: each within :data:`FMA_BOUNDS`."""
    if expect == "exact":
        figures = (stats.theta_ulp, stats.m_ulp, stats.h_ulp, stats.codes_differing)
        return not any(figures) and stats.scale_ulp == 0 and stats.win_mismatches == 0
    return all(getattr(stats, k) <= v for k, v in FMA_BOUNDS.items())


def check_narrow(fw: Frameworks, forms: tuple[str, str], steps: int, smoke: bool) -> dict:
    """Every available path with state ``forms`` against the reference, in lockstep."""
    shapes = correctness_shapes(smoke)
    inputs = NarrowInputs.make(shapes, steps, seed=5)
    makers, notes = {}, []
    if fw.torch is not None:
        for path in TorchImpl.PATHS:
            makers[f"torch-{path}"] = lambda path=path: NarrowTorch(
                fw.torch, path, shapes, fw.torch_device, forms
            )
    else:
        notes.append(fw.torch_note)
    if fw.jax is not None:
        makers["jax-jit"] = lambda: NarrowJax(fw.jax, shapes, forms)
    else:
        notes.append(fw.jax_note)
    if not makers:
        raise Skip("; ".join(notes))
    impls, errors = {}, {}
    for name, make in makers.items():
        try:
            impls[name] = make()
        except Exception as e:  # noqa: BLE001 (one broken path must not hide the others)
            errors[name] = f"{type(e).__name__}: {e}"
    stats = {name: NarrowStats() for name in impls}
    n = sum(int(np.prod(s)) for s in shapes)
    theta, m, h = inputs.theta0, inputs.m0, zero_hessian(shapes, forms[1])
    for t in range(steps):
        if t in inputs.h_hats:
            h_new = reference_refresh(h, inputs.h_hats[t], forms[1], t)
            for name, impl in list(impls.items()):
                try:
                    impl.load(theta, m, h, t)
                    impl.refresh(inputs.h_hats[t])
                    stats[name].hessian(impl.read()[2], h_new)
                except Exception as e:  # noqa: BLE001
                    errors[name] = f"refresh at step {t}: {type(e).__name__}: {e}"
                    del impls[name]
            h = h_new
        theta_new, m_new, n_win = reference_step(theta, inputs.grads[t], m, h, forms[0], t)
        rate = float(spec.win_rate(n_win, n, np.float32))
        for name, impl in list(impls.items()):
            try:
                impl.load(theta, m, h, t)
                impl.step(inputs.grads[t])
                stats[name].step(impl.read(), theta_new, m_new, theta, rate)
            except Exception as e:  # noqa: BLE001
                errors[name] = f"step {t}: {type(e).__name__}: {e}"
                del impls[name]
        theta, m = theta_new, m_new
    rows = {}
    for name, st in stats.items():
        if name in errors:
            continue
        expect, why = expectation(name, fw)
        rows[f"{name} vs numpy"] = {
            **dataclasses.asdict(st),
            "expected": expect,
            "why": why,
            "met": met(st, expect),
        }
    return {
        "mu_dtype": forms[0],
        "hessian_dtype": forms[1],
        "param_dtype": "float32",
        "seed": SEED,
        "steps": steps,
        "refresh_every": REFRESH_EVERY,
        "n_elements": n,
        "shapes": [list(s) for s in shapes],
        "pairs": rows,
        "errors": errors,
        "notes": [x for x in notes if x],
    }

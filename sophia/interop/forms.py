"""The narrow state's forms in a Checkpoint: how arrays are stored, and explicit conversion.

A state array is carried between frameworks as it is stored, bit for bit: a
``"bfloat16"`` momentum stays bfloat16, a ``"block8"`` Hessian EMA stays int8
codes with their float32 scales (a :class:`sophia.narrow.Block8` of NumPy
arrays). Storing it in another width changes the values (and, for the
stochastic forms, draws random bits), so it happens only where the caller asks
for it (``convert_forms=True``); otherwise a target whose forms differ from the
checkpoint's is a ``ValueError`` naming both.

The conversion decodes the stored values to the target parameter's compute
dtype (:func:`sophia.narrow.decode`) and encodes them in the target's form
(:func:`sophia.narrow.encode`). A stochastic form draws the random bits of the
target's ``seed`` at step index ``max(step - 1, 0)``, where ``step`` is the
checkpoint's step counter: the index of the last step taken, so the bits are
those the last write would have drawn in the target's form, and no step still
to come draws them again. NumPy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

import numpy as np

from sophia import narrow, spec

__all__ = [
    "FORM_KEYS",
    "MU_STORAGE",
    "HESSIAN_STORAGE",
    "Plan",
    "array_shape",
    "convert",
    "describe",
    "plan",
    "storage_of",
]

#: The recorded hyperparameters that name each array's form.
FORM_KEYS = {"mu": "mu_dtype", "hessian": "hessian_dtype"}
#: How a momentum can be stored: a parameter dtype or a narrow form's.
MU_STORAGE = ("float16", "bfloat16", "float32", "float64")
#: How a Hessian EMA can be stored: the same, or the 8-bit block form.
HESSIAN_STORAGE = (*MU_STORAGE, narrow.BLOCK8)
#: A form the checkpoint did not record (a JAX state's, saved without hyperparams).
NOT_RECORDED = "not recorded"

#: What to do with one array: ``"carry"`` its bits, or ``"convert"`` them.
Plan = str


def _fail(msg: str) -> NoReturn:
    raise ValueError(msg)


def storage_of(form: str | None, param_dtype: str) -> str:
    """How an array of ``form`` is stored for a parameter of dtype ``param_dtype`` (a name).

    ``None`` is the parameter's dtype; a narrow form is stored as its name
    (``"block8"``: int8 codes and float32 scales).
    """
    return param_dtype if form is None else form


def array_shape(x: Any) -> tuple[int, ...]:
    """The logical shape of a stored array (a Block8's is that of its codes)."""
    return tuple(x.codes.shape if isinstance(x, narrow.Block8) else np.shape(x))


def describe(form: Any) -> str:
    """A form as a message names it: ``None``, ``'bfloat16'``, or ``not recorded``."""
    return NOT_RECORDED if form is NOT_RECORDED else repr(form)


def recorded_form(hyperparams: Mapping[str, Any] | None, kind: str) -> Any:
    """The form a checkpoint group (or a target) records for ``kind``, or :data:`NOT_RECORDED`."""
    key = FORM_KEYS[kind]
    if hyperparams is None or key not in hyperparams:
        return NOT_RECORDED
    return hyperparams[key]


def plan(
    where: str,
    kind: str,
    name: str,
    stored: tuple[str, Any],
    target: tuple[str, Any],
    convert_forms: bool,
    target_says: str,
) -> Plan:
    """Whether an array moves as it is, is converted, or (without ``convert_forms``) is refused.

    Args:
      where: the start of an error message.
      kind: ``"mu"`` or ``"hessian"``.
      name: the parameter's name.
      stored: ``(storage, form)`` of the checkpoint's array (``form`` may be
        :data:`NOT_RECORDED`).
      target: ``(storage, form)`` the target keeps the array in.
      convert_forms: the caller's permission to convert.
      target_says: how the message describes the target's storage, e.g.
        ``"the parameter is torch.float32 and the optimizer keeps it as float32"``.

    Returns:
      ``"carry"`` (same storage: the bits as they are) or ``"convert"``.
    """
    (s_storage, s_form), (t_storage, t_form) = stored, target
    known = s_form is not NOT_RECORDED and t_form is not NOT_RECORDED
    forms_differ = known and s_form != t_form
    if s_storage == t_storage and not forms_differ:
        return "carry"
    if convert_forms:
        # same storage, other rounding (None vs 'bfloat16' of a bfloat16 parameter): the
        # stored values are exact in the target's form, so its bits carry over unchanged
        return "carry" if s_storage == t_storage else "convert"
    arg = FORM_KEYS[kind]
    _fail(
        f"{where}: the checkpoint's {kind} of {name!r} is {s_storage} but {target_says} "
        f"({arg}: checkpoint {describe(s_form)} vs {describe(t_form)}); converting between "
        "forms changes the state, so it is not done silently: build the target with the "
        "checkpoint's forms, or pass convert_forms=True to decode and re-encode it"
    )


def _logical(x: Any, storage: str) -> Any:
    """A stored array as NumPy values: bfloat16 bits as ``ml_dtypes.bfloat16``."""
    if storage == "bfloat16":
        import ml_dtypes

        return np.asarray(x).view(ml_dtypes.bfloat16)
    return x


def convert(
    x: Any,
    storage: str,
    form: str | None,
    param_dtype: str,
    *,
    seed: int,
    step: int,
    kind: str,
) -> Any:
    """``x`` (stored as ``storage``) decoded and stored in ``form`` for a ``param_dtype`` parameter.

    Args:
      x: the checkpoint's array (bfloat16 as uint16 bits, block8 as a Block8).
      storage: its storage name.
      form: the target's form (``None``: the parameter's dtype).
      param_dtype: the target parameter's dtype name.
      seed: the target's seed (used by the stochastic forms).
      step: the checkpoint's step counter; the bits are those of step index
        ``max(step - 1, 0)`` (see the module docstring).
      kind: ``"mu"`` or ``"hessian"`` (the random stream).

    Returns:
      The array as the checkpoint stores the target's storage.
    """
    compute = spec.compute_dtype(np.float64 if param_dtype == "float64" else np.float32)
    values = narrow.decode(_logical(x, storage), compute)
    stream = narrow.STREAM_MU if kind == "mu" else narrow.STREAM_HESSIAN
    if param_dtype == "bfloat16":
        import ml_dtypes

        param_np: Any = ml_dtypes.bfloat16
    else:
        param_np = np.dtype(param_dtype)
    out = narrow.encode(values, form, param_np, seed, max(int(step) - 1, 0), stream)
    if isinstance(out, narrow.Block8):
        return narrow.Block8(np.ascontiguousarray(out.codes), np.ascontiguousarray(out.scale))
    if out.dtype.name == "bfloat16":
        return np.ascontiguousarray(out).view(np.uint16)
    return np.ascontiguousarray(out)


def check_block8(x: Any, where: str) -> None:
    """Raises unless ``x`` is a Block8: int8 codes in ``[-127, 127]``, one float32 scale a block."""
    if not isinstance(x, narrow.Block8):
        _fail(f"{where} is declared block8 but holds {type(x).__name__} (expected a Block8)")
    codes, scale = x
    if not isinstance(codes, np.ndarray) or codes.dtype != np.int8:
        _fail(f"{where}: block8 codes must be int8, got {getattr(codes, 'dtype', type(codes))}")
    want = (narrow.block_count(codes.size),)
    if not isinstance(scale, np.ndarray) or scale.dtype != np.float32 or scale.shape != want:
        got = (getattr(scale, "dtype", type(scale).__name__), getattr(scale, "shape", None))
        _fail(f"{where}: block8 scales must be float32 of shape {want} (one per block), got {got}")
    if codes.size and int(codes.min()) < -narrow.CODE_MAX:
        _fail(f"{where}: block8 codes must lie in [-127, 127], got {int(codes.min())}")

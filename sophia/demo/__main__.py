"""``python -m sophia.demo``: SophiaG against AdamW on a small GPT, then a table, a plot, a JSON.

Examples::

    python -m sophia.demo                          # the default run, JAX, a few minutes on a CPU
    python -m sophia.demo --framework torch        # the same run in PyTorch
    python -m sophia.demo --framework both         # JAX then PyTorch: one table per framework
    python -m sophia.demo --preset tiny            # seconds: a smoke test
    python -m sophia.demo --preset gpt2-small      # the paper's model shape, for an accelerator
    python -m sophia.demo --text input.txt         # any text file instead of the stdlib source
    python -m sophia.demo --sweep                  # the learning-rate (and rho) sweep

Relative paths (``--out``, ``--text``) are taken from the directory named by the
environment variable ``SOPHIA_CALLER_DIR`` when it is set (``./dev`` sets it to
the directory it was started from before changing to the checkout), else from
the working directory; the demo prints them absolute.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

PROG = "sophia-demo"
#: Exit status after Ctrl-C (128 + SIGINT, what a shell reports for it).
INTERRUPTED = 130


#: Held by whichever thread ends the process after Ctrl-C, so the line is printed once.
_ENDING = threading.Lock()
#: Seconds a KeyboardInterrupt gets to unwind the stack before the process ends anyway.
UNWIND_S = 2.0


def _exit_interrupted(*_: object) -> None:
    """Ctrl-C: one line, then the process ends at once with status 130.

    Not through the interpreter's shutdown: jaxlib answers a Ctrl-C during an
    XLA compilation by raising ``KeyboardInterrupt`` in the waiting thread while
    the compilation goes on in a worker thread, and the shutdown then frees what
    that thread is using (a segmentation fault). When :func:`main` calls this
    the stack has unwound, so ``finally`` blocks have run (the progress bar is
    closed, torch's extension-build lock released). Also the SIGINT handler
    while this module's imports run under ``python -m`` (nothing to clean up
    yet), and for a second Ctrl-C.
    """
    _ENDING.acquire()  # a second caller waits here for the first one's exit
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C now must not interrupt this
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os.write(2, f"{PROG}: interrupted\n".encode())
    os._exit(INTERRUPTED)


def _on_sigint(*_: object) -> None:
    """Ctrl-C while :func:`main` runs: a KeyboardInterrupt, so that ``finally`` blocks run.

    Python drops an exception raised inside a garbage-collection callback
    (jax registers one) or a ``__del__``, with a traceback: :func:`_unraisable`
    then ends the process instead. Anything else that swallows the interrupt
    is caught by a timer that ends the process :data:`UNWIND_S` seconds later
    if :func:`main` has not by then; a second Ctrl-C ends it at once.
    """
    signal.signal(signal.SIGINT, _exit_interrupted)
    timer = threading.Timer(UNWIND_S, _exit_interrupted)
    timer.daemon = True
    timer.start()
    raise KeyboardInterrupt


def _unraisable(hook: Callable[[Any], object]) -> Callable[[Any], object]:
    """``sys.unraisablehook`` that ends the process on a dropped KeyboardInterrupt."""

    def unraisable(info: Any) -> object:
        if isinstance(info.exc_value, KeyboardInterrupt):
            _exit_interrupted()
        return hook(info)

    return unraisable


if __name__ == "__main__":  # only as a program: importing this module changes no handler
    signal.signal(signal.SIGINT, _exit_interrupted)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import textwrap  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from sophia.demo.backends import BackendUnavailable, load_backend  # noqa: E402
from sophia.demo.compare import run_comparison  # noqa: E402
from sophia.demo.config import (  # noqa: E402
    PRESET_NOTES,
    PRESETS,
    REFRESH_RULE,
    ConfigError,
    RunConfig,
)
from sophia.demo.report import prepare_out_dir  # noqa: E402
from sophia.demo.sweep import (  # noqa: E402
    SWEEP_ADAMW_LRS,
    SWEEP_RHOS,
    SWEEP_SOPHIA_LRS,
    run_sweep,
)
from sophia.narrow import BLOCK_SIZE, HESSIAN_DTYPES, MU_DTYPES  # noqa: E402

__all__ = ["CALLER_DIR_ENV", "build_config", "main", "parser", "resolve_path"]

#: The environment variable naming the directory that relative paths are taken from.
CALLER_DIR_ENV = "SOPHIA_CALLER_DIR"


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute against ``$SOPHIA_CALLER_DIR``, else the working directory."""
    base = Path(os.environ.get(CALLER_DIR_ENV) or os.getcwd())
    return (base / Path(path).expanduser()).resolve()


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _show(value: Any) -> str:
    if value is None:
        return "whole batch"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _per_preset(section: str | None, field: str, show: Callable[[Any], str] = _show) -> str:
    """The value of a setting in each preset, for ``--help``: one value if they all agree."""
    values = {name: show(_preset_value(cfg, section, field)) for name, cfg in PRESETS.items()}
    if len(set(values.values())) == 1:
        return f"(every preset: {next(iter(values.values()))})"
    return "(" + ", ".join(f"{name}: {v}" for name, v in values.items()) + ")"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except where the help gives them (the per-preset values, the sweep).

    The description and the epilog (the presets) keep their line breaks.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


#: The flags a preset sets: ``(flag, section of RunConfig or None, field, help)``; the help
#: gets each preset's value.
_PRESET_FLAGS: tuple[tuple[str, str | None, str, str], ...] = (
    ("--steps", None, "steps", "optimizer updates"),
    ("--batch-size", None, "batch_size", "sequences per batch"),
    ("--block-size", "model", "block_size", "context length (tokens per sequence)"),
    ("--n-layer", "model", "n_layer", "transformer blocks"),
    ("--n-head", "model", "n_head", "attention heads (a divisor of --n-embd)"),
    ("--n-embd", "model", "n_embd", "model width"),
    ("--warmup", None, "warmup", "warm-up steps"),
    ("--grad-clip", None, "grad_clip", "global-norm gradient clipping (both optimizers)"),
    ("--eval-interval", None, "eval_interval", "validation every this many steps"),
    ("--eval-batches", None, "eval_batches", "validation batches"),
    (
        "--seed",
        None,
        "seed",
        "seed of the weights, the data order, the label sampling and the stochastic rounding",
    ),
    (
        "--hessian-batch",
        None,
        "hessian_batch",
        "SophiaG's Hessian refresh on the first N sequences of the batch (own forward) "
        "instead of the whole batch (training forward reused); bs follows",
    ),
    ("--max-bytes", None, "max_bytes", "cap on corpus bytes, 0 for none"),
    ("--sophia-lr", "sophia", "lr", "SophiaG peak learning rate"),
    ("--rho", "sophia", "rho", "SophiaG rho"),
    (
        "--hessian-interval",
        "sophia",
        "k",
        f"SophiaG k: {REFRESH_RULE}",
    ),
    ("--sophia-b2", "sophia", "b2", "SophiaG b2 (EMA rate of the Hessian)"),
    ("--adamw-lr", "adamw", "lr", "AdamW peak learning rate"),
)


def _preset_value(cfg: RunConfig, section: str | None, field: str) -> Any:
    return getattr(getattr(cfg, section) if section else cfg, field)


_FLOAT_FLAGS = {"--grad-clip", "--sophia-lr", "--rho", "--sophia-b2", "--adamw-lr"}


def parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    width = max(map(len, PRESET_NOTES))
    presets = "\n".join(
        textwrap.fill(
            note,
            78,
            initial_indent=f"  {name:<{width}}  ",
            subsequent_indent=" " * (width + 4),
        )
        for name, note in PRESET_NOTES.items()
    )
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train a small character-level GPT with SophiaG and with AdamW (same init,\n"
        "data order and schedule) and compare: validation loss, steps to AdamW's final\n"
        "loss, time per step, Hessian-refresh overhead, optimizer memory.",
        epilog=f"presets (--preset):\n{presets}",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--framework",
        choices=("jax", "torch", "both"),
        default="jax",
        help="backend; 'both' runs JAX then PyTorch from the same weights and batches",
    )
    p.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default="default",
        help="run shape and optimizer settings (the presets are listed at the end); the "
        "flags below override it",
    )
    run = p.add_argument_group("run (each flag's value per preset in parentheses)")
    opt = p.add_argument_group("optimizers (each flag's value per preset in parentheses)")
    for flag, section, field, text in _PRESET_FLAGS:
        group = opt if section in ("sophia", "adamw") else run
        kind = float if flag in _FLOAT_FLAGS else int
        show = (lambda v: "no cap" if v <= 0 else f"{v:,}") if flag == "--max-bytes" else _show
        metavar = "N" if flag == "--hessian-batch" else None
        help_text = f"{text} {_per_preset(section, field, show)}"
        group.add_argument(flag, type=kind, metavar=metavar, help=help_text)
    # not preset flags: every preset keeps the parameters' dtype (float32) unless told
    for flag, allowed, what in (
        ("--mu-dtype", MU_DTYPES, "momentum m; bfloat16 rounds"),
        (
            "--hessian-dtype",
            HESSIAN_DTYPES,
            "Hessian EMA h; bfloat16 and block8 (8-bit codes, a float32 scale per "
            f"{BLOCK_SIZE}) round",
        ),
    ):
        opt.add_argument(
            flag,
            choices=allowed,
            help=f"SophiaG's storage of its {what} stochastically, seeded by --seed "
            "(default: the parameters' dtype, float32)",
        )
    run.add_argument(
        "--text",
        metavar="PATH",
        help="train on this file (its first --max-bytes) instead of the standard library's source",
    )
    s = p.add_argument_group("sweep")
    s.add_argument(
        "--sweep",
        action="store_true",
        help="grid-search SophiaG's lr x rho and AdamW's lr on this run shape, write sweep.json",
    )
    for flag, default, what in (
        ("--sweep-sophia-lrs", SWEEP_SOPHIA_LRS, "SophiaG's peak learning rates"),
        ("--sweep-rhos", SWEEP_RHOS, "SophiaG's rho values"),
        ("--sweep-adamw-lrs", SWEEP_ADAMW_LRS, "AdamW's peak learning rates"),
    ):
        s.add_argument(
            flag,
            type=_floats,
            default=default,
            metavar="X,Y,...",
            help=f"{what}, comma-separated (default: {','.join(f'{v:g}' for v in default)})",
        )
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _check(flag: str, value: Any, ok: bool, allowed: str, preset: str | None) -> None:
    """Raises the one-line error of a bad value, saying when it is the preset's."""
    if not ok:
        source = f", the {preset} preset's" if preset else ""
        raise ValueError(f"Invalid {flag}: {_show(value)}{source} (allowed: {allowed})")


def _check_text(text: str) -> str:
    """``--text`` as an absolute path to a readable, non-empty file."""
    path = resolve_path(text)
    problem = None
    if not path.exists():
        problem = "no such file"
    elif not path.is_file():
        problem = "not a file"
    else:
        try:
            with path.open("rb") as f:
                if not f.read(1):
                    problem = "the file is empty"
        except OSError as e:
            problem = e.strerror or type(e).__name__
    if problem:
        raise ValueError(f"Invalid --text: {path} ({problem}; allowed: a readable, non-empty file)")
    return str(path)


def build_config(args: argparse.Namespace) -> RunConfig:
    """The preset with the flags that were given applied on top.

    Every value is checked before the config is built, in an order that names
    the flag at fault (``--batch-size 0`` before the ``--hessian-batch`` that
    depends on it).

    Raises:
      ValueError: a bad value: one line naming the flag, the value (and whether
        it is the preset's) and what is allowed.
    """
    base = PRESETS[args.preset]
    value: dict[str, Any] = {}
    preset: dict[str, str | None] = {}
    for flag, section, field, _ in _PRESET_FLAGS:
        given = getattr(args, flag[2:].replace("-", "_"))
        value[flag] = _preset_value(base, section, field) if given is None else given
        preset[flag] = None if given is not None else args.preset

    def check(flag: str, ok: Callable[[Any], bool], allowed: str) -> None:
        v = value[flag]
        _check(flag, v, v is not None and ok(v), allowed, preset[flag])

    positive_int = ("--steps", "--batch-size", "--block-size", "--n-layer", "--n-head")
    for flag in (*positive_int, "--n-embd", "--eval-interval", "--eval-batches"):
        check(flag, lambda v: v >= 1, "an integer >= 1")
    for flag in ("--warmup", "--seed", "--max-bytes"):
        check(flag, lambda v: v >= 0, "an integer >= 0")
    n_embd = value["--n-embd"]
    check("--n-head", lambda v: n_embd % v == 0, f"a divisor of --n-embd, {n_embd}")
    batch = value["--batch-size"]
    if value["--hessian-batch"] is not None:
        check("--hessian-batch", lambda v: 1 <= v <= batch, f"1 <= N <= --batch-size, {batch}")
    for flag in ("--grad-clip", "--sophia-lr", "--rho", "--adamw-lr"):
        check(flag, lambda v: v > 0 and math.isfinite(v), "a finite number > 0")
    check("--sophia-b2", lambda v: 0.0 <= v < 1.0, "0 <= b2 < 1")
    check("--hessian-interval", lambda v: v >= 1, "an integer >= 1")
    for flag, values in (
        ("--sweep-sophia-lrs", args.sweep_sophia_lrs),
        ("--sweep-rhos", args.sweep_rhos),
        ("--sweep-adamw-lrs", args.sweep_adamw_lrs),
    ):
        for v in values:
            _check(flag, v, v > 0 and math.isfinite(v), "finite numbers > 0", None)
    text = _check_text(args.text) if args.text is not None else base.text

    fields: dict[str | None, dict[str, Any]] = {None: {}, "model": {}, "sophia": {}, "adamw": {}}
    for flag, section, field, _ in _PRESET_FLAGS:
        fields[section][field] = value[flag]
    fields["sophia"].update(mu_dtype=args.mu_dtype, hessian_dtype=args.hessian_dtype)
    sections = {k: dataclasses.replace(getattr(base, k), **v) for k, v in fields.items() if k}
    return dataclasses.replace(base, **fields[None], **sections, text=text)


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m sophia.demo`` and ``sophia-demo``; returns the exit status.

    Bad flags end it with status 2 and one line naming the flag, the value and
    what is allowed; the output directory is checked before the first step.
    Ctrl-C at any moment ends the process with status 130 and the line
    ``sophia-demo: interrupted`` (see :func:`_exit_interrupted`).
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGINT, _on_sigint) if in_main_thread else None
    hook = sys.unraisablehook
    sys.unraisablehook = _unraisable(hook)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        _exit_interrupted()
        raise  # not reached: _exit_interrupted ends the process
    finally:  # a caller in the same process gets its handlers back
        sys.unraisablehook = hook
        if in_main_thread:
            signal.signal(signal.SIGINT, before)


def _import_backends(frameworks: Sequence[str]) -> None:
    """Imports each framework's backend with Ctrl-C ending the process at once.

    A KeyboardInterrupt raised while an extension module initialises (jaxlib's
    ``_jax`` calls back into Python as it loads) leaves it half-built, and its
    destruction crashes the process; during imports there is nothing to clean up.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGINT, _exit_interrupted) if in_main_thread else None
    try:
        for framework in frameworks:
            load_backend(framework)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, before)


def _main(argv: Sequence[str] | None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        cfg = build_config(args)
    except ValueError as e:
        return _error(str(e))
    frameworks = ("jax", "torch") if args.framework == "both" else (args.framework,)
    if args.sweep and len(frameworks) > 1:
        return _error("--sweep runs one framework; pick --framework jax or torch")
    try:
        out = prepare_out_dir(resolve_path(args.out))
    except ConfigError as e:
        return _error(f"Invalid --out: {e} (allowed: a directory this user can write to)")
    try:
        _import_backends(frameworks)
        if args.sweep:
            run_sweep(
                cfg,
                frameworks[0],
                out,
                sophia_lrs=args.sweep_sophia_lrs,
                rhos=args.sweep_rhos,
                adamw_lrs=args.sweep_adamw_lrs,
                progress=not args.no_progress,
            )
        else:
            run_comparison(cfg, frameworks, out, progress=not args.no_progress)
    except (BackendUnavailable, ConfigError) as e:
        # a framework that is not installed (e.g. sophiag[jax,demo] without torch), a corpus
        # too short for the context
        return _error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())

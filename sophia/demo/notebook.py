"""``python -m sophia.demo.notebook NAME``: runs one of the checkout's notebooks, no Jupyter needed.

``./dev notebook quickstart_torch`` (or ``python -m sophia.demo.notebook
quickstart_torch``) executes ``notebooks/quickstart_torch.ipynb`` top to bottom
with nbclient, in a kernel started from this interpreter (so it sees this
environment's packages whatever other kernels are installed), from the
``notebooks/`` folder, as Jupyter would. The executed copy, with its outputs,
goes to ``--out`` (default ``runs/notebooks/NAME/NAME.ipynb``), and so do the
figures (the notebooks write them where ``SOPHIA_NOTEBOOK_OUT`` says);
``notebooks/`` itself is left untouched. ``--small`` runs the small
configuration that CI runs (``SOPHIA_NOTEBOOK_SMALL=1``).

Needs ``nbclient``, ``nbformat`` and ``ipykernel`` (in the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["KERNEL", "execute", "find_notebook", "main", "write_kernel_spec"]

PROG = "sophia-notebook"
#: The name of the kernelspec that runs this interpreter.
KERNEL = "sophia-this-python"
#: Where the checkout's notebooks are (this file is sophia/demo/notebook.py).
NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def find_notebook(name: str, base: Path | None = None) -> Path:
    """A notebook by path (absolute, or relative to ``base``) or by name in the checkout.

    Raises:
      FileNotFoundError: neither exists; the message lists the checkout's notebooks.
    """
    path = (base or Path.cwd()) / Path(name).expanduser()
    if path.is_file():
        return path.resolve()
    stem = Path(name).name.removesuffix(".ipynb")
    in_checkout = NOTEBOOKS / f"{stem}.ipynb"
    if in_checkout.is_file():
        return in_checkout
    known = ", ".join(sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))) or "none found"
    raise FileNotFoundError(f"no notebook {name!r} (not a file; the checkout's: {known})")


def write_kernel_spec(root: str | os.PathLike[str]) -> Path:
    """Writes ``root/kernels/<KERNEL>/kernel.json`` for this interpreter; returns ``root``.

    With ``root`` on ``JUPYTER_PATH``, kernel :data:`KERNEL` runs ``sys.executable``.
    """
    spec = Path(root) / "kernels" / KERNEL
    spec.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"})
    )
    return Path(root)


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set (the kernel inherits it), restored afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def execute(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    timeout: int = 1800,
    log: Any = None,
) -> Any:
    """Executes a notebook in a kernel of this interpreter, from the notebook's folder.

    Args:
      path: the ``.ipynb`` file (left unchanged).
      out: where to write the executed copy (``None``: nowhere).
      env: environment variables for the kernel, on top of this process's.
      timeout: seconds a cell may run.
      log: called with one line per cell as it starts (``None``: silent).

    Returns:
      The executed ``nbformat.NotebookNode``.

    Raises:
      nbclient.exceptions.CellExecutionError: a cell failed (its traceback in the message).
    """
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]

    def on_cell_start(cell: Any, cell_index: int) -> None:
        if log is not None and cell_index in code:  # markdown cells "run" too
            log(f"cell {code.index(cell_index) + 1}/{len(code)}")

    with tempfile.TemporaryDirectory(prefix="sophia-jupyter-") as tmp:
        kernels = write_kernel_spec(tmp)
        jupyter = {"JUPYTER_PATH": str(kernels), "IPYTHONDIR": str(Path(tmp) / "ipython")}
        client = NotebookClient(
            nb,
            timeout=timeout,
            kernel_name=KERNEL,
            resources={"metadata": {"path": str(path.parent)}},
            on_cell_start=on_cell_start,
        )
        with _environ({**jupyter, **(env or {})}):
            try:
                client.execute()
            finally:
                if out is not None:
                    Path(out).parent.mkdir(parents=True, exist_ok=True)
                    nbformat.write(nb, out)
    return nb


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m sophia.demo.notebook``; returns the exit status."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Execute one of notebooks/*.ipynb in this environment (nbclient, no "
        "Jupyter server); the executed copy and its figures go to --out.",
    )
    p.add_argument("name", help="a notebook's name (e.g. quickstart_torch) or path")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="where the executed copy and the figures go (default: runs/notebooks/NAME)",
    )
    p.add_argument("--small", action="store_true", help="the small configuration CI runs (quick)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds a cell may run")
    args = p.parse_args(argv)
    # ./dev runs this from the checkout and says where it was started from
    base = Path(os.environ.get("SOPHIA_CALLER_DIR") or os.getcwd())
    try:
        path = find_notebook(args.name, base)
    except FileNotFoundError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        import nbclient  # noqa: F401
        import nbformat  # noqa: F401
    except ImportError as e:
        print(
            f"{PROG}: error: {e.name} is not installed (pip install nbclient nbformat ipykernel, "
            "or use ./dev, whose environment has them)",
            file=sys.stderr,
        )
        return 2
    out_dir = (base / (args.out or Path("runs/notebooks") / path.stem)).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {"SOPHIA_NOTEBOOK_OUT": str(out_dir)}
    if args.small:
        env["SOPHIA_NOTEBOOK_SMALL"] = "1"
    start = time.perf_counter()
    print(f"{PROG}: running {path} (figures and the executed copy in {out_dir})", file=sys.stderr)
    from nbclient.exceptions import CellExecutionError

    try:
        execute(
            path,
            out_dir / path.name,
            env=env,
            timeout=args.timeout,
            log=lambda line: print(f"{PROG}: {line}", file=sys.stderr, flush=True),
        )
    except CellExecutionError as e:
        print(f"{PROG}: a cell failed (the copy up to it is in {out_dir}):\n{e}", file=sys.stderr)
        return 1
    print(
        f"{PROG}: done in {time.perf_counter() - start:.0f} s: {out_dir / path.name}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Colab notebooks in notebooks/ run top to bottom on CPU in their small configuration.

Each notebook is executed with nbclient in a kernel started from this interpreter (the
project's virtual environment), with ``SOPHIA_NOTEBOOK_SMALL=1``; a failing cell fails the
test. The committed notebooks must carry no outputs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from sophia.demo import notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
#: Each notebook and the figures it writes to $SOPHIA_NOTEBOOK_OUT.
FIGURES = {
    "quickstart_jax": {"jax_data", "jax_diagnostics"},
    "lm_tpu": {"lm_loss"},
    "quickstart_torch": {"torch_dropin", "torch_to_jax"},
}
KERNEL = notebook.KERNEL
CELL_TIMEOUT = 300
#: XLA's CPU backend at LLVM -O0: the small runs are dominated by compilation.
FAST_XLA = "--xla_backend_optimization_level=0"


@pytest.fixture(scope="module")
def jupyter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JUPYTER_PATH whose kernelspec runs this interpreter, whatever other kernels exist."""
    return notebook.write_kernel_spec(tmp_path_factory.mktemp("jupyter"))


def _run(
    nb: nbformat.NotebookNode,
    cwd: Path,
    env: dict[str, str],
    jupyter_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Executes ``nb`` in place; the kernel inherits this process's environment plus ``env``."""
    base = {
        "JUPYTER_PATH": str(jupyter_dir),
        "IPYTHONDIR": str(jupyter_dir / "ipython"),
        "JAX_PLATFORMS": "cpu",
        # torch's two intra-op threads wait on each other on a loaded two-core machine
        "OMP_NUM_THREADS": "1",
        "SOPHIA_NOTEBOOK_SMALL": "1",
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FAST_XLA}".strip(),
    }
    for key, value in {**base, **env}.items():
        monkeypatch.setenv(key, value)
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name=KERNEL, resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()


def _stdout(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def _check_runtime_report(text: str) -> None:
    """The install cell's report: this interpreter, this checkout, the CPU backend, no pip."""
    assert f"python   {sys.executable} " in text, text
    assert f"sophia   {ROOT / 'sophia'}\n" in text, text
    assert f"checkout {ROOT}\n" in text, text
    assert re.search(r"^jax      \S+, backend cpu, ", text, re.MULTILINE), text
    assert "size     small" in text, text
    assert "pip install" not in text, text


def _load(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def test_every_notebook_is_tested():
    assert {p.stem for p in NOTEBOOKS.glob("*.ipynb")} == set(FIGURES)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_committed_without_outputs(name):
    nb = _load(name)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name} cell {i} has outputs: strip them"
            assert cell.execution_count is None, f"{name} cell {i} has an execution count"
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "SOPHIA_REPO" in first.source and "find_checkout" in first.source


def test_install_cell_finds_the_checkout_on_cpu(tmp_path, jupyter_dir, monkeypatch):
    """Only the first cell, with a decoy ``sophia`` package ahead of the real one on the path."""
    decoy = tmp_path / "decoy" / "sophia"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('the decoy sophia was imported')\n")
    nb = _load("quickstart_jax")
    nb.cells = [next(c for c in nb.cells if c.cell_type == "code")]
    path = os.pathsep.join(filter(None, [str(decoy.parent), os.environ.get("PYTHONPATH")]))
    _run(nb, NOTEBOOKS, {"PYTHONPATH": path}, jupyter_dir, monkeypatch)
    _check_runtime_report(_stdout(nb.cells[0]))


@pytest.mark.parametrize("name", list(FIGURES))
def test_notebook_runs(name, tmp_path, jupyter_dir, monkeypatch):
    env = {"SOPHIA_NOTEBOOK_OUT": str(tmp_path)}
    if name == "lm_tpu":  # two CPU devices, so the fully sharded section runs too
        env["XLA_FLAGS"] = (
            f"{os.environ.get('XLA_FLAGS', '')} {FAST_XLA} --xla_force_host_platform_device_count=2"
        ).strip()
    nb = _load(name)
    start = time.perf_counter()
    try:
        _run(nb, NOTEBOOKS, env, jupyter_dir, monkeypatch)
    except CellExecutionError as e:
        pytest.fail(f"{name}.ipynb: a cell failed:\n{e}", pytrace=False)
    print(f"{name}.ipynb: {time.perf_counter() - start:.1f} s")
    _check_runtime_report(_stdout(next(c for c in nb.cells if c.cell_type == "code")))
    assert {p.stem for p in tmp_path.glob("*.png")} == FIGURES[name]
    if name == "lm_tpu":
        text = "".join(_stdout(c) for c in nb.cells if c.cell_type == "code")
        assert "Mesh('data': 2" in text, text
        # the two virtual devices split the parameters and SophiaG's state alike
        assert re.search(r"blocks\.attn\.w_qkv .*(P\(None, None, 'data'\) *){3}", text), text


def test_notebook_command_runs_a_notebook_where_the_caller_is(tmp_path):
    """``python -m sophia.demo.notebook`` (``./dev notebook``): the notebook runs in this
    interpreter from its folder; the executed copy and the figures land in ``--out``, taken
    from ``$SOPHIA_CALLER_DIR``; the notebook itself is left without outputs."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# mini"),
        nbformat.v4.new_code_cell("import os, sys\nprint(sys.executable)\nprint(os.getcwd())"),
        nbformat.v4.new_code_cell(
            "from pathlib import Path\n"
            "Path(os.environ['SOPHIA_NOTEBOOK_OUT'], 'fig.png').write_bytes(b'png')\n"
            "print(os.environ.get('SOPHIA_NOTEBOOK_SMALL'))"
        ),
    ]
    src = tmp_path / "nbs" / "mini.ipynb"
    src.parent.mkdir()
    nbformat.write(nb, src)
    caller = tmp_path / "caller"
    caller.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "sophia.demo.notebook", str(src), "--out", "out", "--small"],
        cwd=ROOT,
        env={**os.environ, "SOPHIA_CALLER_DIR": str(caller)},
        capture_output=True,
        text=True,
        timeout=CELL_TIMEOUT,
    )
    assert run.returncode == 0, run.stderr
    assert "cell 1/2" in run.stderr and "cell 2/2" in run.stderr
    done = nbformat.read(caller / "out" / "mini.ipynb", as_version=4)
    assert _stdout(done.cells[1]).splitlines() == [sys.executable, str(src.parent)]
    assert _stdout(done.cells[2]).strip() == "1"
    assert (caller / "out" / "fig.png").read_bytes() == b"png"
    assert all(c.get("outputs", []) == [] for c in nbformat.read(src, as_version=4).cells)


def test_notebook_command_names_the_notebooks_it_knows(capsys):
    assert notebook.main(["no_such_notebook"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no notebook 'no_such_notebook'" in err
    assert all(p.stem in err for p in NOTEBOOKS.glob("*.ipynb"))
    assert notebook.find_notebook("quickstart_torch") == NOTEBOOKS / "quickstart_torch.ipynb"

"""Every fenced ``python`` block of README.md runs as pasted, so the README cannot rot.

Each block is executed in a fresh namespace holding only the names it leaves to the
reader (``model``, ``batch_size``, ``loader``...), which :data:`GIVEN` supplies per block,
tiny; :data:`CHECKS` then exercises what a block only defines (a ``train_step`` nobody
calls proves little). A block is named by the README heading above it, with ``[2]``,
``[3]``... for later blocks under the same heading. New blocks are picked up on their own:
one that needs names from the reader gets an entry in :data:`GIVEN`.

A block may opt out only with an HTML comment on the line before its fence (invisible
on GitHub) that gives the reason, e.g.
``<!-- readme-test: skip (needs a CUDA GPU) -->``; the reason is checked to be there.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP_MARKER = re.compile(r"<!--\s*readme-test:\s*skip\b(?P<rest>.*?)-->")
#: A skip's reason: in parentheses, at least two words.
SKIP_REASON = re.compile(r"^\s*\((?P<reason>\s*\S+(\s+\S+)+\s*)\)\s*$")


class Block:
    """One fenced block of the README: its name, first line number, source and skip marker."""

    def __init__(self, name: str, line: int, source: str, marker: str | None) -> None:
        self.name, self.line, self.source, self.marker = name, line, source, marker


def python_blocks(text: str) -> list[Block]:
    """The README's ```` ```python ```` blocks, named by heading (``[n]`` for the n-th)."""
    blocks: list[Block] = []
    heading, seen = "(top)", {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):  # fenced blocks are skipped whole below: a heading
            heading = line.lstrip("#").strip()
        fence = re.match(r"^(`{3,})\s*(\S*)", line)
        if fence:
            ticks, lang = fence.groups()
            end = next(
                (j for j in range(i + 1, len(lines)) if lines[j].startswith(ticks)), len(lines)
            )
            if lang == "python":
                n = seen[heading] = seen.get(heading, 0) + 1
                name = heading if n == 1 else f"{heading} [{n}]"
                prev = lines[i - 1] if i > 0 else ""
                marker = SKIP_MARKER.search(prev)
                source = "\n".join(lines[i + 1 : end]) + "\n"
                blocks.append(Block(name, i + 2, source, marker.group("rest") if marker else None))
            i = end + 1
            continue
        i += 1
    return blocks


# ---------------------------------------------------------------- names left to the reader

VOCAB, SEQ, BATCH = 11, 5, 3


def _jax_quick_start() -> dict[str, Any]:
    # a bigram model: the block calls ``model(params, x)`` for [batch, seq, vocab] logits
    import jax

    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = {
        "emb": 0.1 * jax.random.normal(k1, (VOCAB, 8)),
        "out": 0.1 * jax.random.normal(k2, (8, VOCAB)),
    }
    return {
        "params": params,
        "model": lambda p, x: p["emb"][x] @ p["out"],
        "batch_size": BATCH,
        "seq_len": SEQ,
    }


def _check_jax_quick_start(ns: dict[str, Any]) -> None:
    import jax
    import jax.numpy as jnp

    import sophia.jax as sj

    x = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ)))
    params, state = ns["train_step"](ns["params"], ns["state"], x, jnp.roll(x, -1, axis=1))
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, ns["params"])
    assert all(jax.tree.leaves(moved)), moved
    # step 0 refreshed the Hessian (the one refresh rule: steps 0, k, 2k, ...)
    assert float(sj.diagnostics(state)["hessian_norm"]) > 0


def _torch_quick_start() -> dict[str, Any]:
    # the block calls ``model(x)`` for [batch, seq, vocab] logits and iterates ``loader``
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 8), torch.nn.Linear(8, VOCAB))
    xs = torch.randint(0, VOCAB, (12, BATCH, SEQ))
    return {
        "model": model,
        "batch_size": BATCH,
        "seq_len": SEQ,
        "loader": [(x, x.roll(-1, dims=1)) for x in xs],
        "_initial": [p.detach().clone() for p in model.parameters()],
    }


def _check_torch_quick_start(ns: dict[str, Any]) -> None:
    params = list(ns["model"].parameters())
    assert all(not p.detach().equal(p0) for p, p0 in zip(params, ns["_initial"]))
    opt = ns["opt"]
    # the loop refreshed at steps 0 and 10 of its 12: the Hessian EMA is filled
    assert all(float(opt.state[p]["hessian"].abs().sum()) > 0 for p in params)
    assert all(p.grad is None for p in params)


def _hf_trainer() -> dict[str, Any]:
    # a 1-layer GPT-2 from a config, random token ids, two steps (nothing downloaded)
    import tempfile

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=SEQ)
    ids = torch.randint(0, VOCAB, (4, SEQ))
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        max_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    return {
        "model": GPT2LMHeadModel(cfg),
        "args": args,
        "train_dataset": [{"input_ids": x, "labels": x} for x in ids],
    }


def _check_hf_trainer(ns: dict[str, Any]) -> None:
    assert ns["trainer"].state.global_step == 2
    # step 0 refreshed the Hessian from the training forward
    assert all(float(ns["opt"].state[p]["hessian"].sum()) > 0 for p in ns["model"].parameters())


def _lightning_trainer() -> dict[str, Any]:
    import tempfile

    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from sophia.torch import SophiaG

    class LitModel(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 8), torch.nn.Linear(8, VOCAB))

        def forward(self, x: Any) -> Any:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            logits = self(batch["x"])
            return F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten(), ignore_index=-100)

        def configure_optimizers(self) -> Any:
            return SophiaG(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    x = torch.randint(0, VOCAB, (8, SEQ))
    y = x.roll(-1, dims=1)
    y[:, -1] = -100
    return {
        "lit_model": LitModel(),
        "train_loader": DataLoader([{"x": a, "y": b} for a, b in zip(x, y)], batch_size=2),
        "max_steps": 2,
        "run_dir": tempfile.mkdtemp(),
    }


def _check_lightning_trainer(ns: dict[str, Any]) -> None:
    trainer = ns["trainer"]
    assert trainer.global_step == 2
    opt = trainer.optimizers[0]
    assert all(float(opt.state[p]["hessian"].sum()) > 0 for p in ns["lit_model"].parameters())


def _flax_batch() -> dict[str, Any]:
    import jax.numpy as jnp

    x = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ)))
    return {"x": x, "y": jnp.roll(x, -1, axis=1)}


def _flax_nnx() -> dict[str, Any]:
    # an nnx bigram model: model(x) -> [batch, seq, vocab] logits; the last position masked
    import jax.numpy as jnp
    from flax import nnx

    class Bigram(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.embed = nnx.Embed(VOCAB, 8, rngs=rngs)
            self.head = nnx.Linear(8, VOCAB, rngs=rngs)

        def __call__(self, x: Any) -> Any:
            return self.head(self.embed(x))

    mask = jnp.broadcast_to(jnp.arange(SEQ) < SEQ - 1, (BATCH, SEQ))
    return {"model": Bigram(nnx.Rngs(0)), "mask": mask, **_flax_batch()}


def _check_flax_nnx(ns: dict[str, Any]) -> None:
    stats = ns["stats"]
    # step 0 refreshed the Hessian from the model, on the masked-in positions only
    assert float(stats["hessian_norm"]) > 0 and int(stats["count"]) == 1
    assert float(ns["optimizer"].opt_state[0].label_count[...]) == BATCH * (SEQ - 1)


def _flax_linen() -> dict[str, Any]:
    import flax.linen as nn
    import jax

    module = nn.Embed(VOCAB, VOCAB)
    batch = _flax_batch()
    params = module.init(jax.random.PRNGKey(0), batch["x"])["params"]
    return {"apply_fn": module.apply, "params": params, **batch}


def _check_flax_linen(ns: dict[str, Any]) -> None:
    from sophia.integrations import flax as sflax

    assert int(ns["state"].step) == 1
    assert float(sflax.diagnostics(ns["state"])["hessian_norm"]) > 0


#: Per block: the names the README leaves to the reader, tiny.
GIVEN: dict[str, Callable[[], dict[str, Any]]] = {
    "Quick start: JAX": _jax_quick_start,
    "Quick start: PyTorch": _torch_quick_start,
    "Hugging Face Transformers": _hf_trainer,
    "Lightning": _lightning_trainer,
    "Flax": _flax_nnx,
    "Flax [2]": _flax_linen,
}
#: Per block: what to run after it, on its namespace, so that what it defines is used.
CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "Quick start: JAX": _check_jax_quick_start,
    "Quick start: PyTorch": _check_torch_quick_start,
    "Hugging Face Transformers": _check_hf_trainer,
    "Lightning": _check_lightning_trainer,
    "Flax": _check_flax_nnx,
    "Flax [2]": _check_flax_linen,
}

BLOCKS = python_blocks(README.read_text())


def test_the_readme_has_the_quick_starts():
    names = [b.name for b in BLOCKS]
    assert len(names) == len(set(names))
    assert {"Quick start: JAX", "Quick start: PyTorch"} <= set(names), names


def test_every_declared_block_exists():
    """A renamed heading must carry its entry along, or its block would run without names."""
    names = {b.name for b in BLOCKS}
    assert set(GIVEN) <= names, sorted(set(GIVEN) - names)
    assert set(CHECKS) <= names, sorted(set(CHECKS) - names)


def test_skip_markers_carry_a_reason():
    for b in BLOCKS:
        if b.marker is not None:
            assert SKIP_REASON.match(b.marker), (
                f"README.md:{b.line} ({b.name}): a skipped block says why, e.g. "
                f"'<!-- readme-test: skip (needs a CUDA GPU) -->', got {b.marker!r}"
            )


def test_parser_finds_blocks_headings_and_markers():
    text = (
        "# T\n\n## A\n\n```python\nx = 1\n```\n\n```bash\nls\n```\n\n"
        "```python\n# a comment, not a heading\ny = 2\n```\n\n## B\n"
        "<!-- readme-test: skip (needs a CUDA GPU) -->\n```python\nz = 3\n```\n"
    )
    blocks = python_blocks(text)
    assert [(b.name, b.line, b.source) for b in blocks] == [
        ("A", 6, "x = 1\n"),
        ("A [2]", 14, "# a comment, not a heading\ny = 2\n"),
        ("B", 21, "z = 3\n"),
    ]
    assert [b.marker for b in blocks] == [None, None, " (needs a CUDA GPU) "]
    assert SKIP_REASON.match(blocks[2].marker)
    assert not SKIP_REASON.match(" ") and not SKIP_REASON.match(" (gpu) ")


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_block_runs(block: Block):
    if block.marker is not None:
        pytest.skip(f"README.md:{block.line}: marked {block.marker.strip()}")
    ns: dict[str, Any] = {"__name__": "readme_block"}
    ns.update(GIVEN.get(block.name, dict)())
    code = compile(block.source, f"README.md:{block.line} ({block.name})", "exec")
    try:
        exec(code, ns)
    except NameError as e:
        pytest.fail(
            f"README.md:{block.line} ({block.name}): {e}. If the block leaves this name to "
            "the reader, supply a tiny one in GIVEN of tests/test_readme.py; otherwise the "
            "README is wrong.",
            pytrace=False,
        )
    if block.name in CHECKS:
        CHECKS[block.name](ns)


# ---------------------------------------------------------------- the one refresh rule

NOTEBOOKS = README.parent / "notebooks"


def _flat(text: str) -> str:
    return " ".join(text.split()).lower()


def _notebook_text(path: Path, kind: str | None = None) -> str:
    import nbformat

    cells = nbformat.read(path, as_version=4).cells
    return "\n".join(c.source for c in cells if kind is None or c.cell_type == kind)


def test_the_one_refresh_rule_is_stated_in_the_same_words(capsys):
    """README, notebooks and demo say when the Hessian is refreshed, in the same words."""
    from sophia.demo import __main__ as cli
    from sophia.demo import config, data, report, train, train_jax, train_torch

    rule = _flat(config.REFRESH_RULE)
    places = {"README.md": README.read_text()}
    for nb in sorted(NOTEBOOKS.glob("*.ipynb")):
        places[nb.name] = _notebook_text(nb, "markdown")
    places["sophia-demo --help"] = cli.parser().format_help()
    corpus = data.Corpus(np.zeros(100, np.uint8), np.zeros(10, np.uint8), "x", 1, 0, "0")
    places["the demo's console"] = "\n".join(report.describe_run(config.PRESETS["tiny"], corpus))
    for module in (train, train_jax, train_torch):
        places[module.__name__] = module.__doc__
    missing = [name for name, text in places.items() if rule not in _flat(text)]
    assert not missing, f"not stated as {config.REFRESH_RULE!r} in: {missing}"


def test_no_loop_refreshes_at_another_phase():
    """Every ``step % k == ...`` test in the README's and the notebooks' code compares with 0."""
    code = {b.name: b.source for b in BLOCKS}
    for nb in sorted(NOTEBOOKS.glob("*.ipynb")):
        code[nb.name] = _notebook_text(nb, "code")
    checks = 0
    for name, source in code.items():
        for m in re.finditer(r"%\s*\w+\s*==\s*([^:)#\n]+)", source):
            checks += 1
            assert m.group(1).strip() == "0", f"{name}: {m.group(0)!r} (the rule: step % k == 0)"
    assert checks >= 3  # the README's torch loop and the torch notebook's loops

"""The main job: SophiaG against AdamW in each framework; the table, ``run.json``, ``loss.png``."""

from __future__ import annotations

import os
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sophia.demo.backends import load_backend
from sophia.demo.config import RunConfig, check_corpus
from sophia.demo.data import Corpus, load_corpus
from sophia.demo.machine import machine_info
from sophia.demo.model import n_params
from sophia.demo.plot import plot_losses
from sophia.demo.report import (
    behind_note,
    describe_machine,
    describe_run,
    format_table,
    prepare_out_dir,
    summarize,
    write_json,
)

__all__ = ["prepare_run", "run_comparison"]


def prepare_run(
    cfg: RunConfig,
    frameworks: Sequence[str],
    out_dir: str | os.PathLike[str] | None,
    log: Callable[[str], None],
) -> tuple[Path | None, list[Any], Corpus, dict[str, Any]]:
    """What a comparison or a sweep checks before its first step, then logs.

    Args:
      cfg: the run.
      frameworks: the backends it will use.
      out_dir: its output directory (``None``: it writes nothing).
      log: where the description of the machine and the run goes.

    Returns:
      ``(out, backends, corpus, machine)``: the absolute output directory (or
      ``None``), the backend modules, the corpus and the machine's record.

    Raises:
      BackendUnavailable: a framework cannot run.
      ConfigError: ``out_dir`` cannot be written or the corpus is too short for
        the model's context.
    """
    out = prepare_out_dir(out_dir) if out_dir is not None else None
    backends = [load_backend(fw) for fw in frameworks]
    corpus = load_corpus(cfg.text, cfg.max_bytes)
    check_corpus(cfg, corpus)
    info = machine_info(backends)
    for line in describe_machine(info) + describe_run(cfg, corpus):
        log(line)
    return out, backends, corpus, info


def run_comparison(
    cfg: RunConfig,
    frameworks: Sequence[str] = ("jax",),
    out_dir: str | os.PathLike[str] | None = "runs/demo",
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The main job: SophiaG and AdamW in each framework; the table, ``run.json`` and ``loss.png``.

    Args:
      cfg: the run.
      frameworks: backends to run, in order.
      out_dir: where ``run.json`` and ``loss.png`` go (``None``: write nothing).
      progress: show tqdm bars.
      log: where the console lines go.

    Returns:
      The record written to ``run.json``.

    Raises:
      BackendUnavailable: before any training, if a framework cannot run.
      ConfigError: before any training, if ``out_dir`` cannot be written or the
        corpus is too short for the model's context.
    """
    start = time.perf_counter()
    out, backends, corpus, info = prepare_run(cfg, frameworks, out_dir, log)
    results = []
    for fw, backend in zip(frameworks, backends):
        for opt in cfg.optimizers:
            log(f"{fw} {opt.label}: {opt.describe()}")
            results.append(backend.run(cfg, opt, corpus, progress=progress))
    summary = summarize(results)
    table = format_table(summary)
    elapsed = time.perf_counter() - start
    note = behind_note(summary)
    log("")
    log(table)
    if note:
        log(note)
    log(f"\nelapsed {elapsed:.1f} s on {info['cpu']} ({info['cpu_count']} cpus)")
    record = {
        "config": cfg.to_dict(),
        "frameworks": list(frameworks),
        "machine": info,
        "corpus": {
            "source": corpus.source,
            "n_files": corpus.n_files,
            "n_val_files": corpus.n_val_files,
            "train_bytes": len(corpus.train),
            "val_bytes": len(corpus.val),
            "sha256": corpus.digest,
        },
        "n_params": n_params(cfg.model),
        "summary": summary,
        "table": table,
        "results": [r.to_dict() for r in results],
        "elapsed_s": elapsed,
    }
    if out is not None:
        write_json(record, out / "run.json")
        m = cfg.model
        title = (
            f"GPT {m.n_layer}x{m.n_embd} (ctx {m.block_size}), {cfg.steps} steps of "
            f"{cfg.tokens_per_step} tokens - {Path(corpus.source).name}"
            + (" standard library" if cfg.text is None else "")
            + (f"\n{textwrap.fill(note, 110)}" if note else "")
        )
        plot_losses(results, out / "loss.png", title)
        log(f"wrote {out / 'run.json'} and {out / 'loss.png'}")
    return record

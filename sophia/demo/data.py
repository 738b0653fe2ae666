"""The demo's data: a byte-level corpus and a seeded batch sampler, shared by every framework.

The built-in corpus is the source text of the running interpreter's standard
library, so it exists wherever Python does and needs no download. Files are
read in sorted order, every ``val_every``-th file goes to validation, and the
text is modelled byte by byte (vocabulary 256), which makes the tokenisation
trivially identical in every framework.

Batches come from :class:`BatchSampler`, a seeded :class:`numpy.random.Generator`
that hands out numpy ``int32`` arrays; each framework converts them to its own
arrays, so SophiaG and AdamW, in JAX or in torch, see exactly the same tokens in
the same order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_MAX_BYTES",
    "SKIP_DIRS",
    "VOCAB_SIZE",
    "BatchSampler",
    "Corpus",
    "eval_batches",
    "load_corpus",
    "load_stdlib",
    "load_text",
    "stdlib_files",
]

#: Byte-level vocabulary: every byte value is a token.
VOCAB_SIZE: int = 256
#: Default cap on the corpus size in bytes (train and validation together).
DEFAULT_MAX_BYTES: int = 8_000_000
#: Directory names skipped under the standard library: installed packages,
#: the test suites (huge and full of fixtures), caches, and the generated
#: codec tables of ``encodings`` (long numeric tables, not source text).
SKIP_DIRS: frozenset[str] = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings"}
)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Byte tokens split into training and validation streams.

    Attributes:
      train: ``uint8`` training tokens.
      val: ``uint8`` validation tokens.
      source: where the text came from (a directory or a file path).
      n_files: files read (1 for ``--text``).
      n_val_files: files that went to validation (0 for ``--text``).
      digest: SHA-256 (first 16 hex digits) of train and val, to compare runs.
    """

    train: np.ndarray
    val: np.ndarray
    source: str
    n_files: int
    n_val_files: int
    digest: str

    @property
    def vocab_size(self) -> int:
        """Size of the token vocabulary (256 bytes)."""
        return VOCAB_SIZE

    def describe(self) -> str:
        """One line for the console: source, sizes and split."""
        files = (
            f", {self.n_files} files ({self.n_val_files} validation)" if self.n_files > 1 else ""
        )
        return (
            f"{self.source}{files}: {len(self.train):,} train / {len(self.val):,} val bytes, "
            f"vocab {self.vocab_size}, sha256 {self.digest}"
        )


def _digest(train: np.ndarray, val: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(train.tobytes())
    h.update(b"\x00--val--\x00")
    h.update(val.tobytes())
    return h.hexdigest()[:16]


def stdlib_files(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """The standard library's ``*.py`` files in a deterministic order.

    Args:
      root: the standard library directory; default: the running interpreter's
        ``sysconfig.get_paths()["stdlib"]``.

    Returns:
      Paths sorted by their POSIX path relative to ``root``, without anything
      under a directory named in :data:`SKIP_DIRS`.
    """
    base = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    found = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]  # prune, do not descend
        for name in filenames:
            path = Path(dirpath) / name
            if name.endswith(".py") and path.is_file():
                found.append((path.relative_to(base).as_posix(), path))
    return [p for _, p in sorted(found)]


def load_stdlib(
    max_bytes: int = DEFAULT_MAX_BYTES,
    val_every: int = 10,
    root: str | os.PathLike[str] | None = None,
) -> Corpus:
    """The built-in corpus: the standard library's source, split by file.

    Files are taken in :func:`stdlib_files` order until ``max_bytes`` is
    reached (the last file is cut at the cap); file ``i`` goes to validation
    when ``i % val_every == val_every - 1``, so no file contributes to both
    splits. Files are joined with a blank line.

    Args:
      max_bytes: cap on the total bytes read (``<= 0``: no cap).
      val_every: every ``val_every``-th file is a validation file (``>= 2``).
      root: the standard library directory (default: the running interpreter's).

    Returns:
      The :class:`Corpus`.
    """
    if val_every < 2:
        raise ValueError(f"Invalid val_every: {val_every!r} (allowed: an integer >= 2)")
    files = stdlib_files(root)
    if not files:
        raise FileNotFoundError(f"no *.py files under {root or sysconfig.get_paths()['stdlib']}")
    train_parts: list[bytes] = []
    val_parts: list[bytes] = []
    total = n = n_val = 0
    for i, path in enumerate(files):
        if max_bytes > 0 and total >= max_bytes:
            break
        text = path.read_bytes()
        if max_bytes > 0:
            text = text[: max_bytes - total]
        total += len(text)
        n += 1
        if i % val_every == val_every - 1:
            val_parts.append(text)
            n_val += 1
        else:
            train_parts.append(text)
    if not val_parts:
        raise ValueError(
            f"the corpus cap max_bytes={max_bytes} leaves no validation file; raise it"
        )
    train = np.frombuffer(b"\n\n".join(train_parts), dtype=np.uint8).copy()
    val = np.frombuffer(b"\n\n".join(val_parts), dtype=np.uint8).copy()
    source = str(root) if root is not None else sysconfig.get_paths()["stdlib"]
    return Corpus(train, val, source, n, n_val, _digest(train, val))


def load_text(path: str | os.PathLike[str], max_bytes: int = 0, val_frac: float = 0.1) -> Corpus:
    """A corpus from one text file: the last ``val_frac`` of its bytes is validation.

    Args:
      path: any file; it is read as bytes.
      max_bytes: cap on the bytes read from the start of the file (``<= 0``: no cap).
      val_frac: fraction of the bytes held out, taken from the end.

    Returns:
      The :class:`Corpus`.
    """
    if not 0.0 < val_frac < 1.0:
        raise ValueError(f"Invalid val_frac: {val_frac!r} (allowed: a number in (0, 1))")
    data = Path(path).read_bytes()
    if max_bytes > 0:
        data = data[:max_bytes]
    tokens = np.frombuffer(data, dtype=np.uint8).copy()
    cut = int(round(len(tokens) * (1.0 - val_frac)))
    train, val = tokens[:cut], tokens[cut:]
    return Corpus(train, val, str(path), 1, 0, _digest(train, val))


def load_corpus(text: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> Corpus:
    """``load_text(text)`` when a path is given, else the built-in corpus."""
    return load_text(text, max_bytes) if text else load_stdlib(max_bytes)


class BatchSampler:
    """Random ``(x, y)`` windows of a token stream from a seeded numpy Generator.

    ``x`` is ``tokens[i : i + block_size]`` and ``y`` the same window shifted by
    one, for ``batch_size`` start positions ``i`` drawn uniformly. The same
    ``(data, batch_size, block_size, seed)`` gives the same sequence of batches
    on every machine and for every optimizer and framework.

    Args:
      data: the ``uint8`` token stream.
      batch_size: windows per batch.
      block_size: tokens per window.
      seed: seed of the generator.
    """

    def __init__(self, data: np.ndarray, batch_size: int, block_size: int, seed: int) -> None:
        if len(data) < block_size + 2:
            raise ValueError(
                f"a token stream of {len(data)} bytes is too short for block_size={block_size}"
            )
        self.data = data
        self.batch_size = batch_size
        self.block_size = block_size
        self.rng = np.random.default_rng(seed)
        self._offsets = np.arange(block_size + 1)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        """The next batch: ``(x, y)``, both ``int32`` of shape ``[batch_size, block_size]``."""
        starts = self.rng.integers(0, len(self.data) - self.block_size, size=self.batch_size)
        window = self.data[starts[:, None] + self._offsets].astype(np.int32)
        return window[:, :-1], window[:, 1:]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while True:
            yield self.next()


def eval_batches(
    data: np.ndarray, n_batches: int, batch_size: int, block_size: int, seed: int
) -> Sequence[tuple[np.ndarray, np.ndarray]]:
    """A fixed list of evaluation batches (the same at every evaluation and for every run)."""
    sampler = BatchSampler(data, batch_size, block_size, seed)
    return [sampler.next() for _ in range(n_batches)]

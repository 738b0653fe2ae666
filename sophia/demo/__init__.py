"""The main job: SophiaG against AdamW on a small character-level GPT.

``python -m sophia.demo`` (or the ``sophia-demo`` console script) trains the
same GPT with both optimizers on the source text of Python's standard library
and prints a comparison table; see :mod:`sophia.demo.__main__` for the flags.

Modules: :mod:`~sophia.demo.data` (corpus and batches),
:mod:`~sophia.demo.model` (shape, initial weights), :mod:`~sophia.demo.train`
(the framework-neutral driver), and one backend per framework
(:mod:`~sophia.demo.model_jax` with :mod:`~sophia.demo.train_jax`,
:mod:`~sophia.demo.model_torch` with :mod:`~sophia.demo.train_torch`).
:mod:`~sophia.demo.notebook` executes the checkout's notebooks without a
Jupyter server (``./dev notebook NAME``).
"""

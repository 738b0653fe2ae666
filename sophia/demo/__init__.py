"""The main job: SophiaG against AdamW on a small character-level GPT.

``python -m sophia.demo`` (or the ``sophia-demo`` console script) trains the
same GPT with both optimizers on the source text of Python's standard library
and prints a comparison table; see :mod:`sophia.demo.__main__` for the flags.

Modules: :mod:`~sophia.demo.data` (corpus and batches),
:mod:`~sophia.demo.model` (shape, initial weights), :mod:`~sophia.demo.config`
(the run's settings and the presets), :mod:`~sophia.demo.schedule` (the
learning rate), :mod:`~sophia.demo.train` (the training loop every backend
shares), :mod:`~sophia.demo.backends` (finding a backend),
:mod:`~sophia.demo.compare` (the main job) and :mod:`~sophia.demo.sweep` (the
learning-rate sweep), with :mod:`~sophia.demo.report` (table, JSON),
:mod:`~sophia.demo.plot` (``loss.png``) and :mod:`~sophia.demo.machine` (the
host); and one backend per framework (:mod:`~sophia.demo.model_jax` with
:mod:`~sophia.demo.train_jax`, :mod:`~sophia.demo.model_torch` with
:mod:`~sophia.demo.train_torch`).
:mod:`~sophia.demo.notebook` executes the checkout's notebooks without a
Jupyter server (``./dev notebook NAME``).
"""

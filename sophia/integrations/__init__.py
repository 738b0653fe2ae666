"""SophiaG inside the training loops of other libraries.

Each submodule imports only its own framework, and this package imports none:

* :mod:`sophia.integrations.transformers`: Hugging Face ``Trainer`` (a callback
  that refreshes the Hessian from the training forward, and an optimizer
  builder that keeps SophiaG's hyperparameters).
* :mod:`sophia.integrations.lightning`: ``lightning.Trainer`` (a callback).
* :mod:`sophia.integrations.flax`: Flax NNX and linen.
"""

"""SophiaG for PyTorch: a ``torch.optim.Optimizer`` mirroring :mod:`sophia.spec`.

Example::

    from sophia.torch import SophiaG

    opt = SophiaG(model.parameters(), lr=3e-4, rho=0.03, bs=tokens_per_batch)
    logits = model(x)
    opt.update_hessian(logits=logits)  # every k steps; .grad is left untouched
    loss_fn(logits, y).backward()
    opt.step()
"""

from sophia.torch import functional
from sophia.torch.estimators import gnb, hutchinson, sample_labels, sampled_label_grads
from sophia.torch.functional import hessian_ema, sophia_g, sophiag
from sophia.torch.optimizer import SophiaG

__all__ = [
    "SophiaG",
    "functional",
    "gnb",
    "hessian_ema",
    "hutchinson",
    "sample_labels",
    "sampled_label_grads",
    "sophia_g",
    "sophiag",
]

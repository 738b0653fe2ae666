"""SophiaG for PyTorch: a ``torch.optim.Optimizer`` mirroring :mod:`sophia.spec`.

Example (the Hessian is refreshed at the start of every step ``t`` with
``t % k == 0``, after the forward and before the training backward)::

    from sophia.torch import SophiaG

    opt = SophiaG(model.parameters(), lr=3e-4, rho=0.03)
    for step, (x, y) in enumerate(loader):
        logits = model(x)
        if step % k == 0:
            # GNB from this forward (.grad untouched); bs follows its label count
            opt.update_hessian(logits=logits, mask=y != -100)
        loss_fn(logits, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
"""

from sophia.torch import functional
from sophia.torch._misuse import (
    HessianNotRefreshedWarning,
    LabelCountWarning,
    RepeatedRefreshWarning,
    SophiaGWarning,
)
from sophia.torch.estimators import gnb, hutchinson, sample_labels, sampled_label_grads
from sophia.torch.functional import hessian_ema, sophia_g
from sophia.torch.optimizer import SophiaG

__all__ = [
    "HessianNotRefreshedWarning",
    "LabelCountWarning",
    "RepeatedRefreshWarning",
    "SophiaG",
    "SophiaGWarning",
    "functional",
    "gnb",
    "hessian_ema",
    "hutchinson",
    "sample_labels",
    "sampled_label_grads",
    "sophia_g",
]

"""Generated problems for the cross-framework runs: NumPy float64 gradients and Hessian estimates.

Each problem gives initial parameters (a dict keyed by torch-style names),
``grad(params) -> grads`` and ``hhat(params, t) -> h_hat``, deterministic
functions of their inputs (randomness is seeded by ``t``), computed in float64
and cast to the parameters' dtype (estimates to the compute dtype).
"""

import numpy as np

from sophia import spec


def _cast(tree, like):
    return {k: np.asarray(v).astype(like[k].dtype) for k, v in tree.items()}


def _hcast(tree, like):
    return {k: np.asarray(v).astype(spec.compute_dtype(like[k].dtype)) for k, v in tree.items()}


def _f64(params):
    return {k: np.asarray(v, np.float64) for k, v in params.items()}


class LeastSquares:
    """0.5 * mean((A w + b - y)^2); Hutchinson estimates v * (H v), which can be negative."""

    def __init__(self, dtype=np.float32, n=32, d=5, seed=0):
        rng = np.random.default_rng(seed)
        self.A = rng.normal(size=(n, d))
        self.y = self.A @ rng.normal(size=d) + 0.5 + 0.1 * rng.normal(size=n)
        self.params0 = {
            "w": rng.normal(size=d).astype(dtype),
            "b": np.asarray(rng.normal()).astype(dtype),
        }

    def residual(self, p):
        p = _f64(p)
        return self.A @ p["w"] + p["b"] - self.y

    def loss(self, p):
        return 0.5 * float(np.mean(self.residual(p) ** 2))

    def grad(self, p):
        r = self.residual(p)
        return _cast({"w": self.A.T @ r / len(r), "b": np.mean(r)}, p)

    def hhat(self, p, t):
        rng = np.random.default_rng(1000 + t)
        n = len(self.y)
        vw = rng.choice([-1.0, 1.0], size=self.A.shape[1])
        vb = rng.choice([-1.0, 1.0])
        hw = self.A.T @ (self.A @ vw + vb) / n
        hb = np.mean(self.A @ vw) + vb
        return _hcast({"w": vw * hw, "b": vb * hb}, p)


class Logistic:
    """Binary logistic regression; ``maximize``: the log-likelihood is the objective.

    GNB estimates: labels sampled from the model (seeded by ``t``), the squared
    gradient of the mean cross-entropy against them.
    """

    def __init__(self, dtype=np.float32, n=64, d=4, seed=1, maximize=False):
        rng = np.random.default_rng(seed)
        self.X = rng.normal(size=(n, d))
        w_true = rng.normal(size=d) * 2
        self.y = (rng.uniform(size=n) < 1 / (1 + np.exp(-(self.X @ w_true)))).astype(np.float64)
        self.maximize = maximize
        self.params0 = {"w": np.zeros(d, dtype), "b": np.asarray(0.0, dtype)}

    def prob(self, p):
        p = _f64(p)
        return 1 / (1 + np.exp(-(self.X @ p["w"] + p["b"])))

    def loss(self, p):
        q = np.clip(self.prob(p), 1e-12, 1 - 1e-12)
        return float(-np.mean(self.y * np.log(q) + (1 - self.y) * np.log(1 - q)))

    def _grad(self, p, y):
        r = self.prob(p) - y
        return {"w": self.X.T @ r / len(r), "b": np.mean(r)}

    def grad(self, p):
        g = self._grad(p, self.y)
        if self.maximize:  # gradient of the log-likelihood
            g = {k: -v for k, v in g.items()}
        return _cast(g, p)

    def hhat(self, p, t):
        rng = np.random.default_rng(2000 + t)
        y_hat = (rng.uniform(size=len(self.y)) < self.prob(p)).astype(np.float64)
        return _hcast({k: v * v for k, v in self._grad(p, y_hat).items()}, p)


class MLP:
    """A 4-12-3 tanh MLP with softmax cross-entropy; GNB with labels sampled from the model."""

    def __init__(self, dtype=np.float32, n=48, seed=2):
        rng = np.random.default_rng(seed)
        self.X = rng.normal(size=(n, 4))
        centers = rng.normal(size=(3, 4)) * 1.5
        self.y = np.argmin(((self.X[:, None, :] - centers[None]) ** 2).sum(-1), axis=1)
        self.params0 = {
            "fc1.weight": (rng.normal(size=(12, 4)) * 0.5).astype(dtype),
            "fc1.bias": np.zeros(12, dtype),
            "fc2.weight": (rng.normal(size=(3, 12)) * 0.3).astype(dtype),
            "fc2.bias": np.zeros(3, dtype),
        }

    def forward(self, p):
        p = _f64(p)
        a = np.tanh(self.X @ p["fc1.weight"].T + p["fc1.bias"])
        z = a @ p["fc2.weight"].T + p["fc2.bias"]
        return a, z

    def probs(self, p):
        _, z = self.forward(p)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def loss(self, p):
        q = self.probs(p)
        return float(-np.mean(np.log(q[np.arange(len(self.y)), self.y])))

    def _grad(self, p, y):
        a, _ = self.forward(p)
        q = self.probs(p)
        n = len(y)
        dz = (q - np.eye(3)[y]) / n
        da = dz @ _f64(p)["fc2.weight"] * (1 - a * a)
        return {
            "fc1.weight": da.T @ self.X,
            "fc1.bias": da.sum(0),
            "fc2.weight": dz.T @ a,
            "fc2.bias": dz.sum(0),
        }

    def grad(self, p):
        return _cast(self._grad(p, self.y), p)

    def hhat(self, p, t):
        rng = np.random.default_rng(3000 + t)
        cdf = np.cumsum(self.probs(p), axis=1)
        u = rng.uniform(size=(len(self.y), 1))
        y_hat = np.minimum((u > cdf).sum(axis=1), 2)
        return _hcast({k: v * v for k, v in self._grad(p, y_hat).items()}, p)


def case(name):
    """(problem, groups, steps, k) of a named long run."""
    from tests.cross.drivers import group
    from tests.helpers import BF16

    if name == "least-squares":
        prob = LeastSquares()
        groups = [group(list(prob.params0), lr=0.01, rho=0.05, weight_decay=0.01, dynamic=True)]
        return prob, groups, 1000, 10
    if name == "logistic":  # no dynamic rho: what a built-in refresh is checked on
        prob = Logistic()
        groups = [group(list(prob.params0), lr=0.02, rho=0.04, weight_decay=0.1, bs=64.0)]
        return prob, groups, 300, 4
    if name == "logistic-maximize":
        prob = Logistic(maximize=True)
        groups = [
            group(list(prob.params0), lr=0.02, rho=0.04, weight_decay=0.1, bs=64.0, maximize=True)
        ]
        return prob, groups, 1000, 5
    if name == "mlp-groups":
        prob = MLP()
        groups = [
            group(["fc1.weight", "fc2.weight"], lr=0.02, rho=0.04, weight_decay=0.1, bs=48.0,
                  dynamic=True),
            group(["fc1.bias", "fc2.bias"], lr=0.01, b1=0.95, b2=0.98, rho=0.02, bs=48.0),
        ]  # fmt: skip
        return prob, groups, 300, 10
    if name == "least-squares-bf16":
        prob = LeastSquares(dtype=BF16)
        groups = [group(list(prob.params0), lr=0.01, rho=0.05, weight_decay=0.01, dynamic=True)]
        return prob, groups, 300, 10
    raise KeyError(name)

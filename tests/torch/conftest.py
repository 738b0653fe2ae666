import pytest
import torch
from torchref import path_env


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The tensors here are tiny: one intra-op thread avoids oversubscription on small CI boxes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _kernel_of_path(request):
    """A test parametrized over ``path`` runs in that path's environment (see torchref.path_env)."""
    callspec = getattr(request.node, "callspec", None)
    with path_env(callspec.params.get("path") if callspec else None):
        yield

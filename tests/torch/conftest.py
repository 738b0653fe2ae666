import pytest

from tests.torch.torchref import one_torch_thread, path_env


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(autouse=True)
def _kernel_of_path(request):
    """A test parametrized over ``path`` runs in that path's environment (see torchref.path_env)."""
    callspec = getattr(request.node, "callspec", None)
    with path_env(callspec.params.get("path") if callspec else None):
        yield

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Decode steps are many tiny matmuls: on a shared 2-core machine intra-op threads only spin against each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

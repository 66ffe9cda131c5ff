import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The models here are tiny: one thread avoids thread-pool contention on a busy 2-core runner."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)

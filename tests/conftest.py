import pytest
import torch

# One torch thread: on a shared 2-core machine two threads can make small ops 100x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

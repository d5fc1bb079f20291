"""Fixtures for every test (helpers to import live in helpers.py)."""

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The command-line tools set torch's thread count for their process; keep each test's change to itself."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def identity_image():
    rng = np.random.RandomState(0)
    return rng.randint(0, 256, size=(24, 20, 3), dtype=np.uint8)

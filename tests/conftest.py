"""Fixtures every test module gets."""

import pytest
import torch

from helpers import entropy_seed


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The tensors in the tests are small: intra-op threads only add synchronisation, which
    # costs seconds when the two cores of a CI machine are busy. Tests about the parallel split
    # set the thread count themselves. Restored after each module.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def fresh_seed():
    """Inputs are random and fresh every run; the seed is printed so a failure can be replayed
    (pytest shows a failing test's output)."""
    seed = entropy_seed()
    torch.manual_seed(seed)
    print(f"torch.manual_seed({seed})")
    return seed

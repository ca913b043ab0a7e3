"""Fixtures every test module gets, and the switch to the emulated CUDA kernels."""

import importlib.util
import os
import sys

import pytest
import torch


def _load_emulated_extension(path):
    # MCLOSS_EMULATED_EXTENSION names a build of tools/cuemu/build.py: it must become
    # mcloss_cuda._C before the package imports the installed one (tests/test_cuda_emulated.py
    # runs the kernel tests in child processes with it set).
    spec = importlib.util.spec_from_file_location("mcloss_cuda._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["mcloss_cuda._C"] = module


EMULATED_EXTENSION = os.environ.get("MCLOSS_EMULATED_EXTENSION")
if EMULATED_EXTENSION:
    assert "mcloss_cuda" not in sys.modules, "mcloss_cuda was imported before the emulated build"
    _load_emulated_extension(EMULATED_EXTENSION)

from helpers import entropy_seed  # noqa: E402  (imports mcloss_cuda)


def pytest_sessionfinish(session):
    # the kernels the emulated run launched, for the parent to check that every one ran
    log = os.environ.get("MCLOSS_EMULATED_LAUNCH_LOG")
    if EMULATED_EXTENSION and log:
        with open(log, "w") as f:
            f.write(torch.ops.mcloss_cuemu.launch_counts())


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

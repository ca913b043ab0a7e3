"""The build itself: the extension is there when it should be, and CUDA sources that were
compiled registered a CUDA kernel for every op."""

import os

import pytest
import torch

import mcloss_cuda as mc
from mcloss_cuda import _ops


def test_expected_backend_is_active():
    """CI sets MCLOSS_EXPECT_BACKEND so that a broken build cannot pass as a reference run."""
    expected = os.environ.get("MCLOSS_EXPECT_BACKEND")
    if expected is None:
        pytest.skip("MCLOSS_EXPECT_BACKEND not set (CI sets it)")
    assert mc.backend("cpu") == expected, f"extension load error: {_ops.LOAD_ERROR!r}"


def test_cuda_build_when_asked():
    if os.environ.get("MCLOSS_BUILD", "").lower() != "cuda":
        pytest.skip("MCLOSS_BUILD=cuda not set")
    assert mc.built_with_cuda()


@pytest.mark.parametrize("op", _ops.KERNEL_OPS)
def test_every_op_has_cpu_and_cuda_kernels(op):
    if not _ops.AVAILABLE:
        pytest.skip(f"extension not built: {_ops.LOAD_ERROR!r}")
    assert _ops.has_kernel(op, "CPU")
    if mc.built_with_cuda():
        assert _ops.has_kernel(op, "CUDA"), f"{op}: CUDA sources compiled but no CUDA kernel"


def test_every_forward_op_has_its_own_autograd():
    # the loss op's autograd node is C++'s (csrc/autograd): a training step runs no Python for
    # it; every other op either is a backward op or has a C++ autograd formula as well
    if not _ops.AVAILABLE:
        pytest.skip(f"extension not built: {_ops.LOAD_ERROR!r}")
    assert set(_ops.OP_NAMES) == set(_ops.KERNEL_OPS)
    for op in ("spatial_softmax", "channel_mask", "ccmp", "mc_loss"):
        assert _ops.has_kernel(op, "Autograd"), op
    assert not _ops.has_kernel("mc_loss", "CompositeExplicitAutograd")


def test_backend_names():
    assert mc.backend("cpu") in ("cpu", "reference")
    assert mc.backend(torch.device("meta")) == "reference"
    if torch.cuda.is_available() and mc.built_with_cuda():
        assert mc.backend("cuda") == "cuda"

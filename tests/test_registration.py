"""What the extension registers with the dispatcher: every op, a CPU kernel for each and a CUDA
kernel exactly when it was built with CUDA, the loss op's autograd in C++, and opcheck samples
(tests/test_opcheck.py) for every op it registers.

No kernel runs and no GPU is needed: the dispatcher knows the registrations without a device.
"""

import os

import pytest
import torch

import mcloss_cuda as mc
from helpers import DEVICES, fused_only

# the ops test_opcheck.py builds samples for, written out there: the tests' one list of the
# ops, against which the package's own (mc._ops.KERNEL_OPS) and the dispatcher's are checked
from test_opcheck import OP_NAMES as KERNEL_OPS


@pytest.mark.skipif(not mc._ops.AVAILABLE, reason="extension not built")
def test_cuda_build_registers_cuda_kernels_for_every_op():
    # Runs without a GPU: the dispatcher knows the registrations without a device.
    for op in KERNEL_OPS:
        name = f"mcloss_cuda::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
        assert has_cuda == mc.built_with_cuda(), (
            f"{name}: built_with_cuda()={mc.built_with_cuda()} but CUDA kernel registered: "
            f"{has_cuda}"
        )
    assert sorted(KERNEL_OPS) == sorted(mc._ops.KERNEL_OPS)
    # the loss op's autograd is C++'s, at the Autograd key (no Python in a training step)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mcloss_cuda::mc_loss", "Autograd")
    if os.environ.get("MCLOSS_BACKEND", "").strip().lower() != "reference":
        assert mc.backend("cuda") == ("cuda" if mc.built_with_cuda() else "reference")
        assert mc.backend("cpu") == "cpu"


@pytest.mark.skipif(not mc._ops.AVAILABLE, reason="extension not built")
def test_every_op_is_registered():
    for op in mc._ops.OP_NAMES:
        assert hasattr(torch.ops.mcloss_cuda, op), op


@fused_only
@pytest.mark.skipif(not mc._ops.AVAILABLE, reason="extension not built")
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_covers_every_op(device):
    # every op the extension registers has opcheck samples (a new op must get samples)
    registered = {
        name.split("::")[1].split(".")[0]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("mcloss_cuda::")
    }
    assert registered == set(KERNEL_OPS), registered
    assert set(mc._ops.OP_NAMES) == set(KERNEL_OPS)

"""Maps past 2^31 elements on a GPU: 64-bit indexing in every CUDA kernel.

B=1040, C=2048, 32x32 in bfloat16 is 2.18e9 elements (4.4 GB); the last samples start past
element 2^31, where a 32-bit index would wrap. The ops run on the whole tensor and their
results for the last samples are compared with the same ops on just those samples (a small
tensor, where indices are small) and with the reference. Skipped without a GPU with room for
the features, their gradient and a softmax output (about 14 GB).
"""

import pytest
import torch

import mcloss_cuda as mc
from helpers import HAS_CUDA

B, C, H, W, K = 1040, 2048, 32, 32, 200
NEEDED_BYTES = 3 * B * C * H * W * 2 + (1 << 30)


def has_room():
    if not HAS_CUDA or mc.backend("cuda") != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info()
    return free >= NEEDED_BYTES


pytestmark = pytest.mark.skipif(not has_room(), reason="needs a CUDA GPU with ~14 GB free")


def test_past_int32_indexing():
    assert B * C * H * W > 2 ** 31
    ops = torch.ops.mcloss_cuda
    counts = [C // K + (i < C % K) for i in range(K)]
    offsets = torch.tensor([0] + counts, device="cuda").cumsum(0)
    x = torch.randn(B, C, H, W, device="cuda", dtype=torch.bfloat16)
    mask = mc.random_channel_mask(K, counts, batch=B, device="cuda").to(x.dtype)
    tail = slice(B - 2, B)                       # samples that start past element 2^31
    x_tail, mask_tail = x[tail].contiguous(), mask[tail].contiguous()

    h, logits = ops.mc_loss_forward(x, offsets, mask)
    h_tail, logits_tail = ops.mc_loss_forward(x_tail, offsets, mask_tail)
    assert torch.equal(h[tail], h_tail) and torch.equal(logits[tail], logits_tail)
    ref = mc.reference.discriminality_logits(x_tail.float(), K, mask_tail.bool(), counts)
    torch.testing.assert_close(logits_tail, ref, rtol=1e-5, atol=1e-5)

    grad = torch.zeros(B, K, device="cuda")
    grad[tail] = torch.randn(2, K, device="cuda")
    dx = ops.mc_loss_backward(grad, grad, x, offsets, mask)
    dx_tail = ops.mc_loss_backward(grad[tail].contiguous(), grad[tail].contiguous(), x_tail,
                                   offsets, mask_tail)
    assert torch.equal(dx[tail], dx_tail)
    del dx

    p = ops.spatial_softmax(x)
    assert torch.equal(p[tail], ops.spatial_softmax(x_tail))
    del p
    z = ops.ccmp(x, offsets)
    assert torch.equal(z[tail], ops.ccmp(x_tail, offsets))

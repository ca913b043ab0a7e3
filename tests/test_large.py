"""Maps past 2^31 elements on a GPU: 64-bit indexing in every CUDA kernel.

B=1040, C=2048, 32x32 in bfloat16 is 2.18e9 elements (4.4 GB); the last samples start past
element 2^31, where a 32-bit index would wrap. The ops run on the whole tensor and their
results for the last samples (logits, lse, a mask drawn per sample, dx, softmax, ccmp) are
compared with the same ops on just those samples (a small tensor, where indices are small) and
with the reference. Skipped without a GPU with room for
the features, their gradient and a softmax output (about 14 GB).
"""

import pytest
import torch

import mcloss_cuda as mc
from helpers import HAS_CUDA, counts_of, offsets_of

B, C, H, W, K = 1040, 2048, 32, 32, 200
NEEDED_BYTES = 3 * B * C * H * W * 2 + (1 << 30)


def has_room():
    if not HAS_CUDA or mc.backend("cuda") != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info()
    return free >= NEEDED_BYTES


pytestmark = pytest.mark.skipif(not has_room(), reason="needs a CUDA GPU with ~14 GB free")


def test_past_int32_indexing():
    assert B * C * H * W > 2**31
    ops = torch.ops.mcloss_cuda
    counts = counts_of(K, None, C)
    offsets = offsets_of(counts, "cuda")
    max_group = max(counts)
    x = torch.randn(B, C, H, W, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, K, (B,), device="cuda")
    mask = mc.random_channel_mask(K, counts, batch=B, device="cuda")
    tail = slice(B - 2, B)  # samples that start past element 2^31
    x_tail, y_tail, mask_tail = x[tail].contiguous(), y[tail].contiguous(), mask[tail].contiguous()

    def forward(x, y, mask, **kw):
        args = dict(drop=-1, drop_fraction=0.5, per_sample_mask=False, generator=None)
        args.update(kw)
        return ops.mc_loss(
            x,
            y,
            offsets,
            max_group,
            mask,
            args["drop"],
            args["drop_fraction"],
            args["per_sample_mask"],
            args["generator"],
            1.5,
            20.0,
        )

    # the per-sample outputs (logits, lse) of the last samples, computed among all B and alone
    out = forward(x, y, mask)
    out_tail = forward(x_tail, y_tail, mask_tail)
    assert torch.equal(out[3][tail], out_tail[3]) and torch.equal(out[4][tail], out_tail[4])
    ref = mc.reference.discriminality_logits(x_tail.float(), K, mask_tail, counts)
    torch.testing.assert_close(out_tail[3], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        out[1], torch.nn.functional.cross_entropy(out[3], y), rtol=1e-5, atol=1e-5
    )

    # a per-sample mask drawn inside: the rows past 2^31 elements are the mask they used
    gen = torch.Generator(device="cuda").manual_seed(12345)
    drawn_out = forward(x, y, None, per_sample_mask=True, generator=gen)
    drawn = drawn_out[5]
    assert drawn.shape == (B, C) and drawn.dtype == torch.bool
    assert ((~drawn).sum(1) == sum(n // 2 for n in counts)).all()
    again = forward(x_tail, y_tail, drawn[tail].contiguous())
    assert torch.equal(drawn_out[3][tail], again[3])

    # dx: the logits' gradient of the last samples only, bit for bit as alone (no batch
    # factor in it); then the diversity term's, whose 1 / (B K n_i) scales with B
    grad = torch.zeros(B, K, device="cuda")
    grad[tail] = torch.randn(2, K, device="cuda")
    dx = ops.mc_loss_backward(
        None, None, None, grad, x, y, offsets, max_group, mask, out[3], out[4], 1.5, 20.0
    )
    dx_tail = ops.mc_loss_backward(
        None,
        None,
        None,
        grad[tail].contiguous(),
        x_tail,
        y_tail,
        offsets,
        max_group,
        mask_tail,
        out_tail[3],
        out_tail[4],
        1.5,
        20.0,
    )
    assert torch.equal(dx[tail], dx_tail)
    del dx
    g_div = torch.ones((), device="cuda")
    dx = ops.mc_loss_backward(
        None, None, g_div, None, x, y, offsets, max_group, mask, out[3], out[4], 1.5, 20.0
    )
    dx_tail = ops.mc_loss_backward(
        None,
        None,
        g_div * (2 / B),
        None,
        x_tail,
        y_tail,
        offsets,
        max_group,
        mask_tail,
        out_tail[3],
        out_tail[4],
        1.5,
        20.0,
    )
    torch.testing.assert_close(
        dx[tail].float(), dx_tail.float(), rtol=2e-2, atol=1e-2 * dx_tail.float().abs().max().item()
    )
    del dx

    p = ops.spatial_softmax(x)
    assert torch.equal(p[tail], ops.spatial_softmax(x_tail))
    del p
    z = ops.ccmp(x, offsets)
    assert torch.equal(z[tail], ops.ccmp(x_tail, offsets))

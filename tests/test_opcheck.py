"""torch.library.opcheck on every op of ``torch.ops.mcloss_cuda``: schema (no undeclared
mutation or aliasing), the autograd registration, the fake (meta) implementations against the
real kernels (shapes, dtypes, strides: channels_last included), and AOT dispatch with dynamic
shapes, on valid sample inputs of every dtype, both memory layouts, uniform and uneven groups,
shared (C,) and per-sample (B, C) masks. Forward ops also run with requires_grad inputs so that
their backward (one of our backward ops) goes through the checks.

Random inputs are fresh every run (seed printed).
"""


import pytest
import torch

import mcloss_cuda as mc
from helpers import DEVICES, fused_only

pytestmark = [fused_only,
              pytest.mark.skipif(not mc._ops.AVAILABLE, reason="extension not built")]

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
OP_NAMES = ("spatial_softmax", "spatial_softmax_backward", "channel_mask", "ccmp",
            "ccmp_backward", "mc_loss_forward", "mc_loss_backward", "mc_loss_tail",
            "mc_loss_tail_backward", "mc_loss")
FORWARD_OPS = ("spatial_softmax", "channel_mask", "ccmp", "mc_loss_forward", "mc_loss")


# (B, counts, H, W)
SHAPES = {
    "uniform": (2, (3, 3), 3, 4),
    "uneven": (3, (1, 4, 2), 2, 5),
    "one_group_1x1": (2, (3,), 1, 1),
    "cnum1_row": (1, (1, 1, 1), 1, 6),
}


def offsets_of(counts, device):
    return torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int64,
                        device=device)


def features(B, counts, H, W, dtype, device, channels_last):
    x = torch.randn(B, sum(counts), H, W, dtype=F64).to(dtype=dtype, device=device)
    # spread the channels of a group apart so the per-position winners have no near-ties
    x = x + torch.arange(sum(counts), device=device).view(1, -1, 1, 1).to(dtype) * 0.25
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def mask_for(B, C, dtype, device, per_sample):
    shape = (B, C) if per_sample else (C,)
    return (torch.rand(shape, device=device) < 0.5).to(dtype)


def samples(op, device, dtype, shape, channels_last, per_sample, requires_grad):
    """Sample args for ``op``; forward ops get requires_grad features when asked."""
    B, counts, H, W = SHAPES[shape]
    C, K = sum(counts), len(counts)
    acc = F64 if dtype == F64 else F32
    x = features(B, counts, H, W, dtype, device, channels_last)
    off = offsets_of(counts, device)
    mask = mask_for(B, C, dtype, device, per_sample)
    if op in FORWARD_OPS and requires_grad:
        x = x.detach().requires_grad_()
    like_x = torch.randn(x.shape, device=device).to(dtype)
    if channels_last:
        like_x = like_x.contiguous(memory_format=torch.channels_last)
    return {
        "spatial_softmax": (x,),
        "spatial_softmax_backward": (like_x, torch.softmax(x.detach().float().flatten(2), -1)
                                     .view(x.shape).to(dtype)
                                     .contiguous(memory_format=torch.channels_last
                                                 if channels_last else torch.contiguous_format)),
        "channel_mask": (x, mask),
        "ccmp": (x, off),
        "ccmp_backward": (torch.randn(B, K, H, W, device=device).to(dtype), x, off),
        "mc_loss_forward": (x, off, mask),
        "mc_loss_backward": (torch.randn(B, K, device=device, dtype=acc),
                             torch.randn(B, K, device=device, dtype=acc), x, off, mask),
        "mc_loss_tail": (torch.rand(B, K, device=device, dtype=acc),
                         torch.randn(B, K, device=device, dtype=acc),
                         torch.randint(0, K, (B,), device=device), off,
                         float(torch.rand(()) + 0.5), float(torch.rand(()) * 20)),
        "mc_loss_tail_backward": (*(torch.randn((), device=device, dtype=acc) for _ in range(3)),
                                  torch.randn(B, K, device=device, dtype=acc),
                                  torch.randn(B, K, device=device, dtype=acc),
                                  torch.randn(B, 2, device=device, dtype=acc).abs() + 2,
                                  torch.randint(0, K, (B,), device=device), off,
                                  float(torch.rand(()) + 0.5), float(torch.rand(()) * 20)),
        "mc_loss": (x, torch.randint(0, K, (B,), device=device), off, mask,
                    float(torch.rand(()) + 0.5), float(torch.rand(()) * 20)),
    }[op]


# (dtype, shape, channels_last) per op: every dtype, both layouts, uniform, uneven, 1x1 and
# cnum = 1 groups; the mask alternates between (C,) and (B, C) along the list
COMBOS = [(F32, "uniform", False), (F32, "uniform", True), (F32, "uneven", False),
          (F32, "uneven", True), (F32, "one_group_1x1", True), (F32, "cnum1_row", False),
          (F64, "uneven", True), (F64, "uniform", False), (F16, "uniform", True),
          (BF16, "uneven", False)]


def cases():
    out = []
    for device in DEVICES:
        for op in OP_NAMES:
            for i, (dtype, shape, cl) in enumerate(COMBOS):
                per_sample = i % 2 == 1
                # forward ops get requires_grad features in fp32/fp64, so that opcheck's
                # autograd and aot_dispatch checks run their registered backward
                rg = op in FORWARD_OPS and dtype in (F32, F64)
                out.append(pytest.param(
                    op, device, dtype, shape, cl, per_sample, rg,
                    id=f"{op}-{device}-{str(dtype)[6:]}-{shape}-"
                       f"{'cl' if cl else 'contig'}-{'bc' if per_sample else 'c'}"
                       f"{'-grad' if rg else ''}"))
    return out


@pytest.mark.parametrize("op, device, dtype, shape, channels_last, per_sample, requires_grad",
                         cases())
def test_opcheck(op, device, dtype, shape, channels_last, per_sample, requires_grad):
    assert mc.backend(device) != "reference"
    args = samples(op, device, dtype, shape, channels_last, per_sample, requires_grad)
    result = torch.library.opcheck(getattr(torch.ops.mcloss_cuda, op), args)
    assert result, result
    assert all(v == "SUCCESS" for v in result.values()), result
    # the requires_grad samples really carry a gradient through the registered backward
    if requires_grad:
        out = getattr(torch.ops.mcloss_cuda, op)(*args)
        outs = out if isinstance(out, tuple) else (out,)
        assert all(o.requires_grad for o in outs)
        (dx,) = torch.autograd.grad(sum(o.float().sum() for o in outs), args[0])
        assert dx.shape == args[0].shape and dx.dtype == args[0].dtype


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_covers_every_op(device):
    # every op the extension registers appears above (a new op must get samples)
    registered = {name.split("::")[1].split(".")[0]
                  for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("mcloss_cuda::")}
    assert registered == set(OP_NAMES), registered
    assert set(mc._ops.OP_NAMES) == set(OP_NAMES)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32, F16])
def test_fake_strides_follow_channels_last(device, dtype):
    # what opcheck compares, stated directly: outputs shaped like x keep its memory format
    from torch._subclasses.fake_tensor import FakeTensorMode

    B, counts, H, W = SHAPES["uneven"]
    x = features(B, counts, H, W, dtype, device, channels_last=True)
    off = offsets_of(counts, device)
    real = torch.ops.mcloss_cuda.ccmp(x, off)
    with FakeTensorMode() as mode:
        fx, foff = mode.from_tensor(x), mode.from_tensor(off)
        fake = torch.ops.mcloss_cuda.ccmp(fx, foff)
        fake_p = torch.ops.mcloss_cuda.spatial_softmax(fx)
    assert fake.shape == real.shape and fake.stride() == real.stride()
    assert real.is_contiguous(memory_format=torch.channels_last)
    assert fake_p.stride() == torch.ops.mcloss_cuda.spatial_softmax(x).stride() == x.stride()

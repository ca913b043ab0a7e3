"""Cases for the CUDA kernels that the CPU kernel tests cannot reach, run only by the emulated
build (tests/test_cuda_emulated.py starts pytest on this file, with the emulated extension
standing in for the CPU kernels; the file name keeps it out of a plain ``pytest`` run).

- Direct op calls with offsets that do not partition [0, C), or with a group larger than
  ``max_group``: the CUDA host wrappers cannot read the values without a device sync, so the
  kernels check them and write NaN to every output element (loss, dis, div, logits, lse; dx),
  the same on every call (the CPU ops raise instead).
- An out-of-range target in a direct ``mc_loss`` / ``mc_loss_backward`` call: the kernel traps
  (a launch failure on a GPU; here the launch throws, a RuntimeError naming ``__trap``), and the
  next call works.
- The (B, K) tail over more rows (700) and more groups (900) than its block has threads; more
  groups than one block has warps.
- The tile kernels with several small groups per tile, and the stream kernels for a group too
  large for a tile (which kernels ran: the launch counter), near the tile limit too.
- Uneven groups, maps whose H*W is not a multiple of 4, features, masks, targets and the
  backward's inputs at addresses that are not 16-byte aligned, channels_last, per-sample, bool
  and float masks (0/1 and other values): all against ``mcloss_cuda.reference`` with the same
  explicit mask, forward (the seven outputs, lse from the reference's logits) and backward (dx for
  upstream gradients with some of them None, against autograd through the reference).
- The mask drawn inside the kernels (mask=None): exactly d_i channels dropped per row and group
  (floor(n_i / 2) by default, drop=1, drop_fraction=0.25, clamped), bitwise the same outputs for
  the same generator state, another mask for another seed, the results of an explicit call with
  drawn_mask, and the same mask as the CPU build draws from the same CPU generator state.
- NaN and Inf in the features: NaN where the reference has NaN, the same values elsewhere.
- What a training step launches: three kernels with the mask drawn inside.

Inputs are random and fresh on every run (the seed is printed).
"""

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import mcloss_cuda as mc
from helpers import (
    VALUE_TOL,
    assert_grad_close,
    entropy_seed,
    offsets_of,
    random_features,
    random_targets,
    separated_features,
)

if not os.environ.get("MCLOSS_EMULATED_EXTENSION"):
    raise RuntimeError(
        "tests/cuda_emulated_cases.py runs under the emulated CUDA build only: "
        "run pytest tests/test_cuda_emulated.py"
    )

ops = torch.ops.mcloss_cuda
emu = torch.ops.mcloss_cuemu
R = mc.reference
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

B, K, N, H, W = 3, 4, 3, 5, 7
C = K * N

# (name, offsets) that are not a partition of [0, 12) into 4 non-empty groups
BAD_OFFSETS = [
    ("end-short", [0, 3, 6, 9, 11]),  # channel 11 outside every group
    ("end-past-C", [0, 3, 6, 9, 13]),
    ("start", [1, 3, 6, 9, 12]),  # channel 0 outside every group
    ("empty-group", [0, 3, 3, 9, 12]),
    ("overlap", [0, 6, 3, 9, 12]),  # channels 3-5 in two groups, group 1 reversed
    ("negative", [0, -5, 6, 9, 12]),
    ("huge", [0, 2**40, 6, 9, 12]),
    ("int64-min", [0, -(2**63), 6, 9, 12]),
]


def acc_of(dtype):
    return F64 if dtype == F64 else F32


def fwd(
    x,
    y,
    counts,
    mask,
    alpha=1.5,
    beta=20.0,
    drop=-1,
    drop_fraction=0.5,
    per_sample=False,
    generator=None,
    max_group=None,
    offsets=None,
):
    """ops.mc_loss: (loss, dis, div, logits, lse, drawn_mask, weight_sums)."""
    return ops.mc_loss(
        x,
        y,
        offsets_of(counts) if offsets is None else offsets,
        max(counts) if max_group is None else max_group,
        mask,
        drop,
        drop_fraction,
        per_sample,
        generator,
        alpha,
        beta,
    )


def bwd(grads, x, y, counts, mask, logits, lse, alpha=1.5, beta=20.0, max_group=None, offsets=None):
    return ops.mc_loss_backward(
        *grads,
        x,
        y,
        offsets_of(counts) if offsets is None else offsets,
        max(counts) if max_group is None else max_group,
        mask,
        logits,
        lse,
        alpha,
        beta,
    )


def lse_of(logits):
    """Every row's max and log(sum(exp(logit - max))), what mc_loss's lse holds."""
    m = logits.amax(-1)
    return torch.stack([m, (logits - m[:, None]).exp().sum(-1).log()], -1)


def grad_patterns(rows, classes, dtype):
    """Upstream gradients (loss, dis, div, logits), all given and with some None."""
    acc = acc_of(dtype)
    s = lambda: torch.randn((), dtype=acc)  # noqa: E731
    g = lambda: torch.randn(rows, classes, dtype=acc)  # noqa: E731
    return [
        (s(), s(), s(), g()),
        (s(), None, None, None),
        (None, s(), s(), None),
        (None, None, None, g()),
        (None, None, None, None),
    ]


def weighted_sum(out, grads):
    total = None
    for g, t in zip(grads[:3], out[:3]):
        if g is not None:
            total = g.to(t) * t if total is None else total + g.to(t) * t
    if grads[3] is not None:
        t = (grads[3].to(out[3]) * out[3]).sum()
        total = t if total is None else total + t
    return total


def assert_values(actual, expected, HW=1, coeff=1.0, equal_nan=False):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    rtol, atol = VALUE_TOL[expected.dtype if expected.dtype == F64 else F32]
    atol = atol * max(1.0, (HW / 64) ** 0.5) * max(1.0, coeff)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=equal_nan)


def grad_terms(x, counts, grads, alpha, beta):
    """The size of the terms dx is made of (test_kernels.mc_terms for a weighted sum)."""
    gl, gd, gv, gg = (0.0 if g is None else g.abs().max().item() for g in grads)
    a = gl * abs(alpha) + gd + x.shape[0] * gg
    b = gl * abs(beta) + gv
    Bx, HW = x.shape[0], x.shape[2] * x.shape[3]
    pmax = torch.softmax(x.detach().double().flatten(2), -1).max().item()
    return b * pmax / (Bx * len(counts) * min(counts)) + a / (Bx * HW)


def memory_format_of(x):
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def check_against_reference(
    x, y, counts, mask, alpha=1.5, beta=20.0, bwd_too=True, grads_list=None, **kw
):
    """ops.mc_loss's outputs and mc_loss_backward's dx for several upstream gradients against
    autograd through the reference with the same mask. Returns the op's forward outputs."""
    xd = x.detach()
    HW = x.shape[2] * x.shape[3]
    out = fwd(xd, y, counts, mask, alpha, beta, **kw)
    xr = xd.clone().requires_grad_()
    ref = R.mc_loss(xr, y, len(counts), list(counts), mask=mask, alpha=alpha, beta=beta)
    for a, b in zip(out[:4], ref):
        assert_values(a, b, HW=HW, coeff=abs(alpha) + abs(beta))
    assert_values(out[4], lse_of(ref.logits.detach()), HW=HW)
    assert torch.equal(out[4][:, 0], out[3].amax(-1))
    assert out[5].dtype == torch.bool and out[5].shape == (0,)
    if not bwd_too:
        return out
    for grads in grads_list or grad_patterns(x.shape[0], len(counts), x.dtype):
        dx = bwd(
            grads,
            xd,
            y,
            counts,
            mask,
            out[3],
            out[4],
            alpha,
            beta,
            kw.get("max_group"),
            kw.get("offsets"),
        )
        assert dx.shape == x.shape and dx.dtype == x.dtype
        assert dx.is_contiguous(memory_format=memory_format_of(x)), (dx.stride(), x.stride())
        total = weighted_sum(ref, grads)
        if total is None:
            assert (dx == 0).all()
            continue
        (dx_ref,) = torch.autograd.grad(total, xr, retain_graph=True)
        assert_grad_close(dx, dx_ref, grad_terms(x, counts, grads, alpha, beta))
    return out


def features(rows, counts, h, w, dtype=F32, channels_last=False):
    """Near-tie-free features (separated_features), the values within about +-20; randn for
    1x1 maps (every probability is 1 there, and raw maxima of randn do not tie)."""
    if h * w < max(counts):
        assert h * w == 1
        return random_features(rows, sum(counts), h, w, dtype=dtype, channels_last=channels_last)
    scale = 1.0 if h * w <= 320 else 320.0 / (h * w)
    return separated_features(
        rows, list(counts), h, w, dtype=dtype, scale=scale, channels_last=channels_last
    )


def launch_counts():
    counts = {}
    for line in emu.launch_counts().splitlines():
        name, n = line.split()
        counts[name] = int(n)
    return counts


def launches(fn):
    """The kernels ``fn`` launches, with how many times each."""
    before = launch_counts()
    fn()
    return {k: n - before.get(k, 0) for k, n in launch_counts().items() if n != before.get(k, 0)}


TILE = {"mc_loss_tile_forward_kernel", "mc_loss_tile_backward_kernel"}
STREAM = {"mc_loss_stream_forward_kernel", "mc_loss_stream_backward_kernel"}
LOSS_KERNELS = TILE | STREAM | {"mc_loss_tail_kernel"}


# ----------------------------------------------------------------------------------------------
# values the host wrappers cannot check: offsets, max_group, targets


def op_calls(x, mask, dtype, max_group=N):
    """Every op that takes offsets, as (name, function of the offsets returning its outputs as
    a tuple). The loss ops with the mask given (x's dtype, bool) and drawn inside, and the
    backward with every gradient and with some None."""
    acc = acc_of(dtype)
    gK = torch.randn(B, K, dtype=acc)
    g0 = torch.randn((), dtype=acc)
    gKHW = torch.randn(B, K, H, W, dtype=dtype)
    y = random_targets(B, K)
    valid = torch.arange(0, C + 1, N)
    good = ops.mc_loss(x, y, valid, N, mask, -1, 0.5, False, None, 1.5, 20.0)
    logits, lse = good[3], good[4]

    def loss(o, m=mask, per_sample=False):
        return ops.mc_loss(x, y, o, max_group, m, -1, 0.5, per_sample, None, 1.5, 20.0)[:5]

    def loss_backward(o, grads):
        return (ops.mc_loss_backward(*grads, x, y, o, max_group, mask, logits, lse, 1.5, 20.0),)

    return [
        ("ccmp", lambda o: (ops.ccmp(x, o),)),
        ("ccmp_backward", lambda o: (ops.ccmp_backward(gKHW, x, o),)),
        ("mc_loss", loss),
        ("mc_loss bool mask", lambda o: loss(o, m=mask.bool())),
        ("mc_loss drawn", lambda o: loss(o, m=None, per_sample=True)),
        ("mc_loss drawn shared", lambda o: loss(o, m=None)),
        ("mc_loss_backward", lambda o: loss_backward(o, (g0, g0, g0, gK))),
        ("mc_loss_backward some None", lambda o: loss_backward(o, (None, None, g0, gK))),
    ]


def assert_nan_everywhere(op, outputs):
    for i, out in enumerate(outputs):
        assert out.numel() > 0, f"{op} output {i} is empty"
        assert out.isnan().all(), f"{op} output {i}: {(~out.isnan()).sum()} elements not NaN"


@pytest.mark.parametrize("dtype", [F32, F64, BF16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name, values", BAD_OFFSETS, ids=[n for n, _ in BAD_OFFSETS])
def test_offsets_not_a_partition_give_nan_everywhere(dtype, channels_last, name, values):
    x = random_features(B, C, H, W, dtype=dtype, channels_last=channels_last)
    mask = (torch.rand(C) < 0.5).to(dtype)
    valid = torch.arange(0, C + 1, N)
    offsets = torch.tensor(values, dtype=torch.int64)
    for op, call in op_calls(x, mask, dtype):
        # The same op with valid offsets first: its finite outputs, just freed, are the blocks
        # the allocator hands the bad call's outputs, so an element it fails to write stays
        # finite.
        assert all(out.isfinite().all() for out in call(valid)), op
        assert_nan_everywhere(op, call(offsets))
        assert_nan_everywhere(op + " (again)", call(offsets))


@pytest.mark.parametrize("dtype", [F32, F64, BF16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_larger_than_max_group_gives_nan_everywhere(dtype, channels_last):
    # max_group sized the tiles: a larger group must not be read past them
    x = random_features(B, C, H, W, dtype=dtype, channels_last=channels_last)
    mask = (torch.rand(C) < 0.5).to(dtype)
    valid = torch.arange(0, C + 1, N)
    uneven = torch.tensor([0, 1, 5, 7, 12])  # groups of 1, 4, 2, 5
    for offsets, small in ((valid, N - 1), (uneven, 4), (uneven, 1)):
        for op, call in op_calls(x, mask, dtype, max_group=small):
            if op.startswith("ccmp"):
                continue  # no max_group
            assert_nan_everywhere(f"{op}, max_group={small}", call(offsets))
    # the same calls with a max_group that covers the groups give numbers
    for op, call in op_calls(x, mask, dtype, max_group=5):
        assert all(out.isfinite().all() for out in call(uneven)), op


def test_valid_uneven_offsets_still_give_numbers():
    # the partition check must not refuse the offsets the API builds for uneven groups, nor a
    # max_group above the largest group
    x = random_features(B, C, H, W)
    mask = (torch.rand(C) < 0.5).float()
    for max_group in (5, 6, C):
        for op, call in op_calls(x, mask, F32, max_group=max_group):
            for out in call(torch.tensor([0, 1, 5, 7, 12])):
                assert out.isfinite().all(), (op, max_group)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("bad", [-1, "K", 2**40, -(2**63)])
@pytest.mark.parametrize("drawn", [False, True], ids=["mask", "drawn"])
def test_out_of_range_target_traps(dtype, bad, drawn):
    rows, counts = 6, [3, 2, 3, 1, 3]
    classes = len(counts)
    x = features(rows, counts, 4, 4, dtype).detach()
    mask = None if drawn else torch.rand(rows, sum(counts)) < 0.5
    y = random_targets(rows, classes)
    good = fwd(x, y, counts, mask, per_sample=True)
    y_bad = y.clone()
    y_bad[2] = classes if bad == "K" else bad
    with pytest.raises(RuntimeError, match="__trap"):
        fwd(x, y_bad, counts, mask, per_sample=True)
    # through autograd too: the forward traps, nothing is recorded
    with pytest.raises(RuntimeError, match="__trap"):
        fwd(x.clone().requires_grad_(), y_bad, counts, mask, per_sample=True)
    # the backward reads the targets as well (the gradient of the cross-entropy)
    used = good[5] if drawn else mask
    g = grad_patterns(rows, classes, dtype)[0]
    with pytest.raises(RuntimeError, match="__trap"):
        bwd(g, x, y_bad, counts, used, good[3], good[4])
    # and the next calls work
    again = fwd(x, y, counts, used)
    for a, b in zip(good[:5], again[:5]):
        assert torch.equal(a, b)
    assert bwd(g, x, y, counts, used, good[3], good[4]).isfinite().all()


# ----------------------------------------------------------------------------------------------
# the tail and the grid: more rows, groups and blocks than one block has threads


@pytest.mark.parametrize("dtype", [F32, F64])
def test_tail_over_more_rows_than_one_block_has_threads(dtype):
    # the forward tail runs in one block: 700 rows is almost three per thread of 256
    rows, counts = 700, [3] * 7
    x = features(rows, counts, 2, 2, dtype)
    y = random_targets(rows, len(counts))
    mask = torch.rand(sum(counts)) < 0.5
    check_against_reference(x, y, counts, mask, 0.5, 3.0)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_tail_over_more_groups_than_one_block_has_threads(dtype):
    # 900 classes: every row's max and log-sum-exp over more logits than the tail has threads
    rows, counts = 3, [1, 2, 1] * 300
    x = features(rows, counts, 2, 1, dtype)
    y = random_targets(rows, len(counts))
    mask = torch.rand(rows, sum(counts)) < 0.5
    check_against_reference(x, y, counts, mask, 1.5, 20.0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_many_blocks_of_groups(layout):
    # 300 x 3 = 900 class groups over many blocks, and the tail over 300 rows
    rows, classes, cnum = 300, 3, 2
    x = random_features(
        rows, classes * cnum, 3, 2, dtype=F64, channels_last=layout == "channels_last"
    ).requires_grad_()
    y = random_targets(rows, classes)
    mask = torch.rand(rows, classes * cnum) < 0.5
    out = mc.mc_loss(x, y, classes, cnum, mask=mask)
    ref = mc.reference.mc_loss(x, y, classes, cnum, mask=mask)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    (dx,) = torch.autograd.grad(out.loss, x)
    (dx_ref,) = torch.autograd.grad(ref.loss, x)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# tiles and streams


@pytest.mark.parametrize("dtype", [F32, F64, BF16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_several_small_groups_per_tile(dtype, layout):
    counts = [3] * 40
    x = features(2, counts, 5, 7, dtype, channels_last=layout == "channels_last")
    y = random_targets(2, 40)
    for mask in (torch.rand(sum(counts)) < 0.5, (torch.rand(2, sum(counts)) < 0.5).to(dtype)):
        ran = launches(lambda: check_against_reference(x, y, counts, mask))
        # fp64 (gradcheck's dtype) goes backward through the stream kernel
        backward = (
            "mc_loss_stream_backward_kernel" if dtype == F64 else "mc_loss_tile_backward_kernel"
        )
        assert set(ran) <= LOSS_KERNELS and not (set(ran) & STREAM) - {backward}, ran
        assert ran.get("mc_loss_tile_forward_kernel") and ran.get(backward)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_too_large_for_a_tile_streams(dtype, layout):
    # 64 channels of 32 x 32 in fp32: 256 KiB a group, more than a tile may take
    counts = [64, 64]
    cl = layout == "channels_last"
    x = features(1, counts, 32, 32, dtype, channels_last=cl)
    y = random_targets(1, 2)
    mask = torch.rand(sum(counts)) < 0.5
    ran = launches(lambda: check_against_reference(x, y, counts, mask, 0.8, 6.0))
    assert set(ran) <= LOSS_KERNELS and not set(ran) & TILE, ran
    assert ran.get("mc_loss_stream_forward_kernel") and ran.get("mc_loss_stream_backward_kernel")
    # the stream kernels draw the mask too
    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    seed = entropy_seed()
    print(f"generator seed {seed}")
    xb = x.expand(2, -1, -1, -1).contiguous(memory_format=memory_format_of(x))
    yb = random_targets(2, 2)
    for per_sample in (False, True):
        out = fwd(xb, yb, counts, None, per_sample=per_sample, generator=gen())
        drawn = out[5]
        assert_drawn(drawn, counts, [32, 32], 2 if per_sample else None)
        explicit = fwd(xb, yb, counts, drawn)
        for a, b in zip(out[:5], explicit[:5]):
            assert torch.equal(a, b)
        if per_sample:  # the two rows of the same features drew different masks
            assert not torch.equal(drawn[0], drawn[1])
            assert not torch.equal(out[3][0], out[3][1])


@pytest.mark.parametrize("HW", [(40, 19), (37, 20), (24, 32)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_groups_near_the_tile_limit(HW):
    # 64 channels of 760, 740 and 768 positions in fp32: about the largest group a tile takes,
    # forward and backward each deciding for itself (tile or stream); whichever ran, the
    # results are the reference's
    h, w = HW
    counts = [64, 5]
    x = features(2, counts, h, w)
    y = random_targets(2, 2)
    mask = torch.rand(2, sum(counts)) < 0.5
    ran = launches(
        lambda: check_against_reference(
            x, y, counts, mask, grads_list=[grad_patterns(2, 2, F32)[0]]
        )
    )
    print(ran)
    assert set(ran) <= LOSS_KERNELS, ran


@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("counts", [(1, 4, 2, 7), (7, 1, 1, 2, 5)], ids=["1-4-2-7", "7-1-1-2-5"])
def test_uneven_groups(dtype, layout, counts):
    x = features(3, counts, 5, 7, dtype, channels_last=layout == "channels_last")
    y = random_targets(3, len(counts))
    for mask in (torch.rand(sum(counts)) < 0.5, (torch.rand(3, sum(counts)) < 0.5).to(dtype)):
        check_against_reference(x, y, counts, mask, 1.1, 7.0)


def misaligned(t):
    """The same values at an address that is not 16-byte aligned (contiguous, or channels_last
    where t is)."""
    fmt = memory_format_of(t)
    if fmt == torch.channels_last:
        b, c, h, w = t.shape
        flat = t.permute(0, 2, 3, 1).reshape(-1)
    else:
        flat = t.reshape(-1)
    buf = torch.empty(flat.numel() + 1, dtype=t.dtype)
    out = buf[1:]
    out.copy_(flat)
    if fmt == torch.channels_last:
        out = out.view(b, h, w, c).permute(0, 3, 1, 2)
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        out = out.view(t.shape)
        assert out.is_contiguous()
    assert out.data_ptr() % 16 != 0 and torch.equal(out, t)
    return out


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("HW", [(5, 7), (3, 3), (1, 5), (6, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_misaligned_inputs_and_odd_maps(dtype, layout, HW):
    # H*W not a multiple of 4 and every tensor the ops read one element off a 16-byte boundary:
    # the kernels' wide loads must fall back, not misread (UBSan in the asan run reports a
    # misaligned vector access)
    h, w = HW
    counts = [3, 1, 4, 2]
    x = features(2, counts, h, w, dtype, channels_last=layout == "channels_last")
    xm = misaligned(x)
    y = random_targets(2, len(counts))
    ym = misaligned(y)
    masks = [torch.rand(sum(counts)) < 0.5, (torch.rand(2, sum(counts)) < 0.5).to(dtype)]
    for mask in masks:
        mm = misaligned(mask)
        out = check_against_reference(xm, ym, counts, mm)
        aligned = check_against_reference(x, y, counts, mask, bwd_too=False)
        for a, b in zip(out[:5], aligned[:5]):
            assert_values(a, b, HW=h * w, coeff=21.5)
        # the backward's own inputs misaligned too
        grads = grad_patterns(2, len(counts), dtype)[0]
        dx = bwd(grads, x, y, counts, mask, out[3], out[4])
        dxm = bwd(
            tuple(misaligned(g) for g in grads),
            xm,
            ym,
            counts,
            mm,
            misaligned(out[3]),
            misaligned(out[4]),
        )
        assert_grad_close(dxm, dx, grad_terms(x, counts, grads, 1.5, 20.0))
    # and a mask drawn inside, for misaligned features
    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    seed = entropy_seed()
    print(f"generator seed {seed}")
    out = fwd(xm, ym, counts, None, per_sample=True, generator=gen())
    explicit = fwd(xm, ym, counts, misaligned(out[5]))
    for a, b in zip(out[:5], explicit[:5]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [F32, F64, BF16])
@pytest.mark.parametrize(
    "HW", [(4, 4), (5, 7), (1, 6), (6, 1), (1, 1)], ids=lambda s: f"{s[0]}x{s[1]}"
)
def test_channels_last_matches_contiguous(dtype, HW):
    h, w = HW
    counts = [2, 3, 1, 4]
    x = features(3, counts, h, w, dtype)
    xc = x.contiguous(memory_format=torch.channels_last)
    y = random_targets(3, len(counts))
    mask = torch.rand(3, sum(counts)) < 0.5
    out = check_against_reference(xc, y, counts, mask)
    base = check_against_reference(x, y, counts, mask, bwd_too=False)
    for a, b in zip(out[:5], base[:5]):
        assert_values(a, b, HW=h * w, coeff=21.5)
    grads = grad_patterns(3, len(counts), dtype)[0]
    dx_cl = bwd(grads, xc, y, counts, mask, out[3], out[4])
    dx = bwd(grads, x, y, counts, mask, base[3], base[4])
    assert_grad_close(dx_cl.contiguous(), dx, grad_terms(x, counts, grads, 1.5, 20.0))


# ----------------------------------------------------------------------------------------------
# the mask: given in every form, and drawn inside the kernels


@pytest.mark.parametrize("dtype", [F32, F64, BF16, F16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_mask_forms(dtype, layout):
    counts = [3, 2, 4]
    rows, Cm = 4, sum(counts)
    x = features(rows, counts, 4, 5, dtype, channels_last=layout == "channels_last")
    y = random_targets(rows, len(counts))
    per_sample = torch.rand(rows, Cm) < 0.5
    shared = torch.rand(Cm) < 0.5
    grads = grad_patterns(rows, len(counts), dtype)[0]

    def both(mask):
        out = fwd(x.detach(), y, counts, mask)
        return out[:5] + (bwd(grads, x.detach(), y, counts, mask, out[3], out[4]),)

    # bool and 0/1 in x's dtype: bitwise the same, forward and backward
    for a, b in zip(both(per_sample), both(per_sample.to(dtype))):
        assert torch.equal(a, b)
    for a, b in zip(both(shared), both(shared.to(dtype))):
        assert torch.equal(a, b)
    # a shared (C,) mask is the per-sample one with every row alike
    for a, b in zip(both(shared), both(shared.expand(rows, Cm).contiguous())):
        assert torch.equal(a, b)
    # both against the reference
    check_against_reference(x, y, counts, per_sample)
    check_against_reference(x, y, counts, shared.to(dtype))
    # a float mask holding other values than 0/1 is multiplied in, gradient included
    odd = torch.tensor([0.5, -2.0, 3.0, 0.0, 1.0, 0.25, -0.5, 2.0, 1.5]).to(dtype)
    check_against_reference(x, y, counts, odd)
    check_against_reference(
        x, y, counts, odd.expand(rows, Cm).contiguous() * (torch.rand(rows, Cm) < 0.7).to(dtype)
    )


def expected_drops(counts, drop, drop_fraction):
    if drop >= 0:
        return [min(n, drop) for n in counts]
    return [min(n, int(n * drop_fraction)) for n in counts]


def assert_drawn(drawn, counts, drops, rows):
    """drawn: bool (C,) for rows=None or (rows, C), exactly drops[i] False in every row and
    group i."""
    Cm = sum(counts)
    assert drawn.dtype == torch.bool
    assert drawn.shape == ((Cm,) if rows is None else (rows, Cm)), drawn.shape
    drawn = drawn.reshape(-1, Cm)
    bounds = offsets_of(counts).tolist()
    dropped = torch.stack([(~drawn[:, a:b]).sum(1) for a, b in zip(bounds[:-1], bounds[1:])], 1)
    assert torch.equal(dropped, torch.tensor(drops).expand(drawn.shape[0], -1)), dropped


# (counts, drop, drop_fraction): floor(n_i / 2) as published; drop=1; a quarter; a drop or a
# fraction that every group is smaller than (clamped: all dropped); nothing dropped
DRAWS = {
    "default": ((3, 5, 2, 7, 1, 4), -1, 0.5),
    "drop1": ((3, 5, 2, 7, 1, 4), 1, 0.5),
    "quarter": ((3, 5, 2, 7, 1, 4), -1, 0.25),
    "clamped": ((3, 5, 2), 9, 0.5),
    "fraction1": ((3, 5, 2), -1, 1.0),
    "none": ((3, 5, 2), 0, 0.5),
}


@pytest.mark.parametrize("dtype", [F32, BF16, F64])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("draw", list(DRAWS))
def test_mask_drawn_inside_the_kernels(dtype, per_sample, draw):
    counts, drop, frac = DRAWS[draw]
    rows = 3
    x = features(rows, counts, 3, 5, dtype)
    y = random_targets(rows, len(counts))
    seed = entropy_seed()
    print(f"generator seed {seed}")
    kw = dict(drop=drop, drop_fraction=frac, per_sample=per_sample, alpha=0.9, beta=4.0)

    def run(generator):
        xi = x.detach().clone().requires_grad_()
        out = fwd(xi, y, counts, None, generator=generator, **kw)
        torch.manual_seed(7)  # the same upstream gradients in every run
        grads = grad_patterns(rows, len(counts), dtype)[0]
        (dx,) = torch.autograd.grad(weighted_sum(out, grads), xi)
        return tuple(t.detach() for t in out) + (dx,), grads

    first, grads = run(torch.Generator().manual_seed(seed))
    drawn = first[5]
    assert_drawn(drawn, counts, expected_drops(counts, drop, frac), rows if per_sample else None)
    # the same generator state: bitwise the same outputs and gradient
    again, _ = run(torch.Generator().manual_seed(seed))
    for i, (a, b) in enumerate(zip(first, again)):
        assert torch.equal(a, b), i
    # the results of the drawn mask passed in, forward and backward (mc_loss_backward takes
    # drawn_mask as the mask the forward used)
    explicit = check_against_reference(x, y, counts, drawn, 0.9, 4.0)
    for i, (a, b) in enumerate(zip(first[:5], explicit[:5])):
        assert torch.equal(a, b), i
    dx = bwd(grads, x.detach(), y, counts, drawn, first[3], first[4], 0.9, 4.0)
    assert torch.equal(dx, first[-1])
    # the default generator when none is given
    torch.manual_seed(seed)
    d1 = fwd(x.detach(), y, counts, None, **kw)
    torch.manual_seed(seed)
    d2 = fwd(x.detach(), y, counts, None, **kw)
    for a, b in zip(d1, d2):
        assert torch.equal(a, b)
    assert_drawn(d1[5], counts, expected_drops(counts, drop, frac), rows if per_sample else None)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_drawn_masks_differ_by_seed_and_call(per_sample):
    # 40 groups of 3 with 1 dropped: 3^40 masks a row, a repeat by chance has odds 1e-19
    counts = [3] * 40
    x = features(2, counts, 2, 3).detach()
    y = random_targets(2, 40)
    seed = entropy_seed()
    print(f"generator seed {seed}")
    state = torch.get_rng_state()
    gen = torch.Generator().manual_seed(seed)
    a = fwd(x, y, counts, None, per_sample=per_sample, generator=gen)[5]
    b = fwd(x, y, counts, None, per_sample=per_sample, generator=gen)[5]
    c = fwd(
        x, y, counts, None, per_sample=per_sample, generator=torch.Generator().manual_seed(seed + 1)
    )[5]
    assert not torch.equal(a, b), "the generator did not move on"
    assert not torch.equal(a, c), "another seed drew the same mask"
    if per_sample:
        assert not torch.equal(a[0], a[1]), "two rows drew the same mask"
    assert torch.equal(torch.get_rng_state(), state), "the default generator was used"


# What the CPU build draws for the same CPU generator state (the emulated CUDA op and the CPU
# op take seed and offset from it the same way), in a child process without the emulated build.
CPU_BUILD_DRAWS = r"""
import json, sys, torch
import mcloss_cuda as mc
from mcloss_cuda import _ops
schema = str(torch.ops.mcloss_cuda.mc_loss.default._schema) if _ops.AVAILABLE else ""
if mc.backend("cpu") != "cpu" or "Generator" not in schema:
    print(json.dumps({"skip": f"{mc.__file__}: no CPU build of these ops ({_ops.LOAD_ERROR!r})"}))
    sys.exit()
out = []
for c in json.loads(sys.stdin.read()):
    x = torch.zeros(c["rows"], sum(c["counts"]), 2, 3)
    y = torch.zeros(c["rows"], dtype=torch.int64)
    offsets = torch.tensor([0] + c["counts"]).cumsum(0)
    gen = torch.Generator().manual_seed(c["seed"])
    draws = []
    for _ in range(2):                       # the generator moves on the same way too
        m = torch.ops.mcloss_cuda.mc_loss(x, y, offsets, max(c["counts"]), None, c["drop"],
                                          c["fraction"], c["per_sample"], gen, 1.5, 20.0)[5]
        draws.append(m.int().tolist())
    out.append(draws)
print(json.dumps({"draws": out, "file": mc.__file__}))
"""


def cpu_build_draws(configs):
    """Run CPU_BUILD_DRAWS with this checkout's CPU build (in place), else the installed one."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MCLOSS_EMULATED", "CUEMU_", "ASAN_", "UBSAN_", "TSAN_"))
        and k not in ("LD_PRELOAD", "PYTHONPATH")
    }
    env["PYTHONSAFEPATH"] = "1"
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(mc.__file__)))
    reasons = []
    for pythonpath in (package_parent, None):
        run_env = dict(env, **({"PYTHONPATH": pythonpath} if pythonpath else {}))
        with tempfile.TemporaryDirectory() as cwd:
            proc = subprocess.run(
                [sys.executable, "-c", CPU_BUILD_DRAWS],
                input=json.dumps(configs),
                capture_output=True,
                text=True,
                env=run_env,
                cwd=cwd,
                timeout=300,
            )
        if proc.returncode != 0:
            reasons.append(f"{pythonpath}: exit {proc.returncode}: {proc.stderr[-2000:]}")
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        if "draws" in res:
            return res
        reasons.append(res["skip"])
    pytest.skip("no CPU build to compare with: " + "; ".join(reasons))


def test_drawn_mask_is_the_cpu_builds():
    seed = entropy_seed()
    print(f"generator seed {seed}")
    configs = [
        dict(counts=list(c), drop=d, fraction=f, per_sample=ps, rows=3, seed=seed + i)
        for i, (c, d, f, ps) in enumerate(
            [
                ((3, 5, 2, 7, 1, 4), -1, 0.5, False),
                ((3, 5, 2, 7, 1, 4), -1, 0.5, True),
                ((4,) * 20, 1, 0.5, True),
                ((6, 9), -1, 0.25, False),
            ]
        )
    ]
    res = cpu_build_draws(configs)
    print("CPU build:", res["file"])
    for c, cpu in zip(configs, res["draws"]):
        x = torch.zeros(c["rows"], sum(c["counts"]), 2, 3)
        y = torch.zeros(c["rows"], dtype=torch.int64)
        gen = torch.Generator().manual_seed(c["seed"])
        for k in range(2):
            m = fwd(
                x,
                y,
                c["counts"],
                None,
                drop=c["drop"],
                drop_fraction=c["fraction"],
                per_sample=c["per_sample"],
                generator=gen,
            )[5]
            assert m.int().tolist() == cpu[k], (c, k)


# ----------------------------------------------------------------------------------------------
# NaN and Inf


@pytest.mark.parametrize("dtype", [F32, F64, BF16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_and_inf_propagate_as_in_the_reference(dtype, layout):
    counts = [3, 2, 4, 3]
    rows, Cm = 3, sum(counts)
    x = features(rows, counts, 3, 4, dtype).detach()
    x[0, 1, 1, 2] = float("nan")  # a kept channel, one position
    x[1, 3, 0, 0] = float("inf")
    x[1, 6, 2, 3] = float("-inf")
    x[2, 10] = float("nan")  # a whole channel
    x[2, 7, 1, 1] = float("inf")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y = random_targets(rows, len(counts))
    mask = torch.ones(rows, Cm, dtype=torch.bool)
    mask[0, 1] = False  # NaN in a masked channel: 0 * NaN = NaN
    mask[1, 4] = False
    mask[2, 8] = False
    for m in (mask, mask.to(dtype), mask[0]):
        out = fwd(x, y, counts, m)
        xr = x.clone().requires_grad_()
        ref = R.mc_loss(xr, y, len(counts), counts, mask=m)
        for a, b in zip(out[:4], ref):
            assert torch.equal(a.isnan(), b.isnan())
            assert_values(a, b.detach(), HW=12, coeff=21.5, equal_nan=True)
        assert not out[0].isfinite()
        g = grad_patterns(rows, len(counts), dtype)
        # gradients that reach both terms (loss; dis and div; all four): NaN and Inf exactly
        # where the reference has them
        for grads in (g[0], g[1], g[2]):
            dx = bwd(grads, x, y, counts, m, out[3], out[4])
            (dx_ref,) = torch.autograd.grad(weighted_sum(ref, grads), xr, retain_graph=True)
            for special in (torch.isnan, torch.isposinf, torch.isneginf):
                assert torch.equal(special(dx), special(dx_ref)), (special.__name__, grads)
            finite = dx_ref.isfinite()
            assert_grad_close(
                torch.where(finite, dx, 0),
                torch.where(finite, dx_ref, 0),
                grad_terms(x.nan_to_num(0, 0, 0), counts, grads, 1.5, 20.0),
            )
        # a gradient of the discriminality term alone (logits; dis): the fused backward runs
        # both terms, the other with a zero (None) gradient, and 0 * NaN is NaN: NaN at least
        # where the reference has it, and the same numbers where neither is NaN
        for grads in (g[3], (None, g[2][1], None, None)):
            dx = bwd(grads, x, y, counts, m, out[3], out[4])
            (dx_ref,) = torch.autograd.grad(weighted_sum(ref, grads), xr, retain_graph=True)
            assert (dx.isnan() | ~dx_ref.isnan()).all(), grads
            both = dx.isfinite() & dx_ref.isfinite()
            assert torch.equal(both, dx_ref.isfinite() & ~dx.isnan())
            assert_grad_close(
                torch.where(both, dx, 0),
                torch.where(both, dx_ref, 0),
                grad_terms(x.nan_to_num(0, 0, 0), counts, grads, 1.5, 20.0),
            )


# ----------------------------------------------------------------------------------------------
# what a step launches


def test_launches_per_step():
    # an eager forward + backward of the loss: the fused forward, the tail and the fused
    # backward, each once, with the mask drawn inside (no mask kernels, no target checks) or
    # given
    x = random_features(4, 12, 5, 5).requires_grad_()
    y = random_targets(4, 4)
    want = {
        "mc_loss_tile_forward_kernel": 1,
        "mc_loss_tail_kernel": 1,
        "mc_loss_tile_backward_kernel": 1,
    }
    for kw in (
        dict(),
        dict(per_sample_mask=True),
        dict(drop=1),
        dict(generator=torch.Generator().manual_seed(3)),
        dict(mask=torch.rand(12) < 0.5),
        dict(mask=(torch.rand(4, 12) < 0.5).float()),
    ):
        counts = launches(lambda: mc.mc_loss(x, y, 4, 3, **kw).loss.backward())
        assert counts == want, (kw, counts)
    # every output used: still one backward launch
    counts = launches(lambda: sum(t.sum() for t in mc.mc_loss(x, y, 4, 3)).backward())
    assert counts == want, counts
    # a group too large for a tile: the stream kernels instead, still three launches
    xs = features(1, [64, 64], 32, 32).requires_grad_()
    counts = launches(lambda: mc.mc_loss(xs, random_targets(1, 2), 2, 64).loss.backward())
    assert counts == {
        "mc_loss_stream_forward_kernel": 1,
        "mc_loss_tail_kernel": 1,
        "mc_loss_stream_backward_kernel": 1,
    }, counts

"""Cases for the CUDA kernels that the CPU kernel tests cannot reach, run only by the emulated
build (tests/test_cuda_emulated.py starts pytest on this file, with the emulated extension
standing in for the CPU kernels; the file name keeps it out of a plain ``pytest`` run).

- Direct op calls with offsets that do not partition [0, C): the CUDA host wrappers cannot read
  the values without a device sync, so the kernels check them and write NaN to every output
  element, the same on every call (the CPU ops raise instead).
- An out-of-range target in a direct ``mc_loss_tail`` / ``mc_loss_tail_backward`` call: NaN
  in the loss and in that sample's gradient, never a finite wrong number.
- More groups than one block has warps and more rows than the tail's block has threads.
- What a training step launches.

Inputs are random and fresh on every run (the seed is printed).
"""

import os

import pytest
import torch

import mcloss_cuda as mc
from helpers import VALUE_TOL, random_features, random_targets

if not os.environ.get("MCLOSS_EMULATED_EXTENSION"):
    raise RuntimeError("tests/cuda_emulated_cases.py runs under the emulated CUDA build only: "
                       "run pytest tests/test_cuda_emulated.py")

ops = torch.ops.mcloss_cuda
emu = torch.ops.mcloss_cuemu
F32, F64 = torch.float32, torch.float64

B, K, N, H, W = 3, 4, 3, 5, 7
C = K * N

# (name, offsets) that are not a partition of [0, 12) into 4 non-empty groups
BAD_OFFSETS = [
    ("end-short", [0, 3, 6, 9, 11]),        # channel 11 outside every group
    ("end-past-C", [0, 3, 6, 9, 13]),
    ("start", [1, 3, 6, 9, 12]),             # channel 0 outside every group
    ("empty-group", [0, 3, 3, 9, 12]),
    ("overlap", [0, 6, 3, 9, 12]),           # channels 3-5 in two groups, group 1 reversed
    ("negative", [0, -5, 6, 9, 12]),
    ("huge", [0, 2 ** 40, 6, 9, 12]),
    ("int64-min", [0, -2 ** 63, 6, 9, 12]),
]


def op_calls(x, mask, dtype):
    """Every op that takes offsets, as (name, function of the offsets returning its outputs as
    a tuple)."""
    acc = F64 if dtype == F64 else F32
    gK = torch.randn(B, K, dtype=acc)
    gKHW = torch.randn(B, K, H, W, dtype=dtype)
    y = random_targets(B, K)
    return [
        ("ccmp", lambda o: (ops.ccmp(x, o),)),
        ("ccmp_backward", lambda o: (ops.ccmp_backward(gKHW, x, o),)),
        ("mc_loss_forward", lambda o: ops.mc_loss_forward(x, o, mask)),
        ("mc_loss_backward", lambda o: (ops.mc_loss_backward(gK, gK, x, o, mask),)),
        ("mc_loss", lambda o: ops.mc_loss(x, y, o, mask, 1.5, 20.0)),
    ]


@pytest.mark.parametrize("dtype", [F32, F64, torch.bfloat16])
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
        for i, out in enumerate(call(offsets)):
            assert out.isnan().all(), f"{op} output {i}: {(~out.isnan()).sum()} elements not NaN"


def test_valid_uneven_offsets_still_give_numbers():
    # the partition check must not refuse the offsets the API builds for uneven groups
    x = random_features(B, C, H, W)
    mask = (torch.rand(C) < 0.5).float()
    for op, call in op_calls(x, mask, F32):
        for out in call(torch.tensor([0, 1, 5, 7, 12])):
            assert out.isfinite().all(), op


def tail_inputs(rows, classes, dtype):
    h = torch.rand(rows, classes, dtype=dtype) * 3
    logits = torch.randn(rows, classes, dtype=dtype) * 2
    offsets = torch.arange(0, 3 * classes + 1, 3)
    return h, logits, offsets


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("bad", [-1, "K", 2 ** 40])
def test_out_of_range_target_gives_nan_loss_and_gradient(dtype, bad):
    rows, classes = 6, 5
    h, logits, offsets = tail_inputs(rows, classes, dtype)
    y = random_targets(rows, classes)
    y[2] = classes if bad == "K" else bad
    loss, dis, div, lse = ops.mc_loss_tail(h, logits, y, offsets, 1.5, 20.0)
    assert loss.isnan() and dis.isnan() and div.isfinite()
    one = torch.ones((), dtype=dtype)
    zeros = torch.zeros(rows, classes, dtype=dtype)
    grad_h, grad_logits = ops.mc_loss_tail_backward(one, one * 0, one * 0, zeros, logits, lse, y,
                                                    offsets, 1.5, 20.0)
    assert grad_logits[2].isnan().all(), grad_logits[2]
    rest = torch.cat([grad_logits[:2], grad_logits[3:]])
    assert rest.isfinite().all() and grad_h.isfinite().all()
    # and through the whole-loss op and autograd: the sample's features get NaN
    x = random_features(rows, 3 * classes, 4, 4, dtype=dtype).requires_grad_()
    mask = (torch.rand(3 * classes) < 0.5).to(dtype)
    out = ops.mc_loss(x, y, offsets, mask, 1.5, 20.0)
    assert out[0].isnan()
    (dx,) = torch.autograd.grad(out[0], x)
    # The logit gradient, NaN for the sample, reaches the channel that wins the masked max at
    # each position (times its mask value, so masked winners too), as the max's backward
    # routes it: exactly one NaN per group and position, the rest finite.
    nan_per_position = dx[2].isnan().reshape(classes, 3, 16).sum(1)
    assert (nan_per_position == 1).all(), nan_per_position
    assert dx[torch.arange(rows) != 2].isfinite().all()


@pytest.mark.parametrize("dtype", [F32, F64])
def test_tail_over_more_rows_than_one_block_has_threads(dtype):
    # the forward tail runs in one block of 256 threads: 700 rows is almost three per thread
    rows, classes = 700, 7
    h, logits, offsets = tail_inputs(rows, classes, dtype)
    y = random_targets(rows, classes)
    loss, dis, div, lse = ops.mc_loss_tail(h, logits, y, offsets, 0.5, 3.0)
    lp = torch.log_softmax(logits.double(), -1)
    dis_ref = torch.nn.functional.nll_loss(lp, y)
    div_ref = 1 - (h.double() / 3).mean()
    rtol, atol = VALUE_TOL[dtype]
    tol = dict(rtol=rtol, atol=atol)
    torch.testing.assert_close(dis.double(), dis_ref, **tol)
    torch.testing.assert_close(div.double(), div_ref, **tol)
    torch.testing.assert_close(loss.double(), 0.5 * dis_ref + 3.0 * div_ref, **tol)
    m = logits.double().amax(-1)
    torch.testing.assert_close(lse[:, 0].double(), m, rtol=0, atol=0)
    torch.testing.assert_close(lse[:, 1].double(), (logits.double() - m[:, None]).exp().sum(-1).log(),
                               **tol)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_many_blocks_of_groups(layout):
    # 300 x 3 = 900 class groups, four per block of the fused kernels: 225 blocks, and the
    # tail over 300 rows
    rows, classes, cnum = 300, 3, 2
    x = random_features(rows, classes * cnum, 3, 2, dtype=F64,
                        channels_last=layout == "channels_last").requires_grad_()
    y = random_targets(rows, classes)
    mask = torch.rand(rows, classes * cnum) < 0.5
    out = mc.mc_loss(x, y, classes, cnum, mask=mask)
    ref = mc.reference.mc_loss(x, y, classes, cnum, mask=mask)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    (dx,) = torch.autograd.grad(out.loss, x)
    (dx_ref,) = torch.autograd.grad(ref.loss, x)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-9, atol=1e-12)


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


def test_launches_per_step():
    # an eager forward + backward of the loss with an explicit mask: the two fused passes over
    # the features and the two kernels of the (B, K) tail, each once
    x = random_features(4, 12, 5, 5).requires_grad_()
    y = random_targets(4, 4)
    mask = torch.rand(12) < 0.5
    counts = launches(lambda: mc.mc_loss(x, y, 4, 3, mask=mask).loss.backward())
    assert counts == {"mc_loss_forward_kernel": 1, "mc_loss_tail_kernel": 1,
                      "mc_loss_tail_backward_kernel": 1, "mc_loss_backward_kernel": 1}, counts

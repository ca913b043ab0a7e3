"""The fused kernels (C++ CPU, and CUDA where built) against ``mcloss_cuda.reference``.

The cases and comparison helpers of the kernel tests, shared with test_ops.py (one test class
per public op: forward values and gradients over many shapes, B in {1, 2, 5}, cnum from 1 to
64, uneven and balanced groups, 1xN, Nx1, 1x1, 7x7, 14x14, 5x9, 56x56 and 112x112 maps, every
dtype, every layout, shared and per-sample, bool and float masks; gradcheck in float64). Here:
exact ties, all-negative masked groups, NaN and Inf, extreme logits; the parallel split and
what is saved for backward. (Bitwise repeatability: test_repeatability.py; the ops'
registration: test_registration.py.)

The two loss ops are also called directly (``torch.ops.mcloss_cuda.mc_loss`` and
``mc_loss_backward``, as the C++ autograd calls them): all seven outputs (lse included) against
the reference, dx for upstream gradients with some of them None, max_group larger than needed,
and the mask the op draws itself when given none (exactly d_i dropped per row and group,
repeatable from the generator's state, the results of that mask passed explicitly, fresh at
every call, uniform, the default generator untouched when one is given).

Random inputs are fresh every run: each test seeds torch from the OS entropy pool and prints
the seed, so a failure can be replayed with ``torch.manual_seed(<seed>)``.

Tolerances (the helpers below; test_ops.py's docstring says which op compares how). Values
computed in fp32/fp64 use ``helpers.VALUE_TOL`` (assert_value_close); maps returned in
fp16/bf16 may differ by one ulp (assert_map_close, MAP_TOL). Gradients use
``helpers.GRAD_TOL`` plus an absolute term proportional to the largest gradient element
(GRAD_SCALE): a gradient element is a difference of terms of the size of the largest ones
(p * (g - <g, p>), gh * p * (1 - A_j)), so its rounding error scales with them and not with
its own magnitude (mc_terms).
"""

import itertools
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Sequence, Union

import pytest
import torch
from torch.autograd.gradcheck import GradcheckError
from torch.utils._python_dispatch import TorchDispatchMode

import mcloss_cuda as mc
from helpers import (
    DEVICES,
    GRAD_SCALE,
    VALUE_TOL,
    apply_layout,
    assert_grad_close,
    child_env,
    counts_of,
    cuda_only,
    entropy_seed,
    fused_only,
    offsets_of,
    random_features,
    random_targets,
    saved_for_backward,
    separated_features,
)

R = mc.reference
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = [F32, F64, F16, BF16]

# one ulp for maps rounded to the input dtype (plus the smallest subnormal)
MAP_TOL = {F64: VALUE_TOL[F64], F32: VALUE_TOL[F32], F16: (2**-10, 6e-8), BF16: (2**-7, 1e-38)}
# the largest maps on which separated_features can build near-tie-free fp16/bf16 inputs
SEPARATED_MAX_HW = {F16: 512, BF16: 128}


# ----------------------------------------------------------------------------------------------
# cases


@dataclass(frozen=True)
class Case:
    B: int
    K: int
    cnum: Union[None, int, Sequence[int]]  # as passed to mc_loss & co.
    C: int
    H: int
    W: int

    @property
    def counts(self):
        return counts_of(self.K, self.cnum, self.C)

    @property
    def HW(self):
        return self.H * self.W

    @property
    def ccmp_cnum(self):
        # ccmp takes an int or per-class counts (no None)
        return self.cnum if isinstance(self.cnum, int) else list(self.counts)


CASES = {
    "single_1x1": Case(1, 1, 1, 1, 1, 1),  # one channel, one position
    "cnum1_7x7": Case(2, 3, 1, 3, 7, 7),
    "uniform_14x14": Case(5, 4, 3, 12, 14, 14),
    "row_1x9": Case(2, 3, 2, 6, 1, 9),
    # the CPU kernels work on 8 positions at a time: exactly one and exactly two such chunks,
    # no partial last one (the other maps end in a partial chunk of 1 to 7 positions)
    "row_1x8": Case(2, 2, 3, 6, 1, 8),
    "map_4x4": Case(3, 2, 2, 4, 4, 4),
    "col_9x1": Case(2, 2, 4, 8, 9, 1),
    "map_1x1": Case(5, 2, 3, 6, 1, 1),  # groups larger than the map
    "uneven_5x9": Case(2, 3, (1, 4, 2), 7, 5, 9),
    "balanced_5x9": Case(1, 4, None, 10, 5, 9),  # C % K != 0: counts 3, 3, 2, 2
    "cnum64_9x9": Case(2, 2, 64, 128, 9, 9),
    "uneven64_9x9": Case(1, 3, (64, 1, 7), 72, 9, 9),
    "large_56x56": Case(1, 2, 3, 6, 56, 56),
    "large_112x112": Case(1, 2, 2, 4, 112, 112),
}


def grad_feasible(case, dtype):
    """Whether gradients can be compared: fp64 (randn: near-ties below 1e-10 are improbable),
    a 1x1 map (every probability is exactly 1, every masked value exact: no rounded winner),
    or inputs without near-ties from separated_features."""
    if dtype == F64 or case.HW == 1:
        return True
    return max(case.counts) <= case.HW and case.HW <= SEPARATED_MAX_HW.get(dtype, 1 << 30)


def make_features(case, dtype, device, layout="contiguous", for_grad=True):
    """Features for ``case``: randn for fp64 or values-only checks, near-tie-free otherwise."""
    if (not for_grad) or dtype == F64 or case.HW == 1:
        x = random_features(case.B, case.C, case.H, case.W, dtype=dtype, device=device)
    else:
        # keep the values within about +-20 on big fp32 maps (separated_features spreads its
        # values over +-HW/16); adjacent values still differ by a factor exp(>= 0.003) in p
        scale = 1.0 if case.HW <= 320 else 320.0 / case.HW
        x = separated_features(
            case.B, case.counts, case.H, case.W, dtype=dtype, device=device, scale=scale
        )
    x = apply_layout(x, layout)
    assert x.shape == (case.B, case.C, case.H, case.W)
    return x.detach().requires_grad_()


def assert_map_close(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    rtol, atol = MAP_TOL[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def assert_value_close(actual, expected, equal_nan=False, HW=1, coeff=1.0):
    """Values accumulated in fp32/fp64. A sum over HW positions (h, the logits) carries a
    rounding error growing like sqrt(HW) in the kernel and in the reference alike (their
    summation orders differ), and L_div = 1 - h / n cancels: the absolute tolerance grows with
    sqrt(HW / 64) and with the loss coefficients ``coeff``."""
    rtol, atol = VALUE_TOL[expected.dtype if expected.dtype == F64 else F32]
    atol = atol * max(1.0, (HW / 64) ** 0.5) * max(1.0, coeff)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=equal_nan)


def max_prob(x):
    return torch.softmax(x.detach().double().flatten(2), -1).max().item()


def mc_terms(x, counts, alpha, beta):
    """Size of the terms of d(alpha * dis + beta * div)/dx: the diversity part is
    -beta / (B K n_i) * p * ([wins] - A_j), the discriminality part (dCE/dlogit <= 1/B) / HW."""
    B, HW = x.shape[0], x.shape[2] * x.shape[3]
    return abs(beta) * max_prob(x) / (B * len(counts) * min(counts)) + abs(alpha) / (B * HW)


def grad_of(out, x, g=None):
    (dx,) = torch.autograd.grad(out, x, g)
    return dx


ARGS = "device, dtype, case, layout, bwd"  # test_ops.PARAMS, op_params

# ----------------------------------------------------------------------------------------------
# ties, masked groups, NaN and Inf, extreme values (the ops on their own cases: test_ops.py)


@fused_only
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_negative_groups_masked_channels_count_as_zero(device, dtype):
    # every kept value negative: a masked channel (value 0) wins the masked max (docs/spec.md)
    case = Case(2, 3, 3, 9, 4, 5)
    x = (-make_features(case, dtype, device, for_grad=False).abs() - 0.5).detach()
    x.requires_grad_()
    mask = torch.ones(case.B, case.C, dtype=torch.bool, device=device)
    mask[0, 1] = False  # group 0 of sample 0: logit exactly 0
    mask[1, 8] = False  # group 2 of sample 1: logit exactly 0
    lg = mc.discriminality_logits(x, case.K, mask, case.cnum)
    assert lg[0, 0].item() == 0.0 and lg[1, 2].item() == 0.0
    assert (lg[0, 1:] < 0).all() and (lg[1, :2] < 0).all()
    assert_value_close(lg, R.discriminality_logits(x, case.K, mask, case.cnum))
    g = torch.randn(lg.shape, device=device)
    assert_grad_close(
        grad_of(lg, x, g), grad_of(R.discriminality_logits(x, case.K, mask, case.cnum), x, g)
    )


@fused_only
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_exact_ties_go_to_the_first_channel(device, dtype, layout):
    # Duplicated channels tie exactly at every position, in the raw values and in the
    # probabilities (identical rows give identical softmax rows): the first-max rule must send
    # every gradient to the lower channel, in the kernel as in the reference. Everything else
    # is separated_features, so no other (near-)tie exists.
    case = Case(2, 3, (3, 2, 4), 9, 4, 5)
    x = separated_features(case.B, case.counts, case.H, case.W, dtype=dtype, device=device)
    for c0 in (0, 3, 5):
        x[:, c0 + 1] = x[:, c0]
    x = apply_layout(x, layout).requires_grad_()
    z = mc.ccmp(x, case.ccmp_cnum)
    dz = grad_of(z.sum(), x)
    assert torch.equal(z, R.ccmp(x, case.ccmp_cnum))
    assert torch.equal(dz, grad_of(R.ccmp(x, case.ccmp_cnum).sum(), x))
    for c0 in (0, 3, 5):
        assert (dz[:, c0 + 1] == 0).all()
    y = random_targets(case.B, case.K, device)
    for mask in (
        torch.ones(case.C, dtype=torch.bool, device=device),
        torch.rand(case.B, case.C, device=device) < 0.5,
    ):
        out = mc.mc_loss(x, y, case.K, case.cnum, mask=mask)
        ref = R.mc_loss(x, y, case.K, case.cnum, mask=mask)
        for field in out._fields:
            assert_value_close(getattr(out, field), getattr(ref, field), coeff=21.5)
        assert_grad_close(
            grad_of(out.loss, x), grad_of(ref.loss, x), mc_terms(x, case.counts, 1.5, 20.0)
        )
    d = mc.diversity_loss(x, case.K, case.cnum)
    assert_grad_close(
        grad_of(d, x),
        grad_of(R.diversity_loss(x, case.K, case.cnum), x),
        mc_terms(x, case.counts, 0, 1),
    )


@fused_only
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_and_inf_reach_loss_and_gradient(device, dtype, layout):
    case = Case(2, 2, 3, 6, 3, 3)
    x = make_features(case, dtype, device, for_grad=False).detach()
    x[0, 1, 1, 1] = float("nan")
    x[1, 4, 0, 2] = float("inf")
    x = apply_layout(x, layout).requires_grad_()
    y = torch.tensor([0, 1], device=device)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool, device=device)
    out = mc.mc_loss(x, y, case.K, case.cnum, mask=mask)
    ref = R.mc_loss(x, y, case.K, case.cnum, mask=mask)
    assert not out.loss.isfinite()
    for field in out._fields:
        assert_value_close(getattr(out, field), getattr(ref, field), equal_nan=True)
    dx, dx_ref = grad_of(out.loss, x), grad_of(ref.loss, x)
    assert not dx.isfinite().all()
    assert torch.equal(dx.isnan(), dx_ref.isnan())
    # primitives: NaN propagates as in torch
    assert torch.equal(mc.spatial_softmax(x).isnan(), R.spatial_softmax(x).isnan())
    torch.testing.assert_close(mc.ccmp(x, 3), R.ccmp(x, 3), rtol=0, atol=0, equal_nan=True)
    assert_value_close(mc.diversity_loss(x, case.K), R.diversity_loss(x, case.K), equal_nan=True)


@fused_only
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_extreme_logits(device, dtype):
    # +-1e4 + x: exp underflows to exactly 0 on the negative half of every row
    case = Case(2, 3, (2, 3, 1), 6, 5, 4)
    x = make_features(case, dtype, device, for_grad=False).detach()
    x = (torch.sign(x) * 1e4 + x).requires_grad_()
    y = random_targets(case.B, case.K, device)
    mask = torch.rand(case.B, case.C, device=device) < 0.5
    out = mc.mc_loss(x, y, case.K, case.cnum, mask=mask)
    ref = R.mc_loss(x, y, case.K, case.cnum, mask=mask)
    # the logits average values of +-1e4 that mostly cancel: their rounding error is a few
    # ulps of 1e4 whatever the summation order (the loss weighs them by alpha = 1.5)
    atol = 8 * torch.finfo(dtype).eps * 1e4 * 1.5
    for field in out._fields:
        torch.testing.assert_close(
            getattr(out, field), getattr(ref, field), rtol=VALUE_TOL[dtype][0], atol=atol
        )
    assert out.loss.isfinite()
    assert_value_close(out.div, ref.div)
    # dCE/dlogit moves by up to 1/2 of the logits' rounding error (above), reaching x through
    # alpha / (B HW): extra absolute tolerance on the gradient
    extra = 1.5 / (case.B * case.HW) * 0.5 * (8 * torch.finfo(dtype).eps * 1e4)
    dx, dx_ref = grad_of(out.loss, x), grad_of(ref.loss, x)
    assert_grad_close(dx, dx_ref, mc_terms(x, case.counts, 1.5, 20.0) + extra / GRAD_SCALE[dtype])


# ----------------------------------------------------------------------------------------------
# the loss ops themselves: torch.ops.mcloss_cuda.mc_loss and mc_loss_backward, called directly

OPS = torch.ops.mcloss_cuda if mc._ops.AVAILABLE else None


REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}


def op_options(opts, x):
    """The op's (avg_pool, weight, label_smoothing, reduction) from the Python API's options."""
    weight = opts.get("weight")
    if weight is not None:
        weight = weight.to(F64 if x.dtype == F64 else F32)
    return (
        opts.get("pooling", "max") == "avg",
        weight,
        float(opts.get("label_smoothing", 0.0)),
        REDUCTION_ENUM[opts.get("reduction", "mean")],
    )


def op_forward(
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
    opts=None,
):
    """ops.mc_loss: (loss, dis, div, logits, lse, drawn_mask, weight_sums)."""
    mg = max(counts) if max_group is None else max_group
    extra = op_options(opts, x) if opts else ()
    return OPS.mc_loss(
        x,
        y,
        offsets_of(counts, x.device),
        mg,
        mask,
        drop,
        drop_fraction,
        per_sample,
        generator,
        alpha,
        beta,
        *extra,
    )


def op_backward(
    grads,
    x,
    y,
    counts,
    mask,
    logits,
    lse,
    alpha=1.5,
    beta=20.0,
    max_group=None,
    opts=None,
    weight_sums=None,
):
    mg = max(counts) if max_group is None else max_group
    extra = op_options(opts, x) + (weight_sums,) if opts else ()
    return OPS.mc_loss_backward(
        *grads, x, y, offsets_of(counts, x.device), mg, mask, logits, lse, alpha, beta, *extra
    )


def lse_of(logits):
    """Every row's max and log(sum(exp(logit - max))), as mc_loss's lse output holds them."""
    m = logits.amax(-1)
    return torch.stack([m, (logits - m[:, None]).exp().sum(-1).log()], -1)


def weighted_sum(out, grads):
    """sum of each output times its upstream gradient (None: left out), for autograd."""
    total = None
    g_loss, g_dis, g_div, g_logits = grads
    for g, t in ((g_loss, out[0]), (g_dis, out[1]), (g_div, out[2])):
        if g is not None:
            term = (g.to(t) * t).sum()
            total = term if total is None else total + term
    if g_logits is not None:
        t = (g_logits.to(out[3]) * out[3]).sum()
        total = t if total is None else total + t
    return total


def grad_patterns(B, K, device, acc, per_sample=False):
    """Upstream gradients (grad_loss, grad_dis, grad_div, grad_logits): all four, and with
    some None (autograd passes None for an output that no gradient reaches). per_sample: those
    of loss, dis and div (B,), as reduction="none" gives them."""
    shape = (B,) if per_sample else ()
    s = lambda: torch.randn(shape, device=device, dtype=acc)  # noqa: E731
    gl = lambda: torch.randn(B, K, device=device, dtype=acc)  # noqa: E731
    return [
        (s(), s(), s(), gl()),
        (s(), None, None, None),
        (None, s(), s(), None),
        (None, None, None, gl()),
        (None, None, s(), gl()),
        (None, None, None, None),
    ]


def grad_terms(x, counts, grads, alpha, beta):
    """mc_terms for a weighted sum of the outputs (see weighted_sum)."""
    g_loss, g_dis, g_div, g_logits = (0.0 if g is None else g.abs().max().item() for g in grads)
    a = g_loss * abs(alpha) + g_dis + x.shape[0] * g_logits
    b = g_loss * abs(beta) + g_div
    return mc_terms(x, counts, a, b)


def assert_like_x(dx, x):
    assert dx.shape == x.shape and dx.dtype == x.dtype and dx.device == x.device
    fmt = (
        torch.channels_last
        if (not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last))
        else torch.contiguous_format
    )
    assert dx.is_contiguous(memory_format=fmt), (dx.stride(), x.stride())


def check_ops_against_reference(x, y, case, mask, alpha, beta, bwd, opts=None, **kw):
    """ops.mc_loss's seven outputs and mc_loss_backward's dx (for every grad_patterns) against
    autograd through mcloss_cuda.reference with the same mask. opts: the Python API's pooling,
    weight, label_smoothing and reduction, if any."""
    xd = x.detach()
    acc = F64 if x.dtype == F64 else F32
    out = op_forward(xd, y, case.counts, mask, alpha, beta, opts=opts, **kw)
    assert len(out) == 7
    loss, dis, div, logits, lse, drawn, weight_sums = out
    ref = R.mc_loss(x, y, case.K, case.cnum, mask=mask, alpha=alpha, beta=beta, **(opts or {}))
    # a weighted mean's divisor sum_b w[y_b] can be far from B: the value tolerance scales
    weight = (opts or {}).get("weight")
    w_scale = 1.0 if weight is None else (weight.abs().max() / weight[y].sum() * case.B).item()
    for a, b in zip((loss, dis, div, logits), ref):
        assert a.dtype == b.dtype == acc and a.shape == b.shape and a.device == b.device
        assert_value_close(a, b, HW=case.HW, coeff=(alpha + beta) * max(1.0, w_scale))
    w = torch.ones(case.K, dtype=F64) if weight is None else weight.double().cpu()
    expected_sums = torch.stack([w[y.cpu()].sum(), w.sum()]).to(weight_sums)
    assert weight_sums.shape == (2,) and weight_sums.dtype == acc
    torch.testing.assert_close(weight_sums, expected_sums)
    assert lse.shape == (case.B, 2) and lse.dtype == acc
    assert_value_close(lse, lse_of(ref.logits.detach()), HW=case.HW)
    # lse is that of the logits returned: the max exactly, the log-sum to rounding
    assert torch.equal(lse[:, 0], logits.amax(-1))
    assert_value_close(lse[:, 1], lse_of(logits)[:, 1])
    assert drawn.dtype == torch.bool and drawn.shape == (0,), drawn
    if not bwd:
        return out
    per_sample = (opts or {}).get("reduction") == "none"
    for grads in grad_patterns(case.B, case.K, x.device, acc, per_sample):
        dx = op_backward(
            grads,
            xd,
            y,
            case.counts,
            mask,
            logits,
            lse,
            alpha,
            beta,
            kw.get("max_group"),
            opts,
            weight_sums,
        )
        assert_like_x(dx, x)
        total = weighted_sum(ref, grads)
        if total is None:
            assert (dx == 0).all()
            continue
        (dx_ref,) = torch.autograd.grad(total, x, retain_graph=True)
        scale = max(1.0, w_scale) * (case.B if (opts or {}).get("reduction") == "sum" else 1)
        assert_grad_close(dx, dx_ref, grad_terms(x, case.counts, grads, alpha, beta) * scale)
    return out


OP_CASES = [
    "uniform_14x14",
    "uneven_5x9",
    "balanced_5x9",
    "map_1x1",
    "cnum64_9x9",
    "row_1x8",
    "uneven64_9x9",
    "cnum1_7x7",
]


def op_params(case_names=OP_CASES):
    out = []
    for device in DEVICES:
        for dtype in DTYPES:
            for name in case_names:
                for layout in ("contiguous", "channels_last"):
                    bwd = grad_feasible(CASES[name], dtype)
                    out.append(
                        pytest.param(
                            device,
                            dtype,
                            CASES[name],
                            layout,
                            bwd,
                            id=f"{device}-{str(dtype)[6:]}-{name}-{layout}-"
                            f"{'fwdbwd' if bwd else 'fwd'}",
                        )
                    )
    return out


@fused_only
@pytest.mark.parametrize(ARGS, op_params())
def test_loss_ops_direct(device, dtype, case, layout, bwd):
    # the two ops as the C++ autograd calls them, every upstream gradient pattern, a shared
    # bool mask and a per-sample mask in x's dtype
    x = make_features(case, dtype, device, layout, for_grad=bwd)
    y = random_targets(case.B, case.K, device)
    alpha, beta = 0.5 + torch.rand(()).item(), 10.0 * torch.rand(()).item()
    shared = torch.rand(case.C, device=device) < 0.5
    per_sample = (torch.rand(case.B, case.C, device=device) < 0.5).to(dtype)
    for mask in (shared, per_sample):
        check_ops_against_reference(x, y, case, mask, alpha, beta, bwd)
    # autograd through the op: loss, dis, div and logits carry a gradient; lse and the drawn
    # mask do not; the gradient is mc_loss_backward's
    out = op_forward(x, y, case.counts, shared, alpha, beta)
    assert all(t.requires_grad for t in out[:4]), [t.requires_grad for t in out]
    assert not any(t.requires_grad for t in out[4:])
    if bwd:
        acc = F64 if dtype == F64 else F32
        grads = grad_patterns(case.B, case.K, device, acc)[0]
        dx = grad_of(weighted_sum(out, grads), x)
        dx_op = op_backward(
            grads, x.detach(), y, case.counts, shared, out[3].detach(), out[4], alpha, beta
        )
        assert torch.equal(dx, dx_op)
        # the gradient of a sum of the logits arrives expanded (stride 0)
        out = op_forward(x, y, case.counts, shared, alpha, beta)
        ref = R.mc_loss(x, y, case.K, case.cnum, mask=shared, alpha=alpha, beta=beta)
        assert_grad_close(
            grad_of(out[3].sum(), x),
            grad_of(ref.logits.sum(), x),
            mc_terms(x, case.counts, case.B, 0),
        )


# pooling (CCAP), class weights, label smoothing and the three reductions, in combinations
# that between them take every option on and off
LOSS_OPTIONS = {
    "avg": dict(pooling="avg"),
    "avg-none": dict(pooling="avg", reduction="none"),
    "weight-smoothing": dict(weight="rand", label_smoothing=0.2),
    "weight-sum": dict(weight="rand", reduction="sum"),
    "smoothing-none": dict(label_smoothing=0.1, reduction="none"),
    "avg-weight-smoothing-none": dict(
        pooling="avg", weight="rand", label_smoothing=0.3, reduction="none"
    ),
    "smoothing-sum": dict(label_smoothing=0.15, reduction="sum"),
    "weight": dict(weight="rand"),
}
OPTION_CASES = ["uniform_14x14", "uneven_5x9", "map_1x1", "cnum64_9x9"]


@fused_only
@pytest.mark.parametrize(ARGS, op_params(OPTION_CASES))
def test_loss_ops_options(device, dtype, case, layout, bwd):
    # every option combination through the two ops against the reference, forward and every
    # upstream gradient pattern; then through mc.mc_loss and autograd, against the reference
    x = make_features(case, dtype, device, layout, for_grad=bwd)
    y = random_targets(case.B, case.K, device)
    mask = torch.rand(case.C, device=device) < 0.5
    for opts in LOSS_OPTIONS.values():
        opts = dict(opts)
        if opts.get("weight") == "rand":
            opts["weight"] = 0.25 + torch.rand(case.K, device=device)
        check_ops_against_reference(x, y, case, mask, 1.5, 20.0, bwd, opts=opts)
        out = mc.mc_loss(x, y, case.K, case.cnum, mask=mask, **opts)
        ref = R.mc_loss(x, y, case.K, case.cnum, mask=mask, **opts)
        per_sample = opts.get("reduction") == "none"
        for a, b in zip(out, ref):
            assert a.shape == b.shape == ((case.B,) if per_sample and a.dim() < 2 else b.shape)
        if bwd:
            g = torch.randn(out.loss.shape, device=device, dtype=out.loss.dtype)
            assert_grad_close(
                grad_of((out.loss * g).sum(), x),
                grad_of((ref.loss * g).sum(), x),
                mc_terms(x, case.counts, 1.5 * 4, 20.0)
                * (case.B if opts.get("reduction") == "sum" else 1),
            )


@fused_only
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32, F64, BF16])
def test_max_group_larger_than_needed(device, dtype):
    # max_group only bounds the groups (it sizes the kernels' tiles): any larger value, up to
    # C, gives the same results
    case = Case(3, 4, (1, 4, 2, 5), 12, 5, 7)
    x = make_features(case, dtype, device)
    y = random_targets(case.B, case.K, device)
    mask = torch.rand(case.B, case.C, device=device) < 0.5
    base = check_ops_against_reference(x, y, case, mask, 1.5, 20.0, True)
    acc = F64 if dtype == F64 else F32
    grads = grad_patterns(case.B, case.K, device, acc)[0]
    dx0 = op_backward(grads, x.detach(), y, case.counts, mask, base[3], base[4])
    for mg in (6, 11, 12):
        out = check_ops_against_reference(x, y, case, mask, 1.5, 20.0, True, max_group=mg)
        for a, b in zip(out[:5], base[:5]):
            assert_value_close(a, b, HW=case.HW, coeff=21.5)
        dx = op_backward(grads, x.detach(), y, case.counts, mask, out[3], out[4], max_group=mg)
        assert_grad_close(dx, dx0, grad_terms(x, case.counts, grads, 1.5, 20.0))


def expected_drops(counts, drop, drop_fraction):
    if drop >= 0:
        return [min(n, drop) for n in counts]
    return [min(n, int(math.floor(n * drop_fraction))) for n in counts]


def assert_drawn(drawn, counts, drops, rows):
    """drawn: bool, (C,) for rows=None (one mask for the batch) or (rows, C), exactly drops[i]
    False in every row and group i."""
    shape = (sum(counts),) if rows is None else (rows, sum(counts))
    assert drawn.dtype == torch.bool and drawn.shape == shape, drawn.shape
    drawn = drawn.reshape(-1, sum(counts))
    rows = drawn.shape[0]
    bounds = offsets_of(counts, "cpu").tolist()
    dropped = torch.stack(
        [(~drawn[:, a:b]).sum(1) for a, b in zip(bounds[:-1], bounds[1:])], 1
    ).cpu()
    want = torch.tensor(drops).expand(rows, -1)
    assert torch.equal(dropped, want), (dropped, want)


# (counts, drop, drop_fraction): the published default floor(n_i / 2); an int drop for every
# group (a group of one drops its only channel: the op clamps, it does not refuse); other
# fractions; drop and fraction past the group sizes (clamped: everything dropped); nothing
DRAW_CASES = {
    "uniform-default": ((3, 3, 3, 3), -1, 0.5),
    "uneven-default": ((1, 4, 2, 7, 5), -1, 0.5),
    "uneven-drop1": ((1, 4, 2, 7, 5), 1, 0.5),
    "uneven-quarter": ((1, 4, 2, 7, 5), -1, 0.25),
    "drop-above-n": ((4, 8, 1), 10, 0.5),
    "fraction-1": ((5, 2, 3), -1, 1.0),
    "drop0": ((6, 2), 0, 0.5),
    "fraction0": ((6, 2), -1, 0.0),
}


@fused_only
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("draw", list(DRAW_CASES))
def test_mask_drawn_inside_the_op(device, per_sample, draw):
    counts, drop, frac = DRAW_CASES[draw]
    case = Case(3, len(counts), counts, sum(counts), 4, 5)
    x = make_features(case, F32, device, for_grad=False).detach()
    y = random_targets(case.B, case.K, device)
    seed = entropy_seed()
    print(f"generator seed {seed}")
    gen = lambda: torch.Generator(device=device).manual_seed(seed)  # noqa: E731
    kw = dict(drop=drop, drop_fraction=frac, per_sample=per_sample)
    out = op_forward(x, y, counts, None, generator=gen(), **kw)
    drawn = out[5]
    rows = case.B if per_sample else None
    assert_drawn(drawn, counts, expected_drops(counts, drop, frac), rows)
    assert drawn.device == x.device
    # the same generator state: bitwise the same outputs, the mask included
    again = op_forward(x, y, counts, None, generator=gen(), **kw)
    for i, (a, b) in enumerate(zip(out, again)):
        assert torch.equal(a, b), i
    # the results are those of the drawn mask passed in, as bool and as 0/1 in x's dtype
    for mask in (drawn, drawn.to(x.dtype)):
        explicit = op_forward(x, y, counts, mask)
        for i, (a, b) in enumerate(zip(out[:5], explicit[:5])):
            assert torch.equal(a, b), i
    ref = R.mc_loss(x, y, case.K, case.cnum, mask=drawn)
    for a, b in zip(out[:4], ref):
        assert_value_close(a, b, coeff=21.5)
    # the default generator of the device when none is given
    torch.manual_seed(seed)
    first = op_forward(x, y, counts, None, **kw)
    torch.manual_seed(seed)
    second = op_forward(x, y, counts, None, **kw)
    assert_drawn(first[5], counts, expected_drops(counts, drop, frac), rows)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@fused_only
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32, F64, BF16])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_drawn_mask_backward(device, dtype, per_sample):
    # autograd through ops.mc_loss with mask=None: the gradient of the mask it drew, as
    # mc_loss_backward computes it from drawn_mask, and as the reference computes it
    case = Case(3, 4, (3, 1, 5, 3), 12, 4, 5)
    x = make_features(case, dtype, device)
    y = random_targets(case.B, case.K, device)
    seed = entropy_seed()
    print(f"generator seed {seed}")
    acc = F64 if dtype == F64 else F32
    drawn = None
    for grads in grad_patterns(case.B, case.K, device, acc)[:5]:
        gen = torch.Generator(device=device).manual_seed(seed)
        out = op_forward(x, y, case.counts, None, 0.7, 3.0, per_sample=per_sample, generator=gen)
        if drawn is None:
            drawn = out[5]
        assert torch.equal(out[5], drawn)
        dx = grad_of(weighted_sum(out, grads), x)
        dx_op = op_backward(
            grads, x.detach(), y, case.counts, drawn, out[3].detach(), out[4], 0.7, 3.0
        )
        assert torch.equal(dx, dx_op)
        ref = R.mc_loss(x, y, case.K, case.cnum, mask=drawn, alpha=0.7, beta=3.0)
        assert_grad_close(
            dx, grad_of(weighted_sum(ref, grads), x), grad_terms(x, case.counts, grads, 0.7, 3.0)
        )


@fused_only
@pytest.mark.parametrize("device", DEVICES)
def test_drawn_masks_are_fresh_and_leave_other_generators_alone(device):
    # 40 groups of 3 with 1 dropped: 3^40 masks, two draws agree by chance with odds 1e-19
    counts = [3] * 40
    case = Case(2, 40, 3, 120, 2, 3)
    x = make_features(case, F32, device, for_grad=False).detach()
    y = random_targets(case.B, case.K, device)
    seed = entropy_seed()
    print(f"generator seed {seed}")
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state() if torch.device(device).type == "cuda" else None
    gen = torch.Generator(device=device).manual_seed(seed)
    a = op_forward(x, y, counts, None, generator=gen)[5]
    b = op_forward(x, y, counts, None, generator=gen)[5]  # the generator moved on
    c = op_forward(
        x, y, counts, None, generator=torch.Generator(device=device).manual_seed(seed + 1)
    )[5]
    assert not torch.equal(a, b) and not torch.equal(a, c)
    # a generator given: the default one is not touched
    assert torch.equal(torch.get_rng_state(), cpu_state)
    if cuda_state is not None:
        assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    # the default generator moves on from one call to the next too
    torch.manual_seed(seed)
    d = op_forward(x, y, counts, None)[5]
    e = op_forward(x, y, counts, None)[5]
    assert not torch.equal(d, e)


@fused_only
@pytest.mark.parametrize("device", DEVICES)
def test_drawn_masks_are_uniform_and_independent(device):
    # per-sample draws over 1200 rows: group 0 (4 channels, 2 dropped: 6 pairs), group 1 (3
    # channels, 1 dropped) and group 2 (4 channels, 2 dropped): every choice about equally
    # often (standard error about 0.011 for 1/6), the groups of a row independent of each
    # other, rows independent of each other and of the next call's rows (no counter reuse)
    B, counts = 1200, [4, 3, 4]
    case = Case(B, 3, counts, 11, 1, 1)
    x = make_features(case, F32, device, for_grad=False).detach()
    y = random_targets(B, 3, device)
    gen = torch.Generator(device=device).manual_seed(entropy_seed())
    first = op_forward(x, y, counts, None, per_sample=True, generator=gen)[5].cpu()
    second = op_forward(x, y, counts, None, per_sample=True, generator=gen)[5].cpu()
    weights = torch.tensor([1, 2, 4, 8])
    for drawn in (first, second):
        assert_drawn(drawn, counts, [2, 1, 2], B)
        code0 = ((~drawn[:, 0:4]).long() * weights).sum(1)
        code1 = ((~drawn[:, 4:7]).long() * weights[:3]).sum(1)
        code2 = ((~drawn[:, 7:11]).long() * weights).sum(1)
        pairs = torch.tensor([a + b for a, b in itertools.combinations([1, 2, 4, 8], 2)])
        for code in (code0, code2):
            share = (code[:, None] == pairs).double().mean(0)
            assert (share - 1 / 6).abs().max() < 0.05, share
        share = (code1[:, None] == torch.tensor([1, 2, 4])).double().mean(0)
        assert (share - 1 / 3).abs().max() < 0.06, share
        # two groups of the same size draw independently: equal in about 1/6 of the rows
        assert (code0 == code2).double().mean() < 0.26
        joint = ((code0[:, None] == pairs) & (code1[:, None] == 1)).double().mean(0)
        assert (joint - 1 / 18).abs().max() < 0.035, joint
    # neither call repeats rows of the other, shifted or not
    for shift in range(-3, 4):
        a = first[max(shift, 0) : B + min(shift, 0)]
        b = second[max(-shift, 0) : B + min(-shift, 0)]
        assert (a == b).all(1).double().mean() < 0.2, shift
    # the shared draw (one row per call) is uniform over calls too (1200 calls: the bound is
    # then over 7 standard errors of a share, which a fair draw does not reach by chance)
    codes = torch.stack(
        [
            (
                (~op_forward(x[:1], y[:1], counts, None, generator=gen)[5][:4]).long().cpu()
                * weights
            ).sum()
            for _ in range(1200)
        ]
    )
    share = (codes[:, None] == pairs).double().mean(0)
    assert (share - 1 / 6).abs().max() < 0.08, share


# ----------------------------------------------------------------------------------------------
# the fused ops are what runs


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()
        self.aten = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "mcloss_cuda" in str(func):
            self.ops.add(str(func.overloadpacket).split(".")[-1])
        else:
            self.ops.add("aten")
            self.aten.add(str(func.overloadpacket).split(".")[-1])
        return func(*args, **(kwargs or {}))


FUSED_LOSS = {"mc_loss", "mc_loss_backward"}
# aten ops that would draw a mask in Python (what the fused path no longer does)
RANDOM_OPS = {
    "rand",
    "rand_like",
    "randn",
    "randint",
    "randperm",
    "uniform_",
    "bernoulli",
    "bernoulli_",
    "multinomial",
    "normal_",
    "random_",
    "argsort",
    "sort",
}


@fused_only
@pytest.mark.parametrize("device", DEVICES)
def test_public_functions_dispatch_to_fused_ops(device):
    # forward and backward run our ops (either the fused loss or the primitives), not aten's
    case = Case(2, 2, 3, 6, 4, 4)
    x = make_features(case, F32, device)
    y = random_targets(case.B, case.K, device)
    mask = torch.rand(case.C, device=device) < 0.5
    calls = [
        (lambda: mc.spatial_softmax(x).sum(), [{"spatial_softmax", "spatial_softmax_backward"}]),
        (lambda: (mc.channel_mask(x, mask) * x.detach()).sum(), [{"channel_mask"}]),
        (lambda: mc.ccmp(x, 3).sum(), [{"ccmp", "ccmp_backward"}]),
        (
            lambda: mc.diversity_loss(x, 2),
            [FUSED_LOSS, {"spatial_softmax", "spatial_softmax_backward", "ccmp", "ccmp_backward"}],
        ),
        (
            lambda: mc.discriminality_logits(x, 2, mask).sum(),
            [FUSED_LOSS, {"channel_mask", "ccmp", "ccmp_backward"}],
        ),
        (lambda: mc.mc_loss(x, y, 2, mask=mask).loss, [FUSED_LOSS]),
        (lambda: mc.mc_loss(x, y, 2).loss, [FUSED_LOSS]),
        (lambda: mc.mc_loss(x, y, 2, per_sample_mask=True, drop=2).loss, [FUSED_LOSS]),
    ]
    for fn, alternatives in calls:
        with OpRecorder() as rec:
            grad_of(fn(), x)
        assert any(ops <= rec.ops for ops in alternatives), (alternatives, rec.ops)
    # with no mask given, the fused loss draws it inside its op: no random aten op runs
    for kw in (
        dict(),
        dict(per_sample_mask=True),
        dict(drop=1),
        dict(generator=torch.Generator(device=device).manual_seed(1)),
    ):
        with OpRecorder() as rec:
            grad_of(mc.mc_loss(x, y, 2, **kw).loss, x)
        assert "mc_loss" in rec.ops and not rec.aten & RANDOM_OPS, (kw, rec.aten)


# ----------------------------------------------------------------------------------------------
# gradcheck (float64)

GC_CASES = {
    "uniform": (Case(2, 2, 2, 4, 2, 3), "contiguous"),
    "uneven": (Case(2, 3, (1, 3, 2), 6, 2, 2), "contiguous"),
    "uneven_cl": (Case(2, 2, (3, 1), 4, 3, 2), "channels_last"),
    "balanced_cl": (Case(1, 2, None, 5, 3, 1), "channels_last"),
    "map1x1": (Case(2, 2, 2, 4, 1, 1), "contiguous"),
    "transposed": (Case(1, 2, 2, 4, 2, 3), "transposed"),
}
# gradcheck's tolerances (test_ops.py's test_gradcheck of every op, and the check below)
GC_TOL = dict(eps=1e-6, atol=1e-7, rtol=1e-5)


def gc_input(case, layout, device):
    # separated_features: no two channels of a group within 1/8 of each other at a position, no
    # value 0, so a 1e-6 perturbation never changes a winner
    x = (
        separated_features(case.B, case.counts, case.H, case.W, dtype=F64, device=device)
        if case.HW > 1
        else random_features(case.B, case.C, 1, 1, dtype=F64, device=device)
    )
    if case.HW == 1:  # a raw max with no near-tie: spread the channels apart
        x = x + torch.arange(case.C, device=device, dtype=F64).view(1, -1, 1, 1) * 0.37
    return apply_layout(x, layout).detach().requires_grad_()


@fused_only
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_can_fail(device):
    # the tolerances of the ops' gradchecks (GC_TOL) are tight enough to catch a backward off
    # by 0.1%
    case, layout = GC_CASES["uneven"]
    x = gc_input(case, layout, device)

    class Wrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 1.001

    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(
            lambda t: mc.diversity_loss(Wrong.apply(t), case.K, case.cnum),
            (x,),
            **GC_TOL,
        )


# ----------------------------------------------------------------------------------------------
# threads, saved tensors


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_all(x, y, case, mask, grads):
    ops = torch.ops.mcloss_cuda
    offsets = offsets_of(case.counts, x.device)
    xd = x.detach()
    out = mc.mc_loss(x, y, case.K, case.cnum, mask=mask)
    fwd = op_forward(xd, y, case.counts, mask)
    drawn = op_forward(
        xd,
        y,
        case.counts,
        None,
        per_sample=True,
        generator=torch.Generator(device=x.device).manual_seed(7),
    )
    return {
        "mc_loss": fwd,
        "mc_loss_backward": tuple(
            op_backward(g, xd, y, case.counts, mask, fwd[3], fwd[4]) for g in grads
        ),
        "mc_loss drawn": drawn,
        "spatial_softmax": ops.spatial_softmax(xd),
        "ccmp": ops.ccmp(xd, offsets),
        "loss": out.loss.detach(),
        "grad": grad_of(out.loss, x),
    }


@fused_only
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32, F64, BF16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_parallel_split(two_threads, device, dtype, layout):
    # enough groups and channel rows that at::parallel_for (grain 2^15 elements) splits the
    # work over both threads; the results must match the reference and, bit for bit, one thread
    assert torch.get_num_threads() == 2
    case = Case(8, 50, 3, 150, 8, 14) if dtype == BF16 else Case(8, 50, (2, 4) * 25, 150, 14, 14)
    x = make_features(case, dtype, device, layout)
    y = random_targets(case.B, case.K, device)
    mask = torch.rand(case.B, case.C, device=device) < 0.5
    acc = F64 if dtype == F64 else F32
    grads = grad_patterns(case.B, case.K, device, acc)[:5]
    two = run_all(x, y, case, mask, grads)
    out, ref = (
        mc.mc_loss(x, y, case.K, case.cnum, mask=mask),
        R.mc_loss(x, y, case.K, case.cnum, mask=mask),
    )
    for field in out._fields:
        assert_value_close(getattr(out, field), getattr(ref, field))
    assert_grad_close(two["grad"], grad_of(ref.loss, x), mc_terms(x, case.counts, 1.5, 20.0))
    # the ops themselves, over both threads: the outputs (lse from the reference's logits) and
    # dx for upstream gradients with and without None, against autograd through the reference
    ref = R.mc_loss(x, y, case.K, case.cnum, mask=mask)
    for a, b in zip(two["mc_loss"][:4], ref):
        assert_value_close(a, b, HW=case.HW, coeff=21.5)
    assert_value_close(two["mc_loss"][4], lse_of(ref.logits.detach()), HW=case.HW)
    for g, dx in zip(grads, two["mc_loss_backward"]):
        (dx_ref,) = torch.autograd.grad(weighted_sum(ref, g), x, retain_graph=True)
        assert_grad_close(dx, dx_ref, grad_terms(x, case.counts, g, 1.5, 20.0))
    assert_drawn(two["mc_loss drawn"][5], case.counts, [n // 2 for n in case.counts], case.B)
    assert_map_close(two["spatial_softmax"], R.spatial_softmax(x.detach()))
    assert torch.equal(two["ccmp"], R.ccmp(x.detach(), list(case.counts)))
    torch.set_num_threads(1)
    one = run_all(x, y, case, mask, grads)
    torch.set_num_threads(2)
    for key in two:
        a, b = two[key], one[key]
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert torch.equal(u, v), f"{key}: 1 and 2 threads differ"


@fused_only
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [F32, F16])
def test_saves_only_the_features(device, layout, dtype):
    B, K, cnum, H, W = 8, 200, 3, 14, 14
    x = apply_layout(torch.randn(B, K * cnum, H, W, device=device).to(dtype), layout)
    x.requires_grad_()
    y = random_targets(B, K, device)
    out, nbytes, shapes, saw_x = saved_for_backward(lambda: mc.mc_loss(x, y, K, cnum), x)
    feature_bytes = x.numel() * x.element_size()
    assert saw_x, "the features themselves are expected to be saved for the recomputing backward"
    assert nbytes <= 0.02 * feature_bytes, (nbytes, feature_bytes, shapes)
    assert all(torch.Size(s).numel() < x.numel() for s in shapes), shapes
    # the backward still works from what was saved
    assert grad_of(out.loss, x).shape == x.shape
    # the measurement is not vacuous: the reference saves several B x C x H x W tensors
    ref_bytes = saved_for_backward(lambda: R.mc_loss(x, y, K, cnum), x).nbytes
    assert ref_bytes > feature_bytes


# ----------------------------------------------------------------------------------------------
# the baseline (non-AVX2) CPU kernels, selected once per process by MCLOSS_CPU_ISA


@fused_only
def test_baseline_isa_kernels_match_reference():
    script = textwrap.dedent("""
        import os, torch
        import mcloss_cuda as mc
        from helpers import separated_features
        R = mc.reference
        torch.manual_seed(int(os.environ["SEED"]))
        torch.set_num_threads(1)
        assert mc.backend("cpu") == "cpu"
        for dtype, tol, atol in ((torch.float32, 2e-6, 1e-7), (torch.float64, 1e-12, 1e-12),
                                 (torch.float16, 2e-3, 1e-5), (torch.bfloat16, 2e-2, 1e-4)):
            counts = [3, 1, 4]
            for cl in (False, True):
                x = separated_features(2, counts, 5, 7, dtype=dtype, channels_last=cl)
                x.requires_grad_()
                y = torch.randint(0, 3, (2,))
                m = torch.rand(2, 8) < 0.5
                o, r = mc.mc_loss(x, y, 3, counts, mask=m), R.mc_loss(x, y, 3, counts, mask=m)
                for a, b in zip(o, r):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
                ga, = torch.autograd.grad(o.loss, x)
                gb, = torch.autograd.grad(r.loss, x)
                # term size (see mc_terms): a one-channel group's gradient cancels to ~0
                pmax = torch.softmax(x.detach().double().flatten(2), -1).max().item()
                s = max(gb.abs().max().item(), 20.0 * pmax / (2 * 3 * 1) + 1.5 / (2 * 35))
                torch.testing.assert_close(ga, gb, rtol=tol, atol=atol + tol * s)
                p, q = mc.spatial_softmax(x), R.spatial_softmax(x)
                torch.testing.assert_close(p, q, rtol=tol, atol=1e-7)
                assert torch.equal(mc.ccmp(x, counts), R.ccmp(x, counts))
        print("baseline ok")
    """)
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"SEED={seed}")
    env = child_env(MCLOSS_CPU_ISA="default", SEED=str(seed))
    res = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        cwd=os.path.dirname(os.path.abspath(__file__)),
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "baseline ok" in res.stdout


# ----------------------------------------------------------------------------------------------
# CUDA only: the device kernels against the CPU kernels


@cuda_only
@fused_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_matches_cpu_kernels(dtype, layout):
    assert mc.backend("cuda") == "cuda"
    case = Case(5, 7, (3, 5, 1, 2, 3, 2, 4), 20, 8, 8)
    x_cpu = make_features(case, dtype, "cpu", layout)
    x_gpu = x_cpu.detach().cuda().requires_grad_()
    assert x_gpu.is_contiguous(memory_format=torch.channels_last) == x_cpu.is_contiguous(
        memory_format=torch.channels_last
    )
    y = random_targets(case.B, case.K)
    mask = torch.rand(case.B, case.C) < 0.5
    oc = mc.mc_loss(x_cpu, y, case.K, case.cnum, mask=mask)
    og = mc.mc_loss(x_gpu, y.cuda(), case.K, case.cnum, mask=mask.cuda())
    for a, b in zip(og, oc):
        assert_value_close(a.cpu(), b)
    assert_grad_close(
        grad_of(og.loss, x_gpu).cpu(),
        grad_of(oc.loss, x_cpu),
        mc_terms(x_cpu, case.counts, 1.5, 20.0),
    )
    torch.cuda.synchronize()

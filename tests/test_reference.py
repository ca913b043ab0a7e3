"""Tests of the MC-Loss numbers: small cases worked out by hand, the published formulation on
random inputs, and uneven channel groups against a slow per-group loop.

Every case runs on ``mc.reference`` (the pure-PyTorch oracle) and on the public ``mc``
functions (the fused kernels where they are built, else the reference again).
Random inputs are fresh every run: each test seeds torch from the OS entropy pool and prints
the seed, so a failure can be replayed with ``torch.manual_seed(<seed>)``.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import mcloss_cuda as mc
from helpers import DEVICES, GRAD_TOL, VALUE_TOL, counts_of, random_targets, separated_features
from published_formulation import published_mc_loss

IMPLS = [pytest.param(mc.reference, id="reference"), pytest.param(mc, id="public")]
F64 = torch.float64
EXACT = dict(rtol=1e-12, atol=1e-12)  # hand-computed float64 cases
TIGHT = dict(rtol=1e-10, atol=1e-10)  # float64 against another float64 formulation


def t64(values, device):
    return torch.tensor(values, dtype=F64, device=device)


# ----------------------------------------------------------------------------------------------
# (a) one class, two channels, a 2x1 map
#
#   x[0, 0, :, 0] = [1, 1 + ln 3]      softmax: [e, 3e] / 4e        = [1/4, 3/4]
#   x[0, 1, :, 0] = [2 + ln 4, 2]      softmax: [4e^2, e^2] / 5e^2  = [4/5, 1/5]

LN3, LN4 = math.log(3.0), math.log(4.0)


def case_a(device):
    x = t64([[[[1.0], [1.0 + LN3]], [[2.0 + LN4], [2.0]]]], device)  # (1, 2, 2, 1)
    return x.requires_grad_()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_hand_a_spatial_softmax(impl, device):
    x = case_a(device)
    p = impl.spatial_softmax(x)
    assert p.shape == (1, 2, 2, 1)
    torch.testing.assert_close(p, t64([[[[1 / 4], [3 / 4]], [[4 / 5], [1 / 5]]]], device), **EXACT)
    # upstream g = [1, 0] on both channels; dx = p * (g - sum_k g_k p_k):
    #   ch0: sum g p = 1/4 -> [1/4 * 3/4, 3/4 * (-1/4)] = [3/16, -3/16]
    #   ch1: sum g p = 4/5 -> [4/5 * 1/5, 1/5 * (-4/5)] = [4/25, -4/25]
    g = t64([[[[1.0], [0.0]], [[1.0], [0.0]]]], device)
    (dx,) = torch.autograd.grad(p, x, g)
    torch.testing.assert_close(
        dx, t64([[[[3 / 16], [-3 / 16]], [[4 / 25], [-4 / 25]]]], device), **EXACT
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_hand_a_ccmp(impl, device):
    x = case_a(device)
    z = impl.ccmp(x, 2)
    # position 0: max(1, 2 + ln 4) = 2 + ln 4 (channel 1); position 1: max(1 + ln 3, 2) = 1 + ln 3
    # (channel 0, since ln 3 > 1)
    assert z.shape == (1, 1, 2, 1)
    torch.testing.assert_close(z, t64([[[[2.0 + LN4], [1.0 + LN3]]]], device), **EXACT)
    # upstream [5, 7]: 5 goes to channel 1 at position 0, 7 to channel 0 at position 1
    (dx,) = torch.autograd.grad(z, x, t64([[[[5.0], [7.0]]]], device))
    torch.testing.assert_close(dx, t64([[[[0.0], [7.0]], [[5.0], [0.0]]]], device), **EXACT)
    # the same with cnum given as per-class counts
    torch.testing.assert_close(impl.ccmp(x, [2]), z, **EXACT)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_hand_a_diversity(impl, device):
    x = case_a(device)
    div = impl.diversity_loss(x, 1)
    # CCMP of the softmax: [max(1/4, 4/5), max(3/4, 1/5)] = [4/5 (ch1), 3/4 (ch0)]
    # h = 4/5 + 3/4 = 31/20;  L_div = 1 - h / 2 = 1 - 31/40 = 9/40
    assert div.dim() == 0
    torch.testing.assert_close(div, t64(9 / 40, device), **EXACT)
    # d L_div / dx = -(1/2) dh/dx, h = p0[1] + p1[0], dp[j]/dx[k] = p[j] (delta_jk - p[k]):
    #   ch0: dp0[1]/dx0 = 3/4 * [-1/4, 1 - 3/4]        = [-3/16, 3/16]   -> [3/32, -3/32]
    #   ch1: dp1[0]/dx1 = 4/5 * [1 - 4/5, -1/5]        = [4/25, -4/25]   -> [-2/25, 2/25]
    (dx,) = torch.autograd.grad(div, x)
    torch.testing.assert_close(
        dx, t64([[[[3 / 32], [-3 / 32]], [[-2 / 25], [2 / 25]]]], device), **EXACT
    )


# (mask, logits by hand, gradient of the logit by hand)
HAND_A_MASKS = [
    # no channel masked: [max(1, 2+ln4), max(1+ln3, 2)] = [2+ln4 (ch1), 1+ln3 (ch0)]
    # logit = (3 + ln 12) / 2; each winner gets 1/HW = 1/2 times its mask value 1
    ([1.0, 1.0], (3.0 + math.log(12.0)) / 2, [[0.0, 0.5], [0.5, 0.0]]),
    # channel 1 masked (bool mask): ch1 -> [0, 0]; [max(1, 0), max(1+ln3, 0)] = both ch0
    # logit = (2 + ln 3) / 2
    ([True, False], (2.0 + LN3) / 2, [[0.5, 0.5], [0.0, 0.0]]),
    # channel 0 masked: ch0 -> [0, 0]; [2 + ln 4, 2] both ch1; logit = (4 + ln 4) / 2 = 2 + ln 2
    ([0.0, 1.0], 2.0 + math.log(2.0), [[0.0, 0.0], [0.5, 0.5]]),
]


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("mask_values, logit, grad", HAND_A_MASKS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_hand_a_logits(impl, device, mask_values, logit, grad, per_sample):
    x = case_a(device)
    dtype = torch.bool if isinstance(mask_values[0], bool) else F64
    mask = torch.tensor(mask_values, dtype=dtype, device=device)
    if per_sample:
        mask = mask[None]
    logits = impl.discriminality_logits(x, 1, mask)
    assert logits.shape == (1, 1)
    torch.testing.assert_close(logits, t64([[logit]], device), **EXACT)
    (dx,) = torch.autograd.grad(logits.sum(), x)
    torch.testing.assert_close(dx, t64(grad, device).view(1, 2, 2, 1), **EXACT)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_hand_a_mc_loss(impl, device):
    x = case_a(device)
    y = torch.zeros(1, dtype=torch.int64, device=device)
    out = impl.mc_loss(x, y, 1, 2, mask=torch.ones(2, device=device, dtype=F64))
    # one class: cross-entropy of a single logit is -log(1) = 0; loss = 1.5*0 + 20 * 9/40 = 4.5
    torch.testing.assert_close(out.dis, t64(0.0, device), **EXACT)
    torch.testing.assert_close(out.div, t64(9 / 40, device), **EXACT)
    torch.testing.assert_close(out.loss, t64(4.5, device), **EXACT)
    torch.testing.assert_close(out.logits, t64([[(3.0 + math.log(12.0)) / 2]], device), **EXACT)
    # the dis gradient is softmax - onehot = 1 - 1 = 0, so dloss/dx = 20 * dL_div/dx:
    #   ch0: 20 * [3/32, -3/32] = [15/8, -15/8];  ch1: 20 * [-2/25, 2/25] = [-8/5, 8/5]
    (dx,) = torch.autograd.grad(out.loss, x)
    torch.testing.assert_close(
        dx, t64([[[[15 / 8], [-15 / 8]], [[-8 / 5], [8 / 5]]]], device), **EXACT
    )


# ----------------------------------------------------------------------------------------------
# (b) every kept value of a group negative: the masked channel's 0 wins the max
#
#   K = 2, cnum = 3, a 1x2 map.
#   group 0: ch0 = [-1, -2], ch1 = [-3, -0.5], ch2 = [-4, -6]   mask [1, 0, 1]
#   group 1: ch3 = [ 5, .25], ch4 = [ 2, -1 ], ch5 = [ 1, -3]   mask [0, 1, 1]


def case_b(device):
    x = t64([[[[-1, -2]], [[-3, -0.5]], [[-4, -6]], [[5, 0.25]], [[2, -1]], [[1, -3]]]], device)
    return x.requires_grad_()


MASK_B = [1, 0, 1, 0, 1, 1]


@pytest.mark.parametrize("mask_dtype", [torch.bool, F64, torch.float32])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_hand_b_masked_zero_wins(impl, device, mask_dtype):
    x = case_b(device)
    mask = torch.tensor(MASK_B, device=device).to(mask_dtype)
    y = torch.zeros(1, dtype=torch.int64, device=device)
    out = impl.mc_loss(x, y, 2, 3, mask=mask)
    # group 0 masked: ch0 [-1, -2], ch1 -> [0, 0], ch2 [-4, -6]: max [0, 0] (ch1) -> logit 0
    #   (ignoring the masked channel would give mean(-1, -2) = -1.5 instead)
    # group 1 masked: ch3 -> [0, 0], ch4 [2, -1], ch5 [1, -3]: max [2 (ch4), 0 (ch3)] -> logit 1
    #   (the unmasked ch3 would have won with 5 and .25)
    torch.testing.assert_close(out.logits, t64([[0.0, 1.0]], device), **EXACT)
    # target 0: dis = -log(e^0 / (e^0 + e^1)) = log(1 + e)
    e = math.e
    torch.testing.assert_close(out.dis, t64(math.log(1 + e), device), **EXACT)
    # d dis / d logits = softmax - onehot = [1/(1+e) - 1, e/(1+e)]; the only unmasked winner is
    # ch4 at position 0, which gets e/(1+e) * 1/HW = e / (2 (1 + e)); the masked winners pass
    # their gradient times mask 0, so everything else is 0
    (dx,) = torch.autograd.grad(out.dis, x)
    expected = torch.zeros(1, 6, 1, 2, dtype=F64, device=device)
    expected[0, 4, 0, 0] = e / (2 * (1 + e))
    torch.testing.assert_close(dx, expected, **EXACT)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_hand_b_per_sample_mask(impl, device):
    x1 = case_b(device).detach()
    x = torch.cat([x1, x1]).requires_grad_()  # B = 2, same features
    mask = torch.tensor([MASK_B, [1, 1, 1, 0, 1, 1]], dtype=torch.bool, device=device)
    logits = impl.discriminality_logits(x, 2, mask, 3)
    # sample 0 as above: [0, 1]
    # sample 1, group 0 unmasked: [max(-1, -3, -4), max(-2, -0.5, -6)] = [-1 (ch0), -0.5 (ch1)]
    #   -> logit -0.75; group 1 as above -> 1
    torch.testing.assert_close(logits, t64([[0.0, 1.0], [-0.75, 1.0]], device), **EXACT)
    # gradient of the class-0 logits: sample 0 gets nothing (masked winner), sample 1 gives 1/2
    # to ch0 at position 0 and 1/2 to ch1 at position 1
    (dx,) = torch.autograd.grad(logits[:, 0].sum(), x)
    expected = torch.zeros(2, 6, 1, 2, dtype=F64, device=device)
    expected[1, 0, 0, 0] = 0.5
    expected[1, 1, 0, 1] = 0.5
    torch.testing.assert_close(dx, expected, **EXACT)


# ----------------------------------------------------------------------------------------------
# (c) ties: the gradient goes whole to the lowest-index channel attaining the max


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_hand_c_tie_ccmp_and_logits(impl, device):
    # one group of 3 on a 2x1 map: ch0 = [1, 5], ch1 = [3, 5], ch2 = [3, 2]
    x = t64([[[[1.0], [5.0]], [[3.0], [5.0]], [[3.0], [2.0]]]], device).requires_grad_()
    z = impl.ccmp(x, 3)
    # position 0: ch1 and ch2 tie at 3 -> ch1; position 1: ch0 and ch1 tie at 5 -> ch0
    torch.testing.assert_close(z, t64([[[[3.0], [5.0]]]], device), **EXACT)
    (dx,) = torch.autograd.grad(z, x, t64([[[[2.0], [7.0]]]], device))
    torch.testing.assert_close(
        dx, t64([[[[0.0], [7.0]], [[2.0], [0.0]], [[0.0], [0.0]]]], device), **EXACT
    )
    logits = impl.discriminality_logits(x, 1, torch.ones(3, dtype=torch.bool, device=device))
    torch.testing.assert_close(logits, t64([[4.0]], device), **EXACT)  # (3 + 5) / 2
    (dx,) = torch.autograd.grad(logits.sum(), x)
    torch.testing.assert_close(
        dx, t64([[[[0.0], [0.5]], [[0.5], [0.0]], [[0.0], [0.0]]]], device), **EXACT
    )


# ties between a masked channel's 0 and a kept 0: (x, mask, gradient of the logit)
TIE_MASKED = [
    # masked ch0 first: position 0 ties ch0 (0) / ch1 (0), position 1 ties ch0 (0) / ch2 (0);
    # ch0 wins both, and passes its gradient times mask 0: all zero (ch1/ch2 would get 1/2)
    ([[7.0, 7.0], [0.0, -1.0], [-2.0, 0.0]], [0, 1, 1], [[0, 0], [0, 0], [0, 0]]),
    # masked ch1 between: position 0 ties ch0 (0, kept) / ch1 (0) -> ch0 gets 1/2;
    # position 1 ties ch1 (0, masked) / ch2 (0) -> ch1 wins, gradient 0, ch2 gets nothing
    ([[0.0, -1.0], [7.0, 7.0], [-3.0, 0.0]], [1, 0, 1], [[0.5, 0], [0, 0], [0, 0]]),
]


@pytest.mark.parametrize("xv, maskv, grad", TIE_MASKED)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_hand_c_tie_with_masked_zero(impl, device, xv, maskv, grad):
    x = t64(xv, device).view(1, 3, 1, 2).requires_grad_()
    mask = torch.tensor(maskv, dtype=torch.bool, device=device)
    logits = impl.discriminality_logits(x, 1, mask)
    torch.testing.assert_close(logits, t64([[0.0]], device), **EXACT)  # all maxima are 0
    (dx,) = torch.autograd.grad(logits.sum(), x)
    torch.testing.assert_close(dx, t64(grad, device).view(1, 3, 1, 2), **EXACT)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_hand_c_tie_in_diversity(impl, device):
    # one group of 3 on a 1x3 map. ch1 = ch0 + 2, so after subtracting the row max both read
    # [-1, -1, 0] exactly and have bitwise equal softmax p0 = p1 = [a, a, b],
    #   a = 1 / (2 + e), b = e / (2 + e);  ch2 = [5, 0, 0]: p2 = [c, d, d], c = e^5 / (e^5 + 2),
    #   d = 1 / (e^5 + 2).
    # CCMP of the softmax: position 0: c (ch2, c > a); positions 1, 2: a and b, ties of ch0/ch1
    # -> ch0. h = c + a + b, L_div = 1 - h / 3.
    x = t64([[[[0, 0, 1]], [[2, 2, 3]], [[5, 0, 0]]]], device).requires_grad_()
    e, e5 = math.e, math.exp(5.0)
    a, b, c, d = 1 / (2 + e), e / (2 + e), e5 / (e5 + 2), 1 / (e5 + 2)
    div = impl.diversity_loss(x, 1)
    torch.testing.assert_close(div, t64(1 - (a + b + c) / 3, device), **EXACT)
    # dh/dx0 = d(p0[1] + p0[2])/dx0 = [0, a, b] - (a + b) p0 = [-(1-a) a, a^2, a b]  (a + b = 1-a)
    # dh/dx1 = 0 (ch1 loses the ties);  dh/dx2 = dp2[0]/dx2 = c [1 - c, -d, -d]
    # dL_div/dx = -dh/dx / 3
    (dx,) = torch.autograd.grad(div, x)
    dh = [[-(1 - a) * a, a * a, a * b], [0.0, 0.0, 0.0], [c * (1 - c), -c * d, -c * d]]
    torch.testing.assert_close(dx, -t64(dh, device).view(1, 3, 1, 3) / 3, **EXACT)


# ----------------------------------------------------------------------------------------------
# the published formulation on random float64 inputs

SHAPES = [(3, 5), (5, 2), (1, 7), (6, 1), (4, 4), (1, 1)]


def random_mask(batch, channels, per_sample, dtype, device):
    shape = (batch, channels) if per_sample else (channels,)
    return (torch.rand(shape, device=device) < 0.5).to(dtype)


def grads_of(out, x, weights):
    """d/dx of loss alone, and of a random combination of all four outputs (so that an error in
    the backward of any one of them shows)."""
    (g_loss,) = torch.autograd.grad(out.loss, x, retain_graph=True)
    w_loss, w_dis, w_div, w_logits = weights
    combo = w_loss * out.loss + w_dis * out.dis + w_div * out.div + (w_logits * out.logits).sum()
    (g_combo,) = torch.autograd.grad(combo, x)
    return g_loss, g_combo


def random_weights(batch, K, device):
    w = torch.randn(3, dtype=F64).tolist()
    return (*w, torch.randn(batch, K, dtype=F64, device=device))


def assert_outputs_close(out, ref, tol):
    assert isinstance(out, mc.MCLossOutput)
    for name in ("loss", "dis", "div", "logits"):
        a, b = getattr(out, name), getattr(ref, name)
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"{n}: {m}")


MASK_DTYPES = [torch.bool, F64, torch.float32]


@pytest.mark.parametrize("hw", SHAPES, ids=[f"{h}x{w}" for h, w in SHAPES])
@pytest.mark.parametrize("cnum", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_published(impl, cnum, hw):
    H, W = hw
    # a shared (C,) and a per-sample (B, C) mask each time; the mask dtypes take turns over
    # the parameter grid so that every (kind, dtype) pair is covered
    turn = cnum + SHAPES.index(hw)
    for per_sample, mask_dtype in (
        (False, MASK_DTYPES[turn % 3]),
        (True, MASK_DTYPES[(turn + 1) % 3]),
    ):
        B = int(torch.randint(1, 7, ()))
        K = int(torch.randint(1, 5, ()))
        C = K * cnum
        x = torch.randn(B, C, H, W, dtype=F64, requires_grad=True)
        y = random_targets(B, K)
        mask = random_mask(B, C, per_sample, mask_dtype, "cpu")
        weights = random_weights(B, K, "cpu")

        out = impl.mc_loss(x, y, K, cnum, mask=mask)  # published defaults alpha 1.5, beta 20
        ref = published_mc_loss(x, y, cnum, mask)
        assert_outputs_close(out, ref, TIGHT)
        for g, g_ref in zip(grads_of(out, x, weights), grads_of(ref, x, weights)):
            torch.testing.assert_close(g, g_ref, **TIGHT)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_published_coefficients_layouts(impl, device, channels_last):
    # random alpha, beta, cnum = None (K divides C), channels_last and a non-contiguous slice
    for _ in range(4):
        B, K, cnum = (int(torch.randint(lo, hi, ())) for lo, hi in ((1, 7), (1, 6), (1, 6)))
        H, W = (int(torch.randint(1, 9, ())) for _ in range(2))
        C = K * cnum
        x = torch.randn(B, C, H, W, dtype=F64, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        alpha, beta = (float(torch.rand(()) * 30 - 5) for _ in range(2))
        y = random_targets(B, K, device)
        mask = random_mask(B, C, bool(torch.rand(()) < 0.5), torch.bool, device)
        weights = random_weights(B, K, device)
        out = impl.mc_loss(x, y, K, None, mask=mask, alpha=alpha, beta=beta)
        ref = published_mc_loss(x, y, cnum, mask, alpha=alpha, beta=beta)
        assert_outputs_close(out, ref, TIGHT)
        for g, g_ref in zip(grads_of(out, x, weights), grads_of(ref, x, weights)):
            torch.testing.assert_close(g, g_ref, **TIGHT)
    # a strided view (every other channel of a wider map) is accepted too
    xw = torch.randn(2, 2 * 6, 3, 4, dtype=F64, device=device)
    xs = xw[:, ::2].requires_grad_()
    y = random_targets(2, 3, device)
    mask = random_mask(2, 6, True, F64, device)
    out = impl.mc_loss(xs, y, 3, 2, mask=mask)
    ref = published_mc_loss(xs, y, 2, mask)
    assert_outputs_close(out, ref, TIGHT)
    torch.testing.assert_close(*(torch.autograd.grad(o.loss, xs)[0] for o in (out, ref)), **TIGHT)


# ----------------------------------------------------------------------------------------------
# uneven groups, against a slow loop over the groups


def slow_mc_loss(x, y, counts, mask, alpha=1.5, beta=20.0):
    """MC-Loss with one plain-PyTorch pass per class group (docs/spec.md, formula by formula)."""
    B = x.shape[0]
    m = mask.to(x.dtype)
    m = m.expand(B, -1) if m.dim() == 1 else m
    h_over_n, logits, start = [], [], 0
    for n in counts:
        g = x[:, start : start + n].flatten(2)  # (B, n, HW)
        p = torch.softmax(g, dim=-1)
        h_over_n.append(p.max(dim=1).values.sum(dim=-1) / n)  # (B,)
        masked = g * m[:, start : start + n, None]
        logits.append(masked.max(dim=1).values.mean(dim=-1))  # (B,)
        start += n
    div = 1 - torch.stack(h_over_n, 1).mean()
    logits = torch.stack(logits, 1)
    dis = F.cross_entropy(logits, y)
    return mc.MCLossOutput(alpha * dis + beta * div, dis, div, logits)


def slow_ccmp(x, counts):
    out, start = [], 0
    for n in counts:
        out.append(x[:, start : start + n].max(dim=1).values)
        start += n
    return torch.stack(out, 1)


UNEVEN = [
    # (num_classes, cnum as given, C)
    (3, [1, 2, 5], 8),
    (4, [3, 1, 1, 2], 7),
    (2, [4, 1], 5),
    (1, [3], 3),
    (3, None, 7),  # balanced split: [3, 2, 2]
    (4, None, 10),  # [3, 3, 2, 2]
    (5, None, 5),  # [1, 1, 1, 1, 1]
    (3, None, 11),  # [4, 4, 3]
    (2, None, 9),  # [5, 4]
]


@pytest.mark.parametrize("K, cnum, C", UNEVEN)
@pytest.mark.parametrize("impl", IMPLS)
def test_uneven_groups_against_slow_loop(impl, K, cnum, C):
    H, W = [(3, 4), (1, 5), (4, 1)][UNEVEN.index((K, cnum, C)) % 3]
    counts = counts_of(K, cnum, C)
    B = int(torch.randint(1, 7, ()))
    x = torch.randn(B, C, H, W, dtype=F64, requires_grad=True)
    y = random_targets(B, K)
    per_sample = bool(torch.rand(()) < 0.5)
    mask = random_mask(B, C, per_sample, torch.bool if torch.rand(()) < 0.5 else F64, "cpu")
    alpha, beta = float(torch.rand(()) * 3), float(torch.rand(()) * 30)
    weights = random_weights(B, K, "cpu")

    out = impl.mc_loss(x, y, K, cnum, mask=mask, alpha=alpha, beta=beta)
    ref = slow_mc_loss(x, y, counts, mask, alpha, beta)
    assert_outputs_close(out, ref, TIGHT)
    for g, g_ref in zip(grads_of(out, x, weights), grads_of(ref, x, weights)):
        torch.testing.assert_close(g, g_ref, **TIGHT)

    # the primitives take the same groups
    ref = slow_mc_loss(x, y, counts, mask, alpha, beta)
    div = impl.diversity_loss(x, K, cnum)
    torch.testing.assert_close(div, ref.div, **TIGHT)
    torch.testing.assert_close(
        torch.autograd.grad(div, x)[0],
        torch.autograd.grad(ref.div, x, retain_graph=True)[0],
        **TIGHT,
    )
    logits = impl.discriminality_logits(x, K, mask, cnum)
    torch.testing.assert_close(logits, ref.logits, **TIGHT)
    w = weights[3]
    torch.testing.assert_close(
        torch.autograd.grad((w * logits).sum(), x)[0],
        torch.autograd.grad((w * ref.logits).sum(), x)[0],
        **TIGHT,
    )
    z = impl.ccmp(x, counts)
    z_ref = slow_ccmp(x, counts)
    torch.testing.assert_close(z, z_ref, rtol=0, atol=0)
    gz = torch.randn_like(z)
    torch.testing.assert_close(
        torch.autograd.grad(z, x, gz)[0], torch.autograd.grad(z_ref, x, gz)[0], rtol=0, atol=0
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_cnum_none_divisible_is_uniform(impl):
    # cnum=None with K | C is cnum = C // K, the same numbers as the published formulation
    B, K, cnum, H, W = 3, 4, 3, 2, 5
    x = torch.randn(B, K * cnum, H, W, dtype=F64, requires_grad=True)
    y = random_targets(B, K)
    mask = random_mask(B, K * cnum, False, torch.bool, "cpu")
    out = impl.mc_loss(x, y, K, mask=mask)
    ref = published_mc_loss(x, y, cnum, mask)
    assert_outputs_close(out, ref, TIGHT)
    torch.testing.assert_close(
        torch.autograd.grad(out.loss, x)[0], torch.autograd.grad(ref.loss, x)[0], **TIGHT
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
def test_low_precision_matches_upcast_slow_loop(impl, dtype):
    # fp16/bf16 accumulate in fp32: the values equal the slow loop on the exactly upcast input
    K, counts, H, W, B = 3, [2, 3, 1], 3, 4, 4
    x = separated_features(B, counts, H, W, dtype=dtype).requires_grad_()
    y = random_targets(B, K)
    mask = random_mask(B, sum(counts), True, torch.bool, "cpu")
    out = impl.mc_loss(x, y, K, counts, mask=mask)
    # the oracle runs in float64 on the exactly upcast input; the fp32 accumulation of the code
    # under test then differs from it by fp32 rounding only
    x64 = x.detach().double().requires_grad_()
    ref = slow_mc_loss(x64, y, counts, mask)
    for name in ("loss", "dis", "div", "logits"):
        assert getattr(out, name).dtype == torch.float32, name
        torch.testing.assert_close(
            getattr(out, name),
            getattr(ref, name).float(),
            **dict(zip(("rtol", "atol"), VALUE_TOL[dtype])),
        )
    (g,) = torch.autograd.grad(out.loss, x)
    (g_ref,) = torch.autograd.grad(ref.loss, x64)
    assert g.dtype == dtype
    rtol, atol = VALUE_TOL[dtype] if dtype == torch.float32 else GRAD_TOL[dtype]
    torch.testing.assert_close(g.double(), g_ref.to(dtype).double(), rtol=rtol, atol=atol)

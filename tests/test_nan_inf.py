"""NaN and Inf in the features reach the loss and the gradient exactly as in the reference.

AMP's GradScaler skips a step when it sees a non-finite gradient, so a NaN or Inf anywhere in
the features must not be swallowed (e.g. by a max that skips NaN, or by treating a masked channel
as a literal 0 where the reference computes 0 * Inf = NaN). Every test compares the NaN, +Inf
and -Inf positions of the fused result with those of the reference, element by element, and the
finite values to the tolerances of tests/test_kernels.py. The special value goes in a kept
channel, in a masked one, in the channel that wins the group's max at that position, in one that
loses it, over a whole channel, or over a whole group at one position. Every dtype, every device
of ``helpers.DEVICES``. Inputs are random and fresh on every run (the seed is printed).

Two cases once differed and are checked on their own at the end: two channels of one group
whose softmax is NaN (the fused backward now has the softmax-backward form p * (g - <g, p>),
so a NaN row spreads over the whole channel as in autograd), and the logits' gradient on its
own (the standalone terms go through the primitive ops, not the two-term fused backward).
"""

import random

import pytest
import torch

import mcloss_cuda as mc
from helpers import (
    DEVICES,
    DTYPES,
    GRAD_TOL,
    VALUE_TOL,
    group_bounds,
    random_targets,
    separated_features,
)

NAN, INF = float("nan"), float("inf")
VALUES = {"nan": NAN, "+inf": INF, "-inf": -INF}
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
# as in test_kernels.py: maps rounded to fp16/bf16 may differ by one ulp; a gradient element's
# rounding error scales with the largest gradient element
MAP_TOL = {F64: VALUE_TOL[F64], F32: VALUE_TOL[F32], F16: (2**-10, 6e-8), BF16: (2**-7, 1e-38)}
GRAD_SCALE = {F64: 1e-12, F32: 2e-6, F16: 2**-9, BF16: 2**-6}


SPECIALS = (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf))


def same_specials(a, b, what):
    """The same NaN, +Inf and -Inf positions in a (fused) and b (reference)."""
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    for name, f in SPECIALS:
        fa, fb = f(a), f(b)
        assert torch.equal(fa, fb), (
            f"{what}: {name} positions differ (fused has {int(fa.sum())}, reference "
            f"{int(fb.sum())}), e.g. at {(fa != fb).nonzero().tolist()[:6]}"
        )


def finite_close(a, b, what, kind, coeff=1.0):
    """Where both are finite: close. kind: "value" (fp32/fp64 results), "map" (a map in the
    input's dtype), "grad" (a gradient: tolerance scaled by its largest element)."""
    both = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[both], b[both]
    if kind == "value":
        rtol, atol = VALUE_TOL[b.dtype if b.dtype == F64 else F32]
        atol *= max(1.0, coeff)
    elif kind == "map":
        rtol, atol = MAP_TOL[b.dtype]
    else:
        rtol, atol = GRAD_TOL[b.dtype]
        atol += GRAD_SCALE[b.dtype] * (b.abs().max().item() if b.numel() else 0.0)
    torch.testing.assert_close(
        a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: finite values differ\n{m}"
    )


def like_reference(a, b, what, kind, coeff=1.0):
    same_specials(a, b, what)
    finite_close(a, b, what, kind, coeff)


# ----------------------------------------------------------------------------------------------
# the loss

LAYOUTS = {
    # counts, mask kind
    "uniform-shared-bool": ([3, 3, 3, 3], "shared"),
    "uneven-per-sample-float": ([2, 4, 3, 3], "per_sample"),
}
WHERE = [
    "kept-winner",
    "kept-loser",
    "masked-winner",
    "masked-loser",
    "whole-channel",
    "whole-group-at-position",
]


def make_case(where, value, counts, mask_kind, dtype, device, B=3, H=4, W=5):
    """Features with ``value`` placed as ``where`` says, a mask and whether the channel that
    holds the value is kept."""
    K, C, HW = len(counts), sum(counts), H * W
    x = separated_features(B, counts, H, W, dtype=dtype, device=device)
    per_sample = mask_kind == "per_sample"
    mask = mc.random_channel_mask(K, counts, batch=B if per_sample else None, device=device)
    if per_sample:
        mask = mask.to(dtype)
    b, i, k = random.randrange(B), random.randrange(K), random.randrange(HW)
    g0 = group_bounds(counts)[i]  # the group's first channel
    flat = x.view(B, C, HW)
    winner = g0 + int(flat[b, g0 : g0 + counts[i], k].float().argmax())
    losers = [j for j in range(g0, g0 + counts[i]) if j != winner]
    j = winner if where.endswith("winner") else random.choice(losers)
    if where.startswith(("kept", "masked")):
        keep = where.startswith("kept")
        if per_sample:
            mask[b, j] = float(keep)
        else:
            mask[j] = keep
    if where == "whole-channel":
        flat[b, j, :] = value
    elif where == "whole-group-at-position":
        flat[b, g0 : g0 + counts[i], k] = value
    else:
        flat[b, j, k] = value
    keep_j = bool(mask[b, j] if per_sample else mask[j])
    return x, mask, keep_j


def loss_and_grads(x, y, K, counts, mask, **options):
    res = []
    for impl in (mc, mc.reference):
        xi = x.clone().requires_grad_()
        out = impl.mc_loss(xi, y, K, counts, mask=mask, **options)
        (g,) = torch.autograd.grad(out.loss, xi)
        res.append((out, g))
    return res


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_mc_loss_specials_like_reference(device, dtype, value, where, layout):
    counts, mask_kind = LAYOUTS[layout]
    K = len(counts)
    x, mask, keep_j = make_case(where, VALUES[value], counts, mask_kind, dtype, device)
    y = random_targets(x.shape[0], K, device)
    (fused, fg), (ref, rg) = loss_and_grads(x, y, K, counts, mask)
    for name in ("loss", "dis", "div", "logits"):
        like_reference(getattr(fused, name), getattr(ref, name), name, "value", coeff=20.0)
    like_reference(fg, rg, "gradient", "grad")
    # the special value does reach the loss and the gradient: NaN and +Inf always (the softmax
    # of the channel is NaN); -Inf where a 0 of the mask multiplies it
    if value != "-inf" or not keep_j:
        assert not torch.isfinite(fused.loss), fused.loss
        assert not torch.isfinite(fg).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_mc_loss_many_specials_like_reference(device, dtype):
    # NaN, +Inf and -Inf sprinkled over a larger map, per-sample mask; NaN and +Inf each in a
    # group of their own (two in one group: test_two_nan_softmax_channels_in_a_group)
    K, n, B, H, W = 5, 4, 4, 6, 7
    x = separated_features(B, [n] * K, H, W, dtype=dtype, device=device)
    flat = x.view(B, K, n, H * W)
    slots = random.sample([(b, i) for b in range(B) for i in range(K)], 4)
    for (b, i), v in zip(slots, (NAN, INF, NAN, INF)):
        flat[b, i, random.randrange(n), random.randrange(H * W)] = v
    for _ in range(2):
        flat[
            random.randrange(B), random.randrange(K), random.randrange(n), random.randrange(H * W)
        ] = -INF
    y = random_targets(B, K, device)
    mask = mc.random_channel_mask(K, n, batch=B, device=device)
    (fo, fg), (ro, rg) = loss_and_grads(x, y, K, None, mask)
    for name in ("loss", "dis", "div", "logits"):
        like_reference(getattr(fo, name), getattr(ro, name), name, "value", coeff=20.0)
    like_reference(fg, rg, "gradient", "grad")
    assert torch.isnan(fo.loss) and torch.isnan(fg).any()


# A float mask is documented as 0/1 but its values are not checked (that would cost a device
# sync): whatever it holds is multiplied in, as by the reference's x * mask. A NaN or infinite
# mask value must reach the loss as there (the kernels' fast path for groups without a NaN
# must not take such a group), and so must a -inf feature in a channel masked to 0.
@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("mask_value", ["nan", "+inf", "-inf", "2.5"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_mc_loss_mask_values_beyond_0_1(device, dtype, mask_value, pooling):
    K, n, B, H, W = 4, 3, 3, 5, 6
    x = separated_features(B, [n] * K, H, W, dtype=dtype, device=device)
    mask = mc.random_channel_mask(K, n, batch=B, device=device).to(dtype)
    # not a group's first channel: a scan that lost a NaN would lose it there
    b, j = random.randrange(B), random.randrange(K) * n + random.randrange(1, n)
    mask[b, j] = float(mask_value)
    y = random_targets(B, K, device)
    # average pooling (CCAP) multiplies every value by its mask value: an infinite one makes
    # the group's logit NaN (the channel holds both signs) as the reference's x * mask does
    (fo, fg), (ro, rg) = loss_and_grads(x, y, K, None, mask, pooling=pooling)
    for name in ("loss", "dis", "div", "logits"):
        like_reference(getattr(fo, name), getattr(ro, name), name, "value", coeff=20.0)
    like_reference(fg, rg, "gradient", "grad")
    if mask_value != "2.5":
        assert not torch.isfinite(fo.logits[b]).all()


# ----------------------------------------------------------------------------------------------
# the primitives

SOFTMAX_CASES = [
    "one-nan",
    "one-+inf",
    "two-+inf",
    "one--inf",
    "channel--inf",
    "grad-nan",
    "grad-inf",
]


@pytest.mark.parametrize("case", SOFTMAX_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_spatial_softmax_specials(device, dtype, case):
    B, C, H, W = 2, 5, 4, 6
    x = torch.randn(B, C, H, W, dtype=F64).to(dtype=dtype, device=device)
    g = torch.randn(B, C, H, W, dtype=F64).to(dtype=dtype, device=device)
    b, c = random.randrange(B), random.randrange(C)
    k1, k2 = random.sample(range(H * W), 2)
    fx, fg = x.view(B, C, -1), g.view(B, C, -1)
    if case == "one-nan":
        fx[b, c, k1] = NAN
    elif case == "one-+inf":
        fx[b, c, k1] = INF
    elif case == "two-+inf":
        fx[b, c, k1] = fx[b, c, k2] = INF
    elif case == "one--inf":
        fx[b, c, k1] = -INF
    elif case == "channel--inf":
        fx[b, c, :] = -INF
    elif case == "grad-nan":
        fg[b, c, k1] = NAN
    elif case == "grad-inf":
        fg[b, c, k1] = INF
    res = []
    for impl in (mc, mc.reference):
        xi = x.clone().requires_grad_()
        p = impl.spatial_softmax(xi)
        (dx,) = torch.autograd.grad(p, xi, g)
        res.append((p, dx))
    (fp, fdx), (rp, rdx) = res
    like_reference(fp, rp, "softmax", "map")
    like_reference(fdx, rdx, "softmax gradient", "grad")
    if case in ("one-nan", "one-+inf", "two-+inf", "channel--inf"):
        assert torch.isnan(fp[b, c]).all()
    if case in ("one-nan", "grad-nan", "grad-inf"):
        assert not torch.isfinite(fdx[b, c]).all()


def first_max_oracle(x, n):
    """CCMP and the winner of every (b, i, k), written without torch.max: the first NaN of the
    group if there is one, else the first channel equal to the max."""
    B, C, H, W = x.shape
    v = x.view(B, C // n, n, H * W)
    isnan = torch.isnan(v)
    anynan = isnan.any(dim=2, keepdim=True)
    best = torch.where(anynan.squeeze(2), torch.full_like(v[:, :, 0], NAN), v.amax(dim=2))
    hit = torch.where(anynan, isnan, v == v.amax(dim=2, keepdim=True))
    first = hit.float().argmax(dim=2)  # the first 1 (argmax returns the first maximum)
    return best.view(B, C // n, H, W), first


CCMP_CASES = [
    "nan-in-winner",
    "nan-after-winner",
    "nan-before-winner",
    "nan-twice",
    "+inf-then-nan",
    "nan-then-+inf",
    "+inf-twice",
    "-inf-whole-group",
    "-inf-in-winner",
    "nan-whole-group",
]


@pytest.mark.parametrize("case", CCMP_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_ccmp_specials_first_max_rule(device, dtype, case):
    # CCMP forward is a max and backward a routing: both exact, NaN included. A NaN anywhere in
    # the group wins (the first NaN), as torch.amax / max_pool2d give NaN; a max that skips NaN
    # (v > best) fails "nan-after-winner".
    B, K, n, H, W = 2, 3, 4, 3, 5
    x = separated_features(B, [n] * K, H, W, dtype=dtype, device=device)
    fx = x.view(B, K, n, H * W)
    for _ in range(3):  # three positions per map, each with the case's pattern
        b, i, k = random.randrange(B), random.randrange(K), random.randrange(H * W)
        col = fx[b, i, :, k]
        w = int(col.float().argmax())
        later = [j for j in range(n) if j > w] or [j for j in range(n) if j != w]
        earlier = [j for j in range(n) if j < w] or [j for j in range(n) if j != w]
        j1, j2 = sorted(random.sample(range(n), 2))
        if case == "nan-in-winner":
            col[w] = NAN
        elif case == "nan-after-winner":
            col[random.choice(later)] = NAN
        elif case == "nan-before-winner":
            col[random.choice(earlier)] = NAN
        elif case == "nan-twice":
            col[j1] = col[j2] = NAN
        elif case == "+inf-then-nan":
            col[j1], col[j2] = INF, NAN
        elif case == "nan-then-+inf":
            col[j1], col[j2] = NAN, INF
        elif case == "+inf-twice":
            col[j1] = col[j2] = INF
        elif case == "-inf-whole-group":
            col[:] = -INF
        elif case == "-inf-in-winner":
            col[w] = -INF
        elif case == "nan-whole-group":
            col[:] = NAN
    g = torch.randn(B, K, H, W, dtype=F64).to(dtype=dtype, device=device)
    res = []
    for impl in (mc, mc.reference):
        xi = x.clone().requires_grad_()
        z = impl.ccmp(xi, n)
        (dx,) = torch.autograd.grad(z, xi, g)
        res.append((z, dx))
    (fz, fdx), (rz, rdx) = res
    best, first = first_max_oracle(x, n)
    expect = torch.zeros(B, K, n, H * W, dtype=dtype, device=device)
    expect.scatter_(2, first.unsqueeze(2), g.view(B, K, 1, H * W))
    expect = expect.view_as(x)
    for what, a, e in (
        ("fused ccmp", fz, best),
        ("reference ccmp", rz, best),
        ("fused ccmp gradient", fdx, expect),
        ("reference ccmp gradient", rdx, expect),
    ):
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True, msg=what)
    # uneven groups (per-class counts) follow the same rule: fused as the reference, exactly
    counts = [1, 2, 4, 5]
    gu = torch.randn(B, len(counts), H, W, dtype=F64).to(dtype=dtype, device=device)
    res = []
    for impl in (mc, mc.reference):
        xi = x.clone().requires_grad_()
        z = impl.ccmp(xi, counts)
        res.append((z, torch.autograd.grad(z, xi, gu)[0]))
    for what, a, r in zip(("uneven ccmp", "uneven ccmp gradient"), *res):
        torch.testing.assert_close(a, r, rtol=0, atol=0, equal_nan=True, msg=what)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_channel_mask_specials(device, dtype, per_sample):
    # x * mask: NaN * 0 and Inf * 0 are NaN (not 0), in the output and in the gradient; exact
    B, C, H, W = 3, 6, 4, 4
    x = torch.randn(B, C, H, W, dtype=F64).to(dtype=dtype, device=device)
    g = torch.randn(B, C, H, W, dtype=F64).to(dtype=dtype, device=device)
    specials = torch.tensor([NAN, INF, -INF] * 4, dtype=dtype, device=device)
    x.view(-1)[torch.randperm(x.numel(), device=device)[:12]] = specials
    g.view(-1)[torch.randperm(g.numel(), device=device)[:12]] = specials
    mask = torch.rand((B, C) if per_sample else (C,), device=device) > 0.5
    m4 = mask.to(dtype).view((B, C, 1, 1) if per_sample else (1, C, 1, 1))
    for mk in (mask, mask.to(dtype)):
        for impl in (mc, mc.reference):
            xi = x.clone().requires_grad_()
            out = impl.channel_mask(xi, mk)
            (dx,) = torch.autograd.grad(out, xi, g)
            torch.testing.assert_close(out, x * m4, rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(dx, g * m4, rtol=0, atol=0, equal_nan=True)


def diversity_and_logits(x, mask, K):
    """[(div, d div/dx, logits, d sum(logits)/dx)] for the fused path and the reference."""
    res = []
    for impl in (mc, mc.reference):
        xd = x.clone().requires_grad_()
        div = impl.diversity_loss(xd, K)
        (dd,) = torch.autograd.grad(div, xd)
        xl = x.clone().requires_grad_()
        logits = impl.discriminality_logits(xl, K, mask)
        (dl,) = torch.autograd.grad(logits, xl, torch.ones_like(logits))
        res.append((div, dd, logits, dl))
    return res


def one_special(value, dtype, device, K=3, n=3, B=3, H=4, W=5):
    x = separated_features(B, [n] * K, H, W, dtype=dtype, device=device)
    mask = mc.random_channel_mask(K, n, batch=B, device=device)
    b, c, k = random.randrange(B), random.randrange(K * n), random.randrange(H * W)
    x.view(B, K * n, -1)[b, c, k] = VALUES[value]
    mask[b, c] = random.random() < 0.5
    return x, mask


@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_diversity_loss_and_logits_specials(device, dtype, value):
    x, mask = one_special(value, dtype, device)
    (fd, fdd, fl, fdl), (rd, rdd, rl, rdl) = diversity_and_logits(x, mask, 3)
    like_reference(fd, rd, "div", "value")
    like_reference(fdd, rdd, "div gradient", "grad")
    like_reference(fl, rl, "logits", "value")
    like_reference(fdl, rdl, "logits gradient", "grad")
    if value != "-inf":
        assert not torch.isfinite(fd)


# ----------------------------------------------------------------------------------------------
# the two cases that once differed from the reference, each on its own


# A channel whose softmax is NaN but that wins no position (an earlier channel of its group
# is NaN too) still gets NaN over its whole map, as through torch's softmax backward.
@pytest.mark.parametrize("value", ["nan", "+inf"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_two_nan_softmax_channels_in_a_group(device, dtype, value):
    if mc.backend(device) == "reference":
        pytest.skip("the fused path does not run here")
    counts, mask_kind = LAYOUTS["uniform-shared-bool"]
    x, mask, _ = make_case(
        "whole-group-at-position", VALUES[value], counts, mask_kind, dtype, device
    )
    y = random_targets(x.shape[0], len(counts), device)
    (_, fg), (_, rg) = loss_and_grads(x, y, len(counts), counts, mask)
    same_specials(fg, rg, "gradient")


# The logits' gradient alone has NaN only where the NaN channel wins the max, as autograd
# through channel mask + CCMP + mean gives.
@pytest.mark.parametrize("value", ["nan", "+inf"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_logits_gradient_alone(device, dtype, value):
    if mc.backend(device) == "reference":
        pytest.skip("the fused path does not run here")
    x, mask = one_special(value, dtype, device)
    (_, _, _, fdl), (_, _, _, rdl) = diversity_and_logits(x, mask, 3)
    same_specials(fdl, rdl, "logits gradient")

"""Property-based tests (hypothesis): the fused kernels against ``mcloss_cuda.reference`` on
random shapes, uniform / uneven / balanced groups, shared and per-sample bool and float masks,
every dtype, contiguous / channels_last / non-contiguous layouts, and extreme inputs: logits
around +-1e4, all-equal maps, single-position maps, all-negative maps.

Inputs are drawn from a torch seed chosen by hypothesis (fresh each run, shown in a falsifying
example). Gradients are compared where the per-position winners have no near-ties: in float64
(randn), on single-position or all-equal maps (exact ties, broken by the first-max rule on
both sides), and on ``helpers.separated_features`` in every dtype.
"""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mcloss_cuda as mc
from helpers import (
    DEVICES,
    GRAD_TOL,
    VALUE_TOL,
    apply_layout,
    counts_of,
    fused_only,
    separated_features,
)

pytestmark = fused_only
R = mc.reference
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
SETTINGS = dict(
    deadline=None,
    derandomize=False,
    print_blob=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
GRAD_SCALE = {F64: 1e-12, F32: 2e-6, F16: 2**-9, BF16: 2**-6}
MAP_TOL = {F64: VALUE_TOL[F64], F32: VALUE_TOL[F32], F16: (2**-10, 6e-8), BF16: (2**-7, 1e-38)}


# ----------------------------------------------------------------------------------------------
# strategies


@st.composite
def groups(draw, max_k=4, max_n=5):
    """(K, cnum as passed to the API, counts)."""
    K = draw(st.integers(1, max_k))
    kind = draw(st.sampled_from(["uniform", "uneven", "balanced"]))
    if kind == "uniform":
        n = draw(st.integers(1, max_n))
        return K, n, [n] * K
    if kind == "uneven":
        counts = draw(st.lists(st.integers(1, max_n), min_size=K, max_size=K))
        return K, counts, counts
    C = draw(st.integers(K, K * max_n))
    return K, None, counts_of(K, None, C)


@st.composite
def problems(draw, dtypes=(F32, F64, F16, BF16)):
    K, cnum, counts = draw(groups())
    B = draw(st.integers(1, 3))
    H, W = draw(
        st.sampled_from(
            [(1, 1), (1, 2), (2, 1), (1, 7), (6, 1), (2, 3), (3, 3), (4, 5), (5, 4), (7, 7)]
        )
    )
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "sliced", "transposed"]))
    mask_kind = draw(
        st.sampled_from(["shared_bool", "shared_float", "per_sample_bool", "per_sample_float"])
    )
    values = draw(st.sampled_from(["randn", "separated", "huge", "equal", "negative", "scaled"]))
    seed = draw(st.integers(0, 2**62))
    device = draw(st.sampled_from(DEVICES))
    return dict(
        B=B,
        K=K,
        cnum=cnum,
        counts=counts,
        H=H,
        W=W,
        dtype=dtype,
        layout=layout,
        mask_kind=mask_kind,
        values=values,
        seed=seed,
        device=device,
    )


def build(p):
    """(x, mask, targets, grads_comparable) for a drawn problem."""
    g = torch.Generator().manual_seed(p["seed"])
    B, counts, H, W, dtype = p["B"], p["counts"], p["H"], p["W"], p["dtype"]
    C, HW = sum(counts), H * W
    kind = p["values"]
    if (
        kind == "separated"
        and max(counts) <= HW
        and HW <= {F16: 512, BF16: 128}.get(dtype, 1 << 30)
    ):
        x = separated_features(B, counts, H, W, dtype=F64, generator=g)
        comparable = True
    elif kind == "huge" and dtype in (F32, F64):
        # logits of +-1e4 (+ noise): exp underflows to exactly 0 for half of every row
        x = torch.randn(B, C, H, W, generator=g, dtype=F64)
        x = torch.sign(x) * 1e4 + x
        comparable = dtype == F64
    elif kind == "equal":
        # all-equal maps: every probability is exactly 1/HW, every group an exact tie
        x = torch.randn(B, C, 1, 1, generator=g, dtype=F64).expand(B, C, H, W).clone()
        if torch.rand((), generator=g) < 0.5:
            x = x[:, :1].expand(B, C, H, W).clone()  # and equal across channels too
        comparable = True
    elif kind == "negative":
        x = -torch.randn(B, C, H, W, generator=g, dtype=F64).abs() - 0.1
        comparable = dtype == F64 or HW == 1
    elif kind == "scaled":
        x = torch.randn(B, C, H, W, generator=g, dtype=F64) * 30.0
        comparable = dtype == F64 or HW == 1
    else:
        x = torch.randn(B, C, H, W, generator=g, dtype=F64)
        comparable = dtype == F64 or HW == 1
    x = apply_layout(x.to(dtype=dtype, device=p["device"]), p["layout"]).requires_grad_()
    shape = (C,) if p["mask_kind"].startswith("shared") else (B, C)
    mask = (torch.rand(shape, generator=g) < 0.5).to(p["device"])
    if p["mask_kind"].endswith("float"):
        mask = mask.to(torch.float32)
    y = torch.randint(0, len(counts), (B,), generator=g).to(p["device"])
    return x, mask, y, comparable


def value_close(a, b, HW, coeff=1.0, scale=1.0):
    assert a.dtype == b.dtype and a.shape == b.shape
    rtol, atol = VALUE_TOL[F64 if b.dtype == F64 else F32]
    atol = atol * max(1.0, (HW / 64) ** 0.5) * max(1.0, coeff) * max(1.0, scale)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def grad_close(a, b, terms=0.0):
    """GRAD_TOL plus GRAD_SCALE times the size of the gradient's terms (the larger of max |b|
    and ``terms``): a gradient that cancels to ~0 keeps the rounding error of its terms."""
    assert a.dtype == b.dtype and a.shape == b.shape
    rtol, atol = GRAD_TOL[b.dtype]
    s = max(b.abs().max().item() if b.numel() else 0.0, float(terms))
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol + GRAD_SCALE[b.dtype] * s)


def max_prob(x):
    return torch.softmax(x.detach().double().flatten(2), -1).max().item()


def mc_terms(x, counts, alpha=1.5, beta=20.0):
    """|d(alpha dis + beta div)/dx| terms: beta p / (B K n_i) and alpha / (B HW)."""
    B, HW = x.shape[0], x.shape[2] * x.shape[3]
    return abs(beta) * max_prob(x) / (B * len(counts) * min(counts)) + abs(alpha) / (B * HW)


def grad_of(out, x, g=None):
    (dx,) = torch.autograd.grad(out, x, g)
    return dx


def magnitude(x):
    """Rounding in sums of x scales with |x|: 1 for ordinary inputs, ~1e4 for the huge ones
    (measured in units of 1, with fp32's eps folded into VALUE_TOL's atol)."""
    return x.detach().abs().max().float().item()


# ----------------------------------------------------------------------------------------------
# properties


@settings(max_examples=120, **SETTINGS)
@given(problems())
def test_mc_loss_matches_reference(p):
    x, mask, y, comparable = build(p)
    assert mc.backend(x.device) != "reference"
    K, cnum, HW = p["K"], p["cnum"], p["H"] * p["W"]
    out = mc.mc_loss(x, y, K, cnum, mask=mask)
    ref = R.mc_loss(x, y, K, cnum, mask=mask)
    scale = magnitude(x) if p["values"] == "huge" else 1.0
    for field in out._fields:
        value_close(getattr(out, field), getattr(ref, field), HW, coeff=21.5, scale=scale)
    # h[b, i] lies in [1, n_i]: L_div in [0, 1 - 1/n_max]
    assert -1e-5 <= out.div.item() <= 1 - 1 / max(p["counts"]) + 1e-5
    if comparable:
        grad_close(grad_of(out.loss, x), grad_of(ref.loss, x), mc_terms(x, p["counts"]))


@settings(max_examples=80, **SETTINGS)
@given(problems())
def test_primitives_match_reference(p):
    x, mask, y, comparable = build(p)
    assert mc.backend(x.device) != "reference"
    K, cnum, counts, HW = p["K"], p["cnum"], p["counts"], p["H"] * p["W"]
    # spatial softmax
    sp, sp_ref = mc.spatial_softmax(x), R.spatial_softmax(x)
    rtol, atol = MAP_TOL[x.dtype]
    torch.testing.assert_close(sp, sp_ref, rtol=rtol, atol=atol)
    if comparable:
        gs = torch.randn(sp.shape).to(sp)
        grad_close(grad_of(sp, x, gs), grad_of(sp_ref, x, gs), max_prob(x) * gs.abs().max().item())
    # channel mask and ccmp: selections and 0/1 products, exact in every dtype
    cm = mc.channel_mask(x, mask)
    assert torch.equal(cm, R.channel_mask(x, mask))
    gcm = torch.randn(cm.shape).to(cm)
    assert torch.equal(grad_of(cm, x, gcm), grad_of(R.channel_mask(x, mask), x, gcm))
    z = mc.ccmp(x, counts)
    assert torch.equal(z, R.ccmp(x, counts))
    gz = torch.randn(z.shape).to(z)
    assert torch.equal(grad_of(z, x, gz), grad_of(R.ccmp(x, counts), x, gz))
    # diversity and discriminality
    scale = magnitude(x) if p["values"] == "huge" else 1.0
    d, d_ref = mc.diversity_loss(x, K, cnum), R.diversity_loss(x, K, cnum)
    value_close(d, d_ref, HW)
    if comparable:
        grad_close(grad_of(d, x), grad_of(d_ref, x), mc_terms(x, counts, 0.0, 1.0))
    lg = mc.discriminality_logits(x, K, mask, cnum)
    lg_ref = R.discriminality_logits(x, K, mask, cnum)
    value_close(lg, lg_ref, HW, scale=scale)
    gl = torch.randn(lg.shape).to(lg)
    # raw masked maxima have exact winners: comparable whatever the dtype
    grad_close(grad_of(lg, x, gl), grad_of(lg_ref, x, gl))


@settings(max_examples=30, **SETTINGS)
@given(problems(dtypes=(F32, F64)))
def test_single_position_maps(p):
    # one position: every probability is exactly 1, h = 1 per group, L_div = 1 - mean(1 / n_i)
    p = dict(p, H=1, W=1)
    x, mask, y, _ = build(p)
    K, cnum, counts = p["K"], p["cnum"], p["counts"]
    out = mc.mc_loss(x, y, K, cnum, mask=mask)
    expected_div = 1.0 - sum(1.0 / n for n in counts) / K
    assert abs(out.div.item() - expected_div) <= 1e-6
    assert torch.equal(mc.spatial_softmax(x), torch.ones_like(x))
    ref = R.mc_loss(x, y, K, cnum, mask=mask)
    for field in out._fields:
        value_close(
            getattr(out, field),
            getattr(ref, field),
            1,
            coeff=21.5,
            scale=magnitude(x) if p["values"] == "huge" else 1.0,
        )
    grad_close(grad_of(out.loss, x), grad_of(ref.loss, x), mc_terms(x, counts))


@settings(max_examples=40, **SETTINGS)
@given(problems(dtypes=(F32, F64, F16, BF16)))
def test_all_equal_maps(p):
    # every channel's map constant: p = 1/HW everywhere, h = 1 per group, and the diversity
    # gradient vanishes (softmax of a constant row is stationary)
    p = dict(p, values="equal")
    x, mask, y, _ = build(p)
    K, cnum, counts, HW = p["K"], p["cnum"], p["counts"], p["H"] * p["W"]
    torch.testing.assert_close(
        mc.spatial_softmax(x), torch.full_like(x, 1.0 / HW), rtol=MAP_TOL[x.dtype][0], atol=0
    )
    d = mc.diversity_loss(x, K, cnum)
    expected = 1.0 - sum(1.0 / n for n in counts) / K
    assert abs(d.item() - expected) <= 1e-5
    dd = grad_of(d, x)
    assert dd.abs().max().item() <= 1e-6
    out, ref = mc.mc_loss(x, y, K, cnum, mask=mask), R.mc_loss(x, y, K, cnum, mask=mask)
    for field in out._fields:
        value_close(getattr(out, field), getattr(ref, field), HW, coeff=21.5)
    grad_close(grad_of(out.loss, x), grad_of(ref.loss, x), mc_terms(x, counts))


@settings(max_examples=40, **SETTINGS)
@given(problems(dtypes=(F32, F64)))
def test_huge_logits(p):
    # +-1e4: finite loss, and the same numbers as the reference (up to rounding of 1e4)
    p = dict(p, values="huge")
    x, mask, y, comparable = build(p)
    K, cnum, HW = p["K"], p["cnum"], p["H"] * p["W"]
    out, ref = mc.mc_loss(x, y, K, cnum, mask=mask), R.mc_loss(x, y, K, cnum, mask=mask)
    assert out.loss.isfinite()
    for field in out._fields:
        value_close(getattr(out, field), getattr(ref, field), HW, coeff=21.5, scale=1e4)
    dx = grad_of(out.loss, x)
    assert dx.isfinite().all()
    if comparable:
        grad_close(dx, grad_of(ref.loss, x), mc_terms(x, p["counts"]))

"""The loss's options beyond the published setting: pooling="avg" (CCAP), and the
discriminality cross-entropy's weight, label_smoothing and reduction, as F.cross_entropy takes
them (docs/spec.md). The fused kernels are compared with the reference over shapes, dtypes and
layouts in test_kernels.py (test_loss_ops_options, also run under the CUDA emulator); here: the
reference against the formulas written out, gradcheck of the fused path in float64, MCLoss's
weight buffer, and the argument errors."""

import pytest
import torch
import torch.nn.functional as F

import mcloss_cuda as mc
from helpers import assert_grad_close, fused_only, group_bounds

R = mc.reference
F64 = torch.float64
REDUCTIONS = ("mean", "sum", "none")


def sample(B=4, counts=(3, 2, 4), H=3, W=5, dtype=torch.float32):
    x = torch.randn(B, sum(counts), H, W, dtype=dtype)
    y = torch.randint(0, len(counts), (B,))
    mask = torch.rand(sum(counts)) < 0.6
    return x, y, mask


def written_out(x, y, counts, mask, alpha, beta, pooling, weight, eps, reduction):
    """The loss by its definition, one sample and one group at a time, in float64."""
    x = x.double()
    B, K = x.shape[0], len(counts)
    w = torch.ones(K, dtype=F64) if weight is None else weight.double()
    bounds = group_bounds(counts)
    logits = torch.empty(B, K, dtype=F64)
    div = torch.empty(B, dtype=F64)
    for b in range(B):
        h_over_n = 0.0
        for i in range(K):
            g = x[b, bounds[i] : bounds[i + 1]].flatten(1)  # (n_i, HW)
            masked = g * mask[bounds[i] : bounds[i + 1]].double()[:, None]
            pooled = masked.max(0).values if pooling == "max" else masked.mean(0)
            logits[b, i] = pooled.mean()
            h_over_n += torch.softmax(g, -1).max(0).values.sum() / g.shape[0]
        div[b] = 1 - h_over_n / K
    logp = torch.log_softmax(logits, -1)
    ce = torch.stack(
        [(1 - eps) * w[y[b]] * -logp[b, y[b]] + eps / K * (w * -logp[b]).sum() for b in range(B)]
    )
    if reduction == "none":
        dis = ce
    elif reduction == "sum":
        dis, div = ce.sum(), div.sum()
    else:
        dis, div = ce.sum() / w[y].sum(), div.mean()
    return alpha * dis + beta * div, dis, div, logits


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_reference_matches_the_written_out_loss(reduction, pooling, weighted, eps):
    counts = (3, 2, 4)
    x, y, mask = sample(counts=counts, dtype=F64)
    weight = 0.3 + torch.rand(len(counts), dtype=F64) if weighted else None
    out = R.mc_loss(
        x,
        y,
        len(counts),
        counts,
        mask=mask,
        alpha=0.7,
        beta=3.0,
        pooling=pooling,
        weight=weight,
        label_smoothing=eps,
        reduction=reduction,
    )
    want = written_out(x, y, counts, mask, 0.7, 3.0, pooling, weight, eps, reduction)
    for got, expected in zip(out, want):
        torch.testing.assert_close(got, expected)
    # the discriminality term is F.cross_entropy with the same options
    torch.testing.assert_close(
        out.dis,
        F.cross_entropy(out.logits, y, weight=weight, label_smoothing=eps, reduction=reduction),
    )


def test_avg_pooling_of_uniform_groups_is_the_mean_of_the_masked_channels():
    x, y, mask = sample(counts=(3, 3, 3))
    logits = R.mc_loss(x, y, 3, 3, mask=mask, pooling="avg").logits
    expected = (x * mask.float()[:, None, None]).view(4, 3, 3, -1).mean(dim=(2, 3))
    torch.testing.assert_close(logits, expected)


def test_reductions_relate_as_torch_says():
    # "sum" is the sum over the batch of "none"; "mean" without weights is "sum" / B
    counts = (3, 2, 4)
    x, y, mask = sample(counts=counts, dtype=F64)
    kw = dict(mask=mask, label_smoothing=0.1)
    none = mc.mc_loss(x, y, 3, counts, reduction="none", **kw)
    total = mc.mc_loss(x, y, 3, counts, reduction="sum", **kw)
    mean = mc.mc_loss(x, y, 3, counts, reduction="mean", **kw)
    for a, b, c in zip(none[:3], total[:3], mean[:3]):
        assert a.shape == (4,) and b.shape == () and c.shape == ()
        torch.testing.assert_close(a.sum(), b)
        torch.testing.assert_close(b / 4, c)
    torch.testing.assert_close(none.loss, 1.5 * none.dis + 20.0 * none.div)


@fused_only
@pytest.mark.parametrize(
    "options",
    [
        dict(pooling="avg"),
        dict(weight=True, reduction="sum"),
        dict(label_smoothing=0.3, reduction="none"),
        dict(pooling="avg", weight=True, label_smoothing=0.2),
    ],
    ids=["avg", "weight-sum", "smoothing-none", "avg-weight-smoothing"],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_fused(options, layout):
    counts = (2, 3)
    x = torch.randn(3, 5, 3, 4, dtype=F64)
    x = x + torch.arange(5, dtype=F64).view(1, -1, 1, 1) * 0.3  # no near-ties in the max
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = torch.randint(0, 2, (3,))
    mask = torch.tensor([True, False, True, True, False])
    options = dict(options)
    if options.get("weight"):
        options["weight"] = 0.5 + torch.rand(2, dtype=F64)
    assert mc.backend("cpu") == "cpu"
    torch.autograd.gradcheck(
        lambda t: tuple(mc.mc_loss(t, y, 2, counts, mask=mask, **options)), (x,)
    )


@fused_only
@pytest.mark.parametrize(
    "options",
    [dict(pooling="avg"), dict(pooling="avg", weight=True, label_smoothing=0.2, reduction="none")],
    ids=["avg", "avg-weight-none"],
)
def test_groups_too_large_for_a_tile(options):
    # 64 channels of 32x32 per group: on CUDA (and under the emulator) the stream kernels, not
    # the tiles (tests/cuda_emulated_cases.py::test_launches_per_step); fp32 forward and
    # backward against the reference
    x = torch.randn(2, 128, 32, 32, requires_grad=True)
    y = torch.tensor([1, 0])
    mask = torch.rand(128) < 0.5
    options = dict(options)
    if options.get("weight"):
        options["weight"] = torch.tensor([0.7, 1.6])
    out = mc.mc_loss(x, y, 2, 64, mask=mask, **options)
    ref = R.mc_loss(x, y, 2, 64, mask=mask, **options)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-5)
    g = torch.randn(out.loss.shape)
    (dx,) = torch.autograd.grad((out.loss * g).sum() + out.logits.sum(), x)
    (dx_ref,) = torch.autograd.grad((ref.loss * g).sum() + ref.logits.sum(), x)
    assert_grad_close(dx, dx_ref)


def test_module_weight_is_a_buffer():
    w = torch.tensor([1.0, 2.0, 0.5])
    crit = mc.MCLoss(3, 2, weight=w, label_smoothing=0.1, reduction="sum", pooling="avg")
    assert "weight" in dict(crit.named_buffers())
    assert torch.equal(crit.state_dict()["weight"], w)
    crit = crit.to(F64)
    assert crit.weight.dtype == F64
    x, y, mask = sample(counts=(2, 2, 2))
    out = crit(x, y, mask=mask)
    ref = R.mc_loss(
        x, y, 3, 2, mask=mask, weight=w, label_smoothing=0.1, reduction="sum", pooling="avg"
    )
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    # loading a state dict replaces the weight
    other = mc.MCLoss(3, 2, weight=torch.ones(3))
    other.load_state_dict({"weight": w})
    assert torch.equal(other.weight, w)
    assert "pooling='avg'" in repr(crit) and "reduction='sum'" in repr(crit)
    assert mc.MCLoss(3, 2).weight is None


BAD_OPTIONS = [
    (dict(pooling="mean"), ValueError, "pooling"),
    (dict(pooling=None), ValueError, "pooling"),
    (dict(weight=[1.0, 1.0, 1.0]), TypeError, "weight"),
    (dict(weight=torch.ones(3, dtype=torch.int64)), TypeError, "weight"),
    (dict(weight=torch.ones(4)), ValueError, r"weight: expected shape \(3,\)"),
    (dict(weight=torch.ones(1, 3)), ValueError, "weight"),
    (dict(weight=torch.ones(3, device="meta")), ValueError, "weight"),
    (dict(weight=torch.ones(3, requires_grad=True)), ValueError, "weight: the class weights"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(label_smoothing="0.1"), TypeError, "label_smoothing"),
    (dict(label_smoothing=True), TypeError, "label_smoothing"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(reduction=None), ValueError, "reduction"),
]


@pytest.mark.parametrize("fn", ["mc_loss", "reference", "module"])
@pytest.mark.parametrize(
    "kw, exc, match",
    BAD_OPTIONS,
    ids=[f"{k}-{i}" for i, (kw, _, _) in enumerate(BAD_OPTIONS) for k in kw],
)
def test_bad_options_raise_naming_the_argument(fn, kw, exc, match):
    x, y, mask = sample(counts=(2, 2, 2))
    with pytest.raises(exc, match=match):
        if fn == "mc_loss":
            mc.mc_loss(x, y, 3, 2, mask=mask, **kw)
        elif fn == "reference":
            R.mc_loss(x, y, 3, 2, mask=mask, **kw)
        else:
            mc.MCLoss(3, 2, **kw)(x, y, mask=mask)


@fused_only
def test_op_checks_its_options():
    # a direct op call gets the C++ checks (the Python API's never let these through)
    x, y, _ = sample(counts=(2, 2, 2))
    offsets = torch.tensor([0, 2, 4, 6])
    base = (x, y, offsets, 2, None, -1, 0.5, False, None, 1.5, 20.0)
    op = torch.ops.mcloss_cuda.mc_loss
    with pytest.raises(TypeError, match="weight: expected dtype"):
        op(*base, False, torch.ones(3, dtype=F64), 0.0, 1)
    with pytest.raises(ValueError, match="weight: expected shape"):
        op(*base, False, torch.ones(2), 0.0, 1)
    with pytest.raises(ValueError, match="label_smoothing"):
        op(*base, False, None, 2.0, 1)
    with pytest.raises(ValueError, match="reduction"):
        op(*base, False, None, 0.0, 3)
    out = op(*base, False, torch.ones(3), 0.0, 0)
    g = torch.ones(4)
    bwd = torch.ops.mcloss_cuda.mc_loss_backward
    rest = (
        None,
        None,
        None,
        x,
        y,
        offsets,
        2,
        out[5] if out[5].numel() else torch.ones(6, dtype=torch.bool),
        out[3],
        out[4],
        1.5,
        20.0,
    )
    # reduction none takes (B,) gradients, the others 0-dim ones
    with pytest.raises(ValueError, match="grad_loss: expected shape"):
        bwd(torch.ones(()), *rest, False, None, 0.0, 0)
    with pytest.raises(ValueError, match="grad_loss: expected shape"):
        bwd(g, *rest, False, None, 0.0, 1)
    # a weight needs the forward's weight sums
    with pytest.raises(ValueError, match="weight_sums"):
        bwd(g, *rest, False, torch.ones(3), 0.0, 0)
    dx = bwd(g, *rest, False, torch.ones(3), 0.0, 0, out[6])
    assert dx.shape == x.shape

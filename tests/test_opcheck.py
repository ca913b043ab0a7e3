"""torch.library.opcheck on every op of ``torch.ops.mcloss_cuda``: schema (no undeclared
mutation or aliasing), the autograd registration, the fake (meta) implementations against the
real kernels (shapes, dtypes, strides: channels_last included), and AOT dispatch with dynamic
shapes, on valid sample inputs of every dtype, both memory layouts, uniform and uneven groups,
shared (C,) and per-sample (B, C) masks; for the loss ops masks given in x's dtype and as bool
and drawn inside the op (from the default generator and from a seeded ``torch.Generator``), and
upstream gradients with some of them None. Forward ops also run with requires_grad inputs so
that their backward (one of our backward ops) goes through the checks.

Random inputs are fresh every run (seed printed).
"""

import pytest
import torch

import mcloss_cuda as mc
from helpers import DEVICES, fused_only, offsets_of

pytestmark = [fused_only, pytest.mark.skipif(not mc._ops.AVAILABLE, reason="extension not built")]

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
# every op gets samples (test_registration.py checks that these are all the registered ops)
OP_NAMES = (
    "spatial_softmax",
    "spatial_softmax_backward",
    "channel_mask",
    "ccmp",
    "ccmp_backward",
    "mc_loss",
    "mc_loss_backward",
)
FORWARD_OPS = ("spatial_softmax", "channel_mask", "ccmp", "mc_loss")
# how the loss ops get their mask: given in x's dtype, given as bool, drawn inside from the
# default generator, drawn from a seeded torch.Generator (see test_opcheck for what opcheck
# can check of that one)
MASK_KINDS = ("dtype", "bool", "drawn", "drawn_generator")
# upstream gradients of mc_loss_backward, (loss, dis, div, logits): None is a zero gradient
GRAD_KINDS = ("all", "loss", "dis_div", "logits")
# the loss ops' trailing options (avg_pool, weight, label_smoothing, reduction): the schema's
# defaults (left out of the call), CCAP, and class weights with smoothing under the per-sample
# ("none", 0) and "sum" (2) reductions; "rand" stands for a (K,) weight
LOSS_OPTIONS = (None, (True, None, 0.0, 1), (False, "rand", 0.1, 0), (True, "rand", 0.2, 2))


# (B, counts, H, W)
SHAPES = {
    "uniform": (2, (3, 3), 3, 4),
    "uneven": (3, (1, 4, 2), 2, 5),
    "one_group_1x1": (2, (3,), 1, 1),
    "cnum1_row": (1, (1, 1, 1), 1, 6),
}


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


def loss_args(x, counts, per_sample, mask_kind, seed, options=None):
    """ops.mc_loss's arguments for x: targets, offsets, max_group, the mask as mask_kind says,
    drop / drop_fraction (the default floor(n_i / 2), or drop=1 with a drawn per-sample mask),
    the generator, alpha, beta, then the options (one of LOSS_OPTIONS) if any."""
    B, C, K = x.shape[0], x.shape[1], len(counts)
    device = x.device
    mask = None
    if mask_kind in ("dtype", "bool"):
        mask = mask_for(B, C, x.dtype if mask_kind == "dtype" else torch.bool, device, per_sample)
    drop = 1 if mask_kind == "drawn" and per_sample else -1
    generator = (
        torch.Generator(device=device).manual_seed(seed) if mask_kind == "drawn_generator" else None
    )
    args = (
        x,
        torch.randint(0, K, (B,), device=device),
        offsets_of(counts, device),
        max(counts),
        mask,
        drop,
        0.5,
        per_sample,
        generator,
        float(torch.rand(()) + 0.5),
        float(torch.rand(()) * 20),
    )
    if options is None:
        return args
    avg_pool, weight, smoothing, reduction = options
    if weight == "rand":
        acc = F64 if x.dtype == F64 else F32
        weight = 0.5 + torch.rand(K, device=device, dtype=acc)
    return args + (avg_pool, weight, smoothing, reduction)


def samples(
    op,
    device,
    dtype,
    shape,
    channels_last,
    per_sample,
    requires_grad,
    kind=None,
    seed=0,
    options=None,
):
    """Sample args for ``op``; forward ops get requires_grad features when asked."""
    B, counts, H, W = SHAPES[shape]
    C, K = sum(counts), len(counts)
    acc = F64 if dtype == F64 else F32
    x = features(B, counts, H, W, dtype, device, channels_last)
    off = offsets_of(counts, device)
    mask = mask_for(B, C, dtype, device, per_sample)
    if op in FORWARD_OPS and requires_grad:
        x = x.detach().requires_grad_()
    if op == "mc_loss":
        return loss_args(x, counts, per_sample, kind, seed, options)
    if op == "mc_loss_backward":
        # the backward of a forward with the mask given (in x's dtype or bool) or drawn
        mask_kind = {
            "all": "dtype",
            "loss": "bool",
            "dis_div": "drawn",
            "logits": "drawn_generator",
        }[kind]
        fwd = loss_args(x, counts, per_sample, mask_kind, seed, options)
        out = torch.ops.mcloss_cuda.mc_loss(*fwd)
        used = fwd[4] if fwd[4] is not None else out[5]
        term = (B,) if options is not None and options[3] == 0 else ()
        s = lambda: torch.randn(term, device=device, dtype=acc)  # noqa: E731
        gl = torch.randn(B, K, device=device, dtype=acc)
        grads = {
            "all": (s(), s(), s(), gl),
            "loss": (s(), None, None, None),
            "dis_div": (None, s(), s(), None),
            "logits": (None, None, None, gl),
        }[kind]
        extra = () if options is None else (*fwd[11:], out[6])
        return (*grads, x, fwd[1], off, max(counts), used, out[3], out[4], fwd[9], fwd[10], *extra)
    like_x = torch.randn(x.shape, device=device).to(dtype)
    if channels_last:
        like_x = like_x.contiguous(memory_format=torch.channels_last)
    return {
        "spatial_softmax": (x,),
        "spatial_softmax_backward": (
            like_x,
            torch.softmax(x.detach().float().flatten(2), -1)
            .view(x.shape)
            .to(dtype)
            .contiguous(
                memory_format=torch.channels_last if channels_last else torch.contiguous_format
            ),
        ),
        "channel_mask": (x, mask),
        "ccmp": (x, off),
        "ccmp_backward": (torch.randn(B, K, H, W, device=device).to(dtype), x, off),
    }[op]


# (dtype, shape, channels_last) per op: every dtype, both layouts, uniform, uneven, 1x1 and
# cnum = 1 groups; the mask alternates between (C,) and (B, C) along the list, and for the
# loss ops the mask kind (or the gradients' kind) changes every two entries, so that every
# kind meets both mask shapes
COMBOS = [
    (F32, "uniform", False),
    (F32, "uniform", True),
    (F32, "uneven", False),
    (F32, "uneven", True),
    (F32, "one_group_1x1", True),
    (F32, "cnum1_row", False),
    (F64, "uneven", True),
    (F64, "uniform", False),
    (F16, "uniform", True),
    (BF16, "uneven", False),
    (F32, "uneven", True),
    (BF16, "uniform", False),
    (F64, "one_group_1x1", False),
    (F32, "cnum1_row", True),
    (F16, "uneven", False),
    (F32, "uniform", True),
]


def cases():
    out = []
    for device in DEVICES:
        for op in OP_NAMES:
            kinds = {"mc_loss": MASK_KINDS, "mc_loss_backward": GRAD_KINDS}.get(op)
            # the other ops: the first ten combinations, as before the loss ops had kinds
            combos = COMBOS if kinds else COMBOS[:10]
            for i, (dtype, shape, cl) in enumerate(combos):
                per_sample = i % 2 == 1
                kind = kinds[(i // 2) % len(kinds)] if kinds else None
                # the options: each of them meets every kind and both mask shapes
                opt = (i + i // 4) % len(LOSS_OPTIONS)
                options = LOSS_OPTIONS[opt] if kinds else None
                # forward ops get requires_grad features in fp32/fp64, so that opcheck's
                # autograd and aot_dispatch checks run their registered backward
                rg = op in FORWARD_OPS and dtype in (F32, F64)
                opt_id = "" if options is None else f"-opt{opt}"
                out.append(
                    pytest.param(
                        op,
                        device,
                        dtype,
                        shape,
                        cl,
                        per_sample,
                        rg,
                        kind,
                        options,
                        id=f"{op}-{device}-{str(dtype)[6:]}-{shape}-"
                        f"{'cl' if cl else 'contig'}-{'bc' if per_sample else 'c'}"
                        f"{'-' + kind if kind else ''}{opt_id}{'-grad' if rg else ''}",
                    )
                )
    return out


# opcheck's test_aot_dispatch_dynamic runs the op eagerly and traced and compares the outputs,
# reseeding only the default generators in between (torch.testing._utils.wrapper_set_seed):
# a torch.Generator passed in moves on from one run to the next, so the masks, and the outputs,
# differ. That one check is left out for it; test_generator_draws_repeat states what it would
# have compared.
ALL_CHECKS = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_dynamic",
)


@pytest.mark.parametrize(
    "op, device, dtype, shape, channels_last, per_sample, requires_grad, kind, options", cases()
)
def test_opcheck(
    op, device, dtype, shape, channels_last, per_sample, requires_grad, kind, options, fresh_seed
):
    assert mc.backend(device) != "reference"
    args = samples(
        op,
        device,
        dtype,
        shape,
        channels_last,
        per_sample,
        requires_grad,
        kind,
        fresh_seed,
        options,
    )
    with_generator = any(isinstance(a, torch.Generator) for a in args)
    checks = ALL_CHECKS[:3] if with_generator else ALL_CHECKS
    result = torch.library.opcheck(getattr(torch.ops.mcloss_cuda, op), args, test_utils=checks)
    assert result, result
    assert set(result) == set(checks), result
    assert all(v == "SUCCESS" for v in result.values()), result
    # the requires_grad samples really carry a gradient through the registered backward
    if requires_grad:
        out = getattr(torch.ops.mcloss_cuda, op)(*args)
        outs = out if isinstance(out, tuple) else (out,)
        if op == "mc_loss":
            # loss, dis, div, logits differentiable; lse, drawn_mask and weight_sums not
            assert not any(o.requires_grad for o in outs[4:])
            outs = outs[:4]
        assert all(o.requires_grad for o in outs)
        (dx,) = torch.autograd.grad(sum(o.float().sum() for o in outs), args[0])
        assert dx.shape == args[0].shape and dx.dtype == args[0].dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_generator_draws_repeat(device, per_sample, fresh_seed):
    # what test_aot_dispatch_dynamic would have compared for a seeded generator: the same
    # generator state gives the same outputs and gradient, eagerly and traced by AOTAutograd
    # (forward and backward; the generator a constant of the graph, as opcheck passes it), and
    # the fake implementation gives the real outputs' shapes, dtypes and strides
    from torch._functorch.aot_autograd import aot_function
    from torch._functorch.compilers import nop
    from torch._subclasses.fake_tensor import FakeTensorMode

    B, counts, H, W = SHAPES["uneven"]
    x = features(B, counts, H, W, F32, device, False).requires_grad_()
    args = loss_args(x, counts, per_sample, "drawn_generator", fresh_seed)
    gen = args[8]

    def loss_op(x, targets, offsets):
        return torch.ops.mcloss_cuda.mc_loss(x, targets, offsets, *args[3:])

    def run(fn):
        gen.manual_seed(fresh_seed)
        out = fn(*args[:3])
        (dx,) = torch.autograd.grad(out[0] + out[3].sum(), x)
        return tuple(t.detach() for t in out) + (dx,)

    eager = run(loss_op)
    again = run(loss_op)
    for i, (a, b) in enumerate(zip(eager, again)):
        assert torch.equal(a, b), i
    traced = run(aot_function(loss_op, nop))
    for i, (a, b) in enumerate(zip(eager, traced)):
        assert torch.equal(a, b), i
    # and the generator is what decides: other seeds, other masks (12 masks per row here; one
    # of six other seeds repeats every row with odds below 1e-6)
    others = []
    for k in range(1, 7):
        gen.manual_seed(fresh_seed + k)
        others.append(loss_op(*args[:3])[5])
    assert any(not torch.equal(m, eager[5]) for m in others)
    mode = FakeTensorMode()
    fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        fake = torch.ops.mcloss_cuda.mc_loss(*fake_args)
    for a, b in zip(eager[:7], fake):
        assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()


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

"""Results repeat bit for bit, and do not depend on the memory layout of the features.

Repeatability: the same seed (``torch.manual_seed``, or a seeded ``torch.Generator``) and the
same inputs give bitwise the same loss, terms, logits and gradient, run after run (5 runs), with
1 and with 2 intra-op threads, for the fused path and the reference, every dtype, with the
random mask drawn inside the call. The fused kernels split work by (sample, class group) only,
so their results do not depend on the number of threads either. With a given mask, the fused
loss, spatial_softmax and ccmp repeat bitwise, forward and backward, on uneven groups in both
memory formats, and the fused loss on the random problems of test_properties.py (hypothesis).

Layout: channels_last and strided (non-contiguous: sliced, transposed, batch-expanded) features
give the same loss and gradient as contiguous ones (bitwise where the fused path copies them to
contiguous, to a tight tolerance otherwise), for the loss and the primitives, also with
non-contiguous incoming gradients.

Inputs are random and fresh on every run (the seed is printed).
"""

import pytest
import torch
from hypothesis import given, settings

import mcloss_cuda as mc
from helpers import entropy_seed
from helpers import (
    DEVICES,
    DTYPES,
    GRAD_TOL,
    VALUE_TOL,
    apply_layout,
    fused_only,
    random_features,
    random_targets,
    separated_features,
)

# the random problems (shapes, groups, dtypes, layouts, masks, values) of the property tests
from test_properties import SETTINGS, build, problems

F64 = torch.float64
IMPLS = [pytest.param(mc, id="fused"), pytest.param(mc.reference, id="reference")]


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def features(dtype, device, B=8, K=10, n=6, H=10, W=10):
    # large enough that the CPU kernels split the work over both threads; plain random values
    # (ties and all: a run is only compared with runs of the same inputs)
    return random_features(B, K * n, H, W, dtype=dtype, device=device), K


def run_loss(impl, x, y, K, seed, mode, **kw):
    """One seeded step: (loss, dis, div, logits, gradient) with a mask drawn inside the call."""
    xi = x.detach().clone().requires_grad_()
    if mode == "generator":
        gen = torch.Generator(device=x.device).manual_seed(seed)
        out = impl.mc_loss(xi, y, K, generator=gen, **kw)
    else:
        torch.manual_seed(seed)
        out = impl.mc_loss(xi, y, K, per_sample_mask=mode == "per-sample", **kw)
    (g,) = torch.autograd.grad(out.loss, xi)
    return tuple(t.detach() for t in out) + (g,)


def assert_bitwise(a, b, what):
    names = ("loss", "dis", "div", "logits", "gradient")
    for name, u, v in zip(names, a, b):
        assert u.dtype == v.dtype and u.shape == v.shape, (what, name)
        assert torch.equal(u, v), (
            f"{what}: {name} differs, max |diff| {(u.double() - v.double()).abs().max().item()}"
        )


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("mode", ["shared", "per-sample", "generator"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_mc_loss_repeats_bitwise(impl, device, dtype, mode, threads):
    x, K = features(dtype, device)
    y = random_targets(x.shape[0], K, device)
    seed = entropy_seed()
    runs = [run_loss(impl, x, y, K, seed, mode) for _ in range(5)]
    for i, r in enumerate(runs[1:], 1):
        assert_bitwise(runs[0], r, f"run {i} vs run 0")
    # the seed does drive the mask: another seed gives another loss (the test can fail)
    other = run_loss(impl, x, y, K, seed + 1, mode)
    assert not torch.equal(other[3], runs[0][3]), "a different seed drew the same mask"


@pytest.mark.parametrize("mode", ["shared", "per-sample"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_cpu_independent_of_thread_count(dtype, mode):
    if mc.backend("cpu") == "reference":
        pytest.skip("extension not built or MCLOSS_BACKEND=reference")
    x, K = features(dtype, "cpu")
    y = random_targets(x.shape[0], K)
    seed = entropy_seed()
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            results.append(run_loss(mc, x, y, K, seed, mode))
    finally:
        torch.set_num_threads(before)
    for i, r in enumerate(results[1:], 1):
        assert_bitwise(results[0], r, f"threads {(1, 2, 1, 2)[i]} vs 1")


def primitive_results(impl, x, mask, K, n, gz, gp):
    """Every primitive, forward and backward, on x: a tuple of tensors."""
    out = []
    xi = x.detach().clone().requires_grad_()
    p = impl.spatial_softmax(xi)
    out += [p, torch.autograd.grad(p, xi, gp)[0]]
    xi = x.detach().clone().requires_grad_()
    z = impl.ccmp(xi, n)
    out += [z, torch.autograd.grad(z, xi, gz)[0]]
    xi = x.detach().clone().requires_grad_()
    cm = impl.channel_mask(xi, mask)
    out += [cm, torch.autograd.grad(cm, xi, gp)[0]]
    xi = x.detach().clone().requires_grad_()
    d = impl.diversity_loss(xi, K)
    out += [d, torch.autograd.grad(d, xi)[0]]
    xi = x.detach().clone().requires_grad_()
    lg = impl.discriminality_logits(xi, K, mask)
    out += [lg, torch.autograd.grad(lg, xi, torch.ones_like(lg))[0]]
    return tuple(t.detach() for t in out)


PRIMITIVE_NAMES = [
    "softmax",
    "d softmax",
    "ccmp",
    "d ccmp",
    "channel_mask",
    "d channel_mask",
    "diversity",
    "d diversity",
    "logits",
    "d logits",
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_primitives_repeat_bitwise(impl, device, dtype):
    x, K = features(dtype, device)
    n = x.shape[1] // K
    mask = mc.random_channel_mask(K, n, batch=x.shape[0], device=device)
    gz = torch.randn(x.shape[0], K, *x.shape[2:], dtype=F64).to(dtype=dtype, device=device)
    gp = torch.randn(x.shape, dtype=F64).to(dtype=dtype, device=device)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs = [primitive_results(impl, x, mask, K, n, gz, gp) for _ in range(3)]
            for r in runs[1:]:
                for name, a, b in zip(PRIMITIVE_NAMES, runs[0], r):
                    assert torch.equal(a, b), f"{name} with {threads} threads"
    finally:
        torch.set_num_threads(before)


def grad_of(out, x, g=None):
    (dx,) = torch.autograd.grad(out, x, g)
    return dx


@fused_only
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bitwise_repeatable(device, dtype, layout):
    # uneven groups (3, 1, 5, 3) of C = 12 channels on a 14x14 map, a given mask
    B, K, counts, H, W = 5, 4, (3, 1, 5, 3), 14, 14
    C = sum(counts)
    x = random_features(B, C, H, W, dtype=dtype, device=device)
    x = apply_layout(x, layout).detach().requires_grad_()
    y = random_targets(B, K, device)
    mask = torch.rand(C, device=device) < 0.5
    runs = []
    for _ in range(2):
        out = mc.mc_loss(x, y, K, counts, mask=mask)
        p = mc.spatial_softmax(x)
        z = mc.ccmp(x, list(counts))
        gp = torch.ones_like(p)
        runs.append(
            tuple(out)
            + (p, z, grad_of(out.loss, x), grad_of((p * gp).sum(), x), grad_of(z.sum(), x))
        )
    for i, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a, b), i


@fused_only
@settings(max_examples=20, **SETTINGS)
@given(problems())
def test_repeatable(p):
    x, mask, y, _ = build(p)
    K, cnum = p["K"], p["cnum"]
    a = mc.mc_loss(x, y, K, cnum, mask=mask)
    b = mc.mc_loss(x, y, K, cnum, mask=mask)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert torch.equal(grad_of(a.loss, x), grad_of(b.loss, x))


# ----------------------------------------------------------------------------------------------
# memory layout


def layouts(x):
    """The same values as x in other layouts: (name, tensor, copied to contiguous by the fused
    path, so bitwise equal there)."""
    B, C, H, W = x.shape
    sliced = torch.zeros(B, 2 * C, H + 1, 2 * W, dtype=x.dtype, device=x.device)
    sliced = sliced[:, 1::2, 1:, ::2]
    sliced.copy_(x)
    transposed = torch.empty(B, C, W, H, dtype=x.dtype, device=x.device).transpose(2, 3)
    transposed.copy_(x)
    cl_sliced = torch.zeros(B, C, H, 2 * W, dtype=x.dtype, device=x.device).contiguous(
        memory_format=torch.channels_last
    )[..., ::2]
    cl_sliced.copy_(x)
    out = [
        ("channels_last", x.contiguous(memory_format=torch.channels_last), False),
        ("sliced", sliced, True),
        ("transposed-HW", transposed, True),
        ("channels_last-sliced", cl_sliced, True),
    ]
    for name, t, _ in out:
        assert torch.equal(t, x), name
    cl = out[0][1]
    assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    assert not any(t.is_contiguous() for _, t, _ in out[1:])
    return out


def assert_same(a, b, what, bitwise, grad):
    assert a.shape == b.shape and a.dtype == b.dtype, what
    if bitwise:
        assert torch.equal(a, b), f"{what}: not bitwise equal"
        return
    tol = GRAD_TOL if grad else VALUE_TOL
    rtol, atol = tol[a.dtype] if a.dtype in tol else tol[torch.float32]
    if not grad:
        atol *= 20.0  # the loss carries beta = 20 times the diversity term
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=what)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_mc_loss_layouts_match_contiguous(impl, device, dtype, per_sample):
    K, n, B, H, W = 5, 4, 3, 6, 7
    x = separated_features(B, [n] * K, H, W, dtype=dtype, device=device)
    y = random_targets(B, K, device)
    mask = mc.random_channel_mask(K, n, batch=B if per_sample else None, device=device)
    base = run_loss_with_mask(impl, x, y, K, mask)
    fused = impl is mc and mc.backend(device) != "reference"
    for name, xv, copied in layouts(x):
        res = run_loss_with_mask(impl, xv, y, K, mask)
        for what, a, b in zip(("loss", "dis", "div", "logits", "gradient"), res, base):
            assert_same(a, b, f"{name}: {what}", bitwise=fused and copied, grad=what == "gradient")


def run_loss_with_mask(impl, xv, y, K, mask):
    leaf = xv.detach().requires_grad_()  # keeps the layout of xv
    out = impl.mc_loss(leaf, y, K, mask=mask)
    (g,) = torch.autograd.grad(out.loss, leaf)
    assert g.shape == xv.shape
    return tuple(t.detach() for t in out) + (g,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_mc_loss_batch_expanded_features(impl, device):
    # a batch made by expand() (stride 0 over B): the same as its contiguous copy, and the
    # gradient accumulates into the one shared sample
    K, n, H, W = 4, 3, 5, 5
    x1 = separated_features(1, [n] * K, H, W, device=device)
    y = random_targets(4, K, device)
    mask = mc.random_channel_mask(K, n, device=device)
    grads = []
    for make in (lambda t: t.expand(4, -1, -1, -1), lambda t: t.expand(4, -1, -1, -1).contiguous()):
        leaf = x1.detach().clone().requires_grad_()
        out = impl.mc_loss(make(leaf), y, K, mask=mask)
        out.loss.backward()
        grads.append((out.loss.detach(), leaf.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("grad_kind", ["random", "sum-expanded", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_primitives_layouts_match_contiguous(impl, device, dtype, grad_kind):
    K, n, B, H, W = 3, 4, 2, 5, 6
    x = separated_features(B, [n] * K, H, W, dtype=dtype, device=device)
    mask = mc.random_channel_mask(K, n, batch=B, device=device)
    fused = impl is mc and mc.backend(device) != "reference"

    def incoming(shape):
        # the gradient flowing into the primitive, in various layouts
        if grad_kind == "sum-expanded":
            return None  # out.sum().backward(): a stride-0 gradient
        g = torch.randn(shape, dtype=F64).to(dtype=dtype, device=device)
        if grad_kind == "channels_last":
            return g.contiguous(memory_format=torch.channels_last)
        if grad_kind == "sliced":
            big = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device)[..., ::2]
            big.copy_(g)
            return big
        return g

    gz, gp = incoming((B, K, H, W)), incoming((B, K * n, H, W))

    def results(xv):
        out = []
        for f, g in (
            (impl.spatial_softmax, gp),
            (lambda t: impl.ccmp(t, n), gz),
            (lambda t: impl.channel_mask(t, mask), gp),
        ):
            leaf = xv.detach().requires_grad_()
            y = f(leaf)
            if g is None:
                (dx,) = torch.autograd.grad(y.sum(), leaf)
            else:
                (dx,) = torch.autograd.grad(y, leaf, g)
            out += [y.detach(), dx]
        return out

    base = results(x)
    names = ["softmax", "d softmax", "ccmp", "d ccmp", "channel_mask", "d channel_mask"]
    for lname, xv, copied in [("contiguous", x, True)] + layouts(x):
        for what, a, b in zip(names, results(xv), base):
            exact = (fused and copied) or what in (
                "ccmp",
                "d ccmp",
                "channel_mask",
                "d channel_mask",
            )
            if what == "softmax" and not exact:
                rtol, atol = {torch.float16: (2**-10, 6e-8), torch.bfloat16: (2**-7, 1e-38)}.get(
                    dtype, VALUE_TOL[dtype]
                )
                torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=f"{lname}: {what}")
            else:
                assert_same(a, b, f"{lname}: {what}", bitwise=exact, grad=True)

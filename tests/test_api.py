"""Tests of the public contract of docs/spec.md: names and signatures, MCLossOutput, MCLoss,
backend selection, the random channel mask and its seeding, and the dtype policy.

Random inputs are fresh every run: each test seeds torch from the OS entropy pool and prints
the seed (tests about seeding draw their own seed the same way).
"""

import inspect
import itertools
import typing

import pytest
import torch

import mcloss_cuda as mc
from helpers import entropy_seed
from helpers import (
    DEVICES,
    GRAD_TOL,
    VALUE_TOL,
    counts_of,
    group_bounds,
    offsets_of,
    random_targets,
    separated_features,
)

P = inspect.Parameter
POS, KW = P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY
NO = P.empty


# ----------------------------------------------------------------------------------------------
# names and signatures, written out from docs/spec.md's contract: (name, kind, default)

SPEC_SIGNATURES = {
    "mc_loss": [
        ("features", POS, NO),
        ("targets", POS, NO),
        ("num_classes", POS, NO),
        ("cnum", POS, None),
        ("mask", KW, None),
        ("alpha", KW, 1.5),
        ("beta", KW, 20.0),
        ("drop", KW, None),
        ("per_sample_mask", KW, False),
        ("generator", KW, None),
        ("pooling", KW, "max"),
        ("weight", KW, None),
        ("label_smoothing", KW, 0.0),
        ("reduction", KW, "mean"),
    ],
    "spatial_softmax": [("x", POS, NO)],
    "channel_mask": [("x", POS, NO), ("mask", POS, NO)],
    "ccmp": [("x", POS, NO), ("cnum", POS, NO)],
    "diversity_loss": [("x", POS, NO), ("num_classes", POS, NO), ("cnum", POS, None)],
    "discriminality_logits": [
        ("x", POS, NO),
        ("num_classes", POS, NO),
        ("mask", POS, NO),
        ("cnum", POS, None),
    ],
    "random_channel_mask": [
        ("num_classes", POS, NO),
        ("cnum", POS, NO),
        ("batch", KW, None),
        ("drop", KW, None),
        ("generator", KW, None),
        ("device", KW, None),
    ],
    "backend": [("device", POS, NO)],
}
MCLOSS_INIT = [
    ("num_classes", POS, NO),
    ("cnum", POS, None),
    ("alpha", POS, 1.5),
    ("beta", POS, 20.0),
    ("drop", POS, None),
    ("per_sample_mask", POS, False),
    ("pooling", POS, "max"),
    ("weight", POS, None),
    ("label_smoothing", POS, 0.0),
    ("reduction", POS, "mean"),
]
MCLOSS_FORWARD = [("features", POS, NO), ("targets", POS, NO), ("mask", POS, None)]
# docs/spec.md: mc.reference holds the pure-PyTorch versions of the functions (backend and the
# module wrapper are about dispatch, not about numbers)
REFERENCE_NAMES = [
    "mc_loss",
    "spatial_softmax",
    "channel_mask",
    "ccmp",
    "diversity_loss",
    "discriminality_logits",
    "random_channel_mask",
]


def described(fn):
    out = []
    for p in inspect.signature(fn).parameters.values():
        d = p.default
        out.append((p.name, p.kind, d, type(d)))
    return out


def expected(spec):
    return [(name, kind, d, type(d)) for name, kind, d in spec]


@pytest.mark.parametrize("name", sorted(SPEC_SIGNATURES))
def test_public_signatures(name):
    fn = getattr(mc, name)
    assert callable(fn)
    assert described(fn) == expected(SPEC_SIGNATURES[name])


@pytest.mark.parametrize("name", REFERENCE_NAMES)
def test_reference_signatures(name):
    fn = getattr(mc.reference, name)
    assert callable(fn)
    assert described(fn) == expected(SPEC_SIGNATURES[name])


def test_mcloss_signatures():
    assert issubclass(mc.MCLoss, torch.nn.Module)
    assert described(mc.MCLoss) == expected(MCLOSS_INIT)
    assert described(mc.MCLoss(3).forward) == expected(MCLOSS_FORWARD)


def test_mcloss_output_namedtuple():
    for cls in (mc.MCLossOutput, mc.reference.MCLossOutput):
        assert issubclass(cls, tuple)
        assert cls._fields == ("loss", "dis", "div", "logits")
        assert typing.get_type_hints(cls).keys() == {"loss", "dis", "div", "logits"}
    x = torch.randn(2, 6, 3, 3)
    y = random_targets(2, 3)
    for impl in (mc, mc.reference):
        out = impl.mc_loss(x, y, 3)
        assert isinstance(out, mc.MCLossOutput)
        loss, dis, div, logits = out  # unpacks in field order
        assert loss is out.loss and dis is out.dis and div is out.div and logits is out.logits
        assert loss.dim() == dis.dim() == div.dim() == 0 and logits.shape == (2, 3)


# ----------------------------------------------------------------------------------------------
# backend


def test_backend_cpu(monkeypatch):
    monkeypatch.delenv("MCLOSS_BACKEND", raising=False)
    assert mc.backend("cpu") in ("cpu", "reference")
    assert mc.backend(torch.device("cpu")) == mc.backend("cpu")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_backend_env_forces_reference(monkeypatch, device):
    monkeypatch.setenv("MCLOSS_BACKEND", "reference")
    assert mc.backend(device) == "reference"


@pytest.mark.parametrize("device", DEVICES)
def test_backend_env_reference_path_gives_reference_numbers(monkeypatch, device):
    # with the pure-PyTorch path forced, the public function runs exactly the reference
    monkeypatch.setenv("MCLOSS_BACKEND", "reference")
    x = torch.randn(3, 8, 2, 5, device=device, requires_grad=True)
    y = random_targets(3, 4, device)
    mask = mc.random_channel_mask(4, 2, device=device)
    out, ref = mc.mc_loss(x, y, 4, mask=mask), mc.reference.mc_loss(x, y, 4, mask=mask)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    assert torch.equal(torch.autograd.grad(out.loss, x)[0], torch.autograd.grad(ref.loss, x)[0])


# ----------------------------------------------------------------------------------------------
# MCLoss


@pytest.mark.parametrize("device", DEVICES)
def test_mcloss_forward_equals_mc_loss(device):
    B, K, cnum, H, W = 4, 3, 4, 3, 5
    x = torch.randn(B, K * cnum, H, W, device=device, requires_grad=True)
    y = random_targets(B, K, device)
    mask = mc.random_channel_mask(K, cnum, batch=B, device=device)

    crit = mc.MCLoss(K, cnum, alpha=0.7, beta=3.0)
    out = crit(x, y, mask=mask)
    ref = mc.mc_loss(x, y, K, cnum, mask=mask, alpha=0.7, beta=3.0)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    assert torch.equal(torch.autograd.grad(out.loss, x)[0], torch.autograd.grad(ref.loss, x)[0])

    # the defaults are the published alpha = 1.5, beta = 20 and cnum = C // K
    out = mc.MCLoss(K)(x, y, mask)
    torch.testing.assert_close(out.loss, 1.5 * out.dis + 20.0 * out.div)
    for a, b in zip(out, mc.mc_loss(x, y, K, mask=mask)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_mcloss_random_mask_equals_mc_loss(device, per_sample):
    # mask=None: the module draws the same mask as mc_loss with the same drop / per-sample
    B, K, counts, H, W = 5, 3, [3, 5, 4], 2, 3
    x = torch.randn(B, sum(counts), H, W, device=device)
    y = random_targets(B, K, device)
    seed = entropy_seed()
    crit = mc.MCLoss(K, counts, drop=1, per_sample_mask=per_sample)
    torch.manual_seed(seed)
    out = crit(x, y)
    torch.manual_seed(seed)
    ref = mc.mc_loss(x, y, K, counts, drop=1, per_sample_mask=per_sample)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# the random channel mask


def group_slices(counts):
    bounds = group_bounds(counts)
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


MASK_CASES = [
    # (num_classes, cnum, drop, dropped per group)
    (2, 3, None, [1, 1]),  # the published setting: one of three
    (3, 4, None, [2, 2, 2]),
    (4, 1, None, [0, 0, 0, 0]),  # floor(1/2) = 0
    (2, 5, None, [2, 2]),
    (3, [1, 2, 5], None, [0, 1, 2]),  # uneven: floor(n_i / 2) per group
    (4, [3, 6, 2, 7], None, [1, 3, 1, 3]),
    (2, [3, 6], 2, [2, 2]),  # explicit drop on uneven groups
    (5, 5, 0, [0] * 5),
    (3, 4, 3, [3, 3, 3]),
    (1, 9, 8, [8]),
]


@pytest.mark.parametrize("batch", [None, 7])
@pytest.mark.parametrize("K, cnum, drop, dropped", MASK_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_mask_drop_counts_shape_dtype(device, K, cnum, drop, dropped, batch):
    counts = counts_of(K, cnum)
    C = sum(counts)
    for _ in range(5):
        m = mc.random_channel_mask(K, cnum, batch=batch, drop=drop, device=device)
        assert m.dtype == torch.bool
        assert m.device.type == torch.device(device).type
        assert m.shape == ((C,) if batch is None else (batch, C))
        rows = m[None] if batch is None else m
        for sl, d in zip(group_slices(counts), dropped):
            assert ((~rows[:, sl]).sum(dim=1) == d).all(), (sl, d, rows)


def test_mask_batch_zero_and_default_device():
    assert mc.random_channel_mask(2, 3, batch=0).shape == (0, 6)
    assert mc.random_channel_mask(2, 3).device.type == "cpu"


@pytest.mark.parametrize("device", DEVICES)
def test_mask_per_sample_rows_differ(device):
    # 4 groups of 4 with 2 dropped: C(4,2)^4 = 1296 equally likely rows; 512 draws give about
    # 1296 (1 - exp(-512/1296)) ~ 422 distinct rows (sd ~ 8), a shared draw would give 1
    m = mc.random_channel_mask(4, 4, batch=512, device=device)
    assert m.shape == (512, 16)
    distinct = torch.unique(m, dim=0).shape[0]
    assert distinct > 330, distinct


@pytest.mark.parametrize("device", DEVICES)
def test_mask_channels_dropped_uniformly(device):
    counts = [3, 4, 5, 1]
    drops = [n // 2 for n in counts]
    expected_freq = torch.tensor(
        [d / n for n, d in zip(counts, drops) for _ in range(n)], dtype=torch.float64
    )
    # per-sample draws: 6000 rows; the frequency of each channel has sd <= 0.0065, allow 0.04
    m = mc.random_channel_mask(4, counts, batch=6000, device=device).cpu()
    freq = (~m).double().mean(0)
    assert (freq - expected_freq).abs().max() < 0.04, freq
    # shared draws, one call each: 1200 calls, sd <= 0.0145, allow 0.08
    shared = torch.stack([mc.random_channel_mask(4, counts, device=device) for _ in range(1200)])
    freq = (~shared.cpu()).double().mean(0)
    assert (freq - expected_freq).abs().max() < 0.08, freq
    # the dropped pair of a group of 4 is uniform over the 6 pairs (sd 0.0048, allow 0.03)
    g = (~m[:, 3:7]).long()
    code = (g * torch.tensor([1, 2, 4, 8])).sum(1)
    pairs = torch.tensor([a + b for a, b in itertools.combinations([1, 2, 4, 8], 2)])
    hits = (code[:, None] == pairs).long().sum(0)
    assert hits.sum() == code.shape[0]  # every row drops exactly one of the 6 pairs
    share = hits.double() / code.shape[0]
    assert (share - 1 / 6).abs().max() < 0.03, share


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_mask_manual_seed_repeats(device, per_sample):
    batch = 6 if per_sample else None
    seed = entropy_seed()
    draws = []
    for s in (seed, seed, seed + 1):
        torch.manual_seed(s)
        draws.append(mc.random_channel_mask(50, [4] * 25 + [5] * 25, batch=batch, device=device))
    assert torch.equal(draws[0], draws[1])
    # 50 groups with 6 or 10 choices each: another seed repeating the draw is ~ 1e-30
    assert not torch.equal(draws[0], draws[2])


@pytest.mark.parametrize("device", DEVICES)
def test_mask_generator_repeats_and_leaves_default_rng(device):
    seed = entropy_seed()
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state() if torch.device(device).type == "cuda" else None

    def draw(**kw):
        g = torch.Generator(device=device).manual_seed(seed)
        return mc.random_channel_mask(50, 4, batch=3, generator=g, device=device, **kw)

    a = draw()
    b = draw()
    assert torch.equal(a, b)
    assert torch.equal(draw(drop=1), draw(drop=1))
    # the default generator was not touched
    assert torch.equal(torch.get_rng_state(), cpu_state)
    if cuda_state is not None:
        assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    # and its state does not matter to a draw from the generator
    torch.manual_seed(entropy_seed())
    assert torch.equal(draw(), a)


MC_SEED_CASES = [
    # (num_classes, cnum passed to mc_loss, C)
    (3, 4, 12),
    (2, 3, 6),
    (3, [2, 5, 3], 10),
    (4, None, 11),  # balanced split [3, 3, 3, 2]
]


def drawn_by_the_fused_op(x, y, counts, drop, per_sample, generator):
    """The mask the fused mc_loss draws inside its op for these arguments (with mask=None,
    mc.mc_loss passes drop=-1 and drop_fraction=0.5 for drop=None: floor(n_i / 2))."""
    offsets = offsets_of(counts, x.device)
    out = torch.ops.mcloss_cuda.mc_loss(
        x.detach(),
        y,
        offsets,
        max(counts),
        None,
        -1 if drop is None else drop,
        0.5,
        per_sample,
        generator,
        1.5,
        20.0,
    )
    return out[0], out[5]


@pytest.mark.parametrize("use_generator", [False, True], ids=["default_rng", "generator"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("K, cnum, C", MC_SEED_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_mc_loss_random_mask_is_seeded(device, K, cnum, C, per_sample, use_generator):
    B, H, W = 4, 3, 4
    counts = counts_of(K, cnum, C)
    x = torch.randn(B, C, H, W, dtype=torch.float64, device=device, requires_grad=True)
    y = random_targets(B, K, device)
    drop = None if C % 2 else 1
    seed = entropy_seed()

    def rng():
        if use_generator:
            return {"generator": torch.Generator(device=device).manual_seed(seed)}
        torch.manual_seed(seed)
        return {}

    def drops_per_group(mask):
        bounds = group_bounds(counts)
        m = mask.reshape(-1, C)
        return [(~m[:, a:b]).sum(1).tolist() for a, b in zip(bounds[:-1], bounds[1:])]

    out1 = mc.mc_loss(x, y, K, cnum, drop=drop, per_sample_mask=per_sample, **rng())
    out2 = mc.mc_loss(x, y, K, cnum, drop=drop, per_sample_mask=per_sample, **rng())
    if mc.backend(device) == "reference":
        mask = mc.random_channel_mask(
            K, counts, batch=B if per_sample else None, drop=drop, device=device, **rng()
        )
    else:
        # the fused path draws the mask inside its op (another stream of numbers than
        # random_channel_mask's for the same seed): the op's own drawn_mask, drawn from the
        # same generator state, is the mask it used
        loss, mask = drawn_by_the_fused_op(x, y, counts, drop, per_sample, rng().get("generator"))
        assert torch.equal(loss, out1.loss.detach())
    rows = B if per_sample else 1
    want = [[n // 2 if drop is None else drop] * rows for n in counts]
    assert mask.dtype == torch.bool and mask.shape == ((B, C) if per_sample else (C,))
    assert drops_per_group(mask) == want
    out3 = mc.mc_loss(x, y, K, cnum, mask=mask)
    out4 = mc.reference.mc_loss(x, y, K, cnum, mask=mask)
    for a, b, c in zip(out1, out2, out3):
        assert torch.equal(a, b)
        assert torch.equal(a, c)
    for a, d in zip(out1, out4):
        torch.testing.assert_close(a, d, rtol=1e-10, atol=1e-12)
    g1, g3 = (torch.autograd.grad(o.loss, x)[0] for o in (out1, out3))
    assert torch.equal(g1, g3)
    # the reference draws with random_channel_mask, from the same generator state
    ref1 = mc.reference.mc_loss(x, y, K, cnum, drop=drop, per_sample_mask=per_sample, **rng())
    ref_mask = mc.random_channel_mask(
        K, counts, batch=B if per_sample else None, drop=drop, device=device, **rng()
    )
    for a, b in zip(ref1, mc.reference.mc_loss(x, y, K, cnum, mask=ref_mask)):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# dtype policy


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", [mc.reference, mc], ids=["reference", "public"])
def test_dtype_policy(impl, device, dtype):
    out_dtype = {torch.float64: torch.float64}.get(dtype, torch.float32)
    K, counts, B, H, W = 3, [3, 3, 3], 3, 4, 5
    x = separated_features(B, counts, H, W, dtype=dtype, device=device).requires_grad_()
    y = random_targets(B, K, device)
    mask = mc.random_channel_mask(K, 3, batch=B, device=device)
    out = impl.mc_loss(x, y, K, 3, mask=mask)
    for name in ("loss", "dis", "div", "logits"):
        assert getattr(out, name).dtype == out_dtype, name
    assert impl.diversity_loss(x, K).dtype == out_dtype
    assert impl.discriminality_logits(x, K, mask).dtype == out_dtype
    (g,) = torch.autograd.grad(out.loss, x)
    assert g.dtype == dtype and g.shape == x.shape
    if impl is mc.reference and dtype in (torch.float32, torch.float64):
        return  # the comparison below would be the reference against itself
    # the numbers are those of the same loss on the exactly upcast input (fp32 accumulation,
    # not accumulation in the input's own precision)
    xu = x.detach().to(out_dtype).requires_grad_()
    ref = mc.reference.mc_loss(xu, y, K, 3, mask=mask)
    rtol, atol = VALUE_TOL[dtype]
    for name in ("loss", "dis", "div", "logits"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=rtol, atol=atol)
    (g_ref,) = torch.autograd.grad(ref.loss, xu)
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(g, g_ref.to(dtype), rtol=rtol, atol=atol)

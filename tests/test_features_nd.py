"""Features with any number of spatial dimensions, (B, C, *S), and the float `drop` fraction,
on the fused path against the reference (and in the emulated CUDA run, where this file runs
too). Inputs are random and fresh on every run."""

import math

import pytest
import torch

import mcloss_cuda as mc
from mcloss_cuda import reference
from mcloss_cuda._ops import as_maps
from helpers import GRAD_TOL, VALUE_TOL, fused_only, random_targets

ops = torch.ops.mcloss_cuda
K, N = 4, 3
C = K * N


def _tokens(B, L, dtype):
    """ViT-style tokens (B, L, C) seen as features (B, C, L): a transposed view, no copy."""
    return torch.randn(B, L, C, dtype=dtype).transpose(1, 2)


SHAPES = {
    "sequence": lambda dt: torch.randn(3, C, 10, dtype=dt),
    "one-position": lambda dt: torch.randn(2, C, 1, dtype=dt),
    "volume": lambda dt: torch.randn(2, C, 3, 4, 5, dtype=dt),
    "volume-channels-last": lambda dt: torch.randn(2, C, 3, 2, 5, dtype=dt).contiguous(
        memory_format=torch.channels_last_3d
    ),
    "tokens": lambda dt: _tokens(2, 9, dt),
    "map-b32-1x40": lambda dt: torch.randn(2, C, 1, 40, dtype=dt),
}


def _close(a, b, tol):
    rtol, atol = tol
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True)


@fused_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_mc_loss_any_spatial_dims(shape, dtype):
    x = SHAPES[shape](dtype).requires_grad_(True)
    y = random_targets(x.shape[0], K)
    mask = mc.random_channel_mask(K, N, batch=x.shape[0])
    out = mc.mc_loss(x, y, K, N, mask=mask)
    ref = reference.mc_loss(x, y, K, N, mask=mask)
    for a, b in zip(out, ref):
        _close(a, b, VALUE_TOL[dtype])
    g = torch.randn(x.shape[0], K, dtype=out.logits.dtype)
    (dx,) = torch.autograd.grad(out.loss + (out.logits * g).sum(), x)
    (dr,) = torch.autograd.grad(ref.loss + (ref.logits * g).sum(), x)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    _close(dx, dr, GRAD_TOL[dtype])


@fused_only
@pytest.mark.parametrize("shape", list(SHAPES))
def test_primitives_any_spatial_dims(shape):
    x = SHAPES[shape](torch.float64).requires_grad_(True)
    mask = mc.random_channel_mask(K, N)
    for f, g in (
        (mc.spatial_softmax, reference.spatial_softmax),
        (lambda t: mc.channel_mask(t, mask), lambda t: reference.channel_mask(t, mask)),
        (lambda t: mc.ccmp(t, N), lambda t: reference.ccmp(t, N)),
    ):
        a, b = f(x), g(x)
        assert a.shape == b.shape
        _close(a, b, VALUE_TOL[torch.float64])
        up = torch.randn_like(a)
        (ga,) = torch.autograd.grad(a, x, up)
        (gb,) = torch.autograd.grad(b, x, up)
        _close(ga, gb, GRAD_TOL[torch.float64])
    assert mc.diversity_loss(x, K, N).shape == ()
    assert mc.discriminality_logits(x, K, mask, N).shape == (x.shape[0], K)


@pytest.mark.parametrize("shape", ["sequence", "volume", "volume-channels-last", "tokens"])
def test_no_copy_for_the_kernels(shape):
    x = SHAPES[shape](torch.float32)
    maps = as_maps(x)
    assert maps.dim() == 4 and maps.data_ptr() == x.data_ptr()
    assert maps.is_contiguous() or maps.is_contiguous(memory_format=torch.channels_last)


def test_gradcheck_sequence_and_volume():
    for x in (
        torch.randn(2, C, 5, dtype=torch.float64),
        torch.randn(1, C, 2, 2, 3, dtype=torch.float64),
    ):
        x.requires_grad_(True)
        y = random_targets(x.shape[0], K)
        mask = mc.random_channel_mask(K, N)
        assert torch.autograd.gradcheck(lambda t: mc.mc_loss(t, y, K, N, mask=mask).loss, (x,))


@pytest.mark.parametrize("p", [0.0, 0.25, 0.4, 0.5, 0.99])
@pytest.mark.parametrize("counts", [(5, 7, 10), (3, 3, 3)], ids=["uneven", "uniform"])
def test_float_drop_fraction(counts, p):
    dropped = [math.floor(n * p) for n in counts]
    m = mc.random_channel_mask(len(counts), list(counts), drop=p, batch=6)
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    for i, d in enumerate(dropped):
        assert ((~m[:, starts[i] : starts[i + 1]]).sum(1) == d).all()


@fused_only
@pytest.mark.parametrize("p", [0.25, 0.4])
def test_float_drop_in_the_fused_loss(p):
    counts = [5, 7, 10]
    x = torch.randn(3, sum(counts), 4, 5, dtype=torch.float64, requires_grad=True)
    y = random_targets(3, len(counts))
    seed = int(torch.randint(0, 2**62, ()))
    out = mc.mc_loss(
        x,
        y,
        len(counts),
        counts,
        drop=p,
        per_sample_mask=True,
        generator=torch.Generator().manual_seed(seed),
    )
    # the mask that call drew, from the op with the same generator state
    offsets = torch.tensor([0, 5, 12, 22])
    drawn = ops.mc_loss(
        x.detach(),
        y,
        offsets,
        10,
        None,
        -1,
        p,
        True,
        torch.Generator().manual_seed(seed),
        1.5,
        20.0,
    )[5]
    for r in range(3):
        for i, n in enumerate(counts):
            assert int((~drawn[r, offsets[i] : offsets[i + 1]]).sum()) == math.floor(n * p)
    ref = reference.mc_loss(x, y, len(counts), counts, mask=drawn)
    _close(out.loss, ref.loss, VALUE_TOL[torch.float64])


def test_drop_fraction_bad_values():
    x = torch.randn(2, C, 3, 3)
    y = random_targets(2, K)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(
            ValueError, match=r"drop: a fraction of each group must lie in \[0, 1\)"
        ):
            mc.mc_loss(x, y, K, N, drop=bad)


def test_features_without_spatial_dims_are_refused():
    with pytest.raises(ValueError, match="features: expected a tensor \\(B, C, \\*S\\)"):
        mc.mc_loss(torch.randn(2, C), random_targets(2, K), K, N)
    with pytest.raises(ValueError, match="no positions"):
        mc.mc_loss(torch.randn(2, C, 0), random_targets(2, K), K, N)

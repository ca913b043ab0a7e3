"""Shared test helpers: devices, dtypes, tolerances and input generators."""

import os
import sys
from typing import NamedTuple

import pytest
import torch

import mcloss_cuda as mc

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
fused_only = pytest.mark.skipif(
    mc.backend("cpu") == "reference", reason="extension not built or MCLOSS_BACKEND=reference"
)

# (rtol, atol) for values computed in fp32 (fp16/bf16 inputs accumulate in fp32 too);
# gradients of fp16/bf16 inputs come back rounded to the input dtype.
VALUE_TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-5, 1e-6),
    torch.bfloat16: (1e-5, 1e-6),
}
GRAD_TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-7),
    torch.float16: (1e-2, 1e-5),
    torch.bfloat16: (2e-2, 1e-4),
}
# absolute gradient tolerance, as a fraction of the largest |gradient| (a few ulps of it)
GRAD_SCALE = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 2**-9,
    torch.bfloat16: 2**-6,
}


def entropy_seed():
    """A fresh 63-bit seed from the OS, different every run."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def child_env(**extra):
    """Environment for a child Python process that imports the same mcloss_cuda as this one
    (the installed package in CI, the checkout in a development tree) and tests/helpers.py."""
    here = os.path.dirname(os.path.abspath(__file__))
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(mc.__file__)))
    paths = [package_parent, here] + [p or os.getcwd() for p in sys.path]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)))
    # `python -c` would put its working directory first on sys.path; from the repository root
    # that is the source tree, without the compiled extension (Python >= 3.11 honours this;
    # the callers also run children outside the repository root)
    env["PYTHONSAFEPATH"] = "1"
    # a child killed by a signal (SIGABRT from a C++ std::terminate, SIGSEGV) prints the Python
    # stack of every thread, so a failure in CI says where it happened
    env["PYTHONFAULTHANDLER"] = "1"
    env.update(extra)
    return env


def counts_of(num_classes, cnum, channels=None):
    if cnum is None:
        base, extra = divmod(channels, num_classes)
        return [base + (i < extra) for i in range(num_classes)]
    if isinstance(cnum, int):
        return [cnum] * num_classes
    return list(cnum)


def group_bounds(counts):
    """[0, n_0, n_0 + n_1, ..., C]: group i holds channels bounds[i]:bounds[i + 1]."""
    bounds = [0]
    for n in counts:
        bounds.append(bounds[-1] + int(n))
    return bounds


def offsets_of(counts, device="cpu"):
    """The int64 (K + 1,) group boundaries the ops take."""
    return torch.tensor(group_bounds(counts), dtype=torch.int64, device=device)


def separated_features(
    batch,
    counts,
    H,
    W,
    dtype=torch.float32,
    device="cpu",
    generator=None,
    scale=1.0,
    channels_last=False,
):
    """Random features whose per-position channel maxima are never near-ties.

    Every channel of a group holds the same set of distinct values (odd multiples of 1/16,
    never 0, exact in fp16 for maps of up to 512 positions and in bf16 up to 128) in a cyclically
    shifted random order, so that at each position the channels of a group hold different
    values and every channel has the same softmax normaliser. Near-ties would otherwise let
    rounding pick a different winner in the kernel and in the reference, and the gradient,
    which is discontinuous there, would differ legitimately. The values are random each run.
    """
    HW = H * W
    if max(counts) > HW:
        raise ValueError("separated_features needs groups no larger than H*W")
    if (
        HW > (128 if dtype == torch.bfloat16 else 512)
        and dtype != torch.float32
        and dtype != torch.float64
    ):
        raise ValueError("separated_features: map too large for distinct values in this dtype")
    span = max(HW, 64)
    xs = []
    for n in counts:
        # per sample: HW distinct odd multiples of 1/16 in [-span/16, span/16], shuffled
        grid = (torch.arange(-span, span, dtype=torch.float64) * 2 + 1) / 16
        pick = torch.rand(batch, grid.numel(), generator=generator).argsort(-1)[:, :HW]
        vals = grid[pick] * scale  # (B, HW)
        order = torch.rand(batch, HW, generator=generator).argsort(-1)
        vals = torch.gather(vals, 1, order)
        chans = torch.stack([torch.roll(vals, shifts=j + 1, dims=1) for j in range(n)], 1)
        xs.append(chans)
    x = torch.cat(xs, 1).reshape(batch, sum(counts), H, W).to(dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def random_features(
    batch, channels, H, W, dtype=torch.float32, device="cpu", scale=1.0, channels_last=False
):
    x = (torch.randn(batch, channels, H, W, dtype=torch.float64) * scale).to(
        dtype=dtype, device=device
    )
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def random_targets(batch, num_classes, device="cpu"):
    return torch.randint(0, num_classes, (batch,), device=device)


def apply_layout(x, layout):
    """The same values in another memory layout. The non-contiguous ones are views into a
    NaN-filled buffer (sliced) or a transpose, so a kernel ignoring strides reads NaN/garbage."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    B, C, H, W = x.shape
    if layout == "sliced":
        big = torch.full((B + 1, C + 2, H, W + 3), float("nan"), dtype=x.dtype, device=x.device)
        view = big[1:, 1 : C + 1, :, 2 : W + 2]
        view.copy_(x)
        return view
    if layout == "transposed":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    raise ValueError(layout)


def assert_grad_close(actual, expected, terms=0.0, equal_nan=False):
    """GRAD_TOL, plus GRAD_SCALE times the size of the terms the gradient is made of: the
    largest |expected| or ``terms`` (see *_terms), whichever is larger. A gradient that cancels
    to about 0 (a group of one channel wins every position: p * (1 - A) with A = sum p = 1)
    carries the rounding error of its terms, not of its value."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    rtol, atol = GRAD_TOL[expected.dtype]
    finite = expected[expected.isfinite()]
    scale = max(finite.abs().max().item() if finite.numel() else 0.0, float(terms))
    torch.testing.assert_close(
        actual,
        expected,
        rtol=rtol,
        atol=atol + GRAD_SCALE[expected.dtype] * scale,
        equal_nan=equal_nan,
    )


class SavedForBackward(NamedTuple):
    out: object  # what fn() returned (its graph keeps the saved tensors alive)
    nbytes: int  # bytes of the unique storages saved, x's own storage left out
    shapes: list  # the shapes of the saved tensors not on x's storage, one per save
    saw_x: bool  # whether a tensor on x's storage was saved


def saved_for_backward(fn, x):
    """Run ``fn()`` under saved_tensors_hooks and measure what autograd keeps for its backward.

    A storage counts once however many saved tensors view it, and x's own storage not at all:
    the caller keeps the features alive anyway, so they cost the backward nothing extra. A
    saved tensor without a storage (e.g. a sparse or meta one) counts nothing."""
    x_key = (str(x.device), x.untyped_storage().data_ptr())
    sizes, shapes, saw_x = {}, [], False

    def pack(t):
        nonlocal saw_x
        try:
            st = t.untyped_storage()
            key, nbytes = (str(t.device), st.data_ptr()), st.nbytes()
        except Exception:
            return t
        if key == x_key:
            saw_x = True
        else:
            sizes[key] = nbytes
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return SavedForBackward(out, int(sum(sizes.values())), shapes, saw_x)

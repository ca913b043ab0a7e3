"""Every public op of mcloss_cuda against ``mcloss_cuda.reference``, one test class per op (the
layout of torchvision's test/test_ops.py): the fused kernels (C++ CPU, and CUDA where built).

``OpTester`` holds what the classes share: the op under test (``fn``), its reference
(``expected_fn``), how inputs are made and how values and gradients compare, and the two tests
each op gets:

- ``test_forward_backward``: forward values and gradients over many shapes (B in {1, 2, 5},
  cnum from 1 to 64, uneven and balanced groups, 1xN, Nx1, 1x1, 7x7, 14x14, 5x9, 56x56 and
  112x112 maps; test_kernels.CASES), every dtype, contiguous / channels_last / non-contiguous
  inputs, shared and per-sample, bool and float masks; the backward compared only where the
  inputs can be made free of near-ties (test_kernels.grad_feasible).
- ``test_gradcheck``: torch.autograd.gradcheck in float64 on the small problems of
  test_kernels.GC_CASES (mc_loss: its loss, all its outputs, dis, div and logits).

Everything else about the kernels (ties, NaN and Inf, the loss ops called directly, the mask
drawn inside the op, the parallel split, what is saved for backward) is in test_kernels.py,
which also holds the cases and the tolerance helpers used here.

Random inputs are fresh every run: each test seeds torch from the OS entropy pool and prints
the seed, so a failure can be replayed with ``torch.manual_seed(<seed>)``.

Tolerances (test_kernels.py). Values computed in fp32/fp64 use ``helpers.VALUE_TOL``. Maps
returned in fp16/bf16 (spatial_softmax) are both rounded once from fp32, so they may differ by
one unit in the last place: rtol = the dtype's eps. ccmp and channel_mask only select and
multiply by 0/1: they must be bitwise equal. Gradients use ``helpers.GRAD_TOL`` plus an
absolute term proportional to the largest gradient element (GRAD_SCALE): a gradient element is
a difference of terms of the size of the largest ones (p * (g - <g, p>), gh * p * (1 - A_j)),
so its rounding error scales with them and not with its own magnitude. For fp16/bf16
spatial_softmax the kernel, like torch's own softmax, differentiates through the output
rounded to the input dtype, an error of one ulp of p times |g|.
"""

import abc

import pytest
import torch

import mcloss_cuda as mc
from helpers import DEVICES, assert_grad_close, fused_only, random_targets
from test_kernels import (
    ARGS,
    CASES,
    DTYPES,
    GC_CASES,
    GC_TOL,
    assert_map_close,
    assert_value_close,
    gc_input,
    grad_feasible,
    grad_of,
    make_features,
    max_prob,
    mc_terms,
)

R = mc.reference
LAYOUTS = ["contiguous", "channels_last", "sliced", "transposed"]


def params(with_layouts=True):
    """(device, dtype, case, layout, bwd) combinations, with the backward compared only where
    the inputs can be made free of near-ties (see grad_feasible)."""
    out = []
    for device in DEVICES:
        for dtype in DTYPES:
            for name, case in CASES.items():
                for layout in LAYOUTS if with_layouts else ["contiguous"]:
                    bwd = grad_feasible(case, dtype)
                    tag = "fwdbwd" if bwd else "fwd"
                    out.append(
                        pytest.param(
                            device,
                            dtype,
                            case,
                            layout,
                            bwd,
                            id=f"{device}-{str(dtype)[6:]}-{name}-{layout}-{tag}",
                        )
                    )
    return out


PARAMS = params()


def mask_variants(case, device):
    """(name, mask): shared (C,) and per-sample (B, C), bool and float, random 0/1."""
    shared = torch.rand(case.C, device=device) < 0.5
    per_sample = torch.rand(case.B, case.C, device=device) < 0.5
    return [
        ("shared_bool", shared),
        ("shared_float", shared.float()),
        ("per_sample_bool", per_sample),
        ("per_sample_float", per_sample.double()),
    ]


def check_fused(x):
    assert mc.backend(x.device) != "reference", "the fused kernels are not what runs here"


def softmax_terms(x, g):
    """p * g and p * <g, p>: at most max p * max |g|."""
    return max_prob(x) * g.abs().max().item()


# ----------------------------------------------------------------------------------------------
# the base class


class OpTester(abc.ABC):
    """One public op against its reference. A subclass sets ``fn`` (the public function) and
    ``expected_fn`` (mcloss_cuda.reference's), says how values and gradients compare and
    whether its gradients need near-tie-free inputs, and implements ``check_forward_backward``
    and ``gradcheck_fns``; the tests themselves are here."""

    fn = None  # the op under test: staticmethod(mc.<op>)
    expected_fn = None  # its reference: staticmethod(R.<op>)
    # the backward compares on inputs free of near-ties (see make_features); False where the
    # op's winners are maxima of raw values, exact whatever the inputs: randn suffices
    tie_free_for_grad = True

    def make_input(self, case, dtype, device, layout, bwd):
        """Features for ``test_forward_backward``, requiring grad."""
        return make_features(case, dtype, device, layout, for_grad=bwd and self.tie_free_for_grad)

    @abc.abstractmethod
    def assert_values_close(self, actual, expected, case, msg=None):
        """The forward's outputs (one tensor) against the reference's."""

    def assert_grads_close(self, actual, expected, terms=0.0, msg=None):
        """Gradients: GRAD_TOL plus GRAD_SCALE times the size of their terms (helpers)."""
        assert_grad_close(actual, expected, terms)

    @abc.abstractmethod
    def check_forward_backward(self, x, case, bwd):
        """Forward values (and, where bwd, gradients) of the op on ``x`` against the reference."""

    @abc.abstractmethod
    def gradcheck_fns(self, case, device):
        """{name: function of the float64 features} for gradcheck."""

    @fused_only
    @pytest.mark.parametrize(ARGS, PARAMS)
    def test_forward_backward(self, device, dtype, case, layout, bwd):
        x = self.make_input(case, dtype, device, layout, bwd)
        check_fused(x)
        self.check_forward_backward(x, case, bwd)

    @fused_only
    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("name", list(GC_CASES))
    def test_gradcheck(self, device, name):
        case, layout = GC_CASES[name]
        x = gc_input(case, layout, device)
        check_fused(x)
        for fname, fn in self.gradcheck_fns(case, device).items():
            assert torch.autograd.gradcheck(fn, (x,), **GC_TOL), fname


class ExactOpTester(OpTester):
    """An op that only selects and multiplies by 0/1: values and gradients bitwise equal."""

    def assert_values_close(self, actual, expected, case, msg=None):
        assert torch.equal(actual, expected), msg

    def assert_grads_close(self, actual, expected, terms=0.0, msg=None):
        assert torch.equal(actual, expected), msg


# ----------------------------------------------------------------------------------------------
# one class per public op


class TestSpatialSoftmax(OpTester):
    fn = staticmethod(mc.spatial_softmax)
    expected_fn = staticmethod(R.spatial_softmax)

    def assert_values_close(self, actual, expected, case, msg=None):
        assert_map_close(actual, expected)

    def check_forward_backward(self, x, case, bwd):
        p, p_ref = self.fn(x), self.expected_fn(x)
        self.assert_values_close(p, p_ref, case)
        if bwd:
            g = torch.randn(p.shape, device=x.device).to(x.dtype)
            self.assert_grads_close(grad_of(p, x, g), grad_of(p_ref, x, g), softmax_terms(x, g))

    def gradcheck_fns(self, case, device):
        return {"spatial_softmax": lambda t: self.fn(t)}


class TestChannelMask(ExactOpTester):
    fn = staticmethod(mc.channel_mask)
    expected_fn = staticmethod(R.channel_mask)
    tie_free_for_grad = False  # x * 0/1: exact whatever the inputs

    def check_forward_backward(self, x, case, bwd):
        dtype = x.dtype
        for name, mask in mask_variants(case, x.device):
            y, y_ref = self.fn(x, mask), self.expected_fn(x, mask)
            assert y.dtype == y_ref.dtype == dtype and y.shape == y_ref.shape
            self.assert_values_close(y, y_ref, case, name)  # x * 0/1: exact
            g = torch.randn(y.shape, device=x.device).to(dtype)
            self.assert_grads_close(grad_of(y, x, g), grad_of(y_ref, x, g), msg=name)
        # the gradient of a sum arrives expanded (stride 0)
        y = self.fn(x, mask)
        self.assert_grads_close(grad_of(y.sum(), x), grad_of(self.expected_fn(x, mask).sum(), x))

    def gradcheck_fns(self, case, device):
        mask = torch.rand(case.B, case.C, device=device) < 0.5
        return {"channel_mask": lambda t: self.fn(t, mask)}


class TestCcmp(ExactOpTester):
    fn = staticmethod(mc.ccmp)
    expected_fn = staticmethod(R.ccmp)
    # the winner of a raw max is exact whatever the dtype: randn inputs suffice (ties in fp16
    # and bf16 are exact ties, broken by the first-max rule on both sides)
    tie_free_for_grad = False

    def check_forward_backward(self, x, case, bwd):
        z, z_ref = self.fn(x, case.ccmp_cnum), self.expected_fn(x, case.ccmp_cnum)
        assert z.shape == (case.B, case.K, case.H, case.W) and z.dtype == x.dtype
        self.assert_values_close(z, z_ref, case)
        g = torch.randn(z.shape, device=x.device).to(x.dtype)
        self.assert_grads_close(grad_of(z, x, g), grad_of(z_ref, x, g))
        if isinstance(case.ccmp_cnum, int):
            assert torch.equal(self.fn(x, [case.ccmp_cnum] * case.K), z)

    def gradcheck_fns(self, case, device):
        return {"ccmp": lambda t: self.fn(t, case.ccmp_cnum)}


class TestDiversityLoss(OpTester):
    fn = staticmethod(mc.diversity_loss)
    expected_fn = staticmethod(R.diversity_loss)

    def assert_values_close(self, actual, expected, case, msg=None):
        assert_value_close(actual, expected, HW=case.HW)

    def check_forward_backward(self, x, case, bwd):
        d, d_ref = self.fn(x, case.K, case.cnum), self.expected_fn(x, case.K, case.cnum)
        assert d.dim() == 0 and d.dtype == d_ref.dtype
        self.assert_values_close(d, d_ref, case)
        if bwd:
            self.assert_grads_close(
                grad_of(d, x), grad_of(d_ref, x), mc_terms(x, case.counts, 0, 1)
            )

    def gradcheck_fns(self, case, device):
        return {"diversity_loss": lambda t: self.fn(t, case.K, case.cnum)}


class TestDiscriminalityLogits(OpTester):
    fn = staticmethod(mc.discriminality_logits)
    expected_fn = staticmethod(R.discriminality_logits)
    # masked maxima of raw values have exact winners: gradients compare on randn inputs too
    tie_free_for_grad = False

    def assert_values_close(self, actual, expected, case, msg=None):
        assert_value_close(actual, expected, HW=case.HW)

    def check_forward_backward(self, x, case, bwd):
        for name, mask in mask_variants(case, x.device):
            lg = self.fn(x, case.K, mask, case.cnum)
            lg_ref = self.expected_fn(x, case.K, mask, case.cnum)
            assert lg.shape == (case.B, case.K) and lg.dtype == lg_ref.dtype
            self.assert_values_close(lg, lg_ref, case)
            g = torch.randn(lg.shape, device=x.device, dtype=lg.dtype)
            self.assert_grads_close(grad_of(lg, x, g), grad_of(lg_ref, x, g))

    def gradcheck_fns(self, case, device):
        mask = torch.rand(case.B, case.C, device=device) < 0.5
        return {"discriminality_logits": lambda t: self.fn(t, case.K, mask, case.cnum)}


class TestMcLoss(OpTester):
    fn = staticmethod(mc.mc_loss)
    expected_fn = staticmethod(R.mc_loss)

    def assert_values_close(self, actual, expected, case, msg=None, coeff=1.0):
        """Every field of the MCLossOutput, the loss coefficients scaling the tolerance."""
        for field in actual._fields:
            a, b = getattr(actual, field), getattr(expected, field)
            assert a.dtype == b.dtype and a.shape == b.shape, field
            assert_value_close(a, b, HW=case.HW, coeff=coeff)

    def check_forward_backward(self, x, case, bwd):
        device = x.device
        y = random_targets(case.B, case.K, device)
        alpha, beta = 0.5 + torch.rand(()).item(), 10.0 * torch.rand(()).item()
        masks = mask_variants(case, device)
        for name, mask in masks:
            out = self.fn(x, y, case.K, case.cnum, mask=mask, alpha=alpha, beta=beta)
            ref = self.expected_fn(x, y, case.K, case.cnum, mask=mask, alpha=alpha, beta=beta)
            assert isinstance(out, mc.MCLossOutput)
            self.assert_values_close(out, ref, case, name, coeff=alpha + beta)
            if bwd:
                self.assert_grads_close(
                    grad_of(out.loss, x),
                    grad_of(ref.loss, x),
                    mc_terms(x, case.counts, alpha, beta),
                )
        if not bwd:
            return
        # each output on its own (the other gradient reaches the backward as None or zeros)
        mask = masks[0][1]
        w = torch.randn(case.B, case.K, device=device)
        picks = [
            (lambda o: o.dis, mc_terms(x, case.counts, 1, 0)),
            (lambda o: o.div, mc_terms(x, case.counts, 0, 1)),
            (
                lambda o: (o.logits * w.to(o.logits)).sum(),
                mc_terms(x, case.counts, case.B * w.abs().max().item(), 0),
            ),
            (lambda o: 3.0 * o.dis - 7.0 * o.div, mc_terms(x, case.counts, 3, 7)),
        ]
        for pick, terms in picks:
            a = pick(self.fn(x, y, case.K, case.cnum, mask=mask))
            b = pick(self.expected_fn(x, y, case.K, case.cnum, mask=mask))
            self.assert_grads_close(grad_of(a, x), grad_of(b, x), terms)

    def gradcheck_fns(self, case, device):
        mask = torch.rand(case.B, case.C, device=device) < 0.5
        mask1 = torch.rand(case.C, device=device) < 0.5
        y = random_targets(case.B, case.K, device)
        return {
            "mc_loss.loss": lambda t: self.fn(t, y, case.K, case.cnum, mask=mask).loss,
            "mc_loss.all": lambda t: tuple(self.fn(t, y, case.K, case.cnum, mask=mask1)),
            "mc_loss.dis": lambda t: self.fn(t, y, case.K, case.cnum, mask=mask).dis,
            "mc_loss.div": lambda t: self.fn(t, y, case.K, case.cnum, mask=mask).div,
            "mc_loss.logits": lambda t: self.fn(t, y, case.K, case.cnum, mask=mask).logits,
        }

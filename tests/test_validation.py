"""Bad input gets a clear Python exception, never a crash and never garbage.

The public functions (``mc.*``, ``mc.MCLoss``, ``mc.reference.*``) check their arguments in
Python before any kernel runs: those cases run in this process, each a ``pytest.raises`` of the
expected exception (or a subclass) with a pattern for the first line of its message, which must
start with the argument's name ("arg: ...") and show what was given.

The compiled ops (``torch.ops.mcloss_cuda.*``) check theirs in C++, where a bug could crash the
interpreter: those cases run in child interpreters, so that a segfault or an abort fails the
one case that caused it instead of killing pytest. They go to as few children as possible
(importing torch costs seconds): the child runs them one after the other and prints one
protocol line per case; if it dies, the case it was running is recorded as a crash and a new
child carries on with the remaining cases. So do the CUDA calls that end in a device-side
assert or trap, which leave the CUDA context unusable.

The inputs are random and fresh on every run (drawn without a fixed seed in the child; from
the seed conftest.py prints in this process).
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Optional, Tuple

import pytest
import torch

import mcloss_cuda as mc
from helpers import HAS_CUDA, child_env, cuda_only
from mcloss_cuda import reference as ref

# the valid arguments every case starts from; a case spells out only what it breaks
B, K, n, H, W = 3, 4, 3, 5, 4
C = K * n
LIBS = (("mc", mc), ("ref", ref))  # (id prefix, module)


def valid_args(device="cpu"):
    """Fresh random features x (B, C, H, W), targets y, a bool mask m and a 0/1 float mask mf."""
    x = torch.randn(B, C, H, W, device=device)
    return SimpleNamespace(
        x=x,
        y=torch.randint(0, K, (B,), device=device),
        m=torch.rand(C, device=device) > 0.5,
        mf=(torch.rand(C, device=device) > 0.5).float(),
    )


@dataclass(frozen=True)
class Bad:
    """A public call that must raise ``exc`` naming ``arg`` and showing every one of ``shows``."""

    id: str
    call: Callable[[SimpleNamespace], Any]  # call(valid_args(device))
    exc: type
    arg: str
    shows: Tuple[str, ...] = ()
    device: str = "cpu"
    env: Tuple[Tuple[str, str], ...] = ()


def message(arg, shows=()):
    """A pattern for ``pytest.raises(match=...)`` (``re.search``, so ``^`` is the start of the
    message): the first line starts with "arg:" and contains each of ``shows``."""
    first_line_has = "".join(f"(?=[^\n]*{re.escape(s)})" for s in shows)
    return f"^{first_line_has}{re.escape(arg)}:"


# ----------------------------------------------------------------------------------------------
# the public API: the cases

# bad features: (id, value, exception, substrings of the message)
BAD_FEATURES = [
    # (B, C, *S) with any number >= 1 of spatial dimensions is valid: 3-D and 5-D included
    ("2d", lambda a: a.x[0, 0], ValueError, ("at least one spatial dimension", "(5, 4)")),
    ("1d", lambda a: a.x[0, 0, 0], ValueError, ("at least one spatial dimension", "(4,)")),
    ("int64", lambda a: a.x.long(), TypeError, ("torch.int64",)),
    ("uint8", lambda a: a.x.to(torch.uint8), TypeError, ("torch.uint8",)),
    ("bool", lambda a: a.x > 0, TypeError, ("torch.bool",)),
    ("complex", lambda a: a.x.to(torch.complex64), TypeError, ("torch.complex64",)),
    ("list", lambda a: a.x.tolist(), TypeError, ("list",)),
    ("none", lambda a: None, TypeError, ("NoneType",)),
    ("H0", lambda a: a.x[:, :, :0], ValueError, ("no positions", "(3, 12, 0, 4)")),
    ("W0", lambda a: a.x[:, :, :, :0], ValueError, ("no positions", "(3, 12, 5, 0)")),
    ("L0", lambda a: a.x[:, :, 0, :0], ValueError, ("no positions", "(3, 12, 0)")),
    ("C0", lambda a: a.x[:, :0], ValueError, ("(3, 0, 5, 4)",)),
]


def feature_calls():
    """(id, call(a, features), argument name) for every public function taking features."""
    calls = [("MCLoss", lambda a, X: mc.MCLoss(K)(X, a.y), "features")]
    for p, lib in LIBS:
        calls += [
            (f"{p}.mc_loss", lambda a, X, lib=lib: lib.mc_loss(X, a.y, K), "features"),
            (f"{p}.spatial_softmax", lambda a, X, lib=lib: lib.spatial_softmax(X), "x"),
            (f"{p}.channel_mask", lambda a, X, lib=lib: lib.channel_mask(X, a.m), "x"),
            (f"{p}.ccmp", lambda a, X, lib=lib: lib.ccmp(X, n), "x"),
            (f"{p}.diversity_loss", lambda a, X, lib=lib: lib.diversity_loss(X, K), "x"),
            (
                f"{p}.discriminality_logits",
                lambda a, X, lib=lib: lib.discriminality_logits(X, K, a.m),
                "x",
            ),
        ]
    return calls


def grouped_calls():
    """(id, call(a, num_classes, cnum)) for every public function taking num_classes/cnum
    together with features of C = 12 channels."""
    calls = [("MCLoss", lambda a, k, cnum: mc.MCLoss(k, cnum)(a.x, a.y))]
    for p, lib in LIBS:
        calls += [
            (f"{p}.mc_loss", lambda a, k, cnum, lib=lib: lib.mc_loss(a.x, a.y, k, cnum)),
            (f"{p}.diversity_loss", lambda a, k, cnum, lib=lib: lib.diversity_loss(a.x, k, cnum)),
            (
                f"{p}.discriminality_logits",
                lambda a, k, cnum, lib=lib: lib.discriminality_logits(a.x, k, a.m, cnum),
            ),
        ]
    return calls


# (id, num_classes, cnum, exception, argument, substrings of the message)
BAD_GROUPS = [
    ("cnum-mismatch", K, n + 1, ValueError, "cnum", ("C=12", "4 * 4 = 16")),
    ("cnum-zero", K, 0, ValueError, "cnum", ("got 0",)),
    ("cnum-float", K, 3.0, TypeError, "cnum", ("float",)),
    ("cnum-bool", K, True, TypeError, "cnum", ("bool",)),
    ("cnum-str", K, "3333", TypeError, "cnum", ()),
    ("counts-sum", K, [3, 3, 3, 4], ValueError, "cnum", ("sum to 13", "C=12")),
    ("counts-number", K, [4, 4, 4], ValueError, "cnum", ("expected 4", "got 3")),
    ("counts-too-many", K, [3, 3, 3, 2, 1], ValueError, "cnum", ("expected 4", "got 5")),
    ("counts-zero", K, [0, 4, 4, 4], ValueError, "cnum", (">= 1", "(0, 4, 4, 4)")),
    ("counts-float", K, [3.0, 3, 3, 3], TypeError, "cnum", ("ints", "3.0")),
    ("counts-float-tensor", K, torch.tensor([3.0, 3, 3, 3]), TypeError, "cnum", ("torch.float32",)),
    ("num_classes-zero", 0, None, ValueError, "num_classes", ("got 0",)),
    ("num_classes-negative", -2, None, ValueError, "num_classes", ("got -2",)),
    ("num_classes-float", 4.0, None, TypeError, "num_classes", ("float",)),
    ("num_classes-bool", True, None, TypeError, "num_classes", ("bool",)),
    ("num_classes-str", "4", None, TypeError, "num_classes", ("str",)),
    ("num_classes-tensor", torch.tensor(4), None, TypeError, "num_classes", ("Tensor",)),
    ("num_classes-above-C", C + 1, None, ValueError, "cnum", ("num_classes=13", "C=12")),
]


def loss_calls():
    """(id, call(a, targets, mask, **options)) for MCLoss (options to the constructor) and
    mc_loss of both libraries."""
    calls = [("MCLoss", lambda a, y, mask=None, **kw: mc.MCLoss(K, **kw)(a.x, y, mask=mask))]
    calls += [
        (
            f"{p}.mc_loss",
            lambda a, y, mask=None, lib=lib, **kw: lib.mc_loss(a.x, y, K, mask=mask, **kw),
        )
        for p, lib in LIBS
    ]
    return calls


BAD_TARGETS = [
    ("int32", lambda a: a.y.int(), TypeError, ("torch.int32",)),
    ("float", lambda a: a.y.float(), TypeError, ("torch.float32",)),
    ("bool", lambda a: a.y > 0, TypeError, ("torch.bool",)),
    ("list", lambda a: a.y.tolist(), TypeError, ("list",)),
    ("none", lambda a: None, TypeError, ("NoneType",)),
    ("2d", lambda a: a.y[:, None], ValueError, ("(3,)", "(3, 1)")),
    ("short", lambda a: a.y[:-1], ValueError, ("(3,)", "(2,)")),
    ("scalar", lambda a: a.y[0], ValueError, ("(3,)", "()")),
    ("device", lambda a: a.y.to("meta"), ValueError, ("cpu", "meta")),
    ("equal-K", lambda a: torch.full((B,), K), ValueError, ("[0, 4)", "[4, 4]")),
    ("above-K", lambda a: torch.randint(K, 3 * K, (B,)), ValueError, ("[0, 4)",)),
    ("negative", lambda a: -1 - a.y, ValueError, ("[0, 4)",)),
]
BAD_MASKS = [
    ("long", lambda a: a.m.long(), TypeError, ("torch.int64",)),
    ("int8", lambda a: a.m.to(torch.int8), TypeError, ("torch.int8",)),
    ("complex", lambda a: a.mf.to(torch.complex64), TypeError, ("torch.complex64",)),
    ("list", lambda a: a.m.tolist(), TypeError, ("list",)),
    ("length", lambda a: torch.ones(C + 1), ValueError, ("(12,)", "(3, 12)", "(13,)")),
    ("batch", lambda a: torch.ones(B + 1, C), ValueError, ("(4, 12)",)),
    ("3d", lambda a: torch.ones(B, C, 1), ValueError, ("(3, 12, 1)",)),
    ("scalar", lambda a: torch.ones(()), ValueError, ("got ()",)),
    ("transposed", lambda a: torch.ones(C, B), ValueError, ("(12, 3)",)),
    ("device", lambda a: a.mf.to("meta"), ValueError, ("cpu", "meta")),
]
# the options of the loss: (id, options, exception, argument, substrings of the message)
BAD_LOSS_OPTIONS = [
    ("drop-group-size", dict(drop=n), ValueError, "drop", ("drop=3", "group size 3")),
    ("drop-negative", dict(drop=-1), ValueError, "drop", ("drop=-1",)),
    ("drop-float", dict(drop=1.0), ValueError, "drop", ("[0, 1)",)),
    ("drop-str", dict(drop="1"), TypeError, "drop", ("str",)),
    (
        "drop-uneven",
        dict(cnum=[2, 3, 3, 4], drop=2),
        ValueError,
        "drop",
        ("drop=2", "group size 2"),
    ),
    ("alpha-str", dict(alpha="1"), TypeError, "alpha", ("str",)),
    ("beta-none", dict(beta=None), TypeError, "beta", ("NoneType",)),
]


def build_public_cases():
    cases = []

    def add(case_id, call, exc, arg, shows=()):
        cases.append(Bad(case_id, call, exc, arg, shows))

    # ---- features
    for fid, call, arg in feature_calls():
        for bid, value, exc, shows in BAD_FEATURES:
            add(
                f"{fid}-features-{bid}",
                lambda a, call=call, value=value: call(a, value(a)),
                exc,
                arg,
                shows,
            )

    # ---- groups: cnum against C, per-class counts, num_classes
    for fid, call in grouped_calls():
        for bid, k, cnum, exc, arg, shows in BAD_GROUPS:
            add(
                f"{fid}-{bid}",
                lambda a, call=call, k=k, cnum=cnum: call(a, k, cnum),
                exc,
                arg,
                shows,
            )

    for p, lib in LIBS:
        # ccmp: cnum is an int (group size) or per-class counts, never None
        add(
            f"{p}.ccmp-cnum-none",
            lambda a, lib=lib: lib.ccmp(a.x, None),
            TypeError,
            "cnum",
            ("None",),
        )
        add(
            f"{p}.ccmp-cnum-zero",
            lambda a, lib=lib: lib.ccmp(a.x, 0),
            ValueError,
            "cnum",
            ("got 0",),
        )
        add(
            f"{p}.ccmp-cnum-not-dividing",
            lambda a, lib=lib: lib.ccmp(a.x, 5),
            ValueError,
            "cnum",
            ("C=12", "groups of 5"),
        )
        add(
            f"{p}.ccmp-cnum-float",
            lambda a, lib=lib: lib.ccmp(a.x, 3.0),
            TypeError,
            "cnum",
            ("float",),
        )
        add(
            f"{p}.ccmp-counts-empty",
            lambda a, lib=lib: lib.ccmp(a.x, []),
            ValueError,
            "cnum",
            ("empty",),
        )
        add(
            f"{p}.ccmp-counts-sum",
            lambda a, lib=lib: lib.ccmp(a.x, [5, 5]),
            ValueError,
            "cnum",
            ("sum to 10", "C=12"),
        )
        add(
            f"{p}.ccmp-counts-zero",
            lambda a, lib=lib: lib.ccmp(a.x, [0, 12]),
            ValueError,
            "cnum",
            (">= 1",),
        )
        add(
            f"{p}.ccmp-counts-float",
            lambda a, lib=lib: lib.ccmp(a.x, [6.0, 6]),
            TypeError,
            "cnum",
            ("ints",),
        )

        # random_channel_mask: (id, arguments, exception, argument, substrings of the message)
        for bid, args, kw, exc, arg, shows in [
            ("num_classes-zero", (0, 3), {}, ValueError, "num_classes", ("got 0",)),
            ("num_classes-float", (4.0, 3), {}, TypeError, "num_classes", ("float",)),
            ("num_classes-bool", (True, 3), {}, TypeError, "num_classes", ("bool",)),
            ("cnum-none", (4, None), {}, TypeError, "cnum", ("None",)),
            ("cnum-zero", (4, 0), {}, ValueError, "cnum", ("got 0",)),
            ("cnum-float", (4, 3.0), {}, TypeError, "cnum", ("float",)),
            ("counts-number", (4, [3, 3, 3]), {}, ValueError, "cnum", ("expected 4", "got 3")),
            ("counts-zero", (2, [0, 3]), {}, ValueError, "cnum", (">= 1",)),
            ("counts-float", (2, [3, 1.5]), {}, TypeError, "cnum", ("1.5",)),
            (
                "drop-group-size",
                (4, 3),
                dict(drop=3),
                ValueError,
                "drop",
                ("drop=3", "group size 3"),
            ),
            ("drop-above", (4, 3), dict(drop=7), ValueError, "drop", ("drop=7",)),
            ("drop-negative", (4, 3), dict(drop=-1), ValueError, "drop", ("drop=-1",)),
            (
                "drop-uneven",
                (3, [2, 5, 3]),
                dict(drop=2),
                ValueError,
                "drop",
                ("drop=2", "group size 2"),
            ),
            ("drop-float", (4, 3), dict(drop=1.0), ValueError, "drop", ("[0, 1)", "1.0")),
            ("drop-negative-fraction", (4, 3), dict(drop=-0.5), ValueError, "drop", ("[0, 1)",)),
            ("drop-str", (4, 3), dict(drop="1"), TypeError, "drop", ("str",)),
            ("drop-bool", (4, 3), dict(drop=True), TypeError, "drop", ("bool",)),
            ("batch-negative", (4, 3), dict(batch=-1), ValueError, "batch", ("-1",)),
            ("batch-float", (4, 3), dict(batch=2.0), ValueError, "batch", ("2.0",)),
            ("generator-int", (4, 3), dict(generator=0), TypeError, "generator", ("int",)),
        ]:
            add(
                f"{p}.rcm-{bid}",
                lambda a, lib=lib, args=args, kw=kw: lib.random_channel_mask(*args, **kw),
                exc,
                arg,
                shows,
            )
        # (a fresh generator per call: a case holds no state from one run to the next)
        add(
            f"{p}.rcm-generator-device",
            lambda a, lib=lib: lib.random_channel_mask(
                4, 3, generator=torch.Generator(), device="meta"
            ),
            ValueError,
            "generator",
            ("meta", "cpu"),
        )

    # ---- targets, mask, drop, coefficients, generator: the loss functions
    for fid, call in loss_calls():
        for bid, value, exc, shows in BAD_TARGETS:
            add(
                f"{fid}-targets-{bid}",
                lambda a, call=call, value=value: call(a, value(a)),
                exc,
                "targets",
                shows,
            )
        for bid, value, exc, shows in BAD_MASKS:
            add(
                f"{fid}-mask-{bid}",
                lambda a, call=call, value=value: call(a, a.y, mask=value(a)),
                exc,
                "mask",
                shows,
            )
        options = BAD_LOSS_OPTIONS
        if fid != "MCLoss":
            options = options + [
                ("generator-int", dict(generator=1), TypeError, "generator", ("int",))
            ]
        for bid, kw, exc, arg, shows in options:
            add(f"{fid}-{bid}", lambda a, call=call, kw=kw: call(a, a.y, **kw), exc, arg, shows)

    add(
        "MCLoss-ctor-cnum-float-counts",
        lambda a: mc.MCLoss(2, cnum=[1.5, 10.5]),
        TypeError,
        "cnum",
        ("1.5",),
    )
    add("MCLoss-ctor-cnum-float", lambda a: mc.MCLoss(2, cnum=6.0), TypeError, "cnum", ("float",))
    add("MCLoss-ctor-cnum-str", lambda a: mc.MCLoss(2, cnum="66"), TypeError, "cnum", ("str",))
    add("MCLoss-ctor-alpha", lambda a: mc.MCLoss(2, alpha=[1.0]), TypeError, "alpha", ("list",))

    # ---- channel_mask and discriminality_logits: the mask argument
    for p, lib in LIBS:
        for fid, call in (
            (f"{p}.channel_mask", lambda a, M, lib=lib: lib.channel_mask(a.x, M)),
            (
                f"{p}.discriminality_logits",
                lambda a, M, lib=lib: lib.discriminality_logits(a.x, K, M),
            ),
        ):
            for bid, value, exc, shows in BAD_MASKS + [
                ("none", lambda a: None, TypeError, ("NoneType",))
            ]:
                add(
                    f"{fid}-mask-{bid}",
                    lambda a, call=call, value=value: call(a, value(a)),
                    exc,
                    "mask",
                    shows,
                )
    return cases


def build_cuda_public_cases():
    """Device mismatches and the target range check on CUDA, for a CUDA machine."""
    cases = []

    def add(case_id, call, exc, arg, shows, env=()):
        cases.append(Bad("cuda-" + case_id, call, exc, arg, shows, device="cuda", env=env))

    for p, lib in LIBS:
        add(
            f"{p}.mc_loss-targets-cpu",
            lambda a, lib=lib: lib.mc_loss(a.x, a.y.cpu(), K),
            ValueError,
            "targets",
            ("cuda", "cpu"),
        )
        add(
            f"{p}.mc_loss-mask-cpu",
            lambda a, lib=lib: lib.mc_loss(a.x, a.y, K, mask=a.m.cpu()),
            ValueError,
            "mask",
            ("cuda", "cpu"),
        )
        add(
            f"{p}.mc_loss-generator-cpu",
            lambda a, lib=lib: lib.mc_loss(a.x, a.y, K, generator=torch.Generator()),
            ValueError,
            "generator",
            ("cuda", "cpu"),
        )
        add(
            f"{p}.channel_mask-mask-cpu",
            lambda a, lib=lib: lib.channel_mask(a.x, a.m.cpu()),
            ValueError,
            "mask",
            ("cpu",),
        )
        add(
            f"{p}.discriminality_logits-mask-cpu",
            lambda a, lib=lib: lib.discriminality_logits(a.x, K, a.m.cpu()),
            ValueError,
            "mask",
            ("cpu",),
        )
        # the range check: a clear ValueError with MCLOSS_SYNC_CHECKS=1 (without it, a
        # device-side assert: test_cuda_bad_input)
        add(
            f"{p}.mc_loss-targets-range-sync",
            lambda a, lib=lib: lib.mc_loss(a.x, torch.full_like(a.y, K), K),
            ValueError,
            "targets",
            ("[0, 4)",),
            env=(("MCLOSS_SYNC_CHECKS", "1"),),
        )
    return cases


PUBLIC_CASES = build_public_cases()
CUDA_PUBLIC_CASES = build_cuda_public_cases()
LOSS_CALLS = loss_calls()


@pytest.mark.parametrize("case", PUBLIC_CASES, ids=[c.id for c in PUBLIC_CASES])
def test_public_api_bad_input(case):
    args = valid_args()
    with pytest.raises(case.exc, match=message(case.arg, case.shows)):
        case.call(args)


@cuda_only
@pytest.mark.parametrize("case", CUDA_PUBLIC_CASES, ids=[c.id for c in CUDA_PUBLIC_CASES])
def test_cuda_public_api_bad_input(case, monkeypatch):
    for name, value in case.env:
        monkeypatch.setenv(name, value)  # the package reads them at each call
    args = valid_args("cuda")
    with pytest.raises(case.exc, match=message(case.arg, case.shows)):
        case.call(args)


@pytest.mark.parametrize("call", [c for _, c in LOSS_CALLS], ids=[i for i, _ in LOSS_CALLS])
def test_targets_of_any_strides_are_accepted(call):
    # a column of a label table, as cross_entropy takes it
    a = valid_args()
    ys = torch.stack([a.y, -1 - a.y], 1)[:, 0]
    assert not ys.is_contiguous()
    strided, contiguous = call(a, ys, mask=a.m), call(a, a.y, mask=a.m)
    assert all(torch.equal(u, v) for u, v in zip(strided, contiguous))


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
@pytest.mark.parametrize("lib", [lib for _, lib in LIBS], ids=[p for p, _ in LIBS])
def test_empty_batch_behaves_like_torch_losses(lib, dtype):
    # nan loss (a mean over nothing), and backward works and gives an empty gradient
    m = valid_args().m
    xe = torch.randn(0, C, H, W, dtype=dtype, requires_grad=True)
    ye = torch.zeros(0, dtype=torch.int64)
    for kw in (dict(), dict(per_sample_mask=True), dict(mask=m)):
        out = lib.mc_loss(xe, ye, K, **kw)
        assert out.logits.shape == (0, K), out.logits.shape
        for t in (out.loss, out.dis, out.div):
            assert t.dim() == 0 and bool(torch.isnan(t)), t
        out.loss.backward()
        assert xe.grad.shape == xe.shape and xe.grad.dtype == xe.dtype
        xe.grad = None
    assert lib.spatial_softmax(xe).shape == xe.shape
    assert lib.ccmp(xe, n).shape == (0, K, H, W)
    assert lib.channel_mask(xe, m).shape == xe.shape
    assert bool(torch.isnan(lib.diversity_loss(xe, K)))
    assert lib.discriminality_logits(xe, K, m).shape == (0, K)
    assert lib.random_channel_mask(K, n, batch=0).shape == (0, C)


def test_torch_cross_entropy_of_an_empty_batch_is_nan():
    # what test_empty_batch_behaves_like_torch_losses holds the loss to
    assert bool(
        torch.isnan(
            torch.nn.functional.cross_entropy(torch.randn(0, K), torch.zeros(0, dtype=torch.int64))
        )
    )


def test_message_pattern_checks_the_name_and_every_substring():
    # message() is what every public case relies on: it must refuse a wrong name, a substring
    # missing from the first line, and a substring found only after it
    pattern = message("cnum", ("C=12", "(3, 4)"))
    assert re.search(pattern, "cnum: C=12 but got (3, 4)")
    for msg in (
        "num_classes: C=12 (3, 4)",
        "cnum: C=12",
        "cnum: C=12\n(3, 4)",
        "x cnum: C=12 (3, 4)",
    ):
        assert not re.search(pattern, msg), msg


# ----------------------------------------------------------------------------------------------
# the compiled ops, in child interpreters

HERE = os.path.dirname(os.path.abspath(__file__))  # children run here, not in the repo root
TAG = "@@mcloss-case@@"

# The child: reads the cases (JSON) from stdin and runs each in a fresh namespace holding valid
# arguments (x, y, m, off, ...), so that a case only spells out what it breaks.
CHILD = textwrap.dedent(r"""
    import json, sys
    cases = json.loads(sys.stdin.read())
    import torch
    import mcloss_cuda as mc
    from mcloss_cuda import reference as ref
    torch.set_num_threads(1)
    ops = torch.ops.mcloss_cuda
    TAG = %r
    B, K, n, H, W = %r
    C = K * n

    def namespace(device):
        x = torch.randn(B, C, H, W, device=device)
        return dict(torch=torch, mc=mc, ref=ref, ops=ops, B=B, K=K, n=n, H=H, W=W, C=C,
                    dev=device, x=x, y=torch.randint(0, K, (B,), device=device),
                    m=torch.rand(C, device=device) > 0.5,
                    mf=(torch.rand(C, device=device) > 0.5).float(),
                    off=torch.arange(0, C + 1, n, device=device),
                    gK=torch.randn(B, K, device=device),
                    g0=torch.randn((), device=device),
                    L=torch.randn(B, K, device=device),
                    lse=torch.randn(B, 2, device=device),
                    gKHW=torch.randn(B, K, H, W, device=device),
                    gx=torch.randn_like(x))

    def emit(rec):
        sys.stdout.write(TAG + json.dumps(rec) + "\n")
        sys.stdout.flush()

    for case in cases:
        emit({"start": case["id"]})
        ns = namespace(case["device"])
        try:
            exec(case["code"], ns)
            rec = {"id": case["id"], "exc": None, "mro": [], "msg": ""}
        except BaseException as e:
            rec = {"id": case["id"], "exc": type(e).__name__,
                   "mro": [c.__name__ for c in type(e).__mro__], "msg": str(e)}
        emit(rec)
""") % (TAG, (B, K, n, H, W))


@dataclass(frozen=True)
class ChildCase:
    id: str
    code: str  # statements run in the child's namespace
    exc: Optional[str]  # expected exception class (or a base of it); None: no error
    arg: Optional[str] = None  # the argument the message must start with ("arg: ...")
    shows: Tuple[str, ...] = ()  # substrings the message must contain (the given value...)
    device: str = "cpu"
    env: Tuple[Tuple[str, str], ...] = ()


def _no_core_dumps():
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass


def run_cases(cases, timeout=240):
    """Run ``cases`` in child interpreters; return {id: record}. A case during which the child
    died (or hung) gets a record with "crash" set; the remaining cases go to a new child."""
    results = {}
    groups = {}
    for c in cases:
        groups.setdefault(c.env, []).append(c)
    for env_items, group in groups.items():
        env = child_env(**dict(env_items))
        pending = list(group)
        while pending:
            payload = json.dumps(
                [{"id": c.id, "code": c.code, "device": c.device} for c in pending]
            )
            try:
                proc = subprocess.run(
                    [sys.executable, "-c", CHILD],
                    input=payload,
                    text=True,
                    capture_output=True,
                    cwd=HERE,
                    env=env,
                    timeout=timeout,
                    preexec_fn=_no_core_dumps,
                )
                out, err, rc = proc.stdout, proc.stderr, proc.returncode
            except subprocess.TimeoutExpired as e:
                out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
                err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
                rc = "timeout"
            running = None
            for line in out.splitlines():
                if not line.startswith(TAG):
                    continue
                rec = json.loads(line[len(TAG) :])
                if "start" in rec:
                    running = rec["start"]
                else:
                    results[rec["id"]] = rec
                    running = None
            left = [c for c in pending if c.id not in results]
            if not left:
                break
            crash = {"crash": f"child exited with {rc} (signal if negative)", "stderr": err[-3000:]}
            if running is None:  # died outside any case (e.g. at import): all fail
                for c in left:
                    results[c.id] = crash
                break
            results[running] = crash
            pending = [c for c in left if c.id != running]
    return results


# The two loss ops with every argument valid (names of the child's namespace: x, y, off, n = the
# largest group, mf, g0 a 0-dim gradient, gK a (B, K) one, L logits, lse (B, 2)); a case
# overrides the argument it breaks.
FWD_ARGS = dict(X="x", Y="y", O="off", G="n", M="mf", D="-1", F="0.5", P="False", GEN="None")
BWD_ARGS = dict(
    GL="g0", GD="g0", GV="g0", GLG="gK", X="x", Y="y", O="off", G="n", M="mf", L="L", LSE="lse"
)


def fwd(**kw):
    """ops.mc_loss(x, targets, offsets, max_group, mask, drop, drop_fraction, per_sample_mask,
    generator, alpha, beta)"""
    return "ops.mc_loss({X}, {Y}, {O}, {G}, {M}, {D}, {F}, {P}, {GEN}, 1.5, 20.0)".format(
        **dict(FWD_ARGS, **kw)
    )


def fwd_drawn(**kw):
    """ops.mc_loss with the mask drawn inside (per sample)."""
    return fwd(**dict(dict(M="None", P="True"), **kw))


def bwd(**kw):
    """ops.mc_loss_backward(grad_loss, grad_dis, grad_div, grad_logits, x, targets, offsets,
    max_group, mask, logits, lse, alpha, beta)"""
    return (
        "ops.mc_loss_backward({GL}, {GD}, {GV}, {GLG}, {X}, {Y}, {O}, {G}, {M}, {L}, {LSE}, "
        "1.5, 20.0)".format(**dict(BWD_ARGS, **kw))
    )


LOSS_OPS = (("mc_loss", fwd), ("mc_loss_drawn", fwd_drawn), ("mc_loss_backward", bwd))


def build_op_cases():
    """Direct torch.ops.mcloss_cuda calls (the C++ checks): Python exceptions, never a crash."""
    cases = []

    def add(case_id, code, exc, arg, shows=()):
        cases.append(ChildCase("ops-" + case_id, code, exc, arg, shows))

    # offsets, through every op that takes them
    offset_ops = [
        ("ccmp", lambda e: f"ops.ccmp(x, {e})"),
        ("ccmp_backward", lambda e: f"ops.ccmp_backward(gKHW, x, {e})"),
    ] + [(oid, lambda e, call=call: call(O=e)) for oid, call in LOSS_OPS]
    bad_offsets = [
        ("int32", "off.int()", "TypeError", ("int64", "Int")),
        ("float", "off.float()", "TypeError", ("Float",)),
        ("2d", "off[None]", "ValueError", ("[1, 5]",)),
        ("one-entry", "off[:1]", "ValueError", ("[1]",)),
        ("empty", "off[:0]", "ValueError", ("[0]",)),
        ("end-past-C", "torch.tensor([0, 3, 6, 9, 13])", "ValueError", ("C=12", "13")),
        ("end-short", "torch.tensor([0, 3, 6, 9, 11])", "ValueError", ("C=12", "11")),
        ("start", "torch.tensor([1, 3, 6, 9, 12])", "ValueError", ("got 1",)),
        ("empty-group", "torch.tensor([0, 3, 3, 9, 12])", "ValueError", ("group 1",)),
        ("decreasing", "torch.tensor([0, 9, 3, 6, 12])", "ValueError", ("group 1",)),
        ("negative", "torch.tensor([0, -5, 6, 9, 12])", "ValueError", ("-5",)),
        ("huge", "torch.tensor([0, 2**40, 6, 9, 12])", "ValueError", ("1099511627776",)),
        ("int64-min", "torch.tensor([0, -2**63, 6, 9, 12])", "ValueError", ("group 0",)),
        ("non-contiguous", "torch.arange(0, 2 * C + 1, n)[::2]", "ValueError", ("contiguous",)),
    ]
    for oid, call in offset_ops:
        for bid, expr, exc, shows in bad_offsets:
            add(f"{oid}-offsets-{bid}", call(expr), exc, "offsets", shows)

    # max_group: at least every group's size, at least 1 (the kernels size their tiles by it);
    # larger than needed is fine
    for oid, call in LOSS_OPS:
        add(f"{oid}-max_group-below-a-group", call(G="n - 1"), "ValueError", "max_group", ("2",))
        add(f"{oid}-max_group-zero", call(G="0"), "ValueError", "max_group", ("0",))
        add(f"{oid}-max_group-negative", call(G="-3"), "ValueError", "max_group", ("-3",))
        add(
            f"{oid}-max_group-uneven",
            call(O="torch.tensor([0, 1, 5, 7, 12])", G="4"),
            "ValueError",
            "max_group",
            ("4", "5"),
        )
        add(f"{oid}-max_group-C-ok", call(G="C"), None, None)
        add(f"{oid}-max_group-above-C", call(G="C + 1"), "ValueError", "max_group", ("C=12", "13"))
        # absurd bounds must not crash the process (an allocation sized by them, an overflow)
        add(f"{oid}-max_group-huge-no-crash", call(G="2**40"), "NoCrash", None)
        add(f"{oid}-max_group-int64-max-no-crash", call(G="2**63 - 1"), "NoCrash", None)

    # a meta tensor mixed with CPU ones lands in the fake implementation, which must refuse it
    add("ccmp-offsets-meta", "ops.ccmp(x, off.to('meta'))", "ValueError", "offsets", ("meta",))
    add(
        "channel_mask-mask-meta",
        "ops.channel_mask(x, mf.to('meta'))",
        "ValueError",
        "mask",
        ("meta",),
    )
    add("mc_loss-mask-meta", fwd(M="mf.to('meta')"), "ValueError", "mask", ("meta",))
    add("mc_loss-offsets-meta", fwd(O="off.to('meta')"), "ValueError", "offsets", ("meta",))
    add(
        "mc_loss_drawn-offsets-meta",
        fwd_drawn(O="off.to('meta')"),
        "ValueError",
        "offsets",
        ("meta",),
    )
    add(
        "mc_loss_backward-grad_logits-meta",
        bwd(GLG="gK.to('meta')"),
        "ValueError",
        "grad_logits",
        ("meta",),
    )
    add(
        "mc_loss_backward-grad_loss-meta",
        bwd(GL="g0.to('meta')", GD="None", GV="None"),
        "ValueError",
        "grad_loss",
        ("meta",),
    )
    add("mc_loss_backward-lse-meta", bwd(LSE="lse.to('meta')"), "ValueError", "lse", ("meta",))
    add("mc_loss_backward-targets-meta", bwd(Y="y.to('meta')"), "ValueError", "targets", ("meta",))

    # x, through every op
    x_ops = [
        ("spatial_softmax", lambda e: f"ops.spatial_softmax({e})"),
        ("spatial_softmax_backward", lambda e: f"ops.spatial_softmax_backward(gx, {e})"),
        ("channel_mask", lambda e: f"ops.channel_mask({e}, mf)"),
        ("ccmp", lambda e: f"ops.ccmp({e}, off)"),
        ("ccmp_backward", lambda e: f"ops.ccmp_backward(gKHW, {e}, off)"),
    ] + [(oid, lambda e, call=call: call(X=e)) for oid, call in LOSS_OPS]
    bad_x = [
        ("3d", "x[0]", "ValueError", ("4-D",)),
        ("int", "x.long()", "TypeError", ("Long",)),
        ("bool", "x > 0", "TypeError", ("Bool",)),
        ("complex", "x.to(torch.complex64)", "TypeError", ("ComplexFloat",)),
        ("H0", "x[:, :, :0].contiguous()", "ValueError", ("empty",)),
        ("strided", "x[:, :, ::2]", "ValueError", ("contiguous or channels_last",)),
    ]
    for oid, call in x_ops:
        name = "out" if oid == "spatial_softmax_backward" else "x"
        for bid, expr, exc, shows in bad_x:
            add(f"{oid}-{name}-{bid}", call(expr), exc, name, shows)
        # a float8 map passes the floating-point check but has no kernel: a clean error
        add(
            f"{oid}-{name}-float8",
            call("x.to(torch.float8_e4m3fn)"),
            "Exception",
            None,
            ("Float8_e4m3fn",),
        )

    # mask, through every op that takes one (channel_mask: x's dtype; the loss ops: bool too)
    mask_ops = [("channel_mask", lambda e: f"ops.channel_mask(x, {e})")] + [
        (oid, lambda e, call=call: call(M=e)) for oid, call in LOSS_OPS if oid != "mc_loss_drawn"
    ]
    bad_mask = [
        ("length", "torch.ones(C + 1)", "ValueError", ("[13]",)),
        ("batch", "torch.ones(B + 1, C)", "ValueError", ("[4, 12]",)),
        ("3d", "torch.ones(B, C, 1)", "ValueError", ("[3, 12, 1]",)),
        ("scalar", "torch.ones(())", "ValueError", ("[]",)),
        ("empty", "torch.ones(0)", "ValueError", ("[0]",)),
        ("double", "mf.double()", "TypeError", ("Double",)),
        ("half", "mf.half()", "TypeError", ("Half",)),
        ("int8", "m.to(torch.int8)", "TypeError", ("Char",)),
        ("long", "m.long()", "TypeError", ("Long",)),
        ("expanded", "torch.ones(1).expand(C)", "ValueError", ("contiguous",)),
        ("strided", "torch.ones(2 * C)[::2]", "ValueError", ("contiguous",)),
    ]
    for oid, call in mask_ops:
        masks = bad_mask + (
            [("bool", "m", "TypeError", ("Bool",))]
            if oid == "channel_mask"
            else [
                (
                    "bool-strided",
                    "torch.ones(2 * C, dtype=torch.bool)[::2]",
                    "ValueError",
                    ("contiguous",),
                )
            ]
        )
        for bid, expr, exc, shows in masks:
            add(f"{oid}-mask-{bid}", call(expr), exc, "mask", shows)
    # the loss ops take a bool mask as it is, with the results of the same mask as 0/1 floats
    add(
        "mc_loss-mask-bool-ok",
        textwrap.dedent(f"""
        a, b = {fwd(M="m")}, {fwd(M="m.float()")}
        assert all(torch.equal(u, v) for u, v in zip(a[:5], b[:5]))
        assert a[5].dtype == torch.bool and a[5].shape == (0,), a[5]
        L, lse = a[3], a[4]
        assert torch.equal({bwd(M="m")}, {bwd(M="m.float()")})
        """),
        None,
        None,
    )

    # the targets of the loss ops
    bad_targets = [
        ("float", "y.float()", "TypeError", ("int64", "Float")),
        ("int32", "y.int()", "TypeError", ("Int",)),
        ("2d", "y[None]", "ValueError", ("(3,)", "[1, 3]")),
        ("batch", "y[:1]", "ValueError", ("[1]",)),
        ("scalar", "y[0]", "ValueError", ("[]",)),
        ("too-large", "torch.full_like(y, K)", "ValueError", ("[0, 4)", "got 4")),
        ("negative", "torch.full_like(y, -1)", "ValueError", ("[0, 4)", "got -1")),
        ("ignore-index", "torch.full_like(y, -100)", "ValueError", ("got -100",)),
        ("huge", "torch.full_like(y, 2**40)", "ValueError", ("got 1099511627776",)),
        ("meta", "y.to('meta')", "ValueError", ("meta",)),
        ("strided", "torch.stack([y, y], 1)[:, 0]", "ValueError", ("contiguous",)),
    ]
    for oid, call in LOSS_OPS:
        for bid, expr, exc, shows in bad_targets:
            if oid == "mc_loss_backward" and bid == "meta":
                continue  # above
            add(f"{oid}-targets-{bid}", call(Y=expr), exc, "targets", shows)

    # the gradients, logits and lse that mc_loss_backward takes: 0-dim, (B, K), (B, 2), all in
    # the accumulation dtype (float32 for these float32 features); None for a zero gradient
    for bid, kw, exc, arg, shows in [
        ("grad_loss-shape", dict(GL="gK"), "ValueError", "grad_loss", ("[]", "[3, 4]")),
        ("grad_loss-dtype", dict(GL="g0.double()"), "TypeError", "grad_loss", ("Double",)),
        ("grad_dis-shape", dict(GD="g0[None]"), "ValueError", "grad_dis", ("[1]",)),
        ("grad_dis-int", dict(GD="torch.tensor(1)"), "TypeError", "grad_dis", ("Long",)),
        ("grad_div-dtype", dict(GV="g0.half()"), "TypeError", "grad_div", ("Half",)),
        ("grad_div-shape", dict(GV="torch.ones(B)"), "ValueError", "grad_div", ("[3]",)),
        (
            "grad_logits-shape",
            dict(GLG="torch.ones(B, K + 1)"),
            "ValueError",
            "grad_logits",
            ("[3, 4]", "[3, 5]"),
        ),
        ("grad_logits-1d", dict(GLG="torch.ones(B * K)"), "ValueError", "grad_logits", ("[12]",)),
        (
            "grad_logits-batch",
            dict(GLG="torch.ones(B + 1, K)"),
            "ValueError",
            "grad_logits",
            ("[4, 4]",),
        ),
        (
            "grad_logits-transposed",
            dict(GLG="torch.ones(K, B)"),
            "ValueError",
            "grad_logits",
            ("[4, 3]",),
        ),
        ("grad_logits-scalar", dict(GLG="torch.ones(())"), "ValueError", "grad_logits", ("[]",)),
        ("grad_logits-dtype", dict(GLG="gK.double()"), "TypeError", "grad_logits", ("Double",)),
        ("logits-shape", dict(L="torch.ones(B, K + 1)"), "ValueError", "logits", ("[3, 5]",)),
        ("logits-3d", dict(L="L[None]"), "ValueError", "logits", ("[1, 3, 4]",)),
        ("logits-dtype", dict(L="L.double()"), "TypeError", "logits", ("Double",)),
        ("logits-half", dict(L="L.half()"), "TypeError", "logits", ("Half",)),
        ("lse-shape", dict(LSE="gK"), "ValueError", "lse", ("[3, 2]", "[3, 4]")),
        ("lse-batch", dict(LSE="lse[:1]"), "ValueError", "lse", ("[1, 2]",)),
        ("lse-1d", dict(LSE="lse.flatten()"), "ValueError", "lse", ("[6]",)),
        ("lse-dtype", dict(LSE="lse.double()"), "TypeError", "lse", ("Double",)),
    ]:
        add(f"mc_loss_backward-{bid}", bwd(**kw), exc, arg, shows)
    # every gradient None: a zero gradient; an arbitrary-strided or expanded gradient of the
    # logits is accepted (copied), not misread
    add(
        "mc_loss_backward-no-gradients-ok",
        textwrap.dedent(f"""
        dx = {bwd(GL="None", GD="None", GV="None", GLG="None")}
        assert dx.shape == x.shape and dx.dtype == x.dtype and bool((dx == 0).all()), dx
        """),
        None,
        None,
    )
    add(
        "mc_loss_backward-grad_logits-strided-ok",
        textwrap.dedent(f"""
        g = torch.randn(B, 2 * K)[:, ::2]
        assert torch.equal({bwd(GLG="g")}, {bwd(GLG="g.contiguous()")})
        g = torch.randn(()).expand(B, K)
        assert torch.equal({bwd(GLG="g")}, {bwd(GLG="g.contiguous()")})
        """),
        None,
        None,
    )

    add(
        "ccmp_backward-grad-channels",
        "ops.ccmp_backward(torch.ones(B, C, H, W), x, off)",
        "ValueError",
        "grad",
        ("expected shape [3, 4, 5, 4]", "[3, 12, 5, 4]"),
    )
    add(
        "ccmp_backward-grad-spatial",
        "ops.ccmp_backward(torch.ones(B, K, H, W + 1), x, off)",
        "ValueError",
        "grad",
        ("[3, 4, 5, 5]",),
    )
    add(
        "ccmp_backward-grad-3d",
        "ops.ccmp_backward(torch.ones(B, K, H * W), x, off)",
        "ValueError",
        "grad",
        ("[3, 4, 20]",),
    )
    add(
        "ccmp_backward-grad-dtype",
        "ops.ccmp_backward(gKHW.double(), x, off)",
        "TypeError",
        "grad",
        ("Double",),
    )
    add(
        "spatial_softmax_backward-grad-shape",
        "ops.spatial_softmax_backward(torch.ones(B, C, H, W + 1), x)",
        "ValueError",
        "grad",
        ("[3, 12, 5, 5]",),
    )
    add(
        "spatial_softmax_backward-grad-dtype",
        "ops.spatial_softmax_backward(gx.half(), x)",
        "TypeError",
        "grad",
        ("Half",),
    )
    # an arbitrary-strided gradient is accepted (copied), not misread
    add(
        "ccmp_backward-grad-strided-ok",
        textwrap.dedent("""
        g = torch.randn(B, K, H, 2 * W)[..., ::2]
        assert torch.equal(ops.ccmp_backward(g, x, off), ops.ccmp_backward(g.contiguous(), x, off))
        """),
        None,
        None,
    )
    add(
        "spatial_softmax_backward-grad-strided-ok",
        textwrap.dedent("""
        g = torch.randn(B, C, H, 2 * W)[..., ::2]
        p = ops.spatial_softmax(x)
        assert torch.equal(ops.spatial_softmax_backward(g, p),
                           ops.spatial_softmax_backward(g.contiguous(), p))
        """),
        None,
        None,
    )
    return cases


def build_cuda_cases():
    """CUDA calls that may leave the context unusable or fault: the target range check
    without MCLOSS_SYNC_CHECKS, and the direct ops (only collected with a GPU)."""
    cases = []

    def add(case_id, code, exc, arg, shows=(), env=()):
        cases.append(ChildCase("cuda-" + case_id, code, exc, arg, shows, device="cuda", env=env))

    for p, _ in LIBS:  # (p: the module's name in the child's namespace)
        # without MCLOSS_SYNC_CHECKS, a bad target is a device-side assert at the next
        # synchronisation, not garbage (a child of its own: the assert leaves the CUDA context
        # unusable)
        add(
            f"{p}.mc_loss-targets-range-async",
            f"{p}.mc_loss(x, torch.full_like(y, K), K); torch.cuda.synchronize()",
            "RuntimeError",
            None,
            (),
            env=(("MCLOSS_SYNC_CHECKS", "0"), ("MCLOSS_TEST_CHILD", p)),
        )
    if mc.backend("cuda") == "cuda":
        add("ops-ccmp-offsets-cpu", "ops.ccmp(x, off.cpu())", "ValueError", "offsets", ("cpu",))
        add("ops-ccmp-x-cpu", "ops.ccmp(x.cpu(), off)", "ValueError", "offsets", ("cpu",))
        add(
            "ops-channel_mask-mask-cpu",
            "ops.channel_mask(x, mf.cpu())",
            "ValueError",
            "mask",
            ("cpu",),
        )
        add("ops-mc_loss-mask-cpu", fwd(M="mf.cpu()"), "ValueError", "mask", ("cpu",))
        add("ops-mc_loss-targets-cpu", fwd(Y="y.cpu()"), "ValueError", "targets", ("cpu",))
        add("ops-mc_loss-offsets-cpu", fwd(O="off.cpu()"), "ValueError", "offsets", ("cpu",))
        add(
            "ops-mc_loss-generator-cpu",
            fwd_drawn(GEN="torch.Generator()"),
            "ValueError",
            "generator",
            ("cpu",),
        )
        add(
            "ops-mc_loss_backward-grad_logits-cpu",
            bwd(GLG="gK.cpu()"),
            "ValueError",
            "grad_logits",
            ("cpu",),
        )
        add(
            "ops-mc_loss_backward-grad_loss-cpu",
            bwd(GL="g0.cpu()"),
            "ValueError",
            "grad_loss",
            ("cpu",),
        )
        add("ops-mc_loss_backward-lse-cpu", bwd(LSE="lse.cpu()"), "ValueError", "lse", ("cpu",))
        add("ops-mc_loss_backward-mask-cpu", bwd(M="mf.cpu()"), "ValueError", "mask", ("cpu",))
        add(
            "ops-spatial_softmax_backward-grad-cpu",
            "ops.spatial_softmax_backward(gx.cpu(), x)",
            "ValueError",
            "grad",
            ("cpu",),
        )
        # bad offset values on CUDA: NaN outputs from the kernels' own check, never a fault
        for bid, expr in (
            ("end-past-C", "torch.tensor([0, 3, 6, 9, 100], device=dev)"),
            ("negative", "torch.tensor([0, -50, 6, 9, 12], device=dev)"),
            ("huge", "torch.tensor([0, 2**40, 6, 9, 12], device=dev)"),
        ):
            add(
                f"ops-ccmp-offsets-{bid}-no-crash",
                f"ops.ccmp(x, {expr}); "
                f"{fwd(O=expr)}; {fwd_drawn(O=expr)}; {bwd(O=expr)}; torch.cuda.synchronize()",
                "NoCrash",
                None,
            )
            add(
                f"ops-mc_loss-offsets-{bid}-nan",
                textwrap.dedent(f"""
                out = {fwd(O=expr)}
                assert all(bool(t.isnan().all()) for t in out[:5]), out
                out = {fwd_drawn(O=expr)}
                assert all(bool(t.isnan().all()) for t in out[:5]), out
                dx = {bwd(O=expr)}
                assert bool(dx.isnan().all()), dx
                torch.cuda.synchronize()
                """),
                None,
                None,
            )
        # a group larger than max_group: NaN everywhere too (the host cannot see the sizes)
        add(
            "ops-mc_loss-max_group-below-a-group-nan",
            textwrap.dedent(f"""
            out = {fwd(G="n - 1")}
            assert all(bool(t.isnan().all()) for t in out[:5]), out
            dx = {bwd(G="n - 1")}
            assert bool(dx.isnan().all()), dx
            torch.cuda.synchronize()
            """),
            None,
            None,
        )
        # an out-of-range target: the kernels trap, a launch failure at the next sync (each a
        # child of its own: the context is unusable afterwards)
        add(
            "ops-mc_loss-targets-range-trap",
            fwd(Y="torch.full_like(y, K)") + "; torch.cuda.synchronize()",
            "RuntimeError",
            None,
            env=(("MCLOSS_TEST_CHILD", "ops-trap-forward"),),
        )
        add(
            "ops-mc_loss_drawn-targets-range-trap",
            fwd_drawn(Y="torch.full_like(y, -1)") + "; torch.cuda.synchronize()",
            "RuntimeError",
            None,
            env=(("MCLOSS_TEST_CHILD", "ops-trap-forward-drawn"),),
        )
        add(
            "ops-mc_loss_backward-targets-range-trap",
            bwd(Y="torch.full_like(y, K)") + "; torch.cuda.synchronize()",
            "RuntimeError",
            None,
            env=(("MCLOSS_TEST_CHILD", "ops-trap-backward"),),
        )
    return cases


OP_CASES = build_op_cases() if mc.backend("cpu") != "reference" else []
CUDA_CASES = build_cuda_cases() if HAS_CUDA else []
ALL = {c.id: c for c in OP_CASES + CUDA_CASES}
assert len(ALL) == len(OP_CASES) + len(CUDA_CASES), "duplicate case ids"
assert len({c.id for c in PUBLIC_CASES + CUDA_PUBLIC_CASES} | set(ALL)) == len(PUBLIC_CASES) + len(
    CUDA_PUBLIC_CASES
) + len(ALL), "duplicate case ids"


@pytest.fixture(scope="module")
def results():
    return run_cases(list(ALL.values()))


def check(case, rec):
    assert "crash" not in rec, (
        f"{case.id}: the process died instead of raising ({rec['crash']}):\n{rec['stderr']}"
    )
    if case.exc == "NoCrash":  # the process survived, and no memory fault on the device
        assert "CUDA error" not in rec["msg"] and "illegal" not in rec["msg"], (
            f"{case.id}: {rec['exc']}: {rec['msg']}"
        )
        return
    if case.exc is None:
        assert rec["exc"] is None, f"{case.id}: unexpected {rec['exc']}: {rec['msg']}"
        return
    assert rec["exc"] is not None, f"{case.id}: expected {case.exc}, nothing was raised"
    assert case.exc in rec["mro"], f"{case.id}: expected {case.exc}, got {rec['exc']}: {rec['msg']}"
    first = rec["msg"].splitlines()[0] if rec["msg"] else ""
    if case.arg is not None:
        assert first.startswith(case.arg + ":"), (
            f"{case.id}: the message should name the argument {case.arg!r}: {first!r}"
        )
    for s in case.shows:
        assert s in first, f"{case.id}: the message should mention {s!r}: {first!r}"


@pytest.mark.skipif(not OP_CASES, reason="extension not built or MCLOSS_BACKEND=reference")
@pytest.mark.parametrize("case_id", [c.id for c in OP_CASES] or ["none"])
def test_direct_op_bad_input(results, case_id):
    check(ALL[case_id], results[case_id])


@cuda_only
@pytest.mark.parametrize("case_id", [c.id for c in CUDA_CASES] or ["none"])
def test_cuda_bad_input(results, case_id):
    check(ALL[case_id], results[case_id])


def test_every_public_function_is_covered():
    # each public function (and its mc.reference twin) has bad-input cases above
    ids = [c.id for c in PUBLIC_CASES]
    names = [
        "mc_loss",
        "spatial_softmax",
        "channel_mask",
        "ccmp",
        "diversity_loss",
        "discriminality_logits",
        "rcm",
    ]
    for p, _ in LIBS:
        for name in names:
            assert any(cid.startswith(f"{p}.{name}-") for cid in ids), (p, name)
    assert any(cid.startswith("MCLoss-") for cid in ids)
    if OP_CASES:
        for op in (
            "spatial_softmax",
            "spatial_softmax_backward",
            "channel_mask",
            "ccmp",
            "ccmp_backward",
            "mc_loss",
            "mc_loss_drawn",
            "mc_loss_backward",
        ):
            assert any(cid.startswith(f"ops-{op}-") for cid in ALL), op


def test_harness_catches_a_crash_and_carries_on():
    # the harness itself: a case that kills the process is reported as a crash (so its test
    # fails), and the cases after it still run in a new child
    cases = [
        ChildCase("ok-before", "pass", None),
        ChildCase("abort", "import os; os.abort()", None),
        ChildCase("raises", "raise ValueError('x: expected 1, got 2')", "ValueError", "x"),
        ChildCase("wrong-message", "raise ValueError('something')", "ValueError", "x"),
        ChildCase("segv", "import ctypes; ctypes.string_at(0)", None),
    ]
    res = run_cases(cases)
    check(cases[0], res["ok-before"])
    for cid in ("abort", "segv"):
        assert "crash" in res[cid]
        with pytest.raises(AssertionError, match="died"):
            check(cases[1], res[cid])
    check(cases[2], res["raises"])
    with pytest.raises(AssertionError, match="name the argument"):
        check(cases[3], res["wrong-message"])

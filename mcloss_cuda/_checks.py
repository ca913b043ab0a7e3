"""Argument checks of the public API: each raises before any kernel runs and names the
argument, what was expected and what was given (docs/errors.md lists them). ``check_loss_args``
is the one preparation of mc_loss's arguments that the fused and the reference paths share.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

from . import _env

CnumLike = Union[None, int, Sequence[int]]
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
POOLINGS = ("max", "avg")
REDUCTIONS = ("mean", "sum", "none")


def check_features(x, name="features"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 3:
        raise ValueError(
            f"{name}: expected a tensor (B, C, *S) with at least one spatial "
            f"dimension, e.g. (B, C, H, W) or (B, C, L), got shape {tuple(x.shape)}"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one channel, got shape {tuple(x.shape)}")
    if math.prod(x.shape[2:]) == 0:
        raise ValueError(
            f"{name}: the spatial map is empty (no positions), got shape {tuple(x.shape)}"
        )


def _is_int(v):
    # `type(v) is int` first: a plain int is by far the common case, and the ABC check behind
    # isinstance(v, numbers.Integral) costs about a microsecond per call (per-class counts of a
    # few hundred classes are checked on every loss call)
    return type(v) is int or (isinstance(v, numbers.Integral) and not isinstance(v, bool))


def check_num_classes(num_classes):
    if not _is_int(num_classes):
        raise TypeError(f"num_classes: expected an int, got {type(num_classes).__name__}")
    if num_classes < 1:
        raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
    return int(num_classes)


def resolve_counts(num_classes: int, cnum: CnumLike, channels: int) -> Tuple[int, ...]:
    """The channel count of every class group, checked against the feature map's C."""
    K = check_num_classes(num_classes)
    if cnum is None:
        if channels < K:
            raise ValueError(
                f"cnum: features have C={channels} channels, fewer than num_classes={K}; "
                "every class needs at least one channel"
            )
        base, extra = divmod(channels, K)
        return tuple(base + (1 if i < extra else 0) for i in range(K))
    if _is_int(cnum):
        if cnum < 1:
            raise ValueError(f"cnum: expected >= 1, got {cnum}")
        if K * cnum != channels:
            raise ValueError(
                f"cnum: features have C={channels} channels but num_classes * cnum = "
                f"{K} * {cnum} = {K * cnum}"
            )
        return (int(cnum),) * K
    if isinstance(cnum, torch.Tensor):
        if cnum.dim() != 1 or cnum.dtype.is_floating_point or cnum.dtype == torch.bool:
            raise TypeError(
                f"cnum: a tensor of counts must be 1-D integer, got {cnum.dtype} "
                f"of shape {tuple(cnum.shape)}"
            )
        cnum = cnum.tolist()
    try:
        counts = tuple(cnum)
    except TypeError:
        raise TypeError(
            f"cnum: expected None, an int or a sequence of per-class counts, got "
            f"{type(cnum).__name__}"
        ) from None
    if not all(_is_int(n) for n in counts):
        raise TypeError(f"cnum: per-class counts must be ints, got {counts!r}")
    if len(counts) != K:
        raise ValueError(f"cnum: expected {K} per-class counts (one per class), got {len(counts)}")
    if any(n < 1 for n in counts):
        raise ValueError(f"cnum: every per-class count must be >= 1, got {counts!r}")
    if sum(counts) != channels:
        raise ValueError(
            f"cnum: per-class counts sum to {sum(counts)} but features have C={channels} channels"
        )
    return tuple(int(n) for n in counts)


def check_targets(
    targets, batch: int, num_classes: int, device: torch.device, kernel_checks: bool = False
):
    """Shape, dtype and device always; the [0, K) range where it costs no host sync.

    On the CPU the range is checked here. On CUDA, reading the values back would stall the
    stream every step, so the range check runs on the device: in the fused loss kernels
    (``kernel_checks``), else with ``torch._assert_async``; either way a bad target ends in a
    device-side error at the next synchronisation, as torch's own ``cross_entropy`` does.
    ``MCLOSS_SYNC_CHECKS=1`` pays the sync for a clear ValueError.
    """
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets: expected a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype != torch.int64:
        raise TypeError(f"targets: expected dtype torch.int64 (class indices), got {targets.dtype}")
    if targets.shape != (batch,):
        raise ValueError(
            f"targets: expected shape ({batch},) to match the batch of features, "
            f"got {tuple(targets.shape)}"
        )
    if targets.device != device:
        raise ValueError(
            f"targets: expected to be on the features' device {device}, got {targets.device}"
        )
    if batch == 0:
        return
    if targets.device.type == "cpu" or _env.sync_checks():
        if torch.compiler.is_compiling():
            torch._check(
                bool(((targets >= 0) & (targets < num_classes)).all()),
                lambda: f"targets: class indices must lie in [0, {num_classes})",
            )
            return
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"targets: class indices must lie in [0, {num_classes}), got values in [{lo}, {hi}]"
            )
    elif not kernel_checks:
        torch._assert_async(
            ((targets >= 0) & (targets < num_classes)).all(),
            f"targets: class indices must lie in [0, {num_classes})",
        )


def check_mask(mask, batch: int, channels: int, device: torch.device):
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
    if not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
        raise TypeError(f"mask: expected a bool or floating-point tensor of 0/1, got {mask.dtype}")
    if mask.shape not in ((channels,), (batch, channels)):
        raise ValueError(
            f"mask: expected shape ({channels},) or ({batch}, {channels}), got {tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(
            f"mask: expected to be on the features' device {device}, got {mask.device}"
        )


def resolve_drop(drop, counts: Sequence[int]) -> Tuple[int, ...]:
    """Channels dropped in each group: floor(n_i / 2) by default, an int for every group, or
    floor(n_i * p) for a float fraction p in [0, 1)."""
    if drop is None:
        return tuple(n // 2 for n in counts)
    if isinstance(drop, float):
        if not 0.0 <= drop < 1.0:
            raise ValueError(f"drop: a fraction of each group must lie in [0, 1), got {drop}")
        return tuple(math.floor(n * drop) for n in counts)
    if not _is_int(drop):
        raise TypeError(
            f"drop: expected None, an int or a float fraction, got {type(drop).__name__}"
        )
    bad = [n for n in counts if not 0 <= drop < n]
    if bad:
        raise ValueError(
            f"drop: expected 0 <= drop < group size for every class, got drop={drop} with "
            f"group size {min(bad) if drop >= 0 else bad[0]}"
        )
    return (int(drop),) * len(counts)


def normalize_cnum(cnum):
    """``cnum`` as stored by ``MCLoss``: None, an int, or a tuple of int counts (checked for
    type here; the values are checked against the features at each call)."""
    if cnum is None or _is_int(cnum):
        return cnum
    if isinstance(cnum, torch.Tensor):
        if cnum.dim() != 1 or cnum.dtype.is_floating_point or cnum.dtype == torch.bool:
            raise TypeError(
                f"cnum: a tensor of counts must be 1-D integer, got {cnum.dtype} "
                f"of shape {tuple(cnum.shape)}"
            )
        cnum = cnum.tolist()
    if isinstance(cnum, (str, bytes)):
        counts = None
    else:
        try:
            counts = tuple(cnum)
        except TypeError:
            counts = None
    if counts is None:
        raise TypeError(
            f"cnum: expected None, an int or a sequence of per-class counts, got "
            f"{type(cnum).__name__}"
        )
    if not all(_is_int(n) for n in counts):
        raise TypeError(f"cnum: per-class counts must be ints, got {counts!r}")
    return tuple(int(n) for n in counts)


def counts_for_ccmp(channels: int, cnum) -> Tuple[int, ...]:
    """ccmp(x, cnum): an int splits the C channels into groups of cnum; a sequence gives counts."""
    if cnum is None:
        raise TypeError("cnum: expected an int or a sequence of per-class counts, got None")
    if _is_int(cnum):
        if cnum < 1:
            raise ValueError(f"cnum: expected >= 1, got {cnum}")
        if channels % cnum:
            raise ValueError(f"cnum: C={channels} channels do not split into groups of {cnum}")
        return resolve_counts(channels // cnum, cnum, channels)
    try:
        K = len(cnum)
    except TypeError:
        raise TypeError(
            f"cnum: expected an int or a sequence of per-class counts, got {type(cnum).__name__}"
        ) from None
    if K == 0:
        raise ValueError("cnum: expected at least one per-class count, got an empty sequence")
    return resolve_counts(K, cnum, channels)


def check_generator(generator, device):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator: expected None or a torch.Generator, got {type(generator).__name__}"
        )
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"generator: expected a generator for device {device}, got one for {generator.device}"
        )


def check_pooling(pooling):
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: expected 'max' (CCMP) or 'avg' (CCAP), got {pooling!r}")
    return pooling


def check_ce_options(weight, label_smoothing, reduction, num_classes, device):
    """The discriminality cross-entropy's options, as F.cross_entropy takes them."""
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight: expected a torch.Tensor or None, got {type(weight).__name__}")
        if weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"weight: expected a floating-point tensor, got {weight.dtype}")
        if weight.shape != (num_classes,):
            raise ValueError(
                f"weight: expected shape ({num_classes},), one weight per class, "
                f"got {tuple(weight.shape)}"
            )
        if weight.device != device:
            raise ValueError(
                f"weight: expected to be on the features' device {device}, got {weight.device}"
            )
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "weight: the class weights take no gradient (as in "
                "F.cross_entropy); pass weight.detach()"
            )
    if not isinstance(label_smoothing, numbers.Real) or isinstance(label_smoothing, bool):
        raise TypeError(
            f"label_smoothing: expected a real number, got {type(label_smoothing).__name__}"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")


def check_coefficients(alpha, beta):
    for name, v in (("alpha", alpha), ("beta", beta)):
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            raise TypeError(f"{name}: expected a real number, got {type(v).__name__}")


class LossArgs(NamedTuple):
    """mc_loss's arguments once checked, gathered for the path that computes the loss: the
    group sizes and channels dropped per group resolved, the others as given."""

    counts: Tuple[int, ...]
    drops: Tuple[int, ...]
    mask: Optional[torch.Tensor]
    alpha: float
    beta: float
    per_sample_mask: bool
    generator: Optional[torch.Generator]
    pooling: str
    weight: Optional[torch.Tensor]
    label_smoothing: float
    reduction: str


def check_loss_args(
    features,
    targets,
    num_classes,
    cnum,
    mask,
    alpha,
    beta,
    drop,
    per_sample_mask,
    generator,
    pooling,
    weight,
    label_smoothing,
    reduction,
    kernel_checks=False,
) -> LossArgs:
    """Every check of mc_loss after check_features (which the fused path needs first, to pick
    its backend by the features' device), in one order for the fused and the reference paths.

    ``kernel_checks``: the fused CUDA kernels check the targets' range (see check_targets).
    ``drop`` is checked even with a mask given, which does not use it: a bad value is a bug
    either way.
    """
    counts = resolve_counts(num_classes, cnum, features.shape[1])
    check_targets(targets, features.shape[0], len(counts), features.device, kernel_checks)
    check_coefficients(alpha, beta)
    check_pooling(pooling)
    check_ce_options(weight, label_smoothing, reduction, len(counts), features.device)
    drops = resolve_drop(drop, counts)
    if mask is None:
        check_generator(generator, features.device)
    else:
        check_mask(mask, features.shape[0], features.shape[1], features.device)
    return LossArgs(
        counts,
        drops,
        mask,
        alpha,
        beta,
        bool(per_sample_mask),
        generator,
        pooling,
        weight,
        label_smoothing,
        reduction,
    )

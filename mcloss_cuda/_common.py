"""What the fused and the reference paths share: argument checks, channel groups, the random
mask, and the last few (B, K)-sized steps that turn per-group sums into the loss.

Every check raises before any kernel runs and names the argument, what was expected and what
was given.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import _env

CnumLike = Union[None, int, Sequence[int]]
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class MCLossOutput(NamedTuple):
    """The result of an MC-Loss evaluation.

    loss:   alpha * dis + beta * div (scalar; (B,) per sample with reduction="none").
    dis:    the discriminality term, cross-entropy of ``logits`` (scalar, or (B,)).
    div:    the diversity term, 1 - mean_{b,i} h[b,i] / n_i (scalar, or (B,): the mean over i).
    logits: (B, K) masked CCMP + global average pooling, the input of ``dis``.
    """

    loss: torch.Tensor
    dis: torch.Tensor
    div: torch.Tensor
    logits: torch.Tensor


# ----------------------------------------------------------------------------------------------
# argument checks


def check_features(x, name="features"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 3:
        raise ValueError(f"{name}: expected a tensor (B, C, *S) with at least one spatial "
                         f"dimension, e.g. (B, C, H, W) or (B, C, L), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one channel, got shape {tuple(x.shape)}")
    if math.prod(x.shape[2:]) == 0:
        raise ValueError(
            f"{name}: the spatial map is empty (no positions), got shape {tuple(x.shape)}")


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
                "every class needs at least one channel")
        base, extra = divmod(channels, K)
        return tuple(base + (1 if i < extra else 0) for i in range(K))
    if _is_int(cnum):
        if cnum < 1:
            raise ValueError(f"cnum: expected >= 1, got {cnum}")
        if K * cnum != channels:
            raise ValueError(
                f"cnum: features have C={channels} channels but num_classes * cnum = "
                f"{K} * {cnum} = {K * cnum}")
        return (int(cnum),) * K
    if isinstance(cnum, torch.Tensor):
        if cnum.dim() != 1 or cnum.dtype.is_floating_point or cnum.dtype == torch.bool:
            raise TypeError(f"cnum: a tensor of counts must be 1-D integer, got {cnum.dtype} "
                            f"of shape {tuple(cnum.shape)}")
        cnum = cnum.tolist()
    try:
        counts = tuple(cnum)
    except TypeError:
        raise TypeError(
            f"cnum: expected None, an int or a sequence of per-class counts, got "
            f"{type(cnum).__name__}") from None
    if not all(_is_int(n) for n in counts):
        raise TypeError(f"cnum: per-class counts must be ints, got {counts!r}")
    if len(counts) != K:
        raise ValueError(
            f"cnum: expected {K} per-class counts (one per class), got {len(counts)}")
    if any(n < 1 for n in counts):
        raise ValueError(f"cnum: every per-class count must be >= 1, got {counts!r}")
    if sum(counts) != channels:
        raise ValueError(
            f"cnum: per-class counts sum to {sum(counts)} but features have C={channels} channels")
    return tuple(int(n) for n in counts)


def check_targets(targets, batch: int, num_classes: int, device: torch.device,
                  kernel_checks: bool = False):
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
            f"got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(
            f"targets: expected to be on the features' device {device}, got {targets.device}")
    if batch == 0:
        return
    if targets.device.type == "cpu" or _env.sync_checks():
        if torch.compiler.is_compiling():
            torch._check(bool(((targets >= 0) & (targets < num_classes)).all()),
                         lambda: f"targets: class indices must lie in [0, {num_classes})")
            return
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"targets: class indices must lie in [0, {num_classes}), "
                f"got values in [{lo}, {hi}]")
    elif not kernel_checks:
        torch._assert_async(((targets >= 0) & (targets < num_classes)).all(),
                            f"targets: class indices must lie in [0, {num_classes})")


def check_mask(mask, batch: int, channels: int, device: torch.device):
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
    if not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
        raise TypeError(f"mask: expected a bool or floating-point tensor of 0/1, got {mask.dtype}")
    if mask.shape not in ((channels,), (batch, channels)):
        raise ValueError(
            f"mask: expected shape ({channels},) or ({batch}, {channels}), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(
            f"mask: expected to be on the features' device {device}, got {mask.device}")


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
        raise TypeError(f"drop: expected None, an int or a float fraction, got "
                        f"{type(drop).__name__}")
    bad = [n for n in counts if not 0 <= drop < n]
    if bad:
        raise ValueError(
            f"drop: expected 0 <= drop < group size for every class, got drop={drop} with "
            f"group size {min(bad) if drop >= 0 else bad[0]}")
    return (int(drop),) * len(counts)


def normalize_cnum(cnum):
    """``cnum`` as stored by ``MCLoss``: None, an int, or a tuple of int counts (checked for
    type here; the values are checked against the features at each call)."""
    if cnum is None or _is_int(cnum):
        return cnum
    if isinstance(cnum, torch.Tensor):
        if cnum.dim() != 1 or cnum.dtype.is_floating_point or cnum.dtype == torch.bool:
            raise TypeError(f"cnum: a tensor of counts must be 1-D integer, got {cnum.dtype} "
                            f"of shape {tuple(cnum.shape)}")
        cnum = cnum.tolist()
    if isinstance(cnum, (str, bytes)):
        counts = None
    else:
        try:
            counts = tuple(cnum)
        except TypeError:
            counts = None
    if counts is None:
        raise TypeError(f"cnum: expected None, an int or a sequence of per-class counts, got "
                        f"{type(cnum).__name__}")
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
        raise TypeError(f"cnum: expected an int or a sequence of per-class counts, got "
                        f"{type(cnum).__name__}") from None
    if K == 0:
        raise ValueError("cnum: expected at least one per-class count, got an empty sequence")
    return resolve_counts(K, cnum, channels)


# ----------------------------------------------------------------------------------------------
# channel groups as tensors


def _build_group_tensor(counts: Tuple[int, ...], device: torch.device, what: str):
    # From Python lists only (no data-dependent op such as nonzero): under torch.compile the
    # result is a constant of static shape.
    C, nmax = sum(counts), max(counts)
    offsets = [0]
    for n in counts:
        offsets.append(offsets[-1] + n)
    if what == "offsets":
        return torch.tensor(offsets, dtype=torch.int64, device=device)
    if what == "sizes":
        return torch.tensor(counts, dtype=torch.int64, device=device)
    if what == "index":
        return torch.tensor([[o + s if s < n else C for s in range(nmax)]
                             for o, n in zip(offsets, counts)], dtype=torch.int64, device=device)
    if what == "valid":
        return torch.tensor([[s < n for s in range(nmax)] for n in counts], dtype=torch.bool,
                            device=device)
    if what == "valid_flat":
        return torch.tensor([i * nmax + s for i, n in enumerate(counts) for s in range(n)],
                            dtype=torch.int64, device=device)
    raise KeyError(what)


_group_tensors = functools.lru_cache(maxsize=1024)(_build_group_tensor)


def group_tensor(counts, device, what):
    """Constant tensors describing the groups, cached per (counts, device).

    offsets: int64 (K+1,), where every group starts, and C at the end (what the kernels take);
    sizes: int64 (K,); index: (K, n_max) channel of every group slot, C for a pad slot;
    valid: bool (K, n_max), the slots that hold a channel; valid_flat: their flat positions.
    Cached so that a training step makes no host-to-device copy (and can be captured in a CUDA
    graph). The cached tensors must not be written to. Under torch.compile the tensor is built
    in the graph instead (a constant there; Dynamo would bypass the cache anyway, with a warning).
    """
    counts, device = tuple(counts), torch.device(device)
    if torch.compiler.is_compiling():
        return _build_group_tensor(counts, device, what)
    return _group_tensors(counts, device, what)


def _build_drop_thresholds(drops: Tuple[int, ...], device: torch.device):
    return torch.tensor(drops, dtype=torch.int64, device=device)[:, None]


_cached_drop_thresholds = functools.lru_cache(maxsize=256)(_build_drop_thresholds)


def _drop_thresholds(drops: Tuple[int, ...], device: torch.device):
    if torch.compiler.is_compiling():
        return _build_drop_thresholds(drops, device)
    return _cached_drop_thresholds(drops, device)


# ----------------------------------------------------------------------------------------------
# the random mask


def counts_for_mask(num_classes, cnum):
    K = check_num_classes(num_classes)
    if cnum is None:
        raise TypeError("cnum: random_channel_mask needs an int or per-class counts, got None")
    if _is_int(cnum):
        return resolve_counts(K, cnum, K * max(int(cnum), 1))
    try:
        total = sum(cnum)
    except TypeError:
        total = 0
    return resolve_counts(K, cnum, total)


def random_channel_mask(num_classes, cnum, *, batch=None, drop=None, generator=None, device=None):
    """Per class group, exactly ``drop`` channels 0 and the others 1, drawn uniformly.

    Returns a bool tensor of shape (C,) (one draw for the whole batch, as published) or
    (batch, C) (one draw per sample). ``cnum`` is an int or per-class counts. ``drop`` defaults
    to floor(n_i / 2). Draws come from torch's RNG (``generator`` or the default one for
    ``device``), on ``device``, with no host/device synchronisation and no loop over classes.
    """
    counts = counts_for_mask(num_classes, cnum)
    if batch is not None and (not _is_int(batch) or batch < 0):
        raise ValueError(f"batch: expected None or an int >= 0, got {batch!r}")
    if device is None:
        device = generator.device if isinstance(generator, torch.Generator) else torch.device("cpu")
    return _draw_keep(counts, drop, batch, generator, torch.device(device))


def _draw_keep(counts, drop, batch, generator, device):
    """random_channel_mask for counts that are already checked."""
    drops = resolve_drop(drop, counts)
    check_generator(generator, device)
    K, nmax = len(counts), max(counts)
    rows = 1 if batch is None else int(batch)
    scores = torch.rand((rows, K, nmax), generator=generator, device=device)
    uniform = len(set(counts)) == 1
    if not uniform:
        # a pad slot draws a score above every real one: it sorts last and is never dropped
        scores = scores.masked_fill(~group_tensor(counts, device, "valid"), 2.0)
    # rank of each channel within its group; the `drop` lowest ranks are dropped
    rank = scores.argsort(dim=-1).argsort(dim=-1)
    if len(set(drops)) == 1:
        keep = rank >= drops[0]
    else:
        keep = rank >= _drop_thresholds(drops, device)
    keep = keep.reshape(rows, K * nmax)
    if not uniform:
        keep = keep[:, group_tensor(counts, device, "valid_flat")]
    return keep[0] if batch is None else keep


def check_generator(generator, device):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator: expected None or a torch.Generator, got {type(generator).__name__}")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"generator: expected a generator for device {device}, got one for {generator.device}")


def draw_mask(x, counts, drop, per_sample_mask, generator):
    """The mask mc_loss draws for features x whose group counts are already resolved."""
    return _draw_keep(counts, drop, x.shape[0] if per_sample_mask else None, generator, x.device)


def as_maps(x):
    """(B, C, *S) features as the (B, C, H, W) maps the kernels take: 4-D as they are, any other
    number of spatial dimensions flattened into (B, C, L, 1), a view wherever the positions
    have one stride (contiguous, channels_last_3d, and (B, N, C) tokens transposed to (B, C, N)
    all do); the ops are the same, the positions being all that the loss sums or maxes over."""
    return x if x.dim() == 4 else x.flatten(2).unsqueeze(-1)


def accumulate_in(x):
    """fp16/bf16 are computed in fp32 (docs/spec.md, Numerics); fp32 and fp64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _group_sizes(h, counts):
    """n_i, broadcastable over h (B, K)."""
    if len(set(counts)) == 1:
        return float(counts[0])
    return group_tensor(counts, h.device, "sizes").to(h.dtype)


def diversity_per_sample(h, counts):
    """div_b = 1 - (1 / K) sum_i h[b,i] / n_i from the per-group sums h (B, K): (B,)."""
    return 1.0 - (h / _group_sizes(h, counts)).mean(dim=1)


def diversity_from_sums(h, counts):
    """L_div = 1 - (1 / (B K)) sum_{b,i} h[b,i] / n_i from the per-group sums h (B, K)."""
    return 1.0 - (h / _group_sizes(h, counts)).mean()


def assemble(h, logits, targets, counts, alpha, beta, weight=None, label_smoothing=0.0,
             reduction="mean"):
    """Turn the per-group diversity sums h (B, K) and the logits (B, K) into MCLossOutput."""
    if weight is not None:
        weight = weight.to(logits.dtype)
    dis = F.cross_entropy(logits, targets, weight=weight, label_smoothing=label_smoothing,
                          reduction=reduction)
    if reduction == "mean":
        div = diversity_from_sums(h, counts)
    else:
        div = diversity_per_sample(h, counts)
        div = div if reduction == "none" else div.sum()
    return MCLossOutput(alpha * dis + beta * div, dis, div, logits)


POOLINGS = ("max", "avg")
REDUCTIONS = ("mean", "sum", "none")


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
            raise ValueError(f"weight: expected shape ({num_classes},), one weight per class, "
                             f"got {tuple(weight.shape)}")
        if weight.device != device:
            raise ValueError(
                f"weight: expected to be on the features' device {device}, got {weight.device}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError("weight: the class weights take no gradient (as in "
                             "F.cross_entropy); pass weight.detach()")
    if not isinstance(label_smoothing, numbers.Real) or isinstance(label_smoothing, bool):
        raise TypeError(
            f"label_smoothing: expected a real number, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")


def check_coefficients(alpha, beta):
    for name, v in (("alpha", alpha), ("beta", beta)):
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            raise TypeError(f"{name}: expected a real number, got {type(v).__name__}")

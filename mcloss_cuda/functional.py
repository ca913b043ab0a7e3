"""The public functions: validate, then run the fused kernels where they exist for the
features' device (see ``backend``), else the pure-PyTorch reference."""

from __future__ import annotations

import torch

from . import reference
from ._checks import check_features, check_loss_args, check_mask, counts_for_ccmp, resolve_counts
from ._common import MCLossOutput, accumulate_in, diversity_from_sums
from ._groups import group_tensor
from ._ops import acc_dtype, as_maps, backend, kernel_layout, ops

_REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}  # at::Reduction, as the op takes it


def _fused(x):
    return backend(x.device) != "reference"


def _is_count(drop):
    return drop is not None and not isinstance(drop, float)


def _mask_for_loss(mask, x):
    """The loss op reads a bool mask as it is, any other in the features' dtype."""
    return mask.contiguous() if mask.dtype == torch.bool else mask.to(dtype=x.dtype).contiguous()


def _mask_for_kernel(mask, x):
    """The kernels take the mask in the features' dtype, (C,) or (B, C), contiguous."""
    return mask.to(dtype=x.dtype).contiguous()


def spatial_softmax(x):
    """Softmax over the H*W positions of every channel: (B, C, H, W) -> same shape and dtype."""
    check_features(x, "x")
    if not _fused(x):
        return reference.spatial_softmax(x)
    return ops.spatial_softmax(kernel_layout(as_maps(x))).view(x.shape)


def channel_mask(x, mask):
    """Channel-wise attention mask (CWA): x * mask, mask (C,) shared or (B, C) per sample."""
    check_features(x, "x")
    check_mask(mask, x.shape[0], x.shape[1], x.device)
    if not _fused(x):
        return reference.channel_mask(x, mask)
    return ops.channel_mask(kernel_layout(as_maps(x)), _mask_for_kernel(mask, x)).view(x.shape)


def ccmp(x, cnum):
    """Cross-channel max pooling: (B, C, H, W) -> (B, K, H, W), the max over each channel group
    (groups of ``cnum`` channels, or per-class counts); the gradient goes to the first max."""
    check_features(x, "x")
    counts = counts_for_ccmp(x.shape[1], cnum)
    if not _fused(x):
        return reference.ccmp(x, counts)
    out = ops.ccmp(kernel_layout(as_maps(x)), group_tensor(counts, x.device, "offsets"))
    return out.view(x.shape[0], len(counts), *x.shape[2:])


def diversity_loss(x, num_classes, cnum=None):
    """The diversity term L_div (a scalar; fp32 for fp16/bf16 inputs)."""
    check_features(x, "x")
    counts = resolve_counts(num_classes, cnum, x.shape[1])
    if not _fused(x):
        return reference.diversity_loss(x, num_classes, counts)
    # On its own, the term goes through the primitive ops rather than the fused loss: the
    # fused backward is that of both terms, and a zero gradient for the unused one would still
    # spread a NaN of the other's branch (0 * NaN) where autograd through this term alone
    # does not. mc_loss is the fused path.
    x = kernel_layout(as_maps(x))
    offsets = group_tensor(counts, x.device, "offsets")
    probs = ops.spatial_softmax(accumulate_in(x))
    h = ops.ccmp(probs, offsets).sum(dim=(2, 3))
    return diversity_from_sums(h, counts)


def discriminality_logits(x, num_classes, mask, cnum=None):
    """Masked CCMP + global average pooling: the (B, K) logits of the discriminality term."""
    check_features(x, "x")
    counts = resolve_counts(num_classes, cnum, x.shape[1])
    check_mask(mask, x.shape[0], x.shape[1], x.device)
    if not _fused(x):
        return reference.discriminality_logits(x, num_classes, mask, counts)
    # through the primitive ops, as diversity_loss and for the same reason
    x = kernel_layout(as_maps(x))
    acc = accumulate_in(x)
    masked = ops.channel_mask(acc, _mask_for_kernel(mask, acc))
    return ops.ccmp(masked, group_tensor(counts, x.device, "offsets")).mean(dim=(2, 3))


def mc_loss(
    features,
    targets,
    num_classes,
    cnum=None,
    *,
    mask=None,
    alpha=1.5,
    beta=20.0,
    drop=None,
    per_sample_mask=False,
    generator=None,
    pooling="max",
    weight=None,
    label_smoothing=0.0,
    reduction="mean",
):
    """Mutual-Channel Loss of a (B, C, *S) feature map: (B, C, H, W), (B, C, L), (B, C, D, H, W)...

    Returns ``MCLossOutput(loss, dis, div, logits)`` with ``loss = alpha * dis + beta * div``.
    ``cnum``: channels per class (int), per-class counts, or None for C split evenly over the
    classes. ``mask=None`` draws a fresh random channel mask (``drop`` channels per group, an
    int or a float fraction p for floor(n_i * p), default half of it rounded down; one draw
    for the batch, or per sample with ``per_sample_mask``) from torch's RNG or ``generator``.
    ``pooling``: "max" (CCMP, published) or "avg" (CCAP) for the discriminality logits.
    ``weight``, ``label_smoothing``, ``reduction``: the discriminality cross-entropy's, as
    ``F.cross_entropy`` takes them; ``reduction="none"`` gives loss, dis and div per sample.
    """
    check_features(features)  # before _fused reads its device (check_loss_args: the rest)
    fused = _fused(features)
    args = check_loss_args(
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
        kernel_checks=fused,
    )
    if not fused:
        return reference.checked_mc_loss(features, targets, args)
    counts = args.counts
    if mask is not None:
        mask = _mask_for_loss(mask, features)
    # one op, one autograd node: the fused kernels, the mask drawn inside them when none is
    # given, and the (B, K) tail (csrc/ops.cpp)
    x = kernel_layout(as_maps(features))
    if weight is not None:  # the tail computes in the logits' dtype, as cross_entropy would
        weight = weight.to(acc_dtype(x.dtype)).contiguous()
    # the kernels drop `drop` channels of every group when it is >= 0, else floor(n_i * p)
    if _is_count(drop):
        count, fraction = args.drops[0], 0.0
    else:
        count, fraction = -1, 0.5 if drop is None else drop
    loss, dis, div, logits, *_ = ops.mc_loss(
        x,
        targets.contiguous(),
        group_tensor(counts, x.device, "offsets"),
        max(counts),
        mask,
        count,
        fraction,
        bool(per_sample_mask),
        generator,
        float(alpha),
        float(beta),
        pooling == "avg",
        weight,
        float(label_smoothing),
        _REDUCTION_ENUM[reduction],
    )
    return MCLossOutput(loss, dis, div, logits)

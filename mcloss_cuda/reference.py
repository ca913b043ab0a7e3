"""MC-Loss in plain PyTorch: the fallback where the extension is absent, and the oracle every
kernel is tested against. Written to be read: each function is the formula of docs/spec.md.

Shapes: x is (B, C, *S), S the spatial dimensions (H, W), or L, or (D, H, W): the loss only sums
or maxes over the positions; the C channels form K consecutive groups of n_i channels.
fp16/bf16 inputs are computed in fp32; gradients flow back in the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import (
    check_features,
    check_loss_args,
    check_mask,
    counts_for_ccmp,
    resolve_counts,
)
from ._common import MCLossOutput, accumulate_in, diversity_from_sums, diversity_per_sample
from ._groups import draw_mask, group_tensor, random_channel_mask

__all__ = [
    "spatial_softmax",
    "channel_mask",
    "ccmp",
    "diversity_loss",
    "discriminality_logits",
    "random_channel_mask",
    "mc_loss",
    "MCLossOutput",
]


def _mask_as(mask, x):
    """A (C,) or (B, C) 0/1 mask, as a factor broadcastable over x."""
    m = mask.to(x.dtype)
    spatial = (1,) * (x.dim() - 2)
    return m.view(1, -1, *spatial) if m.dim() == 1 else m.view(*m.shape, *spatial)


# ----------------------------------------------------------------------------------------------
# the three primitives, without argument checks


def _spatial_softmax(x):
    # softmax over the positions of every (b, c) channel
    return torch.softmax(x.flatten(2), dim=-1).view(x.shape)


def _group_max(x, counts):
    """Cross-channel max pooling: (B, C, *S) -> (B, K, *S), the max over each group.

    ``Tensor.max(dim)`` returns the first index among equal maxima (and the first NaN), so its
    gradient goes whole to the lowest-index channel attaining the max, as docs/spec.md says.
    """
    B, S = x.shape[0], x.shape[2:]
    K = len(counts)
    if len(set(counts)) == 1:
        return x.reshape(B, K, counts[0], *S).max(dim=2).values
    # uneven groups: gather every group into (K, n_max) slots; empty slots read a -inf channel,
    # which sits last in its group so it never beats a real channel, not even a -inf one
    padded = torch.cat([x, x.new_full((B, 1, *S), float("-inf"))], dim=1)
    return padded[:, group_tensor(counts, x.device, "index")].max(dim=2).values


def _diversity_sums(x, counts):
    """h[b, i] = sum_k max_{j in G_i} softmax(x[b, j, :])[k]."""
    return _group_max(_spatial_softmax(x), counts).flatten(2).sum(dim=2)


def _group_mean(x, counts):
    """Cross-channel average pooling: (B, C, *S) -> (B, K, *S), the mean over each group."""
    return torch.stack([g.mean(dim=1) for g in x.split(list(counts), dim=1)], dim=1)


def _masked_logits(x, mask, counts, pooling="max"):
    """logits[b, i] = mean_k pool_{j in G_i} m[b, j] * x[b, j, k], pool the max (CCMP, masked
    channels count as 0) or the mean (CCAP)."""
    pool = _group_max if pooling == "max" else _group_mean
    return pool(x * _mask_as(mask, x), counts).flatten(2).mean(dim=2)


# ----------------------------------------------------------------------------------------------
# public functions: the same names and signatures as the package's


def spatial_softmax(x):
    """Softmax over the positions of every channel. (B, C, *S) -> same shape and dtype."""
    check_features(x, "x")
    return _spatial_softmax(accumulate_in(x)).to(x.dtype)


def channel_mask(x, mask):
    """x * mask, mask of shape (C,) (shared by the batch) or (B, C) (per sample)."""
    check_features(x, "x")
    check_mask(mask, x.shape[0], x.shape[1], x.device)
    return x * _mask_as(mask, x)


def ccmp(x, cnum):
    """Cross-channel max pooling over groups of ``cnum`` channels (int or per-class counts)."""
    check_features(x, "x")
    return _group_max(x, counts_for_ccmp(x.shape[1], cnum))


def diversity_loss(x, num_classes, cnum=None):
    """L_div = 1 - (1 / (B K)) sum_{b,i} h[b,i] / n_i, a scalar (fp32 for fp16/bf16 inputs)."""
    check_features(x, "x")
    counts = resolve_counts(num_classes, cnum, x.shape[1])
    return diversity_from_sums(_diversity_sums(accumulate_in(x), counts), counts)


def discriminality_logits(x, num_classes, mask, cnum=None):
    """Masked CCMP + global average pooling: (B, K) logits (fp32 for fp16/bf16 inputs)."""
    check_features(x, "x")
    counts = resolve_counts(num_classes, cnum, x.shape[1])
    check_mask(mask, x.shape[0], x.shape[1], x.device)
    return _masked_logits(accumulate_in(x), mask, counts)


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
    """MC-Loss: alpha * cross_entropy(logits, targets) + beta * L_div, as an MCLossOutput
    (weight, label_smoothing and reduction as F.cross_entropy takes them; with "none", loss,
    dis and div are per sample)."""
    check_features(features)
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
    )
    return checked_mc_loss(features, targets, args)


def checked_mc_loss(features, targets, args):
    """mc_loss once check_loss_args has passed (``args``): also the fused path's fallback."""
    counts, mask, weight, reduction = args.counts, args.mask, args.weight, args.reduction
    if mask is None:
        mask = draw_mask(features, counts, args.drops, args.per_sample_mask, args.generator)
    x = accumulate_in(features)
    h = _diversity_sums(x, counts)
    logits = _masked_logits(x, mask, counts, args.pooling)
    if weight is not None:  # cross_entropy computes in the logits' dtype
        weight = weight.to(logits.dtype)
    dis = F.cross_entropy(
        logits, targets, weight=weight, label_smoothing=args.label_smoothing, reduction=reduction
    )
    if reduction == "mean":
        div = diversity_from_sums(h, counts)
    else:
        div = diversity_per_sample(h, counts)
        div = div if reduction == "none" else div.sum()
    return MCLossOutput(args.alpha * dis + args.beta * div, dis, div, logits)

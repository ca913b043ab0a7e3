"""``MCLoss``: the loss as a ``torch.nn.Module``."""

from __future__ import annotations

from typing import Optional

import torch

from ._checks import (
    check_ce_options,
    check_coefficients,
    check_num_classes,
    check_pooling,
    normalize_cnum,
)
from .functional import mc_loss


class MCLoss(torch.nn.Module):
    """Mutual-Channel Loss (Chang et al., IEEE TIP 2020) on the last feature map.

    Args:
        num_classes: K, the number of classes; the C channels form K consecutive groups.
        cnum: channels per class (int), per-class counts (uneven groups), or None to split C
            evenly over the classes (the first C % K classes get one more channel).
        alpha, beta: weights of the discriminality and diversity terms (published: 1.5, 20).
        drop: channels masked per group each call: an int, a float fraction p for
            floor(n_i * p), or None for floor(n_i / 2).
        per_sample_mask: draw the random mask per sample instead of once for the batch.
        pooling: "max" (CCMP, published) or "avg" (CCAP) for the discriminality logits.
        weight, label_smoothing, reduction: the discriminality cross-entropy's, as in
            ``torch.nn.CrossEntropyLoss``; ``weight`` (K,) is a buffer, the tensor given (not a
            copy): it moves with ``.to()`` (``.half()`` rounds it to fp16 too) and is saved in
            the state dict. ``reduction="none"``: loss, dis and div per sample.

    ``forward(features, targets, mask=None)`` takes (B, C, *S) features and returns
    ``MCLossOutput(loss, dis, div, logits)``;
    add ``out.loss`` to the classifier's own cross-entropy.
    """

    weight: Optional[torch.Tensor]

    def __init__(
        self,
        num_classes,
        cnum=None,
        alpha=1.5,
        beta=20.0,
        drop=None,
        per_sample_mask=False,
        pooling="max",
        weight=None,
        label_smoothing=0.0,
        reduction="mean",
    ):
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.cnum = normalize_cnum(cnum)
        check_coefficients(alpha, beta)
        self.alpha, self.beta = float(alpha), float(beta)
        self.drop = drop
        self.per_sample_mask = bool(per_sample_mask)
        self.pooling = check_pooling(pooling)
        device = weight.device if isinstance(weight, torch.Tensor) else None
        check_ce_options(weight, label_smoothing, reduction, self.num_classes, device)
        self.register_buffer("weight", weight)
        self.label_smoothing, self.reduction = float(label_smoothing), reduction

    def forward(self, features, targets, mask=None):
        return mc_loss(
            features,
            targets,
            self.num_classes,
            self.cnum,
            mask=mask,
            alpha=self.alpha,
            beta=self.beta,
            drop=self.drop,
            per_sample_mask=self.per_sample_mask,
            pooling=self.pooling,
            weight=self.weight,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
        )

    def extra_repr(self):
        return (
            f"num_classes={self.num_classes}, cnum={self.cnum}, alpha={self.alpha}, "
            f"beta={self.beta}, drop={self.drop}, per_sample_mask={self.per_sample_mask}, "
            f"pooling={self.pooling!r}, label_smoothing={self.label_smoothing}, "
            f"reduction={self.reduction!r}"
        )

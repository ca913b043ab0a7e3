"""``MCLoss``: the loss as a ``torch.nn.Module``."""

from __future__ import annotations

import torch

from ._common import check_coefficients, check_num_classes, normalize_cnum
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

    ``forward(features, targets, mask=None)`` takes (B, C, *S) features and returns ``MCLossOutput(loss, dis, div, logits)``;
    add ``out.loss`` to the classifier's own cross-entropy.
    """

    def __init__(self, num_classes, cnum=None, alpha=1.5, beta=20.0, drop=None,
                 per_sample_mask=False):
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.cnum = normalize_cnum(cnum)
        check_coefficients(alpha, beta)
        self.alpha, self.beta = float(alpha), float(beta)
        self.drop = drop
        self.per_sample_mask = bool(per_sample_mask)

    def forward(self, features, targets, mask=None):
        return mc_loss(features, targets, self.num_classes, self.cnum, mask=mask, alpha=self.alpha,
                       beta=self.beta, drop=self.drop, per_sample_mask=self.per_sample_mask)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, cnum={self.cnum}, alpha={self.alpha}, "
                f"beta={self.beta}, drop={self.drop}, per_sample_mask={self.per_sample_mask}")

"""The published MC-Loss, op for op, written fresh for comparison in tests: transpose +
max_pool2d + transpose as CCMP, ``x * mask`` as CWA, softmax over the flattened map, AvgPool2d.
Uniform groups only, as published."""

import torch
import torch.nn.functional as F

from mcloss_cuda import MCLossOutput


def published_mc_loss(features, targets, cnum, mask, alpha=1.5, beta=20.0):
    """The published formulation, op for op (uniform groups, float inputs), for comparison:
    transpose + max_pool2d + transpose as CCMP, x * mask as CWA, softmax over the flattened map.
    """
    B, C, H, W = features.shape

    def ccmp_published(t):
        t = t.transpose(3, 1)
        t = F.max_pool2d(t, kernel_size=(1, cnum), stride=(1, cnum))
        return t.transpose(3, 1).contiguous()

    m = mask.to(features.dtype)
    m = m.view(1, C, 1, 1).expand(B, C, 1, 1) if m.dim() == 1 else m.view(B, C, 1, 1)
    branch = F.softmax(features.reshape(B, C, H * W), 2).reshape(B, C, H, W)
    branch = ccmp_published(branch).reshape(B, C // cnum, H * W)
    div = 1.0 - torch.mean(torch.sum(branch, 2)) / cnum
    logits = F.avg_pool2d(ccmp_published(features * m), kernel_size=(H, W)).view(B, -1)
    dis = F.cross_entropy(logits, targets)
    return MCLossOutput(alpha * dis + beta * div, dis, div, logits)

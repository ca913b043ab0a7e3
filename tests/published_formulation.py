"""The published MC-Loss (Chang et al., "The Devil is in the Channels: Mutual-Channel Loss for
Fine-Grained Image Classification", TIP 2020) in eager PyTorch, op for op, written fresh from the
formulas of docs/spec.md. The one copy: the tests compare the package against it, and
benchmarks/bench.py times it as its ``eager`` and ``compiled`` baselines.

As published (uniform groups: every class has ``cnum`` channels):
  host_mask_published   the channel mask, drawn on the host by a Python loop that shuffles a 0/1
                        list per class group, then turned into a (B, C, 1, 1) tensor via numpy;
  ccmp_published        CCMP as transpose + max_pool2d with kernel (1, cnum) + transpose;
  published_loss        softmax over the flattened map, CCMP, the diversity term; x * mask as
                        CWA, CCMP, avg_pool2d over the map, cross-entropy; alpha * dis + beta * div.

Our adaptation, for uneven groups (e.g. ResNet-50's C=2048 channels over 200 classes), which the
published code cannot take since max_pool2d needs one kernel size: ccmp_padded_gather gathers
every group into (K, n_max) slots padded with a -inf channel and takes the max over the slots
(the same maximum), the diversity term divides each group's sum by its own size, and the host
mask drops floor(n_i / 2) channels in each group, as it does for uniform ones.
"""

import random

import numpy as np
import torch
import torch.nn.functional as F

from helpers import group_bounds
from mcloss_cuda import MCLossOutput

ALPHA, BETA = 1.5, 20.0  # the published CUB-200 weights (the package's defaults, docs/spec.md)


def host_mask_published(batch, counts):
    """The published mask: a Python loop over the classes shuffling a 0/1 list per group on the
    host, replicated over the batch, turned into a (B, C, 1, 1) float32 tensor via numpy.
    Deliberately host-side: the benchmark counts that per-step cost as part of the published
    step. Uneven ``counts`` (our adaptation) shuffle one list per group."""
    bar = []
    if len(set(counts)) == 1:
        n = counts[0]
        foo = [1] * (n - n // 2) + [0] * (n // 2)  # drop floor(n/2), as the package's default
        for _ in counts:
            random.shuffle(foo)
            bar += foo
    else:
        for n in counts:
            foo = [1] * (n - n // 2) + [0] * (n // 2)
            random.shuffle(foo)
            bar += foo
    bar = [bar for _ in range(batch)]
    arr = np.array(bar).astype("float32").reshape(batch, len(bar[0]), 1, 1)
    return torch.from_numpy(arr)


def ccmp_published(t, cnum):
    """The published CCMP of (B, C, H, W) -> (B, C // cnum, H, W): the max over each group of
    cnum consecutive channels, as a max_pool2d over the channel axis moved last."""
    t = t.transpose(3, 1)
    t = F.max_pool2d(t, kernel_size=(1, cnum), stride=(1, cnum))
    return t.transpose(3, 1).contiguous()


def ccmp_padded_gather(counts, device="cpu"):
    """Our CCMP for uneven groups, as a function of (B, C, H, W) -> (B, K, H, W): every group
    gathered into (K, max(counts)) slots, the slots past a group's end pointing at an extra -inf
    channel, then the max over the slots. Not published (max_pool2d takes one kernel size)."""
    bounds = group_bounds(counts)
    C = bounds[-1]
    index = torch.full((len(counts), max(counts)), C, dtype=torch.int64)  # C: the -inf channel
    for i, n in enumerate(counts):
        index[i, :n] = torch.arange(bounds[i], bounds[i] + n)
    index = index.to(device)

    def ccmp(t):
        B, _, H, W = t.shape
        padded = torch.cat([t, t.new_full((B, 1, H, W), float("-inf"))], dim=1)
        return padded[:, index].max(dim=2).values

    return ccmp


def published_loss(counts, device="cpu", alpha=ALPHA, beta=BETA):
    """The published loss for fixed groups, as a function of (x, targets, mask4) ->
    MCLossOutput, with mask4 the channel mask as a (B, C, 1, 1) tensor of x's dtype. Every op
    runs in x's dtype, as published. Uniform ``counts`` take the published CCMP; uneven ones our
    padded gather (see the module's docstring)."""
    counts = tuple(counts)
    K, C = len(counts), sum(counts)
    if len(set(counts)) == 1:
        cnum = counts[0]

        def ccmp(t):
            return ccmp_published(t, cnum)

        def diversity(group_sums):  # published: the mean over (b, i), divided by cnum
            return 1.0 - 1.0 * torch.mean(group_sums) / cnum

    else:
        ccmp = ccmp_padded_gather(counts, device)
        sizes = torch.tensor(counts, dtype=torch.float32, device=device)

        def diversity(group_sums):  # each group's sum over its own size
            return 1.0 - torch.mean(group_sums / sizes.to(group_sums.dtype))

    def loss(x, targets, mask4):
        B, _, H, W = x.shape
        branch = F.softmax(x.reshape(B, C, H * W), 2).reshape(B, C, H, W)
        branch = ccmp(branch).reshape(B, K, H * W)
        div = diversity(torch.sum(branch, 2))
        branch_1 = ccmp(x * mask4)
        logits = F.avg_pool2d(branch_1, kernel_size=(H, W)).view(B, -1)
        dis = F.cross_entropy(logits, targets)
        return MCLossOutput(alpha * dis + beta * div, dis, div, logits)

    return loss


def published_mc_loss(features, targets, cnum, mask, alpha=ALPHA, beta=BETA):
    """The published formulation on one call, for comparison in tests: ``cnum`` an int (uniform
    groups, as published) or a sequence of group sizes (our uneven adaptation); ``mask`` of
    shape (C,) (shared by the batch) or (B, C), bool or float."""
    B, C = features.shape[:2]
    counts = [cnum] * (C // cnum) if isinstance(cnum, int) else list(cnum)
    m = mask.to(features.dtype)
    m = m.view(1, C, 1, 1).expand(B, C, 1, 1) if m.dim() == 1 else m.view(B, C, 1, 1)
    return published_loss(counts, features.device, alpha, beta)(features, targets, m)

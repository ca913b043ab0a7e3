"""What the fused and the reference paths share besides their argument checks (_checks.py) and
channel groups (_groups.py): the output type, the accumulation dtype, and the diversity term
from per-group sums."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._groups import group_tensor


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

"""Per-class channel attention maps: what the diversity term of MC-Loss looks at."""

from __future__ import annotations

import torch

from ._checks import check_features, resolve_counts
from .functional import ccmp, spatial_softmax


@torch.no_grad()
def channel_attention_maps(features, num_classes, cnum=None):
    """The per-class channel attention maps of a (B, C, H, W) feature map: (B, K, H, W).

    Map i is the cross-channel max pooling, over the channels of class group G_i, of the spatial
    softmax of every channel: ``ccmp(spatial_softmax(features), counts)``, i.e.
    ``A[b, i, k] = max_{j in G_i} softmax_k(features[b, j, :])``. Its sum over the H*W positions
    is the h[b, i] of the diversity term (in [1, n_i]): it is near n_i when the channels of the
    group peak at different places, near 1 when they all look at the same place.

    ``cnum`` is an int, per-class counts, or None (C split evenly over the classes, the first
    C % K classes getting one more channel), as for ``mc_loss``. Computed without autograd
    (the result never requires grad), in the features' dtype and on their device, with the
    fused kernels where ``mc.backend`` says they run. To draw the maps, upsample them to the
    image size, e.g. ``F.interpolate(maps, size=image.shape[-2:], mode="bilinear")``.
    """
    check_features(features)
    counts = resolve_counts(num_classes, cnum, features.shape[1])
    return ccmp(spatial_softmax(features), counts)

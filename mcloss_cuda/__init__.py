"""mcloss_cuda: Mutual-Channel Loss (MC-Loss) with fused C++/CUDA kernels for PyTorch.

    import mcloss_cuda as mc
    out = mc.mc_loss(features, targets, num_classes)       # MCLossOutput(loss, dis, div, logits)
    loss = F.cross_entropy(classifier_logits, targets) + out.loss

``mc.backend(device)`` says which implementation runs there; ``MCLOSS_BACKEND=reference``
forces the pure-PyTorch path (``mc.reference``) everywhere. ``python -m mcloss_cuda`` prints
what a bug report needs. The contract: docs/spec.md.
"""

from . import reference
from ._version import __version__ as __version__
from ._common import MCLossOutput
from ._groups import random_channel_mask
from ._ops import backend, built_with_cuda
from .functional import (
    ccmp,
    channel_mask,
    discriminality_logits,
    diversity_loss,
    mc_loss,
    spatial_softmax,
)
from .loss import MCLoss
from .maps import channel_attention_maps

__all__ = [
    "MCLoss",
    "MCLossOutput",
    "backend",
    "built_with_cuda",
    "ccmp",
    "channel_attention_maps",
    "channel_mask",
    "discriminality_logits",
    "diversity_loss",
    "mc_loss",
    "random_channel_mask",
    "reference",
    "spatial_softmax",
]

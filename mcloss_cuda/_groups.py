"""Channel groups as constant tensors, and the random channel mask drawn over them."""

from __future__ import annotations

import functools
from typing import Tuple

import torch

from ._checks import _is_int, check_generator, check_num_classes, resolve_counts, resolve_drop


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
        return torch.tensor(
            [[o + s if s < n else C for s in range(nmax)] for o, n in zip(offsets, counts)],
            dtype=torch.int64,
            device=device,
        )
    if what == "valid":
        return torch.tensor(
            [[s < n for s in range(nmax)] for n in counts], dtype=torch.bool, device=device
        )
    if what == "valid_flat":
        return torch.tensor(
            [i * nmax + s for i, n in enumerate(counts) for s in range(n)],
            dtype=torch.int64,
            device=device,
        )
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
    device = torch.device(device)
    drops = resolve_drop(drop, counts)
    check_generator(generator, device)
    return _draw_keep(counts, drops, batch, generator, device)


def _draw_keep(counts, drops, batch, generator, device):
    """random_channel_mask for arguments that are already checked (``drops`` per group)."""
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


def draw_mask(x, counts, drops, per_sample_mask, generator):
    """The mask mc_loss draws for features x, its arguments checked (check_loss_args)."""
    return _draw_keep(counts, drops, x.shape[0] if per_sample_mask else None, generator, x.device)

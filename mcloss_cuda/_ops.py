"""The compiled ops (``torch.ops.mcloss_cuda.*``): loading, and fake implementations for
torch.compile and opcheck.

The schemas live once, in csrc/ops.cpp; the CPU and CUDA kernels register against them, and
csrc/autograd wires each forward op to its hand-written backward op.
"""

from __future__ import annotations

import torch

from . import _diagnostics

try:
    from . import _C  # noqa: F401  (registers the ops with the dispatcher)

    LOAD_ERROR = None
except (ImportError, OSError) as e:  # never built, built for another torch, a missing library
    _C = None
    LOAD_ERROR = e
    _diagnostics.warn_load_failure(e)  # once, saying why and what fixes it

AVAILABLE = _C is not None
NAMESPACE = "mcloss_cuda"
# ops with a CPU and (in a CUDA build) a CUDA kernel each; every one is either a backward op
# or has an autograd formula
KERNEL_OPS = (
    "spatial_softmax",
    "spatial_softmax_backward",
    "channel_mask",
    "ccmp",
    "ccmp_backward",
    "mc_loss",
    "mc_loss_backward",
)
OP_NAMES = KERNEL_OPS


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    return AVAILABLE and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"{NAMESPACE}::{op_name}", dispatch_key
    )


def built_with_cuda() -> bool:
    """Whether the extension was compiled with its CUDA sources."""
    return AVAILABLE and bool(_C.built_with_cuda())


def backend(device) -> str:
    """Which implementation runs for tensors on ``device``: "cuda", "cpu" or "reference"."""
    if isinstance(device, torch.Tensor):
        device = device.device
    device = torch.device(device)
    if _diagnostics.reference_forced() or not AVAILABLE:
        return "reference"
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda" and has_kernel("mc_loss", "CUDA"):
        # the reference where the device's architecture was not compiled for
        return "cuda" if _diagnostics.cuda_device_ok(device) else "reference"
    return "reference"


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


if AVAILABLE:
    ops = torch.ops.mcloss_cuda

    # ---- fake (meta) implementations: shapes and dtypes only, for torch.compile and opcheck.
    # A call mixing a meta tensor with real ones also lands here: refuse it, as torch's own
    # ops do, rather than hand back an uninitialised tensor.

    def _one_device(**tensors):
        devices = {name: t.device for name, t in tensors.items()}
        first_name, first = next(iter(devices.items()))
        for name, device in devices.items():
            if device != first:
                raise ValueError(
                    f"{name}: expected device {first} (that of {first_name}), got {device}"
                )

    @torch.library.register_fake("mcloss_cuda::spatial_softmax")
    def _(x):
        return torch.empty_like(x)

    @torch.library.register_fake("mcloss_cuda::spatial_softmax_backward")
    def _(grad, out):
        _one_device(out=out, grad=grad)
        return torch.empty_like(out)

    @torch.library.register_fake("mcloss_cuda::channel_mask")
    def _(x, mask):
        _one_device(x=x, mask=mask)
        return torch.empty_like(x)

    @torch.library.register_fake("mcloss_cuda::ccmp")
    def _(x, offsets):
        _one_device(x=x, offsets=offsets)
        K = offsets.shape[0] - 1
        # (Tensor.new_empty takes no memory_format: build it with torch.empty)
        return torch.empty(
            (x.shape[0], K, x.shape[2], x.shape[3]),
            dtype=x.dtype,
            device=x.device,
            memory_format=_format_of(x),
        )

    @torch.library.register_fake("mcloss_cuda::ccmp_backward")
    def _(grad, x, offsets):
        _one_device(x=x, grad=grad, offsets=offsets)
        return torch.empty_like(x)

    def _check_targets(targets, x):
        # what check_targets (csrc/op_common.h) says of them before any value is read, so that
        # a traced call fails where the real one would
        if targets.dtype != torch.int64:
            raise TypeError(f"targets: expected dtype int64 (class indices), got {targets.dtype}")
        if targets.dim() != 1 or targets.shape[0] != x.shape[0]:
            raise ValueError(
                f"targets: expected shape ({x.shape[0]},), one class index per "
                f"sample, got {list(targets.shape)}"
            )

    def _check_cross_entropy(weight, label_smoothing, reduction, x, K):
        # what check_cross_entropy (csrc/op_common.h) says of them, for traced calls
        if weight is not None:
            if weight.dtype != acc_dtype(x.dtype):
                raise TypeError(
                    f"weight: expected dtype {acc_dtype(x.dtype)} (the accumulation "
                    f"dtype of x), got {weight.dtype}"
                )
            if weight.dim() != 1 or weight.shape[0] != K:
                raise ValueError(
                    f"weight: expected shape ({K},), one weight per class, got {list(weight.shape)}"
                )
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing}")
        if reduction not in (0, 1, 2):
            raise ValueError(f"reduction: expected 0 (none), 1 (mean) or 2 (sum), got {reduction}")

    @torch.library.register_fake("mcloss_cuda::mc_loss")
    def _(
        x,
        targets,
        offsets,
        max_group,
        mask,
        drop,
        drop_fraction,
        per_sample_mask,
        generator,
        alpha,
        beta,
        avg_pool=False,
        weight=None,
        label_smoothing=0.0,
        reduction=1,
    ):
        _one_device(
            x=x,
            targets=targets,
            offsets=offsets,
            **({} if mask is None else {"mask": mask}),
            **({} if weight is None else {"weight": weight}),
        )
        _check_targets(targets, x)
        _check_cross_entropy(weight, label_smoothing, reduction, x, offsets.shape[0] - 1)
        B, C, K = x.shape[0], x.shape[1], offsets.shape[0] - 1
        acc = acc_dtype(x.dtype)
        per_term = (B,) if reduction == 0 else ()
        term = lambda: x.new_empty(per_term, dtype=acc)  # noqa: E731
        if mask is None:
            drawn = x.new_empty((B, C) if per_sample_mask else (C,), dtype=torch.bool)
        else:
            drawn = x.new_empty((0,), dtype=torch.bool)
        return (
            term(),
            term(),
            term(),
            x.new_empty((B, K), dtype=acc),
            x.new_empty((B, 2), dtype=acc),
            drawn,
            x.new_empty((2,), dtype=acc),
        )

    @torch.library.register_fake("mcloss_cuda::mc_loss_backward")
    def _(
        grad_loss,
        grad_dis,
        grad_div,
        grad_logits,
        x,
        targets,
        offsets,
        max_group,
        mask,
        logits,
        lse,
        alpha,
        beta,
        avg_pool=False,
        weight=None,
        label_smoothing=0.0,
        reduction=1,
        weight_sums=None,
    ):
        grads = {
            name: g
            for name, g in (
                ("grad_loss", grad_loss),
                ("grad_dis", grad_dis),
                ("grad_div", grad_div),
                ("grad_logits", grad_logits),
                ("weight", weight),
                ("weight_sums", weight_sums),
            )
            if g is not None
        }
        _one_device(
            x=x, targets=targets, offsets=offsets, mask=mask, logits=logits, lse=lse, **grads
        )
        _check_targets(targets, x)
        _check_cross_entropy(weight, label_smoothing, reduction, x, offsets.shape[0] - 1)
        if weight is not None and weight_sums is None:
            raise ValueError(
                "weight_sums: expected the forward's weight_sums with a weight "
                "(None stands for B and K, the sums without weights)"
            )
        return torch.empty_like(x)

    # Autograd: csrc/autograd/mcloss_autograd.cpp registers each forward op's backward (one
    # of the backward ops) for the Autograd key, in C++, so that a step runs no Python for it.
else:
    ops = None


def _format_of(x):
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    return torch.contiguous_format


def as_maps(x):
    """(B, C, *S) features as the (B, C, H, W) maps the kernels take: 4-D as they are, any other
    number of spatial dimensions flattened into (B, C, L, 1), a view wherever the positions
    have one stride (contiguous, channels_last_3d, and (B, N, C) tokens transposed to (B, C, N)
    all do); the ops are the same, the positions being all that the loss sums or maxes over."""
    return x if x.dim() == 4 else x.flatten(2).unsqueeze(-1)


def kernel_layout(x):
    """The kernels read (B, C, H, W) contiguous or channels_last; anything else is copied once."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()

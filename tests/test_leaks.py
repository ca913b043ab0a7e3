"""Memory stays flat over thousands of training steps.

CPU: the resident set size (``/proc/self/statm``) after a warm-up, before and after a few
thousand forward + backward steps of the loss (fused and reference, random and explicit masks,
fp32 and fp16) and of the primitives, may grow by a small slack only. A leak of the saved
features alone (12 KiB a step here) would exceed it several times over; ``test_probe_sees_a_leak``
shows that the probe does see such a leak. Python objects: no tensor survives a step (no
reference cycle keeps the autograd graph alive), checked with the garbage collector off. CUDA
(when present): ``torch.cuda.memory_allocated`` is the same before and after.
"""

import gc
import os
import subprocess
import sys
import weakref

import pytest
import torch

import mcloss_cuda as mc
from helpers import child_env, cuda_only

K, N, B, H, W = 4, 3, 4, 8, 8  # features: 4 * 12 * 64 * 4 bytes = 12 KiB in fp32
STEPS, WARMUP = 2500, 300
SLACK = 2 << 20  # bytes of RSS growth allowed after the warm-up
IMPLS = [pytest.param(mc, id="fused"), pytest.param(mc.reference, id="reference")]

needs_proc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.exists("/proc/self/statm"),
    reason="needs /proc/self/statm",
)


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_step(impl, device="cpu"):
    """A closure running one training-like step; it varies dtype, mask and entry point from
    one call to the next, with fresh inputs every time."""
    counter = [0]
    mask = mc.random_channel_mask(K, N, device=device)

    def step():
        i = counter[0]
        counter[0] += 1
        dtype = torch.float16 if i % 4 == 3 else torch.float32
        x = torch.randn(B, K * N, H, W, device=device, dtype=dtype, requires_grad=True)
        y = torch.randint(0, K, (B,), device=device)
        if i % 3 == 0:
            out = impl.mc_loss(x, y, K)
        elif i % 3 == 1:
            out = impl.mc_loss(x, y, K, N, mask=mask, per_sample_mask=True)
        else:
            out = impl.mc_loss(x, y, K, per_sample_mask=True)
        loss = out.loss
        if i % 5 == 0:
            # the primitives too, in the same graph
            loss = (
                loss
                + impl.spatial_softmax(x).sum()
                + impl.ccmp(x, N).sum()
                + impl.channel_mask(x, mask).square().sum()
                + impl.diversity_loss(x, K)
                + impl.discriminality_logits(x, K, mask).sum()
            )
        loss.backward()
        return x.grad.shape

    return step


def growth(step, steps=STEPS, warmup=WARMUP):
    for _ in range(warmup):
        step()
    gc.collect()
    before = rss()
    for _ in range(steps):
        step()
    gc.collect()
    return rss() - before


def leaky_step_factory():
    kept = []
    inner = make_step(mc)

    def leaky_step():
        inner()
        kept.append(torch.randn(B, K * N, H, W))

    return leaky_step


def growth_in_child(what):
    """RSS growth measured in a fresh process: in the test process, heap freed by earlier tests
    would absorb a leak without any growth of the resident set."""
    r = subprocess.run(
        [sys.executable, os.path.abspath(__file__), what],
        capture_output=True,
        text=True,
        timeout=600,
        env=child_env(),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.strip().splitlines()[-1])


@needs_proc
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_cpu_rss_flat(impl):
    grown = growth_in_child(impl)
    assert grown < SLACK, f"RSS grew by {grown / 2**20:.1f} MiB over {STEPS} steps"


@needs_proc
def test_probe_sees_a_leak():
    # the same probe on a step that keeps its features: it must report the growth
    grown = growth_in_child("leaky")
    assert grown > SLACK, f"a 12 KiB/step leak showed as {grown / 2**20:.1f} MiB only"


@pytest.mark.parametrize("impl", IMPLS)
def test_no_tensor_outlives_its_step(impl):
    # with the garbage collector off, reference counting alone frees the features, the outputs
    # and the graph once the caller drops them: nothing is kept in a cycle or a cache
    def live_tensors():
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    step = make_step(impl)
    for _ in range(10):
        step()
    gc.collect()
    start = live_tensors()
    gc.disable()
    try:
        refs = []
        for i in range(30):
            x = torch.randn(B, K * N, H, W, requires_grad=True)
            y = torch.randint(0, K, (B,))
            out = impl.mc_loss(x, y, K, per_sample_mask=bool(i % 2))
            out.loss.backward()
            refs += [weakref.ref(t) for t in (x, x.grad, *out)]
            del x, y, out
        alive = [r for r in refs if r() is not None]
        assert not alive, f"{len(alive)} tensors outlived their step"
    finally:
        gc.enable()
    gc.collect()
    assert live_tensors() <= start, (start, live_tensors())


@cuda_only
@pytest.mark.parametrize("impl", IMPLS)
def test_cuda_memory_flat(impl):
    step = make_step(impl, device="cuda")
    for _ in range(50):
        step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(1000):
        step()
    torch.cuda.synchronize()
    gc.collect()
    assert torch.cuda.memory_allocated() == before


if __name__ == "__main__":
    # the child of growth_in_child: one measurement, printed last
    torch.set_num_threads(1)
    torch.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    what = sys.argv[1]
    if what == "leaky":
        print(growth(leaky_step_factory(), steps=1000, warmup=50))
    else:
        print(growth(make_step(mc if what == "fused" else mc.reference)))

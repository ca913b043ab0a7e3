#!/usr/bin/env python
"""Benchmark MC-Loss implementations on identical inputs.

Implementations (``--impls``):
  fused      mc.mc_loss(...): the package's kernels where mc.backend(device) is "cpu"/"cuda",
             otherwise its pure-PyTorch path (the row's ``backend`` says which ran);
  reference  mc.reference.mc_loss(...), the pure-PyTorch oracle;
  eager      the published formulation (Chang et al., TIP 2020), written fresh here: the mask
             is built on the host every step with a Python random.shuffle loop and copied to the
             device, CCMP is transpose + max_pool2d + transpose, GAP is avg_pool2d;
  compiled   torch.compile of that formulation, with the mask passed in as a tensor;
  graphed    (CUDA only) fused's forward, and its forward+backward, each captured once in a
             CUDA graph and replayed: the GPU time of the step without Python or launch
             overhead, which at small shapes is most of an eager step's time;
  softmax    one torch.softmax over the flattened map, forward only: a yardstick, since the
             target is "fused forward+backward <= 2.5x one softmax pass".

Run ``python benchmarks/bench.py --help`` for the options. Progress goes to stderr; the
Markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import random
import resource
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

# The installed package (with its compiled extension) comes first; a checkout that was not
# installed falls back to the repository root (e.g. after `setup.py build_ext --inplace`).
try:
    import mcloss_cuda as mc
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import mcloss_cuda as mc

ALL_IMPLS = ("fused", "graphed", "reference", "eager", "compiled", "softmax")
CUDA_ONLY = ("graphed",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
ALPHA, BETA = 1.5, 20.0  # the published CUB-200 weights (the defaults, docs/spec.md)

# Tolerance on the scalar loss when checking fused against the other implementations.
# eager/compiled run the published ops in the input dtype (a bf16 softmax rounds every
# probability to 8 bits), while fused/reference accumulate in fp32, so half precision needs a
# loose bound; fp32 and fp64 differ only by summation order.
# (A bf16 loss near 15 is itself rounded to a 0.0625 step, 0.4%: allow a few such steps.)
LOSS_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-3,
             torch.bfloat16: 2e-2}


# ----------------------------------------------------------------------------------------------
# shapes


@dataclass(frozen=True)
class Case:
    B: int
    C: int
    H: int
    W: int
    K: int
    # None: the balanced split of C over K (uneven groups when K does not divide C)
    cnum: Optional[int]
    why: str

    @property
    def counts(self) -> Tuple[int, ...]:
        if self.cnum is not None:
            return (self.cnum,) * self.K
        base, extra = divmod(self.C, self.K)
        return tuple(base + (1 if i < extra else 0) for i in range(self.K))

    @property
    def uniform(self) -> bool:
        return len(set(self.counts)) == 1

    @property
    def groups(self):
        return self.cnum if self.cnum is not None else "balanced"

    @property
    def numel(self) -> int:
        return self.B * self.C * self.H * self.W

    def label(self) -> str:
        g = f"cnum={self.cnum}" if self.cnum is not None else f"K={self.K} bal."
        return f"{self.B}x{self.C}x{self.H}x{self.W} {g}"


# Published CUB-200 setting: 200 classes x 3 channels = 600, 14x14 (448 px input) and 28x28.
# ResNet-50's last stage has C=2048 channels, which do not divide over 200 classes: the
# balanced split gives 48 groups of 11 and 152 of 10 (uneven groups; the published code cannot).
QUICK_CASES = [
    Case(32, 600, 14, 14, 200, 3, "published CUB-200 setting"),
    Case(8, 600, 28, 28, 200, 3, "published 28x28 map, small batch"),
    Case(8, 2048, 7, 7, 200, None, "ResNet-50 C=2048, uneven groups"),
]
FULL_CASES_CPU = [
    Case(32, 600, 14, 14, 200, 3, "published CUB-200 setting"),
    Case(32, 600, 28, 28, 200, 3, "published 28x28 map"),
    Case(128, 600, 14, 14, 200, 3, "large batch"),
    Case(32, 2048, 7, 7, 200, None, "ResNet-50 at 224 px, uneven groups"),
    Case(32, 2048, 14, 14, 200, None, "ResNet-50 at 448 px, uneven groups"),
]
# On the GPU the cost is mostly torch.compile's (several seconds per shape and dtype, cold), so
# the list stays at 5 shapes x 2 dtypes to finish in about 3 minutes.
FULL_CASES_CUDA = [
    Case(32, 600, 14, 14, 200, 3, "published CUB-200 setting"),
    Case(32, 600, 28, 28, 200, 3, "published 28x28 map"),
    Case(128, 600, 14, 14, 200, 3, "large batch"),
    Case(128, 2048, 7, 7, 200, None, "ResNet-50 at 224 px, uneven groups"),
    Case(128, 2048, 14, 14, 200, None, "ResNet-50 at 448 px, large batch, uneven groups"),
]
# bf16/fp16 on the CPU run far slower than fp32 in eager PyTorch: keep those maps modest there.
CPU_HALF_MAX_NUMEL = 4_000_000


# ----------------------------------------------------------------------------------------------
# the published formulation, written fresh from the formulas of docs/spec.md


def host_mask_published(batch: int, counts: Sequence[int]) -> torch.Tensor:
    """The published mask: a Python loop over the classes shuffling a 0/1 list per group on the
    host, replicated over the batch, turned into a (B, C, 1, 1) float32 tensor via numpy.
    Kept deliberately host-side: that per-step cost is part of what is being compared."""
    bar = []
    if len(set(counts)) == 1:
        n = counts[0]
        foo = [1] * (n - n // 2) + [0] * (n // 2)  # drop floor(n/2), as the package's default
        for _ in counts:
            random.shuffle(foo)
            bar += foo
    else:  # same idea per uneven group
        for n in counts:
            foo = [1] * (n - n // 2) + [0] * (n // 2)
            random.shuffle(foo)
            bar += foo
    bar = [bar for _ in range(batch)]
    arr = np.array(bar).astype("float32").reshape(batch, len(bar[0]), 1, 1)
    return torch.from_numpy(arr)


def make_published_loss(counts: Sequence[int], device):
    """The published loss as a function of (x, targets, mask4), mask4 of shape (B, C, 1, 1).

    Uniform groups use the published CCMP (transpose, max_pool2d with kernel (1, cnum),
    transpose back). Uneven groups cannot go through max_pool2d, so they gather each group into
    (K, n_max) slots padded with a -inf channel and take the max over the slots: same math.
    """
    counts = tuple(counts)
    K, C = len(counts), sum(counts)
    uniform = len(set(counts)) == 1
    cnum = counts[0]
    if not uniform:
        nmax = max(counts)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        idx = np.full((K, nmax), C, dtype=np.int64)  # C = the extra -inf channel
        for i, (o, n) in enumerate(zip(offsets, counts)):
            idx[i, :n] = np.arange(o, o + n)
        index = torch.from_numpy(idx).to(device)
        sizes = torch.tensor(counts, dtype=torch.float32, device=device)

    def ccmp(t):
        if uniform:
            t = t.transpose(3, 1)
            t = F.max_pool2d(t, kernel_size=(1, cnum), stride=(1, cnum))
            return t.transpose(3, 1).contiguous()
        B, _, H, W = t.shape
        padded = torch.cat([t, t.new_full((B, 1, H, W), float("-inf"))], dim=1)
        return padded[:, index].max(dim=2).values

    def published_loss(x, targets, mask4):
        B, _, H, W = x.shape
        branch = F.softmax(x.reshape(B, C, H * W), 2).reshape(B, C, H, W)
        branch = ccmp(branch).reshape(B, K, H * W)
        if uniform:
            loss_div = 1.0 - 1.0 * torch.mean(torch.sum(branch, 2)) / cnum
        else:
            loss_div = 1.0 - torch.mean(torch.sum(branch, 2) / sizes.to(branch.dtype))
        branch_1 = x * mask4
        branch_1 = ccmp(branch_1)
        branch_1 = F.avg_pool2d(branch_1, kernel_size=(H, W))
        logits = branch_1.view(B, -1)
        loss_dis = F.cross_entropy(logits, targets)
        return ALPHA * loss_dis + BETA * loss_div

    return published_loss


# ----------------------------------------------------------------------------------------------
# timing and measurement


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Median wall times of callables, after warm-up, taken side by side.

    CPU: time.perf_counter. CUDA: events around each run plus a synchronize; before each run a
    256 MiB buffer is overwritten (outside the events) so that inputs are not served from the L2
    cache of the previous run: the bandwidth figures then mean DRAM traffic.

    On the CPU each run's minor page faults are counted too: a step whose fresh outputs the
    allocator has just handed back to the OS pays for zeroed pages in the kernel (sys time),
    which can move a row's time by tens of percent from one run to the next; the count says
    when that happened.
    """

    def __init__(self, device, warmup, repeats, budget_s, rounds=4):
        self.device, self.warmup, self.repeats, self.budget_s = device, warmup, repeats, budget_s
        self.rounds = max(1, rounds)
        self.flush = None
        if device.type == "cuda":
            self.flush = torch.empty(64 * 1024 * 1024, dtype=torch.float32, device=device)

    def _once(self, fn, faults=None) -> float:
        if self.device.type == "cuda":
            self.flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        if faults is not None:
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        return ms

    def median_ms(self, fn) -> Tuple[float, int]:
        result = self.side_by_side([("only", fn)])["only"]
        if isinstance(result, Exception):
            raise result
        return result[:2]

    def side_by_side(self, jobs):
        """{key: (median ms, runs, median page faults per run or None)} for jobs [(key, fn)];
        {key: exception} for a job that failed.

        Each job is warmed up and timed once to size it: as many runs as fit in the budget, at
        least 5 (a median of fewer means little), at most `repeats`. Its runs are then taken in
        `rounds` blocks, round-robin over the jobs, each block after one untimed run. On a
        shared machine whose speed drifts by tens of percent over a minute, every job then sees
        the same mix of fast and slow spells, which keeps the ratios between rows (speed-ups,
        softmax passes) honest.
        """
        # As timeit does: no cyclic garbage collection inside the timed runs, where it would
        # land on whichever row happens to cross the threshold (the eager and compiled rows
        # leave the garbage; a cheap row then pays for collecting it).
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._side_by_side(jobs)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _side_by_side(self, jobs):
        times, want, out = {}, {}, {}
        faults = {key: ([] if self.device.type == "cpu" else None) for key, _ in jobs}
        for key, fn in jobs:
            try:
                for _ in range(self.warmup):
                    fn()
                sync(self.device)
                first = self._once(fn)
            except Exception as e:
                out[key] = e
                continue
            times[key] = [first]
            want[key] = int(min(self.repeats, max(5, self.budget_s * 1e3 / max(first, 1e-3))))
        for r in range(self.rounds):
            for key, fn in jobs:
                if key not in times:
                    continue
                # runs left spread evenly over the rounds left
                block = -(-(want[key] - len(times[key])) // (self.rounds - r))
                if block <= 0:
                    continue
                try:
                    if r > 0:
                        fn()  # untimed: the previous block was another job's
                        sync(self.device)
                    times[key] += [self._once(fn, faults[key]) for _ in range(block)]
                except Exception as e:
                    out[key] = e
                    del times[key]
        for key, ts in times.items():
            f = faults[key]
            out[key] = (statistics.median(ts), len(ts), statistics.median(f) if f else None)
        return out


def saved_bytes_of(forward, x) -> int:
    """Bytes autograd keeps for backward: unique storages packed through saved-tensor hooks,
    not counting the input features' own storage (which the caller keeps alive anyway)."""
    seen = {}
    x_ptr = x.untyped_storage().data_ptr()

    def pack(t):
        try:
            st = t.untyped_storage()
            if st.data_ptr() != x_ptr:
                seen[(str(t.device), st.data_ptr())] = st.nbytes()
        except Exception:  # a tensor without storage (e.g. a sparse or meta one): count nothing
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return int(sum(seen.values()))


def copy_bandwidth_gbps(device, timer) -> float:
    """Device-to-device copy bandwidth (read + write) on a 1 GiB buffer, GB/s (1e9)."""
    n = 256 * 1024 * 1024

    def measure():
        src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        return timer.median_ms(lambda: dst.copy_(src))[0]

    ms = measure()  # the two buffers are gone once it returns
    free_memory(device)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------
# environment


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


# ----------------------------------------------------------------------------------------------
# one (case, dtype): every implementation on the same x, targets and mask


def capture_graphs(fused_loss, x):
    """{"fwd": (graph, loss), "fwd_bwd": (graph, dx)}: fused's forward and forward+backward,
    each captured in a CUDA graph after a warm-up on a side stream (allocator, caches)."""
    steps = {"fwd": lambda: fused_loss().detach(),
             "fwd_bwd": lambda: torch.autograd.grad(fused_loss(), x)[0]}
    graphs = {}
    for kind, step in steps.items():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        graphs[kind] = (graph, out)
    return graphs


def build_impls(names, case, x, targets, mask, mask4, device):
    """name -> (callable returning the scalar loss, backend label, note)."""
    counts = case.counts
    cnum = case.cnum  # None = balanced split, also what mc takes
    published = make_published_loss(counts, device)
    impls = {}

    def fused_loss():
        return mc.mc_loss(x, targets, case.K, cnum, mask=mask, alpha=ALPHA, beta=BETA).loss

    if "fused" in names:
        impls["fused"] = (fused_loss, mc.backend(device), "")
    if "graphed" in names:  # the same step, captured in CUDA graphs by run_case
        impls["graphed"] = (fused_loss, mc.backend(device),
                            "fused in a CUDA graph: GPU time without Python/launch overhead")
    if "reference" in names:
        impls["reference"] = (lambda: mc.reference.mc_loss(x, targets, case.K, cnum, mask=mask,
                                                           alpha=ALPHA, beta=BETA).loss,
                              "reference", "")
    if "eager" in names:
        def eager():
            # the published step: a fresh host-built mask, copied to the device every call
            m = host_mask_published(x.shape[0], counts).to(device=device, dtype=x.dtype)
            return published(x, targets, m)
        impls["eager"] = (eager, "eager",
                          "" if case.uniform else "uneven: padded gather instead of max_pool2d")
    if "compiled" in names:
        # A fresh dynamo state per (shape, dtype): one static-shape compile each, and no
        # recompile limit reached across the cases.
        try:
            torch._dynamo.reset()
            compiled = torch.compile(published, dynamic=False)
        except Exception as e:  # surfaces in the row's error at its first call
            def compiled(*_, _err=e):
                raise _err
        impls["compiled"] = (lambda: compiled(x, targets, mask4), "inductor",
                             "" if case.uniform else "uneven: padded gather")
    return impls, published


def run_case(case, dtype, names, device, timer, copy_gbps, rec_base, progress):
    """Measure every implementation on one (case, dtype). Returns a list of records."""
    gen = torch.Generator().manual_seed(1234)
    B, C, H, W = case.B, case.C, case.H, case.W
    x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    x.requires_grad_(True)
    targets = torch.randint(0, case.K, (B,), generator=gen).to(device)
    # one mask from the package's sampler (docs/spec.md: drop floor(n_i/2) per group, shared by the
    # batch); fused and reference take it as (C,) bool, compiled as the published (B, C, 1, 1)
    torch.manual_seed(4321)
    mask = mc.random_channel_mask(case.K, case.counts, device=device)
    mask4 = mask.to(dtype).view(1, C, 1, 1).expand(B, C, 1, 1).contiguous()
    x_bytes = x.numel() * x.element_size()

    impls, published = build_impls(names, case, x, targets, mask, mask4, device)
    records = []

    def base_record(impl, backend, note=""):
        r = dict(rec_base)
        r.update(impl=impl, shape=[B, C, H, W], groups=case.groups, num_classes=case.K,
                 dtype=str(dtype).replace("torch.", ""), backend=backend, case=case.why,
                 fwd_ms=None, fwd_bwd_ms=None, fwd_page_faults=None, fwd_bwd_page_faults=None,
                 saved_bytes=None, saved_pct_of_x=None,
                 peak_extra_bytes=None, bw_gbps=None, bw_share_of_copy=None,
                 loss=None, loss_abs_diff_vs_fused=None, check="", note=note, error=None,
                 feature_bytes=x_bytes)
        return r

    # --- correctness: each implementation's loss against fused's, same x, targets and mask.
    # eager takes the same mask here (mask4) instead of drawing one on the host.
    losses = {}
    with torch.no_grad():
        for name in impls:
            try:
                if name == "eager":
                    v = published(x, targets, mask4)
                elif name in ("compiled", "graphed"):
                    continue  # checked after its compile or capture, below
                else:
                    v = impls[name][0]()
                losses[name] = float(v)
            except Exception as e:  # recorded in the row below
                losses[name] = e

    def check_against_fused(name, value, rec):
        rec["loss"] = value
        ref = losses.get("fused")
        if name == "fused" or not isinstance(ref, float) or not isinstance(value, float):
            return
        diff = abs(value - ref)
        rec["loss_abs_diff_vs_fused"] = diff
        tol = LOSS_RTOL[dtype] * max(1.0, abs(ref))
        if math.isfinite(diff) and diff <= tol:
            rec["check"] = "ok"
        else:
            rec["check"] = f"MISMATCH |d|={diff:.3g}"
            print(f"WARNING: {case.label()} {dtype}: {name} loss {value!r} vs fused {ref!r} "
                  f"(|d|={diff:.3g} > tol {tol:.3g})", file=sys.stderr)

    def fail(rec, name, e):
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        print(f"ERROR in {name} {case.label()} {dtype}: {rec['error']}", file=sys.stderr)

    def set_bandwidth(rec):
        # minimal traffic: read x (forward), read x (backward), write dx
        rec["bw_gbps"] = 3 * x_bytes / (rec["fwd_bwd_ms"] * 1e-3) / 1e9
        if copy_gbps:
            rec["bw_share_of_copy"] = rec["bw_gbps"] / copy_gbps

    # --- prepare every implementation (compile, check), then time them all side by side
    jobs, rows = [], []
    for name in [n for n in ALL_IMPLS if n in names]:
        progress(f"{case.label()} {str(dtype).replace('torch.', '')} {name}")
        if name == "softmax":
            rec = base_record("softmax", "torch", "forward only: one softmax over the H*W map")
            xs = x.detach().reshape(B, C, H * W)
            jobs.append(((name, "fwd"), lambda xs=xs: torch.softmax(xs, -1)))
            rows.append((name, rec, None))
            continue
        fn, backend, note = impls[name]
        rec = base_record(name, backend, note)
        if name == "graphed":
            rows.append((name, rec, None))
            try:
                graphs = capture_graphs(fn, x)
                graphs["fwd"][0].replay()
                sync(device)
                check_against_fused(name, float(graphs["fwd"][1]), rec)
            except Exception as e:
                fail(rec, name, e)
                traceback.print_exc(file=sys.stderr)
                continue
            jobs += [((name, kind), graph.replay) for kind, (graph, _) in graphs.items()]
            continue
        rows.append((name, rec, fn))
        try:
            if name == "compiled":
                # compile forward and backward now; only warm calls are timed
                # (one training graph: a no_grad call would compile a second, inference one)
                t0 = time.perf_counter()
                v = fn()
                losses["compiled"] = float(v.detach())
                v.backward()
                x.grad = None
                del v
                rec["compile_s"] = round(time.perf_counter() - t0, 2)
            if isinstance(losses.get(name), Exception):
                raise losses[name]
            check_against_fused(name, losses.get(name), rec)
        except Exception as e:
            fail(rec, name, e)
            traceback.print_exc(file=sys.stderr)
            continue
        finally:
            x.grad = None

        def fwd_bwd(fn=fn):
            x.grad = None
            fn().backward()

        jobs += [((name, "fwd"), fn), ((name, "fwd_bwd"), fwd_bwd)]

    # The yardstick right after the fused rows: every round then times fused and one softmax
    # back to back, so that their ratio (softmax passes) sees the same spell of the machine
    # rather than two moments a second or two apart (a shared VM drifts at that scale).
    soft = [j for j in jobs if j[0][0] == "softmax"]
    if soft:
        jobs = [j for j in jobs if j[0][0] != "softmax"]
        at = max((i for i, j in enumerate(jobs) if j[0][0] == "fused"), default=-1) + 1
        jobs[at:at] = soft
    timed = timer.side_by_side(jobs)
    x.grad = None

    for name, rec, fn in rows:
        for kind in ("fwd", "fwd_bwd"):
            result = timed.get((name, kind))
            if isinstance(result, Exception):
                if not rec["error"]:
                    fail(rec, name, result)
            elif result is not None:
                rec[f"{kind}_ms"], rec[f"{kind}_runs"], rec[f"{kind}_page_faults"] = result
        if name == "graphed" and rec.get("fwd_bwd_ms"):
            set_bandwidth(rec)
        if fn is not None and not rec["error"]:
            try:
                rec["saved_bytes"] = saved_bytes_of(fn, x)
                rec["saved_pct_of_x"] = 100.0 * rec["saved_bytes"] / x_bytes
                if device.type == "cuda":
                    gc.collect()
                    sync(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                    x.grad = None
                    fn().backward()  # x.grad (one feature map) is part of the peak
                    sync(device)
                    rec["peak_extra_bytes"] = torch.cuda.max_memory_allocated(device) - base
                    set_bandwidth(rec)
            except Exception as e:
                fail(rec, name, e)
            finally:
                x.grad = None
        records.append(rec)

    # speed-up of fused over every row, and each row against one softmax pass
    fused = next((r for r in records if r["impl"] == "fused"), None)
    soft = next((r for r in records if r["impl"] == "softmax"), None)
    for r in records:
        for key, out in (("fwd_ms", "fused_speedup_fwd"), ("fwd_bwd_ms", "fused_speedup_fwd_bwd")):
            if fused and fused.get(key) and r.get(key):
                r[out] = r[key] / fused[key]
        t = r.get("fwd_bwd_ms") or (r["fwd_ms"] if r["impl"] == "softmax" else None)
        if soft and soft.get("fwd_ms") and t:
            r["softmax_passes"] = t / soft["fwd_ms"]
    return records


def free_memory(device):
    """Release what a finished shape left behind (its tensors, graphs and compiled code)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# output


def _f(v, fmt="{:.3f}"):
    return "—" if v is None else fmt.format(v)


def markdown(records, header_lines, device, skipped):
    cuda = device.type == "cuda"
    cols = ["shape (B,C,H,W)", "groups", "dtype", "impl", "backend", "fwd ms", "fwd+bwd ms",
            "fused speed-up fwd", "fused speed-up fwd+bwd", "saved for bwd MiB (% of x)"]
    if cuda:
        cols += ["peak extra MiB", "BW GB/s (% of copy)"]
    else:
        cols += ["page faults / fwd+bwd"]
    cols += ["/ softmax", "check"]
    out = list(header_lines) + ["", "| " + " | ".join(cols) + " |",
                                "|" + "|".join("---" for _ in cols) + "|"]
    for r in records:
        saved = ("—" if r["saved_bytes"] is None else
                 f"{r['saved_bytes'] / 2**20:.1f} ({r['saved_pct_of_x']:.0f}%)")
        row = ["x".join(map(str, r["shape"])), str(r["groups"]), r["dtype"], r["impl"],
               r["backend"], _f(r["fwd_ms"]), _f(r["fwd_bwd_ms"]),
               _f(r.get("fused_speedup_fwd"), "{:.2f}x"),
               _f(r.get("fused_speedup_fwd_bwd"), "{:.2f}x"), saved]
        if cuda:
            row.append(_f(None if r["peak_extra_bytes"] is None else r["peak_extra_bytes"] / 2**20,
                          "{:.1f}"))
            row.append("—" if r["bw_gbps"] is None else
                       f"{r['bw_gbps']:.0f}" + ("" if r["bw_share_of_copy"] is None
                                                else f" ({100 * r['bw_share_of_copy']:.0f}%)"))
        else:
            key = "fwd_page_faults" if r["impl"] == "softmax" else "fwd_bwd_page_faults"
            row.append(_f(r.get(key), "{:.0f}"))
        row.append(_f(r.get("softmax_passes"), "{:.2f}"))
        flags = [r["check"]] if r["check"] else []
        if r.get("note"):
            flags.append(r["note"])
        if r.get("error"):
            flags.append("ERROR " + r["error"].replace("|", "/")[:120])
        row.append("; ".join(flags))
        out.append("| " + " | ".join(row) + " |")
    out += [
        "",
        "Legend: times are medians after warm-up, every row of a shape timed side by side in "
        "interleaved rounds (forward with autograd recording; forward+"
        "backward includes `loss.backward()`). `fused speed-up` = this row's time / fused's time "
        "(>1: fused is faster). `saved for bwd` = unique storages autograd keeps, the input "
        "features excluded. `/ softmax` = this row's fwd+bwd time in units of one forward "
        "softmax over the same map (target for fused: <= 2.5). eager builds its mask on the "
        "host every step (as published) and copies it to the device; fused, reference and "
        "compiled take one precomputed mask. eager/compiled compute in the input dtype; "
        "fused/reference accumulate half precision in fp32. `check`: loss vs fused on the same "
        "mask.",
    ]
    if cuda:
        out.append("GPU: inputs evicted from L2 before each timed run; `peak extra` = peak "
                   "allocation during one fwd+bwd above what was allocated before (includes "
                   "x.grad); `BW` = (read x fwd + read x bwd + write dx) / fwd+bwd time, and "
                   "its share of the device-to-device copy bandwidth measured in this run.")
    if not cuda:
        out.append("CPU: `page faults` = median minor page faults per timed fwd+bwd (forward "
                   "for softmax), whole process: fresh pages the OS zeroes because the "
                   "allocator had returned freed outputs to it; 4 KiB each (about 3,700 per "
                   "15 MB output).")
    if skipped:
        out.append("Not run (time limit reached): " + ", ".join(skipped))
    return "\n".join(out)


def _plot_label(r):
    g = f"cnum={r['groups']}" if r["groups"] != "balanced" else "balanced (uneven)"
    return f"{'x'.join(map(str, r['shape']))}\n{g}"


def plot(records, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r["dtype"] for r in records))
    others = [i for i in ("eager", "compiled", "reference")
              if any(r["impl"] == i for r in records)]
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(10, 4 * len(dtypes)), squeeze=False)
    for ax, dt in zip(axes[:, 0], dtypes):
        rows = [r for r in records if r["dtype"] == dt]
        labels = list(dict.fromkeys(_plot_label(r) for r in rows))
        width = 0.8 / max(1, len(others))
        for j, impl in enumerate(others):
            ys = []
            for lab in labels:
                r = next((r for r in rows if r["impl"] == impl and _plot_label(r) == lab), None)
                ys.append(r.get("fused_speedup_fwd_bwd") if r else None)
            xs = [i + (j - (len(others) - 1) / 2) * width for i in range(len(labels))]
            vals = [y if y is not None else 0 for y in ys]
            bars = ax.bar(xs, vals, width, label=f"over {impl}")
            for b, y in zip(bars, ys):
                ax.annotate("n/a" if y is None else f"{y:.1f}", (b.get_x() + b.get_width() / 2,
                            b.get_height()), ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("fused speed-up (fwd+bwd)")
        backend = next((r["backend"] for r in rows if r["impl"] == "fused"), "?")
        ax.set_title(f"{rows[0]['device_name']} — {dt} — fused backend: {backend}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(records, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------


def parse_dtypes(values, quick):
    if not values:
        values = ["float32"] if quick else ["all"]
    out = []
    for v in values:
        for name in v.split(","):
            name = name.strip()
            if not name:
                continue
            if name == "all":
                out += ["float32", "bfloat16"]
            elif name in DTYPES:
                out.append(name)
            else:
                raise SystemExit(f"--dtype: unknown {name!r}; choose from {list(DTYPES)} or all")
    return [DTYPES[n] for n in dict.fromkeys(out)]


def parse_impls(values, device):
    if not values:
        return [n for n in ALL_IMPLS if device.type == "cuda" or n not in CUDA_ONLY]
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    bad = [n for n in names if n not in ALL_IMPLS]
    if bad:
        raise SystemExit(f"--impls: unknown {bad}; choose from {list(ALL_IMPLS)}")
    if device.type != "cuda" and any(n in CUDA_ONLY for n in names):
        raise SystemExit(f"--impls: {[n for n in names if n in CUDA_ONLY]} need --device cuda")
    return [n for n in ALL_IMPLS if n in names]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="+", metavar="DTYPE",
                   help="float32 bfloat16 float16 float64, a comma list, or 'all' "
                        "(= float32,bfloat16). Default: float32 with --quick, else all")
    p.add_argument("--quick", action="store_true",
                   help="a few small shapes (~1 min on 2 CPU cores)")
    p.add_argument("--impls", nargs="+", metavar="IMPL",
                   help=f"subset of {','.join(ALL_IMPLS)} (default: all)")
    p.add_argument("--repeats", type=int, default=None,
                   help="max timed runs per figure (default: 50 on cuda, 20 on cpu, 10 quick)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed runs first (default 3 cuda, 2 cpu)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds of timed runs per figure before stopping early (min 5 runs)")
    p.add_argument("--rounds", type=int, default=4,
                   help="interleaved rounds the timed runs of a shape's rows are split into "
                        "(default 4; 1 = each row timed in one block)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="start no new (shape, dtype) after this many seconds; the rest is listed "
                        "as not run")
    p.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of fused's speed-ups")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    dtypes = parse_dtypes(args.dtype, args.quick)
    names = parse_impls(args.impls, device)
    cuda = device.type == "cuda"
    repeats = args.repeats or (50 if cuda else (10 if args.quick else 20))
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 2)
    budget = args.budget_s if args.budget_s is not None else (0.3 if cuda else
                                                               (0.5 if args.quick else 1.0))
    timer = Timer(device, warmup, repeats, budget, args.rounds)
    random.seed(0)  # the eager path's host-side mask

    cases = QUICK_CASES if args.quick else (FULL_CASES_CUDA if cuda else FULL_CASES_CPU)
    work = []
    for case in cases:
        for dt in dtypes:
            if (not cuda and dt in (torch.bfloat16, torch.float16)
                    and case.numel > CPU_HALF_MAX_NUMEL):
                continue  # slow on the CPU: keep half-precision shapes modest there
            work.append((case, dt))

    dev_name = device_name(device)
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    threads = torch.get_num_threads()
    copy_gbps = copy_bandwidth_gbps(device, timer) if cuda else None
    # the CPU figures mean little if other work shares the cores: say how busy they were
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    header = [
        f"# MC-Loss benchmark — {args.device}: {dev_name}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), {threads} CPU threads, {now}; "
        f"mcloss_cuda backend on {args.device}: **{mc.backend(device)}**"
        + (f"; device-to-device copy bandwidth {copy_gbps:.0f} GB/s" if copy_gbps else "")
        + (f"; 1-min load average at start {load:.2f}" if load is not None else ""),
    ]
    rec_base = dict(device=args.device, device_name=dev_name, torch=torch.__version__,
                    threads=threads, date=now, copy_gbps=copy_gbps, loadavg_at_start=load)

    n_rows = len(work) * len(names)
    done = [0]
    t_start = time.perf_counter()

    def progress(what):
        done[0] += 1
        print(f"[{done[0]}/{n_rows}, {n_rows - done[0]} left after this, "
              f"{time.perf_counter() - t_start:.0f}s] {what}", file=sys.stderr, flush=True)

    records, skipped = [], []
    for case, dt in work:
        if args.time_limit is not None and time.perf_counter() - t_start > args.time_limit:
            skipped.append(f"{case.label()} {str(dt).replace('torch.', '')}")
            done[0] += len(names)
            continue
        records += run_case(case, dt, names, device, timer, copy_gbps, rec_base, progress)
        free_memory(device)
        if args.json:  # after every shape, so a run cut short still leaves its rows
            write_json(records, args.json)
    if skipped:
        print(f"time limit reached; not run: {skipped}", file=sys.stderr)

    print(markdown(records, header, device, skipped))
    if args.json:
        write_json(records, args.json)
    if args.plot:
        try:
            plot(records, args.plot)
        except Exception as e:  # the table and JSON are the primary output
            print(f"plot failed: {type(e).__name__}: {e}", file=sys.stderr)
    print(f"done in {time.perf_counter() - t_start:.0f}s", file=sys.stderr)
    mismatches = [r for r in records if r["check"].startswith("MISMATCH")]
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())

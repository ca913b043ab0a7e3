"""Timing and measurement for benchmarks/bench.py: the side-by-side Timer, device
synchronisation, the copy bandwidth that bandwidth figures are compared with, CUDA-graph capture,
peak memory, and the device's name. Nothing here knows about MC-Loss."""

from __future__ import annotations

import gc
import platform
import resource
import statistics
import time
from typing import Tuple

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device):
    """Release what a finished shape left behind (its tensors, graphs and compiled code)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


def capture_graphs(loss_fn, x):
    """{"fwd": (graph, loss), "fwd_bwd": (graph, dx)}: loss_fn()'s forward, and its forward +
    backward to x, each captured in a CUDA graph after a warm-up on a side stream (allocator,
    caches). Replaying a graph then costs the GPU time of the step without Python or launches."""
    steps = {
        "fwd": lambda: loss_fn().detach(),
        "fwd_bwd": lambda: torch.autograd.grad(loss_fn(), x)[0],
    }
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


def peak_extra_bytes(step, device) -> int:
    """Peak CUDA allocation while step() runs, above what was allocated just before it (the
    garbage of earlier steps collected first, so that the baseline holds live tensors only)."""
    gc.collect()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


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

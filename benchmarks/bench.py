#!/usr/bin/env python
"""Benchmark MC-Loss implementations on identical inputs.

Implementations (``--impls``):
  fused      mc.mc_loss(...): the package's kernels where mc.backend(device) is "cpu"/"cuda",
             otherwise its pure-PyTorch path (the row's ``backend`` says which ran);
  reference  mc.reference.mc_loss(...), the pure-PyTorch oracle;
  eager      the published formulation (Chang et al., TIP 2020) of tests/published_formulation.py,
             the one the tests compare the package with: the mask is built on the host every
             step with a Python random.shuffle loop and copied to the device, CCMP is
             transpose + max_pool2d + transpose, GAP is avg_pool2d;
  compiled   torch.compile of that formulation, with the mask passed in as a tensor;
  graphed    (CUDA only) fused's forward, and its forward+backward, each captured once in a
             CUDA graph and replayed: the GPU time of the step without Python or launch
             overhead, which at small shapes is most of an eager step's time;
  softmax    one torch.softmax over the flattened map, forward only: a yardstick, since the
             target is "fused forward+backward <= 2.5x one softmax pass".

Run ``python benchmarks/bench.py --help`` for the options. Progress goes to stderr; the
Markdown table goes to stdout. This file holds the shapes, the implementations and how one
shape's rows are measured; timing.py the timer and other measurements, report.py the output.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# The installed package (with its compiled extension) comes first; a checkout that was not
# installed falls back to the repository root (e.g. after `setup.py build_ext --inplace`).
try:
    import mcloss_cuda as mc
except ImportError:
    sys.path.insert(0, ROOT)
    import mcloss_cuda as mc

# This file's siblings, and the tests' modules it shares (the published formulation and the
# saved-bytes probe, imported by name as the tests import them), whether it runs as a script or
# is loaded by path (tests/test_bench.py). Neither folder holds an mcloss_cuda to shadow.
for _folder in (os.path.join(ROOT, "tests"), HERE):
    if _folder not in sys.path:
        sys.path.insert(0, _folder)

from helpers import counts_of, saved_for_backward  # noqa: E402
from published_formulation import ALPHA, BETA, host_mask_published, published_loss  # noqa: E402
from report import Progress, header_lines, markdown, plot, write_json  # noqa: E402
from timing import Timer, capture_graphs, copy_bandwidth_gbps, device_name  # noqa: E402
from timing import free_memory, peak_extra_bytes, sync  # noqa: E402

ALL_IMPLS = ("fused", "graphed", "reference", "eager", "compiled", "softmax")
CUDA_ONLY = ("graphed",)
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}

# Tolerance on the scalar loss when checking fused against the other implementations.
# eager/compiled run the published ops in the input dtype (a bf16 softmax rounds every
# probability to 8 bits), while fused/reference accumulate in fp32, so half precision needs a
# loose bound; fp32 and fp64 differ only by summation order.
# (A bf16 loss near 15 is itself rounded to a 0.0625 step, 0.4%: allow a few such steps.)
LOSS_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


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
        return tuple(counts_of(self.K, self.cnum, self.C))

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
# the implementations, each on one shape's shared inputs (a CaseRun)


class Impl(NamedTuple):
    loss: Callable[[], torch.Tensor]  # one step's scalar loss, with autograd recording
    backend: str  # the row's `backend` column
    note: str  # shown in the row's `check` column


def published_step(counts, device):
    """The published loss as a function of (x, targets, mask4) -> the scalar loss, mask4 of
    shape (B, C, 1, 1): what eager calls and compiled compiles."""
    published = published_loss(counts, device, alpha=ALPHA, beta=BETA)

    def step(x, targets, mask4):
        return published(x, targets, mask4).loss

    return step


def fused_impl(run):
    x, targets, K, cnum, mask = run.x, run.targets, run.case.K, run.case.cnum, run.mask

    def fused_loss():  # cnum None = the balanced split, as mc takes it
        return mc.mc_loss(x, targets, K, cnum, mask=mask, alpha=ALPHA, beta=BETA).loss

    return Impl(fused_loss, mc.backend(run.device), "")


def graphed_impl(run):
    # fused's step; CaseRun.prepare_graphed captures it in CUDA graphs
    return fused_impl(run)._replace(
        note="fused in a CUDA graph: GPU time without Python/launch overhead"
    )


def reference_impl(run):
    x, targets, K, cnum, mask = run.x, run.targets, run.case.K, run.case.cnum, run.mask
    return Impl(
        lambda: mc.reference.mc_loss(x, targets, K, cnum, mask=mask, alpha=ALPHA, beta=BETA).loss,
        "reference",
        "",
    )


def eager_impl(run):
    x, targets, device, published = run.x, run.targets, run.device, run.published
    counts = run.case.counts

    def eager():
        # the published step: a fresh host-built mask, copied to the device every call
        m = host_mask_published(x.shape[0], counts).to(device=device, dtype=x.dtype)
        return published(x, targets, m)

    return Impl(
        eager, "eager", "" if run.case.uniform else "uneven: padded gather instead of max_pool2d"
    )


def compiled_impl(run):
    # A fresh dynamo state per (shape, dtype): one static-shape compile each, and no
    # recompile limit reached across the cases.
    try:
        torch._dynamo.reset()
        compiled = torch.compile(run.published, dynamic=False)
    except Exception as e:  # surfaces in the row's error at its first call

        def compiled(*_, _err=e):
            raise _err

    x, targets, mask4 = run.x, run.targets, run.mask4
    return Impl(
        lambda: compiled(x, targets, mask4),
        "inductor",
        "" if run.case.uniform else "uneven: padded gather",
    )


# in ALL_IMPLS order (softmax, a bare torch.softmax, has no Impl)
IMPL_BUILDERS = {
    "fused": fused_impl,
    "graphed": graphed_impl,
    "reference": reference_impl,
    "eager": eager_impl,
    "compiled": compiled_impl,
}


# ----------------------------------------------------------------------------------------------
# one (case, dtype): every implementation on the same x, targets and mask


class CaseRun:
    """One shape and dtype: the inputs every implementation shares, the loss each gives on them
    (checked against fused's), and the building of each row's record."""

    def __init__(self, case, dtype, device, copy_gbps, rec_base):
        self.case, self.dtype, self.device = case, dtype, device
        self.copy_gbps, self.rec_base = copy_gbps, rec_base
        gen = torch.Generator().manual_seed(1234)
        B, C, H, W = case.B, case.C, case.H, case.W
        x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float32).to(
            device=device, dtype=dtype
        )
        self.x = x.requires_grad_(True)
        self.targets = torch.randint(0, case.K, (B,), generator=gen).to(device)
        # one mask from the package's sampler (docs/spec.md: drop floor(n_i/2) per group, shared
        # by the batch); fused and reference take it as (C,) bool, compiled as the published
        # (B, C, 1, 1)
        torch.manual_seed(4321)
        self.mask = mc.random_channel_mask(case.K, case.counts, device=device)
        self.mask4 = self.mask.to(dtype).view(1, C, 1, 1).expand(B, C, 1, 1).contiguous()
        self.x_bytes = x.numel() * x.element_size()
        self.published = published_step(case.counts, device)
        self.losses = {}  # name -> float, or the exception its loss raised

    def record(self, impl, backend, note=""):
        r = dict(self.rec_base)
        r.update(
            impl=impl,
            shape=[self.case.B, self.case.C, self.case.H, self.case.W],
            groups=self.case.groups,
            num_classes=self.case.K,
            dtype=str(self.dtype).replace("torch.", ""),
            backend=backend,
            case=self.case.why,
            fwd_ms=None,
            fwd_bwd_ms=None,
            fwd_page_faults=None,
            fwd_bwd_page_faults=None,
            saved_bytes=None,
            saved_pct_of_x=None,
            peak_extra_bytes=None,
            bw_gbps=None,
            bw_share_of_copy=None,
            loss=None,
            loss_abs_diff_vs_fused=None,
            check="",
            note=note,
            error=None,
            feature_bytes=self.x_bytes,
        )
        return r

    def compute_losses(self, impls):
        """Each implementation's loss on the shared inputs, before anything is timed. eager
        takes the shared mask here (mask4) instead of drawing one on the host; compiled and
        graphed are checked after their compile or capture."""
        with torch.no_grad():
            for name, impl in impls.items():
                try:
                    if name == "eager":
                        v = self.published(self.x, self.targets, self.mask4)
                    elif name in ("compiled", "graphed"):
                        continue
                    else:
                        v = impl.loss()
                    self.losses[name] = float(v)
                except Exception as e:  # recorded in the row
                    self.losses[name] = e

    def check(self, name, value, rec):
        """Record name's loss, and flag it if it is not fused's within LOSS_RTOL."""
        rec["loss"] = value
        ref = self.losses.get("fused")
        if name == "fused" or not isinstance(ref, float) or not isinstance(value, float):
            return
        diff = abs(value - ref)
        rec["loss_abs_diff_vs_fused"] = diff
        tol = LOSS_RTOL[self.dtype] * max(1.0, abs(ref))
        if math.isfinite(diff) and diff <= tol:
            rec["check"] = "ok"
        else:
            rec["check"] = f"MISMATCH |d|={diff:.3g}"
            print(
                f"WARNING: {self.case.label()} {self.dtype}: {name} loss {value!r} vs fused "
                f"{ref!r} (|d|={diff:.3g} > tol {tol:.3g})",
                file=sys.stderr,
            )

    def fail(self, rec, name, e):
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        print(f"ERROR in {name} {self.case.label()} {self.dtype}: {rec['error']}", file=sys.stderr)

    def set_bandwidth(self, rec):
        # minimal traffic: read x (forward), read x (backward), write dx
        rec["bw_gbps"] = 3 * self.x_bytes / (rec["fwd_bwd_ms"] * 1e-3) / 1e9
        if self.copy_gbps:
            rec["bw_share_of_copy"] = rec["bw_gbps"] / self.copy_gbps

    # Each prepare_* returns (record, the step to measure memory with or None, timing jobs
    # [((name, "fwd" or "fwd_bwd"), fn)]); a failed preparation leaves the jobs out and the
    # error in the record.

    def prepare_softmax(self):
        rec = self.record("softmax", "torch", "forward only: one softmax over the H*W map")
        xs = self.x.detach().reshape(self.case.B, self.case.C, self.case.H * self.case.W)
        return rec, None, [(("softmax", "fwd"), lambda: torch.softmax(xs, -1))]

    def prepare_graphed(self, impl):
        rec = self.record("graphed", impl.backend, impl.note)
        try:
            graphs = capture_graphs(impl.loss, self.x)
            graphs["fwd"][0].replay()
            sync(self.device)
            self.check("graphed", float(graphs["fwd"][1]), rec)
        except Exception as e:
            self.fail(rec, "graphed", e)
            traceback.print_exc(file=sys.stderr)
            return rec, None, []
        return rec, None, [(("graphed", kind), graph.replay) for kind, (graph, _) in graphs.items()]

    def compile_now(self, fn, rec):
        """Compile forward and backward before timing, so that only warm calls are timed (with
        autograd: a no_grad call would compile a second, inference graph)."""
        t0 = time.perf_counter()
        v = fn()
        self.losses["compiled"] = float(v.detach())
        v.backward()
        self.x.grad = None
        del v
        rec["compile_s"] = round(time.perf_counter() - t0, 2)

    def prepare_autograd(self, name, impl):
        """fused, reference, eager and compiled: the forward, and forward + loss.backward()."""
        rec = self.record(name, impl.backend, impl.note)
        fn, x = impl.loss, self.x
        try:
            if name == "compiled":
                self.compile_now(fn, rec)
            if isinstance(self.losses.get(name), Exception):
                raise self.losses[name]
            self.check(name, self.losses.get(name), rec)
        except Exception as e:
            self.fail(rec, name, e)
            traceback.print_exc(file=sys.stderr)
            return rec, fn, []
        finally:
            x.grad = None

        def fwd_bwd():
            x.grad = None
            fn().backward()

        return rec, fn, [((name, "fwd"), fn), ((name, "fwd_bwd"), fwd_bwd)]

    def prepare(self, name, impls):
        if name == "softmax":
            return self.prepare_softmax()
        if name == "graphed":
            return self.prepare_graphed(impls[name])
        return self.prepare_autograd(name, impls[name])

    def measure_memory(self, rec, fn):
        """What autograd saves for backward; on the GPU also the peak memory of one step and
        the bandwidth its time means."""
        x = self.x
        rec["saved_bytes"] = saved_for_backward(fn, x).nbytes
        rec["saved_pct_of_x"] = 100.0 * rec["saved_bytes"] / self.x_bytes
        if self.device.type == "cuda":

            def step():
                x.grad = None
                fn().backward()  # x.grad (one feature map) is part of the peak

            rec["peak_extra_bytes"] = peak_extra_bytes(step, self.device)
            self.set_bandwidth(rec)

    def finish(self, name, rec, fn, timed):
        """Fill a row with its timings, then measure what timing cannot (done after every row
        is timed, so that these extra runs fall outside the interleaved rounds)."""
        for kind in ("fwd", "fwd_bwd"):
            result = timed.get((name, kind))
            if isinstance(result, Exception):
                if not rec["error"]:
                    self.fail(rec, name, result)
            elif result is not None:
                rec[f"{kind}_ms"], rec[f"{kind}_runs"], rec[f"{kind}_page_faults"] = result
        if name == "graphed" and rec.get("fwd_bwd_ms"):
            self.set_bandwidth(rec)
        if fn is not None and not rec["error"]:
            try:
                self.measure_memory(rec, fn)
            except Exception as e:
                self.fail(rec, name, e)
            finally:
                self.x.grad = None
        return rec


def softmax_after_fused(jobs):
    """The yardstick right after the fused rows: every round then times fused and one softmax
    back to back, so that their ratio (softmax passes) sees the same spell of the machine
    rather than two moments a second or two apart (a shared VM drifts at that scale)."""
    soft = [j for j in jobs if j[0][0] == "softmax"]
    if not soft:
        return jobs
    jobs = [j for j in jobs if j[0][0] != "softmax"]
    at = max((i for i, j in enumerate(jobs) if j[0][0] == "fused"), default=-1) + 1
    return jobs[:at] + soft + jobs[at:]


def add_ratios(records):
    """The speed-up of fused over every row, and each row's time in one softmax pass."""
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


def run_case(case, dtype, names, device, timer, copy_gbps, rec_base, progress):
    """Measure every implementation on one (case, dtype). Returns a list of records."""
    run = CaseRun(case, dtype, device, copy_gbps, rec_base)
    impls = {name: build(run) for name, build in IMPL_BUILDERS.items() if name in names}
    run.compute_losses(impls)
    # prepare every implementation (compile, capture, check), then time them all side by side
    rows, jobs = [], []
    for name in [n for n in ALL_IMPLS if n in names]:
        progress(f"{case.label()} {str(dtype).replace('torch.', '')} {name}")
        rec, fn, row_jobs = run.prepare(name, impls)
        rows.append((name, rec, fn))
        jobs += row_jobs
    timed = timer.side_by_side(softmax_after_fused(jobs))
    run.x.grad = None
    return add_ratios([run.finish(name, rec, fn, timed) for name, rec, fn in rows])


# ----------------------------------------------------------------------------------------------
# the command line


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


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument(
        "--dtype",
        nargs="+",
        metavar="DTYPE",
        help="float32 bfloat16 float16 float64, a comma list, or 'all' "
        "(= float32,bfloat16). Default: float32 with --quick, else all",
    )
    p.add_argument(
        "--quick", action="store_true", help="a few small shapes (~1 min on 2 CPU cores)"
    )
    p.add_argument(
        "--impls", nargs="+", metavar="IMPL", help=f"subset of {','.join(ALL_IMPLS)} (default: all)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="max timed runs per figure (default: 50 on cuda, 20 on cpu, 10 quick)",
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed runs first (default 3 cuda, 2 cpu)"
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="seconds of timed runs per figure before stopping early (min 5 runs)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="interleaved rounds the timed runs of a shape's rows are split into "
        "(default 4; 1 = each row timed in one block)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="start no new (shape, dtype) after this many seconds; the rest is listed as not run",
    )
    p.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of fused's speed-ups")
    return p.parse_args(argv)


def make_timer(args, device):
    """The Timer of --repeats, --warmup, --budget-s and --rounds, or of their device defaults."""
    cuda = device.type == "cuda"
    repeats = args.repeats or (50 if cuda else (10 if args.quick else 20))
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 2)
    budget = (
        args.budget_s
        if args.budget_s is not None
        else (0.3 if cuda else (0.5 if args.quick else 1.0))
    )
    return Timer(device, warmup, repeats, budget, args.rounds)


def plan(quick, dtypes, device):
    """The (case, dtype) pairs to run, in order."""
    cuda = device.type == "cuda"
    cases = QUICK_CASES if quick else (FULL_CASES_CUDA if cuda else FULL_CASES_CPU)
    work = []
    for case in cases:
        for dt in dtypes:
            if (
                not cuda
                and dt in (torch.bfloat16, torch.float16)
                and case.numel > CPU_HALF_MAX_NUMEL
            ):
                continue  # slow on the CPU: keep half-precision shapes modest there
            work.append((case, dt))
    return work


def environment(args, device, timer):
    """What every record carries about the run (and the Markdown header shows)."""
    dev_name = device_name(device)
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    threads = torch.get_num_threads()
    copy_gbps = copy_bandwidth_gbps(device, timer) if device.type == "cuda" else None
    # the CPU figures mean little if other work shares the cores: say how busy they were
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return dict(
        device=args.device,
        device_name=dev_name,
        torch=torch.__version__,
        threads=threads,
        date=now,
        copy_gbps=copy_gbps,
        loadavg_at_start=load,
    )


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    dtypes = parse_dtypes(args.dtype, args.quick)
    names = parse_impls(args.impls, device)
    timer = make_timer(args, device)
    random.seed(0)  # the eager path's host-side mask
    work = plan(args.quick, dtypes, device)
    env = environment(args, device, timer)
    header = header_lines(env, mc.backend(device))

    progress = Progress(len(work) * len(names))
    records, skipped = [], []
    for case, dt in work:
        if args.time_limit is not None and progress.elapsed() > args.time_limit:
            skipped.append(f"{case.label()} {str(dt).replace('torch.', '')}")
            progress.skip(len(names))
            continue
        records += run_case(case, dt, names, device, timer, env["copy_gbps"], env, progress)
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
    print(f"done in {progress.elapsed():.0f}s", file=sys.stderr)
    mismatches = [r for r in records if r["check"].startswith("MISMATCH")]
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())

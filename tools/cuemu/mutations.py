"""Mutations of the real CUDA source, and which emulated run catches each: the evidence that
tests/test_cuda_emulated.py fails when the CUDA code is wrong.

    python tools/cuemu/mutations.py [NAME ...]      # every mutation by default; prints a table

Each mutation edits one line of a copy of csrc/ (in a temporary folder), which build.py builds
in every variant (only the emulated .cu is compiled again), and runs the runs of
tests/test_cuda_emulated.py on it (the forward one on the kernel suites only), each stopping at
its first failure. A run that passes on a mutant has missed it.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO / "tests")]
import build  # noqa: E402
import test_cuda_emulated as suite  # noqa: E402

CU = "csrc/cuda/mcloss_cuda.cu"


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str


MUTATIONS = [
    Mutation(
        "no __syncwarp after the stream kernels' statistics and mask",
        CU,
        "    __syncwarp();\n    body(grp);",
        "    body(grp);",
    ),
    Mutation(
        "no __syncthreads between a tile's load and its statistics",
        CU,
        "  __syncthreads();\n  for (int64_t c = tid; c < s.nch; c += blockDim.x) {\n    int g = 0;",
        "  for (int64_t c = tid; c < s.nch; c += blockDim.x) {\n    int g = 0;",
    ),
    Mutation(
        "no __syncthreads before a tile's S_j",
        CU,
        "its share of S_j for the winner j\n    }\n    __syncthreads();\n",
        "its share of S_j for the winner j\n    }\n",
    ),
    Mutation(
        "a tile's vector tail not loaded",
        CU,
        "  for (int64_t e = head + nv * V::n + threadIdx.x; e < n; e += blockDim.x) put(e, src[e]);\n",
        "",
    ),
    Mutation(
        "16-byte loads from an unaligned start (head ignored)",
        CU,
        "  const int64_t head = ((16 - (reinterpret_cast<uintptr_t>(p) & 15)) & 15) / sizeof(scalar_t);",
        "  const int64_t head = 0;",
    ),
    Mutation(
        "no __syncwarp after S_j", CU, "= s_mine;\n    }\n    __syncwarp();\n", "= s_mine;\n    }\n"
    ),
    Mutation(
        "no __syncthreads before the tail's tree",
        CU,
        "  h_part[tid] = h_sum;\n  __syncthreads();\n",
        "  h_part[tid] = h_sum;\n",
    ),
    Mutation(
        "no __syncthreads in the tail's tree",
        CU,
        "    }\n    __syncthreads();\n  }\n  if (tid == 0) {",
        "    }\n  }\n  if (tid == 0) {",
    ),
    Mutation(
        "groups_ok without its barrier", CU, "return __syncthreads_and(ok) != 0;", "return ok != 0;"
    ),
    Mutation(
        "a warp_sum in a divergent branch (k < HW)",
        CU,
        "const acc part = warp_sum(c == won_by ? share : acc(0));",
        "const acc part = k < HW ? warp_sum(c == won_by ? share : acc(0)) : acc(0);",
    ),
    Mutation(
        "loop bound off by one (k <= HW) in row_stats",
        CU,
        "for (int64_t k = lane; k < HW; k += kWarp) s.add(",
        "for (int64_t k = lane; k <= HW; k += kWarp) s.add(",
    ),
    Mutation(
        "channels_last channel index with the wrong stride (channel_mask)",
        CU,
        "const int64_t c = lay.sC == 1 ? rest % C : rest / HW;",
        "const int64_t c = lay.sC == 1 ? rest % HW : rest / HW;",
    ),
    Mutation(
        "NaN fill of ccmp_backward's dx short (B*K*HW, not B*C*HW)",
        CU,
        "return fill_nan(dx, total / K * C);",
        "return fill_nan(dx, total);",
    ),
    Mutation(
        "out-of-range target check dropped from the logits' gradient",
        "csrc/mcloss_math.h",
        "  if (t < 0 || t >= K) return T(NAN);\n",
        "",
    ),
]


def mutant(m: Mutation, root: Path) -> Path:
    copy = root / "repo"
    shutil.copytree(REPO / "csrc", copy / "csrc")
    path = copy / m.path
    text = path.read_text()
    if text.count(m.old) != 1:
        raise ValueError(f"{m.name}: the line to mutate is not in {m.path} exactly once")
    path.write_text(text.replace(m.old, m.new))
    return copy


def first_failure(out: str) -> str:
    """What a failed run reported first: a sanitizer's report (with the first frames of its
    stacks: the racing or faulting lines), else pytest's first failure."""
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if "WARNING: ThreadSanitizer:" in line or "ERROR: AddressSanitizer:" in line:
            frames = [
                m.group(1)
                for x in lines[i : i + 40]
                if x.lstrip().startswith("#0 ")
                for m in [re.search(r"(\S+\.(?:cu|h|cpp):\d+)", x)]
                if m
            ][:2]
            what = line.split("Sanitizer: ")[-1].split(" (pid")[0].split(" on address")[0]
            return f"{what} at {', '.join(frames)}"[:200]
        if "runtime error:" in line:
            return line.strip()[:200]
    for line in lines:
        if line.startswith(("FAILED", "ERROR")):
            return line.split(" - ")[0][:160]
    tail = [line for line in lines if line.strip()]
    return tail[-1][:160] if tail else ""


def main(names):
    # the forward run on the kernel suites only, as the other schedules (the NaN, opcheck,
    # repeatability and hypothesis sweeps add time, not kernel paths)
    suite.RUNS["forward"] = ("plain", suite.SCHEDULE_SET, suite.RUNS["forward"][2])
    todo = [m for m in MUTATIONS if not names or any(n in m.name for n in names)]
    rows = []
    for m in todo:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            libs = build.build(sorted({v for v, _, _ in suite.RUNS.values()}), mutant(m, tmp))
            with ThreadPoolExecutor(2) as pool:
                results = dict(
                    zip(
                        suite.RUNS,
                        pool.map(
                            lambda name: suite.run_child(
                                name, libs[suite.RUNS[name][0]], tmp, ["-x"]
                            ),
                            suite.RUNS,
                        ),
                    )
                )
        caught = {name: r for name, r in results.items() if r["rc"] != 0}
        rows.append((m.name, caught))
        print(f"\n{m.name}: caught by {', '.join(caught) or 'NOTHING'}", flush=True)
        for name, r in caught.items():
            print(f"  {name}: {first_failure(r['out'])}", flush=True)
    missed = [name for name, caught in rows if not caught]
    print(
        f"\n{len(rows) - len(missed)} of {len(rows)} mutations caught"
        + (f"; missed: {missed}" if missed else "")
    )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

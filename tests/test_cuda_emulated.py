"""The CUDA kernels and host wrappers of csrc/cuda, run on the CPU through the emulator in
tools/cuemu, on the same cases as the CPU kernel tests.

tools/cuemu/build.py compiles this checkout's ``csrc/`` (an edited ``.cu`` needs no reinstall)
into a test-only ``mcloss_cuda._C`` whose CPU kernels are the CUDA host wrappers and kernels,
every CUDA thread a fiber. Each test here runs pytest in a child process with that build loaded
in place of the installed extension (``MCLOSS_EMULATED_EXTENSION``, see conftest.py): the CPU
kernel suites (test_kernels, test_ops, test_nan_inf, test_opcheck, test_registration,
test_repeatability, test_properties, test_features_nd, test_loss_options)
plus tests/cuda_emulated_cases.py, with the threads of a block resumed in forward, reverse and
random order after every synchronisation point; a smaller set under AddressSanitizer + UBSan
and under ThreadSanitizer with blocks on two OS threads. The forward run must launch every
``__global__`` kernel of csrc/cuda.

The children run two at a time (the builds first, all variants in one go): this module is
most of CI's time after the build of the package itself.
"""

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools" / "cuemu"))
import build as cuemu_build  # noqa: E402

# (test_baseline_isa_kernels_match_reference tests the CPU build's other ISA in a child
# process, which imports the installed extension: not the CUDA code)
FULL = [
    "tests/test_kernels.py",
    "tests/test_ops.py",
    "tests/test_nan_inf.py",
    "tests/test_opcheck.py",
    "tests/test_registration.py",
    "tests/test_repeatability.py",
    "tests/test_properties.py",
    "tests/cuda_emulated_cases.py",
    "tests/test_features_nd.py",
    "tests/test_loss_options.py",
    "-k",
    "not baseline_isa",
]
# Where a run is repeated (other schedules, sanitizers), it leaves out what adds no kernel path:
# the strided layouts (copied to contiguous before any kernel) and the NaN, opcheck,
# repeatability and hypothesis sweeps.
NOT_STRIDED = "not sliced and not transposed and not baseline_isa"
# Of the repeatability suite, only the repeat of every fused op on one fixed problem
# (test_bitwise_repeatable); of the registration checks, the dispatcher's view of the build
# (the opcheck coverage check is about test_opcheck's samples, and runs in FULL).
SCHEDULE_SET = [
    "tests/test_kernels.py",
    "tests/test_ops.py",
    "tests/test_registration.py",
    "tests/test_repeatability.py",
    "tests/cuda_emulated_cases.py",
    "-k",
    f"{NOT_STRIDED} and not test_opcheck_covers_every_op and "
    "(not test_repeatability or test_bitwise_repeatable)",
]
# every kernel of every op, fp32 and bf16, on the maps that are not large; not the trap cases:
# under the preloaded ASan runtime its __cxa_throw interceptor finds no real __cxa_throw, so an
# exception out of a launch aborts the process (they run in the plain builds)
ASAN_SET = [
    "tests/test_kernels.py",
    "tests/test_ops.py",
    "tests/cuda_emulated_cases.py",
    "-k",
    f"{NOT_STRIDED} and not large_ and not float16 and not float64 and not traps and ("
    "cuda_emulated_cases or (test_forward_backward and ("
    "TestSpatialSoftmax or TestCcmp or TestMcLoss or (TestChannelMask and not cnum64))))",
]
# ThreadSanitizer costs about a second a launch, and more per block: a few shapes of each op
# (the 700-row tail case, 1400 tiles a pass, takes minutes there; the 900-group one covers the
# tail's tree across all its threads)
TSAN_SET = [
    "tests/test_kernels.py",
    "tests/test_ops.py",
    "tests/cuda_emulated_cases.py",
    "-k",
    f"{NOT_STRIDED} and (many_blocks or (tail_over_more_groups and dtype0) or "
    "(float32 and test_forward_backward and ("
    "(TestMcLoss and (uniform_14x14 or uneven_5x9 or map_1x1)) or "
    "((TestSpatialSoftmax or TestCcmp or TestChannelMask) and uneven_5x9))))",
]

# the fewest tests each run must pass (about half of what each selects today): a renamed test
# or parameter must not let a -k selection run empty
MIN_PASSED = {"forward": 1000, "asan_ubsan": 75, "tsan": 8, "reverse": 500, "random": 500}

RUNS = {  # name: (variant, pytest arguments, extra environment); the longest first
    "forward": ("plain", FULL, {"CUEMU_SCHEDULE": "forward"}),
    "asan_ubsan": (
        "asan",
        ASAN_SET,
        {
            "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
            "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
        },
    ),
    "tsan": (
        "tsan",
        TSAN_SET,
        {
            "CUEMU_THREADS": "2",
            "CUEMU_SCHEDULE": "random",
            "TSAN_OPTIONS": "halt_on_error=1:report_signal_unsafe=0",
        },
    ),
    "reverse": ("plain", SCHEDULE_SET, {"CUEMU_SCHEDULE": "reverse"}),
    "random": ("plain", SCHEDULE_SET, {"CUEMU_SCHEDULE": "random"}),
}
TIMEOUT = 900


def global_kernels():
    """Names of the __global__ functions of csrc/cuda (every one, or an AssertionError)."""
    pattern = re.compile(
        r"__global__\s+(?:(?:void|static|inline|__launch_bounds__\s*"
        r"\((?:[^()]|\([^()]*\))*\))\s+)*([A-Za-z_]\w*)\s*\("
    )
    names = set()
    for cu in (REPO / "csrc" / "cuda").glob("*.cu"):
        code = cuemu_build.code_only(cu.read_text())
        found = pattern.findall(code)
        assert len(found) == code.count("__global__"), (
            f"{cu.name}: {code.count('__global__')} __global__ but only {found} parsed"
        )
        names.update(found)
    return names


def run_child(name, lib, tmp, extra_args=()):
    variant, args, extra = RUNS[name]
    log = tmp / f"{name}.launches"
    env = dict(
        os.environ,
        MCLOSS_EMULATED_EXTENSION=str(lib),
        MCLOSS_EMULATED_LAUNCH_LOG=str(log),
        PYTHONPATH=str(REPO),
        **extra,
    )
    env.pop("PYTHONSAFEPATH", None)
    seed = int.from_bytes(os.urandom(4), "little")
    env.setdefault("CUEMU_SEED", str(seed))
    preload = cuemu_build.sanitizer_preload(variant)
    if preload:
        env["LD_PRELOAD"] = preload
    # --capture=sys: a sanitizer's report is written to file descriptor 2 by a process that
    # then exits at once; pytest's default fd capture would swallow it
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--capture=sys",
        "--maxfail=25",
        *extra_args,
        *args,
    ]
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT
        )
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = f"{e.stdout or ''}{e.stderr or ''}", "timeout"
    counts = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            kernel, n = line.split()
            counts[kernel] = int(n)
    return {
        "rc": rc,
        "out": out,
        "launches": counts,
        "cmd": " ".join(cmd[3:]),
        "seed": env["CUEMU_SEED"],
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every child run, started two at a time once the emulated builds exist."""
    libs = cuemu_build.build(sorted({variant for variant, _, _ in RUNS.values()}), REPO)
    tmp = tmp_path_factory.mktemp("cuemu")
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {name: pool.submit(run_child, name, libs[RUNS[name][0]], tmp) for name in RUNS}
    yield futures
    pool.shutdown(cancel_futures=True)


def check_run(res, name):
    summary = res["out"].strip().splitlines()[-1] if res["out"].strip() else ""
    assert res["rc"] == 0, (
        f"emulated run {name!r} (CUEMU_SEED={res['seed']}: {res['cmd']}) "
        f"failed with {res['rc']}: {summary}\n{res['out'][-12000:]}"
    )
    passed = re.search(r"(\d+) passed", summary)
    assert passed and "failed" not in summary, summary
    assert int(passed.group(1)) >= MIN_PASSED[name], f"{name}: too few tests ran: {summary}"


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random"])
def test_cuda_kernels_under_schedule(runs, schedule):
    check_run(runs[schedule].result(), schedule)


def test_every_cuda_kernel_is_launched(runs):
    launched = runs["forward"].result()["launches"]
    kernels = global_kernels()
    assert kernels, "no __global__ kernel found in csrc/cuda"
    never = sorted(k for k in kernels if not launched.get(k))
    assert not never, (
        f"kernels never launched by the emulated suite: {never} (launched: {launched})"
    )


def test_cuda_kernels_under_asan_and_ubsan(runs):
    check_run(runs["asan_ubsan"].result(), "asan_ubsan")


def test_cuda_kernels_under_tsan(runs):
    check_run(runs["tsan"].result(), "tsan")

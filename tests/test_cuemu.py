"""The CUDA emulator itself (tools/cuemu/cuemu.h): the kernels of tools/cuemu/selftest/kernels.cu,
compiled with g++ as plain C++ and with AddressSanitizer + UBSan and ThreadSanitizer. Correct
kernels (dynamic shared memory, 16-byte vector loads, votes, atomics) give the right numbers
under every schedule; each broken one is caught by the emulator, a schedule or a sanitizer.
"""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CUEMU = REPO / "tools" / "cuemu"
sys.path.insert(0, str(CUEMU))
import build as cuemu_build  # noqa: E402

SCHEDULES = ["forward", "reverse", "random"]
VARIANT_FLAGS = cuemu_build.VARIANTS  # the flags the project's emulated builds use


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuemu_selftest")
    source = CUEMU / "selftest" / "kernels.cu"
    text, _ = cuemu_build.emulated_source(source.read_text(), register_for_cpu=False)
    rewritten = out / "kernels.emu.cpp"
    rewritten.write_text(f'#line 1 "{source}"\n' + text)

    def compile_one(variant):
        exe = out / f"kernels_{variant}"
        cmd = [
            cuemu_build.compiler(),
            "-std=c++20",
            "-g1",
            *VARIANT_FLAGS[variant],
            f"-I{CUEMU}",
            str(rewritten),
            "-o",
            str(exe),
            "-pthread",
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-4000:]
        return variant, exe

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(compile_one, VARIANT_FLAGS))


def run(programs, variant, case, **env):
    if variant == "asan":
        env.setdefault("ASAN_OPTIONS", "detect_leaks=0")  # (the programs never free)
    res = subprocess.run(
        [str(programs[variant]), case],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, **env),
    )
    return res.returncode, res.stdout + res.stderr


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("case", ["block_sums", "scale4", "count_positive"])
def test_correct_kernels(programs, case, schedule):
    for variant in ("plain", "asan"):
        rc, out = run(programs, variant, case, CUEMU_SCHEDULE=schedule)
        assert rc == 0 and f"{case}: ok" in out, (variant, out)
    rc, out = run(programs, "tsan", case, CUEMU_SCHEDULE=schedule, CUEMU_THREADS="2")
    assert rc == 0 and f"{case}: ok" in out and "ThreadSanitizer" not in out, out


@pytest.mark.parametrize(
    "case, message",
    [
        ("divergent_shfl", "exited while lanes of its warp wait"),
        ("read_outside_mask", "not in the mask"),
        ("bad_config", "invalid launch configuration"),
    ],
)
def test_emulator_reports(programs, case, message):
    rc, out = run(programs, "plain", case)
    assert rc == 0 and f"{case}: caught:" in out and message in out, out


@pytest.mark.parametrize("case", ["early_exit_barrier", "divergent_barrier"])
def test_strict_mode_reports_barriers_not_all_threads_reach(programs, case):
    # Without CUEMU_STRICT a barrier completes once every thread that has not exited is there,
    # as on current GPUs; with it, a thread that exits or skips it is an error.
    rc, out = run(programs, "plain", case)
    if case == "early_exit_barrier":
        assert f"{case}: ok" in out, out
    rc, out = run(programs, "plain", case, CUEMU_STRICT="1")
    assert f"{case}: caught: cuemu: CUEMU_STRICT" in out, out


@pytest.mark.parametrize(
    "case, schedule", [("missing_barrier", "forward"), ("missing_syncwarp", "reverse")]
)
def test_schedule_exposes_missing_sync(programs, case, schedule):
    rc, out = run(programs, "plain", case, CUEMU_SCHEDULE=schedule)
    assert f"{case}: wrong" in out, out
    rc, out = run(programs, "tsan", case)
    assert "ThreadSanitizer: data race" in out, out


def test_tsan_sees_blocks_racing(programs):
    rc, out = run(programs, "tsan", "blocks_write_same", CUEMU_THREADS="2")
    assert "ThreadSanitizer: data race" in out, out
    rc, out = run(programs, "tsan", "blocks_write_same", CUEMU_THREADS="1")
    assert "ThreadSanitizer" not in out, out  # blocks one after the other are ordered


@pytest.mark.parametrize(
    "case, message",
    [
        ("oob_global", "heap-buffer-overflow"),
        ("oob_shared", "out of bounds"),
        ("misaligned_float4", "misaligned address"),
    ],
)
def test_sanitizers_catch_memory_errors(programs, case, message):
    rc, out = run(programs, "asan", case)
    assert rc != 0 and message in out, out


def test_uninitialised_shared_memory_reads_as_nan(programs):
    rc, out = run(programs, "plain", "uninitialised_shared")
    assert "uninitialised_shared: wrong 32" in out, out


@pytest.mark.parametrize(
    "text, expected",
    [
        ("k<<<g, b>>>(x);", '::cuemu::launcher("k", k, g, b)(x);'),
        (
            "ns::k<float><<<blocks_for(n, 4), 128, 0, s>>>(a, b);",
            '::cuemu::launcher("k", ns::k<float>, blocks_for(n, 4), 128, 0, s)(a, b);',
        ),
        (
            "k<T, Pair<int, float>> <<<1, 32>>> (y);",
            '::cuemu::launcher("k", k<T, Pair<int, float>>, 1, 32)(y);',
        ),
    ],
)
def test_launch_rewrite(text, expected):
    assert cuemu_build.rewrite_launches(text)[0] == expected


def test_launch_rewrite_leaves_comments_and_strings():
    text = '// as in k<<<grid, 256>>>\nconst char* s = "a<<<b>>>(";\nk<<<1, 2>>>(x);'
    out, names = cuemu_build.rewrite_launches(text)
    assert out == (
        '// as in k<<<grid, 256>>>\nconst char* s = "a<<<b>>>(";\n'
        '::cuemu::launcher("k", k, 1, 2)(x);'
    ) and names == ["k"]


def test_dynamic_shared_rewrite():
    text, names = cuemu_build.emulated_source(
        "__global__ void k() {\n  extern __shared__ float buf[];\n"
        "  extern __shared__ __align__(16) unsigned char raw[];\n}\n"
        "void f() { k<<<1, 32, 128>>>(); }\nTORCH_LIBRARY_IMPL(mcloss_cuda, CUDA, m) {}"
    )
    assert "float* const buf = static_cast<float*>(::cuemu::dynamic_shared());" in text
    assert "unsigned char* const raw = static_cast<unsigned char*>(" in text
    assert "TORCH_LIBRARY_IMPL(mcloss_cuda, CPU," in text and names == ["k"]
    with pytest.raises(ValueError, match="namespace scope"):
        cuemu_build.emulated_source("extern __shared__ float g[];", register_for_cpu=False)
    with pytest.raises(ValueError, match="register for CPU"):
        cuemu_build.emulated_source("void f() { k<<<1, 32>>>(); }")


def test_host_headers_skip_conditional_and_device_side_includes(tmp_path):
    (tmp_path / "local.h").write_text("#pragma once\n#include <c10/util/Half.h>\n")
    cu = tmp_path / "k.cu"
    cu.write_text(
        "#include <ATen/core/Tensor.h>\n#include <ATen/cuda/CUDAContext.h>\n"
        "#include <c10/cuda/CUDAGuard.h>\n// #include <torch/nothing.h>\n"
        "#ifdef USE_ROCM\n#include <ATen/hip/HIPContext.h>\n#endif\n"
        '#include "local.h"\n'
    )
    # a device-side header is left out, but where the emulator stubs it (c10/cuda/CUDAGuard.h),
    # the stub's own host headers come first like the others
    assert cuemu_build.host_headers(cu, [tmp_path]) == [
        "ATen/core/Tensor.h",
        "c10/core/Device.h",
        "c10/util/Half.h",
    ]


def test_every_mutation_finds_its_line():
    """tools/cuemu/mutations.py edits the CUDA source by exact text: each line it mutates must
    still be there exactly once, or the mutation table tests nothing (it is too slow for CI, so
    this is what keeps it in step with the source)."""
    import mutations

    stale = [m.name for m in mutations.MUTATIONS if (REPO / m.path).read_text().count(m.old) != 1]
    assert not stale, f"mutations whose line is not in the source exactly once: {stale}"

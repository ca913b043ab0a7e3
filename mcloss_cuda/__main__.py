"""``python -m mcloss_cuda``: what a bug report needs, in one go.

Versions, how the extension was built and whether it loaded (and why not), the CUDA toolkit,
the environment variables that change the build or the run, and ``mc.backend`` for every
visible device. Every section reports its own failure instead of stopping the report, and the
exit status is 0 whenever the report was printed.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

import torch

import mcloss_cuda as mc
from mcloss_cuda import _diagnostics, _env, _ops, _toolkit

# what changes how mcloss_cuda or torch builds or runs; every MCLOSS_* is shown too
ENV_VARS = (
    "CUDA_HOME",
    "CUDA_PATH",
    "CUDA_VISIBLE_DEVICES",
    "TORCH_CUDA_ARCH_LIST",
    "MAX_JOBS",
    "CC",
    "CXX",
    "NVCC_CCBIN",
    "CUDAHOSTCXX",
    "LD_LIBRARY_PATH",
    "PYTHONPATH",
    "OMP_NUM_THREADS",
    "THP_MEM_ALLOC_ENABLE",
    "CUDA_LAUNCH_BLOCKING",
    "PYTORCH_CUDA_ALLOC_CONF",
    "PYTORCH_NO_CUDA_MEMORY_CACHING",
)


def _line(name, value):
    print(f"  {name + ':':<24} {value}")


def _section(title, body):
    print(title)
    try:
        body()
    except Exception as e:  # a broken install is what this is for: report and go on
        _line("error", f"{type(e).__name__}: {e}")
    print()


def _driver_version():
    # from the driver library itself: no CUDA context is created
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return "present, but cuDriverGetVersion failed"
    except (OSError, AttributeError) as e:
        return f"none found ({e})"
    return f"{version.value // 1000}.{version.value % 1000 // 10} (supports CUDA up to it)"


def _versions():
    _line("mcloss_cuda", f"{mc.__version__} ({os.path.dirname(mc.__file__)})")
    _line("python", f"{platform.python_version()} ({sys.executable})")
    _line("platform", platform.platform())
    _line("torch", f"{torch.__version__} ({os.path.dirname(torch.__file__)})")
    _line("torch CUDA runtime", torch.version.cuda or "none (a CPU-only torch)")
    _line("torch C++11 ABI", torch._C._GLIBCXX_USE_CXX11_ABI)
    if torch.version.cuda:
        _line("CUDA driver", _driver_version())
    _line("C++ compiler now", _toolkit.cxx_version())


def _extension():
    info = _diagnostics.build_info()
    if _ops.AVAILABLE:
        _line("loaded", f"yes ({_ops._C.__file__})")
        _line("CUDA kernels compiled", "yes" if mc.built_with_cuda() else "no")
    else:
        why, fix = _diagnostics.explain_load_error(_ops.LOAD_ERROR)
        _line("loaded", f"no: {why}")
        _line("fix", fix)
    if info is None:
        _line("build info", "none (mcloss_cuda/_build_info.py is written by a build)")
        return
    kernels = "C++ and CUDA" if info.get("WITH_CUDA") else "C++ only"
    _line(
        "built as",
        f"mcloss_cuda {info.get('VERSION')}, MCLOSS_BUILD={info.get('BUILD_MODE')}, {kernels}",
    )
    same = info.get("TORCH_VERSION") == torch.__version__
    _line(
        "built against torch",
        f"{info.get('TORCH_VERSION')} ({info.get('TORCH_PATH')})"
        + ("" if same else f"  <- NOT the running torch {torch.__version__}"),
    )
    _line("built with Python", info.get("PYTHON"))
    _line("built with compiler", info.get("CXX"))
    if info.get("WITH_CUDA"):
        _line("built with toolkit", f"{info.get('CUDA_HOME')} ({info.get('NVCC')})")
        _line("TORCH_CUDA_ARCH_LIST", info.get("TORCH_CUDA_ARCH_LIST") or "(unset: visible GPUs)")
        _line("GPU archs compiled", " ".join(info.get("CUDA_ARCHS") or []) or "unknown")
    else:
        _line("GPU archs compiled", "none")


def _toolkit_now():
    root = _toolkit.find_cuda_toolkit()
    _line("CUDA_HOME", os.environ.get("CUDA_HOME") or "(unset)")
    _line("toolkit found", root or "none (a rebuild would compile the CPU kernels only)")
    if root:
        _line("nvcc", _toolkit.nvcc_version(root) or "does not run")


def _environment():
    names = sorted(n for n in os.environ if n.startswith("MCLOSS_")) + list(ENV_VARS)
    shown = [n for n in names if n in os.environ]
    for name in shown:
        _line(name, os.environ[name])
    if not shown:
        _line("(none set)", "")


def _cpu_isa():
    # what csrc/cpu/mcloss_cpu.cpp's use_avx2() picks: AVX2+FMA kernels exist for x86-64 only
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"portable C++ ({platform.machine()})"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next(
                (line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []
            )
    except OSError:
        return "unknown"
    if _env.baseline_cpu_isa():
        return "baseline x86-64 (MCLOSS_CPU_ISA=default)"
    return "AVX2+FMA" if {"avx2", "fma"} <= set(flags) else "baseline x86-64"


def _devices():
    _line("cpu", f"backend {mc.backend('cpu')}, kernels for {_cpu_isa()}")
    if not torch.cuda.is_available():
        _line("cuda", "no device visible" + ("" if torch.version.cuda else " (CPU-only torch)"))
        return
    archs = _diagnostics.compiled_archs()
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        if not mc.built_with_cuda():
            compiled = ""
        elif _diagnostics.arch_runs_on(archs, (major, minor)):
            compiled = ", among the compiled archs"
        else:
            compiled = ", NOT among the compiled archs"
        _line(
            f"cuda:{i}",
            f"backend {mc.backend(f'cuda:{i}')}, {torch.cuda.get_device_name(i)}, "
            f"sm_{major}{minor}{compiled}",
        )


def main():
    print(f"mcloss_cuda {mc.__version__}: environment report (paste it into a bug report)\n")
    _section("Versions", _versions)
    _section("Extension mcloss_cuda._C", _extension)
    _section("CUDA toolkit (for a rebuild)", _toolkit_now)
    _section("Environment variables", _environment)
    _section("Devices (mc.backend)", _devices)
    return 0


if __name__ == "__main__":
    sys.exit(main())

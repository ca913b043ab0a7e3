"""Build mcloss_cuda and its extension module ``mcloss_cuda._C``.

The extension is compiled against the torch that is already installed, so build without
isolation: ``pip install --no-build-isolation .``

``MCLOSS_BUILD`` picks what is compiled:
  auto (default)  CUDA sources too when torch is a CUDA build and a CUDA toolkit is found
                  (no GPU needed), otherwise the C++ CPU kernels only;
  cuda            CUDA sources too, and fail if that is impossible;
  cpu             the C++ CPU kernels only.
``TORCH_CUDA_ARCH_LIST`` is honoured; without it and without a visible GPU we compile for
sm_80 and sm_90 (plus PTX for newer GPUs).
"""

import glob
import os
import re
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _is_toolkit_root(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and (
        glob.glob(os.path.join(path, "lib64", "libcudart.so*"))
        or glob.glob(os.path.join(path, "lib", "libcudart.so*"))
        or glob.glob(os.path.join(path, "targets", "*", "lib", "libcudart.so*"))
    )


def _toolkit_candidates():
    """Places a CUDA toolkit may live, best guess first.

    torch guesses the root as the parent of the folder holding the first ``nvcc`` on PATH. That
    is wrong when that ``nvcc`` is a symlink or a wrapper script (``exec /opt/cuda-x/bin/nvcc``),
    and the link then fails with ``cannot find -lcudart``; so we follow links and read wrappers.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            yield os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        yield os.path.dirname(os.path.dirname(real))
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
        except OSError:
            head = b""
        if head.startswith(b"#!"):
            for m in re.finditer(rb"(/[^\s'\"]+)/bin/nvcc\b", head):
                yield m.group(1).decode()
    yield "/usr/local/cuda"
    yield from sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    yield "/opt/cuda"


def _find_cuda_toolkit():
    for root in _toolkit_candidates():
        if _is_toolkit_root(root):
            return os.path.realpath(root)
    return None


def _configure():
    mode = os.environ.get("MCLOSS_BUILD", "auto").strip().lower()
    if mode not in ("auto", "cuda", "cpu"):
        raise SystemExit(f"MCLOSS_BUILD must be auto, cuda or cpu, got {mode!r}")
    toolkit = _find_cuda_toolkit() if mode != "cpu" else None
    if toolkit:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
        os.environ["CUDA_HOME"] = toolkit
    import torch

    with_cuda = mode != "cpu" and torch.version.cuda is not None and toolkit is not None
    if mode == "cuda" and not with_cuda:
        why = "torch is a CPU-only build" if torch.version.cuda is None else "no CUDA toolkit found"
        raise SystemExit(f"MCLOSS_BUILD=cuda but {why}; set CUDA_HOME to the toolkit root")
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    return with_cuda


def _torch_uses_openmp():
    import sys

    import torch

    return sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info() \
        and "OpenMP not found" not in torch.__config__.parallel_info()


def _extensions(with_cuda):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp"))
                     + glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
                     + glob.glob(os.path.join("csrc", "autograd", "*.cpp")))
    # -fno-trapping-math lets GCC if-convert and vectorise the select-heavy loops (exp_f32,
    # the first-max rule); no FP exception flags are relied on, NaN and Inf behave the same.
    # -Wno-psabi: the baseline (pre-AVX) copy of the kernels passes 8-float vectors between
    # inline functions, which GCC flags as an ABI change; nothing crosses a library boundary.
    cxx = ["-O3", "-fno-trapping-math", "-Wno-psabi"]
    link = []
    if _torch_uses_openmp():
        # at::parallel_for is inline: without -fopenmp our loops would run on one thread. The
        # runtime is the libgomp torch already loaded (same soname), not a second one.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        return [
            CUDAExtension(
                "mcloss_cuda._C",
                sources,
                include_dirs=[os.path.join(HERE, "csrc")],
                define_macros=[("MCLOSS_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
                extra_link_args=link,
            )
        ]
    return [
        CppExtension(
            "mcloss_cuda._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    ]


def main():
    with_cuda = _configure()  # first: it sets CUDA_HOME, which cpp_extension reads on import
    from torch.utils.cpp_extension import BuildExtension

    print(f"mcloss_cuda: building {'C++ and CUDA' if with_cuda else 'C++ (CPU only)'} kernels"
          + (f", CUDA_HOME={os.environ['CUDA_HOME']}, arch={os.environ.get('TORCH_CUDA_ARCH_LIST', 'auto')}"
             if with_cuda else ""))
    setup(
        name="mcloss_cuda",
        version="0.1.0",
        description="Mutual-Channel Loss (MC-Loss) with fused C++/CUDA kernels for PyTorch",
        packages=find_packages(include=["mcloss_cuda", "mcloss_cuda.*"]),
        ext_modules=_extensions(with_cuda),
        cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
        python_requires=">=3.9",
        install_requires=["torch>=2.4"],
        extras_require={"test": ["pytest", "hypothesis", "numpy", "matplotlib"],
                        "bench": ["matplotlib", "numpy"]},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()

"""Finding the CUDA toolkit: used by setup.py at build time (loaded from its file, without
importing the package) and by ``python -m mcloss_cuda``. No torch import here."""

import glob
import os
import re
import shutil
import subprocess


def is_toolkit_root(path):
    return (
        bool(path)
        and os.path.isfile(os.path.join(path, "bin", "nvcc"))
        and bool(
            glob.glob(os.path.join(path, "lib64", "libcudart.so*"))
            or glob.glob(os.path.join(path, "lib", "libcudart.so*"))
            or glob.glob(os.path.join(path, "targets", "*", "lib", "libcudart.so*"))
        )
    )


def toolkit_candidates():
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


def find_cuda_toolkit():
    """The root of the first usable CUDA toolkit, or None."""
    for root in toolkit_candidates():
        if is_toolkit_root(root):
            return os.path.realpath(root)
    return None


def first_line_of(cmd, match=None):
    """The first output line of ``cmd`` (containing ``match`` if given), or None."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    if match is not None:
        lines = [line for line in lines if match in line]
    return lines[0] if lines else None


def nvcc_version(root):
    """e.g. "Cuda compilation tools, release 13.0, V13.0.88", or None."""
    if not root:
        return None
    return first_line_of([os.path.join(root, "bin", "nvcc"), "--version"], match="release")


def cxx_version(cxx=None):
    """The C++ compiler torch.utils.cpp_extension uses ($CXX, else c++) and its version line."""
    cxx = cxx or os.environ.get("CXX") or "c++"
    return f"{cxx}: {first_line_of([cxx, '--version']) or 'not found'}"

"""The environment variables the Python package reads at run time, read here and nowhere else
(the README's table lists every MCLOSS_* variable: these, the build's and the tests'). Each is
read at the call, so setting one in a running process takes effect at the next call."""

from __future__ import annotations

import os


def reference_forced() -> bool:
    """MCLOSS_BACKEND=reference."""
    return os.environ.get("MCLOSS_BACKEND", "").strip().lower() == "reference"


def sync_checks() -> bool:
    """MCLOSS_SYNC_CHECKS set to anything but '' or '0'."""
    return os.environ.get("MCLOSS_SYNC_CHECKS", "0") not in ("", "0")


def baseline_cpu_isa() -> bool:
    """MCLOSS_CPU_ISA=default, as the compiled CPU kernels read it."""
    return os.environ.get("MCLOSS_CPU_ISA") == "default"

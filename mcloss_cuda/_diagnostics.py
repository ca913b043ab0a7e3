"""When the compiled extension cannot serve: why, and the command that fixes it.

Used by _ops.py (the load-failure warning, the check that a CUDA device's architecture was
compiled for) and by ``python -m mcloss_cuda``. The facts of the build come from
``_build_info.py``, which setup.py writes when it compiles the extension.
"""

from __future__ import annotations

import importlib.util
import os
import re
import warnings

import torch

from . import _env

# From the source tree (or with the sdist's path instead of "."). --no-cache-dir: a wheel pip
# built and cached from an sdist against the old torch would otherwise be installed again.
REBUILD = "pip install --force-reinstall --no-deps --no-cache-dir ."


def build_info():
    """What setup.py recorded about the build, as a dict, or None for a copy never built."""
    try:
        from . import _build_info
    except ImportError:
        return None
    return {k: v for k, v in vars(_build_info).items() if k.isupper()}


def reference_forced():
    return _env.reference_forced()


def explain_load_error(error):
    """(why, fix): why ``mcloss_cuda._C`` did not load, and the command that fixes it."""
    info = build_info()
    built_torch = info and info.get("TORCH_VERSION")
    text = str(error)
    if importlib.util.find_spec(f"{__package__}._C") is None:
        tree = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.exists(os.path.join(tree, "setup.py")):
            return (
                f"this is the unbuilt source tree at {tree} (Python looks in the current "
                "directory first), which has no compiled extension",
                "run from another directory to use the installed copy, or build in place "
                "with `python setup.py build_ext --inplace`",
            )
        return (
            "the compiled extension mcloss_cuda._C is not there (a copy of the sources that "
            "was never built, or a build that compiled nothing)",
            f"build it: `{REBUILD}` from the source tree (`pip install -v .` shows the "
            "compiler's output)",
        )
    if built_torch and built_torch != torch.__version__:
        why = (
            f"it was built against torch {built_torch} but this is torch "
            f"{torch.__version__} ({text})"
        )
        return why, f"rebuild it against this torch: `{REBUILD}` from the source tree"
    if "undefined symbol" in text or "symbol not found" in text:
        why = (
            "a symbol it needs is missing from the torch it runs with, usually because it "
            f"was built against another torch build ({text})"
        )
        return why, f"rebuild it against this torch: `{REBUILD}` from the source tree"
    if "cannot open shared object file" in text:
        why = f"a library it links against cannot be found ({text})"
        return why, (
            "make that library findable (for a CUDA build, the CUDA runtime torch "
            f"ships with, or LD_LIBRARY_PATH), or rebuild: `{REBUILD}`"
        )
    return (
        f"{type(error).__name__}: {text}",
        f"rebuild it: `{REBUILD}` from the source tree, and report the output of "
        "`python -m mcloss_cuda` if that does not help",
    )


def warn_load_failure(error):
    """The one warning of a failed load (none when the reference path was asked for)."""
    if reference_forced():
        return
    why, fix = explain_load_error(error)
    warnings.warn(
        f"mcloss_cuda: the fused kernels are not available, so the pure-PyTorch "
        f"reference runs instead (same results, slower): {why}. To fix: {fix}.",
        RuntimeWarning,
        stacklevel=3,
    )


# ---- GPU architectures


def _parse_arch(arch):
    """ "sm_86" -> ("sm", 8, 6, ""); "compute_90a" -> ("compute", 9, 0, "a")."""
    m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([a-z]?)", arch)
    if not m:
        return None
    return m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)


def arch_runs_on(archs, capability):
    """Whether code compiled for ``archs`` can run on a device of compute ``capability``.

    A cubin (sm_XY) runs on devices of the same major version and minor >= Y; PTX
    (compute_XY) is compiled by the driver for any device >= X.Y. Arch-specific targets
    ("a": sm_90a) run on exactly that device. An empty list (archs not recorded) counts as yes.
    """
    if not archs:
        return True
    major, minor = capability
    for arch in archs:
        parsed = _parse_arch(arch)
        if parsed is None:
            continue
        kind, a_major, a_minor, suffix = parsed
        if suffix == "a":
            if (a_major, a_minor) == (major, minor):
                return True
        elif kind == "sm":
            if a_major == major and a_minor <= minor:
                return True
        elif (a_major, a_minor) <= (major, minor):
            return True
    return False


def compiled_archs():
    info = build_info()
    return list(info.get("CUDA_ARCHS") or []) if info else []


_cuda_device_ok: dict = {}


def cuda_device_ok(device):
    """Whether the compiled CUDA kernels can run on ``device``; warns once per device if not.
    Without a usable GPU there is nothing to run on, and nothing to warn about: True."""
    if not torch.cuda.is_available():
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    ok = _cuda_device_ok.get(index)
    if ok is not None:
        return ok
    if torch.compiler.is_compiling():
        # no warning or device query inside a traced function: the check is made at the first
        # eager call on that device
        return True
    archs = compiled_archs()
    capability = torch.cuda.get_device_capability(index)
    ok = arch_runs_on(archs, capability)
    if not ok and not reference_forced():
        name = torch.cuda.get_device_name(index)
        sm = f"{capability[0]}.{capability[1]}"
        warnings.warn(
            f"mcloss_cuda: the CUDA kernels were compiled for {', '.join(archs)}, none of which "
            f"runs on cuda:{index} ({name}, compute capability {sm}), so the pure-PyTorch "
            f"reference runs there instead (slower). To fix: rebuild for it, "
            f'`TORCH_CUDA_ARCH_LIST="{sm}" {REBUILD}` from the source tree.',
            RuntimeWarning,
            stacklevel=4,
        )
    _cuda_device_ok[index] = ok
    return ok

"""PEP 517 build backend: setuptools' own, building against the target environment's torch.

pip builds a project in an isolated environment holding only its build requirements. Were
torch among them, pip would download a second torch into that environment (whatever version
the index has) and the extension would be compiled against it, then fail to load next to the
torch it is installed with. So torch is not a build requirement: before compiling, the hooks
ask the interpreter pip installs for (``sys.executable``, run without pip's isolation) where
its torch lives, and add that directory (and the rest of its ``sys.path``) at the end of the
build's ``sys.path``.

``MCLOSS_TORCH_PYTHON=/path/to/python`` builds against that interpreter's torch instead.
"""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (the hooks not overridden below)

# run by the target interpreter: where its torch is, without importing it (that takes seconds)
_PROBE = r"""
import importlib.util, json, os, sys, sysconfig
spec = importlib.util.find_spec("torch")
found = spec is not None and spec.origin is not None
print(json.dumps({
    "python": sys.executable,
    "origin": spec.origin if found else None,
    "site": os.path.dirname(os.path.dirname(spec.origin)) if found else None,
    "scripts": sysconfig.get_path("scripts"),
    "path": [p for p in sys.path if p],
}))
"""


def _is_pip_build_env(path):
    return any(part.startswith("pip-build-env-") for part in os.path.normpath(path).split(os.sep))


def _pip_isolated():
    entries = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    return any(_is_pip_build_env(p) for p in entries if p)


def _environment_without_isolation():
    """os.environ less what pip's isolation adds: its PYTHONPATH entry (a sitecustomize that
    hides the environment's site-packages) and PYTHONNOUSERSITE."""
    env = dict(os.environ)
    entries = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    kept = [p for p in entries if not _is_pip_build_env(p)]
    if len(kept) != len(entries):
        env.pop("PYTHONNOUSERSITE", None)
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    else:
        env.pop("PYTHONPATH", None)
    return env


def _probe_target():
    python = os.environ.get("MCLOSS_TORCH_PYTHON") or sys.executable
    try:
        done = subprocess.run(
            [python, "-c", _PROBE],
            env=_environment_without_isolation(),
            cwd=tempfile.gettempdir(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            raise RuntimeError(done.stderr.strip() or f"exit status {done.returncode}")
        return json.loads(lines[-1])
    except (OSError, subprocess.SubprocessError, RuntimeError, ValueError) as e:
        raise SystemExit(f"mcloss_cuda: could not ask {python} where its torch is: {e}") from None


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _no_torch(python):
    return (
        f"mcloss_cuda: {python} has no torch. The extension is compiled against the torch of "
        "the environment it is installed into, so install torch there first (for example "
        "`pip install torch`), then run `pip install .` again. torch is deliberately not a "
        "build requirement: pip would download a second torch into its isolated build "
        "environment, and an extension built against that one does not load with yours. "
        "To build against another interpreter's torch, set MCLOSS_TORCH_PYTHON=/path/to/python; "
        "with `python -m build`, use `python -m build --no-isolation`."
    )


def _use_target_torch():
    """Make ``import torch`` in this process load the target environment's torch; return it."""
    target = _probe_target()
    here = importlib.util.find_spec("torch")
    if target["origin"] is None:
        if here is None or os.environ.get("MCLOSS_TORCH_PYTHON") or _pip_isolated():
            raise SystemExit(_no_torch(target["python"]))
        # not isolated, so this process is the target interpreter itself: its torch is the one
        return here.origin
    if here is None:
        # every directory of the target's sys.path, after the build's own: torch's
        # dependencies may live in another one (a --system-site-packages venv, dist-packages)
        for entry in [target["site"], *target.get("path", [])]:
            if entry not in sys.path:
                sys.path.append(entry)
        # that environment's scripts too, for its ninja (torch builds serially without one)
        os.environ["PATH"] = os.pathsep.join(
            [p for p in (os.environ.get("PATH"), target["scripts"]) if p]
        )
        importlib.invalidate_caches()
        here = importlib.util.find_spec("torch")
    if here is None or not _same_file(here.origin, target["origin"]):
        raise SystemExit(
            f"mcloss_cuda: the build would use the torch at {here and here.origin}, but "
            f"{target['python']} runs the one at {target['origin']}; the extension must be "
            "built against the latter: build with that interpreter, without torch among the "
            "build requirements."
        )
    return here.origin


def _announce():
    import torch

    print(
        f"mcloss_cuda build backend: compiling against torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}) at {os.path.dirname(torch.__file__)}, the torch of "
        f"{os.environ.get('MCLOSS_TORCH_PYTHON') or sys.executable}",
        flush=True,
    )


def get_requires_for_build_wheel(config_settings=None):
    _use_target_torch()  # fail here, before pip installs anything, if there is no torch
    return _setuptools.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings=None):
    _use_target_torch()
    return _setuptools.get_requires_for_build_editable(config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _use_target_torch()
    _announce()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _use_target_torch()
    _announce()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)

"""The install: built against the running torch, the fused CPU kernels in a fresh process,
``python -m mcloss_cuda``, the fallback and its one warning when the extension cannot load or
a GPU's architecture was not compiled for, the build backend finding the target's torch from
inside an isolated build, the sdist's contents, and a repository that refers only to itself.

CI installs with the plain ``pip install ".[test,recipe]"`` of README.md, so these run on that
install.
"""

import importlib.machinery
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import warnings

import pytest
import torch

import mcloss_cuda as mc
from helpers import child_env
from mcloss_cuda import _diagnostics, _ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED = os.environ.get("MCLOSS_EXPECT_BACKEND")
needs_extension = pytest.mark.skipif(
    not _ops.AVAILABLE and EXPECTED is None, reason=f"extension not built: {_ops.LOAD_ERROR!r}"
)


def run_python(args, env=None, cwd=None, timeout=300):
    return subprocess.run(
        [sys.executable, *args],
        env=env or child_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---- the install CI made


@needs_extension
def test_built_against_the_running_torch():
    assert _ops.AVAILABLE, f"extension load error: {_ops.LOAD_ERROR!r}"
    info = _diagnostics.build_info()
    assert info is not None, "no mcloss_cuda/_build_info.py next to the extension"
    assert info["VERSION"] == mc.__version__
    assert info["TORCH_VERSION"] == torch.__version__
    assert os.path.samefile(info["TORCH_PATH"], os.path.dirname(torch.__file__))
    assert info["WITH_CUDA"] == mc.built_with_cuda()
    if info["WITH_CUDA"]:
        assert info["CUDA_ARCHS"], "a CUDA build that recorded no GPU architectures"
        assert all(_diagnostics._parse_arch(a) for a in info["CUDA_ARCHS"]), info["CUDA_ARCHS"]


def test_version_is_defined_once():
    try:
        assert importlib.metadata.version("mcloss_cuda") == mc.__version__
    except importlib.metadata.PackageNotFoundError:
        pass  # a checkout used in place
    literal = re.compile(r"""["']%s["']""" % re.escape(mc.__version__))
    for name in ("setup.py", "pyproject.toml", os.path.join("mcloss_cuda", "__init__.py")):
        path = os.path.join(ROOT, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                assert not literal.search(f.read()), f"{name} spells out the version"


FUSED_IN_A_FRESH_PROCESS = textwrap.dedent("""
    import json, warnings
    warnings.simplefilter("error", RuntimeWarning)  # a load-failure warning fails the import
    import torch
    import mcloss_cuda as mc

    x = torch.randn(4, 12, 5, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (4,))
    mask = mc.random_channel_mask(4, 3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = mc.mc_loss(x, y, 4, 3, mask=mask)
        out.loss.backward()
    ops = sorted({e.key for e in prof.key_averages() if e.key.startswith("mcloss_cuda::")})
    ref = mc.reference.mc_loss(x.detach(), y, 4, 3, mask=mask)
    print(json.dumps({"backend": mc.backend("cpu"), "ops": ops,
                      "loss": out.loss.item(), "ref": ref.loss.item(), "file": mc.__file__}))
""")


@needs_extension
def test_a_fresh_import_runs_the_fused_cpu_kernels(tmp_path):
    proc = run_python(["-c", FUSED_IN_A_FRESH_PROCESS], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert os.path.samefile(os.path.dirname(got["file"]), os.path.dirname(mc.__file__))
    assert got["backend"] == "cpu"
    assert "mcloss_cuda::mc_loss" in got["ops"], got["ops"]
    assert "mcloss_cuda::mc_loss_backward" in got["ops"], got["ops"]
    assert got["loss"] == pytest.approx(got["ref"], rel=1e-10)


def test_diagnostic_report(tmp_path):
    proc = run_python(["-m", "mcloss_cuda"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"mcloss_cuda {mc.__version__}" in out
    assert torch.__version__ in out
    assert re.search(r"loaded:\s+" + ("yes" if _ops.AVAILABLE else "no"), out), out
    assert re.search(r"cpu:\s+backend " + mc.backend("cpu"), out), out
    assert "GPU archs compiled:" in out and "CUDA_HOME:" in out
    for i in range(torch.cuda.device_count()):
        assert re.search(rf"cuda:{i}:\s+backend {mc.backend(f'cuda:{i}')}", out), out
    if EXPECTED:
        assert "MCLOSS_EXPECT_BACKEND" in out  # the environment variables in effect


# ---- when the extension cannot serve


def broken_copy(tmp_path, how):
    """A copy of the installed package whose extension fails to load in the way ``how``."""
    src = os.path.dirname(os.path.abspath(mc.__file__))
    dest = tmp_path / "site" / "mcloss_cuda"
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    so = dest / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])
    if how == "undefined-symbol":
        cc = shutil.which(os.environ.get("CC", "cc"))
        if cc is None:
            pytest.skip("no C compiler to build a library with a missing symbol")
        c = tmp_path / "c.c"
        c.write_text(
            "extern void mcloss_test_missing(void);\n"
            "void PyInit__C(void) { mcloss_test_missing(); }\n"
        )
        subprocess.run([cc, "-shared", "-fPIC", "-o", str(so), str(c)], check=True)
    elif how in ("not-a-library", "other-torch"):
        so.write_bytes(b"not a shared library\n")
    if how == "other-torch":
        info = dest / "_build_info.py"
        text = info.read_text() if info.exists() else ""
        text = re.sub(r"(?m)^TORCH_VERSION = .*\n", "", text) + "TORCH_VERSION = '1.0.0'\n"
        info.write_text(text)
    return tmp_path / "site"


IMPORT_AND_RUN = textwrap.dedent("""
    import json, sys, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        import mcloss_cuda as mc
        x = torch.randn(2, 12, 4, 4, requires_grad=True)
        out = mc.mc_loss(x, torch.tensor([0, 3]), 4, 3)
        out.loss.backward()
    if "--report" in sys.argv:  # python -m mcloss_cuda, in this process to save a torch import
        from mcloss_cuda import __main__ as report
        assert report.main() == 0
    print(json.dumps({
        "warnings": [str(w.message) for w in caught if "mcloss_cuda" in str(w.message)],
        "file": mc.__file__, "backend": mc.backend("cpu"),
        "extension": getattr(mc._ops._C, "__file__", None),
        "finite": bool(torch.isfinite(out.loss)) and bool(torch.isfinite(x.grad).all())}))
""")


@pytest.mark.parametrize(
    "how,why",
    [
        ("missing", "is not there"),
        ("not-a-library", "ImportError"),
        ("undefined-symbol", "a symbol it needs is missing"),
        ("other-torch", f"built against torch 1.0.0 but this is torch {torch.__version__}"),
    ],
)
def test_an_extension_that_cannot_load_warns_once_and_falls_back(tmp_path, how, why):
    site = broken_copy(tmp_path, how)
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    env.pop("MCLOSS_BACKEND", None)
    proc = run_python(["-c", IMPORT_AND_RUN, "--report"], env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(site)), got["file"]
    if got["extension"] and not got["extension"].startswith(str(site)):
        pytest.skip(f"an editable install's import hook loads {got['extension']}")
    assert got["backend"] == "reference" and got["finite"]
    assert len(got["warnings"]) == 1, got["warnings"]
    assert why in got["warnings"][0]
    assert "pip install --force-reinstall --no-deps --no-cache-dir ." in got["warnings"][0]
    # the report says the same
    assert re.search(r"loaded:\s+no: .*" + re.escape(why), proc.stdout), proc.stdout
    assert re.search(r"cpu:\s+backend reference", proc.stdout), proc.stdout

    if how == "missing":  # asking for the reference is not a failure to warn about
        env["MCLOSS_BACKEND"] = "reference"
        quiet = run_python(["-c", IMPORT_AND_RUN], env=env, cwd=tmp_path)
        assert quiet.returncode == 0, quiet.stderr
        assert json.loads(quiet.stdout.strip().splitlines()[-1])["warnings"] == []


@pytest.mark.parametrize(
    "archs,capability,runs",
    [
        (["sm_80"], (8, 0), True),
        (["sm_80"], (8, 6), True),  # a cubin runs on later minors of its major
        (["sm_86"], (8, 0), False),
        (["sm_80"], (9, 0), False),  # but not on another major
        (["sm_80", "compute_80"], (9, 0), True),  # PTX is compiled by the driver for newer GPUs
        (["compute_90"], (8, 9), False),
        (["sm_90a"], (9, 0), True),
        (["sm_90a"], (10, 0), False),  # arch-specific code runs on that arch only
        (["sm_100", "sm_120"], (12, 1), True),
        (["sm_100", "sm_120"], (11, 0), False),
        ([], (7, 5), True),  # nothing recorded: cannot tell, assume it runs
    ],
)
def test_arch_rules(archs, capability, runs):
    assert _diagnostics.arch_runs_on(archs, capability) is runs


def test_without_a_gpu_the_cuda_backend_needs_no_device():
    # a CUDA build on a machine without a GPU (CI's): asking must not initialise CUDA
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert _diagnostics.cuda_device_ok(torch.device("cuda")) is True
    expected = "cuda" if _ops.has_kernel("mc_loss", "CUDA") else "reference"
    if _diagnostics.reference_forced():
        expected = "reference"
    assert mc.backend("cuda") == expected


def test_a_gpu_arch_not_compiled_for_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(_diagnostics, "_cuda_device_ok", {})
    monkeypatch.setattr(_diagnostics, "compiled_archs", lambda: ["sm_80", "sm_90"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Old GPU")
    monkeypatch.delenv("MCLOSS_BACKEND", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _diagnostics.cuda_device_ok(torch.device("cuda", 0)) is False
        assert _diagnostics.cuda_device_ok(torch.device("cuda", 0)) is False
        if _ops.has_kernel("mc_loss", "CUDA"):
            assert mc.backend("cuda:0") == "reference"
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "cuda:0 (Old GPU, compute capability 7.5)" in messages[0]
    assert 'TORCH_CUDA_ARCH_LIST="7.5" pip install' in messages[0]

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    assert _diagnostics.cuda_device_ok(torch.device("cuda", 1)) is True
    if _ops.has_kernel("mc_loss", "CUDA"):
        assert mc.backend("cuda:1") == "cuda"


# ---- the build backend, inside an isolated build like pip's

# pip's isolation: a sitecustomize on PYTHONPATH drops the environment's site-packages
FAKE_PIP_SITECUSTOMIZE = textwrap.dedent("""
    import os, site, sys
    hidden = {os.path.normcase(p) for p in site.getsitepackages() + [site.getusersitepackages()]}
    sys.path[:] = [p for p in sys.path if os.path.normcase(p) not in hidden]
    sys.path.append(os.path.join(os.path.dirname(__file__), "..", "lib"))
""")

USE_TARGET_TORCH = textwrap.dedent("""
    import importlib.util, json, sys
    assert importlib.util.find_spec("torch") is None, "the fake isolation let torch through"
    sys.path.insert(0, sys.argv[1])
    import mcloss_backend
    try:
        mcloss_backend._use_target_torch()
    except SystemExit as e:
        print(json.dumps({"exit": str(e)}))
        raise SystemExit(0)
    import torch
    print(json.dumps({"torch": torch.__file__, "version": torch.__version__}))
""")


def fake_isolated_env(tmp_path):
    """An environment like the one pip runs a build backend in: the target interpreter, but
    its site-packages hidden; only setuptools is there, as a build requirement."""
    try:
        import setuptools
    except ImportError:
        pytest.skip("setuptools is not installed")
    env_dir = tmp_path / "pip-build-env-test"
    (env_dir / "site").mkdir(parents=True)
    (env_dir / "lib").mkdir()
    (env_dir / "site" / "sitecustomize.py").write_text(FAKE_PIP_SITECUSTOMIZE)
    site_packages = os.path.dirname(os.path.dirname(setuptools.__file__))
    for name in ("setuptools", "_distutils_hack", "pkg_resources"):
        if os.path.exists(os.path.join(site_packages, name)):
            os.symlink(os.path.join(site_packages, name), env_dir / "lib" / name)
    env = dict(os.environ, PYTHONPATH=str(env_dir / "site"), PYTHONNOUSERSITE="1")
    env.pop("MCLOSS_TORCH_PYTHON", None)
    return env


@pytest.mark.skipif(
    not os.path.isdir(os.path.join(ROOT, "build_backend")), reason="not a source tree"
)
def test_the_backend_finds_the_target_torch_from_an_isolated_build(tmp_path):
    env = fake_isolated_env(tmp_path)
    backend_dir = os.path.join(ROOT, "build_backend")
    proc = run_python(["-c", USE_TARGET_TORCH, backend_dir], env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "exit" not in got, got
    assert os.path.samefile(got["torch"], torch.__file__) and got["version"] == torch.__version__

    # an interpreter without torch: stop with a message that says to install torch first
    venv = tmp_path / "no-torch"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    env["MCLOSS_TORCH_PYTHON"] = str(venv / "bin" / "python")
    proc = run_python(["-c", USE_TARGET_TORCH, backend_dir], env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    message = json.loads(proc.stdout.strip().splitlines()[-1])["exit"]
    assert "has no torch" in message and "install torch there first" in message


# ---- the sdist and the repository


def source_files():
    # the extension's sources, and the CUDA emulator the tests build them with
    for top in ("csrc", "tools"):
        for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if (
                    name.endswith((".h", ".cuh", ".cpp", ".cu"))
                    or top == "tools"
                    and name.endswith(".py")
                ):
                    yield os.path.relpath(os.path.join(folder, name), ROOT)


@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, "csrc")), reason="not a source tree")
def test_the_sdist_carries_every_source_and_header(tmp_path):
    pytest.importorskip("setuptools")
    # the backend's own sdist hook, as `python -m build --sdist` calls it (no torch needed)
    hook = (
        "import sys; sys.path.insert(0, 'build_backend'); import mcloss_backend; "
        "print(mcloss_backend.build_sdist(sys.argv[1]))"
    )
    env = dict(os.environ, PYTHONPATH="")
    proc = run_python(["-c", hook, str(tmp_path)], env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    name = proc.stdout.strip().splitlines()[-1]
    assert name == f"mcloss_cuda-{mc.__version__}.tar.gz"
    with tarfile.open(tmp_path / name) as tar:
        top = f"mcloss_cuda-{mc.__version__}/"
        members = {m.name[len(top) :] for m in tar.getmembers() if m.name.startswith(top)}
    wanted = set(source_files()) | {
        "setup.py",
        "pyproject.toml",
        "README.md",
        "MANIFEST.in",
        "docs/spec.md",
        "build_backend/mcloss_backend.py",
        "mcloss_cuda/__init__.py",
        "mcloss_cuda/_version.py",
        "mcloss_cuda/_toolkit.py",
    }
    assert "csrc/ops.cpp" in wanted and "tools/cuemu/cuemu.h" in wanted
    assert not wanted - members, sorted(wanted - members)
    assert "mcloss_cuda/_build_info.py" not in members  # written by each build for itself
    assert not [m for m in members if m.endswith(".so")]


SKIP_DIRS = {
    ".git",
    ".venv",
    "build",
    "dist",
    ".hypothesis",
    ".pytest_cache",
    "__pycache__",
    "node_modules",
}


def repository_text_files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [
            d
            for d in dirs
            if d not in SKIP_DIRS
            and not d.endswith(".egg-info")
            and not os.path.exists(os.path.join(folder, d, "pyvenv.cfg"))
        ]
        for name in files:
            if (
                name.endswith(
                    (
                        ".py",
                        ".md",
                        ".txt",
                        ".toml",
                        ".cfg",
                        ".in",
                        ".h",
                        ".cpp",
                        ".cu",
                        ".cuh",
                        ".sh",
                    )
                )
                or name == "run"
            ):
                yield os.path.join(folder, name)


def github_anchor(heading):
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def test_the_repository_refers_only_to_itself():
    outside = re.compile(r"\.\./shared|\bSPEC" + r"\.md")  # split: this file does not match
    offenders, broken = [], []
    for path in repository_text_files():
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        rel = os.path.relpath(path, ROOT)
        offenders += [f"{rel}: {m.group(0)}" for m in outside.finditer(text)]
        if not path.endswith(".md"):
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            file_part, _, anchor = target.partition("#")
            dest = (
                os.path.normpath(os.path.join(os.path.dirname(path), file_part))
                if file_part
                else path
            )
            if not dest.startswith(ROOT) or not os.path.exists(dest):
                broken.append(f"{rel}: {target}")
            elif anchor and dest.endswith(".md"):
                with open(dest, encoding="utf-8") as f:
                    anchors = {github_anchor(h) for h in re.findall(r"(?m)^#+ (.*)$", f.read())}
                if anchor not in anchors:
                    broken.append(f"{rel}: {target} (no such heading)")
    assert not offenders, offenders
    assert not broken, broken

"""Build the test-only emulated CUDA extension: the CUDA sources of a checkout compiled as C++
with g++ and cuemu.h, so that their kernels and host wrappers run on CPU tensors.

The result is a complete ``mcloss_cuda._C`` (the op schemas, the composite op and autograd of
``csrc/``) in which the host wrappers of ``csrc/cuda/*.cu`` are registered for the CPU dispatch
key, standing in for the CPU kernels (``csrc/cpu`` is not compiled in). Loaded in place of the
installed extension (``tests/conftest.py`` does it when ``MCLOSS_EMULATED_EXTENSION`` names the
library), every public function and op then runs the CUDA code.

    python tools/cuemu/build.py [--variant plain|asan|tsan ...]   # prints each library's path

Builds are cached under ``$MCLOSS_CUEMU_CACHE`` (default ``~/.cache/mcloss_cuda/cuemu``), keyed
by the content of every file the build reads, torch's version, the compiler and the flags, so
an edited ``.cu`` is rebuilt and an unchanged checkout costs nothing.

What changes in the CUDA source on its way to g++ (``emulated_source``): ``k<<<g, b, s, t>>>(a)``
becomes ``::cuemu::launcher("k", k, g, b, s, t)(a)`` (a host compiler cannot parse ``<<<``), and
``TORCH_LIBRARY_IMPL(mcloss_cuda, CUDA, m)`` registers for ``CPU``. ATen/c10/torch headers are
included first as host code, so that only the project's own code sees ``__CUDA_ARCH__``;
``c10/cuda`` headers come from ``stub/``.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# Per variant: (compiler flags, what the loading process must preload, environment it needs)
VARIANTS = {
    "plain": ["-O2"],
    # -fsanitize=bounds-strict: indexing past the end of a static __shared__ array, too;
    # vptr checks need RTTI across torch's libraries, which are not instrumented
    "asan": [
        "-O1",
        "-fno-omit-frame-pointer",
        "-fsanitize=address,undefined",
        "-fsanitize=bounds-strict",
        "-fno-sanitize=vptr",
        "-fno-sanitize-recover=all",
    ],
    "tsan": ["-O1", "-fno-omit-frame-pointer", "-fsanitize=thread"],
}
SANITIZER_RUNTIME = {"asan": "libasan.so", "tsan": "libtsan.so"}
COMMON_FLAGS = [
    "-std=c++20",
    "-fPIC",
    "-g1",
    "-Wno-deprecated-declarations",
    "-DTORCH_API_INCLUDE_EXTENSION_H",
    "-DTORCH_EXTENSION_NAME=_C",
]


def cache_root() -> Path:
    return Path(
        os.environ.get("MCLOSS_CUEMU_CACHE") or Path.home() / ".cache" / "mcloss_cuda" / "cuemu"
    )


def _torch():
    import torch

    return torch


def torch_dirs():
    """(include directories, library directory) of the installed torch."""
    root = Path(_torch().__file__).parent
    return [root / "include", root / "include" / "torch" / "csrc" / "api" / "include"], root / "lib"


def sanitizer_preload(variant: str) -> str | None:
    """The sanitizer runtime a process loading this variant must preload (LD_PRELOAD)."""
    lib = SANITIZER_RUNTIME.get(variant)
    if lib is None:
        return None
    path = subprocess.run(
        [compiler(), f"-print-file-name={lib}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not os.path.isabs(path):
        raise RuntimeError(f"cuemu: the compiler has no {lib} (install its sanitizer runtime)")
    return path


def compiler() -> str:
    return os.environ.get("CXX", "g++")


# ----------------------------------------------------------------------------------------------
# source rewriting


def code_only(text: str) -> str:
    """``text`` with comments and string and character literals blanked (same length, newlines
    kept), so that searches for code see only code."""
    out, i, n = list(text), 0, len(text)

    def blank(a, b):
        for j in range(a, b):
            if out[j] != "\n":
                out[j] = " "

    while i < n:
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif text[i] in "\"'":
            j = i + 1
            while j < n and text[j] != text[i] and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
        else:
            i += 1
            continue
        blank(i, j)
        i = j
    return "".join(out)


def _matching_open(text: str, close: int) -> int:
    """Index of the '<' that opens the template argument list closed by text[close] == '>'."""
    depth = 0
    for i in range(close, -1, -1):
        if text[i] == ">":
            depth += 1
        elif text[i] == "<":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError("unbalanced template brackets before <<<")


def rewrite_launches(text: str) -> tuple[str, list[str]]:
    """``name<T...><<<config>>>(`` -> ``::cuemu::launcher("name", name<T...>, config)(``.

    Returns the new text and the names of the kernels launched, in order. Comments and string
    literals are left alone."""
    code = code_only(text)
    out, names, pos = [], [], 0
    while True:
        start = code.find("<<<", pos)
        if start < 0:
            out.append(text[pos:])
            return "".join(out), names
        end = code.find(">>>", start)
        if end < 0:
            raise ValueError("<<< without >>>")
        j = start
        while j > 0 and text[j - 1].isspace():
            j -= 1
        callee_end = j
        if text[j - 1] == ">":
            j = _matching_open(text, j - 1)
        m = re.search(r"[A-Za-z_][A-Za-z0-9_:]*$", text[:j])
        if not m:
            raise ValueError(f"no kernel name before <<< at offset {start}")
        callee = text[m.start() : callee_end]
        name = m.group(0).split("::")[-1]
        paren = end + 3
        while paren < len(text) and text[paren].isspace():
            paren += 1
        if paren >= len(text) or text[paren] != "(":
            raise ValueError(f"expected ( after >>> of {name}")
        config = text[start + 3 : end]
        out.append(text[pos : m.start()])
        out.append(f'::cuemu::launcher("{name}", {callee}, {config})(')
        names.append(name)
        pos = paren + 1


_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:(?:alignas|__align__)\s*\([^)]*\)\s+)?([A-Za-z_][\w:<>, ]*?)\s+"
    r"(?:(?:alignas|__align__)\s*\([^)]*\)\s+)?([A-Za-z_]\w*)\s*\[\s*\]\s*;"
)
_CUDA_IMPL = re.compile(r"TORCH_LIBRARY_IMPL\(\s*mcloss_cuda\s*,\s*CUDA\s*,")


def emulated_source(text: str, register_for_cpu: bool = True) -> tuple[str, list[str]]:
    """The .cu text as the emulated build compiles it (see the module docstring), and the names
    of the kernels it launches. ``register_for_cpu``: the file registers ops (a project .cu),
    which must then be for CPU."""
    text, names = rewrite_launches(text)
    # dynamic shared memory: a pointer to the block's buffer, sized by the launch; inside a
    # function only (at namespace scope it would be read when the library loads)
    code = code_only(text)

    def pointer(m):
        if code[: m.start()].count("{") == code[: m.start()].count("}"):
            raise ValueError(
                f"extern __shared__ {m.group(2)} at namespace scope: declare it in "
                "the kernel for the emulator"
            )
        return (
            f"{m.group(1)}* const {m.group(2)} = "
            f"static_cast<{m.group(1)}*>(::cuemu::dynamic_shared());"
        )

    text = _EXTERN_SHARED.sub(pointer, text)
    if register_for_cpu:
        text, n = _CUDA_IMPL.subn("TORCH_LIBRARY_IMPL(mcloss_cuda, CPU,", text)
        if n == 0 and names:
            raise ValueError("no TORCH_LIBRARY_IMPL(mcloss_cuda, CUDA, m) to register for CPU")
    return text, names


_INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]')
_IF = re.compile(r"^\s*#\s*if")
_ENDIF = re.compile(r"^\s*#\s*endif")
# CUDA-side headers: from stub/ (where one exists), included with the project's code
_DEVICE_HEADERS = ("c10/cuda/", "ATen/cuda/")


def _unconditional_includes(text: str):
    """(kind, name) of the #includes outside comments and outside #if blocks."""
    depth = 0
    code_lines = code_only(text).splitlines()
    directives = [c.split() for c in code_lines if c.strip()][:2]
    # an include guard (#ifndef X / #define X) encloses the whole file: it is no condition
    guard = (
        len(directives) == 2
        and directives[0][:1] == ["#ifndef"]
        and directives[1][:2] == ["#define", directives[0][1] if len(directives[0]) > 1 else ""]
    )
    for line, code in zip(text.splitlines(), code_lines):
        if guard and _IF.match(code):
            guard = False
        elif _IF.match(code):
            depth += 1
        elif _ENDIF.match(code):
            depth -= 1
        elif depth == 0 and re.match(r"\s*#\s*include\b", code):
            m = _INCLUDE.match(line)  # (the name of a quoted include is blanked in `code`)
            if m:
                yield m.group(1), m.group(2)


def host_headers(path: Path, include_dirs, seen=None) -> list[str]:
    """The ATen, c10 and torch headers (not the CUDA-side ones) that ``path`` and the project
    headers it includes pull in unconditionally, in the order first met."""
    seen = set() if seen is None else seen
    found = []
    for kind, name in _unconditional_includes(path.read_text()):
        if kind == "<":
            if name.split("/")[0] in ("ATen", "c10", "torch") and not name.startswith(
                _DEVICE_HEADERS
            ):
                found.append(name)
            elif name.startswith(_DEVICE_HEADERS) and (HERE / "stub" / name).is_file():
                stub = (HERE / "stub" / name).resolve()
                if stub not in seen:  # a stub's own host headers come first too
                    seen.add(stub)
                    found += host_headers(stub, include_dirs, seen)
            continue
        for d in [path.parent, *include_dirs]:
            dep = (Path(d) / name).resolve()
            if dep.is_file():
                if dep not in seen:
                    seen.add(dep)
                    found += host_headers(dep, include_dirs, seen)
                break
    return list(dict.fromkeys(found))


def translation_unit(cu: Path, rewritten: Path, include_dirs) -> str:
    """A C++ file that compiles one emulated .cu."""
    lines = [f"// generated by tools/cuemu/build.py from {cu.name}; do not edit"]
    lines += [f"#include <{h}>" for h in host_headers(cu, include_dirs)]
    lines += [
        "#define CUEMU_NO_ARCH_MACROS",
        '#include "cuemu.h"',
        "#define __CUDACC__ 1",
        "#define __CUDA_ARCH__ 900",
        f'#include "{rewritten.name}"',
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# the build


def project_sources(repo: Path):
    """(sources compiled as they are, CUDA sources to emulate): what setup.py compiles, less
    the CPU kernels, plus the emulator's own registrations."""
    csrc = repo / "csrc"
    plain = sorted(csrc.glob("*.cpp")) + sorted((csrc / "autograd").glob("*.cpp"))
    plain.append(HERE / "cuemu_ops.cpp")
    return plain, sorted((csrc / "cuda").glob("*.cu"))


def _inputs(repo: Path, with_cuda: bool = True):
    files = sorted(
        p
        for p in (repo / "csrc").rglob("*")
        if p.is_file() and (with_cuda or p.parent != repo / "csrc" / "cuda")
    )
    # the emulator's headers, stubs and registrations, and this script (not mutations.py and
    # the tests, which change no build)
    files += sorted(
        p
        for p in HERE.rglob("*")
        if p.is_file() and (p.suffix in (".h", ".cuh", ".cpp") or p == HERE / "build.py")
    )
    return files


def build_key(repo: Path, with_cuda: bool = True) -> str:
    """Hash of everything a build reads: the sources (without csrc/cuda for the objects that
    do not include them), torch, the compiler and the flags."""
    torch = _torch()
    h = hashlib.sha256()
    for p in _inputs(repo, with_cuda):
        h.update(str(p.relative_to(repo) if p.is_relative_to(repo) else p.name).encode())
        h.update(p.read_bytes())
    version = subprocess.run([compiler(), "--version"], capture_output=True, text=True).stdout
    h.update(
        "\0".join(
            [
                torch.__version__,
                torch.__file__,
                version,
                sys.version,
                *COMMON_FLAGS,
                *(f for v in sorted(VARIANTS) for f in [v, *VARIANTS[v]]),
            ]
        ).encode()
    )
    return h.hexdigest()[:20]


def _flags(variant: str, include_dirs) -> list[str]:
    abi = int(_torch()._C._GLIBCXX_USE_CXX11_ABI)
    flags = COMMON_FLAGS + VARIANTS[variant] + [f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    flags += [f"-I{d}" for d in include_dirs]
    flags += [f"-I{d}" for d in torch_dirs()[0]]
    flags += [f"-I{sysconfig.get_paths()['include']}"]
    return flags


def _run_parallel(commands, jobs, log):
    """Run the commands, ``jobs`` at a time; raise with the output of the first that fails."""
    pending, running = list(commands), []
    while pending or running:
        while pending and len(running) < jobs:
            cmd = pending.pop(0)
            running.append(
                (
                    cmd,
                    subprocess.Popen(
                        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                    ),
                )
            )
        cmd, proc = running.pop(0)
        out, _ = proc.communicate()
        log.write(" ".join(cmd) + "\n" + out)
        if proc.returncode:
            for _, other in running:
                other.kill()
            raise RuntimeError(f"cuemu build failed ({' '.join(cmd[-3:])}):\n{out[-6000:]}")


def build(
    variants=("plain",), repo: Path = REPO, jobs: int | None = None, verbose: bool = False
) -> dict:
    """Build (or find in the cache) the emulated extension of ``repo`` in each of ``variants``;
    returns {variant: path of its library}. The sources that need no instrumentation
    (schemas, autograd, the emulator's ops) are compiled once and shared by every variant."""
    variants = [variants] if isinstance(variants, str) else list(variants)
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"variant: expected one of {sorted(VARIANTS)}, got {v!r}")
    repo = Path(repo).resolve()
    root = cache_root() / build_key(repo)
    libs = {v: root / v / "_C.so" for v in variants}
    if all(p.is_file() for p in libs.values()):
        return libs
    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (parallel test runs)
        missing = [v for v in variants if not libs[v].is_file()]
        if missing:
            if verbose:
                print(f"cuemu: building {', '.join(missing)} in {root}", file=sys.stderr)
            common = cache_root() / f"common-{build_key(repo, with_cuda=False)}"
            _build_into(root, common, missing, repo, jobs or os.cpu_count() or 2)
    return libs


def _build_into(root: Path, common_dir: Path, variants, repo: Path, jobs: int):
    plain, cuda = project_sources(repo)
    gen = root / "src"
    gen.mkdir(parents=True, exist_ok=True)
    include_dirs = [repo / "csrc", HERE / "stub", HERE, gen]
    units = []
    for cu in cuda:
        text, _ = emulated_source(cu.read_text())
        rewritten = gen / f"{cu.stem}.emu.cu"
        rewritten.write_text(f'#line 1 "{cu}"\n' + text)
        unit = gen / f"{cu.stem}.emu.cpp"
        unit.write_text(translation_unit(cu, rewritten, [repo / "csrc"]))
        units.append(unit)
    common_dir.mkdir(exist_ok=True)
    compile_cmds, links = [], []
    common_objs = [common_dir / f"{i:02d}_{src.stem}.o" for i, src in enumerate(plain)]
    for src, obj in zip(plain, common_objs):
        if not obj.is_file():  # (written under a temporary name: complete or absent)
            compile_cmds.append(
                [
                    compiler(),
                    *_flags("plain", include_dirs),
                    "-c",
                    str(src),
                    "-o",
                    str(obj) + ".tmp",
                ]
            )
    torch_lib = torch_dirs()[1]
    for v in variants:
        work = Path(tempfile.mkdtemp(prefix=f".{v}-", dir=root))
        objs = [work / f"{unit.stem}.o" for unit in units]
        for unit, obj in zip(units, objs):
            compile_cmds.append(
                [compiler(), *_flags(v, include_dirs), "-c", str(unit), "-o", str(obj)]
            )
        sanitize = [f for f in VARIANTS[v] if f.startswith("-fsanitize")]
        links.append(
            (
                v,
                work,
                [
                    compiler(),
                    "-shared",
                    *sanitize,
                    *map(str, common_objs),
                    *map(str, objs),
                    f"-L{torch_lib}",
                    "-lc10",
                    "-ltorch",
                    "-ltorch_cpu",
                    "-ltorch_python",
                    f"-Wl,-rpath,{torch_lib}",
                    "-o",
                    str(work / "_C.so"),
                ],
            )
        )
    try:
        with open(root / "build.log", "a") as log:
            _run_parallel(compile_cmds, jobs, log)
            for obj in common_objs:
                if not obj.is_file():
                    os.replace(str(obj) + ".tmp", obj)
            _run_parallel([cmd for _, _, cmd in links], jobs, log)
        for v, work, _ in links:
            if (root / v).exists():
                shutil.rmtree(root / v)
            work.rename(root / v)  # complete, or not there at all
    finally:
        for _, work, _ in links:
            shutil.rmtree(work, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--variant",
        action="append",
        choices=sorted(VARIANTS),
        help="plain (default), asan (AddressSanitizer + UBSan) or tsan; repeatable",
    )
    ap.add_argument("--repo", default=str(REPO), help="checkout whose csrc/ to build")
    ap.add_argument("--jobs", type=int, default=None)
    args = ap.parse_args(argv)
    for variant, lib in build(
        args.variant or ["plain"], Path(args.repo), args.jobs, verbose=True
    ).items():
        print(f"{variant} {lib}")


if __name__ == "__main__":
    main()

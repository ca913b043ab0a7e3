#!/usr/bin/env python
"""Per-kernel SASS report of the compiled extension (mcloss_cuda/_C*.so).

For every kernel and every SM architecture embedded in the .so: registers, stack frame, static
shared memory, spill stores/loads, local-memory loads/stores (LDL/STL), global loads (LDG, and
LDGSTS for cp.async) and stores (STG) by width (32/64/128 bits, U16, ...), MUFU ops, and the
instruction count (NOPs left out). The tools come from the PyPI packages nvidia-cuda-cuobjdump
and nvidia-cuda-nvdisasm:

  cuobjdump -xelf all SO      the cubins (one per architecture and compilation unit)
  cuobjdump -res-usage CUBIN  REG, STACK, SHARED, LOCAL of each function
  nvdisasm -json -annotate    the SASS, with ptxas's "SpillRefill" mark on each spill LDL/STL

``--check`` exits 1 if a kernel spills or touches local memory, or if a fused fp32 kernel
(FUSED_FP32_PATTERN, on the demangled name) has no 128-bit global load, or if there is no such
kernel at all, or if the .so has no CUDA code (unless --allow-cpu-only).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

# Fused fp32 kernels: a `_tile_` kernel whose first template argument is float, as c++filt
# writes it, e.g. "mcloss::cuda::mc_loss_tile_forward_kernel<float>" or "...<float, 256>".
FUSED_FP32_PATTERN = r"_tile_\w*<float[,>]"
TOOL_PACKAGES = "nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm"
NO_DEVICE_CODE = "does not contain device code"  # cuobjdump's message (exit 255) for a CPU-only .so
SUBWORD = ("U8", "S8", "U16", "S16")  # sub-word access modifiers: LDG.E.U16, STG.E.U8, ...


class CpuOnly(Exception):
    """The binary has no CUDA device code."""


def find_tool(name):
    """Path of `name`: $NAME, else the nvidia-cuda-* wheel's bin/, else PATH, else CUDA's bin/."""
    if os.environ.get(name.upper()):
        return os.environ[name.upper()]
    spec = importlib.util.find_spec("nvidia")  # namespace package of the nvidia-* wheels
    for root in spec.submodule_search_locations if spec else []:
        # cu13 wheels: nvidia/cu13/bin/NAME; cu12 wheels: nvidia/cuda_NAME/bin/NAME. Newest first.
        hits = glob.glob(os.path.join(root, "*", "bin", name))
        if hits:
            return max(hits, key=lambda h: int((re.findall(r"/cu(\d+)/bin/", h) or ["12"])[0]))
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    found = shutil.which(name) or shutil.which(name, path=os.path.join(cuda_home, "bin"))
    if not found:
        raise SystemExit(
            f"sass_report: {name} not found: pip install {TOOL_PACKAGES} (or set ${name.upper()})"
        )
    return found


def find_extension():
    """The compiled mcloss_cuda/_C*.so: the installed package's, else an in-place build's."""
    spec = importlib.util.find_spec("mcloss_cuda")  # finds the package without importing torch
    dirs = list(spec.submodule_search_locations) if spec else []
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dirs.append(os.path.join(repo, "mcloss_cuda"))
    for d in dirs:
        hits = sorted(glob.glob(os.path.join(d, "_C*.so")))
        if hits:
            return hits[0]
    raise SystemExit(f"sass_report: no compiled mcloss_cuda/_C*.so in {dirs}: pass --so")


def run_tool(argv, cwd=None, stdin=None):
    """Run a tool and return the CompletedProcess (text output, exit status not checked)."""
    try:
        return subprocess.run(argv, cwd=cwd, input=stdin, capture_output=True, text=True)
    except OSError as e:
        raise SystemExit(f"sass_report: cannot run {argv[0]}: {e}")


def checked(proc):
    """stdout of a CompletedProcess, or exit with the tool's stderr if it failed."""
    if proc.returncode != 0:
        raise SystemExit(
            f"sass_report: {' '.join(map(str, proc.args))} failed "
            f"({proc.returncode}): {proc.stderr.strip()}"
        )
    return proc.stdout


def cubin_name(path):
    """(index, arch) of a cubin file that `cuobjdump -xelf` wrote (index 0 when the name has
    none), or None for another file."""
    m = re.search(r"(?:\.(\d+))?\.(sm_\w+)\.cubin$", path)
    return (int(m.group(1) or 0), m.group(2)) if m else None


def extract_cubins(so, cuobjdump, workdir):
    """Extract every cubin of `so` into `workdir`; return [(arch, path)]. Raises CpuOnly."""
    proc = run_tool([cuobjdump, "-xelf", "all", os.path.abspath(so)], cwd=workdir)
    if proc.returncode != 0 and NO_DEVICE_CODE in proc.stderr + proc.stdout:
        raise CpuOnly(f"{so} contains no CUDA device code (a CPU-only build)")
    checked(proc)
    cubins = []
    # NAME.<index>.sm_90.cubin, or NAME.sm_90.cubin (one compilation unit, as setup.py builds)
    for path in glob.glob(os.path.join(workdir, "*.cubin")):
        name = cubin_name(path)
        if name:
            cubins.append((*name, path))
    if not cubins:
        raise SystemExit(f"sass_report: {so} has CUDA code but no SASS (PTX only?)")
    return [(arch, path) for _, arch, path in sorted(cubins)]


def parse_res_usage(text):
    """`cuobjdump -res-usage` of one cubin -> {mangled name: {"REG": n, "STACK": n, ...}}.

    Each function is a line ' Function NAME:' followed by 'REG:32 STACK:1168 SHARED:0 LOCAL:0
    CONSTANT[0]:548 TEXTURE:0 ...'."""
    usage, name = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):\s*$", line)
        if m:
            name = m.group(1)
        elif name:
            usage[name] = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
            name = None
    return usage


def access_width(opcode):
    """Width label of a memory opcode: 'LDG.E.128.CONSTANT' -> '128', 'LDG.E.U16' -> 'U16',
    'STL.64' -> '64', 'LDG.E' -> '32' (no width modifier means 32 bits)."""
    for token in opcode.split(".")[1:]:
        if token.isdigit() or token in SUBWORD:
            return token
    return "32"


def width_bytes(label):
    """Bytes moved per thread by an access of width `label` ('128' -> 16, 'U16' -> 2)."""
    return int(label.lstrip("US")) // 8


def sass_stats(instructions):
    """Counts over one function's instructions (nvdisasm -json entries: opcode, annotations)."""
    s = {
        "instructions": 0,
        "ldl": 0,
        "stl": 0,
        "ldl_bytes": 0,
        "stl_bytes": 0,
        "spill_store_bytes": 0,
        "spill_load_bytes": 0,
        "ldg": Counter(),
        "stg": Counter(),
        "mufu": Counter(),
    }
    for ins in instructions:
        op = ins["opcode"]
        root = op.split(".")[0]
        if root == "NOP":
            continue
        s["instructions"] += 1
        if root in ("LDL", "STL"):
            kind, nbytes = root.lower(), width_bytes(access_width(op))
            s[kind] += 1
            s[kind + "_bytes"] += nbytes
            if any(a.get("info") == "SpillRefill" for a in ins.get("annotations", [])):
                s["spill_store_bytes" if kind == "stl" else "spill_load_bytes"] += nbytes
        elif root in ("LDG", "LDGSTS"):  # LDGSTS: cp.async, global -> shared
            s["ldg"][access_width(op)] += 1
        elif root == "STG":
            s["stg"][access_width(op)] += 1
        elif root == "MUFU":
            s["mufu"][op.split(".", 1)[1]] += 1
    return s


def parse_nvdisasm_json(text):
    """`nvdisasm -json -annotate` of one cubin -> {mangled name: sass_stats(...)}.

    The output is [header, [{"function-name": ..., "sass-instructions": [{"opcode": ...,
    "operands": ..., "annotations": [{"type": "program-analysis", "info": "SpillRefill"}]}]}]]."""
    _header, functions = json.loads(text)
    return {f["function-name"]: sass_stats(f["sass-instructions"]) for f in functions}


def demangle(names):
    """{mangled: demangled} via c++filt (binutils); names stay mangled if it is missing."""
    names = list(names)
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        print("sass_report: c++filt not found: kernel names stay mangled", file=sys.stderr)
        return {n: n for n in names}
    out = checked(run_tool([cxxfilt], stdin="\n".join(names) + "\n")).splitlines()
    return dict(zip(names, out))


def short_name(demangled):
    """'void ns::k<float>(float const*, int)' -> 'ns::k<float>': no return type, no parameters."""
    name = demangled[5:] if demangled.startswith("void ") else demangled
    if name.endswith(")"):
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                return name[:i]
    return name


def kernel_rows(arch, res_usage_text, nvdisasm_json_text, names):
    """Rows (dicts) for the functions of one cubin; `names` maps mangled to demangled names."""
    usage = parse_res_usage(res_usage_text)
    rows = []
    for mangled, stats in parse_nvdisasm_json(nvdisasm_json_text).items():
        res = usage.get(mangled, {})
        rows.append(
            {
                "arch": arch,
                "kernel": short_name(names.get(mangled, mangled)),
                "mangled": mangled,
                "registers": res.get("REG"),
                "stack": res.get("STACK"),
                "shared": res.get("SHARED"),
                "local": res.get("LOCAL"),
                **stats,
            }
        )
    return rows


def cubin_outputs(arch, cubin, cuobjdump, nvdisasm):
    """(arch, res-usage text, nvdisasm JSON) of one cubin; no disassembly if it has no function."""
    res = checked(run_tool([cuobjdump, "-res-usage", cubin]))
    if not parse_res_usage(res):
        return arch, res, "[{}, []]"
    return arch, res, checked(run_tool([nvdisasm, "-json", "-annotate", cubin]))


def collect(so, cuobjdump, nvdisasm):
    """Rows for every function of every cubin in `so`, read in parallel. Raises CpuOnly."""
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        per_cubin = list(
            pool.map(
                lambda c: cubin_outputs(*c, cuobjdump, nvdisasm), extract_cubins(so, cuobjdump, tmp)
            )
        )
    names = demangle({n for _, res, _ in per_cubin for n in parse_res_usage(res)})
    return [row for arch, res, js in per_cubin for row in kernel_rows(arch, res, js, names)]


def check(rows, fused_pattern=FUSED_FP32_PATTERN):
    """Problems found (an empty list passes): spills or local memory in any kernel, a fused fp32
    kernel without a 128-bit (or wider) global load, no fused fp32 kernel at all."""
    problems = []
    for r in rows:
        where = f"{r['arch']} {r['kernel']}"
        if r["spill_store_bytes"] or r["spill_load_bytes"] or r["ldl"] or r["stl"]:
            problems.append(
                f"spills/local memory in {where}: spill stores "
                f"{r['spill_store_bytes']} B, spill loads {r['spill_load_bytes']} B, "
                f"{r['stl']} STL, {r['ldl']} LDL"
            )
    fused = [r for r in rows if re.search(fused_pattern, r["kernel"])]
    for r in fused:
        if not any(width.isdigit() and int(width) >= 128 for width in r["ldg"]):
            problems.append(
                f"no 128-bit global load in fused fp32 kernel {r['arch']} "
                f"{r['kernel']}: loads by width {fmt_counts(r['ldg'])}"
            )
    if not fused:
        mangled = any(r["kernel"].startswith("_Z") for r in rows)
        problems.append(
            f"no fused fp32 kernel: no kernel name matches /{fused_pattern}/ among "
            f"the {len(rows)} functions found"
            + (" (names are mangled: is c++filt installed?)" if mangled else "")
        )
    return problems


def fmt_counts(counter):
    """Counter({'128': 2, '32': 1}) -> '128:2 32:1'; empty -> '-'."""
    return " ".join(f"{k}:{v}" for k, v in sorted(counter.items())) or "-"


def markdown(rows):
    """The report as a Markdown table, by architecture then kernel name."""
    head = (
        "| arch | kernel | regs | stack B | smem B | spill st/ld B | STL/LDL | LDG by width "
        "| STG by width | MUFU | instrs |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in sorted(rows, key=lambda r: (r["arch"], r["kernel"])):
        mufu = f"{sum(r['mufu'].values())} ({fmt_counts(r['mufu'])})" if r["mufu"] else "0"
        lines.append(
            f"| {r['arch']} | `{r['kernel']}` | {r['registers']} | {r['stack']} "
            f"| {r['shared']} | {r['spill_store_bytes']}/{r['spill_load_bytes']} "
            f"| {r['stl']}/{r['ldl']} | {fmt_counts(r['ldg'])} | {fmt_counts(r['stg'])} "
            f"| {mufu} | {r['instructions']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--so", help="the .so to inspect (default: the installed mcloss_cuda/_C*.so)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 1 on spills, local memory, a fused "
        "fp32 kernel without 128-bit loads, no fused kernel, or no CUDA code",
    )
    p.add_argument(
        "--expect-fused",
        default=FUSED_FP32_PATTERN,
        metavar="PATTERN",
        help=f"regex (on demangled names) of the fused fp32 kernels (default {FUSED_FP32_PATTERN})",
    )
    p.add_argument(
        "--allow-cpu-only",
        action="store_true",
        help="with --check: a .so without CUDA code passes (with a note)",
    )
    args = p.parse_args(argv)
    so = args.so or find_extension()
    try:
        rows = collect(so, find_tool("cuobjdump"), find_tool("nvdisasm"))
    except CpuOnly as e:
        if args.allow_cpu_only:
            print(f"sass_report: note: {e}; nothing to report (--allow-cpu-only)")
            return 0
        print(
            f"sass_report: {e}: nothing to report"
            + ("; --check fails (pass --allow-cpu-only to accept that)" if args.check else ""),
            file=sys.stderr,
        )
        return 1 if args.check else 0
    table = markdown(rows)
    print(f"SASS of {so}\n\n{table}")
    problems = check(rows, args.expect_fused)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(f"# SASS report\n\n`{os.path.basename(so)}`\n\n{table}")
            f.write("".join(f"\n- problem: {msg}" for msg in problems) + "\n" * bool(problems))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"so": so, "kernels": rows, "problems": problems}, f, indent=1)
    if not args.check:
        return 0
    for msg in problems:
        print(f"sass_report: FAIL: {msg}", file=sys.stderr)
    if problems:
        return 1
    print(
        f"sass_report: check passed: {len(rows)} functions, no spills or local memory, "
        f"every fused fp32 kernel has a 128-bit global load"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

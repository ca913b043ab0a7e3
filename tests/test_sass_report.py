"""benchmarks/sass_report.py: parsing of real (trimmed) cuobjdump/nvdisasm output, the --check
rules, and one run on the built extension where the tools and a CUDA build are there.

The canned outputs come from cuobjdump/nvdisasm 13.5.37 (PyPI nvidia-cuda-cuobjdump /
nvidia-cuda-nvdisasm) on a throwaway .cu compiled by nvcc 13.0 for sm_90: a float4-loading
`_tile_` kernel, a scalar `_tile_` kernel, a register-spilling kernel (__launch_bounds__(1024, 2)),
one with a dynamically indexed local array (STL/LDL without spills), a c10::Half copy, a double one.
"""

import glob
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "sass_report.py")
_spec = importlib.util.spec_from_file_location("sass_report", SCRIPT)
sr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sr)

FWD = "_ZN6mcloss4cuda27mc_loss_tile_forward_kernelIfEEvPK6float4Pfi"
BWD = "_ZN6mcloss4cuda28mc_loss_tile_backward_kernelIfEEvPKT_PS2_i"
REGSPILL = "_ZN6mcloss4cuda15regspill_kernelIfEEvPKT_PS2_i"
LOCAL = "_ZN6mcloss4cuda12spill_kernelIfEEvPKT_PS2_PKii"
HALF = (
    "_ZN6mcloss4cuda36_GLOBAL__N__f2a0c8c4_4_x_cu_76661b5311copy_kernelIN3c104HalfELi1EEEvPKT_PS5_i"
)
DOUBLE = "_ZN6mcloss4cuda12plain_kernelIdEEvPKT_PS2_i"

# c++filt of the names above
DEMANGLED = {
    FWD: "void mcloss::cuda::mc_loss_tile_forward_kernel<float>(float4 const*, float*, int)",
    BWD: "void mcloss::cuda::mc_loss_tile_backward_kernel<float>(float const*, float*, int)",
    REGSPILL: "void mcloss::cuda::regspill_kernel<float>(float const*, float*, int)",
    LOCAL: "void mcloss::cuda::spill_kernel<float>(float const*, float*, int const*, int)",
    HALF: "void mcloss::cuda::(anonymous namespace)::copy_kernel<c10::Half, 1>(c10::Half const*, c10::Half*, int)",
    DOUBLE: "void mcloss::cuda::plain_kernel<double>(double const*, double*, int)",
}

# cuobjdump -res-usage x.2.sm_90.cubin (some functions left out)
RES_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _ZN6mcloss4cuda36_GLOBAL__N__f2a0c8c4_4_x_cu_76661b5311copy_kernelIN3c104HalfELi1EEEvPKT_PS5_i:
  REG:10 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:548 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN6mcloss4cuda28mc_loss_tile_backward_kernelIfEEvPKT_PS2_i:
  REG:10 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:548 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN6mcloss4cuda15regspill_kernelIfEEvPKT_PS2_i:
  REG:32 STACK:1168 SHARED:0 LOCAL:0 CONSTANT[0]:548 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN6mcloss4cuda12plain_kernelIdEEvPKT_PS2_i:
  REG:12 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:548 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN6mcloss4cuda12spill_kernelIfEEvPKT_PS2_PKii:
  REG:32 STACK:4096 SHARED:0 LOCAL:0 CONSTANT[0]:556 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN6mcloss4cuda27mc_loss_tile_forward_kernelIfEEvPK6float4Pfi:
  REG:18 STACK:0 SHARED:2048 LOCAL:0 CONSTANT[0]:548 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

# nvdisasm -json -annotate x.2.sm_90.cubin: header trimmed, a few instructions of each function
SASS_JSON = """
[{"SM": {"version": {"major": 9, "minor": 0}}, "SchemaVersion": {"major": 13, "minor": 5, "revision": 0}, "Producer": "nvdisasm V13.5.37 Build cuda_13.5.r13.5/compiler.39125733_0"}, [
 {"function-name": "_ZN6mcloss4cuda27mc_loss_tile_forward_kernelIfEEvPK6float4Pfi", "start": 0, "length": 1920, "other-attributes": [], "sass-instructions": [
   {"opcode": "LDC", "operands": "R1,c[0x0][0x28]"},
   {"opcode": "LDG.E.128.CONSTANT", "operands": "R4,desc[UR6][R4.64]"},
   {"opcode": "MUFU.EX2", "operands": "R2,R0"},
   {"opcode": "MUFU.EX2", "operands": "R11,R9"},
   {"opcode": "MUFU.RCP", "operands": "R9,R6"},
   {"predicate": "@!P0", "opcode": "MUFU.RCP", "operands": "R6,R0"},
   {"opcode": "STG.E", "operands": "desc[UR6][R2.64],R5"},
   {"predicate": "@P0", "opcode": "EXIT", "other-attributes": {"control-flow": "True"}},
   {"opcode": "NOP"}]},
 {"function-name": "_ZN6mcloss4cuda28mc_loss_tile_backward_kernelIfEEvPKT_PS2_i", "start": 0, "length": 512, "other-attributes": [], "sass-instructions": [
   {"opcode": "LDG.E.CONSTANT", "operands": "R2,desc[UR4][R2.64]"},
   {"opcode": "STG.E", "operands": "desc[UR4][R4.64],R7"},
   {"predicate": "@P0", "opcode": "EXIT", "other-attributes": {"control-flow": "True"}}]},
 {"function-name": "_ZN6mcloss4cuda15regspill_kernelIfEEvPKT_PS2_i", "start": 0, "length": 31872, "other-attributes": [], "sass-instructions": [
   {"opcode": "STL", "operands": "[R1+0xf8],R2", "annotations": [{"type": "program-analysis", "info": "SpillRefill"}]},
   {"opcode": "STL.64", "operands": "[R1+0x70],R6", "annotations": [{"type": "program-analysis", "info": "SpillRefill"}]},
   {"opcode": "LDL.LU", "operands": "R10,[R1+0x488]", "annotations": [{"type": "program-analysis", "info": "SpillRefill"}]},
   {"opcode": "LDG.E.CONSTANT", "operands": "R21,desc[UR4][R2.64]"},
   {"opcode": "STG.E", "operands": "desc[UR4][R6.64],R3"}]},
 {"function-name": "_ZN6mcloss4cuda12spill_kernelIfEEvPKT_PS2_PKii", "start": 0, "length": 11264, "other-attributes": [], "sass-instructions": [
   {"opcode": "STL.128", "operands": "[R0],R4"},
   {"opcode": "LDL", "operands": "R9,[R27]"},
   {"opcode": "LDG.E.CONSTANT", "operands": "R4,desc[UR4][R26.64]"}]},
 {"function-name": "_ZN6mcloss4cuda36_GLOBAL__N__f2a0c8c4_4_x_cu_76661b5311copy_kernelIN3c104HalfELi1EEEvPKT_PS5_i", "start": 0, "length": 512, "other-attributes": [], "sass-instructions": [
   {"opcode": "LDG.E.U16.CONSTANT", "operands": "R3,desc[UR4][R2.64]"},
   {"opcode": "STG.E.U16", "operands": "desc[UR4][R4.64],R3"}]},
 {"function-name": "_ZN6mcloss4cuda12plain_kernelIdEEvPKT_PS2_i", "start": 0, "length": 512, "other-attributes": [], "sass-instructions": [
   {"opcode": "LDG.E.64.CONSTANT", "operands": "R2,desc[UR4][R2.64]"},
   {"opcode": "DMUL", "operands": "R4,R2,R2"},
   {"opcode": "STG.E.64", "operands": "desc[UR4][R6.64],R4"}]}
]]
"""

# cuobjdump -xelf all on a .so built without CUDA: exit status 255 and this on stderr
CPU_ONLY_STDERR = "cuobjdump info    : File '/tmp/cpu.so' does not contain device code\n"


def sass_json(keep):
    """SASS_JSON with only the functions in `keep`."""
    header, functions = json.loads(SASS_JSON)
    return json.dumps([header, [f for f in functions if f["function-name"] in keep]])


def rows(keep=tuple(DEMANGLED)):
    """{mangled: row} of the canned sm_90 cubin, only the functions in `keep`."""
    return {r["mangled"]: r for r in sr.kernel_rows("sm_90", RES_USAGE, sass_json(keep), DEMANGLED)}


def test_res_usage_registers_stack_shared():
    usage = sr.parse_res_usage(RES_USAGE)
    assert set(usage) == set(DEMANGLED)  # "Common: GLOBAL:0" is not a function
    assert usage[REGSPILL] == {
        "REG": 32,
        "STACK": 1168,
        "SHARED": 0,
        "LOCAL": 0,
        "CONSTANT[0]": 548,
        "TEXTURE": 0,
        "SURFACE": 0,
        "SAMPLER": 0,
    }
    assert usage[FWD]["SHARED"] == 2048 and usage[FWD]["REG"] == 18


def test_spill_bytes_from_annotations_and_local_memory():
    r = rows()
    # STL (4 B) + STL.64 (8 B) stores, LDL.LU (4 B) load, each marked SpillRefill
    assert (r[REGSPILL]["spill_store_bytes"], r[REGSPILL]["spill_load_bytes"]) == (12, 4)
    assert (r[REGSPILL]["stl"], r[REGSPILL]["ldl"]) == (2, 1)
    assert r[REGSPILL]["registers"] == 32 and r[REGSPILL]["stack"] == 1168
    # a local array: LDL/STL without the mark, so local memory but no spill bytes
    assert (r[LOCAL]["spill_store_bytes"], r[LOCAL]["spill_load_bytes"]) == (0, 0)
    local = r[LOCAL]
    assert (local["stl"], local["stl_bytes"], local["ldl"], local["ldl_bytes"]) == (1, 16, 1, 4)
    assert r[FWD]["stl"] == r[FWD]["ldl"] == r[FWD]["spill_store_bytes"] == 0


@pytest.mark.parametrize(
    "opcode, label, nbytes",
    [
        ("LDG.E.128.CONSTANT", "128", 16),
        ("LDG.E.64.CONSTANT", "64", 8),
        ("LDG.E.CONSTANT", "32", 4),
        ("LDG.E", "32", 4),
        ("LDG.E.U16.CONSTANT", "U16", 2),
        ("STG.E.U8", "U8", 1),
        ("LDG.E.LTC128B.128", "128", 16),
        ("STL.64", "64", 8),
        ("LDL.LU", "32", 4),
    ],
)
def test_access_width(opcode, label, nbytes):
    assert sr.access_width(opcode) == label and sr.width_bytes(label) == nbytes


def test_global_widths_mufu_and_instruction_count():
    r = rows()
    assert r[FWD]["ldg"] == {"128": 1} and r[FWD]["stg"] == {"32": 1}
    assert r[BWD]["ldg"] == {"32": 1}
    assert r[HALF]["ldg"] == {"U16": 1} and r[HALF]["stg"] == {"U16": 1}
    assert r[DOUBLE]["ldg"] == {"64": 1} and r[DOUBLE]["stg"] == {"64": 1}
    assert r[FWD]["mufu"] == {"EX2": 2, "RCP": 2}  # the predicated @!P0 MUFU.RCP counts too
    assert r[FWD]["instructions"] == 8  # 9 listed, the NOP left out
    assert r[DOUBLE]["mufu"] == {}


def test_names_demangled_and_shortened():
    r = rows()
    assert r[FWD]["kernel"] == "mcloss::cuda::mc_loss_tile_forward_kernel<float>"
    assert r[HALF]["kernel"] == "mcloss::cuda::(anonymous namespace)::copy_kernel<c10::Half, 1>"
    assert sr.demangle([FWD, HALF]) == {FWD: DEMANGLED[FWD], HALF: DEMANGLED[HALF]}  # c++filt


def test_fused_pattern():
    def match(name):
        return re.search(sr.FUSED_FP32_PATTERN, name) is not None

    assert match("mcloss::cuda::mc_loss_tile_forward_kernel<float>")
    assert match("mcloss::cuda::(anonymous namespace)::mc_loss_tile_backward_kernel<float, 256>")
    assert not match("mcloss::cuda::mc_loss_tile_forward_kernel<double>")
    assert not match("mcloss::cuda::mc_loss_tile_forward_kernel<c10::Half, float>")
    assert not match("mcloss::cuda::mc_loss_tail_kernel<float>")
    assert not match("mcloss::cuda::mc_loss_tile_forward_kernel<float4>")


def test_check_passes_clean_kernels():
    assert sr.check(list(rows([FWD, HALF, DOUBLE]).values())) == []


def test_check_fails_on_spills_and_local_memory():
    problems = sorted(sr.check(list(rows([FWD, REGSPILL, LOCAL]).values())))
    assert problems == [
        "spills/local memory in sm_90 mcloss::cuda::regspill_kernel<float>: "
        "spill stores 12 B, spill loads 4 B, 2 STL, 1 LDL",
        "spills/local memory in sm_90 mcloss::cuda::spill_kernel<float>: "
        "spill stores 0 B, spill loads 0 B, 1 STL, 1 LDL",
    ]


def test_check_fails_on_fused_fp32_kernel_without_128_bit_load():
    (problem,) = sr.check(list(rows([FWD, BWD]).values()))
    assert problem == (
        "no 128-bit global load in fused fp32 kernel sm_90 "
        "mcloss::cuda::mc_loss_tile_backward_kernel<float>: loads by width 32:1"
    )


def test_check_fails_without_fused_kernel():
    (problem,) = sr.check(list(rows([HALF, DOUBLE]).values()))
    assert problem.startswith("no fused fp32 kernel: no kernel name matches /_tile_")
    # --expect-fused overrides the pattern: now the Half copy kernel must load 128 bits
    (problem,) = sr.check(list(rows([FWD, HALF]).values()), r"copy_kernel<c10::Half")
    assert problem.startswith(
        "no 128-bit global load in fused fp32 kernel sm_90 "
        "mcloss::cuda::(anonymous namespace)::copy_kernel<c10::Half, 1>"
    )


def fake_tools(monkeypatch, tmp_path, keep=tuple(DEMANGLED), cpu_only=False):
    """Replace the tools by the canned outputs; returns the .so path to pass."""
    monkeypatch.setenv("CUOBJDUMP", "cuobjdump")
    monkeypatch.setenv("NVDISASM", "nvdisasm")

    def run_tool(argv, cwd=None, stdin=None):
        def done(rc=0, out="", err=""):
            return subprocess.CompletedProcess(argv, rc, out, err)

        if cpu_only:
            return done(255, err=CPU_ONLY_STDERR)
        if "-xelf" in argv:  # writes the cubins into cwd, as cuobjdump does
            open(os.path.join(cwd, "_C.1.sm_90.cubin"), "w").close()
            return done(out="Extracting ELF file    1: _C.1.sm_90.cubin\n")
        if "-res-usage" in argv:
            return done(out=RES_USAGE)
        if argv[0] == "nvdisasm":
            return done(out=sass_json(keep))
        return done(out="".join(DEMANGLED.get(n, n) + "\n" for n in stdin.split()))  # c++filt

    monkeypatch.setattr(sr, "run_tool", run_tool)
    return str(tmp_path / "_C.so")


def test_main_check_fails_and_writes_json(monkeypatch, tmp_path, capsys):
    so = fake_tools(monkeypatch, tmp_path)
    assert (
        sr.main(
            [
                "--so",
                so,
                "--check",
                "--json",
                str(tmp_path / "r.json"),
                "--markdown",
                str(tmp_path / "r.md"),
            ]
        )
        == 1
    )
    out, err = capsys.readouterr()
    assert (
        "| sm_90 | `mcloss::cuda::mc_loss_tile_forward_kernel<float>` | 18 | 0 | 2048 | 0/0 "
        "| 0/0 | 128:1 | 32:1 | 4 (EX2:2 RCP:2) | 8 |"
    ) in out
    assert err.count("FAIL: spills/local memory") == 2 and err.count("FAIL: no 128-bit") == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["kernels"]) == 6 and len(report["problems"]) == 3
    md = (tmp_path / "r.md").read_text()
    assert "| sm_90 |" in md and md.count("- problem: ") == 3


def test_main_check_passes(monkeypatch, tmp_path, capsys):
    so = fake_tools(monkeypatch, tmp_path, keep=[FWD, HALF, DOUBLE])
    assert sr.main(["--so", so, "--check"]) == 0
    assert "check passed: 3 functions" in capsys.readouterr().out


def test_main_cpu_only(monkeypatch, tmp_path, capsys):
    so = fake_tools(monkeypatch, tmp_path, cpu_only=True)
    assert sr.main(["--so", so, "--check"]) == 1
    err = capsys.readouterr().err
    assert "contains no CUDA device code (a CPU-only build)" in err and "--allow-cpu-only" in err
    assert sr.main(["--so", so, "--check", "--allow-cpu-only"]) == 0
    assert "note:" in capsys.readouterr().out


def test_real_extension(tmp_path):
    """The script on the built extension, if cuobjdump/nvdisasm are installed and it has SASS."""
    import mcloss_cuda

    so = sorted(glob.glob(os.path.join(os.path.dirname(mcloss_cuda.__file__), "_C*.so")))
    if not so:
        pytest.skip("no compiled mcloss_cuda/_C*.so next to the imported package")
    try:
        cuobjdump, _ = sr.find_tool("cuobjdump"), sr.find_tool("nvdisasm")
    except SystemExit:
        pytest.skip(f"cuobjdump/nvdisasm not installed (pip install {sr.TOOL_PACKAGES})")
    probe = subprocess.run([cuobjdump, "-lelf", so[0]], capture_output=True, text=True)
    if sr.NO_DEVICE_CODE in probe.stderr + probe.stdout:
        pytest.skip(f"{so[0]} is a CPU-only build: no SASS to report")
    out = subprocess.run(
        [sys.executable, SCRIPT, "--so", so[0], "--json", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )  # no --check: report only
    assert out.returncode == 0, out.stderr
    assert [line for line in out.stdout.splitlines() if line.startswith("| sm_")], out.stdout
    assert json.loads((tmp_path / "r.json").read_text())["kernels"]


def test_cubin_names_with_and_without_an_index():
    # several compilation units: NAME.<index>.sm_XX.cubin; setup.py's one .cu: NAME.sm_XX.cubin
    assert sr.cubin_name("/w/x.3.sm_90.cubin") == (3, "sm_90")
    assert sr.cubin_name("/w/mcloss_cuda.sm_80.cubin") == (0, "sm_80")
    assert sr.cubin_name("/w/mcloss_cuda.sm_90a.cubin") == (0, "sm_90a")
    assert sr.cubin_name("/w/x.ptx") is None

#!/usr/bin/env bash
# One-shot check of mcloss_cuda on a GPU machine, from a fresh copy of the repository:
# build the CUDA extension in place, run the tests, run compute-sanitizer (memcheck and
# racecheck) over every op forward+backward, run the CUDA benchmark, and write a summary.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]     # OUTDIR: first argument, else $OUT, else ./gpu_out
#
# Every stage has its own timeout (override with T_BUILD, T_TESTS, T_MEMCHECK, T_RACECHECK,
# T_BENCH, in seconds) so that the whole script ends within 9 minutes on 16 cores; a failing
# stage does not stop the later ones (set -u, deliberately not set -e). Each stage's exit
# status and duration go to OUTDIR/summary.txt; 124 means the stage hit its timeout.
set -u

OUT_DIR="${1:-${OUT:-./gpu_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"          # absolute, before we change directory
cd "$(dirname "$0")/.." || exit 1           # the repository root
REPO="$(pwd)"

export MAX_JOBS=16
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MCLOSS_BUILD=cuda
export PYTHONUNBUFFERED=1
# the sources are built in place; make sure the checkout's package is the one imported
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-$(command -v python || command -v python3)}"

# Budget (s): 150 + 10 + 120 + 50 + 50 + 60 + 140 = 580 at most, usually far less.
T_BUILD="${T_BUILD:-150}"
T_SMI="${T_SMI:-10}"
T_TESTS="${T_TESTS:-120}"
T_MEMCHECK="${T_MEMCHECK:-50}"
T_RACECHECK="${T_RACECHECK:-50}"
T_BENCH="${T_BENCH:-140}"

SUMMARY="$OUT_DIR/summary.txt"
SCRIPT_T0="$(date +%s.%N)"
{
  echo "mcloss_cuda GPU check — $(date -Is) on $(hostname)"
  echo "repo: $REPO  commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'n/a (not a git checkout)')"
  echo "python: $PY  MAX_JOBS=$MAX_JOBS  TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST  MCLOSS_BUILD=$MCLOSS_BUILD"
  echo
  printf '%-10s %5s %9s  %s\n' stage rc seconds log
} > "$SUMMARY"

# run_stage NAME TIMEOUT STDOUT_FILE STDERR_FILE CMD...   (same file twice: both streams there)
run_stage() {
  local name="$1" limit="$2" out="$3" err="$4"
  shift 4
  echo "=== [$name] (timeout ${limit}s): $*"
  local t0 rc t1
  t0="$(date +%s.%N)"
  if [ "$out" = "$err" ]; then
    timeout -k 10 "$limit" "$@" >"$out" 2>&1
  else
    timeout -k 10 "$limit" "$@" >"$out" 2>"$err"
  fi
  rc=$?
  t1="$(date +%s.%N)"
  local dt
  dt="$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')"
  printf '%-10s %5s %9s  %s\n' "$name" "$rc" "$dt" "$(basename "$err")" >> "$SUMMARY"
  echo "--- [$name] rc=$rc in ${dt}s; last lines of $(basename "$err"):"
  tail -n 8 "$err" | sed 's/^/    /'
  echo
  return 0
}

# ---- 1. build the extension in place -----------------------------------------------------
run_stage build "$T_BUILD" "$OUT_DIR/build.log" "$OUT_DIR/build.log" \
  "$PY" setup.py build_ext --inplace

# what got built and what will run (recorded whatever the build's outcome)
"$PY" - >> "$SUMMARY" 2>&1 <<'EOF'
import torch
try:
    import mcloss_cuda as mc
    from mcloss_cuda import _ops
    print(f"\ntorch {torch.__version__} CUDA {torch.version.cuda}; "
          f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print(f"extension loaded: {_ops.AVAILABLE}  built_with_cuda: {mc.built_with_cuda()}  "
          f"backend(cuda): {mc.backend('cuda')}  backend(cpu): {mc.backend('cpu')}")
    if _ops.LOAD_ERROR is not None:
        print(f"load error: {_ops.LOAD_ERROR}")
    print()
except Exception as e:
    print(f"\nimport mcloss_cuda failed: {type(e).__name__}: {e}\n")
EOF

# ---- 2. the GPU ----------------------------------------------------------------------------
run_stage nvidia-smi "$T_SMI" "$OUT_DIR/nvidia-smi.log" "$OUT_DIR/nvidia-smi.log" nvidia-smi
cat "$OUT_DIR/nvidia-smi.log"

# ---- 3. the test suite, its CUDA half -----------------------------------------------------
# Every test id that names the cuda device or a CUDA-only check (CI runs the CPU half on
# every change). Not -x: one GPU session should list every failure, up to a limit.
run_stage tests "$T_TESTS" "$OUT_DIR/tests.log" "$OUT_DIR/tests.log" \
  "$PY" -m pytest -q -rfE --maxfail=30 -k cuda tests

# ---- 4. compute-sanitizer over every op, forward and backward, on small CUDA inputs --------
SANITIZER="$(command -v compute-sanitizer || true)"
for cand in "${CUDA_HOME:-}/bin/compute-sanitizer" "${CUDA_HOME:-}/compute-sanitizer/compute-sanitizer" \
            /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer \
            /usr/local/cuda-*/bin/compute-sanitizer; do
  if [ -z "$SANITIZER" ] && [ -x "$cand" ]; then SANITIZER="$cand"; fi
done

OPS_SCRIPT="$OUT_DIR/sanitize_ops.py"
cat > "$OPS_SCRIPT" <<'EOF'
# Every mcloss_cuda op, forward and backward, on CUDA: small shapes that still cover
# uniform and uneven groups, maps larger than one block, channels_last, per-sample masks and
# all four dtypes. Meant to run under compute-sanitizer, so it stays small.
import torch
import mcloss_cuda as mc

dev = "cuda"
print("backend(cuda):", mc.backend(dev), flush=True)
if mc.backend(dev) != "cuda":
    print("WARNING: the CUDA kernels are not active; this only exercises the reference path")
torch.manual_seed(0)
# (B, C, H, W, K, cnum): cnum None = balanced split (uneven where K does not divide C)
# (1, 128, 32, 32, 2, 64): 256 KiB per group, past the tiles: the stream kernels
cases = [(3, 12, 5, 7, 4, 3), (2, 10, 6, 6, 3, None), (2, 600, 14, 14, 200, 3),
         (2, 2048, 7, 7, 200, None), (1, 6, 40, 45, 2, 3), (2, 5, 1, 1, 5, 1),
         (1, 128, 32, 32, 2, 64)]
n = 0
for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    for B, C, H, W, K, cnum in cases:
        layouts = (False, True) if dtype == torch.float32 else (False,)
        for channels_last in layouts:
            x = torch.randn(B, C, H, W, device=dev, dtype=dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            y = torch.randint(0, K, (B,), device=dev)
            base, extra = divmod(C, K)
            counts = [cnum] * K if cnum else [base + (i < extra) for i in range(K)]
            mask = mc.random_channel_mask(K, counts, device=dev)
            mask_b = mc.random_channel_mask(K, counts, batch=B, device=dev).to(dtype)
            mc.mc_loss(x, y, K, cnum).loss.backward()
            mc.mc_loss(x, y, K, cnum, per_sample_mask=True).loss.backward()
            mc.mc_loss(x, y, K, cnum, mask=mask_b).loss.backward()
            mc.mc_loss(x, y, K, cnum, mask=mask).logits.sum().backward()  # bool mask, no cast
            # a data pointer 4 bytes past 16-byte alignment: the tiles' unaligned head and tail
            xm = torch.randn(x.numel() + 1, device=dev, dtype=dtype)[1:].view(x.shape)
            mc.mc_loss(xm.requires_grad_(True), y, K, cnum).loss.backward()
            mc.diversity_loss(x, K, cnum).backward()
            mc.discriminality_logits(x, K, mask, cnum).sum().backward()
            for f in (mc.spatial_softmax, lambda t: mc.channel_mask(t, mask),
                      lambda t: mc.ccmp(t, counts)):
                out = f(x)
                out.backward(torch.randn_like(out))
            n += 1
    torch.cuda.synchronize()
    # progress, so a run cut short by its timeout still shows how far it got
    print(f"{dtype}: done ({n} configurations so far)", flush=True)
torch.cuda.synchronize()
print(f"ran {n} configurations: ok", flush=True)
EOF

if [ -n "$SANITIZER" ]; then
  echo "compute-sanitizer: $SANITIZER"
  # No caching allocator: every tensor is its own allocation, so memcheck sees its bounds.
  run_stage memcheck "$T_MEMCHECK" "$OUT_DIR/memcheck.log" "$OUT_DIR/memcheck.log" \
    env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --leak-check no \
    --error-exitcode 3 --print-limit 100 "$PY" "$OPS_SCRIPT"
  run_stage racecheck "$T_RACECHECK" "$OUT_DIR/racecheck.log" "$OUT_DIR/racecheck.log" \
    "$SANITIZER" --tool racecheck --error-exitcode 3 --print-limit 100 "$PY" "$OPS_SCRIPT"
else
  echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda*/bin)" \
    | tee "$OUT_DIR/memcheck.log" "$OUT_DIR/racecheck.log"
  printf '%-10s %5s %9s  %s\n' memcheck "n/a" 0 "compute-sanitizer not found" >> "$SUMMARY"
  printf '%-10s %5s %9s  %s\n' racecheck "n/a" 0 "compute-sanitizer not found" >> "$SUMMARY"
fi

# ---- 5. the SASS of the build (registers, spills, load widths; no GPU needed) ------------------
run_stage sass 60 "$OUT_DIR/sass_report.txt" "$OUT_DIR/sass_report.log" \
  "$PY" benchmarks/sass_report.py --check --markdown "$OUT_DIR/sass_report.md"

# ---- 6. the benchmark ----------------------------------------------------------------------
# --time-limit: start no new shape after that many seconds, so the stage ends inside its
# timeout with a table (shapes not reached are listed under it) rather than being killed.
run_stage bench "$T_BENCH" "$OUT_DIR/bench_cuda.md" "$OUT_DIR/bench_cuda.log" \
  "$PY" benchmarks/bench.py --device cuda --time-limit "$((T_BENCH - 45))" \
  --json "$OUT_DIR/bench_cuda.json" --plot "$OUT_DIR/bench_cuda.png"
cat "$OUT_DIR/bench_cuda.md"

TOTAL="$(awk -v a="$SCRIPT_T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
{
  echo
  echo "total: ${TOTAL}s"
  echo "tests: $(grep -E '[0-9]+ (passed|failed|errors?)' "$OUT_DIR/tests.log" | tail -n 1 || true)"
} >> "$SUMMARY"
echo "=== summary ($SUMMARY)"
cat "$SUMMARY"

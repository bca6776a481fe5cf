#!/usr/bin/env bash
# The one device call: build the CUDA extension for the visible card, run the whole test suite
# (CUDA parts included) and the CUDA benchmark, leave everything under $OUT, print a summary.
# Budget: 8 minutes on an H100/H200 with 16 cores (build ~2 min, tests <= 170 s, bench <= 190 s).
#   OUT=/some/dir bash scripts/gpu_check.sh
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
START=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*"; }

PY="${PYTHON:-python}"
stamp "python: $(command -v "$PY"); torch: $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true

# Optional peer for the benchmark: a Liger-Kernel wheel shipped with the repo (no network here).
LIGER_WHEEL="$(ls shared/wheels/liger_kernel*.whl ./wheels/liger_kernel*.whl 2>/dev/null | head -1 || true)"
if [[ -n "$LIGER_WHEEL" ]]; then
  stamp "installing $LIGER_WHEEL"
  "$PY" -m pip install --no-deps --no-index "$LIGER_WHEEL" >"$OUT/liger_install.txt" 2>&1 \
    || stamp "Liger install failed (benchmark runs without it)"
fi

# Build for the visible card only (setup.py picks its compute capability; CUDA_HOME is found
# by setup.py itself).
stamp "building (TORCH_LOSSES_CUDA=1, MAX_JOBS=16)"
BUILD_RC=0
TORCH_LOSSES_CUDA=1 MAX_JOBS=16 "$PY" -m pip install --no-build-isolation -e . \
  >"$OUT/build.txt" 2>&1 || BUILD_RC=$?
if [[ $BUILD_RC -ne 0 ]]; then
  tail -60 "$OUT/build.txt"
  stamp "BUILD FAILED (rc $BUILD_RC); full log in $OUT/build.txt"
  exit $BUILD_RC
fi
"$PY" -c "import torch, torch_losses; print('ops:', torch.ops.torch_losses.cross_entropy_fwd.default)" \
  | tee -a "$OUT/build.txt"
stamp "built"

# Tests: the whole suite, CUDA included. Keep going to the benchmark when tests fail.
TEST_RC=0
timeout 170 "$PY" -m pytest -q --maxfail=50 -p no:cacheprovider tests 2>&1 \
  | tee "$OUT/pytest.txt" || TEST_RC=${PIPESTATUS[0]}
stamp "tests done (rc $TEST_RC)"

# Benchmark (CUDA). Its own folder under $OUT.
BENCH_RC=0
timeout 190 "$PY" benchmarks/bench.py --device cuda --out "$OUT/bench" >"$OUT/bench.txt" 2>&1 \
  || BENCH_RC=$?
stamp "bench done (rc $BENCH_RC)"
mkdir -p "$OUT/bench"
cp -f "$OUT"/bench/results.* "$OUT/" 2>/dev/null || true

echo "==================== summary ===================="
cat "$OUT/gpu.txt" 2>/dev/null || true
echo "build: ok"
echo "tests: rc $TEST_RC: $(grep -E '(passed|failed|error)' "$OUT/pytest.txt" | tail -1)"
grep -E '^(FAILED|ERROR)' "$OUT/pytest.txt" | head -20 || true
echo "bench: rc $BENCH_RC"
if [[ -f "$OUT/bench/results.md" ]]; then cat "$OUT/bench/results.md"; else tail -20 "$OUT/bench.txt"; fi
stamp "total"
exit $(( TEST_RC != 0 || BENCH_RC != 0 ))

#!/usr/bin/env bash
# The one device call: check the tools, build the CUDA extension for the visible card, run the
# CUDA tests first (so a slow benchmark can never cost their results), then the rest of the
# suite and the CUDA benchmark; every result is written under $OUT as it comes, and the summary
# is printed last.
#   OUT=/some/dir bash scripts/gpu_check.sh
# Budget: 8 minutes on an H100/H200 with 16 cores, with room to spare: everything within
# BUDGET_S (450 s): build <= 200 s, test_cuda.py <= 100 s, the other CUDA tests <= 60 s, the
# benchmark whatever is left (>= 30 s). Each step's timeout sends SIGINT first (then KILL 20 s
# later), so pytest still prints which tests failed and the benchmark keeps what it measured.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
START=$(date +%s)
BUDGET_S=${BUDGET_S:-450}
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
stamp() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*"; }
note() { echo "$*" >>"$SUMMARY"; stamp "$*"; }
print_summary() {
  echo "==================== summary ===================="
  cat "$OUT/gpu.txt" 2>/dev/null || true
  cat "$SUMMARY"
  stamp "total"
}

# ---- preflight: fail fast, saying what is missing -----------------------------------------------
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if command -v python >/dev/null 2>&1; then PY=python
  elif command -v python3 >/dev/null 2>&1; then PY=python3
  fi
fi
MISSING=()
if [[ -z "$PY" ]] || ! command -v "$PY" >/dev/null 2>&1; then
  MISSING+=("python (${PY:-neither python nor python3} not found on PATH; set PYTHON=...)")
  PY=python3
else
  "$PY" - >"$OUT/preflight.txt" 2>&1 <<'EOF' || true
import importlib, sys
missing = []
for mod, pip_name in [("torch", "torch"), ("pytest", "pytest"), ("numpy", "numpy"),
                      ("setuptools", "setuptools>=77"), ("ninja", "ninja")]:
    try:
        m = importlib.import_module(mod)
    except Exception:
        missing.append(pip_name)
        continue
    # pyproject.toml's build-system floor (its SPDX license string): an older setuptools
    # fails the build only after the preflight.
    if mod == "setuptools" and int(m.__version__.split(".")[0]) < 77:
        missing.append(f"setuptools>=77 (found {m.__version__})")
    if mod == "torch" and not m.cuda.is_available():
        missing.append(f"a CUDA torch with a visible GPU (torch {m.__version__}, "
                       f"cuda {m.version.cuda}, is_available() False)")
print("MISSING:" + "|".join(missing))
print(f"python {sys.version.split()[0]} at {sys.executable}")
EOF
  while IFS= read -r m; do [[ -n "$m" ]] && MISSING+=("$m"); done < <(
    sed -n 's/^MISSING://p' "$OUT/preflight.txt" | tr '|' '\n')
fi
command -v nvcc >/dev/null 2>&1 || [[ -n "${CUDA_HOME:-}" ]] \
  || MISSING+=("nvcc (not on PATH and CUDA_HOME unset)")
if (( ${#MISSING[@]} )); then
  stamp "preflight FAILED; missing:"
  printf '  - %s\n' "${MISSING[@]}" | tee -a "$SUMMARY"
  stamp "install with: $PY -m pip install 'setuptools>=77' ninja pytest numpy (torch: a CUDA build)"
  exit 2
fi
stamp "$(tail -1 "$OUT/preflight.txt"); torch: $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" \
  || true

# Optional peer for the benchmark: a Liger-Kernel wheel shipped with the repo (no network here).
LIGER_WHEEL="$(ls shared/wheels/liger_kernel*.whl ./wheels/liger_kernel*.whl 2>/dev/null | head -1 || true)"
if [[ -n "$LIGER_WHEEL" ]]; then
  stamp "installing $LIGER_WHEEL"
  "$PY" -m pip install --no-deps --no-index "$LIGER_WHEEL" >"$OUT/liger_install.txt" 2>&1 \
    || stamp "Liger install failed (benchmark runs without it)"
fi

# ---- build for the visible card only (setup.py picks its compute capability and CUDA_HOME) ------
stamp "building (TORCH_LOSSES_CUDA=1, MAX_JOBS=16)"
BUILD_RC=0
# --no-deps --no-index and no version check: the machine has no network, so pip must not try it.
TORCH_LOSSES_CUDA=1 MAX_JOBS=16 PIP_DISABLE_PIP_VERSION_CHECK=1 timeout -s INT -k 10 200 \
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/build.txt" 2>&1 \
  || BUILD_RC=$?
if [[ $BUILD_RC -ne 0 ]]; then
  tail -60 "$OUT/build.txt"
  note "build: FAILED (rc $BUILD_RC); full log in $OUT/build.txt"
  print_summary
  exit $BUILD_RC
fi
"$PY" -c "import torch_losses, torch; print(torch.ops.torch_losses.cross_entropy_fwd.default)" \
  | tee -a "$OUT/build.txt"
note "build: ok"

# ---- tests: the CUDA ones first, each file's failures listed (-rfE) ------------------------------
run_pytest() {  # name, seconds, pytest args...
  local name=$1 secs=$2
  shift 2
  local rc=0
  timeout -s INT -k 20 "$secs" "$PY" -m pytest -q -rfE -p no:cacheprovider "$@" \
    >"$OUT/$name.txt" 2>&1 || rc=$?
  tail -3 "$OUT/$name.txt"
  local line
  line=$(grep -E '[0-9]+ (passed|failed|error)' "$OUT/$name.txt" | tail -1)
  [[ $rc -eq 124 || $rc -eq 137 ]] && line="TIMED OUT after ${secs}s (SIGINT); ${line}"
  note "$name: rc $rc: ${line:-no pytest summary}"
  grep -E '^(FAILED|ERROR)' "$OUT/$name.txt" | head -20 >>"$SUMMARY"
  return $rc
}
TEST_RC=0
run_pytest pytest_cuda 100 tests/test_cuda.py || TEST_RC=1
# The device-parametrized tests on CUDA (the emulator's suite runs in CI, not here).
run_pytest pytest_cuda_all 60 tests -k cuda --ignore=tests/test_cuda.py \
  --ignore=tests/test_cuda_emu.py --maxfail=50 || TEST_RC=1

# ---- benchmark (CUDA), its own folder under $OUT -------------------------------------------------
BENCH_RC=0
BENCH_S=$(( BUDGET_S - ($(date +%s) - START) ))
(( BENCH_S < 30 )) && BENCH_S=30
stamp "benchmark (timeout ${BENCH_S}s)"
timeout -s INT -k 20 "$BENCH_S" "$PY" benchmarks/bench.py --device cuda --out "$OUT/bench" \
  >"$OUT/bench.txt" 2>&1 || BENCH_RC=$?
BENCH_NOTE=""
[[ $BENCH_RC -eq 124 || $BENCH_RC -eq 137 ]] && BENCH_NOTE=" (timed out after ${BENCH_S}s)"
note "bench: rc ${BENCH_RC}${BENCH_NOTE}"
mkdir -p "$OUT/bench"
cp -f "$OUT"/bench/results.* "$OUT/" 2>/dev/null || true
if [[ -f "$OUT/bench/results.md" ]]; then cat "$OUT/bench/results.md" >>"$SUMMARY"
else tail -20 "$OUT/bench.txt" >>"$SUMMARY"; fi

print_summary
exit $(( TEST_RC != 0 || BENCH_RC != 0 ))

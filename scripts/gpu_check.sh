#!/usr/bin/env bash
# The GPU check in one command: the CUDA tests (`pytest -m gpu`), then `pcm bench` on the shipped PushT checkpoints
# (sequential DDPM-100 and DDIM-10, Picard, PCM, PCM-LoRA; eager and CUDA-graph rows). It writes to $OUT (which the
# device tool brings back) or, when OUT is unset, to outputs/gpu_check/:
#   gpu_bench.json, gpu_bench.md   both benches, speed-ups against the sequential row of the same mode, the targets,
#                                  each step's status and the tests' summary
#   gpu_bench_<schedule>.png       `pcm bench`'s plot per sampling schedule
#   gpu_tests.log, gpu_check.log   pytest's output; the environment and every other step's output
#
#   bash scripts/gpu_check.sh            on the GPU machine: its python3 plus the wheels and bench observations that
#                                        `make gpu-wheels` put in .whl/ (device run with carry: [".whl"])
#   bash scripts/gpu_check.sh --dry-run  the same steps on this CPU, tiny sizes, in the project's .venv, refusing
#                                        the packages the GPU machine lacks (about 3 minutes here)
#
# Every step runs under `timeout`, so a hang costs that step only and the report covers whatever finished. Expected on
# an H200: about 5 minutes (wheels ~10 s, tests ~1.5 min, each bench ~1.7 min: its chunks are sized to ~80 s of timed
# sampling, 120 s if CUDA graphs bought nothing); at most 9.7 minutes with every step at its limit, inside the
# device's 10-minute command limit.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

OUT_DIR=${OUT:-$ROOT/outputs/gpu_check}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOG=$OUT_DIR/gpu_check.log
TESTS_LOG=$OUT_DIR/gpu_tests.log
: > "$LOG"
: > "$TESTS_LOG"
rm -f "$OUT_DIR"/gpu_bench.json "$OUT_DIR"/gpu_bench.md "$OUT_DIR"/gpu_bench_*.png "$OUT_DIR"/gpu_bench_*.md  # no stale results
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1 PYGAME_HIDE_SUPPORT_PROMPT=1
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1  # only the plugins named below: the same set here and on the device
export TQDM_MININTERVAL=10  # progress bars in a log file: a line every 10 s is plenty
SCHEDULES=(ddim10 ddpm100)  # DDIM-10 first: the configuration the project ships its PCM for

if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  [ -x .venv/bin/python ] || make setup
  PY=$ROOT/.venv/bin/python
  LABEL="bash scripts/gpu_check.sh --dry-run"
  OBS=$WORK/pusht_bench_observations.safetensors
  BENCH_SIZES=(--budget-s 4 --min-chunks 1 --max-chunks 2)
  BENCH_OVERRIDES=(warmup=1)
  T_TESTS=420; T_BENCH=240; T_REPORT=120; T_WHEELS=120
  export OMP_NUM_THREADS=1  # this machine's cores are shared
else
  DEVICE=cuda
  PY=${PCM_PYTHON:-python3}
  LABEL="bash scripts/gpu_check.sh"
  OBS=$ROOT/.whl/pusht_bench_observations.safetensors
  BENCH_SIZES=(--budget-s 120 --min-chunks 20 --max-chunks 1000)
  BENCH_OVERRIDES=()
  T_TESTS=170; T_BENCH=160; T_REPORT=40; T_WHEELS=40
fi

log() { echo "[$(date +%T)] $*" | tee -a "$LOG"; }
FAILED=0
# run_step NAME SECONDS LOGFILE COMMAND...: run COMMAND under a time limit, append its output to LOGFILE, record
# its exit status and duration for the report.
run_step() {
  local name=$1 secs=$2 out=$3 t0=$SECONDS rc
  shift 3
  log "step $name (limit ${secs} s)"
  timeout -k 10 "$secs" "$@" >> "$out" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$WORK/steps.tsv"
  case $rc in
    0) log "step $name: ok, $((SECONDS - t0)) s" ;;
    124|137) log "step $name: TIMED OUT after ${secs} s (see $(basename "$out"))"; FAILED=1 ;;
    *) log "step $name: FAILED with exit $rc after $((SECONDS - t0)) s (see $(basename "$out"))"; FAILED=1 ;;
  esac
}

log "$LABEL: output in $OUT_DIR"
{
  timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: none"
  timeout 60 "$PY" -c 'import platform, torch; print("python", platform.python_version(), "torch", torch.__version__,
"cuda", torch.version.cuda, "available", torch.cuda.is_available())'
  git rev-parse HEAD 2>/dev/null || true
} >> "$LOG" 2>&1

# The wheels for what the image lacks (diffusers, hydra-core, omegaconf, antlr4), in a temporary site folder.
SITE=$WORK/site
if compgen -G ".whl/*.whl" > /dev/null; then
  run_step wheels "$T_WHEELS" "$LOG" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$SITE" .whl/*.whl
elif [ "$DRY" = 0 ]; then
  log "no wheels in .whl/: run 'make gpu-wheels' here and carry .whl"; FAILED=1
fi
export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}

if [ "$DRY" = 1 ]; then
  # Here zarr is at hand: save the bench observations as `make gpu-wheels` does, then refuse what the device lacks.
  run_step observations 120 "$LOG" "$PY" scripts/gpu_check.py observations "$OBS" --chunks 4
  export PCM_BLOCK_IMPORTS=zarr,numcodecs,donfig,google_crc32c,gymnasium,gym_pusht,pygame,pymunk,shapely,robosuite,mujoco,imageio_ffmpeg
  export PYTHONPATH=$ROOT/scripts/device_image:$PYTHONPATH
fi

TEST_ARGS=(-m gpu --noconftest -p no:cacheprovider -rA tests/test_gpu.py)
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
  TEST_ARGS=(-p pytest_timeout --timeout 150 "${TEST_ARGS[@]}")
fi
run_step tests "$T_TESTS" "$TESTS_LOG" env PCM_GPU_TEST_DEVICE=$DEVICE "$PY" -m pytest "${TEST_ARGS[@]}"

for schedule in "${SCHEDULES[@]}"; do
  run_step "bench $schedule" "$T_BENCH" "$LOG" "$PY" scripts/gpu_check.py bench --schedule "$schedule" --observations "$OBS" \
    --output "$WORK/bench_$schedule" --device "$DEVICE" "${BENCH_SIZES[@]}" -- ${BENCH_OVERRIDES[@]+"${BENCH_OVERRIDES[@]}"}
done

run_step report "$T_REPORT" "$LOG" "$PY" scripts/gpu_check.py report --work "$WORK" --out "$OUT_DIR" \
  --schedules "${SCHEDULES[@]}" --tests-log "$TESTS_LOG" --label "$LABEL"
if [ -s "$OUT_DIR/gpu_bench.md" ]; then
  cat "$OUT_DIR/gpu_bench.md"
else  # keep what the benches wrote
  for schedule in "${SCHEDULES[@]}"; do
    [ -f "$WORK/bench_$schedule/bench.md" ] && cp "$WORK/bench_$schedule/bench.md" "$OUT_DIR/gpu_bench_$schedule.md" &&
      cat "$OUT_DIR/gpu_bench_$schedule.md"
  done
fi
tail -n 3 "$TESTS_LOG"
log "done in $SECONDS s; files: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
[ "$FAILED" = 0 ] || { log "some steps failed: see gpu_check.log and gpu_tests.log"; exit 1; }

#!/usr/bin/env bash
# One command for the GPU numbers of docs/results/speed_gpu.md (issue 23). Offline, installs nothing,
# needs only what requirements.txt lists minus submitit (torch 2.11 is enough). Within --budget seconds
# (default 480: 8 minutes on one H100), in this order, each part stopped at its share of the budget:
#   env.txt       the device, driver, torch, this checkout
#   train.txt     training throughput, CIFAR-size ResNet-18 width 64, random uint8 data on the device, batch
#                 128 and 512: img/s, TFLOP/s and share of the measured bf16 matmul peak, per variant
#                 (baseline loop, static shapes + fused SGD, torch.compile modes) (benchmarks/bench_gpu.py)
#   defenses.txt  ANP: seconds for 2000 iterations at width 64 (target: <= 15 s), then compiled; RNP's
#                 unlearning with the per-batch rule checked eagerly and deferred (same stop, same model?)
#   pipeline.txt  benchmarks/bench_pipeline.py's lines at width 64 (sweep, anp, rnp, train vs original-style)
#   grid.txt      configs/fmnist_gpu.yaml's 42 cells from scratch with --executor local-gpus: wall time
#                 (target: <= 6 minutes on one H100); table.md its table
#   summary.txt   everything above in one file
# At most 8 files in the output folder; the grid's own cells go to a temporary folder, removed at the end.
#
#   bash benchmarks/gpu_check.sh --out DIR [--data-dir DIR] [--budget SECONDS] [--cells-per-gpu N]
#                                [--parts train,defenses,pipeline,grid]
#   bash benchmarks/gpu_check.sh --device cpu --tiny --out DIR    # the same steps, CPU-sized (about a minute+)
#
# --data-dir: where Fashion-MNIST's four idx .gz files are (default: the loader's own places, e.g. Debian's
# /usr/share/datasets/fashion-mnist). --tiny: small sizes everywhere and a one-seed grid of the same shape
# on generated data (benchmarks/bench_gpu.py tiny-grid).
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEVICE=cuda TINY=0 OUT_DIR=${OUT:-} DATA_DIR="" BUDGET="" CELLS="" PARTS=train,defenses,pipeline,grid
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=${2:?--device needs a value}; shift 2 ;;
    --tiny) TINY=1; shift ;;
    --out) OUT_DIR=${2:?--out needs a folder}; shift 2 ;;
    --data-dir) DATA_DIR=${2:?--data-dir needs a folder}; shift 2 ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift 2 ;;
    --cells-per-gpu) CELLS=${2:?--cells-per-gpu needs a number}; shift 2 ;;
    --parts) PARTS=${2:?--parts needs a list}; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "error: gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$OUT_DIR" ] || { echo "error: gpu_check.sh: --out: give a folder (or set \$OUT)" >&2; exit 2; }
case "$DEVICE" in cpu|cuda|cuda:*) ;; *) echo "error: gpu_check.sh: --device: expected cpu or cuda, got $DEVICE" >&2; exit 2 ;; esac
for p in ${PARTS//,/ }; do
  case "$p" in train|defenses|pipeline|grid) ;; *) echo "error: gpu_check.sh: --parts: unknown part $p (train, defenses, pipeline, grid)" >&2; exit 2 ;; esac
done
want() { case ",$PARTS," in *",$1,"*) return 0 ;; esac; return 1; }
case "$BUDGET" in ''|*[!0-9]*) [ -z "$BUDGET" ] || { echo "error: gpu_check.sh: --budget: expected seconds, got $BUDGET" >&2; exit 2; } ;; esac
if [ -z "$BUDGET" ]; then if [ "$TINY" = 1 ]; then BUDGET=240; else BUDGET=480; fi; fi
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SUMMARY="$OUT_DIR/summary.txt"
for f in summary.txt env.txt train.txt defenses.txt pipeline.txt grid.txt table.md; do rm -f "$OUT_DIR/$f"; done
: > "$SUMMARY"
START=$(date +%s)

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# part FILE CAP command...: run it under min(CAP, what is left of the budget - 5 s), its output appended to
# FILE and the summary; a part that reaches its limit is stopped (SIGINT, then SIGKILL 20 s later) and says so.
part() {
  local file="$OUT_DIR/$1" cap=$2; shift 2
  local limit; limit=$(left); limit=$(( limit - 5 )); [ "$cap" -lt "$limit" ] && limit=$cap
  if [ "$limit" -le 0 ]; then say "(skipped: the ${BUDGET} s budget is spent): $*"; return 124; fi
  local began; began=$(date +%s)
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$WORK/part.txt" 2>&1
  local rc=$?
  cat "$WORK/part.txt" >> "$file"; cat "$WORK/part.txt" >> "$SUMMARY"; cat "$WORK/part.txt"
  if [ $rc = 124 ] || [ $rc = 137 ]; then say "(stopped at its ${limit} s limit)"
  elif [ $rc != 0 ]; then say "(exited with status $rc; the last lines above say why)"; fi
  say "($(( $(date +%s) - began )) s)"
  return $rc
}

say "== gpu_check: device $DEVICE, tiny $TINY, budget ${BUDGET} s, out $OUT_DIR"
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  git rev-parse --short HEAD 2> /dev/null && echo "$(git status --short 2> /dev/null | wc -l) files changed since"
  nproc
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt" | tee -a "$SUMMARY"

if [ "$TINY" = 1 ]; then
  TRAIN=(--tiny --width 4 --images 256 --batches 128 512 --compile-modes)
  ANP=(--width 4 --iters 2 --compile-modes)
  RNP=(--width 4 --epochs 1 --fit-epochs 2)
  PIPE=(--width 4 --test-images 32 --defense-images 32 --train-images 64 --iters 1 --repeat 1)
  CAPS=(100000 100000 100000 100000)  # only the budget: a loaded CPU must not cut a part short
else
  TRAIN=(--width 64 --images 50000 --batches 128 512 --compile-modes default reduce-overhead)
  ANP=(--width 64 --iters 2000 --compile-modes reduce-overhead)
  RNP=(--width 64 --epochs 5 --fit-epochs 15)
  PIPE=(--width 64 --test-images 1000 --defense-images 600 --train-images 5000 --iters 50 --repeat 1)
  CAPS=(90 100 30 120)
fi

if want train; then
  say "== training throughput"
  part train.txt "${CAPS[0]}" "$PYTHON" benchmarks/bench_gpu.py train --device "$DEVICE" "${TRAIN[@]}"
fi
if want defenses; then
  say "== ANP iterations"
  part defenses.txt "${CAPS[1]}" "$PYTHON" benchmarks/bench_gpu.py anp --device "$DEVICE" "${ANP[@]}"
  say "== RNP's per-batch stop rule, eager and deferred"
  part defenses.txt "${CAPS[2]}" "$PYTHON" benchmarks/bench_gpu.py rnp --device "$DEVICE" "${RNP[@]}"
fi
if want pipeline; then
  say "== bench_pipeline.py"
  part pipeline.txt "${CAPS[3]}" "$PYTHON" benchmarks/bench_pipeline.py --device "$DEVICE" --dataset fashion-mnist \
    "${PIPE[@]}"
fi
if ! want grid; then
  say "== gpu_check: $(( $(date +%s) - START )) s in all; files in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
  exit 0
fi

say "== grid: configs/fmnist_gpu.yaml from scratch"
if [ "$TINY" = 1 ]; then
  CONFIG=$("$PYTHON" benchmarks/bench_gpu.py tiny-grid --dir "$WORK") || { say "(tiny-grid failed)"; exit 1; }
  GRID=(--config "$CONFIG" --executor local)
else
  GRID=(--config configs/fmnist_gpu.yaml --output-dir "$WORK/grid" --device "$DEVICE" --executor local-gpus)
  [ -n "$DATA_DIR" ] && GRID+=(--data-dir "$DATA_DIR")
  [ -n "$CELLS" ] && GRID+=(--cells-per-gpu "$CELLS")
fi
GRID_START=$(date +%s)
part grid.txt 100000 "$PYTHON" reproduce.py "${GRID[@]}"
GRID_RC=$?
GRID_SECONDS=$(( $(date +%s) - GRID_START ))
DONE_LINE=$(grep -o '\[[0-9]*/[0-9]*\]' "$OUT_DIR/grid.txt" | tail -1)
TABLE=$(find "$WORK" -name table.md 2> /dev/null | head -1)
[ -n "$TABLE" ] && cp "$TABLE" "$OUT_DIR/table.md"
if [ "$GRID_RC" = 0 ]; then
  say "grid: every cell done in ${GRID_SECONDS} s (cells finished ${DONE_LINE:-[?]})"
else
  say "grid: not complete after ${GRID_SECONDS} s (cells finished ${DONE_LINE:-none}); see grid.txt"
fi
say "== gpu_check: $(( $(date +%s) - START )) s in all; files in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"

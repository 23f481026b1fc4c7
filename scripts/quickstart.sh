#!/usr/bin/env bash
# The README's Quick start: one backdoored model and one defense on real data, offline, on the CPU in a few
# minutes, run as a one-seed grid (configs/quickstart.yaml: its settings and why). Artifacts and the stage
# commands it ran land in ${OUT:-runs/quickstart}; the same config with --seeds 0 1 2 3 4 gives the five-seed
# table of this very setting (docs/results/quickstart.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/quickstart}
mkdir -p "$(dirname "$OUT")"
# the grid's progress lines live; the rest (its table, the stages' own logs) in $OUT.log and the cell folders
python3 -u reproduce.py --config configs/quickstart.yaml --output-dir "$OUT" 2>&1 | tee "$OUT.log" \
    | grep --line-buffered -E '^\[[0-9]+/[0-9]+\]|^summary|cells: |^error|FAILED' || true
if ! grep -q '^summary: .* 0 failed, 0 blocked' "$OUT.log"; then
    tail -20 "$OUT.log"; echo "quickstart failed: the whole log is in $OUT.log"; exit 1
fi
python3 - "$OUT" <<'PY'
import csv, json, os, sys
sys.path.insert(0, ".")
from experiments.config import load_config
config = load_config("configs/quickstart.yaml")  # the removal criterion of the grid's report
max_asr, max_drop = config.removed_asr, config.removed_acc_drop
out = sys.argv[1]
rows = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
print("\nThe stages it ran (each in its own folder, with its output.log and metrics.json):")
for row in rows:
    if row["stage"] != "oracle":
        print("  " + json.load(open(os.path.join(row["directory"], "metrics.json")))["command"])
model = next(r for r in rows if r["stage"] == "train")
print(f"\nbackdoored model: ACC {float(model['acc']):.4f}  ASR {float(model['asr']):.4f}  RA {float(model['ra']):.4f}")
for r in rows:
    if r["rule"] and r["stage"] != "oracle":
        acc, asr, ra, before = float(r["acc"]), float(r["asr"]), float(r["ra"]), float(r["acc_before"])
        removed = asr <= max_asr and acc >= before - max_drop
        threshold = f"{float(r['threshold']):g}" if r["threshold"] not in ("", None) else "none"
        print(f"after {r['defense']} ({r['rule']} rule, threshold {threshold}, {r['neurons_pruned']} "
              f"neurons pruned): ACC {acc:.4f}  ASR {asr:.4f}  RA {ra:.4f}")
        why = ([f"ASR {asr:.3f} > {max_asr:g}"] if asr > max_asr else []) + \
            ([f"ACC lost {100 * (before - acc):.1f} points > {100 * max_drop:g}"] if acc < before - max_drop else [])
        print(f"  -> backdoor removed: ASR <= {max_asr:g} with ACC within {100 * max_drop:g} points" if removed else
              f"  -> NOT removed in this draw ({', '.join(why)}); the five-seed table of this setting "
              "(docs/results/quickstart.md) says how often it is")
print(f"\ntable: {os.path.join(out, 'table.md')}; plots: {os.path.join(out, 'plots')}")
PY

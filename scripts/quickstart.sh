#!/usr/bin/env bash
# The whole ANP workflow on real data, offline, on the CPU in a few minutes:
# a narrow ResNet-18 backdoored with BadNets on Fashion-MNIST, ANP masks, pruning sweep.
# Artifacts land in ${OUT:-runs/quickstart}. For the paper's setting see the README.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/quickstart}
COMMON="--dataset fashion-mnist --arch resnet18 --width 8 --device auto --seed 0"
python3 train_backdoor_cifar.py $COMMON --epoch 4 --schedule 2 3 --poison-type badnets --poison-rate 0.05 \
    --poison-target 0 --output-dir "$OUT/backdoor"
python3 optimize_mask_cifar.py $COMMON --checkpoint "$OUT/backdoor/last_model.th" \
    --trigger-info "$OUT/backdoor/trigger_info.th" --nb-iter 300 --print-every 100 --output-dir "$OUT/anp"
python3 prune_neuron_cifar.py $COMMON --checkpoint "$OUT/backdoor/last_model.th" \
    --trigger-info "$OUT/backdoor/trigger_info.th" --mask-file "$OUT/anp/mask_values.txt" --output-dir "$OUT/anp"
python3 - "$OUT" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/anp/metrics.json"))
b, o = m["before"], m["operating_point"]
print(f"\nbackdoored: ACC {b['clean_acc']:.4f} ASR {b['asr']:.4f} RA {b['ra']:.4f}")
print(f"ANP (threshold {o['threshold']}, {o['neurons_pruned']} neurons pruned): "
      f"ACC {o['clean_acc']:.4f} ASR {o['asr']:.4f} RA {o['ra']:.4f}")
PY

#!/usr/bin/env bash
# SODA's README numbers on the CPU (Fashion-MNIST, ResNet-18 --width 16, 4 epochs, schedule 2 3):
# stage 1 for the stripet semantic attack (seed 0), benign models (seeds 0-2 and any in BENIGN_SEEDS) and
# BadNets (seed 0); then soda_main.py with its defaults on each, and RNP and ANP on the stripet model.
# Resumable: a run whose metrics.json exists is skipped. Two jobs side by side with one thread each.
# Usage: scripts/soda_table_cpu.sh [STAGES]   (STAGES: "train,soda,rnp,anp", the default, or a subset)
# Then: python3 scripts/soda_table.py runs/soda > table.md
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/soda}
STAGES=${1:-train,soda,rnp,anp}
COMMON="--dataset fashion-mnist --arch resnet18 --width 16 --device cpu --no-progress"
export OMP_NUM_THREADS=1 OUT COMMON STAGES
MODELS="semantic:0 badnets:0 $(for s in 0 1 2 ${BENIGN_SEEDS:-}; do printf 'benign:%s ' "$s"; done)"

run_model() {
    local attack=${1%%:*} seed=${1##*:}
    local dir=$OUT/$attack-s$seed
    mkdir -p "$dir"
    if [[ $STAGES == *train* && ! -f $dir/backdoor/metrics.json ]]; then
        python3 train_backdoor_cifar.py $COMMON --seed "$seed" --epoch 4 --schedule 2 3 --poison-type "$attack" \
            --output-dir "$dir/backdoor" > "$dir/train.out" 2>&1
    fi
    local ckpt=$dir/backdoor/last_model.th info=$dir/backdoor/trigger_info.th
    if [[ $STAGES == *soda* && ! -f $dir/soda/metrics.json ]]; then
        python3 soda_main.py $COMMON --seed "$seed" --checkpoint "$ckpt" --trigger-info "$info" \
            --output-dir "$dir/soda" > "$dir/soda.out" 2>&1
    fi
    [[ $attack == semantic ]] || { echo "$1 done"; return; }
    if [[ $STAGES == *rnp* && ! -f $dir/rnp/metrics.json ]]; then
        python3 rnp_main.py $COMMON --seed "$seed" --backdoor_model_path "$ckpt" --trigger_info "$info" \
            --log_root "$dir/rnp" --output_weight "$dir/rnp" > "$dir/rnp.out" 2>&1
    fi
    if [[ $STAGES == *anp* && ! -f $dir/anp/metrics.json ]]; then
        python3 optimize_mask_cifar.py $COMMON --seed "$seed" --checkpoint "$ckpt" --trigger-info "$info" \
            --output-dir "$dir/anp-masks" > "$dir/anp-masks.out" 2>&1
        python3 prune_neuron_cifar.py $COMMON --seed "$seed" --checkpoint "$ckpt" --trigger-info "$info" \
            --mask-file "$dir/anp-masks/mask_values.txt" --output-dir "$dir/anp" > "$dir/anp.out" 2>&1
    fi
    echo "$1 done"
}
export -f run_model
printf '%s\n' $MODELS | xargs -P 2 -I{} bash -c 'run_model {}'

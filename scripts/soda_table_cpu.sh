#!/usr/bin/env bash
# SODA's README numbers on the CPU (Fashion-MNIST, ResNet-18 --width 16, 4 epochs, schedule 2 3; EPOCHS=16
# SCHEDULE="8 12" for the longer schedule):
# stage 1 for the stripet semantic attack (seed 0), benign models (seeds 0-2 and any in BENIGN_SEEDS) and
# BadNets (seed 0); then soda_main.py with its defaults on each, and on the stripet model also SODA's removal
# for the attacker's pair (0 -> 2, an oracle row), RNP and ANP.
# MODELS="semantic:0 benign:1" (ATTACK:SEED) picks the models. Resumable: a run whose metrics.json exists is
# skipped. Two jobs side by side with one thread each.
# Usage: scripts/soda_table_cpu.sh [STAGES]   (STAGES: "train,soda,oracle,rnp,anp", the default, or a subset)
# Then: python3 scripts/soda_table.py runs/soda > table.md
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/soda}
STAGES=${1:-train,soda,oracle,rnp,anp}
EPOCHS=${EPOCHS:-4}
SCHEDULE=${SCHEDULE:-2 3}
COMMON="--dataset fashion-mnist --arch resnet18 --width 16 --device cpu --no-progress"
export OMP_NUM_THREADS=1 OUT COMMON STAGES EPOCHS SCHEDULE
MODELS=${MODELS:-"semantic:0 badnets:0 $(for s in 0 1 2 ${BENIGN_SEEDS:-}; do printf 'benign:%s ' "$s"; done)"}

run_model() {
    local attack=${1%%:*} seed=${1##*:}
    local dir=$OUT/$attack-s$seed
    mkdir -p "$dir"
    if [[ $STAGES == *train* && ! -f $dir/backdoor/metrics.json ]]; then
        python3 train_backdoor_cifar.py $COMMON --seed "$seed" --epoch "$EPOCHS" --schedule $SCHEDULE --poison-type "$attack" \
            --output-dir "$dir/backdoor" > "$dir/train.out" 2>&1
    fi
    local ckpt=$dir/backdoor/last_model.th info=$dir/backdoor/trigger_info.th
    if [[ $STAGES == *soda* && ! -f $dir/soda/metrics.json ]]; then
        python3 soda_main.py $COMMON --seed "$seed" --checkpoint "$ckpt" --trigger-info "$info" \
            --output-dir "$dir/soda" > "$dir/soda.out" 2>&1
    fi
    [[ $attack == semantic ]] || { echo "$1 done"; return; }
    if [[ $STAGES == *oracle* && ! -f $dir/soda-oracle/metrics.json ]]; then  # stripet's own pair: an oracle row
        python3 soda_main.py $COMMON --seed "$seed" --checkpoint "$ckpt" --trigger-info "$info" \
            --potential_source 0 --poison_target 2 --output-dir "$dir/soda-oracle" > "$dir/soda-oracle.out" 2>&1
    fi
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

#!/usr/bin/env bash
# The README's attack table on the CPU: for each attack, stage 1 (Fashion-MNIST, ResNet-18 --width 16,
# 4 epochs, seed 0), then RNP and ANP with their defaults (each sweep gives the fixed 0.2 point and the
# clean-data point). Resumable: a stage whose metrics.json exists is skipped. Two attacks run side by
# side with one thread each. Usage: scripts/attack_table_cpu.sh [STAGES] [ATTACK ...]
#   STAGES: "train,rnp,anp" (default) or a subset; ATTACK: a name, or NAME:all2all.
#   EXTRA_TRAIN: more stage-1 flags, e.g. EXTRA_TRAIN="--epoch 8 --schedule 4 6" (with another OUT).
# Then: python3 scripts/attack_table.py runs/attacks > table.md
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/attacks}
STAGES=${1:-train,rnp,anp}
shift || true
ATTACKS=${*:-badnets blend trojan sig clean-label wanet a-blend dynamic lira badnets:all2all}
COMMON="--dataset fashion-mnist --arch resnet18 --width 16 --device cpu --seed 0 --no-progress"
export OMP_NUM_THREADS=1

run_attack() {
    local spec=$1 stages=$2 name=${1%%:*} target_type=all2one
    [[ $spec == *:all2all ]] && target_type=all2all
    local dir=$OUT/${spec/:/-}
    mkdir -p "$dir"
    if [[ $stages == *train* && ! -f $dir/backdoor/metrics.json ]]; then
        python3 train_backdoor_cifar.py $COMMON --epoch 4 --schedule 2 3 --poison-type "$name" \
            --target-type $target_type ${EXTRA_TRAIN:-} --output-dir "$dir/backdoor" > "$dir/train.out" 2>&1
    fi
    local ckpt=$dir/backdoor/last_model.th info=$dir/backdoor/trigger_info.th
    if [[ $stages == *rnp* && ! -f $dir/rnp/metrics.json ]]; then
        python3 rnp_main.py $COMMON --backdoor_model_path "$ckpt" --trigger_info "$info" --log_root "$dir/rnp" \
            --output_weight "$dir/rnp" > "$dir/rnp.out" 2>&1
    fi
    if [[ $stages == *anp* && ! -f $dir/anp/metrics.json ]]; then
        python3 optimize_mask_cifar.py $COMMON --checkpoint "$ckpt" --trigger-info "$info" \
            --output-dir "$dir/anp-masks" > "$dir/anp-masks.out" 2>&1
        python3 prune_neuron_cifar.py $COMMON --checkpoint "$ckpt" --trigger-info "$info" \
            --mask-file "$dir/anp-masks/mask_values.txt" --output-dir "$dir/anp" > "$dir/anp.out" 2>&1
    fi
    echo "$spec done ($stages)"
}
export -f run_attack
export OUT COMMON
printf '%s\n' $ATTACKS | xargs -P 2 -I{} bash -c "run_attack {} $STAGES"

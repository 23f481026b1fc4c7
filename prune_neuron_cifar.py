"""Stage 3 of ANP: prune the backdoored model by its mask values and report the sweep.

Writes pruning_by_<mode>.txt (the original's format), pruned_model.th at the operating point,
pruning_by_<mode>.png, output.log and metrics.json to --output-dir. The flags come from the defense registry
(defenses/anp_defense.py): ``python3 prune_neuron_cifar.py --help``.
"""
from defenses.cli import DefenseScript

SCRIPT = DefenseScript("anp", "ANP stage 3: prune neurons by mask value.", steps=("prune",),
                       inputs=("checkpoint", "trigger_info", "output_dir", "mask_file"), required=("mask_file",),
                       attack_flags=True)
build_parser, parse_args, main = SCRIPT.build_parser, SCRIPT.parse_args, SCRIPT.main

if __name__ == "__main__":
    SCRIPT.cli()

"""Reconstructive Neuron Pruning in one command: unlearn -> recover masks -> prune.

Writes to --output-dir (RNP's --log_root): output.log, mask_values.txt, pruning_by_<mode>.txt/.png,
pruned_model.th, metrics.json; unlearned_model_last.tar there too, or in --output_weight. Resume:
--unlearned_model_path skips phase 1, --mask-file skips phases 1 and 2. The flags come from the defense
registry (defenses/rnp_defense.py); RNP's own snake_case spellings are accepted: ``python3 rnp_main.py --help``.
"""
from defenses.cli import DefenseScript

SCRIPT = DefenseScript("rnp", "RNP: unlearn, recover neuron masks, prune.",
                       inputs=("checkpoint", "trigger_info", "output_dir", "mask_file"))
build_parser, parse_args, main = SCRIPT.build_parser, SCRIPT.parse_args, SCRIPT.main

if __name__ == "__main__":
    SCRIPT.cli()

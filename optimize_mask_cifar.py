"""Stage 2 of ANP: optimise the neuron masks of a backdoored model on 1% clean data.

Writes mask_values.txt (the original's format), output.log and metrics.json to --output-dir. The flags come
from the defense registry (defenses/anp_defense.py): ``python3 optimize_mask_cifar.py --help``.
"""
from defenses.cli import DefenseScript

SCRIPT = DefenseScript("anp", "ANP stage 2: adversarial neuron mask optimisation.", steps=("masks",),
                       attack_flags=True)
build_parser, parse_args, main = SCRIPT.build_parser, SCRIPT.parse_args, SCRIPT.main

if __name__ == "__main__":
    SCRIPT.cli()

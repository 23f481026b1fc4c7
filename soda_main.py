"""SODA: detect the (source, target) pair of a semantic backdoor and remove it, in one command.

``--option all`` (default) runs analyze → detect → gen_trigger → remove; each step alone reads the previous
steps' artifacts from --output-dir (causality.th, detection.json, reconstructed.th; then repaired_model.th),
with output.log, metrics.json and two plots. The trigger info only decides what is reported (without one the
model is reported as of unknown attack: ACC only). The steps and flags live in defenses/soda_defense.py:
``python3 soda_main.py --help``.
"""
from defenses.cli import DefenseScript

SCRIPT = DefenseScript("soda", "SODA: semantic backdoor detection and removal.", output_dir="logs/soda/")
build_parser, parse_args, main = SCRIPT.build_parser, SCRIPT.parse_args, SCRIPT.main

if __name__ == "__main__":
    SCRIPT.cli()

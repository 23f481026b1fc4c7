"""Stage 3 of ANP: prune the backdoored model by its mask values and report the sweep.

Writes pruning_by_<mode>.txt (the original's format), pruned_model.th at the operating point,
pruning_by_<mode>.png, output.log and metrics.json to --output-dir.
"""
from __future__ import annotations

from data.attacks.cli import attack_kwargs
from defenses.pruning import read_mask_values
from defenses.session import DefenseRun
from defenses.stage_args import add_attack_args, add_pruning_args, check_pruning_args
from utils.cli import add_common_args
from utils.errors import ArgumentParser, run_cli
from utils.run_log import Timer


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="ANP stage 3: prune neurons by mask value.")
    add_common_args(p, dataset_default=None)
    p.add_argument("--checkpoint", "--checkpoints", dest="checkpoint", required=True, help="the backdoored model")
    p.add_argument("--mask-file", required=True, help="mask_values.txt from optimize_mask_cifar.py or rnp_main.py")
    p.add_argument("--output-dir", default="logs/")
    add_pruning_args(p)
    p.add_argument("--val-frac", type=float, default=0.01,
                   help="the clean defense data (as in stage 2) on which --operating-point defense-acc measures")
    add_attack_args(p)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(args) -> dict:
    check_pruning_args(args)
    values = read_mask_values(args.mask_file)
    run = DefenseRun.start(args, args.output_dir, checkpoint=args.checkpoint, val_frac=args.val_frac,
                           **attack_kwargs(args))
    timer = Timer()
    results = run.prune(lambda: run.load(args.checkpoint), values, title="ANP pruning")
    return run.finish({**results, "timings": {"prune_seconds": timer()}})


if __name__ == "__main__":
    run_cli(main, parse_args())

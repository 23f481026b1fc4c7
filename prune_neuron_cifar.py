"""Stage 3 of ANP: prune the backdoored model by its mask values and report the sweep.

Writes pruning_by_<mode>.txt (the original's format), pruned_model.th at --save-threshold,
pruning_by_<mode>.png, output.log and metrics.json to --output-dir.
"""
from __future__ import annotations

import os

from defenses.pruning import PRUNING_MODES, prune_and_report, read_mask_values
from defenses.setup import defense_accuracy, make_model, model_description, prepare_defense_data
from defenses.stage_args import add_attack_args, add_operating_point_args, attack_kwargs
from utils.checkpoint import load_model_checkpoint
from utils.cli import add_common_args, check_positive, check_range
from utils.errors import ArgumentParser, run_cli
from utils.evaluation import backdoor_metrics
from utils.run_log import Timer, run_metadata, start_run, write_metrics


def parse_args(argv=None):
    p = ArgumentParser(description="ANP stage 3: prune neurons by mask value.")
    add_common_args(p, dataset_default=None)
    p.add_argument("--checkpoint", "--checkpoints", dest="checkpoint", required=True, help="the backdoored model")
    p.add_argument("--mask-file", required=True, help="mask_values.txt from optimize_mask_cifar.py or rnp_main.py")
    p.add_argument("--output-dir", default="logs/")
    p.add_argument("--pruning-by", default="threshold", choices=PRUNING_MODES)
    p.add_argument("--pruning-max", type=float, default=0.90, help="largest threshold (or number of neurons)")
    p.add_argument("--pruning-step", type=float, default=0.05, help="threshold step (or neurons per step)")
    p.add_argument("--save-threshold", type=float, default=0.2,
                   help="operating point: the purified model prunes every neuron with mask <= this (fixed; "
                        "never chosen on the poisoned test set)")
    add_operating_point_args(p)
    p.add_argument("--val-frac", type=float, default=0.01,
                   help="the clean defense data (as in stage 2) on which --operating-point defense-acc measures")
    add_attack_args(p)
    return p.parse_args(argv)


def main(args) -> dict:
    check_positive(args.pruning_step, "--pruning-step")
    check_range(args.max_acc_drop, 0.0, 1.0, "--max-acc-drop")
    runtime, log = start_run(args, args.output_dir)
    values = read_mask_values(args.mask_file)
    data = prepare_defense_data(dataset=args.dataset, data_dir=args.data_dir, trigger_info_path=args.trigger_info,
                                val_frac=args.val_frac, seed=args.seed, runtime=runtime, log=log,
                                **attack_kwargs(args))
    description = model_description(args.arch, args.width, data.spec)

    def load_original():
        model = make_model(args.arch, data.spec, args.width, masked=False, runtime=runtime)
        load_model_checkpoint(model, args.checkpoint, description)
        return model

    def evaluate(model):
        return backdoor_metrics(model, data.eval_sets, data.transform.normalize, autocast=runtime.autocast)

    timer = Timer()
    results = prune_and_report(load_original, values, mode=args.pruning_by, pruning_max=args.pruning_max,
                               pruning_step=args.pruning_step, save_threshold=args.save_threshold, evaluate=evaluate,
                               output_dir=args.output_dir, log=log, title=f"ANP pruning, {data.spec.name}",
                               defense_accuracy=lambda m: defense_accuracy(m, data, runtime.autocast),
                               operating_point=args.operating_point, max_acc_drop=args.max_acc_drop)
    metrics = {**run_metadata(args, runtime), **results, "timings": {"prune_seconds": timer()}}
    write_metrics(os.path.join(args.output_dir, "metrics.json"), metrics)
    log.close()
    return metrics


if __name__ == "__main__":
    run_cli(main, parse_args())

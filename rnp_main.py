"""Reconstructive Neuron Pruning in one command: unlearn -> recover masks -> prune.

Writes to --log_root: output.log, mask_values.txt, pruning_by_<mode>.txt/.png, pruned_model.th,
metrics.json; to --output_weight: unlearned_model_last.tar. --unlearned_model_path skips phase 1,
--mask_file skips phases 1 and 2. Flags accept the original's snake_case and kebab-case.
"""
from __future__ import annotations

import os

import torch

from defenses.anp import mask_values
from defenses.pruning import read_mask_values, write_mask_values
from defenses.rnp import STOP_CHECKS, RNPConfig, recover_masks, unlearn
from defenses.session import DefenseRun
from defenses.stage_args import add_augment_arg, add_flag, add_pruning_args, check_pruning_args
from utils.checkpoint import atomic_save
from utils.cli import add_common_args, check_positive, check_range
from utils.errors import ArgumentParser, UserError, run_cli
from utils.run_log import Timer

# RNP's --trigger_type values that this toolkit implements: (our attack, its options). The trojan trigger
# needs RNP's pattern file and the others RNP offers are made in training: give a trigger info for those.
RNP_TRIGGERS = {"gridTrigger": ("badnets", {"trigger_type": "gridTrigger"}),
                "fourCornerTrigger": ("badnets", {"trigger_type": "checkerboard_4corner"}),
                "blendTrigger": ("blend", {}), "signalTrigger": ("sig", {}), "wanetTrigger": ("wanet", {})}


def _flag(parser, name: str, **kwargs) -> None:
    """RNP's flags in the original's snake_case, and in kebab-case."""
    add_flag(parser, name, snake_case_too=True, **kwargs)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="RNP: unlearn, recover neuron masks, prune.")
    add_common_args(p, dataset_default=None)
    _flag(p, "backdoor_model_path", required=True, help="the backdoored model (ours or the original tools')")
    _flag(p, "unlearned_model_path", default=None, help="resume: skip phase 1 with this unlearned model")
    _flag(p, "mask_file", default=None, help="resume: skip phases 1 and 2 with this mask_values.txt")
    _flag(p, "log_root", default="logs/", help="folder for logs, masks, pruning results, pruned model")
    _flag(p, "output_weight", default="weights/", help="folder for unlearned_model_last.tar")
    _flag(p, "ratio", type=float, default=0.01, help="defense data as a fraction of the training set")
    _flag(p, "batch_size", type=int, default=128)
    _flag(p, "alpha", type=float, default=0.2, help="weight of the recovery loss")
    _flag(p, "clean_threshold", type=float, default=0.20, help="unlearning stops at this training accuracy")
    _flag(p, "unlearning_lr", type=float, default=0.01)
    _flag(p, "recovering_lr", type=float, default=0.2)
    _flag(p, "unlearning_epochs", type=int, default=20)
    _flag(p, "recovering_epochs", type=int, default=20)
    _flag(p, "schedule", type=int, nargs="+", default=[10, 20], help="unlearning lr drops 10x at these epochs")
    _flag(p, "stop_check", default="epoch", choices=STOP_CHECKS,
          help="when the unlearning stop rule is checked: after each epoch on the epoch's training accuracy "
               "(default, the paper's code) or before each batch's ascent step (a variant; the model that "
               "meets the rule is kept)")
    _flag(p, "eval_every", type=int, default=1,
          help="evaluate on the test sets every N epochs of phases 1-2 (0: only at the end of each phase)")
    add_pruning_args(p, snake_case_too=True)
    _flag(p, "target_label", type=int, default=0, help="without --trigger-info: the target class")
    _flag(p, "trigger_type", default="gridTrigger", help=f"without --trigger-info: {' | '.join(RNP_TRIGGERS)}")
    _flag(p, "target_type", default="all2one", choices=["all2one", "all2all"])
    _flag(p, "trigger_info", default="", help="trigger_info.th from train_backdoor_cifar.py (decides the attack)")
    add_augment_arg(p)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(args) -> dict:
    if not args.trigger_info and args.trigger_type not in RNP_TRIGGERS:
        raise UserError(f"--trigger_type: {args.trigger_type!r} is not supported; expected one of "
                        f"{', '.join(RNP_TRIGGERS)} (or give --trigger-info)")
    check_range(args.clean_threshold, 0.0, 1.0, "--clean_threshold")
    check_range(args.alpha, 0.0, 1.0, "--alpha")
    check_pruning_args(args)
    check_positive(args.unlearning_epochs, "--unlearning_epochs")
    check_positive(args.recovering_epochs, "--recovering_epochs")
    check_positive(args.batch_size, "--batch_size")
    poison_type, options = RNP_TRIGGERS.get(args.trigger_type, ("badnets", {}))
    run = DefenseRun.start(args, args.log_root, checkpoint=args.backdoor_model_path,
                           checkpoint_flag="--backdoor_model_path", val_frac=args.ratio, augment=args.augment,
                           poison_type=poison_type, poison_target=args.target_label, attack_options=options,
                           target_type=args.target_type)
    data, log, evaluate, runtime = run.data, run.log, run.evaluate, run.runtime
    config = RNPConfig(batch_size=args.batch_size, unlearning_lr=args.unlearning_lr,
                       unlearning_epochs=args.unlearning_epochs, schedule=args.schedule,
                       clean_threshold=args.clean_threshold, stop_check=args.stop_check,
                       recovering_lr=args.recovering_lr, recovering_epochs=args.recovering_epochs, alpha=args.alpha)
    generator = torch.Generator().manual_seed(args.seed)

    def epoch_logger(model, rows: list):
        def on_epoch(epoch: int, lr: float, stats: dict) -> None:
            rows.append({"epoch": epoch, "lr": lr, **stats})
            line = f"{epoch} \t {lr:.4f} \t {phase_timer():.1f} \t {stats['train_loss']:.4f} \t {stats['train_acc']:.4f}"
            if args.eval_every > 0 and epoch % args.eval_every == 0:
                m = evaluate(model)
                rows[-1].update(m)
                line += (f" \t {m['poison_loss']:.4f} \t {m['asr']:.4f} \t {m['clean_loss']:.4f} \t "
                         f"{m['clean_acc']:.4f}")
            log(line)
        return on_epoch

    def final_eval(model, rows: list) -> dict:
        """The test metrics of the phase's last epoch (evaluated now if that epoch was not)."""
        if "asr" not in rows[-1]:
            rows[-1].update(evaluate(model))
        return rows[-1]

    header = "Epoch \t lr \t Time \t TrainLoss \t TrainACC \t PoisonLoss \t PoisonACC \t CleanLoss \t CleanACC"
    timings, unlearning, recovering, unlearn_summary = {}, [], [], None
    mask_file = args.mask_file
    if mask_file is None:
        unlearned_path = args.unlearned_model_path
        if unlearned_path is None:
            log(f"--- phase 1: unlearning on {len(data.defense_labels)} clean images ({data.augmentation}) "
                f"(stop at training accuracy <= {args.clean_threshold}, checked per {args.stop_check})")
            log(header)
            model = run.load(args.backdoor_model_path, False, "--backdoor_model_path")
            phase_timer = Timer()
            result = unlearn(model, data.defense_images, data.defense_labels, data.transform.augment, config,
                             runtime.autocast, epoch_logger(model, unlearning), generator, args.progress)
            timings["unlearn_seconds"] = phase_timer()
            if not result.stopped:
                log(f"unlearning did not reach training accuracy {args.clean_threshold} in {result.epochs_run} epochs "
                    f"(last {result.train_acc:.4f}); going on with the last unlearned model")
            else:
                log(f"unlearning stopped at epoch {result.epochs_run} with training accuracy {result.train_acc:.4f}")
            unlearn_summary = {"stopped": result.stopped, "stop_epoch": result.epochs_run,
                               "stop_train_acc": result.train_acc, "epoch_train_acc": result.epoch_train_acc,
                               "stop_check": args.stop_check}
            last = final_eval(model, unlearning)
            unlearned_path = os.path.join(args.output_weight, "unlearned_model_last.tar")
            atomic_save({"epoch": result.epochs_run, "state_dict": model.state_dict(),
                         "clean_acc": last["clean_acc"], "bad_acc": last["asr"]}, unlearned_path)
        else:
            log(f"phase 1 skipped: unlearned model {unlearned_path}")
        log("--- phase 2: recovering neuron masks on the unlearned model")
        log(header)
        model = run.load(unlearned_path, True, "--unlearned_model_path")
        phase_timer = Timer()
        recover_masks(model, data.defense_images, data.defense_labels, data.transform.augment, config,
                      runtime.autocast, epoch_logger(model, recovering), generator, args.progress)
        timings["recover_seconds"] = phase_timer()
        final_eval(model, recovering)
        mask_file = os.path.join(args.log_root, "mask_values.txt")
        write_mask_values(mask_values(model), mask_file)
        log(f"wrote {mask_file}")
    else:
        log(f"phases 1 and 2 skipped: mask file {mask_file}")
    values = read_mask_values(mask_file, "--mask_file")

    log("--- phase 3: pruning the backdoored model")
    phase_timer = Timer()
    results = run.prune(lambda: run.load(args.backdoor_model_path, False, "--backdoor_model_path"), values,
                        title="RNP pruning")
    timings["prune_seconds"] = phase_timer()
    return run.finish({**results, "augmentation": data.augmentation, "unlearning": unlearn_summary,
                       "unlearning_epochs": unlearning, "recovering_epochs": recovering, "timings": timings})


if __name__ == "__main__":
    run_cli(main, parse_args())

"""Stage 2 of ANP: optimise the neuron masks of a backdoored model on 1% clean data.

Writes mask_values.txt (the original's format), output.log and metrics.json to --output-dir.
"""
from __future__ import annotations

import os

import torch

from data.attacks.cli import attack_kwargs
from defenses.anp import BN_MODES, ANPConfig, mask_values, optimize_masks
from defenses.pruning import write_mask_values
from defenses.session import DefenseRun
from defenses.stage_args import add_attack_args, add_augment_arg
from utils.cli import add_common_args, check_positive, check_range
from utils.errors import ArgumentParser, UserError, run_cli
from utils.run_log import Timer


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="ANP stage 2: adversarial neuron mask optimisation.")
    add_common_args(p, dataset_default=None)
    p.add_argument("--checkpoint", "--checkpoints", dest="checkpoint", required=True,
                   help="the backdoored model (state_dict; RNP .tar and DataParallel wrappers accepted)")
    p.add_argument("--output-dir", default="logs/")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.2, help="mask learning rate (SGD, momentum 0.9)")
    p.add_argument("--nb-iter", type=int, default=2000, help="number of mask-update iterations")
    p.add_argument("--print-every", type=int, default=500)
    p.add_argument("--val-frac", type=float, default=0.01, help="defense data as a fraction of the training set")
    p.add_argument("--anp-eps", type=float, default=0.4)
    p.add_argument("--anp-steps", type=int, default=1)
    p.add_argument("--anp-alpha", type=float, default=0.2)
    p.add_argument("--bn-mode", default="train", choices=BN_MODES,
                   help="BatchNorm during optimisation: train (original, batch statistics) or eval")
    p.add_argument("--project-noise", action="store_true",
                   help="clip the perturbation back into [-eps, eps] after its step (the original does not)")
    add_attack_args(p)
    add_augment_arg(p)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(args) -> dict:
    check_range(args.anp_alpha, 0.0, 1.0, "--anp-alpha")
    check_positive(args.nb_iter, "--nb-iter")
    check_positive(args.print_every, "--print-every")
    if args.anp_eps < 0:
        raise UserError(f"--anp-eps: expected a non-negative number, got {args.anp_eps}")
    run = DefenseRun.start(args, args.output_dir, checkpoint=args.checkpoint, val_frac=args.val_frac,
                           augment=args.augment, **attack_kwargs(args))
    data, log, evaluate = run.data, run.log, run.evaluate
    model = run.load(args.checkpoint, masked=True)
    before = evaluate(model)
    log(f"{data.spec.name}, {len(data.defense_labels)} clean defense images ({data.augmentation}); "
        f"before: ACC {before['clean_acc']:.4f} ASR {before['asr']:.4f} RA {before['ra']:.4f}")
    log("Iter \t lr \t Time \t TrainLoss \t TrainACC \t PoisonLoss \t PoisonACC \t CleanLoss \t CleanACC")
    timer, reports = Timer(), []

    def report(iteration: int, stats: dict) -> None:
        m = evaluate(model)
        reports.append({"iteration": iteration, "seconds": timer(), **stats, **m})
        log(f"{iteration} \t {args.lr:.3f} \t {timer():.1f} \t {stats['train_loss']:.4f} \t {stats['train_acc']:.4f} \t "
            f"{m['poison_loss']:.4f} \t {m['asr']:.4f} \t {m['clean_loss']:.4f} \t {m['clean_acc']:.4f}")

    config = ANPConfig(nb_iter=args.nb_iter, batch_size=args.batch_size, lr=args.lr, anp_eps=args.anp_eps,
                       anp_steps=args.anp_steps, anp_alpha=args.anp_alpha, print_every=args.print_every,
                       bn_mode=args.bn_mode, project_noise=args.project_noise)
    generator = torch.Generator().manual_seed(args.seed)
    optimize_masks(model, data.defense_images, data.defense_labels, data.transform.augment, config,
                   run.runtime.autocast, report, generator, args.progress)
    mask_file = os.path.join(args.output_dir, "mask_values.txt")
    values = mask_values(model)
    write_mask_values(values, mask_file)
    low = sum(v <= 0.2 for _, _, v in values)
    log(f"wrote {mask_file}: {len(values)} neurons, {low} with mask <= 0.2 ({timer():.0f} s)")
    return run.finish({"augmentation": data.augmentation, "before": before, "reports": reports, "neurons": len(values),
                       "neurons_mask_le_0.2": low, "timings": {"optimize_seconds": timer()}})


if __name__ == "__main__":
    run_cli(main, parse_args())

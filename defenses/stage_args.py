"""Flags of the defense scripts, each defined once: the attack (without a trigger info), the defense
data's augmentation, the pruning stage and its operating point."""
from __future__ import annotations

from data import AUGMENTATIONS
from data.attacks.cli import add_attack_args as add_attack_flags
from defenses.operating_point import OPERATING_POINTS


def add_attack_args(parser) -> None:
    """``--trigger-info`` and, for runs without one, the attack and its options (generated from the registry)."""
    parser.add_argument("--trigger-info", default="", help="trigger_info.th written by train_backdoor_cifar.py "
                        "(then nothing else about the attack needs to be given)")
    add_attack_flags(parser, "without --trigger-info: ")


def add_augment_arg(parser) -> None:
    parser.add_argument("--augment", default=None, choices=list(AUGMENTATIONS),
                        help="augmentation of the defense data (default: the training augmentation recorded in "
                             "the trigger info, else the dataset's: crop-flip for CIFAR-10 and Fashion-MNIST)")


def add_flag(parser, name: str, snake_case_too: bool = False, **kwargs) -> None:
    """``--name`` (kebab-case) and, where the original tool spells it so, ``--snake_case`` for one option."""
    kebab = name.replace("_", "-")
    names = [f"--{kebab}"] + ([f"--{kebab.replace('-', '_')}"] if snake_case_too and "-" in kebab else [])
    parser.add_argument(*names, dest=kebab.replace("-", "_"), **kwargs)


def add_pruning_args(parser, snake_case_too: bool = False) -> None:
    """The pruning stage's flags (ANP stage 3 and RNP phase 3), with the operating-point rule.

    RNP's original spells them in snake_case (``--pruning_by``); both spellings are accepted there."""
    from .pruning import PRUNING_MODES, SWEEP_EVALS

    options = [
        ("pruning-by", dict(default="threshold", choices=PRUNING_MODES)),
        ("pruning-max", dict(type=float, default=0.90, help="largest threshold (or number of neurons)")),
        ("pruning-step", dict(type=float, default=0.05, help="threshold step (or neurons per step)")),
        ("save-threshold", dict(type=float, default=0.2,
                                help="fixed operating point: the purified model prunes every neuron with mask <= this "
                                     "(never chosen on the poisoned test set)")),
        ("operating-point", dict(default="fixed", choices=OPERATING_POINTS,
                                 help="fixed: prune at --save-threshold (the papers' 0.2, default); defense-acc: "
                                      "prune as far along the sweep as the clean defense data's accuracy stays "
                                      "within --max-acc-drop of the unpruned model's")),
        ("max-acc-drop", dict(type=float, default=0.05, help="accuracy drop allowed by --operating-point defense-acc")),
        ("sweep-eval", dict(default="incremental", choices=SWEEP_EVALS,
                            help="incremental: BatchNorm folded into the convolutions, activations before the first "
                                 "changed layer kept between rows (same rows to 1e-4, faster); plain: every row "
                                 "evaluated from the images, as the original")),
    ]
    for name, kwargs in options:
        add_flag(parser, name, snake_case_too, **kwargs)


def check_pruning_args(args) -> None:
    from utils.cli import check_positive, check_range

    check_positive(args.pruning_step, "--pruning-step")
    check_range(args.max_acc_drop, 0.0, 1.0, "--max-acc-drop")

"""Attack flags shared by the defense scripts (used when no trigger info is given)."""
from __future__ import annotations

from data import ATTACKS, AUGMENTATIONS
from defenses.operating_point import OPERATING_POINTS
from utils.errors import UserError


def add_attack_args(parser) -> None:
    parser.add_argument("--trigger-info", default="", help="trigger_info.th written by train_backdoor_cifar.py "
                        "(then nothing else about the attack needs to be given)")
    parser.add_argument("--poison-type", default="badnets", help=f"without --trigger-info: one of {', '.join(ATTACKS)}")
    parser.add_argument("--poison-target", type=int, default=0, help="without --trigger-info: the target class")
    parser.add_argument("--trigger-alpha", type=float, default=1.0, help="without --trigger-info: trigger opacity")


def check_attack_args(args) -> None:
    if not args.trigger_info and args.poison_type not in ATTACKS:
        raise UserError(f"--poison-type: unknown attack {args.poison_type!r}; expected one of {', '.join(ATTACKS)}")


def add_augment_arg(parser) -> None:
    parser.add_argument("--augment", default=None, choices=list(AUGMENTATIONS),
                        help="augmentation of the defense data (default: the training augmentation recorded in "
                             "the trigger info, else the dataset's: crop-flip for CIFAR-10 and Fashion-MNIST)")


def add_operating_point_args(parser, snake_case_too: bool = False) -> None:
    """``--operating-point`` and ``--max-acc-drop`` (RNP also accepts ``--operating_point``, ``--max_acc_drop``)."""
    options = [
        ("operating-point", dict(default="fixed", choices=OPERATING_POINTS,
                                 help="fixed: prune at --save-threshold (the papers' 0.2, default); defense-acc: "
                                      "prune as far along the sweep as the clean defense data's accuracy stays "
                                      "within --max-acc-drop of the unpruned model's")),
        ("max-acc-drop", dict(type=float, default=0.05, help="accuracy drop allowed by --operating-point defense-acc")),
    ]
    for name, kwargs in options:
        names = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if snake_case_too else [])
        parser.add_argument(*names, dest=name.replace("-", "_"), **kwargs)

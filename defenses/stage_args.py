"""Attack flags shared by the defense scripts (used when no trigger info is given)."""
from __future__ import annotations

from data import ATTACKS, AUGMENTATIONS
from data.attacks.cli import add_attack_options, attack_options_from_args
from defenses.operating_point import OPERATING_POINTS


def add_attack_args(parser) -> None:
    """``--trigger-info`` and, for runs without one, the attack and its options (generated from the registry)."""
    parser.add_argument("--trigger-info", default="", help="trigger_info.th written by train_backdoor_cifar.py "
                        "(then nothing else about the attack needs to be given)")
    parser.add_argument("--poison-type", default="badnets", choices=list(ATTACKS), metavar="NAME",
                        help=f"without --trigger-info: {' | '.join(ATTACKS)}")
    parser.add_argument("--poison-target", type=int, default=0, help="without --trigger-info: the target class")
    parser.add_argument("--target-type", default="all2one", choices=["all2one", "all2all"],
                        help="without --trigger-info: all2one or all2all")
    add_attack_options(parser, "attack options, without --trigger-info (defaults depend on --poison-type)")


def attack_kwargs(args) -> dict:
    """The attack keywords of :func:`defenses.setup.prepare_defense_data` from parsed arguments."""
    return {"poison_type": args.poison_type, "poison_target": args.poison_target, "target_type": args.target_type,
            "attack_options": attack_options_from_args(args)}


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

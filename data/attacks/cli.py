"""Command-line flags generated from the registry: one flag per attack option, defaults from the classes.

Every option of every registered attack becomes ``--option-name`` with default None, so that an option
left out takes the chosen attack's own default (``--trigger-alpha`` is 1 for BadNets, 0.2 for Blend), and
an option given to an attack that does not have it is an error naming the flag.
"""
from __future__ import annotations

from .base import ATTACKS, TARGET_TYPES, option_flag


def all_options() -> dict:
    """option name -> (Option of the first attack that has it, {attack: default})."""
    merged: dict = {}
    for name, cls in ATTACKS.items():
        for key, option in cls.options.items():
            merged.setdefault(key, (option, {}))[1][name] = option.default
    return merged


def add_attack_options(parser, group_title: str = "attack options (defaults depend on --poison-type)") -> None:
    group = parser.add_argument_group(group_title)
    for key, (option, defaults) in all_options().items():
        per_attack = ", ".join(f"{name} {value}" for name, value in defaults.items())
        kwargs = {"type": option.type, "default": None, "help": f"{option.help} (default: {per_attack})"}
        if option.choices:
            kwargs["choices"] = option.choices
        group.add_argument(option_flag(key), dest=key, **kwargs)


def attack_options_from_args(args) -> dict:
    """The attack options given on the command line (None = left out)."""
    return {key: getattr(args, key) for key in all_options() if getattr(args, key, None) is not None}


def add_attack_args(parser, condition: str = "") -> None:
    """``--poison-type``, ``--poison-target``, ``--target-type`` and every attack option, defined once for
    stage 1 and the defense scripts (``condition``, e.g. "without --trigger-info: ", prefixes the help)."""
    parser.add_argument("--poison-type", default="badnets", choices=list(ATTACKS), metavar="NAME",
                        help=f"{condition}the attack: {' | '.join(ATTACKS)} (README's attack table)")
    parser.add_argument("--poison-target", type=int, default=0, help=f"{condition}the target class")
    parser.add_argument("--target-type", default="all2one", choices=list(TARGET_TYPES),
                        help=f"{condition}all2one, or all2all: y -> (y + 1) mod C (patch and generator attacks)")
    add_attack_options(parser, f"attack options{', ' + condition.rstrip(': ') if condition else ''} "
                               f"(defaults depend on --poison-type)")


def attack_kwargs(args) -> dict:
    """The attack as keywords (``poison_type``, ``poison_target``, ``target_type``, ``attack_options``)."""
    return {"poison_type": args.poison_type, "poison_target": args.poison_target, "target_type": args.target_type,
            "attack_options": attack_options_from_args(args)}

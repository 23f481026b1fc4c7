"""The attack zoo: every module here registers one attack class under its ``--poison-type`` name.

``create_attack(name, target, num_classes, image_shape, target_type, **options)`` builds one;
``attack_from_record(trigger_info)`` rebuilds one from a ``trigger_info.th`` (ours, or the original ANP
tool's pattern/mask/alpha). Adding an attack is one module with one ``@register`` class, imported below.
"""
from __future__ import annotations

import torch

# Imported in the order the README's table and --help list them.
from . import badnets, blend, trojan, sig, clean_label, wanet  # noqa: F401,I001
from . import adaptive_blend, input_aware, lira, semantic, benign  # noqa: F401,I001
from . import dfst  # noqa: F401,I001
from . import fc, awp  # noqa: F401,I001
from .base import ATTACKS, Attack, AttackError, Option, PoisonedSet, create_attack, option_flag
from .pattern import PatternAttack


def attack_from_record(record: dict) -> Attack:
    """Rebuild the attack of a trigger info: by name with its options and state, else from the ANP keys."""
    name = record.get("attack")
    if name in ATTACKS and "options" in record:
        target = int(torch.as_tensor(record.get("target", record.get("poison_target", 0))).reshape(-1)[0])
        shape = tuple(record.get("image_shape") or ())
        cls = ATTACKS[name]
        options = {k: v for k, v in dict(record["options"]).items() if k in cls.options}
        return cls(target, int(record.get("num_classes", 10)), shape, record.get("target_type", "all2one"),
                   state=dict(record.get("state") or {}), **options)
    if name == "benign":  # ours, before the registry
        return ATTACKS["benign"](int(record.get("target", 0)), int(record.get("num_classes", 10)), (1, 1, 1),
                                 record.get("target_type", "all2one"))
    if "trigger_pattern" in record:
        return PatternAttack.from_anp_record(record)
    raise ValueError("trigger info has no known 'attack' with 'options' and no 'trigger_pattern'")


def attack_for_defense(trigger_info: dict | None, num_classes: int, image_shape, *, poison_type: str,
                       poison_target: int, target_type: str = "all2one", options: dict | None = None) -> Attack:
    """The attack a defense reports against: the trigger info's, else one built from command-line options
    (refused for attacks whose trigger is made during training: only their trigger info has it)."""
    if trigger_info is not None:
        attack = attack_from_record(trigger_info)
        attack.num_classes = num_classes
        return attack
    attack = create_attack(poison_type, poison_target, num_classes, image_shape, target_type, **(options or {}))
    if attack.needs_surrogate or attack.learns_trigger:
        raise AttackError("trigger_info", f"the {poison_type} trigger is made during training; give the "
                          f"trigger_info.th that train_backdoor_cifar.py wrote")
    return attack


__all__ = ["ATTACKS", "Attack", "AttackError", "Option", "PatternAttack", "PoisonedSet", "attack_for_defense",
           "attack_from_record", "create_attack", "option_flag"]

"""Attack registry: ``ATTACKS[name]`` builds an attack; :func:`attack_from_record` rebuilds one from trigger info."""
from __future__ import annotations

from .badnets import BadNets
from .base import Attack, PatternAttack
from .benign import Benign
from .blend import Blend

ATTACKS = {cls.name: cls for cls in (BadNets, Blend, Benign)}


def build_attack(name: str, target: int, num_classes: int, image_shape, *, alpha: float | None = None,
                 trigger_type: str | None = None, trigger_file: str | None = None,
                 target_type: str = "all2one") -> Attack:
    """Build an attack from command-line style options (``alpha=None`` means the attack's default)."""
    if name == "badnets":
        return BadNets(target, num_classes, image_shape, trigger_type or "checkerboard_1corner",
                       1.0 if alpha is None else alpha, target_type)
    if name == "blend":
        return Blend(target, num_classes, image_shape, 0.2 if alpha is None else alpha, trigger_file, target_type)
    if name == "benign":
        return Benign(target, num_classes, image_shape, target_type)
    raise ValueError(f"unknown attack {name!r}; expected one of {', '.join(ATTACKS)}")


def attack_from_record(record: dict) -> Attack:
    """Rebuild the attack of a ``trigger_info.th`` (ours, or the original ANP tool's pattern/mask/alpha)."""
    name = record.get("attack")
    if name == "benign":
        return Benign.from_record(record)
    if "trigger_pattern" in record:
        attack = PatternAttack.from_record(record)
        attack.name = name or "pattern"
        return attack
    raise ValueError("trigger info has neither 'trigger_pattern' nor a known 'attack'")


__all__ = ["ATTACKS", "Attack", "PatternAttack", "BadNets", "Blend", "Benign", "build_attack", "attack_from_record"]

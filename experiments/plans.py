"""How the grid stages each defense: the cells, their typed configs and inputs, and what depends on what.

A stage-1 model is trained once per (attack, seed). A pruning defense (the registry's ``prunes``: ANP, RNP)
computes its masks once per (model, defense seed) in a ``masks`` cell (its steps up to ``mask_values.txt``)
and prunes by them once per operating rule, each rule in its own cell; so a changed rule reruns a sweep, never
the masks. Any other defense is one cell (its own decision: the operating rules do not apply). Nothing here
knows a defense by name: the registry says.
"""
from __future__ import annotations

import dataclasses
import os

from data.attacks.semantic import SemanticAttack
from data.attacks import ATTACKS
from defenses.registry import get_defense
from utils.cli import RunSettings
from utils.errors import UserError
from defenses.options import DefenseDataOptions, PruningOptions
from utils.options import as_dict, default_of, fields

from .cells import Cell
from .config import ConfigError, GridConfig


def model_files(model: Cell) -> tuple[str, str]:
    """The stage-1 cell's checkpoint and trigger info, which every defense cell of that model reads."""
    return os.path.join(model.directory, "last_model.th"), os.path.join(model.directory, "trigger_info.th")


def settings(config: GridConfig, seed: int) -> dict:
    return as_dict(RunSettings(**config.common, seed=seed, progress=False))


def model_cell(config: GridConfig, attack, seed: int) -> Cell:
    cell_id = f"{attack.label}/seed{seed}/model"
    options = dict(attack.attack_options)
    choice = {"poison_type": attack.kind, "poison_target": options.pop("poison_target", 0),
              "target_type": options.pop("target_type", "all2one"), "options": options}
    return Cell(cell_id, os.path.join(config.output_dir, cell_id), "train", attack.label, seed, kind="train",
                settings=settings(config, seed), config=as_dict(attack.config), inputs={"attack": choice})


def _rule_options(rule) -> dict:
    if rule.kind == "fixed":
        return {"operating_point": "fixed", "save_threshold": float(rule.options["save_threshold"])}
    return {"operating_point": "defense-acc", "max_acc_drop": float(rule.options["max_acc_drop"])}


def _defense_cell(config: GridConfig, model: Cell, defense, dseed: int, name: str, defense_config, **kw) -> Cell:
    cell_id = f"{model.attack}/seed{model.seed}/{defense.label}/dseed{dseed}/{name}"
    directory = os.path.join(config.output_dir, cell_id)
    checkpoint, trigger_info = model_files(model)
    steps = kw.pop("steps", None)
    inputs = {"checkpoint": checkpoint, "trigger_info": trigger_info, "output_dir": directory,
              "mask_file": kw.pop("mask_file", None), "steps": list(steps) if steps else None}
    return Cell(cell_id, directory, kw.pop("stage"), model.attack, model.seed, kind=defense.kind,
                settings=settings(config, dseed), config=as_dict(defense_config), inputs=inputs,
                defense=defense.label, defense_seed=dseed, **kw)


def plan_defense(config: GridConfig, model: Cell, defense, dseed: int) -> list[Cell]:
    """The cells of one defense on one model: one, or one per operating rule for a pruning defense."""
    spec = get_defense(defense.kind)
    if not spec.prunes:
        return [_defense_cell(config, model, defense, dseed, defense.kind, defense.config, stage="defense",
                              rule=None, deps=[model.id], wave=1)]
    # Each cell's config holds what its steps use, the rest at the defaults: the masks cell prunes nothing, a
    # prune cell uses the defender's data and the pruning options only.
    pruning = {f.name for f in fields(PruningOptions)}
    shared = {f.name for f in fields(DefenseDataOptions)}
    masks_config = dataclasses.replace(defense.config, **{f.name: default_of(f) for f in fields(PruningOptions)})
    prune_config = dataclasses.replace(spec.config(), **{k: getattr(defense.config, k) for k in pruning | shared})
    masks = _defense_cell(config, model, defense, dseed, "masks", masks_config, stage="masks", rule=None,
                          deps=[model.id], wave=1, steps=spec.mask_steps)
    mask_file = os.path.join(masks.directory, "mask_values.txt")
    return [masks] + [_defense_cell(config, model, defense, dseed, rule.label,
                                    dataclasses.replace(prune_config, **_rule_options(rule)), stage="prune",
                                    rule=rule.label, deps=[masks.id], wave=2, steps=("prune",), mask_file=mask_file)
                      for rule in config.rules]


def check_requirements(config: GridConfig) -> None:
    """A defense entry whose config needs the attacker's pair (an oracle) applies only to attacks that have one."""
    for defense in config.defenses:
        if not get_defense(defense.kind).oracle(defense.config):
            continue
        for attack in config.attacks:
            if defense.applies_to(attack.label) and not issubclass(ATTACKS[attack.kind], SemanticAttack):
                raise ConfigError(config.path, f"defenses.{defense.label}", f"needs the attacker's (source, target) "
                                  f"pair, which attack {attack.label!r} ({attack.kind}) does not record; restrict "
                                  f"it with attacks: [...]")


def plan(config: GridConfig) -> list[Cell]:
    """Every cell of the grid, dependencies first."""
    check_requirements(config)
    cells = []
    for attack in config.attacks:
        for seed in config.seeds:
            model = model_cell(config, attack, seed)
            cells.append(model)
            for defense in config.defenses:
                if defense.applies_to(attack.label):
                    for dseed in config.seeds_of_defense(seed):
                        cells += plan_defense(config, model, defense, dseed)
    if not cells:
        raise UserError(f"{config.path}: no cells to run")
    return cells

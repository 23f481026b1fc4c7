"""How the grid stages each defense: which script runs in which cell, and what depends on what.

A stage-1 model is trained once per (attack, seed). A defense cell is (model, defense, defense seed,
operating rule). The pruning defenses compute their masks once per (model, defense seed) and prune once
per rule, each in its own directory with the stage's usual artifacts:

- ANP: ``masks/`` (optimize_mask_cifar.py), then one prune_neuron_cifar.py cell per rule.
- RNP: the first rule's cell is the whole rnp_main.py (unlearn, recover, prune); the other rules prune by
  its ``mask_values.txt`` (rnp_main.py --mask_file).
- SODA: one soda_main.py cell (its own detection decides; operating rules do not apply).

A new defense joins by adding a planner here; its options are checked against its scripts' flags.
"""
from __future__ import annotations

import os

from .cells import Cell, common_flags, option_flags, parse_cell, script_parser
from .config import GridConfig


def model_files(model: Cell) -> tuple[str, str]:
    """The stage-1 cell's checkpoint and trigger info, which every defense cell of that model reads."""
    return os.path.join(model.directory, "last_model.th"), os.path.join(model.directory, "trigger_info.th")


def model_cell(config: GridConfig, attack, seed: int) -> Cell:
    parsers = {"train_backdoor_cifar": script_parser("train_backdoor_cifar")}
    option_flags(config.train, parsers, "train", config.path)  # names the key's own section in an error
    option_flags(attack.options, parsers, f"attacks.{attack.label}", config.path)
    flags = option_flags({**config.train, **attack.options}, parsers, "train", config.path)["train_backdoor_cifar"]
    cell_id = f"{attack.label}/seed{seed}/model"
    directory = os.path.join(config.output_dir, cell_id)
    argv = common_flags(config.common) + ["--seed", str(seed), "--poison-type", attack.kind] + flags + \
        ["--output-dir", directory]
    return Cell(cell_id, directory, "train_backdoor_cifar", argv, "train", attack.label, seed)


def _rule_flags(rule) -> list[str]:
    if rule.kind == "fixed":
        return ["--operating-point", "fixed", "--save-threshold", str(rule.options["save_threshold"])]
    return ["--operating-point", "defense-acc", "--max-acc-drop", str(rule.options["max_acc_drop"])]


def _base(config: GridConfig, model: Cell, defense, dseed: int, name: str, **kw) -> dict:
    cell_id = f"{model.attack}/seed{model.seed}/{defense.label}/dseed{dseed}/{name}"
    return dict(id=cell_id, directory=os.path.join(config.output_dir, cell_id), attack=model.attack,
                seed=model.seed, defense=defense.label, defense_seed=dseed, **kw)


def plan_anp(config: GridConfig, model: Cell, defense, dseed: int) -> list[Cell]:
    scripts = ("optimize_mask_cifar", "prune_neuron_cifar")
    flags = option_flags(defense.options, {s: script_parser(s) for s in scripts}, f"defenses.{defense.label}",
                         config.path)
    checkpoint, trigger_info = model_files(model)
    common = common_flags(config.common) + ["--seed", str(dseed), "--checkpoint", checkpoint,
                                            "--trigger-info", trigger_info]
    masks = Cell(**_base(config, model, defense, dseed, "masks", rule=None), script="optimize_mask_cifar",
                 argv=[], stage="masks", deps=[model.id], wave=1)
    masks.argv = common + flags["optimize_mask_cifar"] + ["--output-dir", masks.directory]
    cells = [masks]
    for rule in config.rules:
        cell = Cell(**_base(config, model, defense, dseed, rule.label, rule=rule.label), script="prune_neuron_cifar",
                    argv=[], stage="prune", deps=[masks.id], wave=2)
        cell.argv = common + ["--mask-file", os.path.join(masks.directory, "mask_values.txt")] + \
            flags["prune_neuron_cifar"] + _rule_flags(rule) + ["--output-dir", cell.directory]
        cells.append(cell)
    return cells


def plan_rnp(config: GridConfig, model: Cell, defense, dseed: int) -> list[Cell]:
    flags = option_flags(defense.options, {"rnp_main": script_parser("rnp_main")}, f"defenses.{defense.label}",
                         config.path)["rnp_main"]
    checkpoint, trigger_info = model_files(model)
    common = common_flags(config.common) + ["--seed", str(dseed), "--backdoor_model_path", checkpoint,
                                            "--trigger_info", trigger_info] + flags
    cells = []
    for i, rule in enumerate(config.rules):
        cell = Cell(**_base(config, model, defense, dseed, rule.label, rule=rule.label), script="rnp_main", argv=[],
                    stage="defense" if i == 0 else "prune", deps=[model.id] if i == 0 else [cells[0].id],
                    wave=1 if i == 0 else 2)
        reuse = [] if i == 0 else ["--mask_file", os.path.join(cells[0].directory, "mask_values.txt")]
        cell.argv = common + reuse + _rule_flags(rule) + ["--log_root", cell.directory, "--output_weight",
                                                         cell.directory]
        cells.append(cell)
    return cells


def plan_soda(config: GridConfig, model: Cell, defense, dseed: int) -> list[Cell]:
    flags = option_flags(defense.options, {"soda_main": script_parser("soda_main")}, f"defenses.{defense.label}",
                         config.path)["soda_main"]
    cell = Cell(**_base(config, model, defense, dseed, "soda", rule=None), script="soda_main", argv=[],
                stage="defense", deps=[model.id], wave=1)
    checkpoint, trigger_info = model_files(model)
    cell.argv = common_flags(config.common) + ["--seed", str(dseed), "--checkpoint", checkpoint,
                                               "--trigger-info", trigger_info] + flags + \
        ["--output-dir", cell.directory]
    return [cell]


DEFENSES = {"anp": plan_anp, "rnp": plan_rnp, "soda": plan_soda}
PRUNING_DEFENSES = ("anp", "rnp")


def plan(config: GridConfig) -> list[Cell]:
    """Every cell of the grid, dependencies first; each cell's arguments already checked by its parser."""
    cells = []
    for attack in config.attacks:
        for seed in config.seeds:
            model = model_cell(config, attack, seed)
            cells.append(model)
            for defense in config.defenses:
                for dseed in config.seeds_of_defense(seed):
                    cells += DEFENSES[defense.kind](config, model, defense, dseed)
    for cell in cells:
        parse_cell(cell)
    return cells

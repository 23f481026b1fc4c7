"""The defense seam: every registered defense runs end to end through its script and through the grid with the
same metrics; its typed config is the one source of its flags; every original command line still parses to
the same config; the import graph has no circle and no package imports a script."""
from __future__ import annotations

import ast
import dataclasses
import os
import shlex

import pytest

from conftest import ROOT
from defenses.cli import DefenseScript
from defenses.registry import DefenseInputs, get_defense, list_defenses
from experiments.cells import command_of, run_cell
from experiments.config import load_config
from experiments.plans import plan
from utils.cli import RunSettings
from utils.errors import OptionError, UserError
from utils.options import fields, from_mapping, to_argv

# Small options per defense for tiny data (every registered defense needs an entry: a new defense adds one).
FAST = {
    "anp": {"nb_iter": 20, "print_every": 10, "batch_size": 32, "defense_frac": 0.05, "pruning_max": 0.3},
    "rnp": {"unlearning_epochs": 1, "recovering_epochs": 1, "batch_size": 32, "defense_frac": 0.05,
            "eval_every": 0, "pruning_max": 0.3},
    "soda": {"recon_steps": 30, "epoch": 2, "num_sample": 32, "num_recon": 8, "defense_frac": 0.1},
}
# The comparable part of a defense's metrics.json.
KEYS = ("before", "operating_point", "rows", "detection", "after", "removed", "neurons_pruned")


def test_registry_lists_the_defenses_each_with_a_typed_config():
    assert list_defenses() == ["anp", "rnp", "soda"]
    assert set(FAST) == set(list_defenses())
    for name in list_defenses():
        defense = get_defense(name)
        assert dataclasses.is_dataclass(defense.config) and defense.steps and defense.timings
        config = defense.config()  # every option has a default: the released code's
        assert to_argv(config) == [] and all(f.metadata.get("help") for f in fields(defense.config))
    with pytest.raises(UserError, match="unknown defense 'nope'"):
        get_defense("nope")


@pytest.mark.parametrize("name", ["anp", "rnp", "soda"])
def test_flags_are_generated_from_the_config(name):
    """Every config field is a flag of the defense's script (canonical kebab-case and the aliases), and a config
    written back as flags parses to itself."""
    script = DefenseScript(name, "test", inputs=("checkpoint", "trigger_info", "output_dir", "mask_file"))
    parser = script.build_parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    for f in fields(get_defense(name).config):
        assert f"--{f.name.replace('_', '-')}" in flags or f.metadata.get("flag") in flags, f.name
    config = from_mapping(get_defense(name).config, FAST[name], "test")
    args = parser.parse_args(["--checkpoint", "m.th"] + to_argv(config))
    assert script.config_and_inputs(args)[0] == config


@pytest.fixture(scope="module")
def grid(tiny_cifar, tmp_path_factory):
    """A one-model grid with every registered defense (fast options), run in this process."""
    import yaml

    out = tmp_path_factory.mktemp("seam")
    path = out / "grid.yaml"
    path.write_text(yaml.safe_dump({
        "name": "seam", "output_dir": str(out / "grid"), "dataset": "cifar10", "data_dir": tiny_cifar, "width": 8,
        "device": "cpu", "seeds": [0], "train": {"epoch": 2, "schedule": [1], "batch_size": 32, "lr": 0.05},
        "attacks": {"blend": {"trigger_alpha": 0.5, "poison_rate": 0.1}},
        "defenses": {name: FAST[name] for name in list_defenses()}, "rules": {"fixed": {"save_threshold": 0.2}}}))
    cells = plan(load_config(str(path)))
    for cell in cells:
        result = run_cell(cell.to_dict())
        assert result["ok"], result
    return {"out": out, "cells": {(c.kind, c.stage): c for c in cells}}


def _comparable(metrics: dict) -> dict:
    return {k: metrics[k] for k in KEYS if k in metrics}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["anp", "rnp", "soda"])
def test_each_defense_through_its_script_and_through_the_grid(grid, name):
    """``python3 -m defenses NAME`` with the grid entry's options and the grid's cells (a pruning defense: its masks
    cell, then the rule's prune cell) write the same masks and the same metrics."""
    import json

    cells = grid["cells"]
    last = cells.get((name, "prune")) or cells[(name, "defense")]
    with open(last.metrics_path) as f:
        through_grid = json.load(f)
    config = from_mapping(get_defense(name).config, FAST[name], "test")
    output = str(grid["out"] / f"script-{name}")
    argv = to_argv(RunSettings(**last.settings))
    argv += ["--checkpoint", last.inputs["checkpoint"], "--trigger-info", last.inputs["trigger_info"]]
    argv += to_argv(config) + ["--output-dir", output]
    assert shlex.split(command_of(last.to_dict()))[:4] == ["python3", "-m", "defenses", name]
    script = DefenseScript(name, "test", inputs=("checkpoint", "trigger_info", "output_dir", "mask_file", "steps"),
                           attack_flags=get_defense(name).attack_flags)
    through_script = script.main(script.parse_args(argv))
    assert _comparable(through_script) == _comparable(through_grid)
    if get_defense(name).prunes:
        masks = cells[(name, "masks")]
        with open(os.path.join(output, "mask_values.txt")) as a, open(os.path.join(masks.directory,
                                                                                  "mask_values.txt")) as b:
            assert a.read() == b.read()
    else:
        assert through_grid["args"] == {**through_script["args"], "output_dir": last.directory}


@pytest.mark.slow
def test_anp_stage_scripts_match_the_grid(grid):
    """optimize_mask_cifar.py then prune_neuron_cifar.py: the same masks and pruning as the grid's ANP cells."""
    import json

    import optimize_mask_cifar
    import prune_neuron_cifar

    masks, prune = grid["cells"][("anp", "masks")], grid["cells"][("anp", "prune")]
    argv = shlex.split(command_of(masks.to_dict()))[4:]
    steps = argv.index("--steps")
    del argv[steps:steps + 2]
    out = str(grid["out"] / "anp-stages")
    argv[argv.index("--output-dir") + 1] = out
    optimize_mask_cifar.main(optimize_mask_cifar.parse_args(argv))
    pruned = prune_neuron_cifar.main(prune_neuron_cifar.parse_args(
        argv + ["--mask-file", os.path.join(out, "mask_values.txt"), "--pruning-max", "0.3"]))
    with open(prune.metrics_path) as f:
        through_grid = json.load(f)
    assert pruned["rows"] == through_grid["rows"] and pruned["operating_point"] == through_grid["operating_point"]
    with open(os.path.join(out, "mask_values.txt")) as a, open(os.path.join(masks.directory, "mask_values.txt")) as b:
        assert a.read() == b.read()


# Original command lines (the README's and the papers' repositories'), each with the config it must give.
ORIGINAL = [
    ("rnp", "--backdoor_model_path m.th --trigger_info t.th --log_root out --output_weight w --ratio 0.01 "
            "--clean_threshold 0.2 --unlearning_lr 0.01 --recovering_lr 0.2 --unlearning_epochs 20 "
            "--recovering_epochs 20 --pruning_by threshold --pruning_max 0.90 --pruning_step 0.05 --alpha 0.2 "
            "--stop_check batch", {"stop_check": "batch", "output_weight": "w"}),
    ("rnp", "--backdoor_model_path m.th --trigger_type blendTrigger --target_label 3 --log_root out",
     {"trigger_type": "blendTrigger", "target_label": 3}),
    ("anp", "--checkpoints m.th --trigger-info t.th --output-dir out --val-frac 0.01 --nb-iter 2000 "
            "--anp-eps 0.4 --anp-steps 1 --anp-alpha 0.2", {}),
    ("anp", "--checkpoint m.th --trigger-info t.th --mask-file masks.txt --pruning-by number --pruning-max 20 "
            "--pruning-step 1", {"pruning_by": "number", "pruning_max": 20.0, "pruning_step": 1.0}),
    ("soda", "--in_model m.th --option detect --ratio 0.05 --confidence 3 --confidence2 2 --num_sample 256 "
             "--potential_source 0 --poison_target 2 --output_dir out", {"option": "detect", "confidence2": 2.0,
                                                                          "potential_source": 0, "poison_target": 2}),
    ("soda", "--in_model m.th --option causality_analysis --num_sample 256", {"option": "causality_analysis"}),
]


@pytest.mark.parametrize("name,command,expected", ORIGINAL)
def test_original_command_lines_parse_to_the_same_config(name, command, expected):
    script = DefenseScript(name, "test", inputs=("checkpoint", "trigger_info", "output_dir", "mask_file"),
                           attack_flags=get_defense(name).attack_flags)
    config, inputs = script.config_and_inputs(script.parse_args(shlex.split(command)))
    assert config == dataclasses.replace(get_defense(name).config(), **expected)
    assert inputs.checkpoint == "m.th" and inputs.output_dir in ("out", "logs/")


def test_every_readme_command_parses():
    """Every ``python3 SCRIPT.py ...`` line of the README parses with that script's parser."""
    import importlib

    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read().replace("\\\n", " ")  # continuation lines joined
    lines = [line.strip() for line in text.splitlines()]
    checked = 0
    for line in lines:
        if not line.startswith("python3 ") or ".py" not in line.split()[1]:
            continue
        words = shlex.split(line.split(" #")[0].replace("...", ""))
        script = os.path.splitext(os.path.basename(words[1]))[0]
        if script in ("train_backdoor_cifar", "optimize_mask_cifar", "prune_neuron_cifar", "rnp_main", "soda_main"):
            importlib.import_module(script).parse_args(words[2:])
            checked += 1
    assert checked >= 3


def test_library_errors_name_the_option_and_the_script_layer_the_flag_typed(capsys):
    from utils.errors import user_message

    parser = DefenseScript("soda", "test").build_parser()
    with pytest.raises(OptionError) as err:
        from_mapping(get_defense("soda").config, {}, "x") and get_defense("soda").config(recon_per_batch=64)
    assert err.value.option == "recon_per_batch"
    assert user_message(err.value, parser, ["--recon_per_batch", "64"]).startswith("--recon_per_batch: ")
    assert user_message(err.value, parser, ["--recon-per-batch", "64"]).startswith("--recon-per-batch: ")
    with pytest.raises(UserError, match=r"^defenses\.soda\.recon_per_batch: expected 1\.\.63"):
        from_mapping(get_defense("soda").config, {"recon_per_batch": 64}, "defenses.soda")


def test_defense_inputs_and_configs_are_plain_values():
    """A cell's config and inputs travel to workers as plain values and come back as the same typed objects."""
    for name in list_defenses():
        config = from_mapping(get_defense(name).config, FAST[name], "t")
        assert get_defense(name).config(**dataclasses.asdict(config)) == config
    assert DefenseInputs.__dataclass_fields__.keys() >= {"settings", "checkpoint", "output_dir", "mask_file"}


def _imports(path: str) -> set[str]:
    with open(path) as f:
        tree = ast.parse(f.read())
    found = set()
    package = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, ".")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                found |= {module} | {f"{module}.{a.name}" for a in node.names}
            elif node.module:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_import_graph_has_no_circle_and_no_package_imports_a_script():
    packages = ("data", "defenses", "experiments", "models", "training", "utils")
    scripts = {os.path.splitext(f)[0] for f in os.listdir(ROOT) if f.endswith(".py")}
    modules = {}
    for package in packages:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                    modules[rel.removesuffix(".__init__")] = os.path.join(folder, f)
    graph = {}
    for module, path in modules.items():
        imported = _imports(path)
        assert not imported & scripts, f"{module} imports a script: {sorted(imported & scripts)}"
        graph[module] = {m for m in imported if m in modules and m != module and not module.startswith(m + ".")}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2
    for module in sorted(graph):
        if module not in state:
            visit(module, [module])

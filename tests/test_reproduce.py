"""reproduce.py: config parsing and cell expansion, resume, aggregation, the oracle kept apart, bad input,
and end-to-end grids on tiny generated data through the local executor and submitit's local executor."""
from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys

import pytest
import yaml

import reproduce
from experiments.cells import Cell, planned_record, status
from experiments.config import load_config
from experiments.grid import plan_states, run_grid, select
from experiments.plans import plan
from experiments.report import collect, oracle_point, summarize, write_report
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_config(path, **overrides) -> str:
    config = {"name": "tiny", "output_dir": str(path.parent / "grid"), "dataset": "cifar10", "width": 4,
              "device": "cpu", "seeds": [0, 1], "train": {"epoch": 1, "batch_size": 32},
              "attacks": {"badnets": {"poison_rate": 0.1}, "blend": {"trigger_alpha": 0.5}},
              "defenses": {"anp": {"nb_iter": 5, "print_every": 5, "batch_size": 32, "val_frac": 0.05,
                                   "pruning_step": 0.3},
                           "rnp": {"unlearning_epochs": 1, "recovering_epochs": 1, "schedule": [1], "ratio": 0.05,
                                   "pruning_step": 0.3, "eval_every": 0}},
              "rules": {"fixed": {"save_threshold": 0.2}, "clean-data": {"rule": "defense-acc", "max_acc_drop": 0.1}}}
    config.update(overrides)
    config = {k: v for k, v in config.items() if v is not None}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


class FakeExecutor:
    """Writes each cell's metrics.json (with the options a real run records) instead of running it."""

    def __init__(self, fail=()):
        self.ran, self.fail = [], set(fail)

    def describe(self):
        return "fake"

    parallel = 1

    def run(self, cells, on_done):
        for cell in cells:
            self.ran.append(cell["id"])
            if cell["id"] in self.fail:
                on_done({"id": cell["id"], "ok": False, "seconds": 0.0, "error": "boom"})
                continue
            os.makedirs(cell["directory"], exist_ok=True)
            with open(os.path.join(cell["directory"], "metrics.json"), "w") as f:
                json.dump({"args": planned_record(cell)}, f, default=str)
            on_done({"id": cell["id"], "ok": True, "seconds": 1.0, "error": None})


class Log(list):
    def __call__(self, line=""):
        self.append(line)


def parse_command(cell: Cell) -> dict:
    """What the script (``train_backdoor_cifar.py``, ``python3 -m defenses NAME``) makes of ``cell.command()``:
    ``{"settings", "config", "inputs"}`` in the cell's own form."""
    from defenses.cli import DefenseScript
    from defenses.registry import get_defense
    from training.backdoor import TrainConfig
    from utils.cli import RunSettings
    from utils.options import as_dict, from_args

    argv = shlex.split(cell.command())
    if cell.kind == "train":
        import train_backdoor_cifar
        from data.attacks.cli import attack_kwargs

        assert argv[:2] == ["python3", "train_backdoor_cifar.py"], argv
        args = train_backdoor_cifar.parse_args(argv[2:])
        attack = attack_kwargs(args)
        return {"settings": as_dict(from_args(RunSettings, args)), "config": as_dict(from_args(TrainConfig, args)),
                "inputs": {"attack": {"poison_type": attack["poison_type"], "poison_target": attack["poison_target"],
                                      "target_type": attack["target_type"], "options": attack["attack_options"]}},
                "directory": args.output_dir}
    assert argv[:4] == ["python3", "-m", "defenses", cell.kind], argv
    # the flags ``python3 -m defenses NAME`` takes (defenses/__main__.py)
    script = DefenseScript(cell.kind, "", inputs=("checkpoint", "trigger_info", "output_dir", "mask_file", "steps"),
                           attack_flags=get_defense(cell.kind).attack_flags)
    config, inputs = script.config_and_inputs(script.parse_args(argv[4:]))
    return {"settings": as_dict(inputs.settings), "config": as_dict(config),
            "inputs": {"checkpoint": inputs.checkpoint, "trigger_info": inputs.trigger_info,
                       "output_dir": inputs.output_dir, "mask_file": inputs.mask_file,
                       "steps": list(inputs.steps) if inputs.steps else None},
            "directory": inputs.output_dir}


def assert_command_is_the_cell(cell: Cell) -> None:
    parsed = parse_command(cell)
    assert parsed == {"settings": cell.settings, "config": cell.config, "inputs": cell.inputs,
                      "directory": cell.directory}, cell.id


# ------------------------------------------------------------------------------------------ config, cells

def test_cells_of_a_grid(tmp_path):
    config = load_config(write_config(tmp_path / "g.yaml"))
    cells = plan(config)
    # per model: the model; for ANP and RNP each, a masks cell and one pruning cell per rule
    assert len(cells) == 4 * (1 + (1 + 2) * 2)
    by_id = {c.id: c for c in cells}
    model = by_id["badnets/seed1/model"]
    assert model.kind == "train" and model.stage == "train" and model.deps == []
    assert model.settings["seed"] == 1 and model.settings["width"] == 4 and model.settings["device"] == "cpu"
    assert model.settings["progress"] is False
    assert model.config["epoch"] == 1 and model.config["batch_size"] == 32
    assert model.inputs["attack"] == {"poison_type": "badnets", "poison_target": 0, "target_type": "all2one",
                                      "options": {"poison_rate": 0.1}}
    assert by_id["blend/seed0/model"].inputs["attack"]["options"] == {"trigger_alpha": 0.5}
    defaults = {"pruning_step": 0.05, "operating_point": "fixed", "save_threshold": 0.2, "max_acc_drop": 0.05}

    masks = by_id["badnets/seed1/anp/dseed1/masks"]  # ANP's masks, once per model and defense seed
    assert masks.kind == "anp" and masks.stage == "masks" and masks.rule is None and masks.deps == [model.id]
    assert masks.config["nb_iter"] == 5 and masks.config["batch_size"] == 32 and masks.config["defense_frac"] == 0.05
    assert {k: masks.config[k] for k in defaults} == defaults  # it prunes nothing: the pruning options at defaults
    assert masks.inputs == {"checkpoint": os.path.join(model.directory, "last_model.th"),
                            "trigger_info": os.path.join(model.directory, "trigger_info.th"),
                            "output_dir": masks.directory, "mask_file": None, "steps": ["masks"]}
    assert masks.settings["seed"] == 1 and masks.defense == "anp" and masks.defense_seed == 1
    fixed = by_id["badnets/seed1/anp/dseed1/fixed"]  # one cell per rule, pruning by the masks cell's file
    assert fixed.kind == "anp" and fixed.stage == "prune" and fixed.deps == [masks.id] and fixed.rule == "fixed"
    assert fixed.inputs == {**masks.inputs, "output_dir": fixed.directory, "steps": ["prune"],
                            "mask_file": os.path.join(masks.directory, "mask_values.txt")}
    assert fixed.config["operating_point"] == "fixed" and fixed.config["save_threshold"] == 0.2
    assert fixed.config["pruning_step"] == 0.3 and fixed.config["defense_frac"] == 0.05  # the entry's, for pruning
    assert fixed.config["nb_iter"] == 2000 and fixed.config["batch_size"] == 128  # mask-step options: defaults
    assert fixed.settings["seed"] == 1 and fixed.defense == "anp" and fixed.defense_seed == 1
    prune = by_id["badnets/seed1/anp/dseed1/clean-data"]
    assert prune.stage == "prune" and prune.deps == [masks.id] and prune.rule == "clean-data"
    assert prune.inputs == {**fixed.inputs, "output_dir": prune.directory}
    assert prune.config["operating_point"] == "defense-acc" and prune.config["max_acc_drop"] == 0.1  # the rule's
    rule_options = ("operating_point", "save_threshold", "max_acc_drop")
    assert {k: v for k, v in prune.config.items() if k not in rule_options} == \
        {k: v for k, v in fixed.config.items() if k not in rule_options}
    rnp_masks = by_id["blend/seed0/rnp/dseed0/masks"]
    first, second = by_id["blend/seed0/rnp/dseed0/fixed"], by_id["blend/seed0/rnp/dseed0/clean-data"]
    assert rnp_masks.kind == first.kind == second.kind == "rnp" and rnp_masks.stage == "masks"
    assert rnp_masks.deps == ["blend/seed0/model"] and rnp_masks.inputs["steps"] == ["unlearn", "recover"]
    assert rnp_masks.inputs["mask_file"] is None and rnp_masks.config["defense_frac"] == 0.05  # ``ratio``: its alias
    assert rnp_masks.config["schedule"] == [1] and rnp_masks.config["unlearning_epochs"] == 1
    assert rnp_masks.config["pruning_step"] == 0.05 and rnp_masks.config["eval_every"] == 0
    for cell in (first, second):
        assert cell.deps == [rnp_masks.id] and cell.stage == "prune" and cell.inputs["steps"] == ["prune"]
        assert cell.inputs["mask_file"] == os.path.join(rnp_masks.directory, "mask_values.txt")
        assert cell.config["unlearning_epochs"] == 20 and cell.config["eval_every"] == 1  # RNP's defaults
        assert cell.config["pruning_step"] == 0.3 and cell.config["defense_frac"] == 0.05
    assert [c.wave for c in (model, masks, fixed, prune, rnp_masks, first, second)] == [0, 1, 2, 2, 1, 2, 2]
    assert {c.stage: c.wave for c in cells} == {"train": 0, "masks": 1, "prune": 2}
    assert all(c.directory == os.path.join(config.output_dir, c.id) for c in cells)
    assert [c.id for c in cells[:7]] == ["badnets/seed0/model", "badnets/seed0/anp/dseed0/masks",
                                         "badnets/seed0/anp/dseed0/fixed", "badnets/seed0/anp/dseed0/clean-data",
                                         "badnets/seed0/rnp/dseed0/masks", "badnets/seed0/rnp/dseed0/fixed",
                                         "badnets/seed0/rnp/dseed0/clean-data"]


def test_a_cells_command_is_the_same_run_from_the_shell(tmp_path):
    cells = plan(load_config(write_config(tmp_path / "g.yaml")))
    by_id = {c.id: c for c in cells}
    model, prune = by_id["blend/seed1/model"], by_id["blend/seed1/anp/dseed1/clean-data"]
    masks = by_id["blend/seed1/anp/dseed1/masks"]
    assert model.command().startswith("python3 train_backdoor_cifar.py ")
    assert "--seed 1 " in model.command() and "--poison-type blend " in model.command()
    assert "--trigger-alpha 0.5 " in model.command() and "--epoch 1 " in model.command()
    assert masks.command().startswith("python3 -m defenses anp ")
    for flag in ("--steps masks ", "--nb-iter 5", "--defense-frac 0.05", f"--output-dir {masks.directory}"):
        assert flag in masks.command(), flag
    for flag in ("--mask-file", "--operating-point", "--pruning-step", "--save-threshold"):
        assert flag not in masks.command(), flag
    assert prune.command().startswith("python3 -m defenses anp ")
    for flag in ("--operating-point defense-acc", "--max-acc-drop 0.1", "--defense-frac 0.05", "--pruning-step 0.3",
                 "--steps prune ",
                 f"--mask-file {prune.inputs['mask_file']}", f"--output-dir {prune.directory}"):
        assert flag in prune.command(), flag
    assert "--save-threshold" not in prune.command()  # a default: left out
    assert "--nb-iter" not in prune.command() and "--batch-size" not in prune.command()  # the masks cell's options
    assert "--steps unlearn recover " in by_id["blend/seed1/rnp/dseed1/masks"].command()
    assert "--steps prune " in by_id["blend/seed1/rnp/dseed1/fixed"].command()
    for cell in cells:
        assert_command_is_the_cell(cell)


def test_defense_seeds_and_labels(tmp_path):
    config = load_config(write_config(tmp_path / "g.yaml", defense_seeds=[3, 4], seeds=[0],
                                      attacks={"patch-all2all": {"poison_type": "badnets", "target_type": "all2all"}},
                                      defenses={"anp-long": {"defense": "anp", "nb_iter": 7}}, rules=["fixed"]))
    cells = plan(config)
    assert [c.id for c in cells] == ["patch-all2all/seed0/model",
                                     "patch-all2all/seed0/anp-long/dseed3/masks",
                                     "patch-all2all/seed0/anp-long/dseed3/fixed",
                                     "patch-all2all/seed0/anp-long/dseed4/masks",
                                     "patch-all2all/seed0/anp-long/dseed4/fixed"]
    model = cells[0]
    assert model.inputs["attack"]["poison_type"] == "badnets" and model.inputs["attack"]["target_type"] == "all2all"
    assert "--target-type all2all" in model.command()
    for masks, fixed, dseed in ((cells[1], cells[2], 3), (cells[3], cells[4], 4)):
        for cell in (masks, fixed):
            assert cell.kind == "anp" and cell.defense == "anp-long" and cell.defense_seed == dseed
            assert cell.settings["seed"] == dseed
            assert cell.inputs["checkpoint"] == os.path.join(model.directory, "last_model.th")
        assert masks.config["nb_iter"] == 7 and masks.deps == [model.id] and masks.stage == "masks"
        assert fixed.deps == [masks.id] and fixed.rule == "fixed" and fixed.directory.endswith(f"dseed{dseed}/fixed")
        assert fixed.inputs["mask_file"] == os.path.join(masks.directory, "mask_values.txt")


def test_a_grid_runs_rnps_per_epoch_default_and_its_per_batch_variant_side_by_side(tmp_path):
    config = load_config(write_config(tmp_path / "g.yaml", seeds=[0], attacks={"badnets": {}}, rules=["fixed"],
                                      defenses={"rnp": {"eval_every": 0},
                                                "rnp-batch": {"defense": "rnp", "stop_check": "batch"}}))
    by_id = {c.id: c for c in plan(config)}
    # the stop rule is a mask step's option: the masks cells differ, their pruning cells run the same options
    default, variant = by_id["badnets/seed0/rnp/dseed0/masks"], by_id["badnets/seed0/rnp-batch/dseed0/masks"]
    assert default.config["stop_check"] == "epoch" and "--stop-check" not in default.command()
    assert variant.config["stop_check"] == "batch" and "--stop-check batch" in variant.command()
    assert variant.kind == default.kind == "rnp" and variant.directory != default.directory
    pruned, pruned_variant = by_id["badnets/seed0/rnp/dseed0/fixed"], by_id["badnets/seed0/rnp-batch/dseed0/fixed"]
    assert pruned.config == pruned_variant.config and pruned.config["stop_check"] == "epoch"
    assert pruned.deps == [default.id] and pruned_variant.deps == [variant.id]
    assert pruned_variant.inputs["mask_file"] == os.path.join(variant.directory, "mask_values.txt")


def test_overrides_and_shipped_configs(tmp_path):
    for name in ("fmnist_cpu", "fmnist_gpu", "anp_paper", "rnp_paper", "quickstart", "attacks_cpu", "soda_released"):
        config = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"),
                             {"dataset": "fashion-mnist", "seeds": [7], "output_dir": str(tmp_path)})
        cells = plan(config)
        assert cells and all(c.settings["seed"] == 7 for c in cells), name
        assert all(c.settings["dataset"] == "fashion-mnist" for c in cells), name
        assert all("--dataset fashion-mnist" in c.command() and "--seed 7" in c.command() for c in cells), name
        assert {c.seed for c in cells} == {7}
        for cell in cells:
            assert_command_is_the_cell(cell)
    entries = yaml.safe_load(open(os.path.join(ROOT, "configs", "published.yaml")))["entries"]
    assert entries
    for entry in entries:  # every published number cites its source
        assert entry["source"] and entry["attack"] and entry["defense"] in ("anp", "rnp", "soda")
        for side in ("before", "after"):
            assert all(isinstance(v, (int, float)) for v in entry[side].values())


@pytest.mark.parametrize("change, needle", [
    ({"attacks": {"badnet": {}}}, "attacks.badnet: unknown poison type 'badnet'"),
    ({"defenses": {"anp2": {}}}, "defenses.anp2: unknown defense 'anp2'"),
    ({"rules": {"strict": {}}}, "rules.strict: unknown rule 'strict'"),
    ({"rules": {"fixed": {"threshold": 0.3}}}, "rules.fixed.threshold: not an option of rule 'fixed'"),
    ({"defenses": {"anp": {"nb_iters": 5}}}, "defenses.anp.nb_iters: not an option (expected one of"),
    ({"defenses": {"anp": {"nb_iter": 0}}}, "defenses.anp.nb_iter: expected a positive number, got 0"),
    ({"defenses": {"rnp": {"stop_check": "never"}}}, "defenses.rnp.stop_check: expected one of"),
    ({"defenses": {"anp": {"seed": 5}}}, "defenses.anp.seed: set by the grid"),
    ({"defenses": {"rnp": {"arch": "vgg19_bn"}}}, "defenses.rnp.arch: set by the grid"),
    ({"defenses": {"anp": {"save_threshold": 0.3}}}, "defenses.anp.save_threshold: set by the grid's operating "
                                                     "rules"),
    ({"defenses": {"rnp": {"operating-point": "defense-acc"}}}, "defenses.rnp.operating-point: set by the grid's "
                                                                "operating rules"),
    ({"defenses": {"anp": {"max_acc_drop": 0.1}}}, "defenses.anp.max_acc_drop: set by the grid's operating rules"),
    ({"defenses": {"rnp": {"unlearned_model_path": "u.tar"}}}, "defenses.rnp.unlearned_model_path: a single run's "
                                                               "input"),
    ({"defenses": {"anp": {"attacks": ["lira"]}}}, "defenses.anp.attacks: expected a list of attack labels"),
    ({"defenses": {"soda": {"split": None}}}, "defenses.soda.split: expected str, got None"),
    ({"defenses": {"soda": {"option": "detect"}}}, "defenses.soda.option: a single run's input"),
    ({"train": {"epochs": 5}}, "train.epochs: not a stage-1 option nor an option of any attack"),
    ({"train": {"init_model": "m.th"}}, "train.init_model: a single run's input"),
    ({"train": {"seed": 3}}, "train.seed: set by the grid"),
    ({"attacks": {"blend": {"trigger_alpha": "strong"}}}, "attacks.blend.trigger_alpha: expected a float"),
    ({"attacks": {"badnets": {"sig_freq": 6}}}, "attacks.badnets.sig_freq: not an option of attack 'badnets'"),
    ({"attacks": {"sig": {"target_type": "all2all"}}}, "attacks.sig.target_type: sig supports all2one, not "
                                                       "'all2all'"),
    ({"attacks": {"blend": {"width": 8}}}, "attacks.blend.width: set by the grid"),
    ({"seeds": "zero"}, "seeds: expected a list of integer seeds"),
    ({"colour": "red"}, "colour: unknown key"),
    ({"attacks": None}, "attacks: missing"),
    ({"slurm": {"queue": "gpu"}}, "slurm.queue: unknown key"),
    ({"published": "nowhere.yaml"}, "published:"),
])
def test_config_errors_name_the_key_and_the_file(tmp_path, change, needle):
    path = write_config(tmp_path / "g.yaml", **change)
    with pytest.raises(UserError) as err:
        plan(load_config(path))
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(f"{path}: ")


def test_every_option_is_checked_when_the_config_is_read(tmp_path):
    """Options are typed when read: an unknown defense option or a rule option in a defense entry fails at
    load_config, before any plan; the original spellings and kebab-case name the same field."""
    for defenses, needle in (({"anp": {"nb_iters": 5}}, "defenses.anp.nb_iters: not an option"),
                             ({"anp": {"save-threshold": 0.3}}, "defenses.anp.save-threshold: set by the grid's "
                                                                "operating rules (rules:), not per defense")):
        path = write_config(tmp_path / "g.yaml", defenses=defenses)
        with pytest.raises(UserError) as err:
            load_config(path)
        assert str(err.value).startswith(f"{path}: {needle}") and "\n" not in str(err.value)
    config = load_config(write_config(tmp_path / "g.yaml", defenses={
        "anp": {"nb-iter": 9, "val_frac": 0.02, "anp_eps": 0.3}, "rnp": {"ratio": 0.03, "clean_threshold": 0.3}}))
    anp, rnp = config.defenses
    assert (anp.config.nb_iter, anp.config.defense_frac, anp.config.anp_eps) == (9, 0.02, 0.3)
    assert (rnp.config.defense_frac, rnp.config.clean_threshold) == (0.03, 0.3)


def test_an_unknown_defense_option_is_one_line_and_writes_nothing(tmp_path):
    path = write_config(tmp_path / "g.yaml", defenses={"anp-long": {"defense": "anp", "nb_iters": 500}})
    output_dir = str(tmp_path / "grid")
    for argv in ([], ["--dry-run"], ["--report"]):
        with pytest.raises(UserError) as err:
            reproduce.main(reproduce.parse_args(["--config", path, *argv]))
        assert str(err.value).startswith(f"{path}: defenses.anp-long.nb_iters: not an option")
        assert "\n" not in str(err.value)
    assert not os.path.exists(output_dir)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "reproduce.py"), "--config", path],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "defenses.anp-long.nb_iters: not an option" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not os.path.exists(output_dir)


def test_a_defense_entry_restricted_to_some_attacks(tmp_path):
    attacks = {"stripet": {"poison_type": "semantic", "semantic_attack": "stripet"}, "badnets": {}}
    config = load_config(write_config(tmp_path / "g.yaml", seeds=[0], attacks=attacks, rules=["fixed"], defenses={
        "anp": {}, "soda": {"attacks": ["stripet"]}, "soda-oracle": {"defense": "soda", "pair": "attacker",
                                                                     "attacks": "stripet"}}))
    anp, soda, oracle = config.defenses
    assert anp.attacks is None and soda.attacks == ["stripet"] and oracle.attacks == ["stripet"]
    assert oracle.kind == "soda" and oracle.config.pair == "attacker"
    cells = plan(config)
    assert [c.id for c in cells] == ["stripet/seed0/model", "stripet/seed0/anp/dseed0/masks",
                                     "stripet/seed0/anp/dseed0/fixed", "stripet/seed0/soda/dseed0/soda",
                                     "stripet/seed0/soda-oracle/dseed0/soda", "badnets/seed0/model",
                                     "badnets/seed0/anp/dseed0/masks", "badnets/seed0/anp/dseed0/fixed"]
    by_id = {c.id: c for c in cells}
    assert by_id["stripet/seed0/soda-oracle/dseed0/soda"].config["pair"] == "attacker"
    assert by_id["stripet/seed0/soda/dseed0/soda"].config["pair"] == "detected"
    assert "--pair attacker" in by_id["stripet/seed0/soda-oracle/dseed0/soda"].command()


def test_an_oracle_defense_on_an_attack_without_a_source_class_is_refused(tmp_path):
    attacks = {"stripet": {"poison_type": "semantic", "semantic_attack": "stripet"}, "blend": {}}
    path = write_config(tmp_path / "g.yaml", seeds=[0], attacks=attacks,
                        defenses={"soda-oracle": {"defense": "soda", "pair": "attacker"}})
    config = load_config(path)
    with pytest.raises(UserError) as err:
        plan(config)
    message = str(err.value)
    assert message.startswith(f"{path}: defenses.soda-oracle: needs the attacker's (source, target) pair")
    assert "attack 'blend' (blend)" in message and "attacks: [...]" in message and "\n" not in message
    with pytest.raises(UserError, match="defenses.soda-oracle: needs the attacker's"):
        reproduce.main(reproduce.parse_args(["--config", path, "--dry-run"]))
    assert not os.path.exists(config.output_dir)
    # restricted to the semantic attack, it plans; detected pairs apply to any attack
    path = write_config(tmp_path / "g.yaml", seeds=[0], attacks=attacks,
                        defenses={"soda-oracle": {"defense": "soda", "pair": "attacker", "attacks": ["stripet"]},
                                  "soda": {}})
    assert [c.id for c in plan(load_config(path)) if c.kind == "soda"] == [
        "stripet/seed0/soda-oracle/dseed0/soda", "stripet/seed0/soda/dseed0/soda", "blend/seed0/soda/dseed0/soda"]


def test_malformed_and_missing_config_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("attacks: [badnets\nseeds: 0\n")
    with pytest.raises(UserError, match=r"bad.yaml: not a readable YAML file \(line"):
        load_config(str(bad))
    bad.write_text("- just a list\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_config(str(bad))
    with pytest.raises(UserError, match="--config: .* does not exist"):
        load_config(str(tmp_path / "none.yaml"))
    (tmp_path / "papers.yaml").write_text("entries:\n  - {attack: badnets, defense: anp, before: {acc: 90}, "
                                          "after: {acc: 80}}\n")
    with pytest.raises(UserError, match="published: .*papers.yaml: entry 1 has no 'source'"):
        load_config(write_config(tmp_path / "g.yaml", published="papers.yaml"))


def test_bad_input_on_the_command_line_is_one_line(tmp_path):
    path = write_config(tmp_path / "g.yaml", attacks={"badnet": {}})
    for args, needle in (([path], "unknown poison type"), ([path, "--executor", "cloud"], "--executor"),
                         ([write_config(tmp_path / "ok.yaml"), "--only", "nothing-like-this"], "--only")):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "reproduce.py"), "--config", *args],
                                capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 2 and needle in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_slurm_without_submitit_and_local_gpus_without_gpus(tmp_path, monkeypatch):
    path = write_config(tmp_path / "g.yaml")
    monkeypatch.setitem(sys.modules, "submitit", None)  # import fails
    with pytest.raises(UserError, match="--executor slurm needs submitit: pip install submitit=="):
        reproduce.main(reproduce.parse_args(["--config", path, "--executor", "slurm"]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(UserError, match="--executor local-gpus: no GPU is visible"):
        reproduce.main(reproduce.parse_args(["--config", path, "--executor", "local-gpus"]))


def test_only_selects_cells_and_what_they_need(tmp_path):
    cells = plan(load_config(write_config(tmp_path / "g.yaml")))
    ids = [c.id for c in select(cells, ["blend", "seed1", "clean-data"])]  # with the masks and model they prune
    assert ids == ["blend/seed1/model", "blend/seed1/anp/dseed1/masks", "blend/seed1/anp/dseed1/clean-data",
                   "blend/seed1/rnp/dseed1/masks", "blend/seed1/rnp/dseed1/clean-data"]
    assert len(select(cells, ["badnets,blend", "anp"])) == 4 * 4  # the model and ANP's masks and two rules
    assert [c.id for c in select(cells, ["badnets/seed0/rnp/*/fixed"])] == ["badnets/seed0/model",
                                                                            "badnets/seed0/rnp/dseed0/masks",
                                                                            "badnets/seed0/rnp/dseed0/fixed"]
    assert [c.id for c in select(cells, ["blend/seed0/anp/*/masks"])] == ["blend/seed0/model",
                                                                          "blend/seed0/anp/dseed0/masks"]
    with pytest.raises(UserError, match="--only"):
        select(cells, ["lira"])


# ------------------------------------------------------------------------------------------ resume

def test_resume_skips_done_cells_and_reruns_corrupt_stale_and_downstream(tmp_path):
    path = write_config(tmp_path / "g.yaml")
    cells = plan(load_config(path))
    first = FakeExecutor()
    summary = run_grid(cells, first, Log())
    assert summary["ran"] == len(cells) == len(first.ran) and summary["failed"] == 0
    assert set(plan_states(cells).values()) == {("done", "")}
    assert set(plan_states(plan(load_config(path))).values()) == {("done", "")}  # planned again: the same

    masks = next(c for c in cells if c.id == "badnets/seed0/anp/dseed0/masks")
    with open(masks.metrics_path, "w") as f:
        f.write('{"args": {"nb_iter"')  # a truncated file
    model = next(c for c in cells if c.id == "blend/seed1/model")
    os.remove(model.metrics_path)  # interrupted before this cell finished
    log, again = Log(), FakeExecutor()
    run_grid(cells, again, log)
    assert again.ran == ["blend/seed1/model",  # wave by wave: the model, the masks, the rules
                         "badnets/seed0/anp/dseed0/masks", "blend/seed1/anp/dseed1/masks",
                         "blend/seed1/rnp/dseed1/masks",
                         "badnets/seed0/anp/dseed0/fixed", "badnets/seed0/anp/dseed0/clean-data",
                         "blend/seed1/anp/dseed1/fixed", "blend/seed1/anp/dseed1/clean-data",
                         "blend/seed1/rnp/dseed1/fixed", "blend/seed1/rnp/dseed1/clean-data"]
    assert any("badnets/seed0/anp/dseed0/masks" in line and "corrupt" in line and "rerunning" in line for line in log)
    assert any("badnets/seed0/anp/dseed0/fixed: its input badnets/seed0/anp/dseed0/masks reruns" in line
               for line in log)
    assert any("blend/seed1/anp/dseed1/masks: its input blend/seed1/model reruns" in line for line in log)
    assert any("blend/seed1/anp/dseed1/clean-data: its input blend/seed1/anp/dseed1/masks reruns" in line
               for line in log)

    # A mask-step option changed: the masks cells of that defense ran with the old value; their rules' cells
    # (whose configs hold only the pruning options) rerun because their input does. The model and the other
    # defense are still done.
    anp_options = {"nb_iter": 7, "print_every": 5, "batch_size": 32, "val_frac": 0.05, "pruning_step": 0.3}
    rnp_options = yaml.safe_load(open(path))["defenses"]["rnp"]
    changed = plan(load_config(write_config(tmp_path / "g.yaml", defenses={"anp": anp_options, "rnp": rnp_options})))
    states = plan_states(changed)
    assert states["badnets/seed0/anp/dseed0/masks"] == ("stale", "it ran with nb_iter 5, the config now says 7")
    assert states["badnets/seed0/anp/dseed0/fixed"] == ("rerun", "its input badnets/seed0/anp/dseed0/masks reruns")
    assert states["badnets/seed0/anp/dseed0/clean-data"][0] == "rerun"
    assert states["badnets/seed0/model"][0] == "done" and states["badnets/seed0/rnp/dseed0/masks"][0] == "done"
    assert states["badnets/seed0/rnp/dseed0/fixed"][0] == "done"
    assert {c.id for c in changed if states[c.id][0] != "done"} == {c.id for c in changed if c.defense == "anp"}
    log, executor = Log(), FakeExecutor()
    run_grid(changed, executor, log)
    assert any("cell badnets/seed0/anp/dseed0/masks: it ran with nb_iter 5, the config now says 7; rerunning it"
               in line for line in log)
    assert len(executor.ran) == 4 * 3

    # A rule's option changed: only that rule's cells are stale; the masks are not recomputed, the other rule's
    # cells are still done.
    rules = {"fixed": {"save_threshold": 0.3}, "clean-data": {"rule": "defense-acc", "max_acc_drop": 0.1}}
    changed = plan(load_config(write_config(tmp_path / "g.yaml", rules=rules,
                                            defenses={"anp": anp_options, "rnp": rnp_options})))
    states = plan_states(changed)
    assert states["blend/seed1/rnp/dseed1/fixed"] == ("stale", "it ran with save_threshold 0.2, the config now "
                                                                "says 0.3")
    assert states["blend/seed1/rnp/dseed1/masks"] == ("done", "")
    assert states["blend/seed1/rnp/dseed1/clean-data"] == ("done", "")
    assert states["blend/seed1/model"][0] == "done"
    assert {c.id for c in changed if states[c.id][0] != "done"} == {c.id for c in changed if c.rule == "fixed"}

    # A pruning option changed: every rule's cell is stale, the masks are still done.
    changed = plan(load_config(write_config(tmp_path / "g.yaml", defenses={
        "anp": {**anp_options, "pruning_step": 0.1}, "rnp": rnp_options})))
    states = plan_states(changed)
    assert states["badnets/seed1/anp/dseed1/clean-data"] == ("stale", "it ran with pruning_step 0.3, the config "
                                                                       "now says 0.1")
    assert states["badnets/seed1/anp/dseed1/masks"] == ("done", "")
    assert {c.id for c in changed if states[c.id][0] != "done"} == {c.id for c in changed
                                                                   if c.defense == "anp" and c.stage == "prune"}

    # Stage 1's options (here through --epoch) changed: the models are stale, every defense cell reruns.
    config = load_config(write_config(tmp_path / "g.yaml", defenses={"anp": anp_options, "rnp": rnp_options}),
                         train_overrides={"epoch": 2})
    states = plan_states(plan(config))
    assert states["badnets/seed1/model"] == ("stale", "it ran with epoch 1, the config now says 2")
    assert states["badnets/seed1/anp/dseed1/masks"] == ("rerun", "its input badnets/seed1/model reruns")
    assert states["badnets/seed1/anp/dseed1/fixed"] == ("rerun", "its input badnets/seed1/anp/dseed1/masks reruns")
    assert {s for s, _ in states.values()} == {"stale", "rerun"}


def test_a_failing_cell_blocks_only_what_needs_it(tmp_path):
    cells = plan(load_config(write_config(tmp_path / "g.yaml")))
    executor = FakeExecutor(fail={"badnets/seed0/model", "blend/seed0/anp/dseed0/masks"})
    log = Log()
    summary = run_grid(cells, executor, log)
    # badnets seed 0's six defense cells (two masks, four rules); ANP's two rules on blend seed 0, which prune by
    # the failed masks
    assert summary["failed"] == 2 and summary["blocked"] == 6 + 2
    assert summary["ok"] == len(cells) - 10
    assert not {"badnets/seed0/anp/dseed0/masks", "badnets/seed0/anp/dseed0/fixed", "blend/seed0/anp/dseed0/fixed",
                "blend/seed0/anp/dseed0/clean-data"} & set(executor.ran)
    done = {c.id for c in cells if status(c)[0] == "done"}
    assert "badnets/seed1/anp/dseed1/fixed" in done and "blend/seed0/rnp/dseed0/clean-data" in done
    assert "blend/seed0/rnp/dseed0/masks" in done
    assert "blend/seed0/anp/dseed0/clean-data" not in done and "blend/seed0/anp/dseed0/masks" not in done
    assert any(line.startswith("  failed badnets/seed0/model: boom") for line in log)
    assert any(line.startswith("  failed blend/seed0/anp/dseed0/masks: boom") for line in log)
    assert any(line == "blocked blend/seed0/anp/dseed0/clean-data: its input blend/seed0/anp/dseed0/masks did not "
                       "finish" for line in log)
    assert any(line == "blocked badnets/seed0/rnp/dseed0/fixed: its input badnets/seed0/rnp/dseed0/masks did not "
                       "finish" for line in log)  # blocked in turn


# ------------------------------------------------------------------------------------------ aggregation

def _write(path, metrics):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(metrics, f)


def _hand_made_grid(tmp_path, asr_of_rows=(0.9, 0.3, 0.05)):
    """One attack, three seeds, ANP with two rules; the sweep's poisoned-test ASR per row is given."""
    path = write_config(tmp_path / "g.yaml", attacks={"badnets": {}}, seeds=[0, 1, 2], defenses={"anp": {}})
    config = load_config(path)
    cells = plan(config)
    for i, cell in enumerate(c for c in cells if c.stage == "train"):
        _write(cell.metrics_path, {"clean_acc": [0.90, 0.92, 0.94][i], "asr": 1.0, "ra": 0.0,
                                   "timings": {"total_seconds": 100}})
    before = {"clean_acc": 0.9, "asr": 1.0, "ra": 0.0, "defense_acc": 0.9}
    for cell in cells:
        if cell.stage == "masks":  # ANP's masks cell: no sweep, its own timing
            _write(cell.metrics_path, {"before": before, "timings": {"optimize_seconds": 50}})
        elif cell.stage == "prune":  # each rule's cell prunes by the masks
            rows = [{"value": v, "pruned": n, "clean_acc": a, "asr": s, "ra": 0.5, "defense_acc": a}
                    for v, n, a, s in zip((0.0, 0.2, 0.4), (0, 10, 30), (0.9, 0.88, 0.80), asr_of_rows)]
            point = ({"clean_acc": 0.88, "asr": [0.2, 0.4, 0.6][cell.seed], "ra": 0.5, "threshold": 0.2,
                      "neurons_pruned": 10} if cell.rule == "fixed" else
                     {"clean_acc": 0.85, "asr": 0.1, "ra": 0.7, "threshold": 0.25, "neurons_pruned": 15})
            _write(cell.metrics_path, {"before": before, "operating_point": point, "rows": rows,
                                       "timings": {"prune_seconds": 20}})
    return config, cells


def test_aggregation_mean_std_n(tmp_path):
    config, cells = _hand_made_grid(tmp_path)
    text = write_report(config, cells)
    assert summarize([0.2, 0.4, 0.6]) == pytest.approx({"mean": 0.4, "std": 0.2, "n": 3, "min": 0.2, "max": 0.6})
    fixed = next(line for line in text.splitlines() if line.startswith("| anp | fixed 0.2 |"))
    assert "| 3 | 88.0 ± 0.0 | 40.0 ± 20.0 | 50.0 ± 0.0 | 88.0–88.0 | 20.0–60.0 | 0/3 | 10 |" in fixed
    assert "masks 50 + prune 20" in fixed
    models = next(line for line in text.splitlines() if line.startswith("| no defense |"))
    assert "| 3 | 92.0 ± 2.0 | 100.0 ± 0.0 |" in models and "train 100" in models
    clean = next(line for line in text.splitlines() if line.startswith("| anp | clean-data"))
    assert "| 3/3 |" in clean  # ASR 0.10 and ACC 0.85 vs 0.90 before: removed within 5 points
    assert "masks 50 + prune 20" in clean  # the run's masks cell's, the row's own pruning
    main_table = text.split("Oracle rows")[0].split("## badnets")[1]
    assert [line.split(" | ")[1] for line in main_table.splitlines() if line.startswith("| anp |")] == [
        "fixed 0.2", "clean-data (defense-acc, drop ≤ 0.1)"]  # the masks cells make no row of their own
    rows = list(csv.DictReader(open(os.path.join(config.output_dir, "results.csv"))))
    assert len(cells) == 3 * (1 + 1 + 2)
    assert len(rows) == len(cells) + 3  # one row per cell plus one oracle row per ANP run
    assert {r["stage"] for r in rows} == {"train", "masks", "prune", "oracle"}
    assert [r["cell"] for r in rows if r["stage"] == "masks"] == [f"badnets/seed{s}/anp/dseed{s}/masks"
                                                                  for s in range(3)]
    assert os.path.isfile(os.path.join(config.output_dir, "plots", "badnets.png"))
    assert os.path.isfile(os.path.join(config.output_dir, "plots", "pruning_badnets_anp.png"))


def test_oracle_is_reported_apart_and_never_feeds_an_operating_point(tmp_path):
    metrics = {"before": {"clean_acc": 0.9, "asr": 1.0, "ra": 0.0},
               "rows": [{"value": 0.0, "pruned": 0, "clean_acc": 0.9, "asr": 1.0, "ra": 0.0},
                        {"value": 0.2, "pruned": 10, "clean_acc": 0.87, "asr": 0.3, "ra": 0.5},
                        {"value": 0.4, "pruned": 30, "clean_acc": 0.80, "asr": 0.0, "ra": 0.8}]}
    assert oracle_point(metrics, 0.05)["threshold"] == 0.2  # 0.4 loses more than 5 points of ACC
    assert oracle_point(metrics, 0.2)["threshold"] == 0.4

    config, cells = _hand_made_grid(tmp_path, asr_of_rows=(0.9, 0.3, 0.05))
    a = collect(config, cells)
    config, cells = _hand_made_grid(tmp_path, asr_of_rows=(0.9, 0.01, 0.05))  # only the test ASR of the sweep
    b = collect(config, cells)

    def pick(records, stage):
        return [(r["cell"], r["acc"], r["asr"], r["threshold"]) for r in records if r["stage"] == stage]
    assert pick(a, "masks") == pick(b, "masks") and len(pick(a, "masks")) == 3
    assert pick(a, "prune") == pick(b, "prune") and len(pick(a, "prune")) == 6  # what the cells chose
    assert pick(a, "oracle") != pick(b, "oracle")
    assert all(r["cell"].endswith("/oracle") for r in a if r["stage"] == "oracle") and len(pick(a, "oracle")) == 3
    text = write_report(config, cells)
    assert "Oracle rows (threshold chosen on the poisoned test set" in text
    main_table = text.split("Oracle rows")[0]
    assert "oracle" not in main_table.split("## badnets")[1]


def test_rnp_rows_time_their_masks_cells_steps_and_their_own_pruning(tmp_path):
    config = load_config(write_config(tmp_path / "g.yaml", attacks={"badnets": {}}, seeds=[0, 1],
                                      defenses={"rnp": {}}))
    cells = plan(config)
    assert [c.stage for c in cells] == ["train", "masks", "prune", "prune"] * 2
    before = {"clean_acc": 0.9, "asr": 1.0, "ra": 0.0}
    for cell in cells:
        if cell.stage == "train":
            _write(cell.metrics_path, {"clean_acc": 0.9, "asr": 1.0, "ra": 0.0, "timings": {"total_seconds": 100}})
        elif cell.stage == "masks":
            _write(cell.metrics_path, {"before": before, "timings": {"unlearn_seconds": [30, 50][cell.seed],
                                                                      "recover_seconds": 60}})
        else:
            point = {"clean_acc": 0.88, "asr": 0.05, "ra": 0.8, "threshold": 0.2, "neurons_pruned": 7}
            _write(cell.metrics_path, {"before": before, "operating_point": point, "timings": {
                "prune_seconds": 10 if cell.rule == "fixed" else 20}})
    text = write_report(config, cells)
    fixed = next(line for line in text.splitlines() if line.startswith("| rnp | fixed 0.2 |"))
    clean = next(line for line in text.splitlines() if line.startswith("| rnp | clean-data"))
    assert fixed.endswith("| unlearn 40 + recover 60 + prune 10 |")
    assert clean.endswith("| unlearn 40 + recover 60 + prune 20 |")
    assert "| 2 | 88.0 ± 0.0 | 5.0 ± 0.0 |" in fixed
    rows = list(csv.DictReader(open(os.path.join(config.output_dir, "results.csv"))))
    assert {r["stage"] for r in rows} == {"train", "masks", "prune"}  # no sweep rows: no oracle


# ------------------------------------------------------------------------------------------ end to end

def _cell_metrics(output_dir, cell_id):
    with open(os.path.join(output_dir, cell_id, "metrics.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_grid_end_to_end_local(tiny_cifar, tmp_path, capsys):
    path = write_config(tmp_path / "g.yaml", data_dir=tiny_cifar)
    config = load_config(path)
    assert reproduce.main(reproduce.parse_args(["--config", path])) == 0
    out = capsys.readouterr().out
    assert "[28/28] done" in out and "summary: 28 cells, 0 already done, 28 ran, 0 failed, 0 blocked" in out
    for name in ("results.csv", "table.md", "grid.log", "plots/badnets.png", "plots/pruning_blend_rnp.png"):
        assert os.path.isfile(os.path.join(config.output_dir, name)), name
    rows = list(csv.DictReader(open(os.path.join(config.output_dir, "results.csv"))))
    assert sum(r["stage"] != "oracle" for r in rows) == 28 and all(r["status"] == "done" for r in rows)
    assert {r["stage"] for r in rows} == {"train", "masks", "prune", "oracle"}
    m = _cell_metrics(config.output_dir, "blend/seed1/anp/dseed1/clean-data")
    assert "defenses anp " in m["command"] and "--operating-point defense-acc" in m["command"]
    assert "--mask-file " in m["command"] and "--steps prune" in m["command"]
    assert m["args"]["mask_file"].endswith("anp/dseed1/masks/mask_values.txt") and m["args"]["steps"] == ["prune"]
    assert m["code_version"] and {"torch", "torchvision", "numpy"} <= set(m["versions"])
    assert m["device"] == "cpu" and m["operating_point"]["rule"] == "defense-acc"
    assert "prune_seconds" in m["timings"] and "optimize_seconds" not in m["timings"]  # pruned by the masks cell's
    masks = _cell_metrics(config.output_dir, "blend/seed1/anp/dseed1/masks")  # the masks only
    assert "--steps masks" in masks["command"] and masks["args"]["steps"] == ["masks"]
    assert "optimize_seconds" in masks["timings"] and "prune_seconds" not in masks["timings"]
    assert "operating_point" not in masks and not masks.get("rows")
    assert os.path.isfile(os.path.join(config.output_dir, "blend/seed1/anp/dseed1/masks/mask_values.txt"))
    for rule in ("fixed", "clean-data"):
        assert not os.path.exists(os.path.join(config.output_dir, f"blend/seed1/anp/dseed1/{rule}/mask_values.txt"))
    fixed = _cell_metrics(config.output_dir, "blend/seed1/anp/dseed1/fixed")
    assert fixed["operating_point"]["rule"] == "fixed"
    assert [r["value"] for r in fixed["rows"]] == [r["value"] for r in m["rows"]]  # the same sweep, two rules
    model = _cell_metrics(config.output_dir, "blend/seed1/model")
    assert model["command"].startswith("train_backdoor_cifar.py ") and model["args"]["trigger_alpha"] == 0.5
    rnp = _cell_metrics(config.output_dir, "blend/seed1/rnp/dseed1/clean-data")
    first = _cell_metrics(config.output_dir, "blend/seed1/rnp/dseed1/fixed")
    assert [r["value"] for r in rnp["rows"]] == [r["value"] for r in first["rows"]]  # the same masks, pruned twice
    rnp_masks = _cell_metrics(config.output_dir, "blend/seed1/rnp/dseed1/masks")
    assert "--steps unlearn recover" in rnp_masks["command"]
    assert {"unlearn_seconds", "recover_seconds"} <= set(rnp_masks["timings"])
    assert "prune_seconds" not in rnp_masks["timings"]
    assert "recover_seconds" not in rnp["timings"] and "prune_seconds" in rnp["timings"]
    table = open(os.path.join(config.output_dir, "table.md")).read()
    anp_row = next(line for line in table.splitlines() if line.startswith("| anp | fixed 0.2 | 2 |"))
    assert "masks " in anp_row and " + prune " in anp_row
    rnp_row = next(line for line in table.splitlines() if line.startswith("| rnp | fixed 0.2 | 2 |"))
    assert "unlearn " in rnp_row and " + recover " in rnp_row and " + prune " in rnp_row

    # An interrupted grid: a cell lost, a masks cell corrupt; the rerun runs those and what depends on them,
    # nothing else.
    os.remove(os.path.join(config.output_dir, "badnets/seed1/anp/dseed1/clean-data/metrics.json"))
    with open(os.path.join(config.output_dir, "blend/seed0/rnp/dseed0/masks/metrics.json"), "w") as f:
        f.write("{")
    assert reproduce.main(reproduce.parse_args(["--config", path])) == 0
    out = capsys.readouterr().out
    assert "28 cells: 24 already done, 4 to run" in out  # the real runs record what the grid plans: not stale
    assert "cell blend/seed0/rnp/dseed0/masks:" in out and "is corrupt" in out
    assert "cell blend/seed0/rnp/dseed0/clean-data: its input blend/seed0/rnp/dseed0/masks reruns" in out
    assert "cell blend/seed0/rnp/dseed0/fixed: its input blend/seed0/rnp/dseed0/masks reruns" in out
    assert "done blend/seed0/rnp/dseed0/clean-data" in out and "done badnets/seed1/anp/dseed1/clean-data" in out
    assert "summary: 28 cells, 24 already done, 4 ran, 0 failed, 0 blocked" in out


@pytest.mark.slow
def test_grid_end_to_end_through_submitit_local(tiny_cifar, tmp_path, capsys):
    pytest.importorskip("submitit")
    path = write_config(tmp_path / "g.yaml", data_dir=tiny_cifar, rules=["fixed"], attacks={"badnets": {}},
                        slurm={"cluster": "local", "time_min": 20})
    config = load_config(path)
    assert reproduce.main(reproduce.parse_args(["--config", path, "--executor", "slurm"])) == 0
    out = capsys.readouterr().out
    # per model (one attack, two seeds): the model, ANP's and RNP's masks and their one rule
    assert "on submitit (local)" in out and "summary: 10 cells, 0 already done, 10 ran, 0 failed" in out
    assert os.path.isdir(os.path.join(config.output_dir, "submitit"))
    m = _cell_metrics(config.output_dir, "badnets/seed0/rnp/dseed0/fixed")
    assert "defenses rnp " in m["command"] and m["operating_point"]["rule"] == "fixed"
    assert m["args"]["mask_file"] == os.path.join(config.output_dir, "badnets/seed0/rnp/dseed0/masks/mask_values.txt")
    table = open(os.path.join(config.output_dir, "table.md")).read()
    assert "| anp | fixed 0.2 | 2 |" in table and "| rnp | fixed 0.2 | 2 |" in table
    # two lost cells, rerun through a pool of two local processes
    for cell in ("badnets/seed1/anp/dseed1/fixed", "badnets/seed0/anp/dseed0/fixed"):
        os.remove(os.path.join(config.output_dir, cell, "metrics.json"))
    assert reproduce.main(reproduce.parse_args(["--config", path, "--jobs", "2"])) == 0
    out = capsys.readouterr().out
    assert "10 cells: 8 already done, 2 to run on 2 local processes" in out and "[2/2] done" in out


def test_soda_joins_a_grid_as_one_cell_per_model(tmp_path):
    path = write_config(tmp_path / "g.yaml", attacks={"semantic": {}}, seeds=[0],
                        defenses={"soda": {"confidence": 2.5, "split": None}})
    with pytest.raises(UserError, match="defenses.soda.split: expected str, got None"):
        load_config(path)
    path = write_config(tmp_path / "g.yaml", attacks={"semantic": {}}, seeds=[0], defenses={"soda": {"option": "all"}})
    with pytest.raises(UserError, match="defenses.soda.option: .*planned by the grid"):  # the grid runs all its steps
        load_config(path)
    config = load_config(write_config(tmp_path / "g.yaml", attacks={"semantic": {}}, seeds=[0],
                                      defenses={"soda": {"confidence": 2.5, "ratio": 0.02}}))
    model, soda = plan(config)
    assert soda.id == "semantic/seed0/soda/dseed0/soda" and soda.deps == [model.id] and soda.rule is None
    assert soda.kind == "soda" and soda.stage == "defense" and soda.wave == 1
    assert soda.config["confidence"] == 2.5 and soda.config["defense_frac"] == 0.02 and soda.config["option"] == "all"
    assert soda.inputs["checkpoint"] == os.path.join(model.directory, "last_model.th")
    assert soda.inputs["mask_file"] is None and soda.inputs["output_dir"] == soda.directory
    assert soda.inputs["steps"] is None  # all its steps
    assert "--confidence 2.5" in soda.command() and "--option" not in soda.command()
    assert "--steps" not in soda.command() and "--mask-file" not in soda.command()
    assert_command_is_the_cell(soda)
    # the operating rules do not apply to a defense that does not prune: one cell, whatever the rules
    assert len(plan(load_config(write_config(tmp_path / "g.yaml", attacks={"semantic": {}}, seeds=[0],
                                             defenses={"soda": {}}, rules=["fixed"])))) == 2


@pytest.mark.slow
def test_interrupting_a_pool_grid_stops_its_workers_and_a_rerun_finishes_the_rest(tiny_cifar, tmp_path):
    import signal
    import time

    path = write_config(tmp_path / "g.yaml", data_dir=tiny_cifar, attacks={"badnets": {}}, rules=["fixed"],
                        defenses={"anp": {"nb_iter": 150, "print_every": 150, "batch_size": 32, "val_frac": 0.05}})
    config = load_config(path)
    command = [sys.executable, os.path.join(ROOT, "reproduce.py"), "--config", path, "--jobs", "2"]
    grid = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            start_new_session=True)
    lines = []
    for line in grid.stdout:  # interrupt once the masks are being computed (the models are done)
        lines.append(line)
        if line.startswith("[2/6] done"):
            started = os.path.join(config.output_dir, "badnets/seed0/anp/dseed0/masks/output.log")
            for _ in range(300):
                if os.path.exists(started):
                    break
                time.sleep(0.1)
            time.sleep(1)
            grid.send_signal(signal.SIGINT)
            break
    output = "".join(lines) + grid.stdout.read()
    assert grid.wait(timeout=60) == 130, output
    assert "interrupted: the running cells were stopped" in output
    for _ in range(50):  # the workers and multiprocessing's helper go with the grid
        left = subprocess.run(["pgrep", "-s", str(grid.pid)], capture_output=True, text=True).stdout.split()
        if not left:
            break
        time.sleep(0.2)
    assert left == [], f"processes left behind: {left}"
    masks = os.path.join(config.output_dir, "badnets/seed0/anp/dseed0/masks")
    assert os.path.exists(os.path.join(masks, "output.log"))  # it had started
    assert not os.path.exists(os.path.join(masks, "metrics.json"))  # stopped before it finished: not done
    assert not os.path.exists(os.path.join(config.output_dir, "badnets/seed0/anp/dseed0/fixed"))  # never started

    rerun = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    # the two models done; the two masks cells and their rules' cells to run
    assert "6 cells: 2 already done, 4 to run" in rerun.stdout and "0 failed, 0 blocked" in rerun.stdout


def test_the_epoch_override_shortens_every_attack_for_a_cpu_check(tmp_path):
    """configs/soda_released.yaml at 100 epochs, checked on the CPU with --width 16 --epoch 4 --schedule 2."""
    config = load_config(os.path.join(ROOT, "configs", "soda_released.yaml"),
                         {"width": 16, "output_dir": str(tmp_path)}, train_overrides={"epoch": 4, "schedule": [2]})
    cells = plan(config)
    models = [c for c in cells if c.kind == "train"]
    assert {c.attack for c in models} == {"stripet", "benign"} and len(models) == 6
    for cell in models:
        assert cell.config["epoch"] == 4 and cell.config["schedule"] == [2]
        assert cell.settings["width"] == 16 and cell.config["batch_size"] == 64 and cell.config["save_every"] == 100
        assert "--epoch 4 " in cell.command() and "--schedule 2 " in cell.command()
    assert all(c.settings["width"] == 16 for c in cells)
    benign = next(c for c in models if c.attack == "benign")
    assert benign.config["augment"] == "none" and benign.config["held_out_frac"] == 0
    # an attack that sets its own epochs is overridden too (attacks_cpu trains clean-label for 8)
    config = load_config(os.path.join(ROOT, "configs", "attacks_cpu.yaml"), {"output_dir": str(tmp_path)},
                         train_overrides={"epoch": 2, "schedule": [1]})
    models = [c for c in plan(config) if c.kind == "train"]
    assert {(c.config["epoch"], tuple(c.config["schedule"])) for c in models} == {(2, (1,))}
    with pytest.raises(UserError, match="--epoch: expected a positive"):
        load_config(os.path.join(ROOT, "configs", "soda_released.yaml"), train_overrides={"epoch": 0})
    args = reproduce.parse_args(["--config", os.path.join(ROOT, "configs", "soda_released.yaml"), "--epoch", "3",
                                 "--output-dir", str(tmp_path / "short"), "--dry-run"])
    assert reproduce.main(args) == 0


def test_report_of_a_soda_grid_with_benign_models(tmp_path):
    """A benign model has no ASR (None): the report is written, its removed column is "–" (it crashed before),
    and the semantic models' SODA row counts what it removed."""
    config = load_config(os.path.join(ROOT, "configs", "soda_released.yaml"),
                         {"output_dir": str(tmp_path), "seeds": [0, 1]})
    cells = plan(config)
    for cell in cells:
        benign = cell.attack == "benign"
        if cell.stage == "train":
            _write(cell.metrics_path, {"clean_acc": 0.9, "asr": None if benign else 0.9, "ra": None if benign else 0.1,
                                       "timings": {"total_seconds": 100}})
        else:
            before = {"clean_acc": 0.9, "asr": None if benign else 0.9, "ra": None if benign else 0.1}
            after = {**before, "asr": None if benign else [0.0, 0.9][cell.seed]}
            _write(cell.metrics_path, {"before": before, "after": after, "timings": {"detect_seconds": 2}})
    text = write_report(config, cells)
    soda_rows = [line for line in text.splitlines() if line.startswith("| soda |")]
    assert len(soda_rows) == 2
    stripet, benign = soda_rows  # config order
    assert "| 1/2 |" in stripet and "| – |" in benign

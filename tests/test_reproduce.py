"""reproduce.py: config parsing and cell expansion, resume, aggregation, the oracle kept apart, bad input,
and end-to-end grids on tiny generated data through the local executor and submitit's local executor."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import yaml

import reproduce
from experiments.cells import parse_cell, status
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
              "rules": {"fixed": {"save_threshold": 0.2}, "clean-data": {"rule": "defense-acc", "max_acc_drop": 0.05}}}
    config.update(overrides)
    config = {k: v for k, v in config.items() if v is not None}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


class FakeExecutor:
    """Writes each cell's metrics.json (with the arguments a real run records) instead of running it."""

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
            from experiments.cells import Cell
            args = vars(parse_cell(Cell(**cell)))
            with open(os.path.join(cell["directory"], "metrics.json"), "w") as f:
                json.dump({"args": args}, f, default=str)
            on_done({"id": cell["id"], "ok": True, "seconds": 1.0, "error": None})


class Log(list):
    def __call__(self, line=""):
        self.append(line)


# ------------------------------------------------------------------------------------------ config, cells

def test_cells_of_a_grid(tmp_path):
    config = load_config(write_config(tmp_path / "g.yaml"))
    cells = plan(config)
    # per model: ANP masks + one prune per rule, RNP one run per rule (the first computes the masks)
    assert len(cells) == 4 * (1 + 1 + 2 + 2)
    by_id = {c.id: c for c in cells}
    model = by_id["badnets/seed1/model"]
    assert model.argv[model.argv.index("--seed") + 1] == "1" and "--poison-type" in model.argv
    assert model.argv[model.argv.index("--poison-rate") + 1] == "0.1"
    masks = by_id["badnets/seed1/anp/dseed1/masks"]
    assert masks.deps == [model.id] and masks.argv[masks.argv.index("--nb-iter") + 1] == "5"
    assert "--pruning-step" not in masks.argv  # a prune flag goes to the prune stage only
    prune = by_id["badnets/seed1/anp/dseed1/clean-data"]
    assert prune.deps == [masks.id]
    assert prune.argv[prune.argv.index("--mask-file") + 1] == os.path.join(masks.directory, "mask_values.txt")
    assert prune.argv[prune.argv.index("--operating-point") + 1] == "defense-acc"
    assert "--val-frac" in masks.argv and "--val-frac" in prune.argv  # a shared flag goes to both
    first, second = by_id["blend/seed0/rnp/dseed0/fixed"], by_id["blend/seed0/rnp/dseed0/clean-data"]
    assert first.deps == ["blend/seed0/model"] and "--mask_file" not in first.argv
    assert second.deps == [first.id]
    assert second.argv[second.argv.index("--mask_file") + 1] == os.path.join(first.directory, "mask_values.txt")
    assert [c.wave for c in (model, masks, prune, first, second)] == [0, 1, 2, 1, 2]
    assert all(c.directory == os.path.join(config.output_dir, c.id) for c in cells)


def test_defense_seeds_and_labels(tmp_path):
    config = load_config(write_config(tmp_path / "g.yaml", defense_seeds=[3, 4], seeds=[0],
                                      attacks={"patch-all2all": {"poison_type": "badnets", "target_type": "all2all"}},
                                      defenses={"anp-long": {"defense": "anp", "nb_iter": 7}}, rules=["fixed"]))
    ids = [c.id for c in plan(config)]
    assert ids == ["patch-all2all/seed0/model", "patch-all2all/seed0/anp-long/dseed3/masks",
                   "patch-all2all/seed0/anp-long/dseed3/fixed", "patch-all2all/seed0/anp-long/dseed4/masks",
                   "patch-all2all/seed0/anp-long/dseed4/fixed"]
    model = plan(config)[0]
    assert model.argv[model.argv.index("--poison-type") + 1] == "badnets"
    assert model.argv[model.argv.index("--target-type") + 1] == "all2all"


def test_a_grid_runs_rnps_per_epoch_default_and_its_per_batch_variant_side_by_side(tmp_path):
    config = load_config(write_config(tmp_path / "g.yaml", seeds=[0], attacks={"badnets": {}}, rules=["fixed"],
                                      defenses={"rnp": {"eval_every": 0},
                                                "rnp-batch": {"defense": "rnp", "stop_check": "batch"}}))
    by_id = {c.id: c for c in plan(config)}
    default, variant = by_id["badnets/seed0/rnp/dseed0/fixed"], by_id["badnets/seed0/rnp-batch/dseed0/fixed"]
    assert "--stop_check" not in default.argv and parse_cell(default).stop_check == "epoch"
    assert parse_cell(variant).stop_check == "batch" and variant.directory != default.directory


def test_overrides_and_shipped_configs(tmp_path):
    for name in ("fmnist_cpu", "fmnist_gpu", "anp_paper", "rnp_paper", "quickstart", "attacks_cpu", "soda_released"):
        config = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"),
                             {"dataset": "fashion-mnist", "seeds": [7], "output_dir": str(tmp_path)})
        cells = plan(config)
        assert cells and all("--seed" in c.argv for c in cells)
        assert all(c.argv[c.argv.index("--dataset") + 1] == "fashion-mnist" for c in cells)
        assert {c.seed for c in cells} == {7}
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
    ({"defenses": {"anp": {"nb_iters": 5}}}, "defenses.anp.nb_iters: not a flag of optimize_mask_cifar.py or "
                                             "prune_neuron_cifar.py"),
    ({"defenses": {"anp": {"seed": 5}}}, "defenses.anp.seed: set by the grid"),
    ({"train": {"epochs": 5}}, "train.epochs: not a flag of train_backdoor_cifar.py"),
    ({"attacks": {"blend": {"trigger_alpha": "strong"}}}, "blend/seed0/model: train_backdoor_cifar.py refuses"),
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
    assert str(err.value).startswith(path) or needle.startswith("blend/")


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
    ids = [c.id for c in select(cells, ["blend", "seed1", "clean-data"])]
    assert ids == ["blend/seed1/model", "blend/seed1/anp/dseed1/masks", "blend/seed1/anp/dseed1/clean-data",
                   "blend/seed1/rnp/dseed1/fixed", "blend/seed1/rnp/dseed1/clean-data"]
    assert len(select(cells, ["badnets,blend", "anp"])) == 4 * 4 - 0  # models + masks + two prunes, per model
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

    masks = next(c for c in cells if c.id == "badnets/seed0/anp/dseed0/masks")
    with open(masks.metrics_path, "w") as f:
        f.write('{"args": {"nb_iter"')  # a truncated file
    model = next(c for c in cells if c.id == "blend/seed1/model")
    os.remove(model.metrics_path)  # interrupted before this cell finished
    log, again = Log(), FakeExecutor()
    run_grid(cells, again, log)
    assert again.ran == ["blend/seed1/model", "badnets/seed0/anp/dseed0/masks", "blend/seed1/anp/dseed1/masks",
                         "blend/seed1/rnp/dseed1/fixed", "badnets/seed0/anp/dseed0/fixed",
                         "badnets/seed0/anp/dseed0/clean-data", "blend/seed1/anp/dseed1/fixed",
                         "blend/seed1/anp/dseed1/clean-data", "blend/seed1/rnp/dseed1/clean-data"]
    assert any("badnets/seed0/anp/dseed0/masks" in line and "corrupt" in line and "rerunning" in line for line in log)

    changed = plan(load_config(write_config(tmp_path / "g.yaml", defenses={"anp": {"nb_iter": 6, "print_every": 5,
                                                                            "batch_size": 32, "val_frac": 0.05,
                                                                            "pruning_step": 0.3}})))
    states = plan_states(changed)
    assert states["badnets/seed0/anp/dseed0/masks"][0] == "stale"
    assert "--nb-iter 5" in states["badnets/seed0/anp/dseed0/masks"][1]
    assert states["badnets/seed0/anp/dseed0/fixed"][0] == "rerun"
    assert states["badnets/seed0/model"][0] == "done"


def test_a_failing_cell_blocks_only_what_needs_it(tmp_path):
    cells = plan(load_config(write_config(tmp_path / "g.yaml")))
    executor = FakeExecutor(fail={"badnets/seed0/model", "blend/seed0/anp/dseed0/masks"})
    log = Log()
    summary = run_grid(cells, executor, log)
    assert summary["failed"] == 2 and summary["blocked"] == 5 + 2  # badnets seed 0's five defense cells; two prunes
    assert summary["ok"] == len(cells) - 9
    done = {c.id for c in cells if status(c, parse_cell(c))[0] == "done"}
    assert "badnets/seed1/anp/dseed1/fixed" in done and "blend/seed0/rnp/dseed0/clean-data" in done
    assert any(line.startswith("  failed badnets/seed0/model: boom") for line in log)


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
    for cell in cells:
        if cell.stage == "masks":
            _write(cell.metrics_path, {"timings": {"optimize_seconds": 50}})
        elif cell.stage == "prune":
            before = {"clean_acc": 0.9, "asr": 1.0, "ra": 0.0, "defense_acc": 0.9}
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
    rows = list(csv.DictReader(open(os.path.join(config.output_dir, "results.csv"))))
    assert len(rows) == len(cells) + 3  # one row per cell plus one oracle row per ANP run
    assert {r["stage"] for r in rows} == {"train", "masks", "prune", "oracle"}
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
    assert pick(a, "prune") == pick(b, "prune")  # the operating points are what the cells chose
    assert pick(a, "oracle") != pick(b, "oracle")
    assert all(r["cell"].endswith("/oracle") for r in a if r["stage"] == "oracle")
    text = write_report(config, cells)
    assert "Oracle rows (threshold chosen on the poisoned test set" in text
    main_table = text.split("Oracle rows")[0]
    assert "oracle" not in main_table.split("## badnets")[1]


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
    assert "[24/24] done" in out and "summary: 24 cells, 0 already done, 24 ran, 0 failed, 0 blocked" in out
    for name in ("results.csv", "table.md", "grid.log", "plots/badnets.png", "plots/pruning_blend_rnp.png"):
        assert os.path.isfile(os.path.join(config.output_dir, name)), name
    rows = list(csv.DictReader(open(os.path.join(config.output_dir, "results.csv"))))
    assert sum(r["stage"] != "oracle" for r in rows) == 24 and all(r["status"] == "done" for r in rows)
    m = _cell_metrics(config.output_dir, "blend/seed1/anp/dseed1/clean-data")
    assert m["command"].startswith("prune_neuron_cifar.py ") and "--operating-point defense-acc" in m["command"]
    assert m["code_version"] and {"torch", "torchvision", "numpy"} <= set(m["versions"])
    assert m["device"] == "cpu" and "prune_seconds" in m["timings"] and m["operating_point"]["rule"] == "defense-acc"
    rnp = _cell_metrics(config.output_dir, "blend/seed1/rnp/dseed1/clean-data")
    first = _cell_metrics(config.output_dir, "blend/seed1/rnp/dseed1/fixed")
    assert [r["value"] for r in rnp["rows"]] == [r["value"] for r in first["rows"]]  # the same masks, pruned again

    # An interrupted grid: a cell lost, one corrupt; the rerun runs those and what depends on them, nothing else.
    os.remove(os.path.join(config.output_dir, "badnets/seed1/anp/dseed1/fixed/metrics.json"))
    with open(os.path.join(config.output_dir, "blend/seed0/rnp/dseed0/fixed/metrics.json"), "w") as f:
        f.write("{")
    assert reproduce.main(reproduce.parse_args(["--config", path])) == 0
    out = capsys.readouterr().out
    assert "24 cells: 21 already done, 3 to run" in out
    assert "cell blend/seed0/rnp/dseed0/fixed:" in out and "is corrupt" in out
    assert "done blend/seed0/rnp/dseed0/clean-data" in out and "done badnets/seed1/anp/dseed1/fixed" in out


@pytest.mark.slow
def test_grid_end_to_end_through_submitit_local(tiny_cifar, tmp_path, capsys):
    pytest.importorskip("submitit")
    path = write_config(tmp_path / "g.yaml", data_dir=tiny_cifar, rules=["fixed"],
                        slurm={"cluster": "local", "time_min": 20})
    config = load_config(path)
    assert reproduce.main(reproduce.parse_args(["--config", path, "--executor", "slurm"])) == 0
    out = capsys.readouterr().out
    assert "on submitit (local)" in out and "summary: 16 cells, 0 already done, 16 ran, 0 failed" in out
    assert os.path.isdir(os.path.join(config.output_dir, "submitit"))
    m = _cell_metrics(config.output_dir, "badnets/seed0/rnp/dseed0/fixed")
    assert m["command"].startswith("rnp_main.py ") and m["operating_point"]["rule"] == "fixed"
    table = open(os.path.join(config.output_dir, "table.md")).read()
    assert "| anp | fixed 0.2 | 2 |" in table and "| rnp | fixed 0.2 | 2 |" in table
    # two lost cells, rerun through a pool of two local processes
    for cell in ("badnets/seed1/anp/dseed1/fixed", "badnets/seed0/anp/dseed0/fixed"):
        os.remove(os.path.join(config.output_dir, cell, "metrics.json"))
    assert reproduce.main(reproduce.parse_args(["--config", path, "--jobs", "2"])) == 0
    out = capsys.readouterr().out
    assert "16 cells: 14 already done, 2 to run on 2 local processes" in out and "[2/2] done" in out


def test_soda_joins_a_grid_as_one_cell_per_model(tmp_path):
    config = load_config(write_config(tmp_path / "g.yaml", attacks={"semantic": {}}, seeds=[0],
                                      defenses={"soda": {"confidence": 2.5, "option": None}}))
    with pytest.raises(UserError, match="defenses.soda.option: set by the grid"):
        plan(config)
    config = load_config(write_config(tmp_path / "g.yaml", attacks={"semantic": {}}, seeds=[0],
                                      defenses={"soda": {"confidence": 2.5}}))
    model, soda = plan(config)
    assert soda.id == "semantic/seed0/soda/dseed0/soda" and soda.deps == [model.id] and soda.rule is None
    assert soda.argv[soda.argv.index("--confidence") + 1] == "2.5"
    assert soda.argv[soda.argv.index("--checkpoint") + 1] == os.path.join(model.directory, "last_model.th")


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
    masks = os.path.join(config.output_dir, "badnets/seed0/anp/dseed0/masks/metrics.json")
    assert not os.path.exists(masks)  # stopped before it finished: nothing half-written counts as done

    rerun = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "6 cells: 2 already done, 4 to run" in rerun.stdout and "0 failed, 0 blocked" in rerun.stdout


def test_the_epoch_override_shortens_every_attack_for_a_cpu_check(tmp_path):
    """configs/soda_released.yaml at 100 epochs, checked on the CPU with --width 16 --epoch 4 --schedule 2."""
    config = load_config(os.path.join(ROOT, "configs", "soda_released.yaml"),
                         {"width": 16, "output_dir": str(tmp_path)}, train_overrides={"epoch": 4, "schedule": [2]})
    models = [c for c in plan(config) if c.script == "train_backdoor_cifar"]
    assert {c.attack for c in models} == {"stripet", "benign"} and len(models) == 6
    for cell in models:
        argv = cell.argv
        assert argv[argv.index("--epoch") + 1] == "4" and argv[argv.index("--schedule") + 1] == "2"
        assert argv[argv.index("--width") + 1] == "16" and argv[argv.index("--batch-size") + 1] == "64"
    with pytest.raises(UserError, match="--epoch: expected a positive"):
        load_config(os.path.join(ROOT, "configs", "soda_released.yaml"), train_overrides={"epoch": 0})


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

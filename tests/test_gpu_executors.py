"""Several grid cells per GPU, without a GPU: a fake device list (CUDA_VISIBLE_DEVICES and the memory
torch would report), the workers' device assignment seen from inside real worker processes, the default
from the GPU's memory, Slurm's cells per job through a stand-in for submitit, and bad input in one line."""
from __future__ import annotations

import json
import os
import sys
import types

import pytest
import yaml

import reproduce
from experiments import executors
from experiments.config import load_config
from experiments.executors import (LocalGPUExecutor, SlurmExecutor, default_cells_per_gpu, groups, make_executor,
                                   run_cell_group)
from utils.errors import UserError

GIB = 1 << 30

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def fake_stage(tmp_path, monkeypatch):
    """Cells of a fake defense (tests/fake_defense.py, registered through BACKDOOR_DEFENSES) that the spawned
    workers can import: each writes which GPU, process and thread count its worker was given."""
    from dataclasses import asdict

    from defenses import registry
    from experiments.cells import Cell
    from utils.cli import RunSettings

    # registered into a copy of the registry, loaded before BACKDOOR_DEFENSES names the fake: no other test sees it
    registry.list_defenses()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setenv("BACKDOOR_DEFENSES", "fake_defense")
    monkeypatch.syspath_prepend(TESTS)
    # the workers get this process's sys.path through spawn; PYTHONPATH too, for any that start afresh
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p))
    monkeypatch.delitem(sys.modules, "fake_defense", raising=False)
    assert registry.get_defense("fake").name == "fake"

    def cells(n):
        out = []
        for i in range(n):
            directory = str(tmp_path / f"cell{i}")
            cell = Cell(f"cell{i}", directory, "defense", "badnets", 0, kind="fake",
                        settings=asdict(RunSettings(device="cpu", progress=False)), config={"sleep": 0.3},
                        inputs={"checkpoint": "unused.th", "trigger_info": "", "output_dir": directory,
                                "mask_file": None, "steps": None},
                        defense="fake", defense_seed=0, deps=["badnets/seed0/model"], wave=1)
            out.append(cell.to_dict())
        return out
    return cells


def test_default_cells_per_gpu_from_memory_cores_and_cap():
    assert default_cells_per_gpu(141 * GIB, cpus_per_gpu=16) == executors.MAX_CELLS_PER_GPU  # an H200: the cap
    assert default_cells_per_gpu(141 * GIB, cpus_per_gpu=3) == 3  # one core per cell
    assert default_cells_per_gpu(16 * GIB, cpus_per_gpu=16) == 4  # 4 GiB a cell
    assert default_cells_per_gpu(3 * GIB, cpus_per_gpu=16) == 1  # always at least one


def test_local_gpus_default_comes_from_the_smallest_visible_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    monkeypatch.setattr(executors.os, "cpu_count", lambda: 32)
    memory = {0: 80 * GIB, 1: 24 * GIB}  # indices as torch numbers the visible devices
    monkeypatch.setattr(executors, "gpu_memory_bytes", lambda i: memory[i])
    ex = LocalGPUExecutor()
    assert ex.gpus == ["2", "5"] and ex.cells_per_gpu == 6 and ex.parallel == 12
    assert ex.slots() == ["2", "5"] * 6  # the GPUs in turn
    assert ex.threads == 16 // 6
    assert "12 workers" in ex.describe() and "24 GiB" in ex.describe()
    given = LocalGPUExecutor(3)
    assert given.cells_per_gpu == 3 and given.parallel == 6 and "--cells-per-gpu" in given.describe()


def test_cells_share_a_gpu_through_cuda_visible_devices(fake_stage, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setattr(executors.os, "cpu_count", lambda: 4)
    ex = LocalGPUExecutor(cells_per_gpu=2)
    cells = fake_stage(4)
    results = []
    ex.run(cells, results.append)
    assert sorted(r["id"] for r in results) == [c["id"] for c in cells] and all(r["ok"] for r in results), results
    seen = [json.load(open(os.path.join(c["directory"], "metrics.json"))) for c in cells]
    assert {s["visible"] for s in seen} == {"3"}  # every worker holds the one GPU
    assert len({s["pid"] for s in seen}) <= 2  # at most cells_per_gpu workers
    assert {s["threads"] for s in seen} == {"2"}  # the 4 cores shared out between the 2 workers


def test_reproduce_cells_per_gpu_flag_config_key_and_bad_input(tmp_path, monkeypatch):
    from test_reproduce import write_config

    path = write_config(tmp_path / "g.yaml")
    for argv, needle in ((["--cells-per-gpu", "0"], "--cells-per-gpu: expected a positive number"),
                         (["--cells-per-gpu", "2"], "--cells-per-gpu: only with --executor local-gpus or slurm"),
                         (["--executor", "local-gpus", "--jobs", "2"], "--jobs: only with --executor local")):
        with pytest.raises(UserError, match=needle) as err:
            reproduce.main(reproduce.parse_args(["--config", path, *argv]))
        assert "\n" not in str(err.value)
    config = load_config(write_config(tmp_path / "c.yaml", executor="local-gpus", cells_per_gpu=3))
    assert config.executor == "local-gpus" and config.cells_per_gpu == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert make_executor("local-gpus", config).cells_per_gpu == 3
    assert make_executor("local-gpus", config, cells_per_gpu=5).cells_per_gpu == 5  # the flag wins
    for change, needle in (({"executor": "cloud"}, "executor: expected one of local, local-gpus, slurm"),
                           ({"cells_per_gpu": 0}, "cells_per_gpu: expected a positive integer")):
        with pytest.raises(UserError, match=needle):
            load_config(write_config(tmp_path / "bad.yaml", **change))
    # The config's executor is reproduce.py's default: local-gpus with no GPU visible says so in one line.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(UserError, match="--executor local-gpus: no GPU is visible"):
        reproduce.main(reproduce.parse_args(["--config", str(tmp_path / "c.yaml")]))


def test_shipped_gpu_config_is_local_gpus_with_42_cells(tmp_path):
    from conftest import ROOT
    from experiments.plans import plan

    config = load_config(os.path.join(ROOT, "configs", "fmnist_gpu.yaml"), {"output_dir": str(tmp_path)})
    assert config.executor == "local-gpus" and config.common["width"] == 64 and config.seeds == [0, 1, 2]
    cells = plan(config)
    # per model: the model; ANP's and RNP's masks cells, and a pruning cell per rule for each
    assert len(cells) == 6 * (1 + (1 + 2) * 2) == 42
    assert [c.stage for c in cells[:7]] == ["train", "masks", "prune", "prune", "masks", "prune", "prune"]
    model = cells[0]
    assert model.kind == "train" and model.config["epoch"] == 8 and model.config["schedule"] == [4, 6]
    assert model.settings["width"] == 64 and "--epoch 8 " in model.command() and "--schedule 4 6 " in model.command()
    rnp = next(c for c in cells if c.kind == "rnp")
    assert rnp.stage == "masks" and rnp.inputs["steps"] == ["unlearn", "recover"]
    assert rnp.config["eval_every"] == 0 and rnp.settings["width"] == 64


class FakeJob:
    def __init__(self, job_id, fn, item):
        self.job_id, self.fn, self.item = job_id, fn, item

    def result(self):
        return self.fn(self.item)

    def done(self):
        return True


def fake_submitit(calls: list):
    class AutoExecutor:
        def __init__(self, folder, cluster):
            self.parameters = {}

        def update_parameters(self, **kw):
            self.parameters.update(kw)
            calls.append(("parameters", kw))

        def map_array(self, fn, items):
            calls.append(("map_array", [len(i) if isinstance(i, list) else 1 for i in items]))
            return [FakeJob(str(n), fn, item) for n, item in enumerate(items)]

    helpers = types.SimpleNamespace(as_completed=lambda jobs: iter(jobs))
    return types.SimpleNamespace(AutoExecutor=AutoExecutor, helpers=helpers)


def test_slurm_groups_cells_per_job_sharing_its_gpu(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "submitit", fake_submitit(calls))
    ran = []
    monkeypatch.setattr(executors, "run_cell_group",
                        lambda cells, threads=None: [ran.append((c["id"], threads)) or
                                                     {"id": c["id"], "ok": True, "seconds": 0.0, "error": None}
                                                     for c in cells])
    options = {**load_config(_config(tmp_path)).slurm, "cpus_per_task": 8}
    ex = SlurmExecutor(str(tmp_path / "submitit"), options, "tiny", cells_per_gpu=3)
    assert ex.cells_per_job == 3 and ex.threads == 2 and ex.parallel == 32 * 3
    cells = [{"id": f"c{i}"} for i in range(7)]
    done = []
    ex.run(cells, done.append)
    assert ("map_array", [3, 3, 1]) in calls
    assert [r["id"] for r in done] == [f"c{i}" for i in range(7)] and all(t == 2 for _, t in ran)
    one = SlurmExecutor(str(tmp_path / "submitit"), options, "tiny")
    assert one.cells_per_job == 1 and one.threads == 8
    with pytest.raises(UserError, match="--cells-per-gpu: .*gpus_per_task is 0"):
        SlurmExecutor(str(tmp_path / "submitit"), {**options, "gpus_per_task": 0}, "tiny", cells_per_gpu=2)
    assert groups(list(range(5)), 2) == [[0, 1], [2, 3], [4]]


def test_a_job_that_dies_fails_every_cell_of_its_group(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "submitit", fake_submitit(calls))

    def boom(cells, threads=None):
        raise RuntimeError("job 1 hit its time limit")
    monkeypatch.setattr(executors, "run_cell_group", boom)
    ex = SlurmExecutor(str(tmp_path / "submitit"), load_config(_config(tmp_path)).slurm, "tiny", cells_per_gpu=2)
    done = []
    ex.run([{"id": "a"}, {"id": "b"}, {"id": "c"}], done.append)
    assert [r["id"] for r in done] == ["a", "b", "c"] and not any(r["ok"] for r in done)
    assert "time limit" in done[0]["error"]


@pytest.mark.slow
def test_run_cell_group_runs_cells_side_by_side_in_processes(fake_stage):
    cells = fake_stage(2)
    results = run_cell_group(cells, threads=1)
    assert sorted(r["id"] for r in results) == ["cell0", "cell1"] and all(r["ok"] for r in results)
    assert run_cell_group(fake_stage(1), threads=1)[0]["ok"]  # one cell: in this process


def _config(tmp_path) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "output_dir": str(tmp_path / "grid"), "seeds": [0],
                                    "attacks": {"badnets": {}}, "defenses": {"anp": {}}}))
    return str(path)

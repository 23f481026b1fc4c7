"""A grid cell: one stage (stage 1's training, or one defense of the registry) in its own directory, with its
typed config and inputs as plain values (they travel to worker processes and Slurm jobs as they are).

A cell is done when its ``metrics.json`` exists and parses (every stage writes it last, atomically);
``status`` also compares the options recorded there with the planned ones, so a changed config never reuses a
run made with other settings. ``run_cell`` is the function every executor calls: it calls the same entry the
scripts call (``training.backdoor.train_backdoor``, the defense's ``run``).
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field

from data.attacks.base import option_flag
from defenses.registry import DefenseInputs, get_defense
from defenses.session import run_record
from training.backdoor import AttackChoice, TrainConfig, train_backdoor, train_record
from utils.cli import RunSettings
from utils.errors import UserError
from utils.options import to_argv

CELL_LOG = "cell.out"


@dataclass
class Cell:
    id: str  # also its folder under output_dir: attack/seedS/model, attack/seedS/defense/dseedD/{masks,RULE,soda}
    directory: str
    stage: str  # train, masks (a pruning defense's masks), prune (one operating rule), defense (any other defense)
    attack: str
    seed: int
    kind: str = "train"  # "train" or the defense's registry name
    settings: dict = field(default_factory=dict)  # utils.cli.RunSettings
    config: dict = field(default_factory=dict)  # TrainConfig or the defense's config
    inputs: dict = field(default_factory=dict)  # train: {"attack": AttackChoice}; defense: DefenseInputs but settings
    defense: str | None = None
    defense_seed: int | None = None
    rule: str | None = None
    deps: list[str] = field(default_factory=list)
    wave: int = 0

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.directory, "metrics.json")

    def command(self) -> str:
        return command_of(asdict(self))

    def to_dict(self) -> dict:
        return asdict(self)


def _objects(cell: dict):
    """``(settings, config, inputs)`` of a cell as the typed objects its stage takes."""
    settings = RunSettings(**cell["settings"])
    if cell["kind"] == "train":
        return settings, TrainConfig(**cell["config"]), AttackChoice(**cell["inputs"]["attack"])
    config = get_defense(cell["kind"]).config(**cell["config"])
    inputs = {**cell["inputs"], "steps": tuple(cell["inputs"]["steps"]) if cell["inputs"].get("steps") else None}
    return settings, config, DefenseInputs(settings=settings, **inputs)


def planned_record(cell: Cell | dict) -> dict:
    """The options the cell's metrics.json records when it runs (what ``status`` compares)."""
    cell = asdict(cell) if isinstance(cell, Cell) else cell
    settings, config, inputs = _objects(cell)
    if cell["kind"] == "train":
        return train_record(settings, config, inputs, cell["directory"])
    return run_record(inputs, config)


def command_of(cell: dict) -> str:
    """The shell command that runs the same stage (what the grid's log and metrics.json show)."""
    settings, config, inputs = _objects(cell)
    argv = to_argv(settings)
    if cell["kind"] == "train":
        argv = ["python3", "train_backdoor_cifar.py"] + argv + ["--poison-type", inputs.poison_type]
        argv += ["--poison-target", str(inputs.poison_target)] if inputs.poison_target != 0 else []
        argv += ["--target-type", inputs.target_type] if inputs.target_type != "all2one" else []
        for key, value in inputs.options.items():
            argv += [option_flag(key)] + ([str(v) for v in value] if isinstance(value, list) else [str(value)])
        argv += to_argv(config) + ["--output-dir", cell["directory"]]
    else:
        argv = ["python3", "-m", "defenses", cell["kind"]] + argv + ["--checkpoint", inputs.checkpoint]
        argv += ["--trigger-info", inputs.trigger_info] if inputs.trigger_info else []
        argv += ["--mask-file", inputs.mask_file] if inputs.mask_file else []
        argv += ["--steps", *inputs.steps] if inputs.steps else []
        argv += to_argv(config) + ["--output-dir", inputs.output_dir]
    return " ".join(shlex.quote(a) for a in argv)


def _comparable(values: dict) -> dict:
    return json.loads(json.dumps(values, default=str))


def status(cell: Cell) -> tuple[str, str]:
    """``(state, why)``: ``todo`` (no metrics.json), ``corrupt`` (it does not parse), ``stale`` (run with
    other options), ``done``."""
    if not os.path.isfile(cell.metrics_path):
        return "todo", ""
    try:
        with open(cell.metrics_path) as f:
            metrics = json.load(f)
        if not isinstance(metrics, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return "corrupt", f"{cell.metrics_path} is corrupt ({str(err).splitlines()[0][:80]})"
    recorded = metrics.get("args")
    if isinstance(recorded, dict):
        planned = _comparable(planned_record(cell))
        changed = sorted(k for k in planned.keys() & recorded.keys() if k != "progress" and planned[k] != recorded[k])
        if changed:
            k = changed[0]
            return "stale", f"it ran with {k} {recorded[k]!r}, the config now says {planned[k]!r}"
    return "done", ""


def read_metrics(cell: Cell) -> dict | None:
    return _read_json_object(cell.metrics_path)


def _read_json_object(path: str) -> dict | None:
    try:
        with open(path) as f:
            metrics = json.load(f)
        return metrics if isinstance(metrics, dict) else None
    except (OSError, UnicodeDecodeError, ValueError):
        return None


@contextlib.contextmanager
def _as_command_line(command: str):
    """``sys.argv`` as if the stage ran from the shell: its metrics.json records that command line."""
    saved = sys.argv
    words = shlex.split(command)[1:]  # without python3
    sys.argv = [f"python3 -m {words[1]}"] + words[2:] if words[0] == "-m" else words
    try:
        yield
    finally:
        sys.argv = saved


def run_stage(cell: dict) -> dict:
    """The cell's stage in this process: stage 1's ``train_backdoor`` or the defense's ``run``."""
    settings, config, inputs = _objects(cell)
    if cell["kind"] == "train":
        return train_backdoor(settings, config, inputs, cell["directory"])
    return get_defense(cell["kind"]).run(config, inputs)


def run_cell(cell: dict, threads: int | None = None) -> dict:
    """Run one cell in this process, its console output in ``cell.out`` beside its artifacts. Returns
    ``{"id", "ok", "seconds", "error"}``; never raises for a failing stage (one cell's failure must not lose the
    others). ``threads``: torch's intra-op threads (a batch job's CPUs, not the node's)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    start = time.perf_counter()
    os.makedirs(cell["directory"], exist_ok=True)
    error = None
    command = command_of(cell)
    with open(os.path.join(cell["directory"], CELL_LOG), "a") as out:
        out.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} {command}\n")
        out.flush()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), _as_command_line(command):
            try:
                run_stage(cell)
            except UserError as err:
                error = str(err)
            except KeyboardInterrupt:
                raise
            except Exception as err:  # noqa: BLE001 - reported, the grid goes on
                traceback.print_exc(file=out)
                error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if error:
            out.write(f"cell failed: {error}\n")
    if error is None and _read_json_object(os.path.join(cell["directory"], "metrics.json")) is None:
        error = "the stage finished without a readable metrics.json"
    return {"id": cell["id"], "ok": error is None, "seconds": time.perf_counter() - start, "error": error}

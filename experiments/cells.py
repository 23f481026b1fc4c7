"""A grid cell: one run of one stage script (``main(args)``) in its own directory.

A cell is done when its ``metrics.json`` exists and parses (the scripts write it last, atomically);
``status`` also compares the arguments recorded there with the planned ones, so a changed config never
reuses a run made with other settings. ``run_cell`` is the function every executor calls.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import io
import json
import os
import shlex
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field

from utils.errors import UserError

from .config import ConfigError

# Argument destinations the grid sets itself; a config that sets them is refused.
GRID_SET = {"seed", "dataset", "data_dir", "arch", "width", "device", "progress", "output_dir", "checkpoint",
            "trigger_info", "mask_file", "operating_point", "save_threshold", "max_acc_drop", "log_root",
            "output_weight", "backdoor_model_path", "unlearned_model_path", "in_model", "poison_type", "option"}
CELL_LOG = "cell.out"


@dataclass
class Cell:
    id: str  # also its directory under the grid's output_dir: attack/seedS/model, attack/seedS/defense/dseedD/rule
    directory: str
    script: str
    argv: list[str]
    stage: str  # train, masks, prune
    attack: str
    seed: int
    defense: str | None = None
    defense_seed: int | None = None
    rule: str | None = None
    deps: list[str] = field(default_factory=list)
    wave: int = 0

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.directory, "metrics.json")

    def command(self) -> str:
        return " ".join(["python3", f"{self.script}.py"] + [shlex.quote(a) for a in self.argv])

    def to_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=None)
def script_parser(script: str):
    """The stage script's parser, built once per process (planning and status parse every cell's argv)."""
    return importlib.import_module(script).build_parser()


def option_flags(options: dict, parsers: dict, where: str, config_path: str) -> dict[str, list[str]]:
    """Turn config options into each script's flags. A key goes to every script whose parser knows it
    (``nb_iter`` -> ``--nb-iter``); a key no script knows, or one the grid sets, is a config error."""
    argv = {script: [] for script in parsers}
    for key, value in options.items():
        matched = False
        for script, parser in parsers.items():
            action = None
            for flag in (f"--{str(key).replace('_', '-')}", f"--{key}"):
                action = parser._option_string_actions.get(flag)
                if action is not None:
                    break
            if action is None:
                continue
            if action.dest in GRID_SET:
                raise ConfigError(config_path, f"{where}.{key}", "set by the grid itself (seeds, rules, paths and "
                                  "the common dataset/arch/width/device keys), not per entry")
            matched = True
            if action.nargs == 0:  # store_true / store_false
                if not isinstance(value, bool):
                    raise ConfigError(config_path, f"{where}.{key}", f"expected true or false, got {value!r}")
                if value:
                    argv[script].append(flag)
            elif isinstance(value, list):
                argv[script] += [flag] + [str(v) for v in value]
            elif value is not None:
                argv[script] += [flag, str(value)]
        if not matched:
            names = " or ".join(f"{s}.py" for s in parsers)
            raise ConfigError(config_path, f"{where}.{key}", f"not a flag of {names}")
    return argv


def common_flags(common: dict) -> list[str]:
    argv = []
    for key in ("dataset", "data_dir", "arch", "width", "device"):
        if key in common:
            argv += [f"--{key.replace('_', '-')}", str(common[key])]
    return argv + ["--no-progress"]


def parse_cell(cell: Cell):
    """The cell's argparse namespace; argparse's complaint becomes one line naming the cell."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return script_parser(cell.script).parse_args(cell.argv)
    except SystemExit:
        message = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "bad arguments"
        raise UserError(f"cell {cell.id}: {cell.script}.py refuses its arguments: {message}") from None


def _comparable(namespace_or_dict) -> dict:
    values = vars(namespace_or_dict) if not isinstance(namespace_or_dict, dict) else namespace_or_dict
    return json.loads(json.dumps(values, default=str))


def status(cell: Cell, planned_args) -> tuple[str, str]:
    """``(state, why)``: ``todo`` (no metrics.json), ``corrupt`` (it does not parse), ``stale`` (run with
    other arguments), ``done``."""
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
        planned = _comparable(planned_args)
        changed = sorted(k for k in planned.keys() & recorded.keys() if k != "progress" and planned[k] != recorded[k])
        if changed:
            k = changed[0]
            return "stale", f"it ran with --{k.replace('_', '-')} {recorded[k]!r}, the config now says {planned[k]!r}"
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
def _as_command_line(script: str, argv: list[str]):
    """``sys.argv`` as if the stage ran from the shell: its metrics.json records that command line."""
    saved = sys.argv
    sys.argv = [f"{script}.py"] + list(argv)
    try:
        yield
    finally:
        sys.argv = saved


def run_cell(cell: dict, threads: int | None = None) -> dict:
    """Run one cell in this process: the script's ``parse_args`` and ``main``, its console output in
    ``cell.out`` beside its artifacts. Returns ``{"id", "ok", "seconds", "error"}``; never raises for a
    failing stage (one cell's failure must not lose the others). ``threads``: torch's intra-op threads
    (a batch job's CPUs, not the node's)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    start = time.perf_counter()
    os.makedirs(cell["directory"], exist_ok=True)
    error = None
    with open(os.path.join(cell["directory"], CELL_LOG), "a") as out:
        out.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} python3 {cell['script']}.py {' '.join(cell['argv'])}\n")
        out.flush()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), \
                _as_command_line(cell["script"], cell["argv"]):
            try:
                module = importlib.import_module(cell["script"])
                module.main(module.parse_args(cell["argv"]))
            except UserError as err:
                error = str(err)
            except SystemExit as err:  # argparse: its message went to cell.out
                error = f"{cell['script']}.py exited with status {err.code}"
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

"""The defense registry: every defense under its name, with a typed config and one entry point.

    @register("anp", ANPDefenseConfig, steps=("masks", "prune"), prunes=True, summary="...")
    def run(config: ANPDefenseConfig, inputs: DefenseInputs) -> dict: ...   # the metrics.json it wrote

A defense's config (a dataclass of :func:`utils.options.option` fields) is the one source of its options: the
stage scripts generate their flags from it (the original tools' spellings as aliases), the grid builds it from
a config file's mapping, and both call the same ``run``. :class:`DefenseInputs` are what a run is given rather
than chosen: the run settings (model, data, device, seed), the model and trigger info, the output folder, a
mask file to prune by. A new defense is one module that registers itself, listed in ``MODULES`` (or, for a
defense kept outside this tree, named in the environment variable ``BACKDOOR_DEFENSES``, comma-separated
module names: grid workers inherit it).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable

from utils.cli import RunSettings
from utils.errors import OptionError, UserError
from utils.options import option

# The modules that register a defense (imported on first use of the registry).
MODULES = ("defenses.anp_defense", "defenses.rnp_defense", "defenses.soda_defense")


@dataclass
class DefenseInputs:
    """What a defense run is given. ``attack``: without a trigger info, the attack to evaluate against
    (``poison_type``, ``poison_target``, ``target_type``, ``attack_options``); ``steps``: a subset of the
    defense's steps (None: all, or as far as ``mask_file`` allows)."""
    settings: RunSettings
    checkpoint: str
    output_dir: str
    trigger_info: str = ""
    mask_file: str | None = None
    attack: dict = field(default_factory=dict)
    steps: tuple[str, ...] | None = None


@dataclass
class InputFlags:
    """The flags of :class:`DefenseInputs` (canonical names; the original tools' spellings as aliases)."""
    checkpoint: str | None = option(None, "the backdoored model (state_dict; RNP .tar and DataParallel wrappers "
                                    "accepted)", type=str, required=True,
                                    aliases=("--checkpoints", "--backdoor_model_path", "--backdoor-model-path",
                                             "--in_model"))
    trigger_info: str = option("", "trigger_info.th written by train_backdoor_cifar.py (decides the attack the "
                               "model is evaluated against)", aliases=("--trigger_info",))
    output_dir: str = option("logs/", "folder for the run's log, artifacts and metrics.json",
                             aliases=("--output_dir", "--log_root", "--log-root"))
    mask_file: str | None = option(None, "mask_values.txt to prune by (skips the mask steps)", type=str,
                                   aliases=("--mask_file",))
    steps: list | None = option(None, "run only these of the defense's steps (default: all; pruning alone needs "
                                "--mask-file)", type=str, nargs="+", metavar="STEP")


@dataclass(frozen=True)
class Defense:
    name: str
    config: type  # dataclass of utils.options fields
    run: Callable[[object, DefenseInputs], dict]
    steps: tuple[str, ...]
    prunes: bool  # sweeps a pruning threshold: operating rules apply (the grid: a masks cell, a prune cell per rule)
    summary: str
    timings: dict  # report column -> the metrics.json timing keys that make it up
    oracle: Callable[[object], bool] = lambda config: False  # whether a config is an oracle (reported as one)
    attack_flags: bool = False  # without a trigger info, the attack is given by the attack registry's flags

    @property
    def mask_steps(self) -> tuple[str, ...]:
        """A pruning defense's steps up to its mask_values.txt (the grid's masks cell)."""
        return tuple(step for step in self.steps if step != "prune")


_REGISTRY: dict[str, Defense] = {}


def register(name: str, config: type, *, steps: tuple[str, ...], prunes: bool, summary: str, timings: dict,
             oracle: Callable[[object], bool] | None = None, attack_flags: bool = False):
    def decorate(run):
        _REGISTRY[name] = Defense(name, config, run, tuple(steps), prunes, summary, dict(timings),
                                  oracle or (lambda config: False), attack_flags)
        return run
    return decorate


def _load() -> dict[str, Defense]:
    extra = [m.strip() for m in os.environ.get("BACKDOOR_DEFENSES", "").split(",") if m.strip()]
    for module in (*MODULES, *extra):
        try:
            importlib.import_module(module)
        except ImportError as err:
            if module in MODULES:
                raise
            raise UserError(f"BACKDOOR_DEFENSES: cannot import {module!r} ({err})") from None
    return _REGISTRY


def list_defenses() -> list[str]:
    """The registered defenses' names, sorted (the same whatever imported them first)."""
    return sorted(_load())


def get_defense(name: str) -> Defense:
    defenses = _load()
    if name not in defenses:
        raise UserError(f"defense: unknown defense {name!r} (known: {', '.join(defenses)})")
    return defenses[name]


def check_steps(name: str, steps) -> tuple[str, ...] | None:
    """``steps`` as a tuple of the defense's own steps (None: all)."""
    if not steps:
        return None
    known = get_defense(name).steps
    unknown = [s for s in steps if s not in known]
    if unknown:
        raise OptionError("steps", f"{name} has no step {unknown[0]!r} (its steps: {', '.join(known)})")
    return tuple(s for s in known if s in steps)

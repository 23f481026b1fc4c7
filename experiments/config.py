"""A grid's config file (YAML): what to train, which defenses and operating rules, which seeds.

    name: fmnist_cpu
    output_dir: runs/fmnist_cpu
    dataset: fashion-mnist          # common flags of every stage: dataset, data_dir, arch, width, device
    arch: resnet18
    width: 8
    seeds: [0, 1, 2]                # one stage-1 model per attack and seed
    defense_seeds: [0]              # optional: defense runs per model (default: the model's own seed)
    train: {epoch: 4, schedule: [2, 3]}      # stage-1 flags for every attack
    attacks:                        # label: stage-1 flags; poison_type defaults to the label
      badnets: {poison_rate: 0.05}
      badnets-all2all: {poison_type: badnets, target_type: all2all}
    defenses:                       # label: the defense's options (defenses/registry.py); defense defaults to the
      anp: {nb_iter: 300}           # label; attacks: [labels] restricts an entry to some attacks
      rnp: {}
      soda-oracle: {defense: soda, pair: attacker, attacks: [stripet]}
    rules:                          # operating rules of the pruning defenses; rule defaults to the label
      fixed: {save_threshold: 0.2}
      clean-data: {rule: defense-acc, max_acc_drop: 0.05}
    oracle: {max_acc_drop: 0.05}    # the labelled oracle row of the report (never an operating point)
    published: published.yaml       # papers' numbers, each cited (path relative to this file)
    report: {removed_asr: 0.10, removed_acc_drop: 0.05}
    jobs: 1                         # cells at once with --executor local
    executor: local                 # optional: the default of reproduce.py --executor (local, local-gpus, slurm)
    cells_per_gpu: 4                # optional: cells sharing one GPU (local-gpus; slurm, per job); default
                                    # with local-gpus: from the GPU's memory (experiments.executors)
    slurm: {partition: gpu, gpus_per_task: 1, cpus_per_task: 8, time_min: 240, array_parallelism: 32}

Option names are the typed configs' fields (``training.backdoor.TrainConfig``, the attack registry's options,
each defense's config), written with ``_`` or ``-`` or in the original tools' spellings; lists give several
values. Every option is checked when the config is read: every problem is one line naming the file and the
key, before anything runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from data.attacks import ATTACKS
from data.attacks.cli import all_options
from defenses.options import RULE_OPTIONS
from defenses.registry import get_defense, list_defenses
from training.backdoor import TrainConfig
from utils.cli import RunSettings
from utils.errors import UserError
from utils.options import fields, from_mapping, key_names

TOP_LEVEL = ("name", "description", "output_dir", "dataset", "data_dir", "arch", "width", "device", "seeds",
             "defense_seeds", "train", "attacks", "defenses", "rules", "oracle", "published", "report", "jobs",
             "slurm", "executor", "cells_per_gpu")
EXECUTOR_NAMES = ("local", "local-gpus", "slurm")  # where cells run: experiments.executors
RULES = {"fixed": {"save_threshold": 0.2}, "defense-acc": {"max_acc_drop": 0.05}}
SLURM_KEYS = {"partition": None, "gpus_per_task": 1, "cpus_per_task": 8, "time_min": 240, "array_parallelism": 32,
              "mem_gb": None, "cluster": "slurm", "additional_parameters": None}


class ConfigError(UserError):
    def __init__(self, path: str, key: str, message: str):
        super().__init__(f"{path}: {key}: {message}" if key else f"{path}: {message}")


@dataclass
class Entry:
    """One attack, defense or rule of the grid: the label it is reported under, what it is, its options.
    A defense entry also carries its typed ``config`` and the attack labels it is restricted to (None: all)."""
    label: str
    kind: str
    options: dict
    config: object = None
    attacks: list[str] | None = None
    attack_options: dict = field(default_factory=dict)  # an attack entry's options of the attack registry

    def applies_to(self, attack_label: str) -> bool:
        return self.attacks is None or attack_label in self.attacks


# Stage-1 keys of an attacks: entry beside the attack's own options; the common keys the grid sets itself.
ATTACK_KEYS = ("poison_target", "target_type")
GRID_KEYS = tuple(f.name for f in fields(RunSettings))


@dataclass
class GridConfig:
    path: str
    name: str
    output_dir: str
    common: dict  # dataset, data_dir, arch, width, device: flags of every stage
    seeds: list[int]
    defense_seeds: list[int] | None
    train: dict
    attacks: list[Entry]
    defenses: list[Entry]
    rules: list[Entry]
    oracle_max_acc_drop: float = 0.05
    published: str | None = None
    removed_asr: float = 0.10
    removed_acc_drop: float = 0.05
    jobs: int = 1
    slurm: dict = field(default_factory=dict)
    executor: str | None = None  # reproduce.py's --executor when the command line gives none
    cells_per_gpu: int | None = None

    def seeds_of_defense(self, model_seed: int) -> list[int]:
        return list(self.defense_seeds) if self.defense_seeds is not None else [model_seed]


def _yaml():
    try:
        import yaml
    except ImportError:
        raise UserError("--config: reading a config needs PyYAML (pip install pyyaml)") from None
    return yaml


PUBLISHED_KEYS = ("source", "attack", "defense", "before", "after")


def check_published(path: str, published: str) -> None:
    """The papers' numbers file: ``entries``, each citing its ``source`` with ``before``/``after`` numbers."""
    yaml = _yaml()
    try:
        with open(published) as f:
            entries = (yaml.safe_load(f) or {}).get("entries")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError) as err:
        raise ConfigError(path, "published", f"{published} is not a readable YAML mapping ({err})") from None
    if not isinstance(entries, list):
        raise ConfigError(path, "published", f"{published}: expected a list under 'entries'")
    for i, entry in enumerate(entries):
        missing = [k for k in PUBLISHED_KEYS if not isinstance(entry, dict) or entry.get(k) in (None, "")]
        if missing:
            raise ConfigError(path, "published", f"{published}: entry {i + 1} has no {missing[0]!r}")
        for side in ("before", "after"):
            numbers = entry[side]
            if not isinstance(numbers, dict) or not all(isinstance(v, (int, float)) for v in numbers.values()):
                raise ConfigError(path, "published", f"{published}: entry {i + 1}: {side} must map acc/asr/ra to "
                                  "numbers")


def load_config(path: str, overrides: dict | None = None, train_overrides: dict | None = None) -> GridConfig:
    """Read and check ``path``; ``overrides`` (from the command line) replace top-level keys, ``train_overrides``
    (``--epoch``, ``--schedule``) stage 1's options of every attack, where an attack sets them too. Every
    attack's and defense's options become their typed configs here (each key checked)."""
    config = _load_config(path, overrides)
    given = {k: v for k, v in (train_overrides or {}).items() if v is not None}
    if "epoch" in given and given["epoch"] <= 0:
        raise UserError(f"--epoch: expected a positive number of epochs, got {given['epoch']}")
    config.train.update(given)
    for entry in config.attacks:
        entry.options.update({k: v for k, v in given.items() if k in entry.options})
        attack_config(config, entry)
    for entry in config.defenses:
        defense_config(config, entry)
    return config


def _refuse_grid_keys(path: str, where: str, options: dict) -> None:
    for key in options:
        if str(key).replace("-", "_") in GRID_KEYS:
            raise ConfigError(path, f"{where}.{key}", "set by the grid itself (seeds, and the common dataset/"
                              "data_dir/arch/width/device keys at the top level), not per entry")


def attack_config(config: GridConfig, entry: Entry) -> None:
    """Stage 1 of one attack entry: its ``config`` (TrainConfig) and ``attack_options`` from ``train:`` and the
    entry; each key is a stage-1 option, ``poison_target``/``target_type``, or an option of the attack (checked
    by its type), named where it is written."""
    train_names, attack_options = key_names(TrainConfig), all_options()
    train, attack, origin = {}, {}, {}
    for where, options in (("train", config.train), (f"attacks.{entry.label}", entry.options)):
        _refuse_grid_keys(config.path, where, options)
        section = {}
        for key, value in options.items():
            name = str(key).replace("-", "_")
            if str(key) in train_names:
                section[key] = value
            elif name in ATTACK_KEYS or name in attack_options:
                attack[name], origin[name] = value, where
            else:
                raise ConfigError(config.path, f"{where}.{key}", "not a stage-1 option nor an option of any attack")
        try:  # each section's keys checked where they are written
            from_mapping(TrainConfig, section, where)
        except UserError as err:
            raise ConfigError(config.path, "", str(err)) from None
        train.update(section)
    for name, value in attack.items():
        if name == "target_type" and value not in ATTACKS[entry.kind].target_types:
            raise ConfigError(config.path, f"{origin[name]}.target_type", f"{entry.kind} supports "
                              f"{', '.join(ATTACKS[entry.kind].target_types)}, not {value!r}")
        if name in attack_options:
            option = ATTACKS[entry.kind].options.get(name)
            if option is None:
                raise ConfigError(config.path, f"{origin[name]}.{name}", f"not an option of attack "
                                  f"{entry.kind!r} (attacks.{entry.label})")
            try:
                attack[name] = option.check(name, value)
            except UserError as err:
                raise ConfigError(config.path, f"{origin[name]}.{name}", str(err).split(": ", 1)[-1]) \
                    from None
    entry.config, entry.attack_options = from_mapping(TrainConfig, train, "train"), attack  # sections checked above


def defense_config(config: GridConfig, entry: Entry) -> None:
    """A defense entry's typed config (every key checked; the operating rules' keys refused: ``rules:`` sets
    them), and the attacks it is restricted to."""
    options = dict(entry.options)
    attacks = options.pop("attacks", None)
    if attacks is not None:
        labels = [a.label for a in config.attacks]
        if isinstance(attacks, str):
            attacks = [attacks]
        if not isinstance(attacks, list) or any(a not in labels for a in attacks):
            raise ConfigError(config.path, f"defenses.{entry.label}.attacks", f"expected a list of attack labels "
                              f"of this config ({', '.join(labels)}), got {attacks!r}")
        entry.attacks = [str(a) for a in attacks]
    _refuse_grid_keys(config.path, f"defenses.{entry.label}", options)
    defense = get_defense(entry.kind)
    refused = {name: "set by the grid's operating rules (rules:), not per defense" for name in RULE_OPTIONS}
    try:
        entry.config = from_mapping(defense.config, options, f"defenses.{entry.label}", refused=refused)
    except UserError as err:
        raise ConfigError(config.path, "", str(err)) from None


def _load_config(path: str, overrides: dict | None = None) -> GridConfig:
    if not os.path.isfile(path):
        raise UserError(f"--config: {path} does not exist")
    yaml = _yaml()
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(path, "", f"not a readable YAML file{line}: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(path, "", "expected a mapping of keys (name, attacks, defenses, ...) at the top level")
    raw = {**raw, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        raise ConfigError(path, unknown[0], f"unknown key (expected one of {', '.join(TOP_LEVEL)})")
    for key in ("attacks", "defenses", "seeds"):
        if key not in raw:
            raise ConfigError(path, key, "missing")

    def ints(key, value):
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                 for v in value):
            raise ConfigError(path, key, f"expected a list of integer seeds, got {value!r}")
        if len(set(value)) != len(value):
            raise ConfigError(path, key, f"a seed appears twice in {value}")
        return value

    def mapping(key, value):
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(path, key, f"expected a mapping, got {type(value).__name__}")
        return value

    def entries(key, value, kind_key, known, default_options=None):
        if isinstance(value, list):  # a list of names: every one with its default options
            value = {name: {} for name in value}
        value = mapping(key, value)
        if not value:
            raise ConfigError(path, key, "expected at least one entry")
        out = []
        for label, options in value.items():
            options = dict(mapping(f"{key}.{label}", options))
            kind = options.pop(kind_key, label)
            if kind not in known:
                raise ConfigError(path, f"{key}.{label}", f"unknown {kind_key.replace('_', ' ')} {kind!r} "
                                  f"(known: {', '.join(sorted(known))})")
            if default_options is not None:
                extra = sorted(set(options) - set(default_options[kind]))
                if extra:
                    raise ConfigError(path, f"{key}.{label}.{extra[0]}", f"not an option of rule {kind!r} "
                                      f"(expected {', '.join(default_options[kind])})")
                options = {**default_options[kind], **options}
            out.append(Entry(str(label), kind, options))
        return out

    width = raw.get("width", 64)
    if not isinstance(width, int) or isinstance(width, bool) or width <= 0:
        raise ConfigError(path, "width", f"expected a positive integer, got {width!r}")
    jobs = raw.get("jobs", 1)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs <= 0:
        raise ConfigError(path, "jobs", f"expected a positive integer, got {jobs!r}")
    executor = raw.get("executor")
    if executor is not None and executor not in EXECUTOR_NAMES:
        raise ConfigError(path, "executor", f"expected one of {', '.join(EXECUTOR_NAMES)}, got {executor!r}")
    cells_per_gpu = raw.get("cells_per_gpu")
    if cells_per_gpu is not None and (not isinstance(cells_per_gpu, int) or isinstance(cells_per_gpu, bool)
                                      or cells_per_gpu <= 0):
        raise ConfigError(path, "cells_per_gpu", f"expected a positive integer, got {cells_per_gpu!r}")
    slurm = mapping("slurm", raw.get("slurm"))
    extra = sorted(set(slurm) - set(SLURM_KEYS))
    if extra:
        raise ConfigError(path, f"slurm.{extra[0]}", f"unknown key (expected one of {', '.join(SLURM_KEYS)})")
    oracle = mapping("oracle", raw.get("oracle"))
    report = mapping("report", raw.get("report"))
    for key, section, allowed in (("oracle", oracle, ("max_acc_drop",)),
                                  ("report", report, ("removed_asr", "removed_acc_drop"))):
        for k, v in section.items():
            if k not in allowed:
                raise ConfigError(path, f"{key}.{k}", f"unknown key (expected {', '.join(allowed)})")
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
                raise ConfigError(path, f"{key}.{k}", f"expected a number in [0, 1], got {v!r}")
    published = raw.get("published")
    if published is not None:
        if not isinstance(published, str):
            raise ConfigError(path, "published", f"expected a file name, got {published!r}")
        published = os.path.join(os.path.dirname(os.path.abspath(path)), published)
        if not os.path.isfile(published):
            raise ConfigError(path, "published", f"{published} does not exist")
        check_published(path, published)
    name = str(raw.get("name") or os.path.splitext(os.path.basename(path))[0])
    common = {"dataset": raw.get("dataset", "cifar10"), "arch": raw.get("arch", "resnet18"), "width": width,
              "device": raw.get("device", "auto")}
    if raw.get("data_dir") is not None:
        common["data_dir"] = raw["data_dir"]
    defense_seeds = raw.get("defense_seeds")
    return GridConfig(
        path=path, name=name, output_dir=str(raw.get("output_dir") or os.path.join("runs", name)), common=common,
        seeds=ints("seeds", raw["seeds"]),
        defense_seeds=None if defense_seeds in (None, "same") else ints("defense_seeds", defense_seeds),
        train=mapping("train", raw.get("train")),
        attacks=entries("attacks", raw["attacks"], "poison_type", ATTACKS),
        defenses=entries("defenses", raw["defenses"], "defense", list_defenses()),
        rules=entries("rules", raw.get("rules", ["fixed"]), "rule", RULES, RULES),
        oracle_max_acc_drop=float(oracle.get("max_acc_drop", 0.05)), published=published,
        removed_asr=float(report.get("removed_asr", 0.10)),
        removed_acc_drop=float(report.get("removed_acc_drop", 0.05)), jobs=jobs,
        slurm={**SLURM_KEYS, **slurm}, executor=executor, cells_per_gpu=cells_per_gpu)

"""Typed configs: a dataclass whose fields (default, help, choices, the original tools' spellings) are the one
source of a stage's options.

    @dataclass
    class SODAConfig:
        num_recon: int = option(100, "reconstructed samples wanted", aliases=("--num_recon",))
        def __post_init__(self): check_positive(self.num_recon, "num_recon")   # OptionError names the option

From it come the command-line flags (:func:`add_flags`: ``--num-recon`` and its aliases), a config from parsed
arguments (:func:`from_args`), a config from a grid's mapping with every key checked (:func:`from_mapping`),
and the equivalent command line (:func:`to_argv`). A bad value raises :class:`utils.errors.OptionError`
naming the option: the script layer shows the flag the user typed, the grid the config key.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .errors import OptionError, UserError


def option(default: Any, help: str = "", *, aliases: tuple[str, ...] = (), choices=None, type=None,
           nargs=None, flag: str | None = None, metavar: str | None = None, grid: bool = True,
           required: bool = False):
    """A config field. ``type`` defaults to the default's type (give it when the default is None); a bool
    field is a switch (``--name`` for default False; ``flag`` names the switch, e.g. ``--no-amp``, for
    default True); ``grid=False``: an input of a single run (a path, a resume point, the steps to run) that a
    grid config may not set: the grid plans those itself; ``required``: a script must be given the flag."""
    meta = {"help": help, "aliases": tuple(aliases), "choices": tuple(choices) if choices else None,
            "type": type, "nargs": nargs, "flag": flag, "metavar": metavar, "grid": grid, "required": required}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def value_type(f: dataclasses.Field):
    given = f.metadata.get("type")
    if given is not None:
        return given
    default = default_of(f)
    if isinstance(default, list):
        return type(default[0]) if default else str
    return type(default) if default is not None else str


def canonical_flag(f: dataclasses.Field) -> str:
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    return "--" + f.name.replace("_", "-")


def spellings(f: dataclasses.Field) -> list[str]:
    """The field's flags: canonical first, then the aliases."""
    names = [canonical_flag(f)]
    for alias in f.metadata.get("aliases", ()):
        if alias not in names:
            names.append(alias)
    return names


def add_flags(parser, cls, defaults: dict | None = None, title: str | None = None, only=None, skip=(),
              required=()) -> None:
    """One flag per field of ``cls`` (its aliases too) on ``parser`` (in an argument group ``title``);
    ``defaults`` overrides field defaults (e.g. stage 1's dataset); ``only``/``skip`` pick fields by name;
    ``required`` names fields this parser must be given."""
    target = parser.add_argument_group(title) if title else parser
    for f in fields(cls):
        if (only is not None and f.name not in only) or f.name in skip:
            continue
        default = (defaults or {}).get(f.name, default_of(f))
        kwargs: dict = {"dest": f.name, "default": default, "help": f.metadata.get("help", "").replace("%", "%%")}
        if f.metadata.get("required") or f.name in required:
            kwargs["required"] = True
        if value_type(f) is bool and f.metadata.get("nargs") is None:
            kwargs["action"] = "store_false" if default else "store_true"
        else:
            kwargs["type"] = value_type(f)
            if f.metadata.get("choices"):
                kwargs["choices"] = list(f.metadata["choices"])
            if isinstance(default_of(f), list) or f.metadata.get("nargs"):
                kwargs["nargs"] = f.metadata.get("nargs") or "+"
            if f.metadata.get("metavar"):
                kwargs["metavar"] = f.metadata["metavar"]
        target.add_argument(*spellings(f), **kwargs)


def from_args(cls, args):
    """The config of parsed arguments (its checks run: OptionError names the option)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def key_names(cls) -> dict[str, str]:
    """Every spelling a mapping may use for a field -> the field: ``num_recon``, ``num-recon`` and the aliases
    without their dashes (``ratio`` for ``defense_frac``)."""
    names = {}
    for f in fields(cls):
        for spelling in [f.name] + spellings(f):
            bare = spelling.lstrip("-")
            names.setdefault(bare, f.name)
            names.setdefault(bare.replace("-", "_"), f.name)
    return names


def _coerce(f: dataclasses.Field, value, where: str):
    kind = value_type(f)
    many = isinstance(default_of(f), list) or f.metadata.get("nargs")

    def one(v):
        if v is None and default_of(f) is None:
            return None
        if kind is bool:
            if not isinstance(v, bool):
                raise UserError(f"{where}: expected true or false, got {v!r}")
            return v
        if kind is float and isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if kind is int and isinstance(v, int) and not isinstance(v, bool):
            return v
        if kind is str and isinstance(v, (str, int, float)) and not isinstance(v, bool):
            return str(v)
        raise UserError(f"{where}: expected {'a number' if kind in (int, float) else kind.__name__}"
                        f"{' (integer)' if kind is int else ''}, got {v!r}")

    if many:
        values = value if isinstance(value, list) else [value]
        value = [one(v) for v in values]
    else:
        if isinstance(value, list):
            raise UserError(f"{where}: expected one value, got the list {value!r}")
        value = one(value)
    choices = f.metadata.get("choices")
    if choices and value is not None and any(v not in choices for v in (value if many else [value])):
        raise UserError(f"{where}: expected one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def from_mapping(cls, mapping: dict, where: str, fixed: dict | None = None, refused: dict | None = None):
    """A config from a grid's ``mapping`` (keys as field names, kebab-case or the original spellings, each
    checked), over ``fixed`` values the grid sets itself. ``refused``: field -> why a config may not set it
    (fields with ``grid=False`` are refused anyway). Errors name ``where.key``."""
    names = key_names(cls)
    values = dict(fixed or {})
    for key, value in (mapping or {}).items():
        name = names.get(str(key))
        if name is None:
            raise UserError(f"{where}.{key}: not an option (expected one of {', '.join(f.name for f in fields(cls))})")
        field = next(f for f in fields(cls) if f.name == name)
        why = (refused or {}).get(name) or (None if field.metadata.get("grid", True) else "a single run's input (a "
                                            "path, a resume point, the steps to run), planned by the grid itself")
        if why:
            raise UserError(f"{where}.{key}: {why}")
        values[name] = _coerce(field, value, f"{where}.{key}")
    try:
        return cls(**values)
    except OptionError as err:
        raise UserError(err.naming(f"{where}.{err.option}")) from None


def to_argv(config, skip: tuple[str, ...] = ()) -> list[str]:
    """The flags that give ``config`` on a command line (only those that differ from the defaults)."""
    argv = []
    for f in fields(type(config)):
        value = getattr(config, f.name)
        if f.name in skip or value == default_of(f):
            continue
        flag = canonical_flag(f)
        if value_type(f) is bool and f.metadata.get("nargs") is None:
            argv.append(flag)  # a switch differs from its default only by being given
        elif isinstance(value, list):
            argv += [flag] + [str(v) for v in value]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def as_dict(config) -> dict:
    return {f.name: getattr(config, f.name) for f in fields(type(config))}

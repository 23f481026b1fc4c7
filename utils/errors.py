"""User-facing errors: one line on stderr naming the argument or file, no traceback.

Library code names the *option* a bad value came from (:class:`OptionError`, ``option="num_recon"``), not a
command-line spelling; the layer that read the value says where it came from: a script the flag the user
typed (``--num_recon`` or ``--num-recon``, :func:`run_cli`), the grid the config key
(``defenses.soda.num_recon``).
"""
from __future__ import annotations

import argparse
import sys


class UserError(Exception):
    """Bad input from the user (argument, file, environment). Scripts print it as one line."""


class OptionError(UserError):
    """A bad value of one option. ``str()`` names it by its canonical flag (``--num-recon: ...``);
    :meth:`naming` names it as the caller knows it."""

    def __init__(self, option: str, detail: str):
        self.option, self.detail = option, detail
        super().__init__(f"{flag_of(option)}: {detail}")

    def naming(self, name: str) -> str:
        return f"{name}: {self.detail}"


def flag_of(option: str) -> str:
    """The canonical command-line flag of an option name: ``num_recon`` -> ``--num-recon``."""
    return "--" + option.replace("_", "-")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad arguments on one line (no usage block) and exits with status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def typed_flag(parser, option: str, argv: list[str] | None = None) -> str:
    """The flag of ``option`` (an argparse destination) as the user typed it, else its first spelling."""
    argv = sys.argv[1:] if argv is None else argv
    for action in getattr(parser, "_actions", []):
        if action.dest == option and action.option_strings:
            for token in argv:
                name = token.split("=", 1)[0]
                if name in action.option_strings:
                    return name
            return action.option_strings[0]
    return flag_of(option)


def user_message(err: UserError, parser=None, argv: list[str] | None = None) -> str:
    if isinstance(err, OptionError) and parser is not None:
        return err.naming(typed_flag(parser, err.option, argv))
    return str(err)


def run_cli(main, args, parser=None) -> None:
    """Run a script's ``main(args)``; turn :class:`UserError` into a one-line message (an option named by the
    flag the user typed, when ``parser`` is given) and exit 2."""
    try:
        main(args)
    except UserError as err:
        sys.stderr.write(f"error: {user_message(err, parser)}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: no partial checkpoint was written\n")
        sys.exit(130)

"""User-facing errors: one line on stderr naming the argument or file, no traceback."""
from __future__ import annotations

import argparse
import sys


class UserError(Exception):
    """Bad input from the user (argument, file, environment). Scripts print it as one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad arguments on one line (no usage block) and exits with status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def run_cli(main, args) -> None:
    """Run a script's ``main(args)``; turn :class:`UserError` into a one-line message and exit 2."""
    try:
        main(args)
    except UserError as err:
        sys.stderr.write(f"error: {err}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: no partial checkpoint was written\n")
        sys.exit(130)

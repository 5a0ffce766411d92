"""The one error type of the data path, and the CLI wrapper that turns it into one line and exit code 2.

Anything a user can cause (a missing directory, a corrupt shard, a glob that matches nothing) raises
`DataError` with a one-line message that names the file and the fix; the trainer and every `python -m memtrain.data.*`
command print it on one line and exit 2 instead of showing a traceback from deep inside a library.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn


class DataError(ValueError):
    """A problem with the data or its configuration that the user can fix; the message is one line."""

    def __init__(self, message: str) -> None:
        # Collapse newlines so a message assembled from a library error still prints as one line.
        super().__init__(" ".join(str(message).split()))


class DataWarning(UserWarning):
    """Something was skipped (e.g. a bad shard with `skip_bad_shards`) but the run goes on."""


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run a CLI `main`, turning a `DataError` into `error: ...` on stderr and exit code 2."""
    try:
        code = main(argv)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors on one line (`error: ...; see --help`) and exit code 2, like `DataError`."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message}; see --help\n")

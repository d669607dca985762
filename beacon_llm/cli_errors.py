"""The command line's user-facing error, shared by ``cli`` and ``ask`` (its own module so neither imports the other
at load time: ``ask`` is imported by ``cli`` only when a command needs it)."""

from __future__ import annotations

EXIT_USAGE = 2  # bad input: a CliError, or a chat question that could not be answered


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""

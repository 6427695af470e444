"""The CLI's own errors and its exit codes.

=====  ==========================================================================
code   meaning
=====  ==========================================================================
0      success
1      any other failure: a catalog error, an unreachable database, a bad file…
2      usage: an unknown command or option, a bad argument (an unparsable key…)
3      version conflict: the catalog is not at the expected version
4      not found: no such route (or, for ``lookup``, no route holds the key)
5      behind: some watcher does not hold the catalog's version (``fleet``, ``--wait``)
130    interrupted (Ctrl-C), except ``watch``, for which Ctrl-C is the normal end
=====  ==========================================================================
"""

from __future__ import annotations

__all__ = [
    "EXIT_BEHIND",
    "EXIT_CONFLICT",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandError",
    "UsageError",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFLICT = 3
EXIT_NOT_FOUND = 4
EXIT_BEHIND = 5
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """A failure the CLI reports as one line, with an exit code (1 unless said otherwise)."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(CommandError):
    """A bad argument: exit code 2, like the errors argparse reports."""

    exit_code = EXIT_USAGE

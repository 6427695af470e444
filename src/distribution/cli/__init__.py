"""The ``distribution`` command: inspect and operate the route catalog from a shell.

``distribution --help`` lists the subcommands; ``python -m distribution`` is the same command.
The CLI is thin: it parses arguments, calls the library and formats what comes back. Layout:

* :mod:`~distribution.cli.parser`: the argument parser;
* :mod:`~distribution.cli.session`: one run of a command and the catalog it works on;
* :mod:`~distribution.cli.commands`: one function per subcommand (the writes from one table),
  and :data:`~distribution.cli.commands.COMMANDS`, every subcommand's function;
* :mod:`~distribution.cli.transfer`: ``export`` and ``import`` (an import's plan first);
* :mod:`~distribution.cli.db`: ``db``, the embedded server or the one a URL names;
* :mod:`~distribution.cli.keys`: keys on the command line and in output;
* :mod:`~distribution.cli.output`: tables and JSON;
* :mod:`~distribution.cli.embedded`: the embedded PostgreSQL server used without a URL;
* :mod:`~distribution.cli.demo`: ``distribution demo``;
* :mod:`~distribution.cli.fleet`: ``distribution fleet``, the writes' ``--wait`` and ``watch``'s
  metrics;
* :mod:`~distribution.cli.errors`: exit codes.

Every failure is reported as one line on stderr, ``distribution: error: …``, with the exit code
of :mod:`distribution.cli.errors` (2 usage, 3 version conflict, 4 not found, 5 a watcher behind,
1 anything else).
Set ``DISTRIBUTION_DEBUG=1`` to get the traceback of an unexpected error as well. Warnings the
library logs meanwhile are one line each too, ``distribution: warning: …``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from distribution.cli.embedded import embedded_database_url
from distribution.cli.errors import (
    EXIT_CONFLICT,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    CommandError,
)
from distribution.errors import (
    CatalogRouteNotFoundError,
    CatalogVersionMismatchError,
    DistributionError,
)

__all__ = ["DEBUG_ENV", "embedded_database_url", "main"]

#: Set this environment variable to ``1`` to print the traceback of unexpected errors.
DEBUG_ENV = "DISTRIBUTION_DEBUG"


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (database messages often span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _report(message: str) -> None:
    print(f"distribution: error: {message}", file=sys.stderr, flush=True)


def _database_error(exc: Exception) -> DistributionError | None:
    """Translate a driver or SQLAlchemy error (from Alembic, say) into the library's errors."""
    import psycopg
    import sqlalchemy.exc

    from distribution.database import translate_error

    original: BaseException | None = exc
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        original = exc.orig
    if isinstance(original, psycopg.Error):
        return translate_error(original)
    if isinstance(exc, sqlalchemy.exc.SQLAlchemyError):
        return DistributionError(f"the catalog database failed: {exc}")
    return None


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, CatalogVersionMismatchError):
        return EXIT_CONFLICT
    if isinstance(exc, CatalogRouteNotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(exc, CommandError):
        return exc.exit_code
    return EXIT_ERROR


def _message(exc: BaseException) -> str:
    message = _one_line(exc)
    if isinstance(exc, CatalogVersionMismatchError):
        return f"version conflict: {message} (nothing was written)"
    if isinstance(exc, OSError) and not isinstance(exc, DistributionError):
        return f"{exc.strerror or type(exc).__name__}: {exc.filename}" if exc.filename else message
    return message


def _not_a_follow_up(record: logging.LogRecord) -> bool:
    """False for psycopg's note that closing a pipeline failed too, as the error the command
    reports went through it: the same failure twice, the second time in psycopg's words."""
    return not (
        record.name.startswith("psycopg") and record.getMessage().startswith("error ignored")
    )


class _OneLineLogHandler(logging.Handler):
    """The library's warnings (a watcher retrying, say) as one line each on stderr."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.addFilter(_not_a_follow_up)

    def emit(self, record: logging.LogRecord) -> None:
        message = " ".join(record.getMessage().split())
        print(f"distribution: {record.levelname.lower()}: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``distribution`` command with ``argv`` (default: ``sys.argv[1:]``); return its exit code."""
    handler = _OneLineLogHandler(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        return _run(argv)
    except KeyboardInterrupt:  # at any moment, even while the command is still starting
        _report("interrupted")
        return EXIT_INTERRUPTED
    finally:
        root.removeHandler(handler)


def _run(argv: Sequence[str] | None) -> int:
    from distribution.cli.parser import build_parser

    try:
        args = build_parser().parse_args(argv)
    except CommandError as exc:
        _report(_one_line(exc))
        return exc.exit_code
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    # Imported only now: the database layers take a while to import, and --help needs none.
    from distribution.cli.commands import COMMANDS
    from distribution.cli.session import Session

    session = Session(args)
    try:
        return COMMANDS[args.command](session)
    except BrokenPipeError:
        # The reader went away (``distribution routes | head``): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR
    except (DistributionError, CommandError, OSError, ValueError) as exc:
        _report(_message(exc))
        return _exit_code(exc)
    except Exception as exc:
        translated = _database_error(exc)
        if translated is not None:
            _report(_message(translated))
            return _exit_code(translated)
        if os.environ.get(DEBUG_ENV) == "1":
            traceback.print_exc()
        _report(f"unexpected {type(exc).__name__}: {_one_line(exc)} (set {DEBUG_ENV}=1 for details)")
        return EXIT_ERROR
    finally:
        with contextlib.suppress(Exception):
            session.close()

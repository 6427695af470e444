"""A private PgBouncer in front of a test database, for tests: a real pooler on a free port.

Services in a large fleet read through PgBouncer in transaction mode: each transaction gets
whichever server connection is free, so nothing a session leaves on a server connection (a
prepared statement, a setting, LISTEN) is there for that session's next transaction. This
PgBouncer fronts one database, logging in to it as the user of the URL it is given (a reader
role, say), and lets any client in (``auth_type = any``): it is private to the test, on
127.0.0.1 only. It runs from the machine's ``pgbouncer`` binary (Debian: ``apt-get install
pgbouncer``); on a version with prepared statement support (1.21 and later) that support is
turned off, so that the tests meet a pooler without it whatever the version.

    with PgBouncer.start(database_url) as bouncer:
        bouncer.url  # the same database, through PgBouncer in transaction mode
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import psycopg
from psycopg.conninfo import conninfo_to_dict
from standby import Servers, free_port, server_user

__all__ = ["PgBouncer", "pgbouncer", "pgbouncer_binary"]

_TIMEOUT = 30.0
# The client name the pooler's URL gives, and the one its admin console lets in.
_CLIENT_USER = "distribution"


def pgbouncer_binary() -> Path | None:
    """The ``pgbouncer`` program on PATH or where Debian installs it; None when absent."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    return None if found is None else Path(found)


def _version(binary: Path) -> tuple[int, ...]:
    """The version ``pgbouncer --version`` prints first ("PgBouncer 1.18.0")."""
    first = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=_TIMEOUT, check=True
    ).stdout.split()
    return tuple(int(part) for part in first[1].split("."))


class PgBouncer(Servers):
    """A PgBouncer process fronting one database; :meth:`close` stops it and deletes its folder."""

    def __init__(self, binary: Path, target_url: str, pool_size: int) -> None:
        self._target = conninfo_to_dict(target_url)
        self.version = _version(binary)
        super().__init__("distribution-pgbouncer-", self._runs_as())
        self._binary = binary
        self._pool_size = pool_size
        self.port = free_port()

    @classmethod
    def start(cls, target_url: str, *, pool_size: int = 2) -> Self:
        """Start a PgBouncer in transaction mode in front of the database of ``target_url``,
        with at most ``pool_size`` server connections (fewer than a racing test's clients, so
        that clients share and swap them); FileNotFoundError when there is no pgbouncer binary."""
        binary = pgbouncer_binary()
        if binary is None:
            raise FileNotFoundError("no pgbouncer binary on PATH or in /usr/sbin")
        return cls(binary, target_url, pool_size)._started()

    @property
    def database(self) -> str:
        """The name of the database fronted, which clients of the pooler name too."""
        return str(self._target.get("dbname") or self._target.get("user") or "postgres")

    @property
    def url(self) -> str:
        """The fronted database, through the pooler."""
        return f"postgresql://{_CLIENT_USER}@127.0.0.1:{self.port}/{self.database}"

    def _start(self) -> None:
        # The server side: the target's host (a socket folder, for an embedded server), port,
        # database and login, as libpq read them from its URL.
        server = {"port": "5432", "dbname": self.database}
        server.update({
            key: str(value)
            for key, value in self._target.items()
            if key in ("host", "port", "user", "password") and value
        })
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "any",
            "admin_users": _CLIENT_USER,
            "pool_mode": "transaction",
            "default_pool_size": str(self._pool_size),
            "max_client_conn": "200",
            "logfile": str(self.folder / "pgbouncer.log"),
            "pidfile": str(self.folder / "pgbouncer.pid"),
        }
        if self.version >= (1, 21):
            # Keep prepared statements off on the versions that can keep them.
            settings["max_prepared_statements"] = "0"
        config = self.folder / "pgbouncer.ini"
        config.write_text(
            "[databases]\n"
            + f"{self.database} = {' '.join(f'{k}={v}' for k, v in server.items())}\n"
            + "[pgbouncer]\n"
            + "".join(f"{name} = {value}\n" for name, value in settings.items())
        )
        if self.user is not None:
            shutil.chown(config, self.user)
        # SIGTERM, which close() sends, is PgBouncer's immediate shutdown.
        process = self.spawn(str(self._binary), str(config))
        deadline = time.monotonic() + _TIMEOUT
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited ({process.returncode}): {self._log()}")
            try:
                self.transactions()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"pgbouncer did not answer: {self._log()}") from None
                time.sleep(0.02)

    def _runs_as(self) -> str | None:
        """Whom to run as: PgBouncer refuses root, as PostgreSQL does; a server reached through a
        socket folder (an embedded one) is reached by that folder's owner."""
        host = str(self._target.get("host") or "")
        if os.geteuid() == 0 and host.startswith("/"):
            return pwd.getpwuid(Path(host).stat().st_uid).pw_name
        return server_user()

    def _log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.folder / "pgbouncer.log").read_text()[-2000:]
        return "(no log)"

    def transactions(self) -> int:
        """How many transactions the pooler has passed to the fronted database so far
        (``SHOW STATS``, on its admin console)."""
        console = f"postgresql://{_CLIENT_USER}@127.0.0.1:{self.port}/pgbouncer"
        with (
            psycopg.connect(console, autocommit=True, connect_timeout=5) as connection,
            # The console speaks the simple query protocol only.
            psycopg.ClientCursor(connection) as cursor,
        ):
            cursor.execute("SHOW STATS")
            assert cursor.description is not None
            columns = [column.name for column in cursor.description]
            for row in cursor.fetchall():
                stats = dict(zip(columns, row, strict=True))
                if stats["database"] == self.database:
                    return int(stats["total_xact_count"])
        return 0


def pgbouncer(target_url: str) -> Iterator[PgBouncer]:
    """A fixture body: a PgBouncer in transaction mode in front of the database of
    ``target_url``, or a skip saying why not."""
    import pytest

    if pgbouncer_binary() is None:
        pytest.skip("no pgbouncer binary on this machine (Debian: apt-get install pgbouncer)")
    with PgBouncer.start(target_url) as bouncer:
        yield bouncer

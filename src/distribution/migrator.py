"""Running the packaged Alembic migrations: upgrading a database to the catalog schema."""

from __future__ import annotations

from importlib.util import find_spec

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from distribution.database import create_engine, translated_errors
from distribution.errors import CatalogPermissionError

__all__ = [
    "MIGRATION_LOCK_KEY",
    "VERSION_TABLE",
    "alembic_config",
    "current_revision",
    "head_revision",
    "migrate",
]

#: The table in which Alembic records the catalog schema's revision.
VERSION_TABLE = "distribution_alembic_version"
#: The advisory lock key migrations hold (``'distmigr'`` as a big-endian int64).
MIGRATION_LOCK_KEY = int.from_bytes(b"distmigr", "big", signed=True)


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """Return an Alembic ``Config`` over the packaged migration scripts.

    With ``connection``, the migrations run on it (``migrations/env.py`` picks it up).
    """
    config = Config()
    # Alembic reads its scripts from a directory on disk: the installed package's own.
    spec = find_spec("distribution.migrations")
    assert spec is not None and spec.submodule_search_locations, "migrations are not installed"
    config.set_main_option("script_location", next(iter(spec.submodule_search_locations)))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest schema revision the packaged migrations define: the one this library needs."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the packaged migrations have a single head"
    return head


def current_revision(connection: sa.Connection) -> str | None:
    """The schema revision the database of ``connection`` holds (None: never migrated)."""
    if not connection.exec_driver_sql(f"SELECT to_regclass('{VERSION_TABLE}')").scalar():
        return None
    revision: str | None = connection.exec_driver_sql(
        f"SELECT version_num FROM {VERSION_TABLE}"
    ).scalar()
    return revision


def migrate(url_or_engine: str | sa.Engine) -> None:
    """Upgrade the database to the newest catalog schema; O(1) when it is already there.

    Idempotent, and safe when several processes start together: the migrations run under an
    advisory lock, so the later processes wait and then find the schema up to date. The revision
    is read first, read-only: when it is already the newest, ``migrate`` returns having needed
    no more than ``SELECT`` on :data:`VERSION_TABLE`, so every role README.md lists (a reader
    too) may call it at start-up; only an upgrade needs the migrator's privileges.

    Database errors come back as the library's: a role that may not migrate gets
    :class:`~distribution.CatalogPermissionError`, an unreachable database
    :class:`~distribution.CatalogUnavailableError`.
    """
    engine = create_engine(url_or_engine, poolclass=sa.NullPool) if isinstance(
        url_or_engine, str
    ) else url_or_engine
    try:
        with translated_errors(), engine.connect() as connection:
            current = current_revision(connection)
            connection.rollback()  # the upgrade takes its lock in a transaction of its own
            if current == head_revision():
                return
            command.upgrade(alembic_config(connection), "head")
            connection.commit()
    except CatalogPermissionError as exc:
        raise CatalogPermissionError(
            f"{exc} (migrate() needs SELECT on {VERSION_TABLE} when the schema is current, and "
            "the privileges of the catalog objects' owner to upgrade it)"
        ) from exc.__cause__
    finally:
        if engine is not url_or_engine:
            engine.dispose()

"""Alembic environment of the catalog schema.

The database is the connection (or engine) handed over in ``config.attributes["connection"]``
by :func:`distribution.migrate` or pytest-alembic, or else ``$DISTRIBUTION_DATABASE_URL``. Every
run takes a transaction-scoped advisory lock before reading the schema's revision, so processes
that migrate at the same time queue and the later ones find nothing left to do.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from distribution.database import create_engine
from distribution.migrator import MIGRATION_LOCK_KEY, VERSION_TABLE
from distribution.models import Base


def _run(connection: sa.Connection) -> None:
    if not connection.in_transaction():
        # The lock and the DDL need one transaction: on a connection of an AUTOCOMMIT engine the
        # lock would be released as soon as it is taken, and each statement would commit alone.
        connection.execution_options(isolation_level="READ COMMITTED")
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        transaction_per_migration=False,
    )
    with context.begin_transaction():
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        context.run_migrations()


def _run_online() -> None:
    # A Connection (distribution.migrate) is used as it is; an Engine (what pytest-alembic and
    # other tools hand over as "connection") is connected to; without either, the URL.
    connectable = context.config.attributes.get("connection")
    if isinstance(connectable, sa.Connection):
        _run(connectable)
        return
    engine = connectable if isinstance(connectable, sa.Engine) else None
    if engine is None:
        engine = create_engine(poolclass=sa.NullPool)
    try:
        with engine.connect() as connection:
            _run(connection)
            connection.commit()
    finally:
        if engine is not connectable:
            engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported: run them against a database")
_run_online()

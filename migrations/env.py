"""Alembic environment of the catalog schema.

The database is the connection handed over by :func:`distribution.migrate`, or else
``$DISTRIBUTION_DATABASE_URL``. Every run takes a transaction-scoped advisory lock before reading
the schema's revision, so processes that migrate at the same time queue and the later ones find
nothing left to do.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from distribution.database import create_engine
from distribution.models import Base
from distribution.schema import MIGRATION_LOCK_KEY, VERSION_TABLE


def _run(connection: sa.Connection) -> None:
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
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(poolclass=sa.NullPool)
    try:
        with engine.connect() as connection:
            _run(connection)
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported: run them against a database")
_run_online()

"""Transactions on the catalog database: one SQLAlchemy ``Connection`` per transaction.

Reads run ``REPEATABLE READ`` and read-only, so that every query of a read sees one version.
Writes run ``READ COMMITTED``: each starts with the compare-and-set on the metadata row, which
queues concurrent writers and lets the loser see the winner's version. Both are the connection's
``execution_options``, which override the engine's own settings (even ``AUTOCOMMIT``) for the
transaction; the pool restores them when it takes the connection back.

Cold paths run SQLAlchemy statements on the connection. The measured hot paths (a snapshot's
pipelined read, a save's COPY) use its psycopg connection, in the same transaction, through
:func:`driver_cursor`; the one-call operations run on a pooled psycopg connection alone
(:func:`driver_transaction`); a single statement needs no transaction around it
(:func:`single_statement`). Every database error leaves as the library's own (see
:func:`~distribution.database.translated_errors`), the psycopg error as its ``__cause__``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import sqlalchemy as sa
import sqlalchemy.pool
from psycopg.pq import TransactionStatus

from distribution.database import translated_errors

__all__ = [
    "connection_engine",
    "dedicated_connection",
    "driver_cursor",
    "driver_transaction",
    "single_statement",
    "transaction",
]

_READ_ONLY: dict[str, Any] = {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
_READ_WRITE: dict[str, Any] = {"isolation_level": "READ COMMITTED"}


@contextmanager
def transaction(sa_engine: sa.Engine, *, read_only: bool = False) -> Iterator[sa.Connection]:
    """Run one transaction on a pooled connection: committed at the end of the block, rolled
    back on an error, every database error translated.

    A connection the block leaves unusable (lost, or with a query still running after an
    interrupt) is thrown away rather than pooled; a lost one also empties the pool, whose other
    connections are presumed lost too (a server restart kills them all), so that only one call
    fails.
    """
    with translated_errors(), sa_engine.connect() as connection:
        connection.execution_options(**(_READ_ONLY if read_only else _READ_WRITE))
        with connection.begin():
            try:
                yield connection
            except BaseException:
                _discard_connection_if_unusable(sa_engine, connection)
                raise


@contextmanager
def single_statement(sa_engine: sa.Engine) -> Iterator[sa.Connection]:
    """A pooled connection in autocommit, for one statement: no ``BEGIN`` or ``COMMIT`` travels
    (one round trip in all), and the statement, a transaction of its own, sees one version of
    the catalog. Errors and unusable connections are handled as in :func:`transaction`.
    """
    with translated_errors(), sa_engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT")
        try:
            yield connection
        except BaseException:
            _discard_connection_if_unusable(sa_engine, connection)
            raise


@contextmanager
def driver_transaction(sa_engine: sa.Engine) -> Iterator[psycopg.Cursor[Any]]:
    """Run one ``READ COMMITTED`` write on a pooled psycopg connection, with no SQLAlchemy
    ``Connection`` around it: a binary cursor in the transaction, which commits at the end.

    For the one-call operations, whose whole cost is a round trip: a ``Connection`` with its
    execution options adds about 80 us a write, a tenth of a bare compare-and-set. Errors and
    unusable connections are handled as in :func:`transaction`.
    """
    with translated_errors():
        pooled = sa_engine.raw_connection()
        driver: psycopg.Connection[Any] = pooled.driver_connection  # type: ignore[assignment]
        previous = driver.isolation_level
        try:
            driver.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
            # An explicit BEGIN, which holds on a connection in autocommit too.
            with driver.transaction(), driver.cursor(binary=True) as cursor:
                yield cursor
        except BaseException:
            _discard_if_unusable(sa_engine, driver, pooled.invalidate)
            raise
        finally:
            if driver.pgconn.transaction_status == TransactionStatus.IDLE:
                driver.isolation_level = previous
            pooled.close()


def driver_cursor(connection: sa.Connection) -> psycopg.Cursor[Any]:
    """A binary psycopg cursor in ``connection``'s transaction, for the measured hot paths."""
    driver: psycopg.Connection[Any] = connection.connection.driver_connection  # type: ignore[assignment]
    return driver.cursor(binary=True)


def dedicated_connection(sa_engine: sa.Engine) -> psycopg.Connection[Any]:
    """A psycopg connection taken out of the pool for good, in autocommit (to LISTEN on)."""
    with translated_errors():
        pooled = sa_engine.raw_connection()
        # Read the driver connection now: once detached, the pooled proxy no longer reports it.
        connection: psycopg.Connection[Any] = pooled.driver_connection  # type: ignore[assignment]
        pooled.detach()
        try:
            connection.rollback()
            connection.autocommit = True
        except BaseException:
            connection.close()
            raise
        return connection


def connection_engine(connection: psycopg.Connection[Any]) -> sa.Engine:
    """A SQLAlchemy engine whose one connection is ``connection`` (a :func:`dedicated_connection`,
    say): a :class:`~distribution.CatalogStore` on it reads over that connection alone.

    Between transactions the connection is in autocommit, as SQLAlchemy restores it after each
    (so a LISTEN or a NOTIFY sent on it directly is never held in a transaction). Only one
    thread may use the engine at a time. Creating it opens nothing; the first use sends
    SQLAlchemy's few dialect queries. O(1).
    """
    return sa.create_engine(
        "postgresql+psycopg://",
        creator=lambda: connection,
        poolclass=sqlalchemy.pool.StaticPool,
        isolation_level="AUTOCOMMIT",
    )


def _discard_connection_if_unusable(sa_engine: sa.Engine, connection: sa.Connection) -> None:
    """:func:`_discard_if_unusable` for a SQLAlchemy ``connection`` an error interrupted."""
    if not connection.invalidated:  # else SQLAlchemy saw the disconnect itself
        driver: psycopg.Connection[Any] = connection.connection.driver_connection  # type: ignore[assignment]
        _discard_if_unusable(sa_engine, driver, connection.invalidate)


def _discard_if_unusable(
    sa_engine: sa.Engine, driver: psycopg.Connection[Any], invalidate: Callable[[], None]
) -> None:
    """Keep a connection an error left unusable out of the pool."""
    if driver.broken or driver.closed:
        invalidate()
        # A lost connection: the pool's others are presumed lost too (a server restart kills
        # them all), so that only one call fails.
        sa_engine.dispose(close=False)
    elif driver.pgconn.transaction_status == TransactionStatus.ACTIVE:
        # Still running a command (an interrupt landed mid-query): the pool's reset would fail.
        invalidate()

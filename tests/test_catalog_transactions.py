"""Tests of ``distribution.catalog.transactions``: isolation, read-only mode and their reset,
rollback on errors, and error translation, on a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa

from distribution import CatalogNotMigratedError, CatalogUnavailableError
from distribution.catalog.transactions import dedicated_connection, driver_cursor, transaction
from distribution.database import create_engine


@pytest.fixture(params=["default", "AUTOCOMMIT", "SERIALIZABLE"])
def sa_engine(request: pytest.FixtureRequest, database_url: str) -> Iterator[sa.Engine]:
    options = {} if request.param == "default" else {"isolation_level": request.param}
    engine = create_engine(database_url, pool_size=1, **options)
    try:
        yield engine
    finally:
        engine.dispose()


def _settings(connection: sa.Connection) -> tuple[str, str]:
    isolation = connection.exec_driver_sql("SHOW transaction_isolation").scalar_one()
    read_only = connection.exec_driver_sql("SHOW transaction_read_only").scalar_one()
    return isolation, read_only


def test_reads_are_repeatable_read_and_read_only_writes_read_committed(
    sa_engine: sa.Engine,
) -> None:
    """Whatever the engine's own settings, and they are back once the transaction is over."""
    with sa_engine.connect() as connection:
        before = _settings(connection)
        connection.rollback()
    with transaction(sa_engine, read_only=True) as connection:
        assert _settings(connection) == ("repeatable read", "on")
        # The hot paths' driver cursor runs in the same transaction.
        with driver_cursor(connection) as cursor:
            pid = cursor.execute("SELECT pg_backend_pid()").fetchone()
            assert cursor.execute("SHOW transaction_read_only").fetchone() == ("on",)
        assert connection.exec_driver_sql("SELECT pg_backend_pid()").one() == pid
    with transaction(sa_engine) as connection:
        assert _settings(connection) == ("read committed", "off")
    with sa_engine.connect() as connection:
        assert _settings(connection) == before


def test_a_failed_block_rolls_back(database_url: str, sa_engine: sa.Engine) -> None:
    with pytest.raises(RuntimeError), transaction(sa_engine) as connection:
        connection.exec_driver_sql("CREATE TABLE transaction_probe (x int)")
        raise RuntimeError("give up")
    with psycopg.connect(database_url) as raw:
        assert raw.execute("SELECT to_regclass('transaction_probe')").fetchone() == (None,)


def test_database_errors_come_out_translated(sa_engine: sa.Engine) -> None:
    """Through SQLAlchemy and through the driver cursor alike, the psycopg error as the cause."""
    with pytest.raises(CatalogNotMigratedError) as core, transaction(sa_engine) as connection:
        connection.exec_driver_sql("SELECT * FROM no_such_table")
    assert isinstance(core.value.__cause__, psycopg.errors.UndefinedTable)
    with pytest.raises(CatalogNotMigratedError) as hot, transaction(sa_engine) as connection:
        driver_cursor(connection).execute("SELECT * FROM no_such_table")
    assert isinstance(hot.value.__cause__, psycopg.errors.UndefinedTable)
    with transaction(sa_engine, read_only=True) as connection:  # the pool is still fine
        assert connection.exec_driver_sql("SELECT 1").scalar_one() == 1


def test_an_unreachable_server_is_unavailable(database_url: str) -> None:
    engine = create_engine(
        sa.make_url(database_url).set(host="127.0.0.1", port=1).render_as_string(False),
        connect_args={"connect_timeout": 5},
    )
    try:
        with pytest.raises(CatalogUnavailableError) as info, transaction(engine):
            pytest.fail("a transaction began without a server")
        assert isinstance(info.value.__cause__, psycopg.OperationalError)
        with pytest.raises(CatalogUnavailableError) as info:
            dedicated_connection(engine)
        assert isinstance(info.value.__cause__, psycopg.OperationalError)
    finally:
        engine.dispose()


def test_a_dedicated_connection_leaves_the_pool_in_autocommit(sa_engine: sa.Engine) -> None:
    connection = dedicated_connection(sa_engine)
    try:
        assert connection.autocommit
        assert sa_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        connection.execute("SELECT 1")
    finally:
        connection.close()

"""How database errors come back (``distribution.database.translate_error``), from real errors of a
real server: a value the server refuses is a data error, which a retry cannot fix; only a lost or
refused connection is unavailability."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from distribution import (
    CatalogDataError,
    CatalogStore,
    CatalogUnavailableError,
    DistributionError,
)
from distribution.catalog.transactions import driver_cursor, driver_transaction, transaction
from distribution.database import create_engine, translate_error

if TYPE_CHECKING:
    from conftest import NewRole

#: What a reader is granted (README.md, "Roles and privileges"), as NewRole grants.
READER_GRANTS = (
    'GRANT CONNECT ON DATABASE "{database}" TO "{role}"',
    'GRANT USAGE ON SCHEMA public TO "{role}"',
    'GRANT SELECT ON distribution_meta, distribution_routes, distribution_history TO "{role}"',
)

#: Past PostgreSQL's B-tree row limit (about 2,700 bytes), once random: it does not compress.
PAST_THE_INDEX = 3000


@pytest.fixture
def sa_engine(database_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


def _indexed_table(execute: Any) -> None:
    execute("CREATE TEMPORARY TABLE bounds (bound bytea PRIMARY KEY) ON COMMIT DROP")


def test_a_key_past_the_index_limit_is_a_data_error_through_sqlalchemy(
    sa_engine: sa.Engine,
) -> None:
    key = os.urandom(PAST_THE_INDEX)
    with pytest.raises(CatalogDataError) as info, transaction(sa_engine) as connection:
        _indexed_table(connection.exec_driver_sql)
        connection.execute(sa.text("INSERT INTO bounds VALUES (:key)"), {"key": key})
    _assert_data_error(info.value, "54000", psycopg.errors.ProgramLimitExceeded)
    assert "index row" in str(info.value)
    with transaction(sa_engine, read_only=True) as connection:  # the pool is still fine
        assert connection.exec_driver_sql("SELECT 1").scalar_one() == 1


def test_a_key_past_the_index_limit_is_a_data_error_through_the_driver(
    sa_engine: sa.Engine,
) -> None:
    key = os.urandom(PAST_THE_INDEX)
    with pytest.raises(CatalogDataError) as info, driver_transaction(sa_engine) as cursor:
        _indexed_table(cursor.execute)
        cursor.execute("INSERT INTO bounds VALUES (%s)", [key])
    _assert_data_error(info.value, "54000", psycopg.errors.ProgramLimitExceeded)
    with driver_transaction(sa_engine) as cursor:
        assert cursor.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize(
    ("query", "sqlstate", "cause"),
    [
        ("SELECT 2147483647::integer + 1", "22003", psycopg.errors.NumericValueOutOfRange),
        ("SELECT 'seven'::integer", "22P02", psycopg.errors.InvalidTextRepresentation),
        ("SELECT 1 / 0", "22012", psycopg.errors.DivisionByZero),
        ("SELECT repeat('x', 1100000000)", "54000", psycopg.errors.ProgramLimitExceeded),
    ],
    ids=["out of range", "not a number", "division by zero", "string past 1 GB"],
)
def test_values_the_server_refuses_are_data_errors(
    sa_engine: sa.Engine, query: str, sqlstate: str, cause: type[psycopg.Error]
) -> None:
    with pytest.raises(CatalogDataError) as info, transaction(sa_engine) as connection:
        driver_cursor(connection).execute(query)
    _assert_data_error(info.value, sqlstate, cause)


def test_a_value_the_driver_refuses_is_a_data_error(sa_engine: sa.Engine) -> None:
    with pytest.raises(CatalogDataError) as info, transaction(sa_engine) as connection:
        driver_cursor(connection).execute("SELECT %s::text", ["a\x00b"])
    assert info.value.sqlstate is None
    assert isinstance(info.value.__cause__, psycopg.DataError)


def _assert_data_error(error: CatalogDataError, sqlstate: str, cause: type[Exception]) -> None:
    assert isinstance(error, ValueError)
    assert not isinstance(error, ConnectionError)
    assert error.sqlstate == sqlstate
    assert sqlstate in str(error)
    assert isinstance(error.__cause__, cause)


def test_a_statement_timeout_is_not_unavailability(sa_engine: sa.Engine) -> None:
    """The server answered, and will again: retrying as if it were unreachable is wrong."""
    with pytest.raises(DistributionError) as info, transaction(sa_engine) as connection:
        connection.exec_driver_sql("SET LOCAL statement_timeout = 50")
        connection.exec_driver_sql("SELECT pg_sleep(10)")
    assert not isinstance(info.value, (CatalogUnavailableError, ValueError))
    assert "57014" in str(info.value)
    assert isinstance(info.value.__cause__, psycopg.errors.QueryCanceled)


def test_a_terminated_backend_is_unavailability(database_url: str) -> None:
    with (
        psycopg.connect(database_url, autocommit=True) as victim,
        psycopg.connect(database_url, autocommit=True) as admin,
    ):
        pid = victim.info.backend_pid
        assert admin.execute("SELECT pg_terminate_backend(%s, 30000)", [pid]).fetchone() == (True,)
        with pytest.raises(psycopg.OperationalError) as raised:
            victim.execute("SELECT 1")
    translated = translate_error(raised.value)
    assert isinstance(translated, CatalogUnavailableError)
    assert isinstance(translated, ConnectionError)


def test_a_refused_connection_is_unavailability(database_url: str) -> None:
    with pytest.raises(psycopg.OperationalError) as raised:
        psycopg.connect(database_url, port=1, connect_timeout=5)
    assert isinstance(translate_error(raised.value), CatalogUnavailableError)


def test_too_many_connections_is_unavailability(database_url: str, new_role: NewRole) -> None:
    """A full server, or a role at its connection limit (SQLSTATE 53300): trying again later
    may succeed, as after any refused connection."""
    url = new_role("tier1_limited", database_url, READER_GRANTS)
    role = make_url(url).username
    with psycopg.connect(database_url, autocommit=True) as owner:
        owner.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT 0')
    with pytest.raises(psycopg.OperationalError) as raised:
        psycopg.connect(url)
    assert "too many connections" in str(raised.value)
    assert isinstance(translate_error(raised.value), CatalogUnavailableError)
    with CatalogStore.from_url(url) as store, pytest.raises(CatalogUnavailableError):
        store.version()
    # With its SQLSTATE, as a server sends it after the session began (a pooler, say).
    refused = psycopg.errors.TooManyConnections("sorry, too many clients already")
    assert refused.sqlstate == "53300"
    assert isinstance(translate_error(refused), CatalogUnavailableError)

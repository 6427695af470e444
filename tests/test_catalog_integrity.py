"""The database refuses what it cannot version, whoever writes.

Raw SQL runs against a real catalog as two real roles: the owner of the tables, and a role with
exactly the writer privileges README.md lists. Each refused statement must leave every row as it
was (down to its physical identity), reach the caller as the library's own error, and leave the
catalog writable by the library.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import psycopg.errors
import pytest
from chains import chain

from distribution import (
    CatalogDigestWriteError,
    CatalogHistoryRemovalError,
    CatalogPermissionError,
    CatalogUnversionedWriteError,
    CatalogVersionStepError,
    DistributionError,
    RouteState,
)
from distribution.catalog import CatalogStore
from distribution.database import translate_error
from distribution.models import u64_to_db


@pytest.fixture
def catalog(store: CatalogStore) -> CatalogStore:
    """A catalog at version 3, with history: a save, a split, a fence."""
    store.save(0, chain(4))
    store.split_route(1, b"a", 1)
    store.set_route_state(2, RouteState.WRITE_FENCED, 2)
    return store


@pytest.fixture(params=["owner", "writer"])
def role_url(request: pytest.FixtureRequest, database_url: str) -> str:
    """The catalog's URL as its owner, then as the README's writer role."""
    if request.param == "owner":
        return database_url
    url: str = request.getfixturevalue("writer_url")
    return url


@pytest.fixture
def owner(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection as the owner, to look at the rows."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


def db_state(connection: psycopg.Connection[Any]) -> tuple[Any, ...]:
    """Every row of the catalog with its physical identity (xmin, ctid)."""
    return tuple(
        connection.execute(f"SELECT *, xmin::text, ctid::text FROM {table} ORDER BY 1, 2").fetchall()
        for table in ("distribution_meta", "distribution_routes", "distribution_history")
    )


def begin_write(connection: psycopg.Connection[Any]) -> None:
    """Move the version in ``connection``'s transaction, as every write must."""
    connection.execute("SELECT distribution_begin_write(version) FROM distribution_meta")


def assert_refused(
    url: str,
    owner: psycopg.Connection[Any],
    statements: Sequence[tuple[str, Sequence[Any]]],
    error: type[DistributionError],
) -> None:
    """Run ``statements`` in one transaction on ``url``: the last one must fail with ``error``'s
    SQLSTATE (or, for the writer, a missing privilege) and change nothing."""
    before = db_state(owner)
    with psycopg.connect(url) as connection:
        *setup, (refused, params) = statements
        for statement, setup_params in setup:
            connection.execute(statement, setup_params or None)
        with pytest.raises(psycopg.Error) as info:
            connection.execute(refused, params or None)
        connection.rollback()
    translated = translate_error(info.value)
    assert isinstance(translated, error), (refused, info.value)
    if error.sqlstate is not None:
        assert info.value.sqlstate == error.sqlstate
    assert db_state(owner) == before


def assert_still_writable(store: CatalogStore) -> None:
    """The library's writes go on from the version the catalog holds, history contiguous."""
    version = store.version()
    split = store.split_route(3, b"k000002x", version)
    assert split.version == version + 1
    assert [e.version for e in store.history()] == list(range(1, version + 2))


#: The raw writes an outside report found accepted and never noticed, and the error each gets:
#: (statement, parameters, error as the owner, error as the writer).
REPORTED_RAW_WRITES = [
    pytest.param(
        "DELETE FROM distribution_routes WHERE route_id = %s AND valid_to IS NULL",
        [u64_to_db(3)],
        CatalogHistoryRemovalError,
        CatalogHistoryRemovalError,
        id="delete-a-live-route",
    ),
    pytest.param(
        "UPDATE distribution_routes SET group_id = %s WHERE route_id = %s AND valid_to IS NULL",
        [u64_to_db(9), u64_to_db(3)],
        CatalogUnversionedWriteError,
        CatalogUnversionedWriteError,
        id="change-a-group-in-place",
    ),
    pytest.param(
        "TRUNCATE distribution_routes",
        [],
        CatalogHistoryRemovalError,
        CatalogPermissionError,  # the writer was never granted TRUNCATE
        id="truncate-the-routes",
    ),
    pytest.param(
        "DELETE FROM distribution_history WHERE version <= %s",
        [u64_to_db(2)],
        CatalogHistoryRemovalError,
        CatalogHistoryRemovalError,
        id="delete-history",
    ),
    pytest.param(
        "UPDATE distribution_meta SET version = version - 3",
        [],
        CatalogVersionStepError,
        CatalogVersionStepError,
        id="version-minus-3",
    ),
]


@pytest.mark.parametrize(("statement", "params", "as_owner", "as_writer"), REPORTED_RAW_WRITES)
def test_the_reported_raw_writes_are_refused(
    catalog: CatalogStore,
    role_url: str,
    database_url: str,
    owner: psycopg.Connection[Any],
    statement: str,
    params: list[Any],
    as_owner: type[DistributionError],
    as_writer: type[DistributionError],
) -> None:
    error = as_owner if role_url == database_url else as_writer
    assert_refused(role_url, owner, [(statement, params)], error)
    assert_still_writable(catalog)


#: More raw writes the version would not count, each refused: (statements, error). The last
#: statement is the refused one; those before it run in the same transaction.
OTHER_RAW_WRITES = [
    pytest.param(
        [
            (
                "INSERT INTO distribution_history (version, operation, arguments, next_route_id) "
                "SELECT version + 1, 'forged', '{}', next_route_id FROM distribution_meta",
                [],
            )
        ],
        CatalogUnversionedWriteError,
        id="insert-history",
    ),
    pytest.param(
        [("UPDATE distribution_history SET actor = 'mallory'", [])],
        CatalogUnversionedWriteError,
        id="rewrite-history",
    ),
    pytest.param(
        [
            (
                'INSERT INTO distribution_routes (route_id, valid_from, start, "end", group_id, '
                "state, parent_route_id) SELECT %s, version, 'zz', NULL, %s, 0, %s "
                "FROM distribution_meta",
                [u64_to_db(99), u64_to_db(1), u64_to_db(0)],
            )
        ],
        CatalogUnversionedWriteError,
        id="insert-a-route",
    ),
    pytest.param(
        [("DELETE FROM distribution_routes WHERE valid_to IS NOT NULL", [])],
        CatalogHistoryRemovalError,
        id="delete-retired-rows-in-the-window",
    ),
    pytest.param(
        [("UPDATE distribution_meta SET version = version + 2", [])],
        CatalogVersionStepError,
        id="skip-a-version",
    ),
    pytest.param(
        [("UPDATE distribution_meta SET next_route_id = next_route_id + 10", [])],
        CatalogUnversionedWriteError,
        id="raise-the-counter",
    ),
    pytest.param(
        [("UPDATE distribution_meta SET write_xact_id = pg_current_xact_id()::text::bigint", [])],
        CatalogUnversionedWriteError,
        id="forge-the-writing-transaction",
    ),
    pytest.param(
        [
            ("SELECT distribution_begin_write(version) FROM distribution_meta", []),
            ("UPDATE distribution_meta SET digest = 42", []),
        ],
        CatalogDigestWriteError,
        id="set-the-digest-in-a-write",
    ),
    pytest.param(
        [
            ("SELECT distribution_begin_write(version) FROM distribution_meta", []),
            ("UPDATE distribution_meta SET version = version + 1", []),
            ("UPDATE distribution_meta SET version = version - 1", []),
        ],
        CatalogVersionStepError,
        id="move-back-in-a-write",
    ),
    pytest.param(
        [
            ("SELECT distribution_begin_write(version) FROM distribution_meta", []),
            ("DELETE FROM distribution_routes WHERE route_id = %s", [u64_to_db(3)]),
        ],
        CatalogHistoryRemovalError,
        id="delete-a-route-in-a-write",
    ),
    pytest.param(
        [
            ("SELECT distribution_begin_write(version) FROM distribution_meta", []),
            ("DELETE FROM distribution_history WHERE version = %s", [u64_to_db(3)]),
        ],
        CatalogHistoryRemovalError,
        id="delete-history-in-a-write",
    ),
    pytest.param(
        [
            ("UPDATE distribution_meta SET history_floor = %s", [u64_to_db(2)]),
            ("UPDATE distribution_meta SET history_floor = %s", [u64_to_db(1)]),
        ],
        CatalogHistoryRemovalError,
        id="lower-the-floor",
    ),
    pytest.param(
        [
            ("UPDATE distribution_meta SET history_floor = %s", [u64_to_db(2)]),
            ("DELETE FROM distribution_history WHERE version = %s", [u64_to_db(2)]),
        ],
        CatalogHistoryRemovalError,
        id="delete-the-floor-entry",
    ),
]


@pytest.mark.parametrize(("statements", "error"), OTHER_RAW_WRITES)
def test_other_writes_the_version_would_not_count_are_refused(
    catalog: CatalogStore,
    role_url: str,
    owner: psycopg.Connection[Any],
    statements: list[tuple[str, list[Any]]],
    error: type[DistributionError],
) -> None:
    assert_refused(role_url, owner, statements, error)
    assert_still_writable(catalog)


def test_the_owner_cannot_truncate_the_history_either(
    catalog: CatalogStore, owner: psycopg.Connection[Any], database_url: str
) -> None:
    truncate = [("TRUNCATE distribution_history", [])]
    assert_refused(database_url, owner, truncate, CatalogHistoryRemovalError)


def test_a_raw_write_that_moves_the_version_is_accepted(
    catalog: CatalogStore, writer_url: str
) -> None:
    """The guards ask for a versioned write, not for the library: raw SQL that moves the version
    through distribution_begin_write may change routes, and the digest follows."""
    with psycopg.connect(writer_url) as connection:
        begin_write(connection)
        connection.execute(
            "UPDATE distribution_routes SET valid_to = m.version FROM distribution_meta m "
            "WHERE route_id = %s AND valid_to IS NULL",
            [u64_to_db(4)],
        )
    snapshot = catalog.snapshot()
    assert snapshot.version == 4
    assert 4 not in {r.route_id for r in snapshot.routes}
    assert catalog.head().digest == snapshot.digest


def test_pruning_by_hand_raises_the_floor_first(
    catalog: CatalogStore, writer_url: str, owner: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(writer_url) as connection:
        connection.execute("UPDATE distribution_meta SET history_floor = %s", [u64_to_db(3)])
        connection.execute("DELETE FROM distribution_history WHERE version < %s", [u64_to_db(3)])
        connection.execute("DELETE FROM distribution_routes WHERE valid_to <= %s", [u64_to_db(3)])
    assert [e.version for e in catalog.history()] == [3]
    assert catalog.snapshot_at(3) == catalog.snapshot()


def test_a_write_begun_in_a_savepoint_counts_once_released(
    catalog: CatalogStore, writer_url: str, owner: psycopg.Connection[Any]
) -> None:
    """The writing transaction is the top-level one: a savepoint (or a PL/pgSQL exception block)
    that moved the version and was released leaves the transaction versioned; one rolled back
    takes the version move with it, and the guards refuse what follows."""
    change_group = (
        "UPDATE distribution_routes SET group_id = %s WHERE route_id = %s AND valid_to IS NULL"
    )
    assert_refused(
        writer_url,
        owner,
        [
            ("SAVEPOINT s", []),
            ("SELECT distribution_begin_write(version) FROM distribution_meta", []),
            ("ROLLBACK TO SAVEPOINT s", []),
            (change_group, [u64_to_db(9), u64_to_db(3)]),
        ],
        CatalogUnversionedWriteError,
    )
    with psycopg.connect(writer_url) as connection:
        connection.execute("SAVEPOINT s")
        begin_write(connection)
        connection.execute("RELEASE SAVEPOINT s")
        connection.execute(change_group, [u64_to_db(9), u64_to_db(3)])
    assert catalog.version() == 4
    assert {r.route_id: r.group_id for r in catalog.snapshot().routes}[3] == 9


def test_a_concurrent_write_does_not_version_another_transaction(
    catalog: CatalogStore, writer_url: str, owner: psycopg.Connection[Any]
) -> None:
    """While a write holds the version moved but uncommitted, a second transaction's raw change
    is still refused: the mark names the writing transaction only."""
    with psycopg.connect(writer_url) as writing:
        begin_write(writing)
        assert_refused(
            writer_url,
            owner,
            [("UPDATE distribution_history SET actor = 'mallory'", [])],
            CatalogUnversionedWriteError,
        )
        writing.rollback()
    assert catalog.version() == 3

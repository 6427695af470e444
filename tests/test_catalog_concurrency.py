"""The catalog under concurrent writers, refused privileges, dropped connections, missing schemas.

Faults are real: competing transactions on one PostgreSQL catalog, a role without write
privileges, backends killed with ``pg_terminate_backend``, a query still running when its caller
is interrupted, databases not migrated or migrated to an older revision. Claims about what was (not) written are
checked with raw SQL over a separate psycopg connection.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import psycopg.errors
import pytest
from chains import chain
from sqlalchemy.engine import make_url

from distribution import (
    CatalogGroupIDRequiredError,
    CatalogNotMigratedError,
    CatalogPermissionError,
    CatalogSnapshot,
    CatalogUnavailableError,
    CatalogVersionMismatchError,
    RouteDescriptor,
    RouteState,
)
from distribution.catalog import CatalogStore
from distribution.catalog.transactions import driver_cursor, transaction
from distribution.migrator import migrate

THREADS = 8
ATTEMPTS = 50
REPEATS = 10


@pytest.fixture
def raw(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


def column(raw: psycopg.Connection[Any], query: str, params: Sequence[Any] = ()) -> list[Any]:
    return [row[0] for row in raw.execute(query, params or None).fetchall()]


def db_state(raw: psycopg.Connection[Any]) -> tuple[Any, ...]:
    return (
        raw.execute("SELECT *, xmin::text, ctid::text FROM distribution_meta").fetchall(),
        raw.execute(
            "SELECT *, xmin::text, ctid::text FROM distribution_routes ORDER BY route_id, valid_from"
        ).fetchall(),
        raw.execute("SELECT version, operation FROM distribution_history ORDER BY 1").fetchall(),
    )


# --------------------------------------------------------------------------------------------
# Competing writers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("repeat", range(REPEATS))
def test_concurrent_saves_from_the_version_just_read(
    store: CatalogStore, raw: psycopg.Connection[Any], repeat: int
) -> None:
    base = store.save(0, chain(THREADS))
    successes: list[tuple[int, int, CatalogSnapshot]] = []
    failures: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    observed: list[CatalogSnapshot] = []
    lock = threading.Lock()
    start = threading.Barrier(THREADS + 1)
    writers_done = threading.Event()

    def write(thread: int) -> None:
        route_id = thread + 1
        start.wait()
        for attempt in range(ATTEMPTS):
            try:
                snapshot = store.snapshot()
                group = 1000 * route_id + attempt + 1  # unique to this thread and attempt
                routes = [
                    r._replace(group_id=group) if r.route_id == route_id else r
                    for r in snapshot.routes
                ]
                saved = store.save(snapshot.version, routes)
            except CatalogVersionMismatchError:
                with lock:
                    failures.append((thread, attempt))
            except BaseException as exc:
                with lock:
                    errors.append(exc)
                return
            else:
                assert saved.version == snapshot.version + 1
                with lock:
                    successes.append((thread, attempt, saved))

    def read() -> None:
        start.wait()
        while not writers_done.is_set():
            try:
                observed.append(store.snapshot())
            except BaseException as exc:
                errors.append(exc)
                return

    writers = [threading.Thread(target=write, args=(t,)) for t in range(THREADS)]
    reader = threading.Thread(target=read)
    for thread in [*writers, reader]:
        thread.start()
    for thread in writers:
        thread.join(timeout=240)
    writers_done.set()
    reader.join(timeout=60)
    assert not any(t.is_alive() for t in [*writers, reader]), "a thread hung"
    assert errors == []
    assert len(successes) + len(failures) == THREADS * ATTEMPTS
    assert failures, "the writers never raced: nothing here was tested"

    # Every success has its own version, and together they are exactly the next N versions.
    n = len(successes)
    versions = sorted(saved.version for _, _, saved in successes)
    assert versions == list(range(2, n + 2))
    by_version = {1: base, **{saved.version: saved for _, _, saved in successes}}

    # The database holds exactly one write per success: failures wrote nothing.
    assert column(raw, "SELECT distribution_u64(version) FROM distribution_history ORDER BY 1") == [
        1,
        *versions,
    ]
    assert column(raw, "SELECT distribution_u64(version) FROM distribution_meta") == [n + 1]
    opened = column(raw, "SELECT distribution_u64(valid_from) FROM distribution_routes ORDER BY 1")
    closed = column(
        raw,
        "SELECT distribution_u64(valid_to) FROM distribution_routes "
        "WHERE valid_to IS NOT NULL ORDER BY 1",
    )
    assert opened == [1] * THREADS + versions
    assert closed == versions

    # The final catalog is the last winner's, and every version reads back exactly.
    last = by_version[n + 1]
    assert store.snapshot() == last
    for version, saved in by_version.items():
        assert store.snapshot_at(version).routes == saved.routes
    # Only thread t changes route t + 1: its group is that of the thread's last success.
    for thread in range(THREADS):
        mine = [(saved.version, attempt) for t, attempt, saved in successes if t == thread]
        expected = 1000 * (thread + 1) + max(mine)[1] + 1 if mine else 1
        assert _group_of(last, thread + 1) == expected

    # A concurrent reader only ever saw whole versions, in order.
    assert [o.version for o in observed] == sorted(o.version for o in observed)
    for snapshot in observed:
        assert snapshot.routes == by_version[snapshot.version].routes
        assert snapshot.read_ts == snapshot.version


def _group_of(snapshot: CatalogSnapshot, route_id: int) -> int:
    (route,) = [r for r in snapshot.routes if r.route_id == route_id]
    return route.group_id


# --------------------------------------------------------------------------------------------
# Privileges
# --------------------------------------------------------------------------------------------


def test_a_read_only_role_can_read_but_not_write(
    server_url: str, database_url: str, raw: psycopg.Connection[Any], store: CatalogStore
) -> None:
    store.save(0, chain(3))
    store.save(1, chain(4))
    role = f"reader_{uuid.uuid4().hex[:12]}"
    reader_url = make_url(database_url).set(username=role).render_as_string(hide_password=False)
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        raw.execute(f'GRANT USAGE ON SCHEMA public TO "{role}"')
        raw.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{role}"')
        before = db_state(raw)
        with CatalogStore.from_url(reader_url) as reader:
            assert reader.snapshot() == store.snapshot()
            assert reader.snapshot_at(1) == store.snapshot_at(1)
            assert reader.changes_since(0) == store.changes_since(0)
            assert reader.next_route_id() == 5
            assert [e.version for e in reader.history()] == [1, 2]
            writes = [
                lambda: reader.save(2, chain(5)),
                lambda: reader.save(2, []),
                lambda: reader.split_route(1, b"a", 2),
                lambda: reader.set_route_state(1, RouteState.WRITE_FENCED, 2),
                lambda: reader.prune_history(keep_versions=1),
            ]
            for write in writes:
                with pytest.raises(CatalogPermissionError) as info:
                    write()
                assert isinstance(info.value, PermissionError)
                assert isinstance(info.value.__cause__, psycopg.errors.InsufficientPrivilege)
                # The refused write left the connection usable.
                assert reader.version() == 2
        assert db_state(raw) == before
        assert store.snapshot().version == 2
    finally:
        raw.execute(f'DROP OWNED BY "{role}"')
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_the_documented_writer_role_can_do_every_write(
    writer_url: str, store: CatalogStore
) -> None:
    """The writer privileges README.md lists are enough for every write, pruning included."""
    store.save(0, chain(3))
    with CatalogStore.from_url(writer_url) as writer:
        version = writer.save(1, chain(4)).version
        version = writer.split_route(1, b"a", version).version
        version = writer.set_route_state(2, RouteState.WRITE_FENCED, version).version
        version = writer.move_route(2, 9, version).version
        assert writer.prune_history(keep_versions=1) == version
    assert store.snapshot().version == version


# --------------------------------------------------------------------------------------------
# Lost, interrupted and missing connections; missing schemas
# --------------------------------------------------------------------------------------------

APPLICATION = "distribution-test-store"


def terminate_store_backends(raw: psycopg.Connection[Any]) -> int:
    """Kill every backend of the store (by application name), waiting until each is gone."""
    killed = column(
        raw,
        "SELECT pg_terminate_backend(pid, 30000) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = %s AND pid <> pg_backend_pid()",
        [APPLICATION],
    )
    assert all(killed)
    return len(killed)


CALLS: list[Any] = [
    pytest.param(lambda s, v: s.snapshot(), id="snapshot"),
    pytest.param(lambda s, v: s.version(), id="version"),
    pytest.param(lambda s, v: s.snapshot_at(v), id="snapshot_at"),
    pytest.param(lambda s, v: s.changes_since(0), id="changes_since"),
    pytest.param(lambda s, v: s.save(v, chain(v + 1)), id="save"),
    pytest.param(
        lambda s, v: s.set_route_state(2, RouteState.WRITE_FENCED if v == 1 else 0, v),
        id="set_route_state",
    ),
]


@pytest.mark.parametrize("pooled", [1, 4], ids=["one-pooled", "four-pooled"])
@pytest.mark.parametrize("call", CALLS)
def test_terminated_backends_are_replaced(
    database_url: str, raw: psycopg.Connection[Any], call: Any, pooled: int
) -> None:
    with CatalogStore.from_url(
        database_url, connect_args={"application_name": APPLICATION}
    ) as store:
        store.save(0, chain(2))
        # Fill the pool with idle connections, then kill them all.
        held = [store.sa_engine.raw_connection() for _ in range(pooled)]
        for connection in held:
            connection.close()
        assert terminate_store_backends(raw) == pooled
        try:
            call(store, 1)
        except CatalogUnavailableError as exc:
            assert isinstance(exc, ConnectionError)
            assert isinstance(exc.__cause__, psycopg.OperationalError)
        except psycopg.Error as exc:
            pytest.fail(f"a raw psycopg error leaked: {exc!r}")
        # The call after that succeeds, on a fresh connection.
        version = column(raw, "SELECT distribution_u64(version) FROM distribution_meta")[0]
        call(store, int(version))


def test_a_lost_connection_mid_session_is_retried_by_the_next_call(
    database_url: str, raw: psycopg.Connection[Any]
) -> None:
    with CatalogStore.from_url(
        database_url, connect_args={"application_name": APPLICATION}
    ) as store:
        expected = store.save(0, chain(3))
        for _ in range(3):
            terminate_store_backends(raw)
            with contextlib.suppress(CatalogUnavailableError):
                assert store.snapshot() == expected
            assert store.snapshot() == expected


def test_an_unreachable_server_is_unavailable(database_url: str) -> None:
    url = make_url(database_url).set(host="127.0.0.1", port=1, query={"connect_timeout": "5"})
    with CatalogStore.from_url(url.render_as_string(hide_password=False)) as store:
        for read in (store.snapshot, store.version, lambda: store.save(0, chain(1))):
            with pytest.raises(CatalogUnavailableError) as info:
                read()
            assert isinstance(info.value, ConnectionError)
            assert not isinstance(info.value, psycopg.Error)


def test_bad_routes_are_refused_before_the_server_is_reached(database_url: str) -> None:
    url = make_url(database_url).set(host="127.0.0.1", port=1, query={"connect_timeout": "5"})
    bad = [RouteDescriptor(route_id=1, start=b"", end=None, group_id=0)]
    with CatalogStore.from_url(url.render_as_string(hide_password=False)) as store:
        with pytest.raises(CatalogGroupIDRequiredError):
            store.save(3, bad)
        with pytest.raises(CatalogUnavailableError):
            store.save(3, chain(2))


def test_a_missing_database_is_unavailable(database_url: str) -> None:
    url = make_url(database_url).set(database=f"missing_{uuid.uuid4().hex[:8]}")
    with (
        CatalogStore.from_url(url.render_as_string(hide_password=False)) as store,
        pytest.raises(CatalogUnavailableError),
    ):
        store.snapshot()


def test_an_unmigrated_database_gives_a_library_error(empty_database_url: str) -> None:
    with CatalogStore.from_url(empty_database_url) as store:
        for call in (store.snapshot, lambda: store.save(0, chain(1)), store.history):
            with pytest.raises(CatalogNotMigratedError, match="migrate") as info:
                call()
            assert isinstance(info.value.__cause__, psycopg.errors.UndefinedTable)
        # The store stays usable: nothing is left half-done on its connections.
        with pytest.raises(CatalogNotMigratedError):
            store.version()


def test_a_schema_older_than_the_library_gets_a_typed_error_and_keeps_its_data(
    outdated_database_url: str,
) -> None:
    """The first revision has no route digest: reads and saves name the fix, write nothing,
    and work once the database is migrated."""
    with psycopg.connect(outdated_database_url) as connection:
        before = connection.execute("SELECT * FROM distribution_meta").fetchall()
    with CatalogStore.from_url(outdated_database_url) as store:
        for call in (store.snapshot, lambda: store.save(0, chain(2))):
            with pytest.raises(CatalogNotMigratedError, match="older than this library"):
                call()
        with psycopg.connect(outdated_database_url) as connection:
            assert connection.execute("SELECT * FROM distribution_meta").fetchall() == before
            assert connection.execute("SELECT count(*) FROM distribution_routes").fetchone() == (0,)
        migrate(outdated_database_url)
        saved = store.save(0, chain(2))
        assert store.snapshot() == saved


def test_a_transaction_interrupted_mid_query_leaves_no_busy_connection_in_the_pool(
    store: CatalogStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Ctrl-C can land while a query runs. The connection, still busy, is thrown away rather
    than pooled: the pool's own reset would fail on it and log a traceback."""
    expected = store.save(0, chain(2))
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(KeyboardInterrupt),
        transaction(store.sa_engine) as connection,
    ):
        driver_cursor(connection).connection.pgconn.send_query(b"SELECT pg_sleep(0.2)")
        raise KeyboardInterrupt
    assert caplog.records == []
    assert store.snapshot() == expected

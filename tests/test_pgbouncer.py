"""Reading the catalog through PgBouncer in transaction mode: a real pooler (tests/pgbouncer.py).

A large fleet's services read through a pooler that gives each transaction whichever server
connection is free. A store whose ``read_url`` is such a pooler reads snapshots, changes and
heads there, and writes on the primary; a watcher given that store reads there and LISTENs on
the primary. psycopg prepares a statement once a connection has run it five times
(``prepare_threshold``); a pooler without prepared statement support sends that PREPARE to the
server connection of the moment, where another client's statement of the same name may be, or
from where the next transaction will not run: README.md's ``connect_args={"prepare_threshold":
None}`` is what makes reads through it work.

The pooler logs in as a reader (the privileges README.md lists): the writes that succeed went to
the primary.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import psycopg
import psycopg.errors
import pytest
from pgbouncer import PgBouncer, pgbouncer
from waiting import WAIT, wait_until

from distribution import CatalogStore, CatalogWatcher, Engine
from distribution.codec import routes_digest
from distribution.errors import CatalogPermissionError, CatalogPreparedStatementError
from distribution.types import CatalogSnapshot, RouteDescriptor

if TYPE_CHECKING:
    from conftest import NewRole

#: psycopg's default: a connection prepares a statement it runs this many times.
_PREPARE_THRESHOLD = 5
#: README.md's advice for a pooler in transaction mode without prepared statement support.
_UNPREPARED = {"connect_args": {"prepare_threshold": None}}
#: The reader's privileges, as README.md lists them ("Roles and privileges").
_READER_GRANTS = (
    'GRANT CONNECT ON DATABASE "{database}" TO {role}',
    "GRANT USAGE ON SCHEMA public TO {role}",
    "GRANT SELECT ON distribution_meta, distribution_routes, distribution_history, "
    "distribution_alembic_version TO {role}",
)
_ROUTES = 64
_READERS = 4  # more than the pooler's server connections (2): clients share and swap them
_ROUNDS = 3 * _PREPARE_THRESHOLD  # per reader, of each read
_WRITES = 30


@pytest.fixture
def bouncer(database_url: str, new_role: NewRole) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode in front of the test catalog, logged in as a reader."""
    yield from pgbouncer(new_role("pgbouncer_reader", database_url, _READER_GRANTS))


@pytest.fixture
def seeded(database_url: str) -> CatalogSnapshot:
    """The test catalog holding 64 routes, [b"\\x00", b"\\x01") and so on, written on the primary."""
    routes = [
        RouteDescriptor(
            i + 1, b"" if i == 0 else bytes([i]), None if i == _ROUTES - 1 else bytes([i + 1]), 1
        )
        for i in range(_ROUTES)
    ]
    with CatalogStore.from_url(database_url) as primary:
        return primary.save(0, routes)


def _regrouped(snapshot: CatalogSnapshot, index: int) -> list[RouteDescriptor]:
    """The snapshot's routes with one of them moved to the next group."""
    routes = list(snapshot.routes)
    route = routes[index % len(routes)]
    routes[index % len(routes)] = route._replace(group_id=route.group_id % 7 + 1)
    return routes


def test_default_prepare_threshold_fails_behind_pgbouncer_in_transaction_mode(
    database_url: str, bouncer: PgBouncer, seeded: CatalogSnapshot
) -> None:
    """Two services reading through one pooler, one after the other: the second's PREPARE of
    psycopg's first statement name lands on the server connection holding the first's."""
    with psycopg.connect(database_url) as connection:
        assert connection.prepare_threshold == _PREPARE_THRESHOLD
    with (
        CatalogStore.from_url(database_url, read_url=bouncer.url) as first,
        CatalogStore.from_url(database_url, read_url=bouncer.url) as second,
    ):
        for _ in range(_PREPARE_THRESHOLD + 1):
            assert first.head().version == seeded.version
        with pytest.raises(CatalogPreparedStatementError) as refused:
            for _ in range(_PREPARE_THRESHOLD + 1):
                second.head()
    assert refused.value.sqlstate == "42P05"
    assert 'prepared statement "_pg3_0" already exists' in str(refused.value)
    assert "prepare_threshold=None" in str(refused.value)
    # Unprepared, both read on, whichever server connection each transaction gets.
    with (
        CatalogStore.from_url(database_url, read_url=bouncer.url, **_UNPREPARED) as first,
        CatalogStore.from_url(database_url, read_url=bouncer.url, **_UNPREPARED) as second,
    ):
        for _ in range(3 * _PREPARE_THRESHOLD):
            assert first.head() == second.head()
            assert first.snapshot() == second.snapshot() == seeded
            assert first.changes_since(0) == second.changes_since(0)


def test_racing_reads_through_pgbouncer_in_transaction_mode(
    database_url: str, bouncer: PgBouncer, seeded: CatalogSnapshot
) -> None:
    """Readers race a writer: every snapshot, change feed (incremental and reset) and head read
    through the pooler is one the writer wrote on the primary."""
    with (
        CatalogStore.from_url(bouncer.url) as through_pooler,
        pytest.raises(CatalogPermissionError),  # the pooler's login is a reader's
    ):
        through_pooler.save(seeded.version, _regrouped(seeded, 0))
    with CatalogStore.from_url(database_url, read_url=bouncer.url, **_UNPREPARED) as store:
        # Every version's digest, as written on the primary.
        written = {seeded.version: seeded.digest}
        latest = seeded
        for index in range(2):
            latest = store.save(latest.version, _regrouped(latest, index))
            written[latest.version] = latest.digest
        # The seed's version is below the history kept now: a feed from there is a reset.
        assert store.prune_history(1) > seeded.version
        transactions = bouncer.transactions()
        start = threading.Barrier(_READERS + 1)
        errors: list[BaseException] = []
        seen: list[tuple[int, int | None]] = []  # (version, digest) of every read

        def write() -> None:
            nonlocal latest
            try:
                start.wait()
                for index in range(2, 2 + _WRITES):
                    latest = store.save(latest.version, _regrouped(latest, index))
                    written[latest.version] = latest.digest
                    if index % 5 == 0:
                        store.prune_history(2)  # the readers' feeds fall behind, and reset
            except BaseException as exc:
                errors.append(exc)

        def read() -> None:
            try:
                engine = Engine()
                start.wait()
                engine.apply_snapshot(store.snapshot())
                for _ in range(_ROUNDS):
                    snapshot = store.snapshot()
                    assert snapshot.digest == routes_digest(snapshot.routes)
                    head = store.head()
                    assert not head.standby
                    feed = store.changes_since(engine.version)
                    if feed.reset is not None:
                        engine.apply_snapshot(feed.reset)
                    else:
                        engine.apply_changes(feed.changes)
                    assert feed.head is not None
                    assert (engine.version, engine.digest) == (feed.head.version, feed.head.digest)
                    reset = store.changes_since(seeded.version).reset
                    assert reset is not None
                    assert reset.digest == routes_digest(reset.routes)
                    seen.extend(
                        (read.version, read.digest) for read in (snapshot, head, feed.head, reset)
                    )
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=write, name="pgbouncer-writer")] + [
            threading.Thread(target=read, name=f"pgbouncer-reader-{i}") for i in range(_READERS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT * 4)
        assert not any(thread.is_alive() for thread in threads)
        if errors:
            raise errors[0]
        assert latest.version == seeded.version + 2 + _WRITES
        assert store.primary.snapshot() == latest
        assert len(seen) == _READERS * _ROUNDS * 4
        for version, digest in seen:
            assert written[version] == digest, version
        # Each read was at least one transaction through the pooler (beside the first reads).
        assert bouncer.transactions() - transactions >= len(seen)


def test_watchers_read_every_change_through_pgbouncer(
    database_url: str, bouncer: PgBouncer, seeded: CatalogSnapshot
) -> None:
    """Two services' watchers, trusting no notification, read each of 20 writes through one
    pooler; their notifications come from LISTEN on the primary (a pooler in transaction mode
    cannot keep a LISTEN)."""
    with (
        CatalogStore.from_url(database_url, read_url=bouncer.url, **_UNPREPARED) as store,
        CatalogStore.from_url(database_url, read_url=bouncer.url, **_UNPREPARED) as other,
        CatalogStore.from_url(database_url) as primary,
    ):
        watchers = [
            CatalogWatcher(catalog, Engine(), trust_notifications=False)
            for catalog in (store, other)
        ]
        with watchers[0], watchers[1]:
            wait_until(
                lambda: all(w.listening and w.engine.version == seeded.version for w in watchers),
                "the first reads",
            )
            syncs = [w.syncs for w in watchers]
            notifications = [w.notifications for w in watchers]
            transactions = bouncer.transactions()
            version = seeded.version
            for index in range(20):
                # Route index + 1 is [index, index + 1): split it at index + 0x80.
                version = primary.split_route(index + 1, bytes([index, 0x80]), version).version
                for watcher in watchers:
                    assert watcher.wait_for(version, WAIT), f"{watcher.name} missed {version}"
            # None applied a change from a notification: a catalog read a version, at least.
            assert min(w.syncs - before for w, before in zip(watchers, syncs, strict=True)) >= 20
            assert bouncer.transactions() - transactions >= 40
            assert min(
                w.notifications - before for w, before in zip(watchers, notifications, strict=True)
            ) >= 20
            assert [w.last_error for w in watchers] == [None, None]
        head = primary.head()
        assert head.version == version
        for watcher in watchers:
            assert (watcher.engine.version, watcher.engine.digest) == (version, head.digest)
            assert watcher.engine.route_count == _ROUTES + 20

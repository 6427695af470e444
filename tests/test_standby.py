"""Reading the catalog from a hot standby: a real streaming standby (tests/standby.py).

A store given a read URL reads there and writes (and LISTENs) on the primary: its reads lag as
the standby does, and ``store.primary`` reads where it writes. A watcher reads from a standby by
being given such a store (or one on the standby's URL), and its notifications from the primary
(LISTEN there, or NATS): the standby may lag, and the Engine never goes back. A write sent to a
standby is refused with CatalogReadOnlyError, and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from standby import StreamingPair, streaming_pair
from waiting import wait_until

from distribution import CatalogStore, CatalogWatcher, Engine, ensure_catalog_snapshot
from distribution.errors import (
    CatalogReadOnlyError,
    CatalogSnapshotTooOldError,
    CatalogVersionAheadError,
)
from distribution.migrator import migrate
from distribution.types import CatalogChangeSet, CatalogHead, RouteDescriptor, RouteState

_ROUTES = 300  # enough for a save moving every route to be too large for one notification


@pytest.fixture(scope="module")
def pair(server_url: str) -> Iterator[StreamingPair]:
    yield from streaming_pair(server_url)


@pytest.fixture
def stores(pair: StreamingPair) -> Iterator[tuple[CatalogStore, CatalogStore]]:
    """The primary's store and the standby's, on a catalog of 300 routes, replayed."""
    pair.resume_replay()
    with (
        CatalogStore.from_url(pair.primary_url) as primary,
        CatalogStore.from_url(pair.standby_url) as standby,
    ):
        current = primary.snapshot()
        group = current.version % 7 + 1
        routes = [
            RouteDescriptor(
                i + 1,
                b"" if i == 0 else i.to_bytes(2, "big"),
                None if i == _ROUTES - 1 else (i + 1).to_bytes(2, "big"),
                group,
            )
            for i in range(_ROUTES)
        ]
        primary.save(current.version, routes)
        pair.wait_replayed()
        yield primary, standby
    pair.resume_replay()


def _split(store: CatalogStore) -> int:
    snapshot = store.snapshot()
    route = next(r for r in snapshot.routes if r.end is not None and r.start + b"\x80" < r.end)
    return store.split_route(route.route_id, route.start + b"\x80", snapshot.version).version


def _move_every_route(store: CatalogStore) -> int:
    """A save too large for one notification: it carries the version alone."""
    snapshot = store.snapshot()
    moved = [r._replace(group_id=r.group_id % 7 + 1) for r in snapshot.routes]
    return store.save(snapshot.version, moved).version


def test_standby_reads_what_the_primary_wrote(
    pair: StreamingPair, stores: tuple[CatalogStore, CatalogStore]
) -> None:
    primary, standby = stores
    version = _split(primary)
    pair.wait_replayed()
    assert standby.snapshot() == primary.snapshot()
    on_standby, on_primary = standby.changes_since(version - 1), primary.changes_since(version - 1)
    assert on_standby.changes == on_primary.changes
    assert on_standby.head is not None and on_primary.head is not None
    assert on_standby.head[:2] == on_primary.head[:2] == tuple(primary.head()[:2])
    # The head says where it was read: a watcher keeps its Engine when a standby lags.
    assert (on_standby.head.standby, on_primary.head.standby) == (True, False)
    assert standby.head().standby and not primary.head().standby


def test_a_write_sent_to_a_standby_is_refused_as_read_only(
    pair: StreamingPair, stores: tuple[CatalogStore, CatalogStore]
) -> None:
    primary, standby = stores
    before = primary.snapshot()
    history = primary.history()
    route = before.routes[0]
    with pytest.raises(CatalogReadOnlyError, match="read-only"):
        standby.split_route(route.route_id, route.start + b"\x01", before.version)
    with pytest.raises(CatalogReadOnlyError):
        standby.save(before.version, before.routes[1:])
    # From a snapshot the standby store holds (the change alone would travel), with every
    # route changed (every route would), and named by a request id.
    held = standby.snapshot()
    regrouped = [r._replace(group_id=r.group_id % 7 + 1) for r in held.routes]
    for routes, request_id in [
        ([regrouped[0], *held.routes[1:]], None),
        (regrouped, None),
        (regrouped, "reads-standby-save"),
    ]:
        with pytest.raises(CatalogReadOnlyError):
            standby.save(held.version, routes, request_id=request_id)
    for write in (
        lambda: standby.set_route_state(route.route_id, RouteState.WRITE_FENCED, held.version),
        lambda: standby.merge_routes(route.route_id, held.routes[1].route_id, held.version),
        lambda: standby.move_route(route.route_id, 9, held.version, request_id="reads-move"),
    ):
        with pytest.raises(CatalogReadOnlyError):
            write()
    with pytest.raises(CatalogReadOnlyError):
        standby.prune_history(1)
    with pytest.raises(CatalogReadOnlyError):
        standby.listen()  # LISTEN cannot run on a standby either
    pair.wait_replayed()
    assert primary.snapshot() == before
    assert primary.history() == history
    assert standby.snapshot() == before


def test_a_store_reads_from_its_read_url_and_writes_to_the_primary(
    pair: StreamingPair, stores: tuple[CatalogStore, CatalogStore]
) -> None:
    primary, _ = stores
    with CatalogStore.from_url(pair.primary_url, read_url=pair.standby_url) as store:
        assert not store.reads_from_primary and store.primary.reads_from_primary
        before = store.snapshot()
        assert before == primary.snapshot() and before.digest is not None
        next_id = store.next_route_id()
        pair.pause_replay()
        version = _split(store)  # read on the standby, written on the primary
        # Every read lags with the standby...
        lagging = CatalogHead(before.version, before.digest, True)
        assert (store.version(), store.head(), store.snapshot()) == (before.version, lagging, before)
        assert store.next_route_id() == next_id
        assert store.changes_since(before.version) == CatalogChangeSet(head=lagging)
        assert store.history(before.version) == []
        for read in (store.changes_since, store.snapshot_at, store.next_route_id_at):
            with pytest.raises(CatalogVersionAheadError):
                read(version)
        # ... but the primary's.
        on_primary = store.primary
        assert on_primary.head() == primary.head() and not on_primary.head().standby
        assert on_primary.version() == version and on_primary.next_route_id() == next_id + 2
        assert on_primary.snapshot() == primary.snapshot() == on_primary.snapshot_at(version)
        assert [c.version for c in on_primary.changes_since(before.version).changes] == [version]
        assert [e.version for e in on_primary.history(before.version)] == [version]
        # A save from the version just written reads it where it writes: on the primary.
        moved = [r._replace(group_id=r.group_id % 7 + 1) for r in primary.snapshot().routes]
        saved = store.save(version, moved)
        assert saved.version == version + 1 and primary.snapshot() == saved
        # So do pruning and LISTEN (a standby refuses both).
        assert store.prune_history(1) == version + 1
        with pytest.raises(CatalogSnapshotTooOldError):
            on_primary.snapshot_at(version)
        store.listen().close()
        assert store.snapshot_at(before.version) == before  # the standby has not seen it yet
        assert store.version() == before.version
        pair.resume_replay()
        pair.wait_replayed()
        assert store.snapshot() == saved
        assert store.head() == CatalogHead(saved.version, primary.head().digest, True)


def test_a_lagging_standby_never_takes_an_engine_back(
    pair: StreamingPair, stores: tuple[CatalogStore, CatalogStore]
) -> None:
    primary, standby = stores
    engine = Engine()
    # Reads from the standby, notifications from the primary.
    watcher = CatalogWatcher(standby, engine, notifications=primary.listen)
    with watcher:
        wait_until(lambda: watcher.listening and engine.version == primary.version(), "start")
        pair.pause_replay()
        lagged = standby.version()
        # Small changes travel in their notifications: applied with no read of the standby.
        split = [_split(primary) for _ in range(3)]
        wait_until(lambda: engine.version == split[-1], "the notified splits")
        assert standby.version() == lagged
        # A change too large for a notification sends the watcher to the standby, which is
        # behind the Engine: nothing is applied, and the Engine keeps its version.
        moved = _move_every_route(primary)
        wait_until(
            lambda: isinstance(watcher.last_error, CatalogVersionAheadError), "the ahead error"
        )
        assert engine.version == split[-1]
        assert standby.version() == lagged
        pair.resume_replay()
        wait_until(lambda: engine.version == moved, "catching up once the standby replays")
        after = _split(primary)
        wait_until(lambda: engine.version == after, "the next write")
    expected = primary.snapshot()
    assert [(r.route_id, r.start, r.end, r.group_id, r.state) for r in engine.stats()] == [
        (r.route_id, r.start, r.end, r.group_id, r.state) for r in expected.routes
    ]


def test_a_service_seeding_from_a_lagging_standby_adopts_the_primarys_catalog(
    pair: StreamingPair,
) -> None:
    """The standby has not replayed the catalog another service seeded: this service's seed
    loses on the primary, and it adopts the primary's catalog, not the standby's empty one."""
    server = pair.primary_url.rsplit("/", 1)[0]
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute('CREATE DATABASE "seeding"')
    primary_url = f"{server}/seeding"
    standby_url = pair.standby_url.rsplit("/", 1)[0] + "/seeding"
    migrate(primary_url)
    pair.wait_replayed()
    pair.pause_replay()
    try:
        routes = [RouteDescriptor(1, b"", b"m", 3), RouteDescriptor(2, b"m", None, 4)]
        with CatalogStore.from_url(primary_url) as first:
            seeded = first.save(0, routes)
        with CatalogStore.from_url(primary_url, read_url=standby_url) as store:
            assert store.version() == 0  # the standby lags
            engine = Engine()
            assert ensure_catalog_snapshot(store, engine) == seeded
            assert engine.version == seeded.version
            assert [(r.route_id, r.group_id) for r in engine.stats()] == [(1, 3), (2, 4)]
    finally:
        pair.resume_replay()

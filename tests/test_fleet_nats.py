"""The fleet over NATS: roll calls and the barrier of watchers that follow NATS.

Real PostgreSQL, the NATS server on 127.0.0.1:4222 (the tests skip, saying so, when none
answers), ``distribution relay`` and ``distribution watch --nats`` in processes of their own,
watchers in this process elsewhere. The fixtures are those of ``test_relay.py`` (a subject of
its own for each test) and ``test_fleet.py``.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import pytest

pytest.importorskip("nats", reason="the nats extra (nats-py) is not installed")

from test_fleet import WAIT, _cli, _watch_process, names, seed
from test_relay import Relay, nats_url, relays, subject
from waiting import wait_until

from distribution import CatalogStore, CatalogWatcher, Engine
from distribution.catalog import FLEET_CHANNEL, BarrierResult, roll_call, wait_applied
from distribution.fanout import NatsNotifications

# The fixtures of test_relay.py, used here by name.
__all__ = ["nats_url", "relays", "subject"]


@contextmanager
def nats_watchers(
    store: CatalogStore, nats: NatsNotifications, *names: str
) -> Iterator[list[CatalogWatcher]]:
    """Watchers following ``nats``, one per name, running in the background."""
    with ExitStack() as stack:
        watchers = [
            stack.enter_context(
                CatalogWatcher(store, Engine(), name=name, notifications=nats.subscribe)
            )
            for name in names
        ]
        wait_until(lambda: all(w.listening for w in watchers), "the watchers to subscribe")
        yield watchers


@pytest.fixture
def connect(nats_url: str, subject: str) -> Iterator[Callable[[], NatsNotifications]]:
    """Connections to NATS on the test's subject, connected, closed at the end."""
    with ExitStack() as stack:

        def open_one() -> NatsNotifications:
            nats = stack.enter_context(NatsNotifications(nats_url, subject))
            assert nats.wait_connected(WAIT)
            return nats

        yield open_one


def test_a_roll_call_over_nats_sees_each_watcher_and_its_version(
    store: CatalogStore, connect: Callable[[], NatsNotifications]
) -> None:
    version = seed(store)
    asker = connect()
    # Two connections, as two service processes would hold: three watchers, then two.
    with (
        nats_watchers(store, connect(), "a1", "a2", "a3") as first,
        nats_watchers(store, connect(), "b1", "b2") as second,
    ):
        watchers = first + second
        assert all(w.wait_for(version, WAIT) for w in watchers)
        reads = [w.syncs for w in watchers]
        report = roll_call(store, nats=asker)
        # Answering read nothing from the catalog.
        assert [w.syncs for w in watchers] == reads
        # None of them holds a connection to the database to answer on.
        assert roll_call(store, window=0.2).watchers == ()
    assert report.catalog_version == version
    assert sorted(names(report.watchers)) == ["a1", "a2", "a3", "b1", "b2"]
    assert report.laggards == ()
    for status in report.watchers:
        assert status.answered and status.listening
        assert (status.applied_version, status.catalog_version, status.lag) == (version, version, 0)
        assert status.backend_pid == 0
    assert len({status.id for status in report.watchers}) == 5


def test_a_roll_call_over_nats_of_nobody_finds_nobody(
    store: CatalogStore, connect: Callable[[], NatsNotifications]
) -> None:
    version = seed(store)
    report = roll_call(store, nats=connect(), window=0.2)
    assert (report.catalog_version, report.watchers) == (version, ())
    result = wait_applied(store, version, WAIT, nats=connect(), window=0.2)
    assert result.reached and result.watchers == ()


def test_a_barrier_over_nats_is_reached_once_the_write_lands_through_the_relay(
    store: CatalogStore,
    connect: Callable[[], NatsNotifications],
    relays: Callable[[], Relay],
) -> None:
    version = seed(store)
    relays()
    spy = connect().subscribe()  # sees the asks on the fleet subject, as a watcher would
    with nats_watchers(store, connect(), "w1", "w2") as watchers:
        assert all(w.wait_for(version, WAIT) for w in watchers)
        results: list[BarrierResult] = []
        barrier = threading.Thread(
            target=lambda: results.append(wait_applied(store, version + 1, WAIT, nats=connect()))
        )
        barrier.start()
        try:
            # The ask is out, for a version nobody holds yet: both answer behind...
            wait_until(lambda: spy.wait(0.1) == [] and bool(spy.take(FLEET_CHANNEL)), "the ask")
            # ... then the write reaches them through the relay, and they answer again.
            written = store.split_route(1, b"m", version).version
        finally:
            barrier.join(WAIT * 2)
        assert written == version + 1
        [result] = results
        assert result.reached, result.laggards
        assert sorted(names(result.watchers)) == ["w1", "w2"]
        assert result.last is not None and result.last.name in ("w1", "w2")
        assert all(w.applied_version == written for w in watchers)
        # A barrier for a version the catalog never reaches names every watcher, last status
        # and all, once its timeout passes.
        behind = wait_applied(store, written + 1, 0.5, nats=connect(), window=0.2)
    assert not behind.reached and behind.last is None
    assert sorted(names(behind.laggards)) == ["w1", "w2"]
    assert {w.applied_version for w in behind.laggards} == {written}


def test_a_malformed_ask_over_nats_is_ignored_with_a_warning(
    store: CatalogStore,
    connect: Callable[[], NatsNotifications],
    caplog: pytest.LogCaptureFixture,
) -> None:
    version = seed(store)
    asker = connect()
    catalog = connect().subscribe()  # the catalog subject: no reply may land there
    with nats_watchers(store, connect(), "a") as [watcher]:
        assert watcher.wait_for(version, WAIT)
        inbox = asker.fleet_inbox(f"{FLEET_CHANNEL}_{uuid.uuid4().hex}")
        with caplog.at_level(logging.WARNING):
            for payload in [
                "not json",
                json.dumps({"reply": asker.subject, "version": None, "seconds": 1}),
                json.dumps({"reply": f"{FLEET_CHANNEL}_ab.>", "version": None, "seconds": 1}),
                json.dumps({"reply": f"{FLEET_CHANNEL}_ab", "version": -1, "seconds": 1}),
                json.dumps([1, 2]),
            ]:
                inbox.ask(payload)
            report = roll_call(store, nats=asker)
        inbox.close()
        assert [(w.name, w.applied_version) for w in report.watchers] == [("a", version)]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert sum("ignored a malformed roll call:" in m for m in warnings) == 5, warnings
        assert catalog.wait(0.2) == []
        assert not any("catalog notification" in m for m in warnings), warnings


def test_a_subscription_keeps_a_bounded_number_of_asks_for_its_watcher(
    connect: Callable[[], NatsNotifications],
) -> None:
    subscription = connect().subscribe()
    asker = connect()
    inbox = asker.fleet_inbox(f"{FLEET_CHANNEL}_{uuid.uuid4().hex}")
    for i in range(100):
        inbox.ask(f"ask {i}")
    # A catch-up, published after the asks by the same connection: delivered after them.
    asker.publish(b"7")
    received: list[int] = []
    wait_until(lambda: bool(received.extend(n.version for n in subscription.wait(0.1)) or received))
    assert received == [7]
    # Nobody took the asks: the first 64 were kept for the watcher, the others dropped.
    assert subscription.take("distribution_other") == []
    assert subscription.take(FLEET_CHANNEL) == [f"ask {i}" for i in range(64)]
    assert subscription.take(FLEET_CHANNEL) == []
    inbox.close()


def test_the_cli_shows_the_nats_fleet_and_waits_for_it(
    store: CatalogStore,
    database_url: str,
    nats_url: str,
    subject: str,
    relays: Callable[[], Relay],
    connect: Callable[[], NatsNotifications],
) -> None:
    version = seed(store)
    relays()
    nats = ["--nats", nats_url, "--subject", subject]
    started = [_watch_process(database_url, f"w{i}", *nats) for i in range(2)]
    try:
        asker = connect()
        expected = ["w0", "w1"]
        wait_until(
            lambda: sorted(names(roll_call(store, nats=asker, window=0.2).watchers)) == expected,
            "the watch processes to answer",
            timeout=60,
        )
        shown = _cli(database_url, "fleet", *nats, "--json")
        assert shown.returncode == 0, shown.stderr
        fleet = json.loads(shown.stdout)
        assert fleet["catalog_version"] == version
        assert sorted(w["name"] for w in fleet["watchers"]) == ["w0", "w1"]
        assert sorted(w["pid"] for w in fleet["watchers"]) == sorted(p.pid for p in started)
        assert {(w["applied_version"], w["lag"], w["answered"]) for w in fleet["watchers"]} == {
            (version, 0, True)
        }
        table = _cli(database_url, "fleet", *nats)
        assert table.returncode == 0, table.stderr
        assert f"catalog version {version}: 2 watchers, all at this version" in table.stdout
        # Without --nats, nobody answers on the database.
        assert "no watcher is listening" in _cli(database_url, "fleet", "--window", "0.2").stdout

        written = _cli(database_url, "split", "1", "m", "--wait", *nats, "--timeout", "60")
        assert written.returncode == 0, written.stderr
        assert f"version {version + 1} held by all 2 watchers after" in written.stdout
        misused = _cli(database_url, "split", "2", "x", *nats)
        assert misused.returncode == 2 and "--nats needs --wait" in misused.stderr
    finally:
        for process in started:
            process.kill()
            process.wait(30)
    nobody = _cli(database_url, "fleet", *nats, "--window", "0.2")
    assert nobody.returncode == 0, nobody.stderr
    assert f"catalog version {version + 1}: no watcher answered" in nobody.stdout

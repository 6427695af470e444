"""The fleet: roll calls, the barrier, waiting for a version, against a real PostgreSQL.

Watchers run in real processes (``distribution watch``) where the test needs to pause one
(SIGSTOP), and in this process elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from waiting import wait_until

from distribution import Engine, RouteDescriptor, RouteState, WatcherNameError
from distribution.catalog import (
    FLEET_CHANNEL,
    NOTIFY_CHANNEL,
    CatalogStore,
    roll_call,
    wait_applied,
)
from distribution.catalog.fleet import (
    MAX_WATCHER_NAME_BYTES,
    WatcherStatus,
    parse_status,
    status_payload,
)
from distribution.cli import main
from distribution.cli.errors import EXIT_BEHIND
from distribution.watcher import CatalogWatcher

if TYPE_CHECKING:
    from conftest import NewRole

WAIT = 30.0


def seed(store: CatalogStore) -> int:
    """One route over every key; returns the version."""
    return store.save(0, [RouteDescriptor(route_id=1, start=b"", end=None, group_id=1)]).version


@contextmanager
def watching(url: str, name: str, **options: Any) -> Iterator[CatalogWatcher]:
    """A watcher in this process, running in the background, on a store of its own."""
    with CatalogStore.from_url(url) as store:
        watcher = CatalogWatcher(store, Engine(), name=name, **options)
        with watcher:
            wait_until(lambda: watcher.listening)
            yield watcher


def names(watchers: Any) -> list[str]:
    return [w.name for w in watchers]


# -- names --------------------------------------------------------------------------------------


def test_a_watcher_is_named_after_its_process_unless_given_a_name(store: CatalogStore) -> None:
    default = CatalogWatcher(store, Engine()).name
    assert default.endswith(f":{os.getpid()}")
    assert "@" in default
    assert CatalogWatcher(store, Engine(), name="billing-7").name == "billing-7"


@pytest.mark.parametrize(
    "name",
    ["", "a\0b", "x" * (MAX_WATCHER_NAME_BYTES + 1), "é" * (MAX_WATCHER_NAME_BYTES // 2 + 1)],
)
def test_a_bad_watcher_name_is_refused(store: CatalogStore, name: str) -> None:
    with pytest.raises(WatcherNameError) as info:
        CatalogWatcher(store, Engine(), name=name)
    assert isinstance(info.value, ValueError)


def test_a_watcher_name_must_be_text(store: CatalogStore) -> None:
    with pytest.raises(TypeError):
        CatalogWatcher(store, Engine(), name=b"w1")  # type: ignore[arg-type]


# -- roll call ----------------------------------------------------------------------------------


GOOD_REPLY = WatcherStatus("w", "h", 1, 7, 7, 0, True, None, 2.5, 99, "ab")


@pytest.mark.parametrize(
    "change",
    [{"pid": "1"}, {"pid": True}, {"listening": 1}, {"uptime": "2"}, {"name": None}, {"extra": 1}],
)
def test_a_malformed_reply_is_refused(change: dict[str, Any]) -> None:
    assert parse_status(status_payload(GOOD_REPLY)) == GOOD_REPLY
    fields = {**json.loads(status_payload(GOOD_REPLY)), **change}
    with pytest.raises(ValueError, match="malformed roll call reply"):
        parse_status(json.dumps(fields))


def test_a_reply_fits_one_notification_whatever_its_error() -> None:
    status = dataclasses.replace(GOOD_REPLY, name="é" * 128, last_error="\0\n€" * 5000)
    payload = status_payload(status)
    assert len(payload.encode()) < 8000
    parsed = parse_status(payload)
    assert parsed.last_error is not None and status.last_error.startswith(parsed.last_error)
    assert parsed.name == status.name


def test_roll_call_of_an_idle_catalog_finds_nobody(store: CatalogStore) -> None:
    version = seed(store)
    report = roll_call(store)
    assert report.catalog_version == version
    assert report.watchers == ()
    assert report.laggards == ()


def test_roll_call_reports_each_watcher_and_its_versions(
    store: CatalogStore, database_url: str
) -> None:
    seed(store)
    longest = "é" * (MAX_WATCHER_NAME_BYTES // 2)  # the longest name, in two-byte characters
    with watching(database_url, "a") as a, watching(database_url, longest) as b:
        written = store.split_route(1, b"m", 1).version
        assert a.wait_for(written, WAIT) and b.wait_for(written, WAIT)
        report = roll_call(store)
    assert report.catalog_version == written
    assert sorted(names(report.watchers)) == sorted(["a", longest])
    for status in report.watchers:
        assert status.answered
        assert (status.applied_version, status.catalog_version, status.lag) == (written, written, 0)
        assert status.pid == os.getpid()
        assert status.listening
        assert status.last_error is None
        assert status.uptime is not None and status.uptime > 0
    assert report.laggards == ()
    # Each answered on its own listening connection.
    assert len({s.backend_pid for s in report.watchers}) == 2


def test_a_watcher_that_lost_its_listener_answers_again_once_reconnected(
    store: CatalogStore, database_url: str
) -> None:
    seed(store)
    with watching(database_url, "a") as a:
        first = roll_call(store).watchers[0].backend_pid
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [first])
        # Until it has reconnected, a roll call may find no watcher at all.
        wait_until(lambda: any(w.backend_pid != first for w in roll_call(store).watchers))
        report = roll_call(store)
        assert names(report.watchers) == ["a"]
        assert report.watchers[0].answered
        assert a.errors["CatalogUnavailableError"] >= 1


def test_malformed_asks_are_ignored_and_never_reach_the_catalog_channel(
    store: CatalogStore, database_url: str
) -> None:
    version = seed(store)
    with watching(database_url, "a"), psycopg.connect(database_url, autocommit=True) as spy:
        spy.execute(f"LISTEN {NOTIFY_CHANNEL}")
        for payload in [
            "not json",
            json.dumps({"reply": NOTIFY_CHANNEL, "version": None, "seconds": 1}),
            json.dumps({"reply": f"{FLEET_CHANNEL}_zz", "version": None, "seconds": 1}),
            json.dumps({"reply": f"{FLEET_CHANNEL}_ab", "version": -1, "seconds": 1}),
            json.dumps([1, 2]),
            json.dumps(
                {"reply": f"{FLEET_CHANNEL}_ab", "version": None, "seconds": 1, "only": ["x"]}
            ),
        ]:
            spy.execute("SELECT pg_notify(%s, %s)", [FLEET_CHANNEL, payload])
        report = roll_call(store)
        assert [(w.name, w.applied_version) for w in report.watchers] == [("a", version)]
        assert list(spy.notifies(timeout=0.2)) == []


def test_an_ask_naming_other_connections_is_not_answered(
    store: CatalogStore, database_url: str
) -> None:
    seed(store)
    reply = f"{FLEET_CHANNEL}_{uuid.uuid4().hex}"
    with watching(database_url, "a"), psycopg.connect(database_url, autocommit=True) as asker:
        backend = roll_call(store).watchers[0].backend_pid
        asker.execute(f"LISTEN {reply}")
        for only, answered in [([backend + 1], False), ([backend], True)]:
            ask = json.dumps({"reply": reply, "version": None, "seconds": 1, "only": only})
            asker.execute("SELECT pg_notify(%s, %s)", [FLEET_CHANNEL, ask])
            received = list(asker.notifies(timeout=2 if answered else 0.5, stop_after=1))
            assert [json.loads(n.payload)["name"] for n in received] == (["a"] if answered else [])


def test_a_read_only_role_can_roll_call_and_answer(
    database_url: str, store: CatalogStore, new_role: NewRole
) -> None:
    version = seed(store)
    reader_url = new_role(
        "fleet_reader",
        database_url,
        [
            'GRANT CONNECT ON DATABASE "{database}" TO "{role}"',
            'GRANT USAGE ON SCHEMA public TO "{role}"',
            'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{role}"',
        ],
    )
    with CatalogStore.from_url(reader_url) as reader, watching(reader_url, "reader") as w:
        report = roll_call(reader)
        assert [(s.name, s.applied_version) for s in report.watchers] == [("reader", version)]
        written = store.split_route(1, b"m", version).version
        result = wait_applied(reader, written, WAIT)
        assert result.reached
        assert names(result.watchers) == ["reader"]
        assert w.applied_version == written


# -- the barrier --------------------------------------------------------------------------------


def test_the_barrier_of_a_catalog_without_watchers_is_reached_at_once(store: CatalogStore) -> None:
    version = seed(store)
    result = wait_applied(store, version, WAIT)
    assert result.reached
    assert (result.watchers, result.laggards, result.last) == ((), (), None)


def test_a_watcher_that_starts_during_the_wait_is_counted(
    store: CatalogStore, database_url: str
) -> None:
    version = seed(store)
    with ExitStack() as stack:
        stack.enter_context(watching(database_url, "early"))
        results: list[Any] = []
        # Waiting for a version not written yet: "early" answers that it is behind.
        waiter = threading.Thread(
            target=lambda: results.append(wait_applied(store, version + 1, WAIT))
        )
        waiter.start()
        late = stack.enter_context(watching(database_url, "late"))
        # Written once the late watcher can be seen connected.
        wait_until(lambda: "late" in names(roll_call(store).watchers))
        store.split_route(1, b"m", version)
        waiter.join(WAIT)
        assert late.applied_version == version + 1
    (result,) = results
    assert result.reached
    assert sorted(names(result.watchers)) == ["early", "late"]
    assert result.last is not None and result.last.name in ("early", "late")
    assert result.laggards == ()


def test_a_watcher_that_leaves_during_the_wait_is_not_waited_for(
    store: CatalogStore, database_url: str
) -> None:
    version = seed(store)
    with watching(database_url, "stays"):
        leaving = CatalogStore.from_url(database_url)
        watcher = CatalogWatcher(leaving, Engine(), name="leaves", listen=True)
        watcher.start()
        wait_until(lambda: watcher.listening)
        results: list[Any] = []
        waiter = threading.Thread(
            target=lambda: results.append(wait_applied(store, version + 1, WAIT))
        )
        waiter.start()
        wait_until(lambda: sorted(names(roll_call(store).watchers)) == ["leaves", "stays"])
        watcher.stop()
        leaving.close()
        store.split_route(1, b"m", version)
        waiter.join(WAIT)
    (result,) = results
    assert result.reached
    assert names(result.watchers) == ["stays"]


# -- real processes -----------------------------------------------------------------------------


def _watch_process(url: str, name: str, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distribution",
            "--database-url",
            url,
            "watch",
            "--name",
            name,
            *extra,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "distribution", "--database-url", url, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@contextmanager
def processes(url: str, count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    started = [_watch_process(url, f"w{i}") for i in range(count)]
    try:
        yield started
    finally:
        for process in started:
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
        for process in started:
            process.wait(30)


@pytest.mark.slow
def test_ten_watcher_processes_fleet_and_barrier(store: CatalogStore, database_url: str) -> None:
    version = seed(store)
    expected = [f"w{i}" for i in range(10)]
    with processes(database_url, 10) as started:
        wait_until(lambda: sorted(names(roll_call(store).watchers)) == expected, timeout=120)

        # fleet lists all ten, with their versions; all current: exit code 0.
        shown = _cli(database_url, "fleet", "--json")
        assert shown.returncode == 0, shown.stderr
        fleet = json.loads(shown.stdout)
        assert fleet["catalog_version"] == version
        assert sorted(w["name"] for w in fleet["watchers"]) == expected
        assert {(w["applied_version"], w["lag"], w["answered"]) for w in fleet["watchers"]} == {
            (version, 0, True)
        }
        assert sorted(w["pid"] for w in fleet["watchers"]) == sorted(p.pid for p in started)

        # A write with --wait: every watcher holds it, and the last one is named.
        written = _cli(database_url, "split", "1", "m", "--wait", "--timeout", "60")
        assert written.returncode == 0, written.stderr
        assert f"version {version + 1} held by all 10 watchers after" in written.stdout
        assert "(last: w" in written.stdout
        result = wait_applied(store, version + 1, WAIT)
        assert result.reached
        assert sorted(names(result.watchers)) == expected

        # One paused watcher: the barrier names it when the timeout passes, and only it.
        paused = started[3]
        os.kill(paused.pid, signal.SIGSTOP)
        behind = _cli(database_url, "set-state", "2", "write_fenced", "--wait", "--timeout", "2")
        assert behind.returncode == EXIT_BEHIND, behind.stderr
        assert "1 of 10 watchers do not hold catalog version" in behind.stderr
        assert "w3 (no answer;" in behind.stderr
        result = wait_applied(store, version + 2, 1.0)
        assert not result.reached
        assert names(result.laggards) == ["w3"]
        assert not result.laggards[0].answered
        shown = _cli(database_url, "fleet", "--json", "--window", "0.5")
        assert shown.returncode == EXIT_BEHIND
        assert json.loads(shown.stdout)["watchers"][0]["name"] == "w3"

        # Resumed, it catches up and the barrier is reached.
        os.kill(paused.pid, signal.SIGCONT)
        result = wait_applied(store, version + 2, WAIT)
        assert result.reached, names(result.laggards)
        assert sorted(names(result.watchers)) == expected


# -- waiting for a version ----------------------------------------------------------------------


def _wake_delays(store: CatalogStore, watcher: CatalogWatcher, writes: int) -> list[float]:
    """For each write, how long after the apply a thread waiting in wait_for returned."""
    applied_at: dict[int, float] = {}
    watcher.add_listener(lambda change: applied_at.setdefault(change.version, time.perf_counter()))
    delays = []
    version = store.version()
    for i in range(writes):
        returned: list[tuple[bool, float]] = []

        def wait(target: int = version + 1, into: list[tuple[bool, float]] = returned) -> None:
            ok = watcher.wait_for(target, WAIT)
            into.append((ok, time.perf_counter()))

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.01)  # the waiter is waiting
        state = RouteState.WRITE_FENCED if i % 2 == 0 else RouteState.ACTIVE
        version = store.set_route_state(1, state, version).version
        waiter.join(WAIT)
        ((ok, at),) = returned
        assert ok
        delays.append(at - applied_at[version])
    return delays


def test_wait_for_returns_within_5_ms_of_the_apply(store: CatalogStore, database_url: str) -> None:
    seed(store)
    with watching(database_url, "w") as watcher:
        delays = _wake_delays(store, watcher, 15)
    # The waiting thread wakes on the apply itself: the bound is 5 ms. On a busy
    # machine a thread may wait for the interpreter now and then: the median is what is held.
    assert statistics.median(delays) < 0.005, delays


def test_wait_for_wakes_while_the_watcher_runs_in_the_calling_thread_of_run(
    store: CatalogStore, database_url: str
) -> None:
    version = seed(store)
    with CatalogStore.from_url(database_url) as own:
        watcher = CatalogWatcher(own, Engine(), name="foreground")
        stop = threading.Event()
        results: list[bool] = []
        waiter = threading.Thread(
            target=lambda: results.append(watcher.wait_for(version + 1, WAIT))
        )
        waiter.start()
        runner = threading.Thread(target=watcher.run, args=(stop,))
        runner.start()
        try:
            wait_until(lambda: watcher.applied_version == version)
            store.split_route(1, b"m", version)
            waiter.join(WAIT)
        finally:
            stop.set()
            runner.join(WAIT)
    assert results == [True]


def test_wait_for_times_out_and_wait_caught_up_reads_the_catalog(
    store: CatalogStore, database_url: str
) -> None:
    version = seed(store)
    with CatalogStore.from_url(database_url) as own:
        watcher = CatalogWatcher(own, Engine(), name="idle")  # never started
        began = time.monotonic()
        assert watcher.wait_for(1, 0.2) is False
        assert time.monotonic() - began >= 0.2
        assert watcher.wait_caught_up(0.2) is False  # the catalog is at `version`, the Engine at 0
        with watcher:
            assert watcher.wait_caught_up(WAIT) is True
        assert watcher.applied_version == version


def test_timeout_without_wait_is_a_usage_error(
    store: CatalogStore, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    version = seed(store)
    code = main(["--database-url", database_url, "split", "1", "m", "--timeout", "3"])
    assert code == 2
    assert "--timeout needs --wait" in capsys.readouterr().err
    assert store.version() == version

"""The relay and watchers following NATS: real relay processes, the NATS server on this machine.

The NATS server is the one on 127.0.0.1:4222 (the tests skip, saying so, when none answers); the
test that stops and restarts NATS, and those that need a small ``max_payload``, run their own
``nats-server`` on a free port, from the binary the machine has. Each test publishes on a subject of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
import pytest
from standby import StreamingPair, free_port, streaming_pair

pytest.importorskip("nats", reason="the nats extra (nats-py) is not installed")

from waiting import wait_until

from distribution import CatalogStore, CatalogWatcher, Engine
from distribution.catalog import CatalogNotification, parse_notification
from distribution.catalog.notifications import format_notification
from distribution.errors import (
    CatalogVersionAheadError,
    NotificationSubjectInvalidError,
    NotificationsUnavailableError,
)
from distribution.fanout import DUPLICATE_WINDOW, NatsNotifications, NatsSubscription, _Handoff
from distribution.types import CatalogChange, CatalogSnapshot, RouteDescriptor

if TYPE_CHECKING:
    from conftest import NewRole
    from nats.aio.client import Client
    from nats.aio.msg import Msg

NATS_HOST, NATS_PORT = "127.0.0.1", 4222
_TIMEOUT = 30.0
_T = TypeVar("_T")


def _answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def nats_url() -> str:
    """The NATS server on this machine."""
    if not _answers(NATS_HOST, NATS_PORT):
        pytest.skip(
            f"no NATS server answers on {NATS_HOST}:{NATS_PORT} "
            "(start one: nats-server -a 127.0.0.1 -p 4222 -js)"
        )
    return f"nats://{NATS_HOST}:{NATS_PORT}"


@pytest.fixture
def subject() -> str:
    return f"distribution.test.{uuid.uuid4().hex}"


class Relay:
    """``distribution relay`` in a process of its own."""

    def __init__(self, database_url: str, nats_url: str, subject: str) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "distribution", "relay",
                "--database-url", database_url,
                "--nats", nats_url,
                "--subject", subject,
                "--heartbeat", "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> str:
        """SIGTERM; the relay exits 0. Returns what it logged."""
        self.process.send_signal(signal.SIGTERM)
        _, err = self.process.communicate(timeout=_TIMEOUT)
        assert self.process.returncode == 0, err
        return err

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate(timeout=_TIMEOUT)


@pytest.fixture
def relays(database_url: str, nats_url: str, subject: str) -> Iterator[Callable[..., Relay]]:
    """Start relays of the test's catalog (or of the database URL given) to the NATS server on
    this machine; those still running are killed at the end."""
    started: list[Relay] = []

    def start(url: str = database_url) -> Relay:
        relay = Relay(url, nats_url, subject)
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.kill()


class Probe:
    """A raw subscriber: every message on the subject, parsed, in arrival order, copies included.

    nats-py itself, on a loop of its own: a :class:`NatsNotifications` connection hands a copy of
    the message it received just before only to the subscriptions that did not get it.
    """

    def __init__(self, nats_url: str, subject: str) -> None:
        import nats

        self._messages: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def receive(message: Msg) -> None:
            self._messages.put(message.data)

        async def connect() -> Client:
            client = await nats.connect(
                nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.2  # type: ignore[arg-type]
            )
            await client.subscribe(subject, cb=receive)
            await client.flush()
            return client

        self._client = self._run(connect())
        self.received: list[CatalogNotification] = []

    def _run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(_TIMEOUT)

    def wait_connected(self) -> None:
        wait_until(lambda: self._client.is_connected, "the probe's NATS connection")

    def take(self, condition: Callable[[CatalogNotification], bool], what: str) -> None:
        """Receive until a notification meets ``condition``."""
        deadline = time.monotonic() + _TIMEOUT
        while time.monotonic() < deadline:
            try:
                data = self._messages.get(timeout=0.1)
            except queue.Empty:
                continue
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                notification = parse_notification(data.decode("utf-8"))
                self.received.append(notification)
                if condition(notification):
                    return
        raise AssertionError(f"timed out waiting for {what}; received {self.received}")

    def close(self) -> None:
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_TIMEOUT)


@pytest.fixture
def probe(nats_url: str, subject: str) -> Iterator[Probe]:
    p = Probe(nats_url, subject)
    yield p
    p.close()


@pytest.fixture
def nats(nats_url: str, subject: str) -> Iterator[NatsNotifications]:
    """A connection to the NATS server on this machine, on the test's subject, connected."""
    with NatsNotifications(nats_url, subject) as connection:
        assert connection.wait_connected(_TIMEOUT)
        yield connection


@pytest.fixture
def relay(store: CatalogStore, relays: Callable[..., Relay], probe: Probe) -> Relay:
    """A relay of the test's catalog, seeded first (version 1), whose catch-up the probe has
    received."""
    _seed(store)
    started = relays()
    probe.take(_catch_up(1), "the relay's catch-up")
    return started


@contextlib.contextmanager
def relay_and_probe(
    database_url: str, nats_url: str, subject: str, version: int = 1
) -> Iterator[tuple[Relay, Probe]]:
    """A relay of the catalog of ``database_url``, at ``version``, to the NATS server of
    ``nats_url`` (one of the test's own), and a probe that has received the relay's catch-up;
    both stopped at the end."""
    relay = Relay(database_url, nats_url, subject)
    probe = Probe(nats_url, subject)
    try:
        probe.take(_catch_up(version), "the relay's catch-up")
        yield relay, probe
    finally:
        probe.close()
        relay.kill()


def _catch_up(version: int) -> Callable[[CatalogNotification], bool]:
    return lambda n: n.change is None and n.version >= version


def _split(store: CatalogStore) -> int:
    """Split the widest bounded route of the catalog; returns the new version."""
    snapshot = store.snapshot()
    route = next(r for r in reversed(snapshot.routes) if r.end is None or r.start + b"\x80" < r.end)
    return store.split_route(route.route_id, route.start + b"\x80", snapshot.version).version


def _seed(store: CatalogStore) -> None:
    store.save(0, [RouteDescriptor(1, b"", None, 1)])


@contextlib.contextmanager
def followers(
    store: CatalogStore, nats: NatsNotifications, count: int
) -> Iterator[list[tuple[CatalogWatcher, Engine, list[int]]]]:
    """``count`` watchers following NATS, each with its Engine and the versions it applied."""
    running = []
    with contextlib.ExitStack() as stack:
        for _ in range(count):
            engine = Engine()
            applied: list[int] = []
            watcher = CatalogWatcher(store, engine, notifications=nats.subscribe)

            def record(change: CatalogChange | CatalogSnapshot, applied: list[int] = applied) -> None:
                applied.append(change.version)

            watcher.add_listener(record)
            stack.enter_context(watcher)
            running.append((watcher, engine, applied))
        wait_until(lambda: all(w.listening for w, _, _ in running), "the watchers to subscribe")
        yield running


def _listening_backends(database_url: str) -> int:
    with psycopg.connect(database_url) as connection:
        row = connection.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'test-watchers' AND query ILIKE 'LISTEN%'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def _assert_correct(store: CatalogStore, engines: list[Engine]) -> None:
    snapshot = store.snapshot()
    expected = [(r.route_id, r.start, r.end, r.group_id, r.state) for r in snapshot.routes]
    for engine in engines:
        assert engine.version == snapshot.version
        assert [tuple(r[:5]) for r in engine.stats()] == expected


def test_watchers_follow_nats_with_no_listen_connection(
    database_url: str, store: CatalogStore, nats: NatsNotifications, relay: Relay, probe: Probe
) -> None:
    with (
        CatalogStore.from_url(
            database_url, connect_args={"application_name": "test-watchers"}
        ) as watched,
        followers(watched, nats, 3) as running,
    ):
        versions = [_split(store) for _ in range(10)]
        wait_until(lambda: all(e.version == versions[-1] for _, e, _ in running), "the watchers")
        # The changes came through NATS.
        wait_until(
            lambda: all(w.notifications >= len(versions) for w, _, _ in running),
            "every write's message",
        )
        assert _listening_backends(database_url) == 0
        _assert_correct(store, [e for _, e, _ in running])
    probe.take(lambda n: n.version == versions[-1] and n.change is not None, "the last write")
    last = probe.received[-1]
    # Heartbeats (every second here) repeat messages already relayed.
    relayed = list(dict.fromkeys(n.version for n in probe.received if n.change is not None))
    assert relayed == versions
    # With nothing written, the relay's heartbeat repeats the newest write's message, its change
    # and digest included: a watcher that missed it finds out, and one that holds it unconfirmed
    # checks its digest instead of reading the catalog.
    seen = len(probe.received)
    probe.take(lambda n: len(probe.received) > seen and n == last, "a heartbeat")
    assert last.change is not None and last.change.digest is not None


def test_two_relays_each_version_applied_once(
    store: CatalogStore,
    nats: NatsNotifications,
    relay: Relay,
    relays: Callable[..., Relay],
    probe: Probe,
) -> None:
    relays()
    probe.take(_catch_up(1), "the other relay's catch-up")
    with followers(store, nats, 3) as running:
        first = store.version()
        wait_until(lambda: all(e.version == first for _, e, _ in running), "the first read")
        versions = [_split(store) for _ in range(10)]
        probe.take(
            lambda n: n.version == versions[-1]
            and sum(m.version == versions[-1] for m in probe.received) == 2,
            "both relays' last message",
        )
        # Every write reaches the subject twice (the probe saw both); the watchers' connection
        # hands the second copy, right behind the first, to none of them, which got the first.
        # (A copy that comes behind the next write is handed on, and counted: a count alone
        # could reach ten before the last write, so the wait is for its listener call too.)
        wait_until(
            lambda: all(
                w.notifications >= len(versions) and applied[-1:] == versions[-1:]
                for w, _, applied in running
            ),
            "every write",
        )
        for _, engine, applied in running:
            # ... and each was applied once, in order.
            assert engine.version == versions[-1]
            assert applied[applied.index(first) + 1 :] == versions
        _assert_correct(store, [e for _, e, _ in running])


def test_watch_command_follows_nats(
    database_url: str, nats_url: str, subject: str, store: CatalogStore, relay: Relay
) -> None:
    command = [
        sys.executable, "-m", "distribution", "--database-url", database_url, "watch",
        "--nats", nats_url, "--subject", subject, "--count", "2", "--timeout", "60",
    ]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as watch:
        try:
            assert watch.stderr is not None
            banner = watch.stderr.readline()
            assert "watching the catalog after version 1" in banner, banner
            # It follows NATS: no connection of the command LISTENs on the catalog's database.
            with psycopg.connect(database_url) as connection:
                row = connection.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND application_name = 'distribution-cli' AND query ILIKE 'LISTEN%'"
                ).fetchone()
            assert row == (0,)
            versions = [_split(store) for _ in range(2)]
            out, err = watch.communicate(timeout=_TIMEOUT)
        finally:
            watch.kill()
    assert watch.returncode == 0, err
    printed = [line.split(":")[0] for line in out.splitlines() if line.startswith("version ")]
    assert printed == [f"version {v}" for v in versions]
    # A bad subject is refused before the watcher starts.
    bad = subprocess.run(
        [*command[:6], "--nats", nats_url, "--subject", "a.*"],
        capture_output=True, text=True, timeout=_TIMEOUT, check=False,
    )
    assert bad.returncode == 1 and "invalid NATS subject" in bad.stderr, bad.stderr


def test_relay_restart_publishes_a_catch_up(
    store: CatalogStore,
    nats: NatsNotifications,
    relay: Relay,
    relays: Callable[..., Relay],
    probe: Probe,
) -> None:
    with followers(store, nats, 2) as running:
        _split(store)
        logged = relay.stop()
        assert "relay stopped" in logged
        missed = [_split(store) for _ in range(3)]  # no relay runs: nothing is published
        relays()
        # The new relay cannot know what was missed: it publishes the catalog's version.
        probe.take(_catch_up(missed[-1]), "the restarted relay's catch-up")
        after = _split(store)
        probe.take(lambda n: n.version == after and n.change is not None, "the next write")
        wait_until(lambda: all(e.version == after for _, e, _ in running), "the watchers")
        _assert_correct(store, [e for _, e, _ in running])


def test_relay_survives_losing_its_database_connection(
    database_url: str, store: CatalogStore, relay: Relay, probe: Probe
) -> None:
    with psycopg.connect(database_url, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'distribution-relay'"
        ).fetchone()
    assert killed == (1,)  # the relay holds one connection: its listener
    missed = _split(store)
    # The write's own message if the relay was back before it, else its catch-up.
    probe.take(lambda n: n.version >= missed, "the write, after the relay reconnected")
    after = _split(store)
    probe.take(lambda n: n.version == after and n.change is not None, "the next write")
    assert relay.process.poll() is None
    assert "lost the catalog database connection" in relay.stop()


class NatsServer:
    """A ``nats-server`` of this test's own, on a free port: stopped and started at will."""

    def __init__(self, binary: str, folder: str, *options: str) -> None:
        self.binary = binary
        self.folder = folder
        self.options = options
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-l", f"{self.folder}/log",
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: _answers("127.0.0.1", self.port), "nats-server to start")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(_TIMEOUT)


def _nats_server_binary() -> str:
    binary = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin")
    if binary is None:
        pytest.skip("no nats-server binary on this machine to run one of the test's own")
    return binary


def _own_nats_server(config: str = "") -> Iterator[NatsServer]:
    """A fixture body: a ``nats-server`` of the test's own, started, with ``config`` (the lines
    of a configuration file) if given; killed at the end."""
    binary = _nats_server_binary()
    with tempfile.TemporaryDirectory(prefix="distribution-nats-") as folder:
        options: tuple[str, ...] = ()
        if config:
            with open(f"{folder}/nats.conf", "w") as file:
                file.write(config)
            options = ("-c", f"{folder}/nats.conf")
        server = NatsServer(binary, folder, *options)
        server.start()
        try:
            yield server
        finally:
            server.kill()


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    yield from _own_nats_server()


@pytest.fixture
def small_nats_server() -> Iterator[NatsServer]:
    """A ``nats-server`` of the test's own whose ``max_payload`` (4,096 bytes) is too small for
    the change of a save of a few hundred routes, large enough for a split's."""
    yield from _own_nats_server("max_payload: 4096\n")


def test_nats_restart_leaves_every_engine_correct_and_caught_up(
    database_url: str, store: CatalogStore, nats_server: NatsServer, subject: str
) -> None:
    _seed(store)
    with (
        NatsNotifications(nats_server.url, subject) as nats,
        relay_and_probe(database_url, nats_server.url, subject) as (relay, probe),
    ):
        with followers(store, nats, 3) as running:
            _split(store)
            nats_server.kill()
            wait_until(lambda: not any(w.listening for w, _, _ in running), "the loss")
            missed = [_split(store) for _ in range(3)]
            nats_server.start()
            wait_until(lambda: all(w.listening for w, _, _ in running), "resubscribing")
            # The relay reconnected to NATS too, and published a catch-up.
            probe.wait_connected()  # nats-py subscribes again by itself
            probe.take(_catch_up(missed[-1]), "the relay's catch-up after NATS came back")
            before = [w.notifications for w, _, _ in running]
            after = _split(store)
            wait_until(lambda: all(e.version == after for _, e, _ in running), "watchers")
            # That last write came through NATS again.
            wait_until(
                lambda: all(
                    w.notifications > n for (w, _, _), n in zip(running, before, strict=True)
                ),
                "the last write's message",
            )
            _assert_correct(store, [e for _, e, _ in running])
        assert relay.process.poll() is None
        relay.stop()


def test_subscription_skips_messages_that_are_not_notifications(nats: NatsNotifications) -> None:
    subscription = nats.subscribe()
    assert isinstance(subscription, NatsSubscription)
    nats.publish(b"not a notification")
    nats.publish(b"\xff\xfe")
    nats.publish(b"7")
    received: list[CatalogNotification] = []
    wait_until(lambda: bool(received.extend(subscription.wait(0.1)) or received), "the 7")
    assert received == [CatalogNotification(7, None)]
    subscription.close()


def test_subscriptions_of_one_connection_share_each_parsed_notification(
    nats: NatsNotifications, caplog: pytest.LogCaptureFixture
) -> None:
    # Fifty watchers of a process must not deliver and parse every message fifty times: the
    # connection parses it once, and every subscription gets that very object, once, even when
    # they all subscribe at the same time from their own threads.
    subscriptions: list[NatsSubscription] = []
    threads = [
        threading.Thread(target=lambda: subscriptions.append(nats.subscribe()))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(_TIMEOUT)
    assert len(subscriptions) == 8
    with caplog.at_level(logging.WARNING, logger="distribution.fanout"):
        nats.publish(b"not a notification")
        nats.publish(b"7")
        received = [s.wait(_TIMEOUT) for s in subscriptions]
    assert all(r == [CatalogNotification(7, None)] for r in received)
    assert all(r[0] is received[0][0] for r in received)
    malformed = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(malformed) == 1
    # One closing leaves the others subscribed; all closed, a new one still receives.
    subscriptions.pop().close()
    nats.publish(b"8")
    assert all(s.wait(_TIMEOUT) == [CatalogNotification(8, None)] for s in subscriptions)
    for s in subscriptions:
        s.close()
    again = nats.subscribe()
    nats.publish(b"9")
    assert again.wait(_TIMEOUT) == [CatalogNotification(9, None)]
    assert again.wait(0.2) == []
    again.close()


def test_a_copy_right_behind_a_message_goes_only_to_subscriptions_that_did_not_get_it(
    nats_url: str, subject: str
) -> None:
    # Every relay publishes each write: the copies must not wake a process's watchers a second
    # time. A subscription made between the two still gets it; a copy later than
    # DUPLICATE_WINDOW (a heartbeat) goes to all, as does a message that differs.
    with NatsNotifications(nats_url, subject) as nats:
        assert nats.wait_connected(_TIMEOUT)
        early = [nats.subscribe(), nats.subscribe()]
        nats.publish(b"7")
        assert all(s.wait(_TIMEOUT) == [CatalogNotification(7, None)] for s in early)
        late = nats.subscribe()
        nats.publish(b"7")
        assert late.wait(_TIMEOUT) == [CatalogNotification(7, None)]
        nats.publish(b"8")
        nats.publish(b"7")  # not a copy of the message just before
        for subscription in [*early, late]:
            received: list[CatalogNotification] = []
            while len(received) < 2:
                received += subscription.wait(_TIMEOUT)
            assert received == [CatalogNotification(8, None), CatalogNotification(7, None)]
        time.sleep(DUPLICATE_WINDOW)
        nats.publish(b"7")
        assert all(s.wait(_TIMEOUT) == [CatalogNotification(7, None)] for s in [*early, late])
        for subscription in [*early, late]:
            subscription.close()


def test_interrupt_and_close_wake_the_thread_waiting_on_a_subscription(
    nats: NatsNotifications,
) -> None:
    # A watcher stopping interrupts its source from another thread: its wait must not last its
    # whole timeout.
    subscription = nats.subscribe()

    def wait_in_a_thread(then: Callable[[], None]) -> list[CatalogNotification] | None:
        returned: list[list[CatalogNotification]] = []
        waiting = threading.Thread(
            target=lambda: returned.append(subscription.wait(3600)), daemon=True
        )
        waiting.start()
        then()
        waiting.join(_TIMEOUT)
        return returned[0] if returned else None

    assert wait_in_a_thread(subscription.interrupt) == []
    # Interrupted, it stays usable: what is published next arrives.
    nats.publish(b"7")
    assert subscription.wait(_TIMEOUT) == [CatalogNotification(7, None)]
    # An interrupt before the wait makes the next wait return at once.
    subscription.interrupt()
    assert subscription.wait(3600) == []
    assert wait_in_a_thread(subscription.close) == []
    # Closed, it returns at once, whatever is published; interrupting it is harmless.
    nats.publish(b"8")
    subscription.interrupt()
    assert subscription.wait(3600) == []


def test_a_connection_wakes_its_waiting_subscriptions_in_turn(subject: str) -> None:
    # Fifty watcher threads of a process woken at once by one message would contend for the GIL
    # together: a message wakes the first subscription waiting, and each the next as its wait
    # returns; one not waiting (its watcher busy) is passed over, its messages found at its next
    # wait; a subscription that closes on its turn passes it on.
    handoff = _Handoff()
    with NatsNotifications(f"nats://127.0.0.1:{free_port()}", subject) as nats:
        a, b, busy, d, e = (NatsSubscription(nats) for _ in range(5))

        def woken() -> list[bool]:
            return [s._ready.is_set() for s in (a, b, busy, d, e)]

        for waiting in (a, b, d, e):
            handoff.begin_wait(waiting)
        handoff.wake([a, b, busy, d, e])
        assert woken() == [True, False, False, False, False]
        handoff.wake([a, b])  # another message meanwhile: still one turn at a time
        assert woken() == [True, False, False, False, False]
        handoff.end_wait(a)
        assert woken() == [True, True, False, False, False]
        handoff.end_wait(b)
        assert woken() == [True, True, True, True, False]
        handoff.forget(d)
        assert woken() == [True, True, True, True, True]
        handoff.end_wait(e)
        # Nobody's turn now: the next message wakes the first waiting at once.
        for s in (a, b, busy, d, e):
            s._ready.clear()
        handoff.begin_wait(b)
        handoff.wake([a, b])
        assert woken() == [True, True, False, False, False]


def test_every_subscription_of_a_connection_receives_every_message_in_order(
    nats: NatsNotifications,
) -> None:
    # Woken in turn, none may be left behind: threads racing on their waits (interrupted at
    # random, some closing half way) each receive every message, in order, up to the last.
    rng = random.Random(17)
    count, messages = 16, 300
    subscriptions = [nats.subscribe() for _ in range(count)]
    closing = set(rng.sample(range(count), 3))
    received: list[list[int]] = [[] for _ in range(count)]

    def follow(index: int) -> None:
        # No timeout to fall back on: a wake left behind leaves the thread waiting for good.
        subscription = subscriptions[index]
        while len(received[index]) < messages:
            received[index] += [n.version for n in subscription.wait(3600)]
            if index in closing and len(received[index]) >= messages // 2:
                subscription.close()
                return

    threads = [threading.Thread(target=follow, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for version in range(1, messages + 1):
        nats.publish(str(version).encode())
        if rng.random() < 0.2:
            subscriptions[rng.randrange(count)].interrupt()
        if rng.random() < 0.1:
            time.sleep(0.002)
    deadline = time.monotonic() + _TIMEOUT
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads)
    for index, versions in enumerate(received):
        expected = list(range(1, len(versions) + 1))
        assert versions == expected, f"subscription {index}"
        assert len(versions) >= (messages // 2 if index in closing else messages)
    for subscription in subscriptions:
        subscription.close()


def test_subscribing_without_a_nats_server_fails_clearly(subject: str) -> None:
    with NatsNotifications(f"nats://127.0.0.1:{free_port()}", subject) as nats:
        assert not nats.connected
        with pytest.raises(NotificationsUnavailableError, match="not connected to NATS"):
            nats.subscribe()
        with pytest.raises(NotificationsUnavailableError):
            nats.publish(b"1")


def test_closing_while_still_connecting_leaves_no_task_behind(subject: str) -> None:
    # In a process of its own: a task destroyed while pending is reported when it is collected,
    # at the latest when the interpreter exits.
    script = (
        "from distribution.fanout import NatsNotifications\n"
        f"NatsNotifications('nats://127.0.0.1:{free_port()}', {subject!r}).close()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=_TIMEOUT, check=True
    )
    assert "Task was destroyed" not in done.stderr, done.stderr


@pytest.mark.parametrize("bad", ["", "a..b", "a.*", "a.>", "a b", ".a"])
def test_a_bad_subject_is_refused(bad: str) -> None:
    with pytest.raises(NotificationSubjectInvalidError):
        NatsNotifications("nats://127.0.0.1:4222", bad)


def test_relay_command_needs_nats_and_a_good_subject(database_url: str) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "distribution", "relay", "--database-url", database_url, *args],
            capture_output=True,
            text=True,
            timeout=_TIMEOUT,
            check=False,
        )

    missing = run()
    assert missing.returncode == 2
    assert "--nats" in missing.stderr
    bad = run("--nats", "nats://127.0.0.1:4222", "--subject", "a.*")
    assert bad.returncode == 1
    assert "invalid NATS subject" in bad.stderr
    for heartbeat in ("0", "nan", "inf"):
        refused = run("--nats", "nats://127.0.0.1:4222", "--heartbeat", heartbeat)
        assert refused.returncode == 2, refused.stderr
        assert "--heartbeat must be positive" in refused.stderr


@pytest.fixture(scope="module")
def pair(server_url: str) -> Iterator[StreamingPair]:
    yield from streaming_pair(server_url)


def test_nats_followers_reading_from_a_lagging_standby_never_go_back(
    pair: StreamingPair, small_nats_server: NatsServer, subject: str
) -> None:
    """The third layout: notifications through NATS, reads from a standby, writes on the primary."""
    nats_url = small_nats_server.url
    pair.resume_replay()
    with (
        CatalogStore.from_url(pair.primary_url) as primary,
        CatalogStore.from_url(pair.standby_url) as standby,
        NatsNotifications(nats_url, subject) as nats,
    ):
        current = primary.snapshot()
        routes = [
            RouteDescriptor(i + 1, b"" if i == 0 else i.to_bytes(2, "big"),
                            None if i == 299 else (i + 1).to_bytes(2, "big"), 1)
            for i in range(300)
        ]
        primary.save(current.version, routes)
        pair.wait_replayed()
        saved = primary.version()
        try:
            with (
                relay_and_probe(pair.primary_url, nats_url, subject, saved) as (relay, _),
                followers(standby, nats, 2) as running,
            ):
                wait_until(lambda: all(e.version == saved for _, e, _ in running), "start")
                pair.pause_replay()
                lagged = standby.version()
                split = [_split(primary) for _ in range(3)]
                # Carried by the messages: applied with no read of the standby.
                wait_until(lambda: all(e.version == split[-1] for _, e, _ in running), "splits")
                snapshot = primary.snapshot()
                moved = primary.save(
                    snapshot.version, [r._replace(group_id=2) for r in snapshot.routes]
                ).version
                # Too large for a message (the server's max_payload): the watchers read the
                # standby, which is behind them.
                wait_until(
                    lambda: all(
                        isinstance(w.last_error, CatalogVersionAheadError) for w, _, _ in running
                    ),
                    "the standby found behind",
                )
                assert all(e.version == split[-1] for _, e, _ in running)
                assert standby.version() == lagged
                pair.resume_replay()
                wait_until(lambda: all(e.version == moved for _, e, _ in running), "catching up")
                _assert_correct(primary, [e for _, e, _ in running])
                relay.stop()
        finally:
            pair.resume_replay()


def test_a_notification_payload_round_trips_with_u64_extremes() -> None:
    top = 2**64 - 1
    routes = (
        RouteDescriptor(top, b"", b"\x00" * 64, top, parent_route_id=top),
        RouteDescriptor(1, b"\xff" * 64, None, 1),
    )
    for change in (
        CatalogChange(top - 1, top, routes, (1, top), digest=-(2**63)),
        CatalogChange(0, 1, (), (), digest=2**63 - 1),
        CatalogChange(41, 42, routes, ()),
    ):
        parsed = parse_notification(format_notification(change))
        assert parsed.version == change.version
        assert parsed.change == change
        assert parsed.change is not None and parsed.change.digest == change.digest
    with pytest.raises(ValueError, match="one write"):
        format_notification(CatalogChange(5, 7, routes, ()))


# Enough routes that a save of them all is too large for a PostgreSQL notification (8,000 bytes):
# the catalog announces it by its version alone.
_LARGE = 500


def _save_many(store: CatalogStore, group_id: int) -> CatalogChange:
    """Save ``_LARGE`` routes (replacing the catalog's), returned as the change that wrote them."""
    starts = [b""] + [i.to_bytes(2, "big") for i in range(1, _LARGE)]
    ends: list[bytes | None] = [*starts[1:], None]
    version = store.version()
    routes = [
        RouteDescriptor(1000 + i, start, end, group_id)
        for i, (start, end) in enumerate(zip(starts, ends, strict=True))
    ]
    store.save(version, routes)
    [change] = store.changes_since(version, limit=1).changes
    assert len(format_notification(change).encode()) > 8000
    return change


def _record_syncs(
    running: list[tuple[CatalogWatcher, Engine, list[int]]],
) -> list[dict[int, int]]:
    """For each watcher, its ``syncs`` counter when it applied each version (a read counts
    before it applies what it read)."""
    recorded: list[dict[int, int]] = []
    for watcher, _, _ in running:
        syncs: dict[int, int] = {}

        def record(
            applied: CatalogChange | CatalogSnapshot,
            watcher: CatalogWatcher = watcher,
            syncs: dict[int, int] = syncs,
        ) -> None:
            syncs[applied.version] = watcher.syncs

        watcher.add_listener(record)
        recorded.append(syncs)
    return recorded


def test_a_change_too_large_for_a_notification_travels_whole_on_nats(
    store: CatalogStore, nats: NatsNotifications, relay: Relay, probe: Probe
) -> None:
    with followers(store, nats, 3) as running:
        wait_until(lambda: all(e.version == 1 for _, e, _ in running), "the first read")
        before = [w.syncs for w, _, _ in running]
        syncs = _record_syncs(running)
        change = _save_many(store, group_id=7)
        # The relay read the change and published it whole, digest included...
        probe.take(lambda n: n.version == change.version and n.change is not None, "the change")
        assert probe.received[-1].change == change
        assert probe.received[-1].change.digest == change.digest
        wait_until(lambda: all(e.version == change.version for _, e, _ in running), "watchers")
        head = store.head()
        for (_, engine, applied), seen, synced in zip(running, syncs, before, strict=True):
            # ... and the watchers applied it from the message, reading nothing.
            assert applied[-1] == change.version
            assert seen[change.version] == synced
            assert engine.digest == head.digest == change.digest
        _assert_correct(store, [e for _, e, _ in running])


def test_a_change_larger_than_a_nats_message_is_announced_by_its_version(
    database_url: str, store: CatalogStore, small_nats_server: NatsServer, subject: str
) -> None:
    url = small_nats_server.url
    _seed(store)
    with (
        NatsNotifications(url, subject) as nats,
        relay_and_probe(database_url, url, subject) as (relay, probe),
    ):
        with followers(store, nats, 2) as running:
            small = _split(store)
            wait_until(lambda: all(e.version == small for _, e, _ in running), "the split")
            before = [w.syncs for w, _, _ in running]
            syncs = _record_syncs(running)
            change = _save_many(store, group_id=8)
            probe.take(lambda n: n.version == change.version, "the large write")
            # Announced by its version alone, as soon as written (not by a heartbeat after a
            # failed publication)...
            assert probe.received[-1].change is None
            wait_until(
                lambda: all(e.version == change.version for _, e, _ in running), "watchers"
            )
            head = store.head()
            for (_, engine, _), seen, synced in zip(running, syncs, before, strict=True):
                # ... so each watcher read it.
                assert seen[change.version] > synced
                assert engine.digest == head.digest
            _assert_correct(store, [e for _, e, _ in running])
        # The small write before it travelled whole.
        assert any(n.version == small and n.change for n in probe.received)
        logged = relay.stop()
    assert "cannot publish" not in logged, logged


def test_a_change_the_relay_cannot_read_is_announced_by_its_version(
    database_url: str,
    store: CatalogStore,
    relays: Callable[..., Relay],
    probe: Probe,
    new_role: NewRole,
) -> None:
    # A relay allowed to read the catalog's version, not its routes: reading a change fails.
    relay_url = new_role(
        "relay2_relay",
        database_url,
        ["GRANT USAGE ON SCHEMA public TO {role}", "GRANT SELECT ON distribution_meta TO {role}"],
    )
    _seed(store)
    relay = relays(relay_url)
    probe.take(_catch_up(1), "the relay's catch-up")
    for group_id in (9, 10):
        version = _save_many(store, group_id).version
        probe.take(lambda n, v=version: n.version == v, f"version {version}")
        # Announced all the same, by its version alone.
        assert probe.received[-1].change is None
    small = _split(store)
    probe.take(lambda n: n.version == small, "the split")
    assert probe.received[-1].change is not None
    # Logged once for the two failed reads.
    assert relay.stop().count("cannot read the change") == 1

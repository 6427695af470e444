"""Catalog notifications fanned out through NATS: the relay, and the subscriptions watchers follow.

LISTEN holds one connection per service on the primary, cannot run on a hot standby and does not
pass through PgBouncer, so a default server (``max_connections = 100``) serves a few dozen
services. Past that, the notifications travel through NATS (the ``nats`` extra, ``nats-py``):

* a relay, :class:`CatalogRelay` (``distribution relay --nats URL``), LISTENs on the primary and
  publishes each write's notification payload on a NATS subject (default
  :data:`DEFAULT_SUBJECT`): the version, then the change and its digest as the catalog put them
  in the payload; for a change too large for a notification, which the catalog announces by its
  version alone, the relay reads the change once and publishes the same payload a small write's
  would be, unless it exceeds the NATS server's ``max_payload`` (then the version alone);
* a service follows the subject instead of LISTENing::

      nats = NatsNotifications("nats://127.0.0.1:4222")
      with CatalogWatcher(store, engine, notifications=nats.subscribe):
          ...
      nats.close()

  and reads the catalog (``store``, a standby's URL will do) only for its first snapshot, after
  a gap, and for changes too large for one NATS message.

Delivery is best effort, and every loss ends in a read of the catalog:

* several relays publish the same write: a watcher applies each version once (it ignores versions
  its Engine holds), so run two or more for availability; a connection hands a message identical
  to the one it received less than :data:`DUPLICATE_WINDOW` seconds before only to the
  subscriptions that did not get that one, so that the copies do not wake a process's watchers
  again;
* a relay that (re)connects to the primary cannot know what it missed meanwhile: it publishes the
  catalog's version, read just after it LISTENs ("catch-up", the version alone), and watchers
  behind it read the catalog; it does the same each time its NATS connection comes back;
* every ``heartbeat`` seconds a relay republishes the newest message it published (a write's
  change and digest, or a catch-up's version), with no statement on the primary, so a watcher
  that missed a message finds out within that time. The whole message, not the version alone: a
  watcher that holds that version unconfirmed would otherwise read the catalog to confirm it, and
  in a steady stream of writes every watcher holds its newest version unconfirmed, so each
  heartbeat would make the whole fleet read at once; the digest lets it check its Engine instead;
* a watcher's NATS connection drops: its subscription raises
  :class:`~distribution.NotificationsUnavailableError`, the watcher polls the catalog until NATS is
  back, subscribes again and reads what it missed.

The NATS client is asyncio; each :class:`NatsNotifications` runs one connection on an event loop
of its own, on a named background thread, and hands notifications to the threads that wait on its
subscriptions. Several watchers of one process share one connection, with a subscription each; the
connection holds one NATS subscription to the subject for all of them, and parses each message
once: every subscription receives the same (immutable)
:class:`~distribution.catalog.CatalogNotification`. With fifty watchers a process, delivering and
parsing each message fifty times cost more than applying it. The connection wakes the threads
waiting on its subscriptions in turn, each as the one before returns from its wait, rather than
all at once: fifty threads woken together contend for the GIL, each asking its holder every 5 ms
to drop it (with 1,000 watchers, 50 a process, on 2 cores: the last watcher's p99 from 848 to
390 ms, the fleet's CPU per write from 675 to 607 ms).

The fleet's roll calls and barrier (:mod:`distribution.catalog.fleet`) reach watchers following
NATS on the fleet subject, :attr:`NatsNotifications.fleet_subject` (the subject and ``.fleet``):
while a connection has subscriptions it holds one more NATS subscription, to that subject, and
hands each ask to every subscription, whose watcher answers by publishing its status on the reply
subject the ask names (:meth:`NatsSubscription.notify`). An asker subscribes to that reply subject
first (:meth:`NatsNotifications.fleet_inbox`). Answering reads nothing from the catalog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Coroutine, Iterable, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self, TypeVar

import psycopg

from distribution.catalog import (
    FLEET_CHANNEL,
    NOTIFY_CHANNEL,
    CatalogNotification,
    CatalogStore,
    parse_notification,
)
from distribution.catalog.notifications import format_notification, receive_notifies
from distribution.catalog.transactions import connection_engine, dedicated_connection
from distribution.database import translate_error
from distribution.errors import NotificationSubjectInvalidError, NotificationsUnavailableError
from distribution.models import u64_from_db

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

__all__ = [
    "DEFAULT_HEARTBEAT",
    "DEFAULT_SUBJECT",
    "DUPLICATE_WINDOW",
    "CatalogRelay",
    "FleetInbox",
    "NatsNotifications",
    "NatsSubscription",
    "check_subject",
]

_logger = logging.getLogger(__name__)
_T = TypeVar("_T")

#: The NATS subject catalog notifications travel on unless told otherwise.
DEFAULT_SUBJECT = "distribution.catalog"
#: Seconds between two heartbeats of a relay (the newest message it published, again).
DEFAULT_HEARTBEAT = 30.0
#: Seconds after a message during which the same message again (another relay's copy) reaches
#: only the subscriptions of the connection that did not get it.
DUPLICATE_WINDOW = 1.0
#: The longest wait between two attempts of a relay to reconnect to the primary.
MAX_RELAY_BACKOFF = 5.0
# How long a call into the NATS thread (subscribe, publish, close) may take.
_CALL_TIMEOUT = 5.0
# How long one wait of the relay for notifications lasts at most, so that a stop is seen promptly.
_WAIT_SLICE = 0.2
# Seconds between two attempts of the NATS client to reconnect (it never gives up).
_RECONNECT_WAIT = 0.5
# What a subscription is handed after its connection dropped: what follows may be missing.
_LOST: Final = object()
# A subscription is also handed the roll calls' asks, as the str payloads they are; it keeps
# at most this many for its watcher to take (anyone may publish asks, and a subscription whose
# owner never takes them must not grow).
_MAX_ASKS = 64
# How the relay reads the catalog's version on its listening connection (so that a relay holds
# one connection on the primary): the version, stored shifted as every u64 is.
_READ_VERSION = "SELECT version FROM distribution_meta"


def check_subject(subject: str) -> str:
    """Return ``subject`` if it is a NATS subject one can publish on; O(len(subject)).

    Raises :class:`~distribution.NotificationSubjectInvalidError` otherwise.

    >>> check_subject("distribution.catalog.eu")
    'distribution.catalog.eu'
    >>> check_subject("distribution.*")
    Traceback (most recent call last):
    ...
    distribution.errors.NotificationSubjectInvalidError: invalid NATS subject 'distribution.*': ...
    """
    if not isinstance(subject, str):
        raise TypeError(f"subject must be a str, got {type(subject).__name__}")
    tokens = subject.split(".")
    if (
        not subject
        or any(not token for token in tokens)
        or any(c.isspace() for c in subject)
        or any(token in ("*", ">") for token in tokens)
    ):
        raise NotificationSubjectInvalidError(
            f"invalid NATS subject {subject!r}: dot-separated non-empty tokens, no whitespace, "
            "no wildcard"
        )
    return subject


class _Handoff:
    """Wakes the subscriptions of one connection that wait for a message in turn, each as the
    one before it returns from its wait, rather than all at once.

    The watchers of a process woken together by one message would each wait for the GIL, and a
    thread that waits for it asks its holder to drop it every 5 ms: on a busy machine (2 cores,
    20 such processes) the GIL went round fifty threads a process while each applied its
    change. Woken in turn, two threads of a process contend at most: the one taking its
    messages, and the next.

    A subscription not waiting when its turn comes has its event set and is passed over: it
    finds its messages when it next waits. So the turn is only ever held by a thread inside its
    wait, which returns at once and passes it on; none is left behind.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # The subscriptions to wake, in order (an ordered set), and the one woken last that has
        # not yet passed its turn on.
        self._pending: dict[NatsSubscription, None] = {}
        self._turn: NatsSubscription | None = None

    def wake(self, subscriptions: Iterable[NatsSubscription]) -> None:
        """Queue ``subscriptions`` (their messages appended already) to be woken in turn; wakes
        the first now if no turn is under way. O(subscriptions)."""
        with self._lock:
            self._pending.update(dict.fromkeys(subscriptions))
            if self._turn is None:
                self._pass()

    def begin_wait(self, subscription: NatsSubscription) -> None:
        """``subscription``'s thread is about to wait for its event. O(1)."""
        with self._lock:
            subscription._waiting = True

    def end_wait(self, subscription: NatsSubscription) -> None:
        """``subscription``'s thread returned from its wait: the next one's turn, if this was
        its turn. O(1) amortized."""
        with self._lock:
            subscription._waiting = False
            if self._turn is subscription:
                self._pass()

    def forget(self, subscription: NatsSubscription) -> None:
        """``subscription`` closed: never its turn again. O(1) amortized."""
        with self._lock:
            self._pending.pop(subscription, None)
            if self._turn is subscription:
                self._pass()

    def clear(self) -> None:
        """The connection dropped: nothing more to wake in turn. O(subscriptions)."""
        with self._lock:
            self._pending.clear()
            self._turn = None

    def _pass(self) -> None:
        """Wake the next subscription waiting (under the lock), setting the events of those
        passed over on the way."""
        self._turn = None
        while self._pending:
            subscription = next(iter(self._pending))
            del self._pending[subscription]
            subscription._ready.set()
            if subscription._waiting:
                self._turn = subscription
                return


class NatsSubscription:
    """One subscription to the catalog subject: a :class:`~distribution.sources.NotificationSource`.

    Made by :meth:`NatsNotifications.subscribe`; :meth:`wait` runs on the caller's thread.
    """

    def __init__(self, owner: NatsNotifications) -> None:
        self._owner = owner
        # What the connection delivered, not yet taken; the event wakes the waiting thread (set
        # in turn by the connection's hand-off, or at once by interrupt() and a lost connection).
        self._items: deque[object] = deque()
        self._ready = threading.Event()
        # Whether the owner's thread is inside its wait (touched under the hand-off's lock).
        self._waiting = False
        self._closed = False
        # The asks received, for take(); touched by the waiting thread only.
        self._asks: list[str] = []

    def wait(self, timeout: float) -> list[CatalogNotification]:
        """Wait up to ``timeout`` seconds for messages; return the notifications they carry.

        Returns once one arrives (the connection wakes its waiting subscriptions one after
        another), with any others already received; messages that are not catalog
        notifications were logged and skipped (once, by the connection, whatever the number of
        subscriptions). :meth:`interrupt` makes it return at once
        (with what was received, usually nothing); once the subscription is closed it returns
        ``[]`` at once. Raises :class:`~distribution.NotificationsUnavailableError` once the
        connection dropped (what was published meanwhile never arrives). O(messages).
        A roll call's ask wakes it too (with no notification), and is kept for :meth:`take`.
        """
        if self._closed:
            return []
        if not self._items:
            handoff = self._owner._handoff
            handoff.begin_wait(self)
            self._ready.wait(max(0.0, timeout))
            handoff.end_wait(self)
        # Cleared before taking: whatever is delivered from now on sets it again.
        self._ready.clear()
        notifications = []
        received = []
        with contextlib.suppress(IndexError):
            while True:
                received.append(self._items.popleft())
        for item in received:
            if item is _LOST:
                raise NotificationsUnavailableError("lost the NATS connection")
            if isinstance(item, CatalogNotification):
                notifications.append(item)
            elif isinstance(item, str) and len(self._asks) < _MAX_ASKS:
                self._asks.append(item)
        return notifications

    def take(self, channel: str) -> list[str]:
        """The asks of the roll calls received by :meth:`wait` since the last call, for
        ``channel`` :data:`~distribution.catalog.FLEET_CHANNEL` (nothing else travels here): a
        :class:`~distribution.catalog.fleet.FleetLink`. O(1).

        >>> with NatsNotifications("nats://127.0.0.1:1") as nats:
        ...     NatsSubscription(nats).take(FLEET_CHANNEL)
        []
        """
        if channel != FLEET_CHANNEL or not self._asks:
            return []  # after every wait of its watcher: most often, nothing
        taken, self._asks = self._asks, []
        return taken

    def notify(self, channels: list[str], payload: str) -> None:
        """Publish ``payload`` (a roll call's reply) on the reply subject of each of
        ``channels``, the reply channels asks name: ``FLEET_SUBJECT.CHANNEL``. O(channels).

        Raises :class:`~distribution.NotificationsUnavailableError` while the connection is
        down.
        """
        subjects = [f"{self._owner.fleet_subject}.{channel}" for channel in channels]
        self._owner._call(self._owner._publish_all(subjects, payload.encode("utf-8")))

    def interrupt(self) -> None:
        """Wake the thread blocked in :meth:`wait` (else the next wait), which returns at once;
        the subscription stays usable. Any thread may call it, even once it is closed. O(1)."""
        self._ready.set()

    def _put(self, item: object) -> None:
        """Deliver ``item`` and wake the waiting thread now (not in turn)."""
        self._items.append(item)
        self._ready.set()

    def close(self) -> None:
        """Unsubscribe (a no-op once the connection dropped or closed), and :meth:`interrupt`
        a wait in progress; any thread may call it. O(1), not waiting."""
        self._closed = True
        self.interrupt()
        self._owner._unsubscribe(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class NatsNotifications:
    """A connection to NATS for catalog notifications: subscriptions for watchers, publishing for
    relays.

    The connection is made on a background thread named ``distribution-nats`` (its event loop) and
    kept: the client reconnects by itself, forever, every half second while the server is away.
    :meth:`subscribe` is a :data:`~distribution.sources.NotificationSourceFactory`. Close it with
    :meth:`close` (or use it as a context manager).
    """

    def __init__(
        self,
        servers: str | Sequence[str],
        subject: str = DEFAULT_SUBJECT,
        *,
        name: str = "distribution",
        logger: logging.Logger | None = None,
    ) -> None:
        # The ``nats`` extra, imported here: the rest of the library needs none of it.
        from nats.aio.client import Client as NatsClient

        self._servers = [servers] if isinstance(servers, str) else list(servers)
        if not self._servers:
            raise ValueError("no NATS server given")
        self._subject = check_subject(subject)
        self._name = name
        self._logger = logger or _logger
        #: How many times the connection was made, the first time included.
        self.connects = 0
        self._closing = False
        # Touched only on the loop's thread: the subscriptions, and the one NATS subscription
        # that feeds them all while there is any.
        self._subscriptions: set[NatsSubscription] = set()
        self._handle: Subscription | None = None
        # The NATS subscription to the fleet subject, held beside ``_handle``.
        self._asks_handle: Subscription | None = None
        # The last message received, what it carried, when it first came, and the subscriptions
        # that got it: a copy of it soon after (the other relays') goes only to those that did not.
        self._last_data = b""
        self._last_at = 0.0
        self._last: CatalogNotification | None = None
        self._had_last: set[NatsSubscription] = set()
        self._handoff = _Handoff()
        # Held while the NATS subscription is made or dropped: the watchers of a process
        # subscribe at the same time, and must neither make two nor return before it is held.
        self._handle_lock = asyncio.Lock()
        self._client: Client = NatsClient()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="distribution-nats", daemon=True)
        self._thread.start()
        # Connecting goes on in the background, until it succeeds or the connection is closed.
        self._connecting = asyncio.run_coroutine_threadsafe(self._connect(), self._loop)

    @property
    def subject(self) -> str:
        """The subject notifications travel on; O(1)."""
        return self._subject

    @property
    def fleet_subject(self) -> str:
        """The subject the fleet's roll calls travel on: the subject and ``.fleet``; O(1).

        >>> with NatsNotifications("nats://127.0.0.1:1", "catalog.eu") as nats:
        ...     nats.fleet_subject
        'catalog.eu.fleet'
        """
        return f"{self._subject}.fleet"

    @property
    def max_payload(self) -> int:
        """The largest message the NATS server takes, in bytes, as it told the client on
        connecting (the client's default, 1 MB, before that); O(1)."""
        return int(self._client.max_payload)

    @property
    def connected(self) -> bool:
        """Whether the connection to NATS is up now; O(1)."""
        return bool(self._client.is_connected)

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the connection to be up; return whether it is.
        O(timeout / 10 ms) checks."""
        deadline = time.monotonic() + timeout
        while not self.connected:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def subscribe(self) -> NatsSubscription:
        """Subscribe to the subject; the subscription receives what is published from now on.

        Returns once the server has the subscription (a round trip). Raises
        :class:`~distribution.NotificationsUnavailableError` while the connection is down.
        O(1).
        """
        subscription = NatsSubscription(self)
        self._call(self._subscribe(subscription))
        return subscription

    def publish(self, payload: bytes) -> None:
        """Publish ``payload`` on the subject; O(len(payload)).

        Raises :class:`~distribution.NotificationsUnavailableError` while the connection is
        down: what is not published then is not sent later either.
        """
        self._call(self._publish(payload))

    def fleet_inbox(self, channel: str) -> FleetInbox:
        """Subscribe to the reply subject of ``channel`` (a reply channel of the fleet's), for
        an asker of :mod:`distribution.catalog.fleet`. Raises
        :class:`~distribution.NotificationsUnavailableError` while the connection is down. O(1).
        """
        inbox = FleetInbox(self, check_subject(f"{self.fleet_subject}.{channel}"))
        inbox._handle = self._call(self._client.subscribe(inbox.subject, cb=inbox._receive))
        return inbox

    def close(self) -> None:
        """Close the connection and stop its thread; subscriptions then receive nothing. O(1)."""
        if not self._thread.is_alive():
            return
        self._closing = True
        self._connecting.cancel()
        try:
            self._call(self._client.close(), check=False)
        except Exception as exc:
            self._logger.debug("closing the NATS connection failed: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_CALL_TIMEOUT)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- on the caller's thread ----------------------------------------------------------------

    def _call(self, coroutine: Coroutine[Any, Any, _T], *, check: bool = True) -> _T:
        """Run ``coroutine`` on the loop's thread and return its result."""
        if check and not self.connected:
            coroutine.close()
            raise NotificationsUnavailableError(
                f"not connected to NATS ({', '.join(self._servers)})"
            )
        future: Future[_T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(_CALL_TIMEOUT)
        except NotificationsUnavailableError:
            raise
        except Exception as exc:
            future.cancel()
            raise NotificationsUnavailableError(f"NATS did not answer: {exc!r}") from exc

    def _unsubscribe(self, subscription: NatsSubscription) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._drop(subscription), self._loop)

    def _release(self, handle: Subscription) -> None:
        """Drop a fleet inbox's NATS subscription, not waiting."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._unsubscribe_handle(handle), self._loop)

    # -- on the loop's thread ------------------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        while True:
            try:
                self._loop.run_forever()
                break
            except Exception:
                self._logger.exception("the NATS event loop failed; going on")
        # Let the tasks still running (a connect in progress, cancelled by close) finish
        # cancelling: a task destroyed while pending would be reported as an error.
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        if pending:
            try:
                self._loop.run_until_complete(asyncio.wait(pending, timeout=_CALL_TIMEOUT))
            except Exception:
                self._logger.exception("the NATS event loop failed while stopping")
        self._loop.close()

    async def _connect(self) -> None:
        await self._client.connect(
            servers=self._servers,
            name=self._name,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=_RECONNECT_WAIT,  # type: ignore[arg-type]
            connect_timeout=2,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_connected,
        )
        await self._on_connected()

    async def _on_connected(self) -> None:
        self.connects += 1
        self._logger.info("connected to NATS (%s)", ", ".join(self._servers))

    async def _on_disconnected(self) -> None:
        lost, self._subscriptions = self._subscriptions, set()
        self._had_last = set()
        if self.connects and not self._closing:
            self._logger.warning("lost the NATS connection; reconnecting")
        self._handoff.clear()
        for subscription in lost:
            subscription._put(_LOST)
        await self._unsubscribe_quietly()

    async def _on_error(self, exc: Exception) -> None:
        # Reconnection attempts fail once every half second while the server is away.
        self._logger.debug("NATS: %r", exc)

    async def _subscribe(self, subscription: NatsSubscription) -> None:
        if not self._client.is_connected:
            raise NotificationsUnavailableError("not connected to NATS")
        async with self._handle_lock:
            if self._handle is None:
                self._handle = await self._client.subscribe(self._subject, cb=self._deliver)
                self._asks_handle = await self._client.subscribe(
                    self.fleet_subject, cb=self._deliver_ask
                )
                # The round trip makes the server hold the subscription before the caller reads
                # the catalog: whatever is written after that read reaches the subscription.
                # Once it is held, joining the set (on this thread, between two deliveries) is
                # enough.
                await self._client.flush(timeout=int(_CALL_TIMEOUT))
            self._subscriptions.add(subscription)

    async def _deliver(self, message: Msg) -> None:
        data = message.data
        now = time.monotonic()
        if (
            data == self._last_data
            and self._last is not None
            and now - self._last_at < DUPLICATE_WINDOW
        ):
            # Another relay's copy of the message just received. A watcher that got it would only
            # wake to find it holds it already: a fleet woken twice a write, at the moment it
            # applies it, for nothing. One that subscribed since still gets it. Later copies (a
            # heartbeat) go to all: a watcher that gave up on it (a standby that never reached
            # its version) takes it up again.
            notification = self._last
            targets = self._subscriptions - self._had_last
        else:
            try:
                notification = parse_notification(data.decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                # Anyone who may publish on the subject can send anything: skip what is not ours.
                self._logger.warning("ignored a malformed catalog notification from NATS: %s", exc)
                return
            self._last_data, self._last, self._last_at = data, notification, now
            self._had_last = set()
            targets = self._subscriptions
        for subscription in targets:
            subscription._items.append(notification)
        self._handoff.wake(targets)
        self._had_last |= targets

    async def _deliver_ask(self, message: Msg) -> None:
        # Parsed by each watcher's FleetMember, which logs what is malformed.
        ask = message.data.decode("utf-8", "replace")
        for subscription in self._subscriptions:
            subscription._items.append(ask)
        self._handoff.wake(self._subscriptions)

    async def _drop(self, subscription: NatsSubscription) -> None:
        self._handoff.forget(subscription)
        self._had_last.discard(subscription)
        if subscription in self._subscriptions:
            self._subscriptions.discard(subscription)
            async with self._handle_lock:
                if not self._subscriptions:
                    await self._unsubscribe_quietly()

    async def _unsubscribe_quietly(self) -> None:
        handles = (self._handle, self._asks_handle)
        self._handle = self._asks_handle = None
        for handle in handles:
            if handle is not None:
                await self._unsubscribe_handle(handle)

    async def _unsubscribe_handle(self, handle: Subscription) -> None:
        try:
            await handle.unsubscribe()
        except Exception as exc:  # closed or draining: the subscription is gone anyway
            self._logger.debug("unsubscribing failed: %r", exc)

    async def _publish(self, payload: bytes) -> None:
        await self._client.publish(self._subject, payload)

    async def _publish_all(self, subjects: list[str], payload: bytes) -> None:
        for subject in subjects:
            await self._client.publish(subject, payload)


class FleetInbox:
    """The replies to one asker's roll calls: a subscription to its reply subject, made by
    :meth:`NatsNotifications.fleet_inbox`; :meth:`receive` runs on the caller's thread."""

    def __init__(self, owner: NatsNotifications, subject: str) -> None:
        self._owner = owner
        self.subject = subject
        self._queue: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._handle: Subscription | None = None

    def ask(self, payload: str) -> None:
        """Publish ``payload`` (an ask naming this inbox) on the fleet subject. The server holds
        this inbox's subscription already (it was made earlier on the same connection), so no
        reply can miss it. Raises :class:`~distribution.NotificationsUnavailableError` while the
        connection is down. O(len(payload)).
        """
        subjects = [self._owner.fleet_subject]
        self._owner._call(self._owner._publish_all(subjects, payload.encode("utf-8")))

    def receive(self, timeout: float) -> list[str]:
        """Wait up to ``timeout`` seconds for replies; return those that arrived (returning at
        the first, with any others already received). O(replies)."""
        try:
            received = [self._queue.get(timeout=max(0.0, timeout))]
        except queue.Empty:
            return []
        with contextlib.suppress(queue.Empty):
            while True:
                received.append(self._queue.get_nowait())
        return received

    def close(self) -> None:
        """Unsubscribe (not waiting); replies then stop arriving. O(1)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            self._owner._release(handle)

    async def _receive(self, message: Msg) -> None:
        self._queue.put(message.data.decode("utf-8", "replace"))


class CatalogRelay:
    """LISTENs on the catalog's primary and publishes every notification on NATS.

    Holds one connection on the primary, its listener, and reads over it: the catalog's version
    (one statement) each time it or the NATS connection comes back, and the change of a write
    whose notification was too large for PostgreSQL (8,000 bytes), so that a message carries it
    when it fits in the NATS server's ``max_payload`` (1 MB by default): the fleet's watchers then
    apply it from the message, rather than each reading it from the catalog. Such a write is
    published as its version alone when its change does not fit, or cannot be read (logged
    once, until a read succeeds again). :meth:`run` never raises: failures are logged (a warning
    at the start of an outage, one line when it ends) and retried with capped, jittered backoff.
    Counters: :attr:`published`, :attr:`changes_read`, :attr:`catch_ups`, :attr:`heartbeats`.
    """

    def __init__(
        self,
        catalog: CatalogStore,
        nats: NatsNotifications,
        *,
        heartbeat: float = DEFAULT_HEARTBEAT,
        logger: logging.Logger | None = None,
    ) -> None:
        if not 0 < heartbeat <= threading.TIMEOUT_MAX:
            raise ValueError(f"heartbeat must be positive seconds, got {heartbeat!r}")
        self._catalog = catalog
        self._nats = nats
        self._heartbeat = float(heartbeat)
        self._logger = logger or _logger
        #: The newest version published (a write's, a catch-up's), 0 before the first.
        self.version = 0
        # The message that published it, which heartbeats repeat.
        self._newest = b""
        self.published = 0
        #: How many of the writes published came with the change the relay read for them.
        self.changes_read = 0
        self.catch_ups = 0
        self.heartbeats = 0
        self._outage: str | None = None
        self._read_failing = False
        self._connects_seen = 0

    def run(self, stop: threading.Event) -> None:
        """Relay until ``stop`` is set, then close the listening connection and return. O(1)
        work per notification, but for a write announced by its version alone: one read of its
        change, O(routes it changed)."""
        listener: psycopg.Connection[Any] | None = None
        reads: CatalogStore | None = None
        backoff = _WAIT_SLICE
        next_heartbeat = time.monotonic() + self._heartbeat
        try:
            while not stop.is_set():
                if listener is None:
                    try:
                        listener = self._listen()
                    except Exception as exc:
                        self._failed("cannot LISTEN on the catalog database", exc)
                        stop.wait(backoff * random.uniform(0.5, 1.0))
                        backoff = min(backoff * 2, MAX_RELAY_BACKOFF)
                        continue
                    backoff = _WAIT_SLICE
                    # Reads over the listener: the relay's one connection on the primary.
                    reads = CatalogStore(connection_engine(listener))
                    self._connects_seen = -1  # catch up now, whatever NATS did meanwhile
                if self._nats.connects != self._connects_seen and self._nats.connected:
                    try:
                        self._catch_up(listener)
                    except Exception as exc:
                        self._lost(listener, exc)
                        listener = None
                        continue
                try:
                    payloads = self._receive(listener)
                except Exception as exc:
                    self._lost(listener, exc)
                    listener = None
                    continue
                assert reads is not None
                for payload in payloads:
                    self._relay(payload, reads)
                if time.monotonic() >= next_heartbeat:
                    next_heartbeat = time.monotonic() + self._heartbeat
                    if self._newest and self._send(self._newest):
                        self.heartbeats += 1
        finally:
            if listener is not None:
                listener.close()
            self._logger.info("relay stopped")

    def _listen(self) -> psycopg.Connection[Any]:
        connection = dedicated_connection(self._catalog.sa_engine)
        try:
            connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
        except psycopg.Error as exc:
            connection.close()
            raise translate_error(exc) from exc
        self._logger.info("relay listening on the catalog database")
        return connection

    def _catch_up(self, listener: psycopg.Connection[Any]) -> None:
        """Publish the catalog's version: watchers behind it read the catalog."""
        connects = self._nats.connects
        try:
            row = listener.execute(_READ_VERSION).fetchone()
        except psycopg.Error as exc:
            raise translate_error(exc) from exc
        assert row is not None, "the catalog has no metadata row"
        version = u64_from_db(row[0])
        payload = str(version).encode()
        if self._send(payload):
            self._connects_seen = connects
            self._published(version, payload)
            self.catch_ups += 1
            self._logger.info("relay published a catch-up at version %d", version)

    def _receive(self, listener: psycopg.Connection[Any]) -> list[str]:
        received = receive_notifies(listener, _WAIT_SLICE)
        return [notify.payload for notify in received if notify.channel == NOTIFY_CHANNEL]

    def _relay(self, payload: str, reads: CatalogStore) -> None:
        try:
            notification = parse_notification(payload)
        except ValueError as exc:
            # Anyone who can connect may NOTIFY the channel: what is not a write's is not relayed.
            self._logger.warning("not relayed: %s", exc)
            return
        completed = None if notification.change else self._with_change(notification.version, reads)
        encoded = completed or payload.encode("utf-8")
        if self._send(encoded):
            self._published(notification.version, encoded)
            self.published += 1
            self.changes_read += completed is not None

    def _with_change(self, version: int, reads: CatalogStore) -> bytes | None:
        """The message announcing the write of ``version`` with its change and digest, read
        from the catalog; None when it cannot be read or does not fit in a NATS message."""
        try:
            answer = reads.changes_since(version - 1, limit=1)
        except Exception as exc:
            # The version alone still reaches the watchers, which then read the change.
            level = logging.DEBUG if self._read_failing else logging.WARNING
            self._read_failing = True
            self._logger.log(level, "relay: cannot read the change of version %d: %s", version, exc)
            return None
        self._read_failing = False
        change = answer.changes[0] if answer.changes else None
        # Gone from the history window (a reset), or a write the catalog cannot vouch for.
        if change is None or change.version != version or change.digest is None:
            return None
        message = format_notification(change).encode("utf-8")
        return message if len(message) <= self._nats.max_payload else None

    def _published(self, version: int, payload: bytes) -> None:
        if version >= self.version:
            self.version = version
            self._newest = payload

    def _send(self, payload: bytes) -> bool:
        """Publish; on failure log (once an outage) and return False."""
        try:
            self._nats.publish(payload)
        except NotificationsUnavailableError as exc:
            self._failed("cannot publish on NATS", exc)
            return False
        self._recovered()
        return True

    def _lost(self, listener: psycopg.Connection[Any], exc: Exception) -> None:
        self._failed("lost the catalog database connection", exc)
        listener.close()

    def _failed(self, what: str, exc: BaseException) -> None:
        level = logging.WARNING if self._outage is None else logging.DEBUG
        self._outage = self._outage or what
        self._logger.log(level, "relay: %s: %s", what, exc)

    def _recovered(self) -> None:
        if self._outage is not None:
            self._logger.info("relay recovered (%s)", self._outage)
            self._outage = None

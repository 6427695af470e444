"""Mirroring the shared catalog into a service's Engine: :class:`CatalogWatcher`.

The watcher LISTENs for the notification every catalog write sends on commit. A small write
carries its change in the payload and is applied with no query at all; otherwise the watcher
asks :meth:`~distribution.CatalogStore.changes_since` for what it missed and applies it
incrementally, falling back to a full snapshot (a reset) when the history no longer reaches back
far enough or the changes do not continue from the Engine's version. Polling stays as the safety
net, since notifications are lost while disconnected: at most once a second while listening, every
``interval`` while not. A lost connection is retried with capped exponential backoff.

Every catalog read brings the catalog's route digest (see :func:`~distribution.codec.routes_digest`)
with its version, and the Engine keeps the digest of the routes it holds. At equal versions, a
digest that differs means the Engine holds other routes than the catalog: the watcher resets it
from a snapshot, logs a WARNING, counts it in :attr:`repairs` and reports an
:class:`~distribution.EngineDivergedError` in :attr:`last_error` until its next clean catalog
read. So does a change read from the catalog that does not apply to the Engine or does not leave
the digest it claims.

Anyone who can connect to the catalog database can NOTIFY its channel, so a notification is a
claim, never the truth. The watcher applies a change carried in a notification only when it moves
the Engine's version by exactly one, as a write does, and leaves the digest the notification
claims (the Engine refuses it otherwise, and the watcher reads the catalog instead). A version
applied that way is *unverified* until a catalog read confirms it, which the safety poll does
within a second. :attr:`verified_version` is the newest version confirmed (the Engine's version
when the watcher was given it counts as confirmed). A forged notification is therefore undone at
the next catalog read: a lie at a version the catalog then reaches differs in digest, and when the
catalog is behind an unverified version (a chain of lies ran ahead), the watcher goes back to the
catalog, a repair as above. A hot standby behind an unverified version may only be lagging (the
watcher reads from it while notifications come from the primary or a relay), so there the
watcher keeps the Engine, as below, and checks those versions once the standby has replayed them. With ``trust_notifications=False`` the watcher applies nothing a
notification carries: notifications only wake it, and it reads every change from the catalog (one
read for a burst of them).

The Engine never goes back behind :attr:`verified_version`: a watcher pointed at a lagging replica
(or a catalog restored from an older backup) applies nothing older, and reports the catalog behind
it in :attr:`last_error` until the catalog passes the Engine's version again (then, should the
catalog hold other routes at the Engine's version, a repair as above).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Self

from distribution.catalog import (
    DEFAULT_CHANGES_LIMIT,
    CatalogListener,
    CatalogNotification,
    CatalogStore,
    check_catalog_and_engine,
)
from distribution.catalog.fleet import FleetMember, WatcherStatus
from distribution.engine import Engine
from distribution.errors import (
    CatalogVersionAheadError,
    EngineDigestMismatchError,
    EngineDivergedError,
    EngineSnapshotVersionGapError,
    EngineSnapshotVersionStaleError,
)
from distribution.sources import NotificationSource, NotificationSourceFactory
from distribution.types import CatalogChange, CatalogHead, CatalogSnapshot

__all__ = ["DEFAULT_INTERVAL", "CatalogWatcher", "ChangeListener", "run_catalog_watcher"]

#: A callback told of what the watcher applied to the Engine: each change applied incrementally,
#: in version order, or the snapshot applied whole (the first load of a fresh Engine, or a reset).
ChangeListener = Callable[[CatalogChange | CatalogSnapshot], None]

_logger = logging.getLogger(__name__)

#: How often the watcher polls while it cannot listen, in seconds (the seed's 100 ms).
DEFAULT_INTERVAL = 0.1
#: How often the watcher polls while listening: the safety net for lost notifications.
LISTENING_POLL_INTERVAL = 1.0
#: The longest wait between two attempts to reconnect the listener.
MAX_RECONNECT_BACKOFF = 5.0
# How long one wait for notifications lasts at most, so that a stop is seen promptly.
_WAIT_SLICE = 0.2


class CatalogWatcher:
    """Keeps an Engine in step with a CatalogStore.

    Observability, readable at any time from any thread: :attr:`applied_version`,
    :attr:`verified_version`, :attr:`catalog_version` (the newest version seen), :attr:`lag`,
    :attr:`last_error`, :attr:`listening`, and the counters :attr:`syncs` (catalog reads),
    :attr:`resets` (full snapshots applied), :attr:`repairs` (resets of an Engine found holding
    other routes than the catalog, see the module's docstring), :attr:`notifications`
    (notifications received) and :attr:`errors` (failures, by type name); :meth:`status`
    gathers them.

    With ``trust_notifications=False``, notifications only wake the watcher, which reads every
    change from the catalog: for deployments that cannot restrict who connects to the catalog
    database (anyone who can may NOTIFY its channel).

    The watcher has a :attr:`name` (``program@host:pid`` unless given) and answers the roll
    calls of :mod:`distribution.catalog.fleet` while it listens; :meth:`wait_for` and
    :meth:`wait_caught_up` let any thread wait for a version.

    ``notifications`` opens the source of notifications to follow instead of LISTEN on the
    catalog's database (see :mod:`distribution.sources`); the catalog is still read for the first
    snapshot, gaps and changes too large for one notification.

    Listeners added with :meth:`add_listener` are told of every change the watcher applies, on
    the watcher's thread, once the Engine holds it.
    """

    def __init__(
        self,
        catalog: CatalogStore | None,
        engine: Engine | None,
        *,
        interval: float = DEFAULT_INTERVAL,
        logger: logging.Logger | None = None,
        listen: bool = True,
        trust_notifications: bool = True,
        name: str | None = None,
        notifications: NotificationSourceFactory | None = None,
    ) -> None:
        catalog, engine = check_catalog_and_engine(catalog, engine)
        self._fleet = FleetMember(name)
        if not 0 < interval <= threading.TIMEOUT_MAX:
            raise ValueError(
                f"interval must be positive and at most {threading.TIMEOUT_MAX:g} s, got {interval!r}"
            )
        self._catalog = catalog
        self._engine = engine
        self._interval = float(interval)
        self._logger = logger or _logger
        self._listen = listen
        self._trust_notifications = trust_notifications
        # Where notifications come from: LISTEN on the catalog's database unless told otherwise
        # (a NATS subscription, say: see distribution.fanout).
        self._notifications: NotificationSourceFactory = notifications or catalog.listen
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.catalog_version = 0
        self.last_error: BaseException | None = None
        self.listening = False
        self.syncs = 0
        self.resets = 0
        self.repairs = 0
        self.notifications = 0
        # The Engine's version before the first change the watcher took from a notification and
        # no catalog read has confirmed since; None when there is no such change.
        self._unverified_from: int | None = None
        #: Failures recorded in :attr:`last_error` so far, by the exception's type name.
        self.errors: Counter[str] = Counter()
        #: When (``time.time()``) the watcher last applied a change or snapshot; None: never.
        self.applied_at: float | None = None
        self._listeners: list[ChangeListener] = []
        self._created = time.monotonic()
        # Notified each time the watcher applies something: wakes wait_for.
        self._applied = threading.Condition()

    @property
    def logger(self) -> logging.Logger:
        """The logger in use: the one given, else this module's."""
        return self._logger

    @property
    def interval(self) -> float:
        """Seconds between polls while the watcher cannot listen."""
        return self._interval

    @property
    def trust_notifications(self) -> bool:
        """Whether the changes notifications carry are applied (checked against their digest)."""
        return self._trust_notifications

    @property
    def applied_version(self) -> int:
        """The catalog version the Engine holds."""
        return self._engine.version

    @property
    def verified_version(self) -> int:
        """The newest version of the Engine's that no notification alone vouches for; O(1).

        The versions the watcher applied from notifications only, above it, are confirmed (or
        undone) by its next catalog read. The watcher never takes the Engine back behind it.
        """
        unverified_from = self._unverified_from
        return self._engine.version if unverified_from is None else unverified_from

    @property
    def lag(self) -> int:
        """How many versions the Engine is behind the newest version seen."""
        return max(0, self.catalog_version - self._engine.version)

    @property
    def engine(self) -> Engine:
        """The Engine the watcher keeps in step."""
        return self._engine

    @property
    def name(self) -> str:
        """The name the watcher answers roll calls with."""
        return self._fleet.name

    def wait_for(self, version: int, timeout: float | None = None) -> bool:
        """Wait until the Engine holds ``version`` or newer: True, or False once ``timeout``
        seconds have passed. Any thread may call it; it wakes when the watcher applies a
        change (no polling). O(changes applied meanwhile).
        """
        with self._applied:
            return self._applied.wait_for(lambda: self._engine.version >= version, timeout)

    def wait_caught_up(self, timeout: float | None = None) -> bool:
        """Wait until the Engine holds the version the catalog has now (one catalog read), as
        :meth:`wait_for` does. Catalog errors propagate. O(1) reads.
        """
        began = time.monotonic()
        version = self._catalog.version()
        remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - began))
        return self.wait_for(version, remaining)

    def status(self, backend_pid: int = 0) -> WatcherStatus:
        """The watcher's state, as it answers a roll call (``backend_pid``: its listening
        connection's server process). O(1)."""
        error = self.last_error
        return WatcherStatus(
            name=self._fleet.name,
            host=self._fleet.host,
            pid=self._fleet.pid,
            applied_version=self.applied_version,
            catalog_version=self.catalog_version,
            lag=self.lag,
            listening=self.listening,
            last_error=None if error is None else f"{type(error).__name__}: {error}",
            uptime=round(time.monotonic() - self._created, 3),
            backend_pid=backend_pid,
            id=self._fleet.id,
        )

    def add_listener(self, listener: ChangeListener) -> None:
        """Call ``listener`` with each change (or snapshot) applied from now on; O(1).

        It runs on the watcher's thread, after the Engine holds the change, so it should return
        quickly; an exception it raises is logged and does not stop the watcher.
        """
        self._listeners.append(listener)

    def remove_listener(self, listener: ChangeListener) -> None:
        """Stop calling ``listener``; ValueError if it was not added. O(listeners)."""
        self._listeners.remove(listener)

    def sync_once(self) -> None:
        """Apply what the catalog has that the Engine lacks, and check the Engine against it.

        One catalog read when nothing changed (loads are kept): the catalog's version and digest,
        compared with the Engine's in O(1). Changes are applied incrementally; a reset applies a
        full snapshot. An Engine found holding other routes than the catalog is reset from a
        snapshot (a repair, see the module's docstring), as is one whose unverified versions the
        catalog has not reached. A race with another writer of the Engine (a stale snapshot) is
        not an error; catalog errors propagate, including
        :class:`~distribution.CatalogVersionAheadError` when the catalog is behind
        :attr:`verified_version` (the Engine then keeps its version).
        """
        while True:
            version = self._engine.version
            self.syncs += 1
            if version == 0:
                # A fresh Engine takes the catalog whole rather than replaying its history.
                snapshot = self._catalog.snapshot()
                self.catalog_version = snapshot.version
                if snapshot.version > 0:
                    self._apply_snapshot(snapshot, reset=False)
                return
            try:
                answer = self._catalog.changes_since(version, limit=DEFAULT_CHANGES_LIMIT)
            except CatalogVersionAheadError:
                self.syncs += 1
                head = self._catalog.head()
                self.catalog_version = head.version
                if head.version >= version:
                    continue  # the catalog moved on meanwhile
                if head.version < self.verified_version or head.standby:
                    # A lagging replica, or a restored backup: keep what was read. A standby
                    # behind notified versions may only lag: they are checked once it has them.
                    raise
                self._repair(
                    f"the catalog is at version {head.version}, behind the version {version} "
                    "the engine took from notifications: going back to the catalog"
                )
                return
            if answer.reset is not None:
                self._apply_snapshot(answer.reset, reset=True)
                return
            if answer.head is not None:
                # Read just now: the catalog holds nothing newer, whatever a notification said.
                self.catalog_version = answer.head.version
            if not answer.changes:
                self._check(answer.head)
                return
            try:
                self._apply_changes(answer.changes)
            except EngineSnapshotVersionStaleError:
                return
            except EngineSnapshotVersionGapError:
                # Another writer of the Engine moved it meanwhile: start over from a snapshot.
                self.syncs += 1
                self._apply_snapshot(self._catalog.snapshot(), reset=True)
                return
            except (EngineDigestMismatchError, ValueError) as exc:
                # The catalog's own changes do not fit the routes the Engine holds.
                self._repair(f"the catalog's changes after version {version} do not apply: {exc}")
                return
            if answer.changes[-1].digest is not None:
                # The Engine checked each change's digest: it holds what the catalog held then.
                self._unverified_from = None
            if len(answer.changes) < DEFAULT_CHANGES_LIMIT:
                self._check(answer.head)
                return

    def _check(self, head: CatalogHead | None) -> None:
        """Compare the Engine with the catalog's ``head``, just read; repair it if they differ."""
        if head is None or head.version != self._engine.version:
            return  # nothing to compare with, or another writer of the Engine moved it meanwhile
        if head.digest != self._engine.digest:
            self._repair(
                f"the engine holds other routes than the catalog at version {head.version} "
                f"(digest {self._engine.digest}, the catalog's {head.digest})"
            )
            return
        self._unverified_from = None

    def _repair(self, reason: str) -> None:
        """Reset the Engine from a snapshot of the catalog: it held routes the catalog does not."""
        self.syncs += 1
        snapshot = self._catalog.snapshot()
        if snapshot.version < self.verified_version:
            raise CatalogVersionAheadError(
                f"catalog version {self.verified_version} has not been reached: the catalog is "
                f"at version {snapshot.version}"
            )
        self._engine.reset(snapshot)
        self._unverified_from = None
        self.catalog_version = snapshot.version
        self.resets += 1
        self.repairs += 1
        self.last_error = EngineDivergedError(
            f"{reason}; reset the engine to the catalog at version {snapshot.version}"
        )
        self._logger.warning("catalog watcher repaired the engine: %s", self.last_error)
        self._tell(snapshot)

    def run(self, stop: threading.Event) -> None:
        """Sync at once, then keep the Engine in step until ``stop`` is set, then return.

        Read and apply failures are logged, recorded in :attr:`last_error`, and retried; they
        never end the loop.
        """
        self._guarded(self.sync_once)
        listener: NotificationSource | None = None
        backoff = self._interval
        next_connect = 0.0
        next_poll = time.monotonic() + LISTENING_POLL_INTERVAL
        try:
            while not stop.is_set():
                now = time.monotonic()
                if self._listen and listener is None and now >= next_connect:
                    listener = self._connect()
                    if listener is None:
                        next_connect = now + backoff
                        backoff = min(backoff * 2, MAX_RECONNECT_BACKOFF)
                    else:
                        backoff = self._interval
                        self._guarded(self.sync_once)  # catch up on what was missed meanwhile
                        next_poll = time.monotonic() + LISTENING_POLL_INTERVAL
                if listener is None:
                    stop.wait(self._interval)
                    self._guarded(self.sync_once)
                    continue
                try:
                    received = listener.wait(min(_WAIT_SLICE, max(0.0, next_poll - now)))
                except Exception as exc:
                    self._record(exc, "lost the catalog notification connection")
                    self._disconnect(listener)
                    listener = None
                    continue
                if received:
                    self._guarded(self._on_notifications, received)
                if time.monotonic() >= next_poll:
                    self._guarded(self.sync_once)
                    next_poll = time.monotonic() + LISTENING_POLL_INTERVAL
                self._answer_roll_calls(listener)
        finally:
            if listener is not None:
                self._disconnect(listener, stopping=True)

    def start(self) -> None:
        """Run the watcher on a background thread named ``distribution-catalog-watcher``."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("the watcher is already running")
        # Each run has its own stop event, so a run still winding down is never revived.
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self.run, args=(self._stop,), name="distribution-catalog-watcher", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the background thread and wait for it (up to ``timeout`` seconds)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _on_notifications(self, received: Sequence[CatalogNotification]) -> None:
        """Take what the notifications carry, then read the catalog once if any calls for it."""
        read = False
        for notification in received:
            self.notifications += 1
            self.catalog_version = max(self.catalog_version, notification.version)
            # Once a read is due, it brings whatever the rest carry: they are only counted.
            read = read or not self._take(notification)
        if read:
            self.sync_once()

    def _take(self, notification: CatalogNotification) -> bool:
        """Apply the change ``notification`` carries if trusted and it fits; False when only a
        catalog read can tell what the catalog holds."""
        version = self._engine.version
        change = notification.change
        if notification.version == version:
            if change is not None and change.digest is not None:
                return change.digest == self._engine.digest
            return self._unverified_from is None
        if notification.version < version:
            # A write older than what the Engine holds is news only when the Engine's versions
            # above it came from notifications: then one of the two was a lie.
            return notification.version <= self.verified_version
        if not self._trust_notifications or change is None or change.previous_version != version:
            return False
        try:
            self._apply_changes([change])
        except (
            EngineSnapshotVersionStaleError,
            EngineSnapshotVersionGapError,
            EngineDigestMismatchError,
            ValueError,
        ):
            return False  # moved meanwhile, or a change that does not fit (a forgery, say)
        if self._unverified_from is None:
            self._unverified_from = version
        return True

    def _apply_changes(self, changes: Sequence[CatalogChange]) -> None:
        before = self._engine.version
        self._engine.apply_changes(changes)
        for change in changes:
            if change.version > before:  # the Engine skips those it already holds
                self._tell(change)

    def _apply_snapshot(self, snapshot: CatalogSnapshot, *, reset: bool) -> None:
        self.catalog_version = max(self.catalog_version, snapshot.version)
        before = self._engine.version
        try:
            self._engine.apply_snapshot(snapshot)
        except EngineSnapshotVersionStaleError:
            return
        if self._engine.version == before:
            return  # another writer of the Engine got there first: nothing was applied
        self._unverified_from = None
        self._tell(snapshot)
        if reset:
            self.resets += 1
            self._logger.info("catalog watcher reset the engine to version %d", snapshot.version)

    def _tell(self, applied: CatalogChange | CatalogSnapshot) -> None:
        self._signal_applied()
        for listener in list(self._listeners):
            try:
                listener(applied)
            except Exception:
                self._logger.exception("a catalog watcher listener failed")

    def _signal_applied(self) -> None:
        self.applied_at = time.time()
        with self._applied:
            self._applied.notify_all()

    def _open_listener(self) -> NotificationSource:
        """The source of notifications; LISTENing on the catalog's database, it also answers
        roll calls (a watcher following another source holds no connection to answer on)."""
        listener = self._notifications()
        if isinstance(listener, CatalogListener):
            try:
                self._fleet.join(listener)
            except BaseException:
                listener.close()
                raise
        return listener

    def _answer_roll_calls(self, listener: NotificationSource) -> None:
        if not isinstance(listener, CatalogListener):
            return
        try:
            self._fleet.answer(listener, lambda: self.status(listener.backend_pid))
        except Exception as exc:
            # A lost connection shows at the next wait, which reconnects.
            self._logger.debug("catalog watcher could not answer a roll call: %s", exc)

    def _connect(self) -> NotificationSource | None:
        try:
            listener = self._open_listener()
        except Exception as exc:
            self._record(exc, "cannot listen for catalog notifications")
            return None
        self.listening = True
        self._logger.info("catalog watcher connected: listening for catalog notifications")
        return listener

    def _disconnect(self, listener: NotificationSource, *, stopping: bool = False) -> None:
        self.listening = False
        try:
            listener.close()
        except Exception as exc:
            # The source is dropped either way; a failure to close it must not end the loop.
            self._logger.debug("catalog watcher could not close its notification source: %s", exc)
        if stopping:
            self._logger.info("catalog watcher stopped")
        else:
            self._logger.info("catalog watcher disconnected: polling every %.3fs", self._interval)

    def _guarded(self, step: Callable[..., None], *args: object) -> None:
        """Run one step of the loop; log and record a failure instead of ending the loop.

        A failure (a repair too) stays in :attr:`last_error` until a later step reads the catalog
        cleanly: a step that only took notifications says nothing of the catalog (it may still be
        unreachable, or behind the Engine).
        """
        lag_before = self.lag
        syncs, repairs = self.syncs, self.repairs
        try:
            step(*args)
        except Exception as exc:
            self._record(exc, "catalog sync failed; will retry")
            return
        if self.repairs != repairs or (self.syncs == syncs and self.last_error is not None):
            return
        if self.last_error is not None or (lag_before and not self.lag):
            self._logger.info("catalog watcher caught up at version %d", self.applied_version)
        self.last_error = None

    def _record(self, exc: BaseException, what: str) -> None:
        first = self.last_error is None or isinstance(self.last_error, EngineDivergedError)
        self.last_error = exc
        self.errors[type(exc).__name__] += 1
        # The first failure of a run of them is a warning; repeats of an outage stay quiet.
        self._logger.log(logging.WARNING if first else logging.DEBUG, "%s: %s", what, exc)


def run_catalog_watcher(
    catalog: CatalogStore | None,
    engine: Engine | None,
    logger: logging.Logger | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run a :class:`CatalogWatcher` in the calling thread until ``stop`` is set (or forever)."""
    CatalogWatcher(catalog, engine, logger=logger).run(stop or threading.Event())

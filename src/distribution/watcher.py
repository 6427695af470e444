"""Mirroring the shared catalog into a service's Engine: :class:`CatalogWatcher`.

The watcher LISTENs for the notification every catalog write sends on commit. A small write
carries its change in the payload and is applied with no query at all; otherwise the watcher
asks :meth:`~distribution.CatalogStore.changes_since` for what it missed and applies it
incrementally, falling back to a full snapshot (a reset) when the history no longer reaches back
far enough or the changes do not continue from the Engine's version. Polling stays as the safety
net, since notifications are lost while disconnected: at most once a second while listening, every
``interval`` while not. A lost connection is retried with capped exponential backoff.

The Engine never goes back: a watcher pointed at a lagging replica (or a catalog restored from an
older backup) applies nothing older, and reports the catalog behind it in :attr:`last_error`
until the catalog passes the Engine's version again.

Anyone who can connect to the catalog database can NOTIFY its channel. The watcher applies a
change carried in a notification only when it moves the Engine's version by exactly one, as a
write does; beyond that, it trusts the roles that can connect (see README.md, "Roles and
privileges").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Self

from distribution.catalog import (
    DEFAULT_CHANGES_LIMIT,
    CatalogNotification,
    CatalogStore,
    check_catalog_and_engine,
)
from distribution.engine import Engine
from distribution.errors import (
    EngineSnapshotVersionGapError,
    EngineSnapshotVersionStaleError,
)
from distribution.sources import NotificationSource, NotificationSourceFactory
from distribution.types import CatalogChange, CatalogSnapshot

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
    :attr:`catalog_version` (the newest version seen), :attr:`lag`, :attr:`last_error`,
    :attr:`listening`, and the counters :attr:`syncs` (catalog reads), :attr:`resets` (full
    snapshots applied) and :attr:`notifications` (notifications received).

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
        notifications: NotificationSourceFactory | None = None,
    ) -> None:
        catalog, engine = check_catalog_and_engine(catalog, engine)
        if not 0 < interval <= threading.TIMEOUT_MAX:
            raise ValueError(
                f"interval must be positive and at most {threading.TIMEOUT_MAX:g} s, got {interval!r}"
            )
        self._catalog = catalog
        self._engine = engine
        self._interval = float(interval)
        self._logger = logger or _logger
        self._listen = listen
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
        self.notifications = 0
        self._listeners: list[ChangeListener] = []

    @property
    def logger(self) -> logging.Logger:
        """The logger in use: the one given, else this module's."""
        return self._logger

    @property
    def interval(self) -> float:
        """Seconds between polls while the watcher cannot listen."""
        return self._interval

    @property
    def applied_version(self) -> int:
        """The catalog version the Engine holds."""
        return self._engine.version

    @property
    def lag(self) -> int:
        """How many versions the Engine is behind the newest version seen."""
        return max(0, self.catalog_version - self._engine.version)

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
        """Apply what the catalog has that the Engine lacks; do nothing at all when up to date.

        One catalog read when nothing changed (loads are kept). Changes are applied
        incrementally; a reset applies a full snapshot. A race with another writer of the Engine
        (a stale snapshot) is not an error; catalog errors propagate, including
        :class:`~distribution.CatalogVersionAheadError` when the catalog is behind the Engine
        (which then keeps its version).
        """
        while True:
            version = self._engine.version
            self.syncs += 1
            if version == 0:
                # A fresh Engine takes the catalog whole rather than replaying its history.
                snapshot = self._catalog.snapshot()
                if snapshot.version > 0:
                    self._apply_snapshot(snapshot, reset=False)
                return
            answer = self._catalog.changes_since(version, limit=DEFAULT_CHANGES_LIMIT)
            if answer.reset is not None:
                self._apply_snapshot(answer.reset, reset=True)
                return
            if not answer.changes:
                # Read just now: the catalog holds nothing newer, whatever a notification said.
                self.catalog_version = version
                return
            self.catalog_version = max(self.catalog_version, answer.changes[-1].version)
            try:
                self._apply_changes(answer.changes)
            except EngineSnapshotVersionStaleError:
                return
            except EngineSnapshotVersionGapError:
                # Another writer of the Engine moved it meanwhile: start over from a snapshot.
                self.syncs += 1
                self._apply_snapshot(self._catalog.snapshot(), reset=True)
                return
            if len(answer.changes) < DEFAULT_CHANGES_LIMIT:
                return

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
                for notification in received:
                    self._guarded(self._on_notification, notification)
                if time.monotonic() >= next_poll:
                    self._guarded(self.sync_once)
                    next_poll = time.monotonic() + LISTENING_POLL_INTERVAL
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

    def _on_notification(self, notification: CatalogNotification) -> None:
        self.notifications += 1
        self.catalog_version = max(self.catalog_version, notification.version)
        if notification.version <= self._engine.version:
            return
        change = notification.change
        if change is not None and change.previous_version == self._engine.version:
            try:
                self._apply_changes([change])
                return
            except (EngineSnapshotVersionStaleError, EngineSnapshotVersionGapError):
                pass
        self.sync_once()

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
        self._tell(snapshot)
        if reset:
            self.resets += 1
            self._logger.info("catalog watcher reset the engine to version %d", snapshot.version)

    def _tell(self, applied: CatalogChange | CatalogSnapshot) -> None:
        for listener in list(self._listeners):
            try:
                listener(applied)
            except Exception:
                self._logger.exception("a catalog watcher listener failed")

    def _connect(self) -> NotificationSource | None:
        try:
            listener = self._notifications()
        except Exception as exc:
            self._record(exc, "cannot listen for catalog notifications")
            return None
        self.listening = True
        self._logger.info("catalog watcher connected: listening for catalog notifications")
        return listener

    def _disconnect(self, listener: NotificationSource, *, stopping: bool = False) -> None:
        self.listening = False
        listener.close()
        if stopping:
            self._logger.info("catalog watcher stopped")
        else:
            self._logger.info("catalog watcher disconnected: polling every %.3fs", self._interval)

    def _guarded(self, step: Callable[..., None], *args: object) -> None:
        """Run one step of the loop; log and record a failure instead of ending the loop."""
        lag_before = self.lag
        try:
            step(*args)
        except Exception as exc:
            self._record(exc, "catalog sync failed; will retry")
            return
        if self.last_error is not None or (lag_before and not self.lag):
            self._logger.info("catalog watcher caught up at version %d", self.applied_version)
        self.last_error = None

    def _record(self, exc: BaseException, what: str) -> None:
        first = self.last_error is None
        self.last_error = exc
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

"""Mirroring the shared catalog into a service's Engine: :class:`CatalogWatcher`.

The watcher LISTENs for the notification every catalog write sends on commit. A small write
carries its change in the payload and is applied with no query at all; otherwise the watcher
asks :meth:`~distribution.CatalogStore.changes_since` for what it missed and applies it
incrementally, falling back to a full snapshot (a reset) when the history no longer reaches back
far enough or the changes do not continue from the Engine's version.

One connection per service. Following its catalog's own database, a watcher opens one dedicated
connection and holds it: it LISTENs there, answers the fleet's roll calls there, and reads the
catalog there, its first snapshot included (notifications that arrive during a read wait for the
next wait). Its :class:`~distribution.CatalogStore`'s pool is never used by it. When the store
reads from a separate read engine (``CatalogStore.from_url(url, read_url=...)``: a hot standby,
or a PgBouncer before several), only LISTEN is on the primary and the reads go to the store; a
watcher given another source of notifications (``notifications=``, NATS say) holds no connection
of its own and reads through the store.

No statement while idle. A listening watcher sends nothing while nothing happens: liveness comes
from TCP keepalives (see :func:`~distribution.database.create_engine`) and, once its connection
has been quiet (no notification received, no statement sent) for ``heartbeat`` seconds
(:data:`DEFAULT_HEARTBEAT`, drawn anew between ``heartbeat`` and 1.5 times that so that a fleet
spreads), a heartbeat of one statement: the catalog's version, digest and recovery state
(``HEAD``). Its answer is also a check of the Engine, as below. A watcher that cannot listen
(``listen=False``, a hot standby, or its source of notifications unavailable) polls every
``interval`` seconds with that one statement, and reads more only when the catalog's version or
digest differs from the Engine's. A watcher whose connection turns out to be to a hot standby
(where LISTEN cannot run) says so once, at INFO, and polls.

Outages. A connection lost after a while is opened again at once; from then on, connecting and
the polls of an unreachable catalog back off: each wait is drawn at random between ``interval``
and ``interval * 2**attempt`` seconds, capped at :data:`MAX_BACKOFF`, so that a fleet that lost
its server (or found it full: "too many clients") does not come back all at once nor flood the
server's log. A listening watcher waits for notifications until its next deadline (a heartbeat,
a check), and :meth:`CatalogWatcher.stop` interrupts the wait. An outage is logged once,
as a WARNING when it starts (what failed), and once at INFO when it ends, at the first catalog
read that succeeds, not at the connection before it (its duration, the attempts it took, and how
the watcher follows the catalog now); until then :attr:`~CatalogWatcher.last_error` keeps the
failure. The first connection at start is one INFO line, later ones DEBUG; the attempts in
between are DEBUG lines, and counted in :attr:`CatalogWatcher.errors`.

Reads many watchers would make at once (those a notification calls for: a change it did not
carry, or a reset) wait a random delay of up to ``read_jitter`` seconds first
(:data:`DEFAULT_READ_JITTER`), which spreads a fleet's reads; the first read at start does not.
A read from a separate read engine (a standby), or from a hot standby, that is behind the newest
version notified is tried again after 20 ms, then 40 ms and so on, for :data:`STANDBY_WAIT`
seconds in all, then made on the primary (:attr:`CatalogStore.primary
<distribution.CatalogStore.primary>`) when the store has a separate read engine. A store that
reads from a hot standby only has no primary to ask: the watcher keeps the notified version as
:attr:`~CatalogWatcher.catalog_version` (so :attr:`~CatalogWatcher.lag` shows the Engine behind),
reports the standby behind it in :attr:`~CatalogWatcher.last_error`, and reads again every
:data:`RETRY_DELAY` seconds until the standby has it; a notification the standby never reaches (a
forged one, say) is given up :data:`VERIFY_MAX` seconds after it came, with a WARNING.

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
applied that way is *unverified* until a catalog read confirms it: once no notification has
arrived for :data:`VERIFY_QUIET` seconds, or, in a steady stream of them, once the oldest
unverified version is :data:`VERIFY_MAX` seconds old at the latest (a random age between half that
and that, drawn for each, so that a fleet fed the same stream does not read at once), the
watcher reads the catalog's ``HEAD``
(one statement) and checks them all at once; an idle watcher reads nothing. (In a stream of
writes a forgery is found sooner: the real write of its version comes with another digest.)
:attr:`verified_version` is the newest version confirmed (the Engine's version when the watcher
was given it counts as confirmed). A forged notification is therefore undone at the next catalog
read: a lie at a version the catalog then reaches differs in digest, and when the catalog is
behind an unverified version (a chain of lies ran ahead), the watcher goes back to the catalog, a
repair as above. A hot standby behind an unverified version may only be lagging (the watcher
reads from it while notifications come from the primary or a relay), so there the watcher keeps
the Engine, as below, and checks those versions once the standby has replayed them (or, with a
primary to ask, on the primary). With ``trust_notifications=False`` the watcher applies nothing a
notification carries: notifications only wake it, and it reads every change from the catalog (one
read for a burst of them).

The Engine never goes back behind :attr:`verified_version`: a watcher pointed at a lagging replica
(or a catalog restored from an older backup) applies nothing older, and reports the catalog behind
it in :attr:`last_error` until the catalog passes the Engine's version again (then, should the
catalog hold other routes at the Engine's version, a repair as above). While a failure stands,
the watcher reads the catalog's ``HEAD`` again every :data:`RETRY_DELAY` seconds (backing off
instead while the catalog cannot be reached).
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Self, cast

from distribution._retry import Backoff, Outage
from distribution.catalog import (
    DEFAULT_CHANGES_LIMIT,
    NOTIFY_CHANNEL,
    CatalogListener,
    CatalogNotification,
    CatalogStore,
    check_catalog_and_engine,
    statements,
)
from distribution.catalog.fleet import FleetLink, FleetMember, WatcherStatus
from distribution.engine import Engine
from distribution.errors import (
    CatalogUnavailableError,
    CatalogVersionAheadError,
    DistributionError,
    EngineDigestMismatchError,
    EngineDivergedError,
    EngineSnapshotVersionGapError,
    EngineSnapshotVersionStaleError,
)
from distribution.sources import NotificationSource, NotificationSourceFactory
from distribution.types import CatalogChange, CatalogHead, CatalogSnapshot

__all__ = [
    "DEFAULT_HEARTBEAT",
    "DEFAULT_INTERVAL",
    "DEFAULT_READ_JITTER",
    "MAX_BACKOFF",
    "RETRY_DELAY",
    "STANDBY_WAIT",
    "VERIFY_MAX",
    "VERIFY_QUIET",
    "CatalogWatcher",
    "ChangeListener",
    "run_catalog_watcher",
]

#: A callback told of what the watcher applied to the Engine: each change applied incrementally,
#: in version order, or the snapshot applied whole (the first load of a fresh Engine, or a reset).
ChangeListener = Callable[[CatalogChange | CatalogSnapshot], None]

_logger = logging.getLogger(__name__)

#: How often the watcher polls while it cannot listen, in seconds (the seed's 100 ms), and the
#: first wait of its backoff.
DEFAULT_INTERVAL = 0.1
#: Seconds of quiet on a listening connection before a heartbeat (one statement), at least.
DEFAULT_HEARTBEAT = 30.0
#: The longest random delay, in seconds, before a read a notification calls for.
DEFAULT_READ_JITTER = 0.25
#: Seconds without a notification after which the versions applied from notifications are
#: confirmed by a catalog read (one statement).
VERIFY_QUIET = 1.5
#: The age, in seconds, of the oldest unconfirmed version at which a steady stream of
#: notifications no longer puts off its confirmation, at the latest (each watcher draws an age
#: between half this and this for each, so that a fleet spreads its reads).
VERIFY_MAX = 15.0
#: Seconds between two catalog reads while a failure stands (a repair included, which a clean read
#: clears), the catalog reachable.
RETRY_DELAY = 1.0
#: The longest wait between two attempts to reach an unreachable catalog, in seconds.
MAX_BACKOFF = 10.0
#: How long, in seconds, a read from a standby behind the newest version notified is retried
#: before it is made on the primary.
STANDBY_WAIT = 1.0
# The first retry of such a read, in seconds; each next one waits twice as long.
_STANDBY_FIRST_RETRY = 0.02
# How long one wait for notifications lasts at most when a stop cannot interrupt it (a run given
# its own stop event, or a source without interrupt()).
_WAIT_SLICE = 1.0
# How long one wait lasts at most otherwise (it ends at the next deadline, most often, or when
# interrupted).
_MAX_WAIT = 3600.0


@functools.cache
def _brings_roll_calls(kind: type) -> bool:
    """Whether sources of type ``kind`` are :class:`FleetLink` s: asked once a type, as a
    protocol check costs microseconds and the watcher answers after every wait. O(1)."""
    return issubclass(kind, FleetLink)


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
    calls of :mod:`distribution.catalog.fleet` while it listens (over NATS when it follows a
    :class:`~distribution.fanout.NatsSubscription`); :meth:`wait_for` and
    :meth:`wait_caught_up` let any thread wait for a version.

    ``notifications`` opens the source of notifications to follow instead of LISTEN on the
    catalog's database (see :mod:`distribution.sources`); the catalog is still read for the first
    snapshot, gaps and changes too large for one notification.

    ``heartbeat`` (seconds, :data:`DEFAULT_HEARTBEAT`) is the quiet a listening connection keeps
    before one statement checks it (and the Engine); ``read_jitter`` (seconds,
    :data:`DEFAULT_READ_JITTER`; 0 turns it off) spreads the reads notifications call for; the
    module's docstring tells the whole connection model.

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
        heartbeat: float = DEFAULT_HEARTBEAT,
        read_jitter: float = DEFAULT_READ_JITTER,
    ) -> None:
        catalog, engine = check_catalog_and_engine(catalog, engine)
        self._fleet = FleetMember(name)
        for what, value in (("interval", interval), ("heartbeat", heartbeat)):
            if not 0 < value <= threading.TIMEOUT_MAX:
                raise ValueError(
                    f"{what} must be positive and at most {threading.TIMEOUT_MAX:g} s, "
                    f"got {value!r}"
                )
        if not 0 <= read_jitter <= threading.TIMEOUT_MAX:
            raise ValueError(
                f"read_jitter must be in 0..{threading.TIMEOUT_MAX:g} s, got {read_jitter!r}"
            )
        self._catalog = catalog
        self._engine = engine
        self._interval = float(interval)
        self._heartbeat = float(heartbeat)
        self._read_jitter = float(read_jitter)
        self._logger = logger or _logger
        self._listen = listen
        self._trust_notifications = trust_notifications
        # Where notifications come from: LISTEN on the catalog's database unless told otherwise
        # (a NATS subscription, say: see distribution.fanout).
        self._factory = notifications
        # Following its own database, the watcher holds one connection of its own, to read the
        # catalog over or to LISTEN on (on the primary, when reads go to a read engine).
        self._holds_connection = notifications is None and (listen or catalog.reads_from_primary)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # The newest version a catalog read or a notification told of, and the newest notified
        # version a hot standby with no primary to ask has yet to reach (0: none awaited): the
        # catalog's version is the greater (see catalog_version).
        self._catalog_version = 0
        self._awaited = 0
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
        # The running loop's state, touched by its thread only (see run; stop() only reads which
        # source to interrupt).
        self._halt = threading.Event()
        self._connection: CatalogListener | None = None
        self._source: NotificationSource | None = None
        self._reader: CatalogStore | None = None
        # Backoffs: of connecting (or subscribing), and of reads an unreachable catalog failed.
        self._link_retry = Backoff(self._interval, cap=MAX_BACKOFF)
        self._read_retry = Backoff(self._interval, cap=MAX_BACKOFF)
        self._linked_at = 0.0
        self._next_connect = 0.0
        self._next_poll = 0.0
        # When a catalog read is due again after a failure; None: none is.
        self._retry_at: float | None = None
        # When the last notification arrived, and when the Engine's oldest unverified version is
        # confirmed whatever notifications keep coming (``time.monotonic()``).
        self._notified_at = 0.0
        self._verify_by = 0.0
        # When the newest version notified so far was first notified (``time.monotonic()``).
        self._newest_notified_at = 0.0
        self._quiet_since = 0.0
        self._quiet_for = self._heartbeat
        self._standby = False
        # Whether the watcher said how it follows the catalog (at start, at INFO).
        self._told_how = False
        self._listen_refused = False
        # The catalog (or the source of notifications) unreachable: logged when it begins and ends.
        self._outage = Outage()

    @property
    def logger(self) -> logging.Logger:
        """The logger in use: the one given, else this module's."""
        return self._logger

    @property
    def interval(self) -> float:
        """Seconds between polls while the watcher cannot listen (and its backoff's first wait)."""
        return self._interval

    @property
    def heartbeat(self) -> float:
        """Seconds of quiet on the watcher's connection before a heartbeat, at least."""
        return self._heartbeat

    @property
    def read_jitter(self) -> float:
        """The longest random delay, in seconds, before a read a notification calls for."""
        return self._read_jitter

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
    def catalog_version(self) -> int:
        """The newest catalog version seen: read from the catalog, or notified and not yet
        reached by a hot standby the watcher can only read from (for :data:`VERIFY_MAX` seconds
        after the notification at most). O(1)."""
        return max(self._catalog_version, self._awaited)

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
        """Wait until the Engine holds the version the catalog has now (one catalog read, through
        the store's pool, on the calling thread), as :meth:`wait_for` does. Catalog errors
        propagate. O(1) reads.
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

        Reads through the store given (its pool), whatever the running watcher holds. One
        catalog read when nothing changed (loads are kept): the catalog's version and digest,
        compared with the Engine's in O(1). Changes are applied incrementally; a reset applies a
        full snapshot. An Engine found holding other routes than the catalog is reset from a
        snapshot (a repair, see the module's docstring), as is one whose unverified versions the
        catalog has not reached. A race with another writer of the Engine (a stale snapshot) is
        not an error; catalog errors propagate, including
        :class:`~distribution.CatalogVersionAheadError` when the catalog is behind
        :attr:`verified_version` (the Engine then keeps its version).
        """
        self._sync(self._catalog)

    def _sync(self, catalog: CatalogStore) -> None:
        """:meth:`sync_once`, reading ``catalog``."""
        while True:
            version = self._engine.version
            self.syncs += 1
            if version == 0:
                # A fresh Engine takes the catalog whole rather than replaying its history.
                snapshot = catalog.snapshot()
                self._catalog_version = snapshot.version
                if snapshot.version > 0:
                    self._apply_snapshot(snapshot, reset=False)
                return
            try:
                answer = catalog.changes_since(version, limit=DEFAULT_CHANGES_LIMIT)
            except CatalogVersionAheadError:
                self.syncs += 1
                head = catalog.head()
                self._catalog_version = head.version
                if head.version >= version:
                    continue  # the catalog moved on meanwhile
                self._behind(catalog, head)
                return
            if answer.reset is not None:
                self._apply_snapshot(answer.reset, reset=True)
                return
            if answer.head is not None:
                # Read just now: the catalog holds nothing newer, whatever a notification said.
                self._catalog_version = answer.head.version
                self._standby = answer.head.standby
            if not answer.changes:
                self._check(catalog, answer.head)
                return
            try:
                self._apply_changes(answer.changes)
            except EngineSnapshotVersionStaleError:
                return
            except EngineSnapshotVersionGapError:
                # Another writer of the Engine moved it meanwhile: start over from a snapshot.
                self.syncs += 1
                self._apply_snapshot(catalog.snapshot(), reset=True)
                return
            except (EngineDigestMismatchError, ValueError) as exc:
                # The catalog's own changes do not fit the routes the Engine holds.
                self._repair(
                    catalog, f"the catalog's changes after version {version} do not apply: {exc}"
                )
                return
            if answer.changes[-1].digest is not None:
                # The Engine checked each change's digest: it holds what the catalog held then.
                self._unverified_from = None
            if len(answer.changes) < DEFAULT_CHANGES_LIMIT:
                self._check(catalog, answer.head)
                return

    def _check_head(self, catalog: CatalogStore) -> None:
        """Read ``catalog``'s HEAD (one statement) and act on it (see :meth:`_follow`)."""
        self.syncs += 1
        self._follow(catalog, catalog.head())

    def _follow(self, catalog: CatalogStore, head: CatalogHead) -> None:
        """Bring the Engine to the catalog's ``head``, just read: nothing more to read when the
        Engine holds its version and digest; else its changes, a repair, or an error when the
        catalog is behind what the Engine may keep."""
        self._standby = head.standby
        version = self._engine.version
        self._catalog_version = head.version
        if head.version > version:
            self._sync(catalog)
        elif head.version == version:
            self._check(catalog, head)
        else:
            self._behind(catalog, head)

    def _behind(self, catalog: CatalogStore, head: CatalogHead) -> None:
        """The catalog's ``head`` is behind the Engine: keep the Engine (raising
        CatalogVersionAheadError) when the catalog may only lag, else go back to the catalog."""
        version = self._engine.version
        if head.version < self.verified_version or head.standby:
            # A lagging replica, or a restored backup: keep what was read. A standby behind
            # notified versions may only lag: they are checked once it has them.
            raise CatalogVersionAheadError(
                f"catalog version {version} has not been reached: the catalog is at version "
                f"{head.version}"
            )
        self._repair(
            catalog,
            f"the catalog is at version {head.version}, behind the version {version} "
            "the engine took from notifications: going back to the catalog",
        )

    def _check(self, catalog: CatalogStore, head: CatalogHead | None) -> None:
        """Compare the Engine with the catalog's ``head``, just read; repair it if they differ."""
        if head is None or head.version != self._engine.version:
            return  # nothing to compare with, or another writer of the Engine moved it meanwhile
        if head.digest != self._engine.digest:
            self._repair(
                catalog,
                f"the engine holds other routes than the catalog at version {head.version} "
                f"(digest {self._engine.digest}, the catalog's {head.digest})",
            )
            return
        self._unverified_from = None

    def _repair(self, catalog: CatalogStore, reason: str) -> None:
        """Reset the Engine from a snapshot of the catalog: it held routes the catalog does not."""
        self.syncs += 1
        snapshot = catalog.snapshot()
        if snapshot.version < self.verified_version:
            raise CatalogVersionAheadError(
                f"catalog version {self.verified_version} has not been reached: the catalog is "
                f"at version {snapshot.version}"
            )
        self._engine.reset(snapshot)
        self._unverified_from = None
        self._catalog_version = snapshot.version
        self.resets += 1
        self.repairs += 1
        self.last_error = EngineDivergedError(
            f"{reason}; reset the engine to the catalog at version {snapshot.version}"
        )
        self._logger.warning("catalog watcher repaired the engine: %s", self.last_error)
        self._tell(snapshot)

    def _read(self, step: Callable[[CatalogStore], None]) -> None:
        """Run ``step`` (a read and what follows it) on the watcher's reader.

        A reader on a separate read engine, or on a hot standby, that is behind the newest
        version seen when the read began is tried again, waiting 20 ms, then twice as long each
        time, for :data:`STANDBY_WAIT` seconds in all; then ``step`` reads from the primary when
        the store knows one. A hot standby with no primary to ask keeps the version notified as
        the catalog's (:attr:`lag` stays honest) and raises CatalogVersionAheadError, read again
        every :data:`RETRY_DELAY` seconds, until it reaches that version, or until
        :data:`VERIFY_MAX` seconds after the notification (a forged one, maybe): then what the
        standby says stands, with a WARNING. The Engine never goes back meanwhile (a standby
        behind it raises, and is tried again).
        """
        reader = self._reader
        assert reader is not None, "a read with no way to read"
        target = self.catalog_version
        if reader.reads_from_primary and not self._standby:
            step(reader)
            return
        if reader.reads_from_primary:
            # No primary to ask: while it lags, the standby's version is not the catalog's.
            self._awaited = target
        waited, delay = 0.0, _STANDBY_FIRST_RETRY
        while True:
            failure = None
            try:
                step(reader)
                if self._engine.version >= target:
                    self._awaited = 0
                    return
            except CatalogVersionAheadError as exc:
                failure = exc  # behind the Engine: lagging, or the primary will say
            if waited >= STANDBY_WAIT:
                break
            if self._halt.wait(delay):
                return  # stopping
            waited += delay
            delay = min(delay * 2, max(STANDBY_WAIT - waited, _STANDBY_FIRST_RETRY))
        if not reader.reads_from_primary:
            self._awaited = 0
            self._logger.debug(
                "the catalog's read engine is behind version %d after %.2fs: reading the primary",
                target,
                waited,
            )
            step(reader.primary)
            return
        if failure is not None:
            raise failure
        if time.monotonic() < self._newest_notified_at + VERIFY_MAX:
            raise CatalogVersionAheadError(
                f"catalog version {target} was notified but the hot standby read is at version "
                f"{self._catalog_version} after {waited:.2f}s"
            )
        self._awaited = 0
        self._logger.warning(
            "catalog watcher gave up waiting for version %d, notified %.0fs ago: the hot standby "
            "read is still at version %d, which stands",
            target,
            time.monotonic() - self._newest_notified_at,
            self._catalog_version,
        )

    def run(self, stop: threading.Event) -> None:
        """Connect, sync, then keep the Engine in step until ``stop`` is set, then return.

        Read and apply failures are logged, recorded in :attr:`last_error`, and retried; they
        never end the loop. Setting ``stop`` ends a sleep at once, and a wait for notifications
        within a second (:meth:`stop` interrupts it at once for a run it started).
        O(changes applied) a sync; nothing is sent while idle but the heartbeat.
        """
        self._halt = stop
        reads_over_connection = self._holds_connection and self._catalog.reads_from_primary
        self._reader = None if reads_over_connection else self._catalog
        self._link_retry.reset()
        self._read_retry.reset()
        self._next_connect = self._next_poll = 0.0
        self._retry_at = None
        try:
            while not stop.is_set():
                if self._wants_link() and time.monotonic() >= self._next_connect:
                    self._link()
                if self._source is None:
                    self._poll()
                else:
                    self._follow_source(self._source)
        finally:
            self._unlink(stopping=True)

    def _wants_link(self) -> bool:
        """Whether the watcher lacks its connection, or its source of notifications."""
        if self._holds_connection:
            return self._connection is None
        return self._factory is not None and self._source is None

    def _link(self) -> None:
        """Open what :meth:`_wants_link` says is missing, then read what was missed meanwhile."""
        try:
            if self._holds_connection:
                self._connect()
            else:
                self._source = self._open_source()
        except Exception as exc:
            self._record(exc, "cannot reach the catalog")
            self._next_connect = time.monotonic() + self._link_retry.next()
            return
        self._linked_at = time.monotonic()
        if self._source is not None:
            self.listening = True
        # Once at start; a reconnection is routine. An outage ends at the first read that
        # succeeds (a read may fail right after connecting), which says how the watcher follows.
        level = logging.DEBUG if self._told_how or self._outage.running else logging.INFO
        self._told_how = True
        self._logger.log(level, "catalog watcher connected: %s", self._how())
        self._quiet()
        if self._reader is not None:
            # The first sync, or what was missed meanwhile.
            self._read_guarded(self._read, self._check_head)
            self._next_poll = time.monotonic() + self._interval

    def _connect(self) -> None:
        """Open the watcher's own connection: read the catalog's HEAD there, then LISTEN unless
        the server is a hot standby (where LISTEN cannot run)."""
        connection = CatalogListener.open(self._catalog.sa_engine)
        try:
            head = statements.read_head(connection.sa_engine)
            if not head.standby and self._listen:
                self._try_listen(connection)
        except BaseException:
            self._source = None
            connection.close()
            raise
        self._connection = connection
        self._standby = head.standby
        if self._catalog.reads_from_primary:
            self._reader = CatalogStore(connection.sa_engine)

    def _try_listen(self, connection: CatalogListener) -> None:
        """LISTEN on ``connection`` and join the fleet there. Refused (for another reason than a
        lost connection, which propagates), the watcher polls over the connection meanwhile,
        and tries again after a backoff; the first refusal is a WARNING, repeats DEBUG."""
        try:
            # One round trip: a LISTEN that held while joining failed would leave notifications
            # queueing on a connection the watcher only polls over.
            self._fleet.join(connection, NOTIFY_CHANNEL)
        except CatalogUnavailableError:
            raise
        except DistributionError as exc:
            self.errors[type(exc).__name__] += 1
            self._logger.log(
                logging.DEBUG if self._listen_refused else logging.WARNING,
                "catalog watcher cannot listen for catalog notifications (%s): following the "
                "catalog by polling every %.3fs",
                exc,
                self._interval,
            )
            self._listen_refused = True
            self._next_connect = time.monotonic() + self._link_retry.next()
            return
        self._listen_refused = False
        self._source = connection

    def _how(self) -> str:
        """How the watcher follows the catalog now, for its log."""
        if self._source is not None:
            if self._source is self._connection:
                return "listening for catalog notifications"
            return "following its source of notifications"
        if self._standby:
            return (
                "on a hot standby, where LISTEN cannot run: following the catalog by polling "
                f"every {self._interval:.3f}s"
            )
        return f"following the catalog by polling every {self._interval:.3f}s"

    def _open_source(self) -> NotificationSource:
        """The source of notifications the watcher was given; a LISTENing one joins the fleet
        here (a NATS subscription brings the fleet's asks by itself)."""
        assert self._factory is not None
        source = self._factory()
        if isinstance(source, CatalogListener):
            try:
                self._fleet.join(source)
            except BaseException:
                source.close()
                raise
        return source

    def _unlink(self, *, stopping: bool = False) -> None:
        """Close the watcher's connection and source of notifications, if open."""
        was_listening = self.listening
        self.listening = False
        opened: list[NotificationSource] = [] if self._source is None else [self._source]
        if self._connection is not None and self._connection is not self._source:
            opened.append(self._connection)
        for source in opened:
            try:
                source.close()
            except Exception as exc:
                # Dropped either way; a failure to close must not end the loop.
                self._logger.debug("catalog watcher could not close its connection: %s", exc)
        self._source = self._connection = None
        if self._holds_connection and self._catalog.reads_from_primary:
            self._reader = None
        if stopping:
            self._logger.info("catalog watcher stopped")
        elif was_listening:
            # The failure that dropped the connection began an outage, which was said.
            self._logger.debug("catalog watcher disconnected: reconnecting")

    def _lost(self) -> None:
        """The connection (or source) was lost: drop it, and connect again at once the first
        time, then backing off (so that a server that keeps dropping the watcher is not flooded
        with connections) until a connection lives :data:`MAX_BACKOFF` seconds."""
        self._unlink()
        now = time.monotonic()
        if now - self._linked_at >= MAX_BACKOFF:
            self._link_retry.reset()
        delay = self._link_retry.next()
        self._next_connect = now + (delay if self._link_retry.attempts > 1 else 0.0)

    def _poll(self) -> None:
        """Not listening: read the catalog's HEAD every ``interval`` (backing off while it cannot
        be reached), and sleep until the next poll or connection attempt."""
        now = time.monotonic()
        if self._reader is not None and now >= self._next_poll:
            error = self._read_guarded(self._read, self._check_head)
            now = time.monotonic()
            if isinstance(error, CatalogUnavailableError):
                self._next_poll = now + self._read_retry.next()
            else:
                self._next_poll = now + self._interval
                if (
                    error is None
                    and self._listen
                    and not self._standby
                    and self._connection is not None
                    and self._source is None
                    and now >= self._next_connect
                ):
                    self._listen_again(self._connection)
        wakes = [self._next_poll] if self._reader is not None else []
        if self._wants_link():
            wakes.append(self._next_connect)
        self._halt.wait(max(0.0, min(wakes, default=now + _WAIT_SLICE) - now))

    def _listen_again(self, connection: CatalogListener) -> None:
        """The server the watcher polls may LISTEN now (a standby promoted, or a refusal that
        passed): try again."""
        try:
            self._try_listen(connection)
        except Exception as exc:
            self._record(exc, "cannot listen for catalog notifications")
            self._lost()
            return
        if self._source is None:
            return
        self.listening = True
        self._logger.info("catalog watcher connected: listening for catalog notifications")
        self._read_guarded(self._read, self._check_head)

    def _follow_source(self, source: NotificationSource) -> None:
        """Listening: wait for notifications (or for a check or heartbeat that falls due), take
        them, then make the check or heartbeat due, and answer roll calls."""
        if self._halt.is_set():
            return  # stop() may have looked for a source to interrupt before this one opened
        now = time.monotonic()
        connection = self._connection
        heartbeat_at = None if connection is None else self._quiet_since + self._quiet_for
        deadlines = (self._check_due(), heartbeat_at, self._slice_end(source, now))
        due = min(t for t in deadlines if t is not None)
        try:
            received = source.wait(max(0.0, due - now))
        except Exception as exc:
            self._record(exc, "lost the catalog notification connection")
            self._lost()
            return
        error = None
        if received:
            self._quiet()
            self._notified_at = time.monotonic()
            error = self._read_guarded(self._on_notifications, received)
        now = time.monotonic()
        check_at = self._check_due()
        if error is None and check_at is not None and now >= check_at:
            self._retry_at = None
            error = self._read_guarded(self._read, self._check_head)
        elif (
            error is None
            and connection is not None
            and heartbeat_at is not None
            and now >= heartbeat_at
        ):
            error = self._read_guarded(self._beat, connection)
        if self._source is not None:  # else the connection was lost reading
            self._answer_roll_calls(self._source)

    def _check_due(self) -> float | None:
        """When the catalog's HEAD is to be read next while listening: a retry after a failure,
        else the confirmation of unverified versions (a trailing debounce: once notifications
        pause, or once the oldest is old enough); None when nothing is due."""
        if self._retry_at is not None:
            # The retry confirms them too; a confirmation that failed is long due, and must not
            # cut the backoff short.
            return self._retry_at
        if self._unverified_from is not None:
            return min(self._notified_at + VERIFY_QUIET, self._verify_by)
        return None

    def _slice_end(self, source: NotificationSource, now: float) -> float:
        """When a wait must end so that a stop is seen: after a short slice, unless
        :meth:`stop` can interrupt it (a run under :meth:`start`)."""
        if self._halt is self._stop and hasattr(source, "interrupt"):
            return now + _MAX_WAIT
        return now + _WAIT_SLICE

    def _beat(self, connection: CatalogListener) -> None:
        """The heartbeat: the catalog's HEAD over the watcher's quiet connection (one statement),
        which also checks the Engine (read over the reader when it differs)."""
        self.syncs += 1
        head = statements.read_head(connection.sa_engine)
        if self._reader is not None and self._reads_over_connection():
            self._follow(self._reader, head)
        elif head.version != self._engine.version or head.digest != self._engine.digest:
            self._catalog_version = max(self._catalog_version, head.version)
            self._read(self._check_head)

    def _quiet(self) -> None:
        """The watcher's connection was used just now: the heartbeat waits again (a fresh draw,
        so that a fleet spreads)."""
        self._quiet_since = time.monotonic()
        self._quiet_for = random.uniform(self._heartbeat, 1.5 * self._heartbeat)

    def _read_guarded(self, step: Callable[..., None], *args: object) -> BaseException | None:
        """Run a step that may read the catalog, guarded (see :meth:`_guarded`); return its
        failure. A connection found lost is dropped, the loop reconnecting after a backoff."""
        syncs = self.syncs
        error = self._guarded(step, *args)
        now = time.monotonic()
        if self.syncs != syncs:
            self._quiet()
        if error is None:
            if self.syncs != syncs:
                self._read_retry.reset()
                if not self._wants_link():
                    self._end_outage()
        elif (
            isinstance(error, CatalogUnavailableError)
            and self._connection is not None
            and (self._connection.lost or self._reads_over_connection())
        ):
            self._lost()
            return error  # reconnecting reads again
        if isinstance(error, CatalogUnavailableError):
            self._retry_at = now + self._read_retry.next()
        elif error is not None or (self.last_error is not None and self._retry_at is None):
            # A failure (a repair included, to be cleared by a clean read) is read again.
            self._retry_at = now + RETRY_DELAY
        return error

    def _reads_over_connection(self) -> bool:
        return (
            self._connection is not None
            and self._reader is not None
            and self._reader.read_sa_engine is self._connection.sa_engine
        )

    def start(self) -> None:
        """Run the watcher on a background thread named ``distribution-catalog-watcher``; a
        RuntimeError if it runs already. Each run opens its connection anew. O(1)."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("the watcher is already running")
        # Each run has its own stop event, so a run still winding down is never revived.
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self.run, args=(self._stop,), name="distribution-catalog-watcher", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the background thread and wait for it (up to ``timeout`` seconds).

        Any thread may call it: it interrupts the wait for notifications in progress (the
        source's ``interrupt()``, which only wakes the waiting thread, so it is safe on a
        connection that thread is reading over), and the watcher's sleeps end at once. A read
        under way finishes first. O(1) besides the join.
        """
        self._stop.set()
        # The thread may be waiting for notifications with no deadline but its next heartbeat.
        # (None compared: a source that defines __len__ is false while empty.)
        source = self._source if self._source is not None else self._connection
        # Sources written before interrupt() joined the protocol lack it: their waits are sliced.
        interrupt = getattr(source, "interrupt", None)
        if interrupt is not None:
            interrupt()
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
        """Take what the notifications carry, then read the catalog once if any calls for it
        (after a random delay of up to ``read_jitter``, so that a fleet spreads its reads)."""
        read = False
        for notification in received:
            self.notifications += 1
            if notification.version > self.catalog_version:
                self._newest_notified_at = time.monotonic()
            self._catalog_version = max(self._catalog_version, notification.version)
            # Once a read is due, it brings whatever the rest carry: they are only counted.
            read = read or not self._take(notification)
        if not read:
            return
        if self._read_jitter > 0 and self._halt.wait(random.uniform(0, self._read_jitter)):
            return  # stopping
        self._read(self._sync)

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
            self._verify_by = time.monotonic() + random.uniform(VERIFY_MAX / 2, VERIFY_MAX)
        return True

    def _apply_changes(self, changes: Sequence[CatalogChange]) -> None:
        before = self._engine.version
        self._engine.apply_changes(changes)
        for change in changes:
            if change.version > before:  # the Engine skips those it already holds
                self._tell(change)

    def _apply_snapshot(self, snapshot: CatalogSnapshot, *, reset: bool) -> None:
        self._catalog_version = max(self._catalog_version, snapshot.version)
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

    def _answer_roll_calls(self, source: NotificationSource) -> None:
        """Answer the roll calls ``source`` brought, when it brings them (a listener, a NATS
        subscription: see :class:`~distribution.catalog.fleet.FleetLink`)."""
        if not _brings_roll_calls(type(source)):
            return
        # A source other than a listener holds no connection to the database.
        backend_pid = source.backend_pid if isinstance(source, CatalogListener) else 0
        try:
            self._fleet.answer(cast(FleetLink, source), lambda: self.status(backend_pid))
        except Exception as exc:
            # A lost connection shows at the next wait, which reconnects.
            self._logger.debug("catalog watcher could not answer a roll call: %s", exc)

    def _guarded(self, step: Callable[..., None], *args: object) -> BaseException | None:
        """Run one step of the loop; log and record a failure (returned) instead of ending the
        loop.

        A failure (a repair too) stays in :attr:`last_error` until a later step reads the catalog
        cleanly: a step that only took notifications says nothing of the catalog (it may still be
        unreachable, or behind the Engine).
        """
        lag_before = self.lag
        syncs, repairs = self.syncs, self.repairs
        try:
            step(*args)
        except Exception as exc:
            self._record(exc, "catalog sync failed")
            return exc
        if self.repairs != repairs or (self.syncs == syncs and self.last_error is not None):
            return None
        if self.last_error is not None or (lag_before and not self.lag):
            # The end of an outage is said once, with how the watcher follows the catalog.
            self._logger.log(
                logging.DEBUG if self._outage.running else logging.INFO,
                "catalog watcher caught up at version %d",
                self.applied_version,
            )
        self.last_error = None
        return None

    def _record(self, exc: BaseException, what: str) -> None:
        """Keep ``exc`` in :attr:`last_error` and count it; log the first failure of a run of
        them as a WARNING (an outage, for an unreachable catalog or source), repeats at DEBUG."""
        previous = self.last_error
        self.last_error = exc
        self.errors[type(exc).__name__] += 1
        if isinstance(exc, ConnectionError):
            first = self._outage.failed()
            self._logger.log(
                logging.WARNING if first else logging.DEBUG,
                "%s: %s; retrying with backoff until it answers",
                what,
                exc,
            )
            return
        first = previous is None or isinstance(previous, EngineDivergedError)
        self._logger.log(logging.WARNING if first else logging.DEBUG, "%s: %s; will retry", what, exc)

    def _end_outage(self) -> None:
        """The catalog was read again, the connection (or the source of notifications) open:
        end the outage running, if any, saying so once, at INFO, with how the watcher follows
        the catalog now."""
        ended = self._outage.end()
        if ended is None:
            return
        self._logger.info(
            "catalog watcher reached the catalog again after an outage of %.1fs "
            "(%d failed attempts): %s",
            *ended,
            self._how(),
        )


def run_catalog_watcher(
    catalog: CatalogStore | None,
    engine: Engine | None,
    logger: logging.Logger | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run a :class:`CatalogWatcher` in the calling thread until ``stop`` is set (or forever);
    see :meth:`CatalogWatcher.run`."""
    CatalogWatcher(catalog, engine, logger=logger).run(stop or threading.Event())

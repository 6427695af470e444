"""The watchers following one catalog: roll calls over NOTIFY, and the barrier built on them.

Nothing is stored and an idle fleet sends nothing. A watcher's listening connection also LISTENs
on :data:`FLEET_CHANNEL` and names itself in its ``application_name``
(``distribution-watcher NAME``). An asker LISTENs on a reply channel of its own, NOTIFYs
:data:`FLEET_CHANNEL` with an ask, and every watcher that hears it replies on that channel with
its :class:`WatcherStatus`, in one ``pg_notify`` statement. Asked to report a version it has not
applied yet, a watcher replies again once it has (for as long as the ask allows).

``pg_stat_activity`` shows every role each session's ``application_name`` and server pid, so the
asker also knows which watchers are connected: one that does not answer (paused, stuck) is
reported as silent rather than missed. A watcher that cannot reach the database, or that polls
instead of listening (``listen=False``), has no session to see and cannot answer: the roll call
and the barrier cover the watchers connected to the catalog's database.

Any role that can connect may LISTEN, NOTIFY and read ``pg_stat_activity``'s names: a role that
can only read the catalog can ask and answer. By the same token, such a role could answer in a
watcher's place or pose as a silent one: the fleet trusts the roles that can connect, as the
catalog's notifications do (README.md, "Roles and privileges").

Every NOTIFY in a database wakes each listening server process of that database, so one roll call
of N watchers costs the server O(N²) such wake-ups (each a read of the notification queue); an
idle fleet costs nothing.

Watchers following NATS (:mod:`distribution.fanout`) hold no connection to the database: they
answer over NATS instead, with the same asks and the same replies. Their connection subscribes to
the fleet subject (the catalog subject and ``.fleet``) beside the catalog subject; an asker given
``nats=`` subscribes to the reply subject of its reply channel (``SUBJECT.fleet.`` and the
channel: never the catalog subject, whatever an ask says), then publishes its ask on the fleet
subject, and each watcher publishes its reply there. :class:`FleetLink` is what
:meth:`FleetMember.answer` needs of either transport. NATS shows nobody who is subscribed, so
over NATS no watcher is listed as silent: a roll call collects the answers that arrive within its
window (and always takes all of it), and the barrier counts the watchers that answered within
``window`` of its ask (one that never answered is not waited for; one that answered but stopped
before reaching the version is a laggard). Answering costs a watcher no catalog read and the
database nothing. As with NOTIFY, whoever may publish on the fleet subject may ask, and answer in
a watcher's place: the fleet trusts those the NATS server lets publish there.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable

import psycopg

from distribution.catalog.notifications import receive_notifies
from distribution.catalog.transactions import dedicated_connection
from distribution.database import translate_error
from distribution.errors import WatcherNameError
from distribution.models import u64_from_db

if TYPE_CHECKING:
    from types import TracebackType

    from distribution.catalog.notifications import CatalogListener
    from distribution.catalog.store import CatalogStore
    from distribution.fanout import NatsNotifications

__all__ = [
    "DEFAULT_ROLL_CALL_WINDOW",
    "FLEET_CHANNEL",
    "MAX_WATCHER_NAME_BYTES",
    "WATCHER_APPLICATION_NAME",
    "BarrierResult",
    "FleetLink",
    "FleetMember",
    "FleetReport",
    "WatcherStatus",
    "check_watcher_name",
    "default_watcher_name",
    "parse_status",
    "roll_call",
    "silent_watcher",
    "status_payload",
    "wait_applied",
]

_logger = logging.getLogger(__package__)

#: The channel roll calls are asked on.
FLEET_CHANNEL = "distribution_fleet"
#: What a watcher's listening connection starts its ``application_name`` with.
WATCHER_APPLICATION_NAME = "distribution-watcher"
#: The longest watcher name, in UTF-8 bytes (a reply must fit in one NOTIFY payload).
MAX_WATCHER_NAME_BYTES = 256
#: How long a roll call waits for the watchers it sees connected to answer, at most.
DEFAULT_ROLL_CALL_WINDOW = 1.0

# A reply channel: the fleet channel, an underscore and hex digits (never the catalog's channel,
# whatever an ask says).
_REPLY_CHANNEL = re.compile(rf"{FLEET_CHANNEL}_[0-9a-f]{{1,32}}")
# NOTIFY refuses payloads of 8000 bytes or more.
_MAX_PAYLOAD_BYTES = 7999
_MAX_ERROR_BYTES = 1024
# A watcher keeps at most this many asks to answer again once it reaches their version, each
# at most this long: an ask is anyone's to send.
_MAX_PENDING = 64
_MAX_ASK_SECONDS = 3600.0
# The most connections an ask names (a NOTIFY payload is under 8000 bytes).
_MAX_ONLY = 500
# How often a waiting barrier looks for watchers that connected meanwhile.
_RECHECK_SECONDS = 0.25
_MARKER = f"{WATCHER_APPLICATION_NAME} "
_MARKER_PATTERN = _MARKER.replace("_", r"\_") + "%"
_VERSION = "SELECT version FROM distribution_meta"
_SESSIONS = (
    "SELECT pid, application_name FROM pg_stat_activity "
    "WHERE datname = current_database() AND application_name LIKE %s"
)


@dataclass(frozen=True, slots=True)
class WatcherStatus:
    """One watcher as it answered a roll call, or a connected watcher that did not answer.

    ``backend_pid`` is the server process of its listening connection. A silent watcher (no
    answer: paused, stuck, or connected too late) has ``applied_version`` None, ``name`` taken
    from its connection's ``application_name`` (PostgreSQL keeps 63 bytes of it) and ``pid`` 0.
    ``uptime`` is in seconds since the watcher was created.
    """

    name: str
    host: str
    pid: int
    applied_version: int | None
    catalog_version: int | None
    lag: int | None
    listening: bool
    last_error: str | None
    uptime: float | None
    backend_pid: int
    id: str = ""

    @property
    def answered(self) -> bool:
        """Whether the watcher answered (False: only its connection was seen). O(1)."""
        return self.applied_version is not None

    def holds(self, version: int) -> bool:
        """Whether the watcher answered holding ``version`` or newer. O(1).

        >>> silent_watcher("w1", 42).holds(0)
        False
        """
        return self.applied_version is not None and self.applied_version >= version

    def to_json(self) -> dict[str, Any]:
        """The status as a JSON object (``answered`` included). O(1)."""
        return {**asdict(self), "answered": self.answered}


def silent_watcher(name: str, backend_pid: int) -> WatcherStatus:
    """The status of a connected watcher that did not answer. O(1)."""
    return WatcherStatus(name, "", 0, None, None, None, True, None, None, backend_pid)


def _laggards_first(watchers: Iterable[WatcherStatus]) -> tuple[WatcherStatus, ...]:
    return tuple(
        sorted(
            watchers,
            key=lambda w: (w.answered, w.applied_version or 0, w.name, w.host, w.pid),
        )
    )


@dataclass(frozen=True, slots=True)
class FleetReport:
    """One roll call: the catalog's version when asked, every watcher, laggards first, and the
    seconds from the ask to the last answer (or to the end of the window)."""

    catalog_version: int
    watchers: tuple[WatcherStatus, ...]
    elapsed: float

    @property
    def laggards(self) -> tuple[WatcherStatus, ...]:
        """The watchers behind ``catalog_version``, silent ones included. O(watchers)."""
        return tuple(w for w in self.watchers if not w.holds(self.catalog_version))


@dataclass(frozen=True, slots=True)
class BarrierResult:
    """What :func:`wait_applied` saw: whether every live watcher reached ``version``, how long
    that took (``elapsed``: seconds from the ask to the last arrival, or to the timeout), the last
    to arrive, and the laggards (with their last status) when not."""

    version: int
    reached: bool
    elapsed: float
    last: WatcherStatus | None
    watchers: tuple[WatcherStatus, ...]
    laggards: tuple[WatcherStatus, ...]


def default_watcher_name() -> str:
    """``program@host:pid``, the name of a watcher not given one. O(1)."""
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return f"{program or 'python'}@{socket.gethostname()}:{os.getpid()}"


def check_watcher_name(name: object) -> str:
    """Return ``name`` if it is a valid watcher name, else raise. O(len(name)).

    A name is a non-empty ``str`` of at most :data:`MAX_WATCHER_NAME_BYTES` UTF-8 bytes, with
    no NUL character: TypeError for another type, :class:`~distribution.WatcherNameError` else.

    >>> check_watcher_name("billing-7")
    'billing-7'
    >>> check_watcher_name("")
    Traceback (most recent call last):
    ...
    distribution.errors.WatcherNameError: a watcher name must not be empty
    """
    if not isinstance(name, str):
        raise TypeError(f"a watcher name must be a str, got {type(name).__name__}")
    if not name:
        raise WatcherNameError("a watcher name must not be empty")
    if "\0" in name:
        raise WatcherNameError("a watcher name must not contain NUL characters")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_WATCHER_NAME_BYTES:
        raise WatcherNameError(
            f"a watcher name is at most {MAX_WATCHER_NAME_BYTES} bytes in UTF-8, got {size}"
        )
    return name


# -- the watcher's side -------------------------------------------------------------------------


def _truncated(text: str, size: int) -> str:
    return text.encode("utf-8", "replace")[:size].decode("utf-8", "ignore")


def status_payload(status: WatcherStatus) -> str:
    """A reply's payload: the status as JSON, its last error cut to fit one NOTIFY. O(1).

    >>> status = WatcherStatus("w", "h", 1, 7, 7, 0, True, "x" * 9000, 2.5, 99, "ab")
    >>> len(status_payload(status)) <= 7999
    True
    """
    fields = status.to_json()
    del fields["answered"]
    error = status.last_error
    size = _MAX_ERROR_BYTES
    while True:
        fields["last_error"] = None if error is None else _truncated(error, size)
        payload = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
        if len(payload.encode()) <= _MAX_PAYLOAD_BYTES or not fields["last_error"]:
            return payload
        size //= 2


def parse_status(payload: str) -> WatcherStatus:
    """Parse a reply; ValueError when malformed. O(payload size).

    >>> status = WatcherStatus("w", "h", 1, 7, 7, 0, True, None, 2.5, 99, "ab")
    >>> parse_status(status_payload(status)) == status
    True
    """
    try:
        fields = json.loads(payload)
        status = WatcherStatus(**fields)
        for name, kinds in _REPLY_FIELDS.items():
            field = fields[name]
            if not isinstance(field, kinds) or (isinstance(field, bool) and bool not in kinds):
                raise TypeError(f"{name} is a {type(field).__name__}")
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"malformed roll call reply: {payload[:200]!r}") from exc
    return status


# The type(s) of each field of a reply.
_REPLY_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "host": (str,),
    "pid": (int,),
    "applied_version": (int,),
    "catalog_version": (int,),
    "lag": (int,),
    "listening": (bool,),
    "last_error": (str, type(None)),
    "uptime": (float, int),
    "backend_pid": (int,),
    "id": (str,),
}


@dataclass(frozen=True, slots=True)
class _Ask:
    reply: str
    version: int | None
    seconds: float
    #: The server pids of the listening connections that are to answer (None: every one).
    only: frozenset[int] | None


def _ask_payload(
    reply: str, version: int | None, seconds: float, only: Iterable[int] | None
) -> str:
    fields: dict[str, Any] = {"reply": reply, "version": version, "seconds": seconds}
    if only is not None:
        fields["only"] = sorted(only)
    return json.dumps(fields, separators=(",", ":"))


def _parse_ask(payload: str) -> _Ask:
    try:
        fields = json.loads(payload)
        reply, version, seconds = fields["reply"], fields["version"], float(fields["seconds"])
        if not isinstance(reply, str) or not _REPLY_CHANNEL.fullmatch(reply):
            raise ValueError("not a reply channel")
        if version is not None and (not isinstance(version, int) or version < 0):
            raise ValueError("not a version")
        only = fields.get("only")
        if only is not None:
            only = frozenset(only)
            if not all(isinstance(pid, int) for pid in only):
                raise ValueError("not server pids")
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"malformed roll call: {payload[:200]!r}") from exc
    return _Ask(reply, version, min(max(seconds, 0.0), _MAX_ASK_SECONDS), only)


@runtime_checkable
class FleetLink(Protocol):
    """Where a watcher takes roll calls and sends its replies: its
    :class:`~distribution.catalog.CatalogListener`, or a
    :class:`~distribution.fanout.NatsSubscription`."""

    def take(self, channel: str) -> list[str]:
        """The payloads received on ``channel`` (:data:`FLEET_CHANNEL`: the asks) since the
        last call. O(payloads)."""
        ...

    def notify(self, channels: list[str], payload: str) -> None:
        """Send ``payload`` to each reply channel of ``channels``. O(channels)."""
        ...


class FleetMember:
    """A watcher's side of the roll call: its name, and the asks it has still to answer.

    Used on the watcher's own thread: :meth:`join` when it starts listening, :meth:`answer`
    after each wait for notifications.
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = default_watcher_name() if name is None else check_watcher_name(name)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        #: Tells this watcher's replies apart from others' (a name need not be unique).
        self.id = uuid.uuid4().hex[:16]
        self._pending: dict[str, tuple[int, float]] = {}

    def join(self, listener: CatalogListener, *channels: str) -> None:
        """Listen for roll calls on ``listener``'s connection, and on ``channels`` too, and name
        it: one round trip, in which either all of it holds or none (a LISTEN left behind by a
        failed join would queue notifications nobody takes). O(channels).
        """
        listener.listen(
            FLEET_CHANNEL, *channels, application_name=f"{WATCHER_APPLICATION_NAME} {self.name}"
        )

    def answer(self, link: FleetLink, status: Callable[[], WatcherStatus]) -> None:
        """Answer the roll calls received on ``link``, and the asks whose version the Engine now
        holds.

        One :meth:`FleetLink.notify` for all of them (one ``pg_notify`` statement on a
        listener); nothing at all when there is nothing to answer. O(asks).
        """
        asks = link.take(FLEET_CHANNEL)
        if not asks and not self._pending:
            return
        current = status()
        applied = current.applied_version or 0
        now = time.monotonic()
        replies: set[str] = set()
        for payload in asks:
            try:
                ask = _parse_ask(payload)
            except ValueError as exc:
                _logger.warning("ignored a malformed roll call: %s", exc)
                continue
            if ask.only is not None and current.backend_pid not in ask.only:
                continue  # asked again, of the watchers that have not answered yet
            replies.add(ask.reply)
            room = ask.reply in self._pending or len(self._pending) < _MAX_PENDING
            if ask.version is not None and applied < ask.version and room:
                self._pending[ask.reply] = (ask.version, now + ask.seconds)
        for reply, (version, until) in list(self._pending.items()):
            if applied >= version:
                replies.add(reply)
            if applied >= version or now > until:
                del self._pending[reply]
        if replies:
            link.notify(sorted(replies), status_payload(current))


# -- the asker's side ---------------------------------------------------------------------------


class _Asker:
    """A dedicated connection LISTENing on a reply channel of its own."""

    def __init__(self, store: CatalogStore) -> None:
        self._connection = dedicated_connection(store.sa_engine)
        self.channel = f"{FLEET_CHANNEL}_{uuid.uuid4().hex}"
        self._listening = False

    def ask(
        self, version: int | None, seconds: float, only: Iterable[int] | None = None
    ) -> tuple[dict[int, str], int]:
        """Ask the fleet, or the watchers on the connections ``only`` names (LISTENing first,
        the first time); return :meth:`sessions` as they are just after the ask, and the
        catalog's version just before it. Two round trips: the ask commits (and so reaches the
        watchers) before the sessions are read."""
        if only is not None:
            only = list(only)
            if len(only) > _MAX_ONLY:
                only = None  # the payload must fit: ask everyone
        payload = _ask_payload(self.channel, version, seconds, only)
        try:
            with self._connection.pipeline():
                if not self._listening:
                    self._connection.execute(f"LISTEN {self.channel}")
                head = self._connection.execute(_VERSION)
                self._connection.execute("SELECT pg_notify(%s, %s)", [FLEET_CHANNEL, payload])
            row = head.fetchone()
        except psycopg.Error as exc:
            raise translate_error(exc) from exc
        self._listening = True
        return self.sessions(), 0 if row is None else u64_from_db(row[0])

    def sessions(self) -> dict[int, str]:
        """Server pid -> watcher name, of every watcher connected to this database."""
        try:
            rows = self._connection.execute(_SESSIONS, [_MARKER_PATTERN]).fetchall()
        except psycopg.Error as exc:
            raise translate_error(exc) from exc
        return _sessions(rows)

    def replies(self, timeout: float) -> list[tuple[WatcherStatus, float]]:
        """The replies that arrive within ``timeout`` (returning at the first), each with the
        time it was read."""
        received = receive_notifies(self._connection, timeout)
        return _parsed_replies(notify.payload for notify in received)

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class _NatsAsker:
    """A subscription to a reply subject of its own, on the fleet's NATS connection."""

    def __init__(self, nats: NatsNotifications) -> None:
        self.channel = f"{FLEET_CHANNEL}_{uuid.uuid4().hex}"
        self._inbox = nats.fleet_inbox(self.channel)

    def ask(self, version: int | None, seconds: float) -> None:
        """Ask every watcher following the subject (the inbox already subscribed)."""
        self._inbox.ask(_ask_payload(self.channel, version, seconds, None))

    def replies(self, timeout: float) -> list[tuple[WatcherStatus, float]]:
        """As :meth:`_Asker.replies`."""
        return _parsed_replies(self._inbox.receive(timeout))

    def close(self) -> None:
        self._inbox.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _parsed_replies(payloads: Iterable[str]) -> list[tuple[WatcherStatus, float]]:
    """The replies among ``payloads``, each with the time now; the others logged and skipped."""
    now = time.monotonic()
    parsed = []
    for payload in payloads:
        try:
            parsed.append((parse_status(payload), now))
        except ValueError as exc:
            _logger.warning("ignored a malformed roll call reply: %s", exc)
    return parsed


def _sessions(rows: Iterable[tuple[Any, ...]]) -> dict[int, str]:
    return {pid: name.removeprefix(_MARKER) for pid, name in rows}


def _silent(sessions: dict[int, str], answers: Iterable[WatcherStatus]) -> list[WatcherStatus]:
    answered = {status.backend_pid for status in answers}
    return [silent_watcher(name, pid) for pid, name in sessions.items() if pid not in answered]


def roll_call(
    store: CatalogStore,
    *,
    window: float = DEFAULT_ROLL_CALL_WINDOW,
    nats: NatsNotifications | None = None,
) -> FleetReport:
    """Ask every watcher of the catalog for its status; return them all, laggards first.

    Returns once every watcher connected to the database has answered, or after ``window``
    seconds with those that did not listed as silent. Nothing is written. O(watchers).

    Given ``nats``, asks the watchers following its subject instead, and returns after
    ``window`` seconds with those that answered (NATS cannot list the silent ones); the
    catalog's version is read from ``store``. Raises
    :class:`~distribution.NotificationsUnavailableError` while NATS cannot be reached.
    """
    if not window > 0:
        raise ValueError(f"window must be positive, got {window!r}")
    if nats is not None:
        return _roll_call_over_nats(store, nats, window)
    began = time.monotonic()
    with _Asker(store) as asker:
        asked = time.monotonic()
        sessions, catalog_version = asker.ask(None, 0.0)
        answers: dict[str, WatcherStatus] = {}
        asked_again = False
        while _silent(sessions, answers.values()):
            remaining = began + window - time.monotonic()
            if remaining <= 0:
                break
            if not asked_again and remaining < window / 2:
                # Watchers that connected after the ask never heard it: ask once more.
                asked_again = True
                sessions = asker.sessions()
                unanswered = [s.backend_pid for s in _silent(sessions, answers.values())]
                sessions, _ = asker.ask(None, 0.0, unanswered)
            for status, _ in asker.replies(min(remaining, window / 2)):
                answers[status.id] = status
        watchers = [*answers.values(), *_silent(sessions, answers.values())]
    return FleetReport(catalog_version, _laggards_first(watchers), time.monotonic() - asked)


def _roll_call_over_nats(
    store: CatalogStore, nats: NatsNotifications, window: float
) -> FleetReport:
    with _NatsAsker(nats) as asker:
        catalog_version = store.version()
        asked = time.monotonic()
        asker.ask(None, 0.0)
        answers: dict[str, WatcherStatus] = {}
        while (remaining := asked + window - time.monotonic()) > 0:
            for status, _ in asker.replies(remaining):
                answers[status.id] = status
    return FleetReport(catalog_version, _laggards_first(answers.values()), time.monotonic() - asked)


def wait_applied(
    store: CatalogStore,
    version: int,
    timeout: float,
    *,
    nats: NatsNotifications | None = None,
    window: float = DEFAULT_ROLL_CALL_WINDOW,
) -> BarrierResult:
    """Wait until every watcher connected to the catalog's database holds ``version``.

    The barrier: it asks the fleet for ``version``; each watcher answers at once, and again as
    soon as it applies that version. A watcher that connects during the wait is asked too and
    counted once it answers; one that disconnects before reaching the version is no longer
    waited for. Returns when all hold it, or after ``timeout`` seconds with the laggards (a
    silent watcher among them). Nothing is written. O(watchers) per round.

    Given ``nats``, asks the watchers following its subject instead, once: those that answer
    within ``window`` seconds of the ask (or ``timeout``, when shorter) are waited for, so the
    barrier returns no sooner than that; a watcher that subscribes later is not asked, and one
    that stops before reaching the version is a laggard (NATS cannot tell it left). Raises
    :class:`~distribution.NotificationsUnavailableError` while NATS cannot be reached.
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    if nats is not None:
        if not window > 0:
            raise ValueError(f"window must be positive, got {window!r}")
        return _wait_applied_over_nats(nats, version, timeout, window)
    began = time.monotonic()
    deadline = began + timeout
    answers: dict[str, WatcherStatus] = {}
    arrived: dict[str, float] = {}
    with _Asker(store) as asker:
        asked = time.monotonic()
        sessions, _ = asker.ask(version, timeout)
        next_check = began + _RECHECK_SECONDS
        while True:
            now = time.monotonic()
            behind = [s for s in answers.values() if not s.holds(version)]
            if (not behind and not _silent(sessions, answers.values())) or now >= next_check:
                # Everyone seen holds it (or it is time to look again): who is connected now?
                sessions = asker.sessions()
                for key, status in list(answers.items()):
                    if status.backend_pid not in sessions and key not in arrived:
                        del answers[key]  # gone before reaching the version
                if not behind and not _silent(sessions, answers.values()):
                    reached = True
                    break
                unanswered = [s.backend_pid for s in _silent(sessions, answers.values())]
                if unanswered:
                    sessions, _ = asker.ask(version, deadline - now, unanswered)
                next_check = now + _RECHECK_SECONDS
            if now >= deadline:
                reached = False
                break
            for status, at in asker.replies(min(deadline, next_check) - now):
                _arrive(answers, arrived, status, at, version)
        silent = _silent(sessions, answers.values())
    return _barrier(version, reached, asked, answers, arrived, silent)


def _wait_applied_over_nats(
    nats: NatsNotifications, version: int, timeout: float, window: float
) -> BarrierResult:
    answers: dict[str, WatcherStatus] = {}
    arrived: dict[str, float] = {}
    with _NatsAsker(nats) as asker:
        asked = time.monotonic()
        asker.ask(version, timeout)
        deadline = asked + timeout
        gathered = asked + min(window, timeout)
        while True:
            now = time.monotonic()
            if now >= gathered and all(s.holds(version) for s in answers.values()):
                reached = True
                break
            if now >= deadline:
                reached = False
                break
            for status, at in asker.replies((gathered if now < gathered else deadline) - now):
                _arrive(answers, arrived, status, at, version)
    return _barrier(version, reached, asked, answers, arrived, [])


def _arrive(
    answers: dict[str, WatcherStatus],
    arrived: dict[str, float],
    status: WatcherStatus,
    at: float,
    version: int,
) -> None:
    """Record a barrier's reply, and when it first held ``version``."""
    answers[status.id] = status
    if status.holds(version):
        arrived.setdefault(status.id, at)


def _barrier(
    version: int,
    reached: bool,
    asked: float,
    answers: dict[str, WatcherStatus],
    arrived: dict[str, float],
    silent: Iterable[WatcherStatus],
) -> BarrierResult:
    watchers = _laggards_first([*answers.values(), *silent])
    last = max(arrived, key=arrived.__getitem__, default=None)
    return BarrierResult(
        version=version,
        reached=reached,
        elapsed=time.monotonic() - asked,
        last=None if last is None else answers[last],
        watchers=watchers,
        laggards=tuple(w for w in watchers if not w.holds(version)),
    )

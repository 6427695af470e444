"""Catalog writes announced by PostgreSQL's NOTIFY: the payload and the listening connection.

Every write sends ``NOTIFY distribution_catalog`` inside its transaction, so the notification is
delivered only on commit. The payload starts with the new version in decimal; when the change was
small, a JSON body carrying it follows (see :func:`parse_notification`, and
:func:`format_notification` for the same payload built from a change).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import select
import socket
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import psycopg
import psycopg.sql
import sqlalchemy as sa

from distribution.catalog.transactions import connection_engine, dedicated_connection
from distribution.codec import decode_route_descriptor, encode_route_descriptor
from distribution.database import translate_error
from distribution.errors import CatalogUnavailableError
from distribution.types import CatalogChange, check_u64

__all__ = [
    "NOTIFY_CHANNEL",
    "CatalogListener",
    "CatalogNotification",
    "format_notification",
    "parse_notification",
    "receive_notifies",
]

# One logger for the whole package, as applications configure it: "distribution.catalog".
_logger = logging.getLogger(__package__)
# The longest single wait on a listening connection's socket, in seconds (poll takes an int of
# milliseconds).
_MAX_WAIT = 3600.0

#: The channel every catalog write notifies, on commit.
NOTIFY_CHANNEL = "distribution_catalog"


@dataclass(frozen=True, slots=True)
class CatalogNotification:
    """A catalog write announced by NOTIFY: its version and, when it was small, the change."""

    version: int
    change: CatalogChange | None


def parse_notification(payload: str) -> CatalogNotification:
    """Parse a ``distribution_catalog`` payload: the version in decimal, then maybe the change.

    The change, when present, is JSON: ``previous`` (the version before the write, so one less
    than ``version``: a write moves the catalog by exactly one), ``upserts`` (base64 seed route
    records), ``deletes`` (route ids) and, optionally, ``digest`` (the catalog's route digest
    after the write, a signed 64-bit integer, see :func:`~distribution.codec.routes_digest`),
    which becomes the change's ``digest``. Raises ValueError when malformed. O(payload size).

    >>> parse_notification("7")
    CatalogNotification(version=7, change=None)
    >>> parse_notification('7 {"previous": 6, "upserts": [], "deletes": [3]}').change
    CatalogChange(previous_version=6, version=7, upserts=(), deletes=(3,), digest=None)
    >>> parse_notification('7 {"previous": 6, "upserts": [], "deletes": [], "digest": -5}').change
    CatalogChange(previous_version=6, version=7, upserts=(), deletes=(), digest=-5)
    """
    head, _, body = payload.partition(" ")
    try:
        version = check_u64("version", int(head))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"malformed catalog notification: {payload[:200]!r}") from exc
    if not body:
        return CatalogNotification(version, None)
    try:
        fields = json.loads(body)
        upserts = tuple(decode_route_descriptor(base64.b64decode(r)) for r in fields["upserts"])
        deletes = tuple(check_u64("route_id", i) for i in fields["deletes"])
        previous = check_u64("previous", fields["previous"])
        digest = _check_digest(fields.get("digest"))
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"malformed catalog notification: {payload[:200]!r}") from exc
    if previous + 1 != version:
        raise ValueError(f"malformed catalog notification: {payload[:200]!r}")
    return CatalogNotification(
        version, CatalogChange(previous, version, upserts, deletes, digest=digest)
    )


def format_notification(change: CatalogChange) -> str:
    """The payload announcing ``change`` as the catalog's own notifications do (see
    :func:`parse_notification`, which reads it back), whatever its size: the version in decimal,
    then the JSON body, ``digest`` included when the change has one. O(change size).

    Raises ValueError for a change that is not one write (``previous_version + 1 != version``),
    which no payload can carry.

    >>> format_notification(CatalogChange(6, 7, (), (3,), digest=-5))
    '7 {"previous":6,"upserts":[],"deletes":[3],"digest":-5}'
    >>> from distribution.types import RouteDescriptor
    >>> change = CatalogChange(6, 7, (RouteDescriptor(2, b"k", None, 1),), (3,), digest=-5)
    >>> back = parse_notification(format_notification(change)).change
    >>> back == change and back.digest == change.digest
    True
    """
    if change.previous_version + 1 != change.version:
        raise ValueError(
            f"a notification carries one write, not versions {change.previous_version} to "
            f"{change.version}"
        )
    body: dict[str, object] = {
        "previous": change.previous_version,
        "upserts": [
            base64.b64encode(encode_route_descriptor(route)).decode("ascii")
            for route in change.upserts
        ],
        "deletes": list(change.deletes),
    }
    if change.digest is not None:
        body["digest"] = change.digest
    return f"{change.version} {json.dumps(body, separators=(',', ':'))}"


def _check_digest(value: object) -> int | None:
    """A payload's ``digest``: None when absent, else a signed 64-bit integer (ValueError)."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"digest must be an integer, got {type(value).__name__}")
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"digest must be a signed 64-bit integer, got {value}")
    return value


def receive_notifies(connection: psycopg.Connection[Any], timeout: float) -> list[psycopg.Notify]:
    """The notifications ``connection`` (LISTENing, in autocommit) receives within ``timeout``
    seconds: returns at the first, with any others already received. O(notifications).

    Raises :class:`~distribution.CatalogUnavailableError` when the connection is lost.
    """
    try:
        received = list(connection.notifies(timeout=max(0.0, timeout), stop_after=1))
        if received:
            received += connection.notifies(timeout=0)
    except psycopg.Error as exc:
        raise translate_error(exc) from exc
    return received


class CatalogListener:
    """A dedicated connection to the catalog's database, in autocommit, listening on
    :data:`NOTIFY_CHANNEL` (see :meth:`~distribution.CatalogStore.listen`), or made by
    :meth:`open` to listen once told to.

    The connection may carry the catalog's reads too: :attr:`sa_engine` is a SQLAlchemy engine
    over it alone, for a :class:`~distribution.CatalogStore` (so that a service that only watches
    holds one connection). Notifications that arrive during a read wait for the next
    :meth:`wait`. One thread at a time uses a listener; any thread may :meth:`interrupt` it.
    """

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self._connection = connection
        #: Payloads received on the other channels this connection LISTENs on, by channel.
        self._others: dict[str, list[str]] = {}
        self._sa_engine: sa.Engine | None = None
        # Written to by interrupt(): a wait watches it beside the connection's socket.
        self._wake, self._waker = socket.socketpair()
        self._wake.setblocking(False)
        # poll, not select: a process may hold more than FD_SETSIZE descriptors.
        self._poller = select.poll()
        for fd in (connection.fileno(), self._wake.fileno()):
            self._poller.register(fd, select.POLLIN)

    @classmethod
    def open(cls, sa_engine: sa.Engine) -> Self:
        """A connection of ``sa_engine``'s taken out of its pool for good, LISTENing on nothing
        yet (see :meth:`listen`): one connection attempt.

        Raises :class:`~distribution.CatalogUnavailableError` when the database cannot be reached.
        """
        return cls(dedicated_connection(sa_engine))

    @property
    def backend_pid(self) -> int:
        """The server process of the listening connection. O(1)."""
        return self._connection.info.backend_pid

    @property
    def lost(self) -> bool:
        """Whether the connection is closed, or was found broken. O(1)."""
        return self._connection.closed or self._connection.broken

    @property
    def sa_engine(self) -> sa.Engine:
        """A SQLAlchemy engine whose one connection is this listener's (see
        :func:`~distribution.catalog.transactions.connection_engine`); made on first use. O(1).
        """
        if self._sa_engine is None:
            self._sa_engine = connection_engine(self._connection)
        return self._sa_engine

    def listen(self, *channels: str, application_name: str | None = None) -> None:
        """LISTEN on ``channels`` too (the payloads of channels other than
        :data:`NOTIFY_CHANNEL` wait for :meth:`take`), and set the connection's
        ``application_name`` when given. One round trip.

        Raises :class:`~distribution.CatalogUnavailableError` when the connection is lost.
        """
        try:
            with self._connection.pipeline():
                if application_name is not None:
                    self._connection.execute(
                        "SELECT set_config('application_name', %s, false)", [application_name]
                    )
                for channel in channels:
                    self._connection.execute(
                        psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel))
                    )
        except psycopg.Error as exc:
            raise translate_error(exc) from exc
        for channel in channels:
            if channel != NOTIFY_CHANNEL:
                self._others.setdefault(channel, [])

    def take(self, channel: str) -> list[str]:
        """The payloads received on ``channel`` (see :meth:`listen`) since the last call. O(1)."""
        taken = self._others.get(channel)
        if not taken:
            return []
        self._others[channel] = []
        return taken

    def notify(self, channels: list[str], payload: str) -> None:
        """Send ``payload`` on each of ``channels``, in one statement; O(channels).

        Raises :class:`~distribution.CatalogUnavailableError` when the connection is lost.
        """
        try:
            self._connection.execute(
                "SELECT pg_notify(channel, %s) FROM unnest(%s::text[]) AS channel",
                [payload, channels],
            )
        except psycopg.Error as exc:
            raise translate_error(exc) from exc

    def wait(self, timeout: float) -> list[CatalogNotification]:
        """Wait up to ``timeout`` seconds for notifications; return those that arrived.

        Returns as soon as one arrives, with any others already received; payloads that are not
        the catalog's are logged and skipped. Those of the other channels it LISTENs on wake it
        too, and are kept for :meth:`take`. Raises
        :class:`~distribution.CatalogUnavailableError` when the connection is lost.
        O(notifications received).
        """
        parsed = []
        for notify in self._receive(timeout):
            if notify.channel != NOTIFY_CHANNEL and notify.channel in self._others:
                self._others[notify.channel].append(notify.payload)
                continue
            try:
                parsed.append(parse_notification(notify.payload))
            except ValueError as exc:
                # Anyone may NOTIFY the channel: a payload that is not ours is skipped.
                _logger.warning("ignored a malformed catalog notification: %s", exc)
        return parsed

    def _receive(self, timeout: float) -> list[psycopg.Notify]:
        """What arrived already (during a read, say), else what arrives within ``timeout``
        seconds, unless :meth:`interrupt` is called first."""
        received = receive_notifies(self._connection, 0)
        if received or timeout <= 0:
            return received
        try:
            ready = {fd for fd, _ in self._poller.poll(math.ceil(min(timeout, _MAX_WAIT) * 1000))}
        except OSError as exc:
            raise CatalogUnavailableError(f"the catalog database is unavailable: {exc}") from exc
        if self._wake.fileno() in ready:
            with contextlib.suppress(BlockingIOError):
                while self._wake.recv(64):
                    pass
            return []
        return receive_notifies(self._connection, 0) if ready else []

    def interrupt(self) -> None:
        """Make the :meth:`wait` in progress on another thread (else the next one) return at
        once, with nothing. Thread-safe; a no-op once closed. O(1)."""
        with contextlib.suppress(OSError):
            self._waker.send(b"\0")

    def close(self) -> None:
        """Close the connection (a later :meth:`interrupt` does nothing). O(1)."""
        self._connection.close()
        self._wake.close()
        self._waker.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

"""Every error the library raises on purpose.

One class per failure. Errors about invalid data also derive from :class:`ValueError`, a missing
route also from :class:`LookupError`, a refused privilege from :class:`PermissionError` and an
unreachable database from :class:`ConnectionError`, so callers can catch them either way::

    DistributionError
    ├── CatalogStoreRequiredError
    ├── EngineRequiredError
    ├── CatalogVersionMismatchError
    ├── CatalogVersionOverflowError
    ├── CatalogRouteIDOverflowError
    ├── CatalogSnapshotTooOldError
    ├── CatalogVersionAheadError
    ├── EngineSnapshotVersionStaleError
    ├── EngineSnapshotVersionGapError
    ├── EngineDigestMismatchError
    ├── EngineDivergedError
    ├── CatalogRouteNotFoundError             (+ LookupError)
    ├── CatalogPermissionError                (+ PermissionError)
    ├── CatalogUnavailableError               (+ ConnectionError)
    ├── CatalogReadOnlyError
    ├── CatalogPreparedStatementError
    ├── NotificationsUnavailableError         (+ ConnectionError)
    ├── CatalogNotMigratedError
    ├── CatalogUnversionedWriteError
    ├── CatalogVersionStepError
    ├── CatalogHistoryRemovalError
    ├── CatalogDigestWriteError
    ├── CatalogRouteIDRequiredError           (+ ValueError, and every class below)
    ├── CatalogGroupIDRequiredError
    ├── CatalogDuplicateRouteIDError
    ├── CatalogInvalidRouteRangeError
    ├── CatalogInvalidRouteStateError
    ├── CatalogRouteOverlapError
    ├── CatalogInvalidVersionRecordError
    ├── CatalogInvalidNextRouteIDError
    ├── CatalogInvalidRouteRecordError
    ├── CatalogInvalidRouteKeyError
    ├── CatalogRouteKeyIDMismatchError
    ├── CatalogSplitKeyAtBoundaryError
    ├── CatalogInvalidSplitKeyError
    ├── CatalogRoutesNotAdjacentError
    ├── CatalogRouteGroupMismatchError
    ├── CatalogRouteNotActiveError
    ├── CatalogInvalidStateTransitionError
    ├── CatalogRouteNotFencedError
    ├── EngineSnapshotDuplicateIDError
    ├── EngineSnapshotRouteOverlapError
    ├── EngineSnapshotRouteOrderError
    ├── RouteKeyTooLongError
    ├── CatalogInvalidActorError
    ├── CatalogInvalidRequestIDError
    ├── CatalogRequestMismatchError
    ├── CatalogDataError
    ├── WatcherNameError
    └── NotificationSubjectInvalidError

Arguments of the wrong type raise the built-in :class:`TypeError`; integers outside the unsigned
64-bit range raise the built-in :class:`ValueError`.

As in psycopg's ``errors`` module, a class whose error the catalog's server functions raise
carries that error's SQLSTATE as its ``sqlstate`` attribute, and a database error with that
SQLSTATE comes back as that class; so does the one error of PostgreSQL's own that has a class
here, a prepared statement a pooler mixed up:

>>> CatalogRouteNotFoundError.sqlstate.startswith("UD"), DistributionError.sqlstate
(True, None)
>>> CatalogPreparedStatementError.sqlstate
'42P05'

A value the database itself refuses (a data exception, SQLSTATE class 22, or a program limit
exceeded, class 54, such as a key too long for an index) comes back as a
:class:`CatalogDataError`, whose instance carries the database's SQLSTATE:

>>> CatalogDataError("index row size 2712 exceeds maximum 2704", sqlstate="54000").sqlstate
'54000'
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CatalogDataError",
    "CatalogDigestWriteError",
    "CatalogDuplicateRouteIDError",
    "CatalogGroupIDRequiredError",
    "CatalogHistoryRemovalError",
    "CatalogInvalidActorError",
    "CatalogInvalidNextRouteIDError",
    "CatalogInvalidRequestIDError",
    "CatalogInvalidRouteKeyError",
    "CatalogInvalidRouteRangeError",
    "CatalogInvalidRouteRecordError",
    "CatalogInvalidRouteStateError",
    "CatalogInvalidSplitKeyError",
    "CatalogInvalidStateTransitionError",
    "CatalogInvalidVersionRecordError",
    "CatalogNotMigratedError",
    "CatalogPermissionError",
    "CatalogPreparedStatementError",
    "CatalogReadOnlyError",
    "CatalogRequestMismatchError",
    "CatalogRouteGroupMismatchError",
    "CatalogRouteIDOverflowError",
    "CatalogRouteIDRequiredError",
    "CatalogRouteKeyIDMismatchError",
    "CatalogRouteNotActiveError",
    "CatalogRouteNotFencedError",
    "CatalogRouteNotFoundError",
    "CatalogRouteOverlapError",
    "CatalogRoutesNotAdjacentError",
    "CatalogSnapshotTooOldError",
    "CatalogSplitKeyAtBoundaryError",
    "CatalogStoreRequiredError",
    "CatalogUnavailableError",
    "CatalogUnversionedWriteError",
    "CatalogVersionAheadError",
    "CatalogVersionMismatchError",
    "CatalogVersionOverflowError",
    "CatalogVersionStepError",
    "DistributionError",
    "EngineDigestMismatchError",
    "EngineDivergedError",
    "EngineRequiredError",
    "EngineSnapshotDuplicateIDError",
    "EngineSnapshotRouteOrderError",
    "EngineSnapshotRouteOverlapError",
    "EngineSnapshotVersionGapError",
    "EngineSnapshotVersionStaleError",
    "NotificationSubjectInvalidError",
    "NotificationsUnavailableError",
    "RouteKeyTooLongError",
    "WatcherNameError",
]


class DistributionError(Exception):
    """Base class of every error the library raises on purpose."""

    #: The SQLSTATE the catalog's server functions raise this error with (class ``UD``, which
    #: PostgreSQL leaves to users), or the server's own it stands for (``42P05``, of
    #: :class:`CatalogPreparedStatementError`), or None for an error of no SQLSTATE. A class
    #: states its own as a class argument, ``class E(DistributionError, sqlstate="UD999")``.
    #: Not a ClassVar: a :class:`CatalogDataError` carries the SQLSTATE of the database error
    #: it stands for on the instance.
    sqlstate: str | None = None

    def __init_subclass__(cls, sqlstate: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.sqlstate = sqlstate


class CatalogStoreRequiredError(DistributionError):
    """A catalog store is required and none was given."""


class EngineRequiredError(DistributionError):
    """An Engine is required and none was given."""


class CatalogVersionMismatchError(DistributionError, sqlstate="UD001"):
    """The optimistic version check of a write failed: someone else wrote first."""


class CatalogVersionOverflowError(DistributionError, sqlstate="UD002"):
    """The next catalog version would exceed ``2**64 - 1``."""


class CatalogRouteIDOverflowError(DistributionError, sqlstate="UD003"):
    """The next route id would exceed ``2**64 - 1``."""


class CatalogSnapshotTooOldError(DistributionError):
    """The requested version is older than the history the catalog keeps."""


class CatalogVersionAheadError(DistributionError):
    """The requested version is newer than the catalog has reached (a lagging replica, say)."""


class EngineSnapshotVersionStaleError(DistributionError):
    """A snapshot or change is older than the version the Engine already holds."""


class EngineSnapshotVersionGapError(DistributionError):
    """Changes do not continue from the Engine's version: fall back to a full snapshot."""


class EngineDigestMismatchError(DistributionError):
    """A change does not produce the catalog digest it claims: it was not applied."""


class EngineDivergedError(DistributionError):
    """The Engine held other routes than the catalog at the same version (a forged notification,
    say): the watcher reset it from a snapshot."""


class CatalogRouteNotFoundError(DistributionError, LookupError, sqlstate="UD004"):
    """No live route has the given id."""


class CatalogPermissionError(DistributionError, PermissionError):
    """The database refused the operation for lack of a privilege."""


class CatalogUnavailableError(DistributionError, ConnectionError):
    """The catalog database could not be reached or dropped the connection."""


class CatalogNotMigratedError(DistributionError):
    """The database lacks the catalog schema this library needs, or holds an older revision of it.

    :func:`distribution.migrate` (or ``distribution migrate``) brings it up to date.
    """


class CatalogRouteIDRequiredError(DistributionError, ValueError):
    """A route has ``route_id == 0``."""


class CatalogGroupIDRequiredError(DistributionError, ValueError):
    """A route has ``group_id == 0``."""


class CatalogDuplicateRouteIDError(DistributionError, ValueError):
    """Two routes share a ``route_id``."""


class CatalogInvalidRouteRangeError(DistributionError, ValueError):
    """A route's range is empty or inverted: ``end is not None and start >= end``."""


class CatalogInvalidRouteStateError(DistributionError, ValueError):
    """A route state is outside the four :class:`~distribution.RouteState` values."""


class CatalogRouteOverlapError(DistributionError, ValueError):
    """Two routes of a catalog would overlap."""


class CatalogInvalidVersionRecordError(DistributionError, ValueError):
    """A catalog version record is malformed."""


class CatalogInvalidNextRouteIDError(DistributionError, ValueError):
    """A next-route-id record is malformed or zero."""


class CatalogInvalidRouteRecordError(DistributionError, ValueError):
    """A route record is malformed (truncated, trailing bytes, bad flags or lengths)."""


class CatalogInvalidRouteKeyError(DistributionError, ValueError):
    """A catalog route key is malformed."""


class CatalogRouteKeyIDMismatchError(DistributionError, ValueError):
    """A route key names another route id than the record stored under it."""


class CatalogSplitKeyAtBoundaryError(DistributionError, ValueError, sqlstate="UD005"):
    """A split key equals the route's start or end, which would leave an empty child."""


class CatalogInvalidSplitKeyError(DistributionError, ValueError, sqlstate="UD006"):
    """A split key lies outside the route being split."""


class CatalogRoutesNotAdjacentError(DistributionError, ValueError, sqlstate="UD007"):
    """Routes to merge are not adjacent (``left.end != right.start``)."""


class CatalogRouteGroupMismatchError(DistributionError, ValueError, sqlstate="UD008"):
    """Routes to merge belong to different groups."""


class CatalogRouteNotActiveError(DistributionError, ValueError, sqlstate="UD009"):
    """The operation needs an ACTIVE route."""


class CatalogInvalidStateTransitionError(DistributionError, ValueError, sqlstate="UD010"):
    """The requested route state change is not an allowed transition."""


class CatalogRouteNotFencedError(DistributionError, ValueError, sqlstate="UD011"):
    """The operation needs a WRITE_FENCED route."""


# -- What the database refuses whoever writes, raw SQL included ------------------------------


class CatalogUnversionedWriteError(DistributionError, sqlstate="UD012"):
    """Routes, history or the metadata row changed in a transaction that has not moved the catalog
    version through ``distribution_begin_write`` (raw SQL, say): no watcher would see it."""


class CatalogVersionStepError(DistributionError, sqlstate="UD013"):
    """The catalog version changed by other than exactly one."""


class CatalogHistoryRemovalError(DistributionError, sqlstate="UD014"):
    """A statement would remove what the catalog still needs: a live route, a route row or history
    entry the history window still reads, every row (TRUNCATE), or history below a lower floor."""


class CatalogDigestWriteError(DistributionError, sqlstate="UD015"):
    """The route digest was set by hand: only the routes' own triggers keep it."""


class EngineSnapshotDuplicateIDError(DistributionError, ValueError):
    """A snapshot repeats a route id."""


class EngineSnapshotRouteOverlapError(DistributionError, ValueError):
    """Two routes given to an Engine overlap."""


class EngineSnapshotRouteOrderError(DistributionError, ValueError):
    """Two routes share a start, or an unbounded route is followed by another."""


# -- errors about the sizes and values the database can store --------------------------------


class RouteKeyTooLongError(DistributionError, ValueError):
    """A route bound is longer than :data:`~distribution.MAX_ROUTE_KEY_BYTES`."""


class CatalogInvalidActorError(DistributionError, ValueError):
    """An actor is longer than :data:`~distribution.MAX_ACTOR_BYTES` bytes of UTF-8, is not valid
    UTF-8 (a lone surrogate), or holds a NUL character."""


class CatalogInvalidRequestIDError(DistributionError, ValueError):
    """A write's request id is not 1 to :data:`~distribution.MAX_REQUEST_ID_LENGTH` printable
    ASCII characters."""


class CatalogRequestMismatchError(DistributionError, ValueError):
    """A write's request id names an earlier write that asked for something else (another
    operation, other arguments, another expected version or actor): nothing was written."""


class CatalogDataError(DistributionError, ValueError):
    """The database refused a value: a data exception (SQLSTATE class 22) or a program limit
    exceeded (class 54, a key too long for an index, say).

    Retrying sends the same value and fails the same way: this is never a
    :class:`CatalogUnavailableError`. ``sqlstate`` is the database's SQLSTATE (None when the
    driver refused the value before sending it).
    """

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class WatcherNameError(DistributionError, ValueError):
    """A watcher name is empty, holds a NUL character, or is longer than
    :data:`~distribution.catalog.fleet.MAX_WATCHER_NAME_BYTES` bytes of UTF-8."""
# -- reading from standbys and through poolers, notifications through NATS -------------------------


class CatalogReadOnlyError(DistributionError):
    """The database refused a write (or a LISTEN) as read-only: a hot standby, most often.

    Writes go to the primary; a standby serves reads only.
    """


class CatalogPreparedStatementError(DistributionError, sqlstate="42P05"):
    """The server refused a prepared statement that already exists (SQLSTATE 42P05): psycopg
    prepares a statement once a connection has run it five times (``prepare_threshold``), and a
    pooler in transaction mode (PgBouncer) without prepared statement support sends that
    PREPARE to whichever server connection it gives the transaction, where another client's may
    be. Connect with ``prepare_threshold=None``: ``connect_args={"prepare_threshold": None}``
    (README.md, PgBouncer).
    """


class NotificationsUnavailableError(DistributionError, ConnectionError):
    """The notification source (a NATS server) cannot be reached, or dropped the connection, so
    notifications may have been missed."""


class NotificationSubjectInvalidError(DistributionError, ValueError):
    """A NATS subject to publish or follow catalog notifications on is empty, holds whitespace or
    a wildcard (``*``, ``>``), or has an empty token."""

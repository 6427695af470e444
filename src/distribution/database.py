"""Connecting to the catalog database: URLs, SQLAlchemy engines, and error translation.

Everything that talks to PostgreSQL goes through psycopg 3. A database error never leaks raw out
of the library: :func:`translate_error` maps it to the library's own errors.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import psycopg
import psycopg.errors
import sqlalchemy as sa
import sqlalchemy.exc
from sqlalchemy.engine import make_url

from distribution import errors
from distribution.errors import (
    CatalogDataError,
    CatalogDuplicateRouteIDError,
    CatalogGroupIDRequiredError,
    CatalogInvalidRouteRangeError,
    CatalogInvalidRouteStateError,
    CatalogNotMigratedError,
    CatalogPermissionError,
    CatalogPreparedStatementError,
    CatalogReadOnlyError,
    CatalogRouteIDRequiredError,
    CatalogRouteOverlapError,
    CatalogUnavailableError,
    CatalogVersionMismatchError,
    DistributionError,
)

__all__ = [
    "DATABASE_URL_ENV",
    "DEFAULT_CONNECT_TIMEOUT",
    "create_engine",
    "sqlalchemy_url",
    "translate_error",
    "translated_errors",
]

#: Seconds to wait for a connection before calling the database unavailable.
DEFAULT_CONNECT_TIMEOUT = 10

# TCP keepalives: a silent peer is found out after about 25 s (idle 10 s, then 3 probes 5 s
# apart), and data left unacknowledged for 30 s drops the connection.
_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}

#: The environment variable naming the shared catalog database.
DATABASE_URL_ENV = "DISTRIBUTION_DATABASE_URL"

# The error classes of the SQLSTATEs the catalog's server functions raise (class UD), as each
# class says.
_SQLSTATE_ERRORS: Mapping[str, type[DistributionError]] = {
    error.sqlstate: error
    for error in (getattr(errors, name) for name in errors.__all__)
    if error.sqlstate is not None and error.sqlstate.startswith("UD")
}

# The catalog's own SQL names only tables, columns and functions of its schema: when one is missing,
# the database was never migrated, or not to the revision this library needs.
_SCHEMA_MISSING = frozenset({
    psycopg.errors.UndefinedTable.sqlstate,
    psycopg.errors.UndefinedColumn.sqlstate,
    psycopg.errors.UndefinedFunction.sqlstate,
})

# Integrity constraints of the schema (see distribution.models) and the errors they mean.
_CONSTRAINT_ERRORS: Mapping[str, type[DistributionError]] = {
    "ck_distribution_routes_route_id_nonzero": CatalogRouteIDRequiredError,
    "ck_distribution_routes_group_id_nonzero": CatalogGroupIDRequiredError,
    "ck_distribution_routes_state_known": CatalogInvalidRouteStateError,
    "ck_distribution_routes_range_nonempty": CatalogInvalidRouteRangeError,
    "ix_distribution_routes_live_route_id": CatalogDuplicateRouteIDError,
    "ix_distribution_routes_live_start": CatalogRouteOverlapError,
    "distribution_routes_no_overlap": CatalogRouteOverlapError,
}


# SQLSTATEs a server sends as it ends or refuses a session (administrator command, crash,
# start-up or shut-down in progress, idle-session timeout, too many connections: to the server or
# for the role): the connection is gone, as in class 08, and trying again later may succeed.
_SESSION_ENDED = frozenset({"57P01", "57P02", "57P03", "57P05", "53300"})
# SQLSTATE classes of values the server refuses: a data exception, a program limit exceeded
# (a key too long for an index, a string past 1 GB). Sending the same value again fails again.
_DATA_CLASSES = frozenset({"22", "54"})


def sqlalchemy_url(url: str) -> str:
    """Return ``url`` with the psycopg 3 driver named, as SQLAlchemy needs it.

    >>> sqlalchemy_url("postgresql://postgres@127.0.0.1/test")
    'postgresql+psycopg://postgres@127.0.0.1/test'
    """
    parsed = make_url(url)
    if parsed.get_backend_name() not in ("postgresql", "postgres"):
        raise ValueError(f"the catalog needs a postgresql:// URL, got {parsed.drivername}://")
    return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def create_engine(url: str | None = None, **options: object) -> sa.Engine:
    """Create a SQLAlchemy engine on psycopg 3 for ``url``, or for ``$DISTRIBUTION_DATABASE_URL``.

    Its connections time out connecting after :data:`DEFAULT_CONNECT_TIMEOUT` seconds and use TCP
    keepalives, so that a partitioned server shows up as an error rather than a hang;
    ``connect_args`` override any of these.
    """
    url = url or os.environ.get(DATABASE_URL_ENV)
    if not url:
        raise ValueError(f"no database URL given and {DATABASE_URL_ENV} is not set")
    # Without a connect timeout, an unreachable server can hold a caller (or a watcher's
    # shutdown) for minutes; without keepalives, a connection whose peer vanished behind a
    # network partition waits for an answer until the operating system gives up (hours).
    connect_args: dict[str, object] = {
        "connect_timeout": DEFAULT_CONNECT_TIMEOUT,
        **_KEEPALIVES,
    }
    connect_args.update(options.pop("connect_args", None) or {})  # type: ignore[call-overload]
    return sa.create_engine(sqlalchemy_url(url), connect_args=connect_args, **options)


def translate_error(exc: psycopg.Error) -> DistributionError:
    """Return the library error that stands for the psycopg error ``exc``; O(1).

    In order: a write refused as read-only, on a hot standby most often
    (:class:`~distribution.CatalogReadOnlyError`); the SQLSTATE of a server function's error (its class in
    :mod:`distribution.errors`); a prepared statement that already exists, psycopg's through a
    pooler in transaction mode (42P05: :class:`~distribution.CatalogPreparedStatementError`,
    whose message says to connect with ``prepare_threshold=None``); a missing table, column or
    function (:class:`~distribution.CatalogNotMigratedError`); an integrity constraint (its class);
    a refused privilege (:class:`~distribution.CatalogPermissionError`); a serialization
    failure (:class:`~distribution.CatalogVersionMismatchError`); a refused value, SQLSTATE
    class 22 or 54 (:class:`~distribution.CatalogDataError`, carrying the SQLSTATE); a lost or
    refused connection: class 08, a session the server ended (57P01, 57P02, 57P03, 57P05), too
    many connections (53300: the server's ``max_connections``, or the role's ``CONNECTION
    LIMIT``), or a driver error with no SQLSTATE (:class:`~distribution.CatalogUnavailableError`).
    Anything else
    is a plain :class:`~distribution.DistributionError` naming its SQLSTATE: only a connection
    problem is unavailability, which callers retry.

    The caller raises it ``from exc``, so the original stays reachable as ``__cause__``.

    >>> translate_error(psycopg.errors.NumericValueOutOfRange("integer out of range")).sqlstate
    '22003'
    >>> type(translate_error(psycopg.OperationalError("server closed the connection")))
    <class 'distribution.errors.CatalogUnavailableError'>
    >>> type(translate_error(psycopg.errors.TooManyConnections("too many clients already")))
    <class 'distribution.errors.CatalogUnavailableError'>
    >>> duplicate = psycopg.errors.DuplicatePreparedStatement('prepared "_pg3_0" already exists')
    >>> type(translate_error(duplicate)), "prepare_threshold=None" in str(translate_error(duplicate))
    (<class 'distribution.errors.CatalogPreparedStatementError'>, True)
    """
    sqlstate = exc.sqlstate or ""
    message = exc.diag.message_primary or str(exc).strip()
    if _read_only(exc, message):
        return CatalogReadOnlyError(
            f"the catalog database is read-only (a hot standby? writes go to the primary): {message}"
        )
    error_class = _SQLSTATE_ERRORS.get(sqlstate)
    if error_class is not None:
        return error_class(message)
    if sqlstate == CatalogPreparedStatementError.sqlstate:
        return CatalogPreparedStatementError(
            f"the catalog database refused a prepared statement ({message}): behind a pooler in "
            "transaction mode (PgBouncer), connect with prepare_threshold=None "
            "(connect_args={'prepare_threshold': None}; see README.md, PgBouncer)"
        )
    if sqlstate in _SCHEMA_MISSING:
        return CatalogNotMigratedError(
            f"the catalog schema is missing or older than this library needs ({message}): "
            "run distribution.migrate(url) or 'distribution migrate'"
        )
    if isinstance(exc, psycopg.errors.IntegrityError):
        constraint = exc.diag.constraint_name or ""
        return _CONSTRAINT_ERRORS.get(constraint, DistributionError)(
            f"the catalog database refused the write ({constraint or sqlstate}): {message}"
        )
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return CatalogPermissionError(f"the catalog database refused the operation: {message}")
    if isinstance(exc, psycopg.errors.SerializationFailure):
        return CatalogVersionMismatchError(f"a concurrent write won: {message}")
    if sqlstate[:2] in _DATA_CLASSES or isinstance(exc, psycopg.DataError):
        # A DataError without a SQLSTATE is psycopg refusing the value before sending it.
        return CatalogDataError(
            f"the catalog database refused a value ({sqlstate or 'in the driver'}): {message}",
            sqlstate=exc.sqlstate,
        )
    if _connection_lost(exc, sqlstate):
        return CatalogUnavailableError(f"the catalog database is unavailable: {message}")
    return DistributionError(f"the catalog database failed ({sqlstate or 'no sqlstate'}): {message}")


@contextmanager
def translated_errors() -> Iterator[None]:
    """Raise the library's error for any database error of the block, ``from`` the driver's.

    Errors reach the block through SQLAlchemy (wrapping psycopg's), or from psycopg directly (a
    driver cursor, a new connection). An error of SQLAlchemy's own, without a driver error
    beneath (a pool timeout, say), means no connection could be had.
    """
    try:
        yield
    except sqlalchemy.exc.DBAPIError as exc:
        cause = exc.orig
        if isinstance(cause, psycopg.Error):
            raise translate_error(cause) from cause
        raise CatalogUnavailableError(f"the catalog database is unavailable: {cause}") from cause
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise CatalogUnavailableError(f"no catalog connection available: {exc}") from exc
    except psycopg.Error as exc:
        raise translate_error(exc) from exc


def _connection_lost(exc: psycopg.Error, sqlstate: str) -> bool:
    """True when ``exc`` means that the connection failed or was lost (not that a statement did)."""
    if isinstance(exc, psycopg.InterfaceError):
        return True
    if not isinstance(exc, psycopg.OperationalError):
        return False
    # Without a SQLSTATE, the driver itself failed: connecting, or reading from a dead socket.
    return not sqlstate or sqlstate[:2] == "08" or sqlstate in _SESSION_ENDED
def _read_only(exc: psycopg.Error, message: str) -> bool:
    """Whether the server refused ``exc``'s statement as read-only: a write in a read-only
    transaction, or a read-write transaction (or LISTEN) on a standby in recovery, which
    PostgreSQL reports as an unsupported feature."""
    return isinstance(exc, psycopg.errors.ReadOnlySqlTransaction) or (
        isinstance(exc, psycopg.errors.FeatureNotSupported) and "during recovery" in message
    )

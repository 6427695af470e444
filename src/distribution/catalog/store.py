"""The catalog store: :class:`CatalogStore`, its reads and its saves.

Reads are single ``REPEATABLE READ`` read-only transactions, but for a head: one statement, in
autocommit. Every write is one transaction that starts with the compare-and-set on the catalog
version (``distribution_begin_write``: a conditional ``UPDATE … WHERE version = :expected``), so
concurrent writers queue on the metadata row and a loser fails with
:class:`~distribution.CatalogVersionMismatchError` having written nothing. The version moves by
exactly one per write; route rows are versioned (see :mod:`distribution.models`), so past versions
read back exactly within the history window.

A write that raises :class:`~distribution.CatalogUnavailableError` has an unknown outcome: the
connection may have been lost after the server committed (the commit's reply never arrived).
Name writes with a ``request_id`` and send the same write again with the same id: it is made at
most once and returns the original result (see :mod:`~distribution.catalog.requests`). Without
an id, read the catalog (its version and :meth:`CatalogStore.history`) before writing again: a
blind retry of a write that did commit fails with a version mismatch, or, with a newer expected
version, writes twice.

A snapshot (and a reset of the change feed) fetches the routes as six column arrays; a save
sends only the routes that changed when few did (see :mod:`~distribution.catalog.diff`), and
otherwise copies every route to the server, which diffs them; the operations (split, merge,
state, move) are one call to a server-side function each, whatever the catalog's size.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Self

import psycopg
import sqlalchemy as sa

from distribution.bulk import paused_gc
from distribution.catalog import statements
from distribution.catalog.diff import (
    Change,
    KnownRoutesStale,
    catalog_table,
    change_from,
)
from distribution.catalog.notifications import NOTIFY_CHANNEL, CatalogListener
from distribution.catalog.operations import CatalogOperations, check_actor
from distribution.catalog.requests import Request
from distribution.catalog.transactions import dedicated_connection, driver_cursor, transaction
from distribution.database import create_engine, translate_error
from distribution.errors import (
    CatalogSnapshotTooOldError,
    CatalogStoreRequiredError,
    CatalogVersionAheadError,
)
from distribution.models import u64_from_db, u64_to_db
from distribution.types import (
    CatalogChangeSet,
    CatalogHead,
    CatalogHistoryEntry,
    CatalogSnapshot,
    RouteDescriptor,
    check_route_bounds,
    check_u64,
)

__all__ = [
    "DEFAULT_CHANGES_LIMIT",
    "DEFAULT_HISTORY_VERSIONS",
    "CatalogStore",
]

# One logger for the whole package, as applications configure it: "distribution.catalog".
_logger = logging.getLogger(__package__)

#: How many versions ``prune_history`` keeps readable by default.
DEFAULT_HISTORY_VERSIONS = 1024
#: How many versions one ``changes_since`` call returns at most by default.
DEFAULT_CHANGES_LIMIT = 1024


class CatalogStore(CatalogOperations):
    """The shared route catalog, kept in PostgreSQL through a SQLAlchemy engine on psycopg 3.

    ``CatalogStore(sa_engine)`` uses the caller's engine; :meth:`from_url` creates one that
    :meth:`close` disposes. The store is thread-safe: each call checks a connection out of the
    engine's pool for the duration of one transaction (see
    :mod:`~distribution.catalog.transactions`).

    Reads may run elsewhere than writes. Given ``read_sa_engine`` (or :meth:`from_url`'s
    ``read_url``): a hot standby, or a PgBouncer in front of several, the reads
    (:meth:`snapshot`, :meth:`snapshot_at`, :meth:`head`, :meth:`version`,
    :meth:`next_route_id`, :meth:`next_route_id_at`, :meth:`changes_since`, :meth:`history`)
    run there, and lag behind the primary as the standby does (a head read there says
    ``standby``). Writes, a save's own read of the live routes, :meth:`prune_history` and
    :meth:`listen` run on ``sa_engine``, the primary; :attr:`primary` reads there too, for a read
    that must not lag. A write sent to a standby (``sa_engine`` on one) raises
    :class:`~distribution.CatalogReadOnlyError` having changed nothing.

    A save from the version of the snapshot this store last returned (by :meth:`snapshot` or
    :meth:`save`), while its caller still holds that snapshot, compares its routes with the
    snapshot's and sends only the routes that changed, after checking the catalog's digest (the
    database keeps a hash of its live routes, so a change is applied only to the routes it was
    computed from); a save from any other version reads the live routes from the primary first.
    The store keeps only a weak reference to that snapshot: a service that only reads holds no
    second copy of the routes once it drops the snapshot (having built its Engine, say).
    """

    def __init__(
        self, sa_engine: sa.Engine | None, *, read_sa_engine: sa.Engine | None = None
    ) -> None:
        if sa_engine is None:
            raise CatalogStoreRequiredError("catalog store is required: no SQLAlchemy engine given")
        _check_sa_engine("sa_engine", sa_engine)
        if read_sa_engine is not None:
            _check_sa_engine("read_sa_engine", read_sa_engine)
        self._sa_engine = sa_engine
        # Where snapshots, changes, heads and history are read: a hot standby (or a PgBouncer in
        # front of several), or the primary itself.
        self._read_sa_engine = read_sa_engine or sa_engine
        self._owns_sa_engine = False
        # The snapshot this store last returned, while its caller holds it (replaced in one
        # assignment): what a save from its version compares the new routes with.
        self._known: weakref.ref[CatalogSnapshot] | None = None
        # What `primary` returns when it is not this store.
        self._primary = None if self.reads_from_primary else CatalogStore(sa_engine)

    @classmethod
    def from_url(cls, url: str, *, read_url: str | None = None, **engine_options: Any) -> Self:
        """Open a store on ``url`` (``postgresql://`` means psycopg 3) with an engine of its own.

        ``read_url``, when given, is where the store reads (a hot standby, or a PgBouncer in
        front of several): writes, and LISTEN, stay on ``url``, the primary. Both engines take
        ``engine_options``, and :meth:`close` disposes both.
        """
        sa_engine = create_engine(url, **engine_options)
        read_sa_engine = None if read_url is None else create_engine(read_url, **engine_options)
        store = cls(sa_engine, read_sa_engine=read_sa_engine)
        store._owns_sa_engine = True
        return store

    @property
    def sa_engine(self) -> sa.Engine:
        """The SQLAlchemy engine of the primary: writes, and LISTEN."""
        return self._sa_engine

    @property
    def read_sa_engine(self) -> sa.Engine:
        """The SQLAlchemy engine reads run on: :attr:`sa_engine` unless a read engine was given."""
        return self._read_sa_engine

    @property
    def reads_from_primary(self) -> bool:
        """Whether reads run on the primary (no separate read engine was given). O(1)."""
        return self._read_sa_engine is self._sa_engine

    @property
    def primary(self) -> CatalogStore:
        """This store when it reads from the primary; else a store on the same primary engine
        that reads there too (for a read a standby cannot answer yet), always the same one.
        Closing it is a no-op. O(1)."""
        return self if self._primary is None else self._primary

    def close(self) -> None:
        """Dispose of the SQLAlchemy engines if the store created them; a no-op otherwise."""
        if self._owns_sa_engine:
            self._sa_engine.dispose()
            if not self.reads_from_primary:
                self._read_sa_engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- reads ---------------------------------------------------------------------------------

    def snapshot(self) -> CatalogSnapshot:
        """Read the version and the live routes in one REPEATABLE READ transaction; O(n).

        Routes are sorted by start. An empty catalog gives version 0, no routes, ``read_ts`` 0.
        """
        return self._remember(self._read_live(self._read_sa_engine))

    @staticmethod
    def _read_live(sa_engine: sa.Engine) -> CatalogSnapshot:
        """The version, digest and live routes, read in one REPEATABLE READ transaction."""
        with (
            transaction(sa_engine, read_only=True) as connection,
            driver_cursor(connection) as cursor,
        ):
            # Pipelined: BEGIN and the query travel in one round trip.
            with cursor.connection.pipeline():
                cursor.execute(statements.LIVE_SNAPSHOT)
            return _live_snapshot(cursor)

    def snapshot_at(self, read_ts: int) -> CatalogSnapshot:
        """Read the catalog exactly as it was at version ``read_ts``; O(rows kept in history).

        Raises :class:`~distribution.CatalogSnapshotTooOldError` past the history window and
        :class:`~distribution.CatalogVersionAheadError` for a version not reached yet.
        """
        check_u64("read_ts", read_ts)
        with transaction(self._read_sa_engine, read_only=True) as connection:
            _check_readable(connection, read_ts)
            with paused_gc():
                rows = connection.execute(statements.ROUTES_AT, {"read_ts": read_ts}).all()
                routes = statements.descriptors(rows)
        return CatalogSnapshot(version=read_ts, routes=routes, read_ts=read_ts)

    def head(self) -> CatalogHead:
        """Read the catalog version, its route digest and whether the server is a hot standby,
        together, in one statement with no transaction around it (see
        :func:`~distribution.catalog.statements.read_head`); O(1)."""
        return statements.read_head(self._read_sa_engine)

    def version(self) -> int:
        """Read the catalog version; O(1)."""
        with transaction(self._read_sa_engine, read_only=True) as connection:
            version: int = connection.execute(statements.VERSION).scalar_one()
        return version

    def next_route_id(self) -> int:
        """Read the next route id the catalog will allocate (1 for an empty catalog); O(1)."""
        with transaction(self._read_sa_engine, read_only=True) as connection:
            next_id: int = connection.execute(statements.NEXT_ROUTE_ID).scalar_one()
        return next_id

    def next_route_id_at(self, read_ts: int) -> int:
        """Read the route id counter as it was at version ``read_ts``; O(1).

        Raises like :meth:`snapshot_at` outside the history window.
        """
        check_u64("read_ts", read_ts)
        with transaction(self._read_sa_engine, read_only=True) as connection:
            _check_readable(connection, read_ts)
            next_id: int | None = connection.execute(
                statements.NEXT_ROUTE_ID_AT, {"read_ts": read_ts}
            ).scalar_one_or_none()
        return 1 if next_id is None else next_id

    def changes_since(self, version: int, limit: int = DEFAULT_CHANGES_LIMIT) -> CatalogChangeSet:
        """Return what changed after ``version``: at most ``limit`` contiguous changes.

        Each change carries the route digest its write left (``digest``; None for writes made
        before the database had revision 0004), and ``head`` the catalog's version and digest as
        read in the same transaction.

        When ``version`` predates the history window, the answer is a ``reset`` carrying a full
        snapshot instead, read as :meth:`snapshot` reads it (O(n)). Raises
        :class:`~distribution.CatalogVersionAheadError` for a version the catalog has not
        reached. O(routes changed in the versions returned).
        """
        check_u64("version", version)
        _check_count("limit", limit, minimum=1)
        with transaction(self._read_sa_engine, read_only=True) as connection:
            current, digest, standby, floor = connection.execute(
                statements.HEAD_AND_FLOOR
            ).one()
            if version > current:
                raise _ahead(version, current)
            head = CatalogHead(current, digest, standby)
            if version == current:
                # Nothing newer (a watcher's safety poll, most often): no more queries.
                return CatalogChangeSet(head=head)
            if version < floor:
                # The live routes as column arrays, as a snapshot reads them, in this
                # transaction: the same version and digest as the head.
                with driver_cursor(connection) as cursor:
                    cursor.execute(statements.LIVE_SNAPSHOT)
                    return CatalogChangeSet(reset=_live_snapshot(cursor), head=head)
            last = min(current, version + limit)
            bounds = {"after": version, "last": last}
            stored = [u64_to_db(version), u64_to_db(last)]
            with paused_gc(), driver_cursor(connection) as cursor:
                opened = cursor.execute(statements.OPENED_ROUTES, stored).fetchall()
                closed = cursor.execute(statements.CLOSED_ROUTES, stored).fetchall()
                digests = dict(connection.execute(statements.HISTORY_DIGESTS, bounds).all())
                changes = statements.changes(version, last, opened, closed, digests)
        return CatalogChangeSet(changes=changes, head=head)

    def history(
        self, since: int = 0, limit: int | None = None, *, newest_first: bool = False
    ) -> list[CatalogHistoryEntry]:
        """Read the audit trail of the writes that produced versions after ``since``, oldest first.

        With ``newest_first``, the newest first: then ``limit`` keeps the latest writes.
        O(entries returned). Entries older than the history window have been pruned.
        """
        check_u64("since", since)
        if limit is not None:
            _check_count("limit", limit, minimum=0)
        query = statements.HISTORY_NEWEST_FIRST if newest_first else statements.HISTORY
        with transaction(self._read_sa_engine, read_only=True) as connection:
            rows = connection.execute(query, {"since": since, "limit": limit}).all()
        return [
            CatalogHistoryEntry(
                version=version,
                operation=operation,
                arguments=arguments,
                actor=actor,
                committed_at=committed_at,
            )
            for version, operation, arguments, actor, committed_at in rows
        ]

    # -- writes --------------------------------------------------------------------------------

    def save(
        self,
        expected_version: int,
        routes: Iterable[RouteDescriptor],
        *,
        actor: str | None = None,
        next_route_id: int | None = None,
        request_id: str | None = None,
    ) -> CatalogSnapshot:
        """Replace the catalog's routes by ``routes`` if the catalog is at ``expected_version``.

        Every route is validated first (:class:`~distribution.CatalogDuplicateRouteIDError`,
        :class:`~distribution.CatalogRouteOverlapError`, and each descriptor's own errors), and
        its bounds held to :data:`~distribution.MAX_ROUTE_KEY_BYTES`
        (:class:`~distribution.RouteKeyTooLongError`), as the actor is checked. Then,
        in one transaction: the compare-and-set on the version
        (:class:`~distribution.CatalogVersionMismatchError`, then
        :class:`~distribution.CatalogVersionOverflowError`), only the routes that changed are
        written and the absent ones retired, and the id counter is raised to the floor of the
        old and new routes. Returns the new snapshot (whose routes may be the store's own equal
        descriptors in place of the given ones).

        What travels: the store compares ``routes`` (C-level, by id) with the catalog at
        ``expected_version``, as the snapshot it last returned holds it (while the caller holds
        that snapshot), or else as it reads it first from the primary, and sends only the routes
        that changed, once the catalog's digest shows it still holds the routes compared
        against. When many routes changed, every route is copied to the server and
        diffed there. O(n) in the number of routes, with little Python work per route, and
        O(changes) written.

        ``next_route_id``, when given, raises the id counter to at least that value too (a
        catalog copied from another keeps that one's counter, so no id it issued is reissued).

        ``request_id`` names the write (see :mod:`~distribution.catalog.requests`): sent again
        with the same id and arguments after :class:`~distribution.CatalogUnavailableError`, the
        save is made at most once and returns the snapshot of the version it wrote.
        """
        check_u64("expected_version", expected_version)
        check_actor(actor)
        if next_route_id is not None:
            check_u64("next_route_id", next_route_id)
        with paused_gc():
            table = catalog_table(routes)
        check_route_bounds(table)
        request = Request.of(request_id, "save", [expected_version, actor, next_route_id, *table])
        known = None if self._known is None else self._known()
        if known is None or known.version != expected_version:
            # Reading the live routes and sending what changed costs far less than sending
            # every route for the server to diff.
            _logger.debug(
                "save from version %d: reading the live routes first (no snapshot of that "
                "version held)",
                expected_version,
            )
            known = self._read_live(self._sa_engine)
        if known.version == expected_version:
            with paused_gc():
                change = change_from(known.routes, table)
            if change is not None:
                try:
                    return self._save_change(
                        expected_version, known, change, actor, next_route_id, request
                    )
                except KnownRoutesStale:
                    _logger.info(
                        "the catalog at version %d holds other routes than this store read "
                        "(restored or rebuilt since?): sending every route",
                        expected_version,
                    )
        return self._save_all(expected_version, table, actor, next_route_id, request)

    def _save_all(
        self,
        expected_version: int,
        table: tuple[RouteDescriptor, ...],
        actor: str | None,
        next_route_id: int | None,
        request: Request | None,
    ) -> CatalogSnapshot:
        """:meth:`save` of a valid ``table`` (sorted by start) sending every route: the server
        diffs them against the live routes."""
        with transaction(self._sa_engine) as connection, driver_cursor(connection) as cursor:
            done = None if request is None else request.begin(cursor)
            if done is not None:
                return self._remember(_saved(connection, *done))
            written = _begin_write(cursor, expected_version)
            _raise_next_route_id(cursor, next_route_id)
            with paused_gc():
                statements.stage(cursor, table)
            cursor.execute(statements.SAVE_DESIRED, [written, actor])
            digest = _fetch_one(cursor.execute(statements.DIGEST))[0]
        _logger.debug("save from version %d: sent all %d routes", expected_version, len(table))
        return self._remember(_snapshot(u64_from_db(written), digest, table))

    def _save_change(
        self,
        expected_version: int,
        known: CatalogSnapshot,
        change: Change,
        actor: str | None,
        next_route_id: int | None,
        request: Request | None,
    ) -> CatalogSnapshot:
        """:meth:`save` sending only what changed since ``known``, if the catalog still holds it.

        Raises :class:`~distribution.catalog.diff.KnownRoutesStale`, having written nothing,
        when the catalog is at the expected version but its digest differs from the one read
        with ``known`` (the database was restored or rebuilt since, say).
        """
        with transaction(self._sa_engine) as connection, driver_cursor(connection) as cursor:
            done = None if request is None else request.begin(cursor)
            if done is not None:
                return self._remember(_saved(connection, *done))
            written = _begin_write(cursor, expected_version)
            if _fetch_one(cursor.execute(statements.DIGEST))[0] != known.digest:
                raise KnownRoutesStale
            _raise_next_route_id(cursor, next_route_id)
            statements.stage(cursor, change.upserts)
            cursor.execute(
                statements.SAVE_CHANGES,
                [written, actor, list(map(u64_to_db, change.deletes)), len(change.table)],
            )
            digest = _fetch_one(cursor.execute(statements.DIGEST))[0]
        _logger.debug(
            "save from version %d: sent %d new or changed and %d retired of %d routes",
            expected_version,
            len(change.upserts),
            len(change.deletes),
            len(change.table),
        )
        return self._remember(_snapshot(u64_from_db(written), digest, change.table))

    def _remember(self, snapshot: CatalogSnapshot) -> CatalogSnapshot:
        """Remember ``snapshot`` as the catalog this store last read or wrote, for as long as
        its caller holds it; return it."""
        self._known = weakref.ref(snapshot)
        return snapshot

    def prune_history(self, keep_versions: int = DEFAULT_HISTORY_VERSIONS) -> int:
        """Drop history older than the newest ``keep_versions`` versions; returns the new floor.

        The floor is the oldest version still readable exactly. Safe while watchers run: a
        watcher behind the floor gets a reset from :meth:`changes_since`. O(rows dropped).
        """
        _check_count("keep_versions", keep_versions, minimum=1)
        with transaction(self._sa_engine) as connection:
            current, floor = connection.execute(statements.META_FOR_UPDATE).one()
            new_floor: int = max(floor, current - keep_versions + 1)
            if new_floor > floor:
                floor_parameter = {"floor": new_floor}
                # The floor first: the database lets only rows below it go.
                connection.execute(statements.SET_HISTORY_FLOOR, floor_parameter)
                connection.execute(statements.DELETE_RETIRED_ROUTES, floor_parameter)
                connection.execute(statements.DELETE_HISTORY, floor_parameter)
        return new_floor

    def listen(self) -> CatalogListener:
        """Open a dedicated connection that LISTENs for catalog writes.

        The connection is taken out of the pool for good and closed with the listener. Raises
        :class:`~distribution.CatalogUnavailableError` when the database cannot be reached.
        """
        connection = dedicated_connection(self._sa_engine)
        try:
            connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
        except psycopg.Error as exc:
            connection.close()
            raise translate_error(exc) from exc
        return CatalogListener(connection)


def _check_sa_engine(name: str, sa_engine: object) -> None:
    """Refuse anything but a SQLAlchemy engine on PostgreSQL through psycopg 3 (TypeError)."""
    if not isinstance(sa_engine, sa.Engine):
        raise TypeError(f"{name} must be a SQLAlchemy Engine, got {type(sa_engine).__name__}")
    dialect = sa_engine.dialect
    if dialect.name != "postgresql" or dialect.driver != "psycopg":
        raise TypeError(
            "the catalog needs a PostgreSQL engine on the psycopg 3 driver "
            f"(postgresql+psycopg://), got {dialect.name}+{dialect.driver}"
        )


def _begin_write(cursor: psycopg.Cursor[Any], expected_version: int) -> int:
    """The compare-and-set every write starts with; returns the stored new version."""
    written: int = _fetch_one(
        cursor.execute(statements.BEGIN_WRITE, [u64_to_db(expected_version)])
    )[0]
    return written


def _snapshot(version: int, digest: int, routes: tuple[RouteDescriptor, ...]) -> CatalogSnapshot:
    """The catalog at ``version``, whose digest was then ``digest``, read or written by a store."""
    return CatalogSnapshot(version=version, routes=routes, read_ts=version, digest=digest)


def _live_snapshot(cursor: psycopg.Cursor[Any]) -> CatalogSnapshot:
    """The snapshot :data:`~distribution.catalog.statements.LIVE_SNAPSHOT`, just run on
    ``cursor``, read: O(n), with C-level passes over its column arrays."""
    with paused_gc():
        version, digest, *columns = _fetch_one(cursor)
        routes = statements.column_descriptors(columns)
    return _snapshot(u64_from_db(version), digest, routes)


def _saved(connection: sa.Connection, stored_version: int, digest: int) -> CatalogSnapshot:
    """The routes a save named by a request id wrote earlier, at the version it wrote."""
    version = u64_from_db(stored_version)
    with paused_gc():
        rows = connection.execute(statements.ROUTES_AT, {"read_ts": version}).all()
        routes = statements.descriptors(rows)
    return _snapshot(version, digest, routes)


def _raise_next_route_id(cursor: psycopg.Cursor[Any], next_route_id: int | None) -> None:
    """Raise the id counter to ``next_route_id`` (before the write's audit entry records it)."""
    if next_route_id is not None:
        cursor.execute(statements.RAISE_NEXT_ROUTE_ID, [u64_to_db(next_route_id)])


def _check_readable(connection: sa.Connection, read_ts: int) -> None:
    current, floor = connection.execute(statements.META).one()
    if read_ts > current:
        raise _ahead(read_ts, current)
    if read_ts < floor:
        raise CatalogSnapshotTooOldError(
            f"catalog version {read_ts} is older than the history kept (from version {floor})"
        )

def _check_count(name: str, value: object, *, minimum: int) -> None:
    """Refuse a count argument: TypeError unless an int, ValueError below ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not minimum <= value <= 2**63 - 1:
        raise ValueError(f"{name} must be in {minimum}..2**63-1, got {value}")


def _fetch_one(cursor: psycopg.Cursor[Any]) -> Any:
    row = cursor.fetchone()
    assert row is not None, "a query of the metadata row returned nothing"
    return row


def _ahead(version: int, current: int) -> CatalogVersionAheadError:
    return CatalogVersionAheadError(
        f"catalog version {version} has not been reached: the catalog is at version {current}"
    )

"""The durable route catalog in PostgreSQL: :class:`CatalogStore` and ``ensure_catalog_snapshot``.

Reads are single ``REPEATABLE READ`` read-only transactions. Every write is one transaction that
starts with the compare-and-set on the catalog version (``distribution_begin_write``: a
conditional ``UPDATE … WHERE version = :expected``), so concurrent writers queue on the metadata
row and a loser fails with :class:`~distribution.CatalogVersionMismatchError` having written
nothing. The version moves by exactly one per write; route rows are versioned (see
:mod:`distribution.models`), so past versions read back exactly within the history window.

The hot paths talk to psycopg directly, over connections from the SQLAlchemy engine's pool: one
statement per step, binary rows, and the operations (split, merge, state, move) as one call to a
server-side function each, whatever the catalog's size. A snapshot fetches the routes as six
column arrays; a save sends only the routes that changed when the store knows the version it
saves from, and otherwise copies every route to the server, which diffs them (see
:meth:`CatalogStore.save`).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import compress, islice, repeat
from operator import attrgetter, le, lt, ne
from types import TracebackType
from typing import Any, Self

import psycopg
import sqlalchemy as sa
import sqlalchemy.exc
from psycopg import IsolationLevel
from psycopg.pq import TransactionStatus

from distribution.bulk import make_descriptors, paused_gc
from distribution.codec import decode_route_descriptor, next_route_id_floor
from distribution.database import create_engine, translate_error
from distribution.engine import Engine
from distribution.errors import (
    CatalogDuplicateRouteIDError,
    CatalogGroupIDRequiredError,
    CatalogRouteOverlapError,
    CatalogSnapshotTooOldError,
    CatalogStoreRequiredError,
    CatalogUnavailableError,
    CatalogVersionAheadError,
    CatalogVersionMismatchError,
    EngineRequiredError,
)
from distribution.models import u64_from_db, u64_to_db
from distribution.types import (
    UINT64_MAX,
    CatalogChange,
    CatalogChangeSet,
    CatalogHistoryEntry,
    CatalogSnapshot,
    CatalogWriteResult,
    RouteDescriptor,
    RouteState,
    check_key,
    check_route_state,
    check_u64,
    validate_route_table,
)

__all__ = [
    "DEFAULT_CHANGES_LIMIT",
    "DEFAULT_HISTORY_VERSIONS",
    "NOTIFY_CHANNEL",
    "CatalogListener",
    "CatalogNotification",
    "CatalogStore",
    "check_catalog_and_engine",
    "ensure_catalog_snapshot",
    "parse_notification",
]

_logger = logging.getLogger(__name__)

#: The channel every catalog write notifies, on commit.
NOTIFY_CHANNEL = "distribution_catalog"
#: How many versions ``prune_history`` keeps readable by default.
DEFAULT_HISTORY_VERSIONS = 1024
#: How many versions one ``changes_since`` call returns at most by default.
DEFAULT_CHANGES_LIMIT = 1024

_route_id = attrgetter("route_id")
_route_start = attrgetter("start")
_route_end = attrgetter("end")
_ONLY_DESCRIPTORS = frozenset({RouteDescriptor})
_ONLY_INT = frozenset({int})
_ONLY_BYTES = frozenset({bytes})
_BYTES_OR_NONE = frozenset({bytes, type(None)})
_ONLY_STATES = frozenset({RouteState})

_ROUTE_COLUMNS = 'route_id, start, "end", group_id, state, parent_route_id'
_LIVE_ROUTES = (
    f"SELECT {_ROUTE_COLUMNS} FROM distribution_routes WHERE valid_to IS NULL ORDER BY start"
)
#: The live routes as six arrays, one per column. Fetching columns skips building a tuple per row
#: and transposing the rows afterwards; the six aggregates run in one pass over the same rows, so
#: the arrays stay aligned whatever order the rows come in.
#: u64 columns come unshifted: flipping the sign bit of a stored value gives the u64 itself, as
#: a signed 64-bit integer (negative from 2**63 up), so most values need no Python work at all.
_LIVE_COLUMNS = (
    "SELECT array_agg(route_id # _sign), array_agg(start), array_agg(\"end\"), "
    "array_agg(group_id # _sign), array_agg(state), array_agg(parent_route_id # _sign) "
    f"FROM ({_LIVE_ROUTES}) AS live, (SELECT -9223372036854775807 - 1 AS _sign) AS sign_bit"
)
_ROUTES_AT = (
    f"SELECT {_ROUTE_COLUMNS} FROM distribution_routes "
    "WHERE valid_from <= %(v)s AND (valid_to IS NULL OR valid_to > %(v)s) ORDER BY start"
)
_META = "SELECT version, history_floor, next_route_id FROM distribution_meta"
_VERSION_AND_DIGEST = "SELECT version, digest FROM distribution_meta"
_DIGEST = "SELECT digest FROM distribution_meta"
_DESIRED_TABLE = (
    "CREATE TEMP TABLE IF NOT EXISTS distribution_desired ("
    'route_id bigint, start bytea, "end" bytea, group_id bigint, state smallint, '
    "parent_route_id bigint) ON COMMIT DELETE ROWS"
)


# Binary COPY framing (PostgreSQL's "PGCOPY" format): header, tuples, trailer.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_COPY_TRAILER = b"\xff\xff"
_COPY_ROW_HEAD = struct.Struct(">hiqi")  # 6 fields; route_id (8 bytes); start's length
_COPY_LENGTH = struct.Struct(">i")  # end's length, -1 for NULL
_COPY_ROW_TAIL = struct.Struct(">iqihiq")  # group_id; state (2 bytes); parent_route_id


class CatalogStore:
    """The shared route catalog, kept in PostgreSQL through a SQLAlchemy engine on psycopg 3.

    ``CatalogStore(sa_engine)`` uses the caller's engine; :meth:`from_url` creates one that
    :meth:`close` disposes. The store is thread-safe: each call checks a connection out of the
    engine's pool for the duration of one transaction.

    The store keeps the routes of the last version it read or wrote (the tuple its last
    snapshot or save returned): a save compares its routes with those, and sends only the routes
    that changed, after checking the catalog's digest (the database keeps a hash of its live
    routes, so a change is applied only to the routes it was computed from).
    """

    def __init__(self, engine: sa.Engine | None) -> None:
        if engine is None:
            raise CatalogStoreRequiredError("catalog store is required: no SQLAlchemy engine given")
        if not isinstance(engine, sa.Engine):
            raise TypeError(f"engine must be a SQLAlchemy Engine, got {type(engine).__name__}")
        if engine.dialect.name != "postgresql" or engine.dialect.driver != "psycopg":
            raise TypeError(
                "the catalog needs a PostgreSQL engine on the psycopg 3 driver "
                f"(postgresql+psycopg://), got {engine.dialect.name}+{engine.dialect.driver}"
            )
        self._engine = engine
        self._owns_engine = False
        #: The routes of the version this store last read or wrote (replaced in one assignment).
        self._known: _KnownRoutes | None = None

    @classmethod
    def from_url(cls, url: str, **engine_options: Any) -> Self:
        """Open a store on ``url`` (``postgresql://`` means psycopg 3) with an engine of its own."""
        store = cls(create_engine(url, **engine_options))
        store._owns_engine = True
        return store

    @property
    def engine(self) -> sa.Engine:
        """The SQLAlchemy engine the store runs on."""
        return self._engine

    def close(self) -> None:
        """Dispose of the engine if the store created it; a no-op otherwise."""
        if self._owns_engine:
            self._engine.dispose()

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
        return self._remember(self._read_live())

    def _read_live(self) -> _KnownRoutes:
        """The version, digest and live routes, read in one REPEATABLE READ transaction."""
        with self._transaction(read_only=True) as cursor, cursor.connection.pipeline():
            # Pipelined: BEGIN and both queries travel in one round trip.
            meta = cursor.connection.cursor(binary=True)
            meta.execute(_VERSION_AND_DIGEST)
            with paused_gc():
                cursor.execute(_LIVE_COLUMNS)
                version, digest = _fetch_one_row(meta)
                routes = _column_descriptors(_fetch_one_row(cursor))
        return _KnownRoutes(u64_from_db(version), digest, routes)

    def snapshot_at(self, read_ts: int) -> CatalogSnapshot:
        """Read the catalog exactly as it was at version ``read_ts``; O(rows kept in history).

        Raises :class:`~distribution.CatalogSnapshotTooOldError` past the history window and
        :class:`~distribution.CatalogVersionAheadError` for a version not reached yet.
        """
        check_u64("read_ts", read_ts)
        with self._transaction(read_only=True) as cursor:
            self._check_readable(cursor, read_ts)
            routes = _fetch_routes(cursor, _ROUTES_AT, {"v": u64_to_db(read_ts)})
        return CatalogSnapshot(version=read_ts, routes=routes, read_ts=read_ts)

    def version(self) -> int:
        """Read the catalog version; O(1)."""
        with self._transaction(read_only=True) as cursor:
            return u64_from_db(_fetch_one(cursor, "SELECT version FROM distribution_meta")[0])

    def next_route_id(self) -> int:
        """Read the next route id the catalog will allocate (1 for an empty catalog); O(1)."""
        with self._transaction(read_only=True) as cursor:
            return u64_from_db(_fetch_one(cursor, _META)[2])

    def next_route_id_at(self, read_ts: int) -> int:
        """Read the route id counter as it was at version ``read_ts``; O(1).

        Raises like :meth:`snapshot_at` outside the history window.
        """
        check_u64("read_ts", read_ts)
        with self._transaction(read_only=True) as cursor:
            self._check_readable(cursor, read_ts)
            row = cursor.execute(
                "SELECT next_route_id FROM distribution_history WHERE version = %s",
                [u64_to_db(read_ts)],
            ).fetchone()
        return 1 if row is None else u64_from_db(row[0])

    def changes_since(self, version: int, limit: int = DEFAULT_CHANGES_LIMIT) -> CatalogChangeSet:
        """Return what changed after ``version``: at most ``limit`` contiguous changes.

        When ``version`` predates the history window, the answer is a ``reset`` carrying a full
        snapshot instead. Raises :class:`~distribution.CatalogVersionAheadError` for a version the
        catalog has not reached. O(routes changed in the versions returned).
        """
        check_u64("version", version)
        _check_count("limit", limit, minimum=1)
        with self._transaction(read_only=True) as cursor:
            current, floor, _ = _fetch_one(cursor, _META)
            current, floor = u64_from_db(current), u64_from_db(floor)
            if version > current:
                raise _ahead(version, current)
            if version < floor:
                routes = _fetch_routes(cursor, _LIVE_ROUTES)
                return CatalogChangeSet(
                    reset=CatalogSnapshot(version=current, routes=routes, read_ts=current)
                )
            last = min(current, version + limit)
            bounds = {"after": u64_to_db(version), "last": u64_to_db(last)}
            opened = cursor.execute(
                f"SELECT valid_from, {_ROUTE_COLUMNS} FROM distribution_routes "
                "WHERE valid_from > %(after)s AND valid_from <= %(last)s ORDER BY valid_from, start",
                bounds,
            ).fetchall()
            closed = cursor.execute(
                "SELECT valid_to, route_id FROM distribution_routes "
                "WHERE valid_to > %(after)s AND valid_to <= %(last)s ORDER BY valid_to, route_id",
                bounds,
            ).fetchall()
        return CatalogChangeSet(changes=_changes(version, last, opened, closed))

    def history(
        self, since: int = 0, limit: int | None = None, *, newest_first: bool = False
    ) -> list[CatalogHistoryEntry]:
        """Read the audit trail of the writes that produced versions after ``since``, oldest first.

        With ``newest_first``, the newest first: then ``limit`` keeps the latest writes.
        O(entries returned). Entries older than the history window have been pruned.
        """
        check_u64("since", since)
        query = (
            "SELECT version, operation, arguments, actor, committed_at FROM distribution_history "
            "WHERE version > %s ORDER BY version" + (" DESC" if newest_first else "")
        )
        params: list[Any] = [u64_to_db(since)]
        if limit is not None:
            _check_count("limit", limit, minimum=0)
            query += " LIMIT %s"
            params.append(limit)
        with self._transaction(read_only=True) as cursor:
            rows = cursor.execute(query, params).fetchall()
        return [
            CatalogHistoryEntry(
                version=u64_from_db(version),
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
    ) -> CatalogSnapshot:
        """Replace the catalog's routes by ``routes`` if the catalog is at ``expected_version``.

        Every route is validated first (:class:`~distribution.CatalogDuplicateRouteIDError`,
        :class:`~distribution.CatalogRouteOverlapError`, and each descriptor's own errors). Then,
        in one transaction: the compare-and-set on the version
        (:class:`~distribution.CatalogVersionMismatchError`, then
        :class:`~distribution.CatalogVersionOverflowError`), only the routes that changed are
        written and the absent ones retired, and the id counter is raised to the floor of the
        old and new routes. Returns the new snapshot (whose routes may be the store's own equal
        descriptors in place of the given ones).

        What travels: the store compares ``routes`` (C-level, by id) with the catalog at
        ``expected_version``, as it last read or wrote it, or else as it reads it first, and sends
        only the routes that changed, once the catalog's digest shows it still holds the routes
        compared against. When many routes changed, every route is copied to the server and
        diffed there. O(n) in the number of routes, with little Python work per route, and
        O(changes) written.

        ``next_route_id``, when given, raises the id counter to at least that value too (a
        catalog copied from another keeps that one's counter, so no id it issued is reissued).
        """
        check_u64("expected_version", expected_version)
        _check_actor(actor)
        if next_route_id is not None:
            check_u64("next_route_id", next_route_id)
        with paused_gc():
            given = _route_list(routes)
            table = _checked_table(given)
            if table is None:
                table = _catalog_table(given)  # the exact checks: raise the contract's first error
                next_route_id_floor(table)  # a route id of 2**64 - 1 leaves no id to allocate
        known = self._known
        if known is None or known.version != expected_version:
            # Reading the live routes and sending what changed costs far less than sending
            # every route for the server to diff.
            known = self._read_live()
            self._known = known
        if known.version == expected_version:
            with paused_gc():
                change = _change_from(known, table)
            if change is not None:
                try:
                    return self._save_change(expected_version, known, change, actor, next_route_id)
                except _KnownRoutesStale:
                    _logger.info(
                        "the catalog at version %d holds other routes than this store read "
                        "(restored or rebuilt since?): sending every route",
                        expected_version,
                    )
        return self._save_all(expected_version, table, actor, next_route_id)

    def _save_all(
        self,
        expected_version: int,
        table: tuple[RouteDescriptor, ...],
        actor: str | None,
        next_route_id: int | None = None,
    ) -> CatalogSnapshot:
        """:meth:`save` of a valid ``table`` (sorted by start) sending every route: the server
        diffs them against the live routes."""
        with paused_gc():
            copy_data = _copy_data(table)
        with self._transaction() as cursor:
            written = self._begin_write(cursor, expected_version)
            _raise_next_route_id(cursor, next_route_id)
            _stage(cursor, copy_data)
            cursor.execute("SELECT distribution_save_desired(%s, %s)", [written, actor])
            digest = _fetch_one(cursor, _DIGEST)[0]
        _logger.debug("save from version %d: sent all %d routes", expected_version, len(table))
        return self._remember(_KnownRoutes(u64_from_db(written), digest, table))

    def _save_change(
        self,
        expected_version: int,
        known: _KnownRoutes,
        change: _Change,
        actor: str | None,
        next_route_id: int | None = None,
    ) -> CatalogSnapshot:
        """:meth:`save` sending only what changed since ``known``, if the catalog still holds it.

        Raises :class:`_KnownRoutesStale`, having written nothing, when the catalog is at the
        expected version but its digest differs from the one read with ``known`` (the database
        was restored or rebuilt since, say).
        """
        with self._transaction() as cursor:
            written = self._begin_write(cursor, expected_version)
            if _fetch_one(cursor, _DIGEST)[0] != known.digest:
                raise _KnownRoutesStale
            _raise_next_route_id(cursor, next_route_id)
            _stage(cursor, _copy_data(change.upserts))
            cursor.execute(
                "SELECT distribution_save_changes(%s, %s, %s, %s)",
                [written, actor, list(map(u64_to_db, change.deletes)), len(change.table)],
            )
            digest = _fetch_one(cursor, _DIGEST)[0]
        _logger.debug(
            "save from version %d: sent %d new or changed and %d retired of %d routes",
            expected_version,
            len(change.upserts),
            len(change.deletes),
            len(change.table),
        )
        return self._remember(_KnownRoutes(u64_from_db(written), digest, change.table))

    @staticmethod
    def _begin_write(cursor: psycopg.Cursor[Any], expected_version: int) -> int:
        """The compare-and-set every write starts with; returns the stored new version."""
        written: int = _fetch_one(
            cursor, "SELECT distribution_begin_write(%s)", [u64_to_db(expected_version)]
        )[0]
        return written

    def _remember(self, known: _KnownRoutes) -> CatalogSnapshot:
        """Keep ``known`` as the catalog this store last read or wrote; return it as a snapshot."""
        self._known = known
        return CatalogSnapshot(version=known.version, routes=known.routes, read_ts=known.version)

    def split_route(
        self, route_id: int, split_key: bytes, expected_version: int, *, actor: str | None = None
    ) -> CatalogWriteResult:
        """Split a live route at ``split_key`` into two children; O(1) rows whatever the size.

        The left child ``[start, split_key)`` gets the counter's next id and the right child
        ``[split_key, end)`` the one after; both keep the parent's group and state and name it as
        their parent. Checks, in order: the version, that the route exists
        (:class:`~distribution.CatalogRouteNotFoundError`), that the key is not a boundary
        (:class:`~distribution.CatalogSplitKeyAtBoundaryError`) and lies inside the route
        (:class:`~distribution.CatalogInvalidSplitKeyError`).
        """
        check_u64("route_id", route_id)
        check_key("split_key", split_key)
        return self._operation(
            "distribution_split_route",
            [u64_to_db(route_id), split_key],
            expected_version,
            actor,
            retired=(route_id,),
        )

    def merge_routes(
        self, left_id: int, right_id: int, expected_version: int, *, actor: str | None = None
    ) -> CatalogWriteResult:
        """Merge two adjacent ACTIVE routes of one group into a new route; O(1) rows.

        The new route gets a fresh id and names ``left_id`` as its parent. Checks, in order: the
        version, that both routes exist, ``left.end == right.start``
        (:class:`~distribution.CatalogRoutesNotAdjacentError`), the same group
        (:class:`~distribution.CatalogRouteGroupMismatchError`), both ACTIVE
        (:class:`~distribution.CatalogRouteNotActiveError`).
        """
        check_u64("left_id", left_id)
        check_u64("right_id", right_id)
        return self._operation(
            "distribution_merge_routes",
            [u64_to_db(left_id), u64_to_db(right_id)],
            expected_version,
            actor,
            retired=(left_id, right_id),
        )

    def set_route_state(
        self, route_id: int, state: RouteState, expected_version: int, *, actor: str | None = None
    ) -> CatalogWriteResult:
        """Move a route through the cutover lifecycle; O(1) rows.

        Allowed transitions (anything else raises
        :class:`~distribution.CatalogInvalidStateTransitionError`):

        * ACTIVE → WRITE_FENCED (fence);
        * WRITE_FENCED → ACTIVE (lift the fence), MIGRATING_SOURCE or MIGRATING_TARGET;
        * MIGRATING_SOURCE or MIGRATING_TARGET → ACTIVE (cutover done) or WRITE_FENCED (back off).

        The route keeps its id; ``created`` holds its new descriptor and ``retired`` is empty.
        """
        check_u64("route_id", route_id)
        state = check_route_state(state)
        return self._operation(
            "distribution_set_route_state",
            [u64_to_db(route_id), int(state)],
            expected_version,
            actor,
            retired=(),
        )

    def move_route(
        self, route_id: int, group_id: int, expected_version: int, *, actor: str | None = None
    ) -> CatalogWriteResult:
        """Reassign a WRITE_FENCED route to another group (fence, copy, move, unfence); O(1) rows.

        Raises :class:`~distribution.CatalogRouteNotFencedError` unless the route is fenced.
        """
        check_u64("route_id", route_id)
        check_u64("group_id", group_id)
        if group_id == 0:
            raise CatalogGroupIDRequiredError(
                "catalog group id is required: cannot move to group 0"
            )
        return self._operation(
            "distribution_move_route",
            [u64_to_db(route_id), u64_to_db(group_id)],
            expected_version,
            actor,
            retired=(),
        )

    def prune_history(self, keep_versions: int = DEFAULT_HISTORY_VERSIONS) -> int:
        """Drop history older than the newest ``keep_versions`` versions; returns the new floor.

        The floor is the oldest version still readable exactly. Safe while watchers run: a
        watcher behind the floor gets a reset from :meth:`changes_since`. O(rows dropped).
        """
        _check_count("keep_versions", keep_versions, minimum=1)
        with self._transaction() as cursor:
            current, floor, _ = _fetch_one(cursor, _META + " FOR UPDATE")
            new_floor = max(floor, current - keep_versions + 1)
            if new_floor > floor:
                cursor.execute("DELETE FROM distribution_routes WHERE valid_to <= %s", [new_floor])
                cursor.execute("DELETE FROM distribution_history WHERE version < %s", [new_floor])
                cursor.execute("UPDATE distribution_meta SET history_floor = %s", [new_floor])
        return u64_from_db(new_floor)

    def listen(self) -> CatalogListener:
        """Open a dedicated connection that LISTENs for catalog writes.

        The connection is taken out of the pool for good and closed with the listener. Raises
        :class:`~distribution.CatalogUnavailableError` when the database cannot be reached.
        """
        pooled, connection = self._checkout()
        pooled.detach()
        try:
            connection.rollback()
            connection.autocommit = True
            connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
        except psycopg.Error as exc:
            connection.close()
            raise translate_error(exc) from exc
        return CatalogListener(connection)

    # -- plumbing ------------------------------------------------------------------------------

    def _operation(
        self,
        function: str,
        arguments: list[Any],
        expected_version: int,
        actor: str | None,
        *,
        retired: tuple[int, ...],
    ) -> CatalogWriteResult:
        """Run one server-side catalog operation: a single round trip, whatever the size."""
        check_u64("expected_version", expected_version)
        _check_actor(actor)
        with self._transaction() as cursor:
            rows = cursor.execute(
                f"SELECT valid_from, {_ROUTE_COLUMNS} FROM {function}(%s, %s, %s, %s)",
                [*arguments, u64_to_db(expected_version), actor],
            ).fetchall()
        return CatalogWriteResult(
            version=u64_from_db(rows[0][0]),
            created=_descriptors([row[1:] for row in rows]),
            retired=retired,
        )

    def _check_readable(self, cursor: psycopg.Cursor[Any], read_ts: int) -> None:
        current, floor, _ = _fetch_one(cursor, _META)
        current, floor = u64_from_db(current), u64_from_db(floor)
        if read_ts > current:
            raise _ahead(read_ts, current)
        if read_ts < floor:
            raise CatalogSnapshotTooOldError(
                f"catalog version {read_ts} is older than the history kept (from version {floor})"
            )

    @contextmanager
    def _transaction(self, *, read_only: bool = False) -> Iterator[psycopg.Cursor[Any]]:
        """Run one transaction on a pooled connection, translating every database error.

        The connection's own settings (an engine made with ``isolation_level="AUTOCOMMIT"``, say)
        are set aside for the transaction and restored after it.
        """
        pooled, connection = self._checkout()
        settings = (connection.autocommit, connection.isolation_level, connection.read_only)
        committed = False
        try:
            connection.autocommit = False
            if read_only:
                connection.isolation_level = IsolationLevel.REPEATABLE_READ
                connection.read_only = True
            with connection.cursor(binary=True) as cursor:
                yield cursor
            connection.commit()
            committed = True
        except psycopg.Error as exc:
            raise translate_error(exc) from exc
        finally:
            _finish(self._engine, pooled, connection, committed, settings)

    def _checkout(self) -> tuple[Any, psycopg.Connection[Any]]:
        """A pooled connection and its psycopg connection; pool failures are unavailability."""
        try:
            pooled = self._engine.raw_connection()
        except sqlalchemy.exc.DBAPIError as exc:
            raise _translate(exc.orig) from exc.orig
        except sqlalchemy.exc.SQLAlchemyError as exc:  # a pool timeout, say
            raise CatalogUnavailableError(f"no catalog connection available: {exc}") from exc
        except psycopg.Error as exc:  # the pool lets connection errors through unwrapped
            raise translate_error(exc) from exc
        # Read the driver connection now: once detached, the pooled proxy no longer reports it.
        connection: psycopg.Connection[Any] = pooled.driver_connection  # type: ignore[assignment]
        return pooled, connection


@dataclass(frozen=True, slots=True)
class CatalogNotification:
    """A catalog write announced by NOTIFY: its version and, when it was small, the change."""

    version: int
    change: CatalogChange | None


def parse_notification(payload: str) -> CatalogNotification:
    """Parse a ``distribution_catalog`` payload: the version in decimal, then maybe the change.

    The change, when present, is JSON: ``previous`` (the version before the write, so one less
    than ``version``: a write moves the catalog by exactly one), ``upserts`` (base64 seed route
    records) and ``deletes`` (route ids). Raises ValueError when malformed.

    >>> parse_notification("7")
    CatalogNotification(version=7, change=None)
    >>> parse_notification('7 {"previous": 6, "upserts": [], "deletes": [3]}').change
    CatalogChange(previous_version=6, version=7, upserts=(), deletes=(3,))
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
    except (KeyError, TypeError, binascii.Error, RecursionError) as exc:
        raise ValueError(f"malformed catalog notification: {payload[:200]!r}") from exc
    if previous + 1 != version:
        raise ValueError(f"malformed catalog notification: {payload[:200]!r}")
    return CatalogNotification(version, CatalogChange(previous, version, upserts, deletes))


class CatalogListener:
    """A dedicated connection listening on :data:`NOTIFY_CHANNEL`; see :meth:`CatalogStore.listen`."""

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self._connection = connection

    def wait(self, timeout: float) -> list[CatalogNotification]:
        """Wait up to ``timeout`` seconds for notifications; return those that arrived.

        Returns as soon as one arrives, with any others already received; payloads that are not
        the catalog's are logged and skipped. Raises
        :class:`~distribution.CatalogUnavailableError` when the connection is lost.
        """
        try:
            received = list(self._connection.notifies(timeout=timeout, stop_after=1))
            if received:
                received += self._connection.notifies(timeout=0)
        except psycopg.Error as exc:
            raise translate_error(exc) from exc
        parsed = []
        for notify in received:
            try:
                parsed.append(parse_notification(notify.payload))
            except ValueError as exc:
                # Anyone may NOTIFY the channel: a payload that is not ours is skipped.
                _logger.warning("ignored a malformed catalog notification: %s", exc)
        return parsed

    def close(self) -> None:
        """Close the connection."""
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


def _finish(
    engine: sa.Engine,
    pooled: Any,
    connection: psycopg.Connection[Any],
    committed: bool,
    settings: tuple[bool, IsolationLevel | None, bool | None],
) -> None:
    """Return a connection to the pool as it was lent, or throw it away when it broke.

    A connection that cannot be restored is thrown away too: one interrupted mid-query (Ctrl-C,
    say) still has a command in progress, and would fail the pool's own reset.
    """
    restored = False
    try:
        if not committed:
            connection.rollback()
        connection.autocommit, connection.isolation_level, connection.read_only = settings
        restored = connection.info.transaction_status == TransactionStatus.IDLE
    except psycopg.Error:
        pass
    if connection.broken or connection.closed:
        pooled.invalidate()
        # As SQLAlchemy does on a disconnect: the other pooled connections are presumed dead too
        # (a server restart kills them all), so the pool is replaced and only one call fails.
        engine.dispose(close=False)
    elif not restored:
        pooled.invalidate()
    else:
        pooled.close()


def _translate(exc: BaseException | None) -> Exception:
    if isinstance(exc, psycopg.Error):
        return translate_error(exc)
    return CatalogUnavailableError(f"the catalog database is unavailable: {exc}")


def _raise_next_route_id(cursor: psycopg.Cursor[Any], next_route_id: int | None) -> None:
    """Raise the id counter to ``next_route_id`` (before the write's audit entry records it)."""
    if next_route_id is not None:
        cursor.execute(
            "UPDATE distribution_meta SET next_route_id = greatest(next_route_id, %s)",
            [u64_to_db(next_route_id)],
        )


def _check_actor(actor: object) -> None:
    if actor is not None and not isinstance(actor, str):
        raise TypeError(f"actor must be a str, got {type(actor).__name__}")


def _check_count(name: str, value: object, *, minimum: int) -> None:
    """Refuse a count argument: TypeError unless an int, ValueError below ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not minimum <= value <= 2**63 - 1:
        raise ValueError(f"{name} must be in {minimum}..2**63-1, got {value}")


def _fetch_one(cursor: psycopg.Cursor[Any], query: str, params: Sequence[Any] = ()) -> Any:
    return _fetch_one_row(cursor.execute(query, params or None))


def _fetch_one_row(cursor: psycopg.Cursor[Any]) -> Any:
    row = cursor.fetchone()
    assert row is not None, "a query of the metadata row returned nothing"
    return row


def _ahead(version: int, current: int) -> CatalogVersionAheadError:
    return CatalogVersionAheadError(
        f"catalog version {version} has not been reached: the catalog is at version {current}"
    )


def _fetch_routes(
    cursor: psycopg.Cursor[Any], query: str, params: dict[str, Any] | None = None
) -> tuple[RouteDescriptor, ...]:
    """Run a query of route rows and build their descriptors, the GC paused (see bulk)."""
    with paused_gc():
        return _descriptors(cursor.execute(query, params).fetchall())


def _descriptors(rows: Sequence[tuple[Any, ...]]) -> tuple[RouteDescriptor, ...]:
    """Turn stored route rows into descriptors, column by column."""
    if not rows:
        return ()
    return _from_columns(_shifted, *zip(*rows, strict=True))


def _shifted(stored: Sequence[int]) -> Iterable[int]:
    """The u64 values of a column of stored (shifted) values."""
    return map(u64_from_db, stored)


def _sign_flipped(values: Sequence[int]) -> Iterable[int]:
    """The u64 values of a column read with its sign bit flipped (see :data:`_LIVE_COLUMNS`)."""
    if min(values) >= 0:
        return values
    return map(UINT64_MAX.__and__, values)


def _from_columns(
    u64s: Callable[[Sequence[int]], Iterable[int]],
    route_ids: Sequence[int],
    starts: Sequence[bytes],
    ends: Sequence[bytes | None],
    group_ids: Sequence[int],
    states: Sequence[int],
    parents: Sequence[int],
) -> tuple[RouteDescriptor, ...]:
    """Descriptors from route columns, ``u64s`` turning the id columns into u64 values."""
    return make_descriptors(u64s(route_ids), starts, ends, u64s(group_ids), states, u64s(parents))


def _column_descriptors(columns: Sequence[Any]) -> tuple[RouteDescriptor, ...]:
    """Descriptors from the six column arrays of :data:`_LIVE_COLUMNS`, sorted by start."""
    if columns[0] is None:  # no live route: every aggregate is NULL
        return ()
    routes = _from_columns(_sign_flipped, *columns)
    starts = columns[1]
    # The rows reach the aggregates in index order, but SQL does not promise an aggregate's
    # input order: check it (one C-level pass) rather than trust it.
    if all(map(lt, starts, islice(starts, 1, None))):
        return routes
    return tuple(sorted(routes, key=_route_start))


def _changes(
    after: int, last: int, opened: Sequence[tuple[Any, ...]], closed: Sequence[tuple[Any, ...]]
) -> tuple[CatalogChange, ...]:
    """Group opened and closed route rows into one change per version in ``(after, last]``."""
    upserts: dict[int, list[tuple[Any, ...]]] = {}
    for row in opened:
        upserts.setdefault(u64_from_db(row[0]), []).append(row[1:])
    retired: dict[int, list[int]] = {}
    for version, route_id in closed:
        retired.setdefault(u64_from_db(version), []).append(u64_from_db(route_id))
    changes = []
    for version in range(after + 1, last + 1):
        opened_here = _descriptors(upserts.get(version, []))
        reopened = {route.route_id for route in opened_here}
        deletes = tuple(i for i in retired.get(version, []) if i not in reopened)
        changes.append(CatalogChange(version - 1, version, opened_here, deletes))
    return tuple(changes)


def _route_list(routes: Iterable[RouteDescriptor]) -> list[RouteDescriptor]:
    """``routes`` as a list, each a RouteDescriptor (else TypeError); O(n), C-level when valid."""
    if isinstance(routes, (str, bytes)):
        raise TypeError("routes must be an iterable of RouteDescriptor")
    table = list(routes)
    if not _ONLY_DESCRIPTORS.issuperset(map(type, table)):
        for route in table:
            if not isinstance(route, RouteDescriptor):
                raise TypeError(
                    f"routes must hold RouteDescriptor values, got {type(route).__name__}"
                )
    return table


def _catalog_table(routes: list[RouteDescriptor]) -> tuple[RouteDescriptor, ...]:
    """Validate a whole catalog and return it sorted by start (the Engine's rules, see
    :func:`~distribution.types.validate_route_table`, with the catalog's errors)."""
    return tuple(
        validate_route_table(
            routes,
            duplicate=CatalogDuplicateRouteIDError,
            order=CatalogRouteOverlapError,
            overlap=CatalogRouteOverlapError,
        )
    )


@dataclass(frozen=True, slots=True)
class _KnownRoutes:
    """The routes of the catalog at ``version``, whose digest was then ``digest``."""

    version: int
    digest: int
    routes: tuple[RouteDescriptor, ...]


@dataclass(frozen=True, slots=True)
class _Change:
    """What a save changes, against known routes."""

    #: The whole new catalog, validated, sorted by start.
    table: tuple[RouteDescriptor, ...]
    #: New routes, and routes whose fields changed.
    upserts: tuple[RouteDescriptor, ...]
    #: Ids of the known routes that are gone.
    deletes: tuple[int, ...]


class _KnownRoutesStale(Exception):
    """The catalog is at the known version but holds other routes; never leaves the store."""


#: Above this many changed routes (or this fraction of them), sending every route is as cheap.
_CHANGE_LIMIT = 1024
_CHANGE_FRACTION = 8


def _checked_table(table: list[RouteDescriptor]) -> tuple[RouteDescriptor, ...] | None:
    """``table`` sorted by start if every check of a catalog passes, else None; O(n), C-level.

    Every field must have its exact type (``int``, ``bytes``, a RouteState member) and range, ids
    must be unique and below ``2**64 - 1``, ranges non-empty, and routes must not overlap. None
    sends the caller to the exact, per-route checks (:func:`_catalog_table`), which raise the
    contract's first error, or accept an unusual but valid table (int states, say).
    """
    if not table:
        return ()
    route_ids, starts, ends, group_ids, states, parents = zip(*table, strict=True)
    if not (
        _ONLY_INT.issuperset(map(type, route_ids))
        and _ONLY_BYTES.issuperset(map(type, starts))
        and _BYTES_OR_NONE.issuperset(map(type, ends))
        and _ONLY_INT.issuperset(map(type, group_ids))
        and _ONLY_STATES.issuperset(map(type, states))
        and _ONLY_INT.issuperset(map(type, parents))
    ):
        return None
    groups = set(group_ids)
    if not (
        min(route_ids) > 0
        and max(route_ids) < UINT64_MAX
        and len(set(route_ids)) == len(route_ids)
        and min(groups) > 0
        and max(groups) <= UINT64_MAX
        and min(parents) >= 0
        and max(parents) <= UINT64_MAX
    ):
        return None
    if not all(map(lt, starts, islice(starts, 1, None))):
        table = sorted(table, key=_route_start)
        starts = tuple(map(_route_start, table))
        ends = tuple(map(_route_end, table))
        if not all(map(lt, starts, islice(starts, 1, None))):
            return None  # two routes share a start
    # Only the last route may be unbounded; each range is non-empty and ends by the next start.
    bounded = ends[:-1]
    if None in bounded or not (
        all(map(lt, starts, bounded))
        and all(map(le, bounded, islice(starts, 1, None)))
        and (ends[-1] is None or starts[-1] < ends[-1])
    ):
        return None
    return tuple(table)


def _change_from(known: _KnownRoutes, table: tuple[RouteDescriptor, ...]) -> _Change | None:
    """The change from ``known`` to a valid ``table``, or None when too many routes changed.

    A route equal to the known route with its id is unchanged (its fields' types were checked,
    so equal means the same values); C-level passes only.
    """
    known_by_id = dict(zip(map(_route_id, known.routes), known.routes, strict=True))
    route_ids = list(map(_route_id, table))
    previous = map(known_by_id.get, route_ids)
    upserts = tuple(compress(table, map(ne, table, previous)))
    if len(upserts) > min(_CHANGE_LIMIT, len(table) // _CHANGE_FRACTION + 1):
        return None
    deletes = tuple(known_by_id.keys() - set(route_ids))
    return _Change(table, upserts, deletes)


def _stage(cursor: psycopg.Cursor[Any], copy_data: bytes) -> None:
    """Copy routes (binary COPY data) into the transaction's temporary distribution_desired."""
    cursor.execute(_DESIRED_TABLE)
    with cursor.copy("COPY pg_temp.distribution_desired FROM STDIN (FORMAT BINARY)") as copy:
        copy.write(copy_data)


def _copy_data(table: Sequence[RouteDescriptor]) -> bytes:
    """Encode routes in PostgreSQL's binary COPY format with C-level loops only.

    Writing rows one by one through the driver costs microseconds of Python per row; here the
    columns are packed with ``map`` and interleaved by slice assignment, with no per-row object.
    """
    if not table:
        return _COPY_HEADER + _COPY_TRAILER
    route_ids, starts, bounded_ends, group_ids, states, parents = zip(*table, strict=True)
    ends = list(bounded_ends)
    # A valid catalog has at most one unbounded route, its last: NULL is a length of -1.
    unbounded = ends[-1] is None
    if unbounded:
        ends[-1] = b""
    end_lengths = list(map(len, ends))
    if unbounded:
        end_lengths[-1] = -1
    fields = 5
    parts: list[bytes] = [b""] * (fields * len(table))
    parts[0::fields] = map(
        _COPY_ROW_HEAD.pack, repeat(6), repeat(8), map(u64_to_db, route_ids), map(len, starts)
    )
    parts[1::fields] = starts
    parts[2::fields] = map(_COPY_LENGTH.pack, end_lengths)
    parts[3::fields] = ends
    parts[4::fields] = map(
        _COPY_ROW_TAIL.pack,
        repeat(8),
        map(u64_to_db, group_ids),
        repeat(2),
        states,
        repeat(8),
        map(u64_to_db, parents),
    )
    return b"".join((_COPY_HEADER, *parts, _COPY_TRAILER))


def check_catalog_and_engine(catalog: object, engine: object) -> tuple[CatalogStore, Engine]:
    """Refuse a missing catalog store or Engine with the library's errors, a mistyped one with
    TypeError (shared by everything that takes the two)."""
    if catalog is None:
        raise CatalogStoreRequiredError("catalog store is required")
    if engine is None:
        raise EngineRequiredError("engine is required")
    if not isinstance(catalog, CatalogStore):
        raise TypeError(f"catalog must be a CatalogStore, got {type(catalog).__name__}")
    if not isinstance(engine, Engine):
        raise TypeError(f"engine must be an Engine, got {type(engine).__name__}")
    return catalog, engine


def ensure_catalog_snapshot(catalog: CatalogStore | None, engine: Engine | None) -> CatalogSnapshot:
    """Make the Engine and the durable catalog agree at start-up, and return the catalog.

    An empty catalog (version 0, no routes) is seeded from the Engine's routes in key order, with
    ids 1, 2, 3, … (group and state kept, parent 0), as version 1. An existing catalog is left
    alone. When two services seed at once, one wins and the other adopts the winner's catalog.
    Either way the result is applied to the Engine.
    """
    catalog, engine = check_catalog_and_engine(catalog, engine)
    snapshot = catalog.snapshot()
    if snapshot.version == 0 and not snapshot.routes:
        seed = [
            RouteDescriptor(
                route_id=route_id,
                start=route.start,
                end=route.end,
                group_id=route.group_id,
                state=route.state,
            )
            for route_id, route in enumerate(engine.stats(), start=1)
        ]
        try:
            snapshot = catalog.save(0, seed, actor="ensure_catalog_snapshot")
        except CatalogVersionMismatchError:
            snapshot = catalog.snapshot()
    engine.apply_snapshot(snapshot)
    return snapshot

"""The statements the catalog client sends, and the decoding of what comes back.

One read is run here too, :func:`read_head` (the catalog's head in one statement), so that the
store and the watcher send it alike.

Cold paths (a version, a past snapshot, the history, pruning) are SQLAlchemy Core
over the mapped tables of :mod:`distribution.models`, whose types read u64 ids and states back as
real values. Text SQL, run on the psycopg connection of the transaction, is kept for the measured
hot paths; each says why. Their u64 columns come shifted (see :mod:`distribution.models`) and are
decoded here, with C-level passes over columns rather than Python code per row.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import islice
from operator import attrgetter, lt
from typing import Any

import psycopg
import sqlalchemy as sa

from distribution.bulk import make_descriptors
from distribution.catalog.transactions import single_statement
from distribution.models import Base, RouteRecord, u64_from_db, u64_to_db
from distribution.types import UINT64_MAX, CatalogChange, CatalogHead, RouteDescriptor

__all__ = [
    "BEGIN_WRITE",
    "CLOSED_ROUTES",
    "DELETE_HISTORY",
    "DELETE_RETIRED_ROUTES",
    "DIGEST",
    "HEAD",
    "HEAD_AND_FLOOR",
    "HISTORY",
    "HISTORY_DIGESTS",
    "HISTORY_NEWEST_FIRST",
    "LIVE_SNAPSHOT",
    "META",
    "META_FOR_UPDATE",
    "NEXT_ROUTE_ID",
    "NEXT_ROUTE_ID_AT",
    "OPENED_ROUTES",
    "RAISE_NEXT_ROUTE_ID",
    "ROUTES_AT",
    "ROUTES_OPENED_AT",
    "SAVE_CHANGES",
    "SAVE_DESIRED",
    "SET_HISTORY_FLOOR",
    "VERSION",
    "changes",
    "column_descriptors",
    "descriptors",
    "operation",
    "read_head",
    "stage",
    "stored_descriptors",
]

_meta = Base.metadata.tables["distribution_meta"]
_routes = Base.metadata.tables["distribution_routes"]
_history = Base.metadata.tables["distribution_history"]
_route_columns = [
    _routes.c.route_id,
    _routes.c.start,
    _routes.c.end,
    _routes.c.group_id,
    _routes.c.state,
    _routes.c.parent_route_id,
]
_route_start = attrgetter("start")

# -- hot paths: text SQL on the psycopg connection ---------------------------------------------

#: snapshot() and a reset of changes_since(): the version, the digest of the live routes, and the
#: live routes as six arrays, one per column, in one statement (one result, so an error comes
#: alone; snapshot() pipelines it with the BEGIN).
#: Fetching columns skips building a tuple per row and transposing the rows afterwards; the six
#: aggregates run in one pass over the same rows, so the arrays stay aligned whatever order the
#: rows come in. u64 columns come with their sign bit flipped: that gives the u64 itself as a
#: signed 64-bit integer (negative from 2**63 up), so most values need no Python work at all.
LIVE_SNAPSHOT = (
    "SELECT meta.version, meta.digest, live.* FROM distribution_meta AS meta, ("
    "SELECT array_agg(route_id # _sign), array_agg(start), array_agg(\"end\"), "
    "array_agg(group_id # _sign), array_agg(state), array_agg(parent_route_id # _sign) "
    'FROM (SELECT route_id, start, "end", group_id, state, parent_route_id '
    "FROM distribution_routes WHERE valid_to IS NULL ORDER BY start) AS rows, "
    "(SELECT -9223372036854775807 - 1 AS _sign) AS sign_bit) AS live"
)
#: save(): the digest checked before, and read after, sending routes (binary, no decoding).
DIGEST = "SELECT digest FROM distribution_meta"
#: A named write sent again: the routes its version opened, as the operations return them.
_OPENED_ROWS = (
    'SELECT valid_from, route_id, start, "end", group_id, state, parent_route_id '
    "FROM distribution_routes "
)
ROUTES_OPENED_AT = _OPENED_ROWS + "WHERE valid_from = %s ORDER BY start"
#: changes_since(): the route rows opened by the versions in ``(after, last]`` (the two
#: parameters, stored), by version then start; then the ids of those the same versions closed.
#: A change too large for a NATS message is read by every watcher of a fleet at once: decoded
#: through the models' types, each route cost about 20 us, most of a 20,000-route change's read.
OPENED_ROUTES = (
    _OPENED_ROWS + "WHERE valid_from > %s AND valid_from <= %s ORDER BY valid_from, start"
)
CLOSED_ROUTES = (
    "SELECT valid_to, route_id FROM distribution_routes WHERE valid_to > %s AND valid_to <= %s "
    "ORDER BY valid_to, route_id"
)
#: Every write: the compare-and-set on the version, one server-side call.
BEGIN_WRITE = "SELECT distribution_begin_write(%s)"
#: save(): the server diffs every staged route against the live ones.
SAVE_DESIRED = "SELECT distribution_save_desired(%s, %s)"
#: save(): the server applies the staged changed routes and retires the deleted ids.
SAVE_CHANGES = "SELECT distribution_save_changes(%s, %s, %s, %s)"
#: Raise the id counter to at least a value (a catalog copied from another keeps its counter).
RAISE_NEXT_ROUTE_ID = (
    "UPDATE distribution_meta SET next_route_id = greatest(next_route_id, %s)"
)
# save(): the routes are staged with a binary COPY into a temporary table.
_DESIRED_TABLE = (
    "CREATE TEMP TABLE IF NOT EXISTS distribution_desired ("
    'route_id bigint, start bytea, "end" bytea, group_id bigint, state smallint, '
    "parent_route_id bigint) ON COMMIT DELETE ROWS"
)
_COPY_DESIRED = "COPY pg_temp.distribution_desired FROM STDIN (FORMAT BINARY)"
_DESIRED_TYPES = ("int8", "bytea", "bytea", "int8", "int2", "int8")
#: Routes per block while staging: bounds the columns held in memory, not the rows sent.
_STAGE_BLOCK = 8192


def operation(function: str) -> str:
    """split_route and the other operations (measured beside a bare compare-and-set): one call
    of the server-side ``function``, which returns the routes it created."""
    return (
        'SELECT valid_from, route_id, start, "end", group_id, state, parent_route_id '
        f"FROM {function}(%s, %s, %s, %s)"
    )


def stage(cursor: psycopg.Cursor[Any], routes: Sequence[RouteDescriptor]) -> None:
    """Copy ``routes`` into the transaction's temporary ``distribution_desired``; O(n).

    A binary COPY through psycopg's own row writer, streamed: rows go out as psycopg's buffer
    fills, and only one block of columns is held at a time. The u64 fields are shifted per
    column with C-level ``map`` calls, so no Python code runs per route.
    """
    cursor.execute(_DESIRED_TABLE)
    with cursor.copy(_COPY_DESIRED) as copy:
        copy.set_types(_DESIRED_TYPES)
        write_row = copy.write_row
        for i in range(0, len(routes), _STAGE_BLOCK):
            ids, starts, ends, groups, states, parents = zip(
                *routes[i : i + _STAGE_BLOCK], strict=True
            )
            rows = zip(
                map(u64_to_db, ids),
                starts,
                ends,
                map(u64_to_db, groups),
                states,
                map(u64_to_db, parents),
                strict=True,
            )
            deque(map(write_row, rows), maxlen=0)


# -- cold paths: SQLAlchemy Core over the mapped tables ------------------------------------------
# Built once: building a statement costs more than running a small one. Parameters are named
# bindparams, typed by the columns they are compared with (u64s shifted by the models' type).

#: The catalog version.
VERSION = sa.select(_meta.c.version)
#: The next route id the catalog will allocate.
NEXT_ROUTE_ID = sa.select(_meta.c.next_route_id)
#: The version, the route digest and the recovery state (:class:`~distribution.CatalogHead`).
HEAD = sa.select(_meta.c.version, _meta.c.digest, sa.func.pg_is_in_recovery())
#: :data:`HEAD`, and the oldest version still readable exactly.
HEAD_AND_FLOOR = HEAD.add_columns(_meta.c.history_floor)
#: The version and the oldest version still readable exactly.
META = sa.select(_meta.c.version, _meta.c.history_floor)
#: :data:`META`, locking the row (pruning must not race a write's history).
META_FOR_UPDATE = META.with_for_update()
#: The route id counter as the write that produced version ``read_ts`` left it.
NEXT_ROUTE_ID_AT = sa.select(_history.c.next_route_id).where(
    _history.c.version == sa.bindparam("read_ts")
)
#: The routes live at version ``read_ts``, in key order.
ROUTES_AT = (
    sa.select(*_route_columns)
    .where(RouteRecord.live_at(sa.bindparam("read_ts")))
    .order_by(_routes.c.start)
)
#: The route digest each version in ``(after, last]`` left (NULL for writes before revision 0004).
HISTORY_DIGESTS = (
    sa.select(_history.c.version, _history.c.digest)
    .where(_history.c.version > sa.bindparam("after"))
    .where(_history.c.version <= sa.bindparam("last"))
)
_HISTORY_SINCE = sa.select(
    _history.c.version,
    _history.c.operation,
    _history.c.arguments,
    _history.c.actor,
    _history.c.committed_at,
).where(_history.c.version > sa.bindparam("since"))
_HISTORY_LIMIT = sa.bindparam("limit", type_=sa.BigInteger)
#: The audit entries of the versions after ``since``, oldest first, at most ``limit`` (None: all).
HISTORY = _HISTORY_SINCE.order_by(_history.c.version).limit(_HISTORY_LIMIT)
#: :data:`HISTORY`, newest first: ``limit`` keeps the latest writes.
HISTORY_NEWEST_FIRST = _HISTORY_SINCE.order_by(_history.c.version.desc()).limit(_HISTORY_LIMIT)
#: Drop the route rows no version from ``floor`` on can read.
DELETE_RETIRED_ROUTES = sa.delete(_routes).where(_routes.c.valid_to <= sa.bindparam("floor"))
#: Drop the audit entries older than ``floor``.
DELETE_HISTORY = sa.delete(_history).where(_history.c.version < sa.bindparam("floor"))
#: Record ``floor`` as the oldest version readable exactly.
SET_HISTORY_FLOOR = sa.update(_meta).values(history_floor=sa.bindparam("floor"))


def read_head(sa_engine: sa.Engine) -> CatalogHead:
    """The catalog's version, route digest and recovery state (:data:`HEAD`), read in one
    statement in autocommit on a pooled connection of ``sa_engine`` (see
    :func:`~distribution.catalog.transactions.single_statement`): one round trip, no ``BEGIN``
    or ``COMMIT``, and one version of the catalog. O(1).

    :meth:`CatalogStore.head <distribution.CatalogStore.head>` reads it so, and so does the
    watcher, over its own connection too.
    """
    with single_statement(sa_engine) as connection:
        version, digest, standby = connection.execute(HEAD).one()
    return CatalogHead(version, digest, standby)


# -- decoding ------------------------------------------------------------------------------------


def descriptors(rows: Sequence[Sequence[Any]]) -> tuple[RouteDescriptor, ...]:
    """Descriptors from rows of the route columns read through the models' types; O(n).

    Call it with the GC paused (see :func:`~distribution.bulk.paused_gc`) for many rows.
    """
    if not rows:
        return ()
    return make_descriptors(*zip(*rows, strict=True))


def stored_descriptors(rows: Sequence[Sequence[Any]]) -> tuple[RouteDescriptor, ...]:
    """Descriptors from rows of the route columns as stored (u64s shifted); O(n)."""
    if not rows:
        return ()
    return _from_columns(_shifted, *zip(*rows, strict=True))


def column_descriptors(columns: Sequence[Any]) -> tuple[RouteDescriptor, ...]:
    """Descriptors from the six column arrays of :data:`LIVE_SNAPSHOT`, sorted by start; O(n)."""
    if columns[0] is None:  # no live route: every aggregate is NULL
        return ()
    routes = _from_columns(_sign_flipped, *columns)
    starts = columns[1]
    # The rows reach the aggregates in index order, but SQL does not promise an aggregate's
    # input order: check it (one C-level pass) rather than trust it.
    if all(map(lt, starts, islice(starts, 1, None))):
        return routes
    return tuple(sorted(routes, key=_route_start))


def changes(
    after: int,
    last: int,
    opened: Sequence[Sequence[Any]],
    closed: Sequence[Sequence[Any]],
    digests: Mapping[int, int | None],
) -> tuple[CatalogChange, ...]:
    """Group opened and closed route rows (of :data:`OPENED_ROUTES` and :data:`CLOSED_ROUTES`,
    as stored) into one change per version in ``(after, last]``, each with the digest its
    version left (by version, as :data:`HISTORY_DIGESTS` reads them; None where unknown);
    O(rows + versions)."""
    upserts: dict[int, list[Sequence[Any]]] = {}
    for row in opened:
        upserts.setdefault(row[0], []).append(row[1:])
    retired: dict[int, list[int]] = {}
    for closed_at, route_id in closed:
        retired.setdefault(closed_at, []).append(route_id)
    result = []
    for at in range(after + 1, last + 1):
        opened_here = stored_descriptors(upserts.get(u64_to_db(at), []))
        reopened = {route.route_id for route in opened_here}
        deletes = tuple(
            i for i in map(u64_from_db, retired.get(u64_to_db(at), [])) if i not in reopened
        )
        result.append(CatalogChange(at - 1, at, opened_here, deletes, digests.get(at)))
    return tuple(result)


def _shifted(stored: Sequence[int]) -> Iterable[int]:
    """The u64 values of a column of stored (shifted) values."""
    return map(u64_from_db, stored)


def _sign_flipped(values: Sequence[int]) -> Iterable[int]:
    """The u64 values of a column read with its sign bit flipped (see :data:`LIVE_SNAPSHOT`)."""
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

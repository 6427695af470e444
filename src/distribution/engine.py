"""The in-memory routing Engine: which route holds a key, answered without taking a lock.

Layout
------
Readers never lock. The Engine holds ``self._table``, an immutable
:class:`~distribution.table.RouteTable` that writers replace with one reference assignment
(writers serialize on a :class:`threading.Lock`), so a reader always sees one consistent table,
old or new. :attr:`Engine.implementation` says whether its chunks are packed in C or kept in
pure-Python lists.

Loads live apart from the routes, in lists parallel to the slots that only writers touch (under
the lock). Routes in the table always carry ``load == 0``; :meth:`Engine.stats` gives exact loads.
So a lookup may return a Route it returned before: the C table's reader keeps the Routes of a
small table's recent lookups in a small cache, emptied (in O(1)) by each swap of the table.

A change of many routes (see :func:`_rebuilds`) is applied by merging the table's routes with
the change's in one pass, as a snapshot is built, rather than by rewriting the chunks it touches.

Catalog routes (``route_id != 0``) are also indexed by id (to the 8-byte prefix of their start
and their parent id, in 24 bytes a route), so that :meth:`Engine.apply_changes` finds a deleted
route without a scan. A catalog route split by a hotspot is *shadowed*: its ephemeral pieces serve
its range, and the Engine still knows it, so a later change that deletes or replaces it removes
the pieces too.

The Engine keeps the catalog digest of its catalog routes (:attr:`Engine.digest`, as
:func:`distribution.codec.routes_digest` computes it, shadowed routes counted, their pieces not):
a snapshot brings it, or it is computed from the table on first use (in C, without holding the
GIL, with the C table); each change moves it by the hashes of the routes it replaces and adds.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from contextlib import nullcontext
from itertools import chain, pairwise, repeat
from operator import attrgetter, is_not, itemgetter
from typing import TYPE_CHECKING, TypeAlias

from distribution import table as table_module
from distribution._pylookup import prefix
from distribution.bulk import paused_gc
from distribution.codec import routes_digest
from distribution.errors import (
    CatalogGroupIDRequiredError,
    CatalogInvalidRouteRangeError,
    EngineDigestMismatchError,
    EngineSnapshotDuplicateIDError,
    EngineSnapshotRouteOrderError,
    EngineSnapshotRouteOverlapError,
    EngineSnapshotVersionGapError,
    EngineSnapshotVersionStaleError,
)
from distribution.table import BUILDING, RouteTable, _Ids, _Searches
from distribution.types import (
    CatalogChange,
    CatalogSnapshot,
    Route,
    RouteDescriptor,
    RouteState,
    check_bound,
    check_key,
    check_route_pair,
    check_u64,
    validate_route_descriptor,
    validate_route_table,
)

__all__ = ["Engine"]

if TYPE_CHECKING:
    from distribution._lookup import Reader as _Reader
else:
    # The C base where the extension is in use: get_route without a Python frame.
    _Reader = table_module.IMPLEMENTATION.Reader

_Loads: TypeAlias = list[list[int]]
#: A change's nearest surviving catalog routes around a key: ``near(key, floor, ceiling)``, those
#: before the key starting above ``floor``, those after it starting below ``ceiling``.
_Near: TypeAlias = Callable[[bytes, bytes | None, bytes | None], Iterable[Route]]
#: A batch of changes folded: route id -> its final descriptor, or None if deleted.
_Net: TypeAlias = dict[int, RouteDescriptor | None]
#: What a change does, validated: the ids it deletes, then the routes it upserts.
_Step: TypeAlias = tuple[list[int], list[RouteDescriptor]]
#: A key range ``[start, end)``; ``end is None`` means unbounded.
_Range: TypeAlias = tuple[bytes, bytes | None]

_route_start = attrgetter("start")
_first_start = itemgetter(0)

#: Changes of fewer routes are never merged, or rebuilt from the slots (see :func:`_rebuilds`).
_MERGE_MIN = 4
_REBUILD_MIN = 64


def _empty_table(implementation: _Searches) -> tuple[RouteTable, _Loads, _Ids]:
    """A table of no route, its loads and ids."""
    return _build(implementation, ())


def _sorted_valid(routes: Iterable[RouteDescriptor]) -> list[RouteDescriptor]:
    """The exact snapshot checks, in the contract's order; returns normalized, sorted routes."""
    valid = validate_route_table(
        routes,
        duplicate=EngineSnapshotDuplicateIDError,
        order=EngineSnapshotRouteOrderError,
        overlap=EngineSnapshotRouteOverlapError,
    )
    # Duck-typed descriptors become real ones, so the C-level layout accepts them.
    return [
        r
        if type(r) is RouteDescriptor
        else RouteDescriptor(r.route_id, r.start, r.end, r.group_id, r.state, r.parent_route_id)
        for r in valid
    ]


def _check_pair(prev: RouteDescriptor | Route, cur: RouteDescriptor | Route) -> None:
    """Raise the Engine's order or overlap error for two routes adjacent in start order."""
    check_route_pair(
        prev, cur, order=EngineSnapshotRouteOrderError, overlap=EngineSnapshotRouteOverlapError
    )


def _build(
    implementation: _Searches, routes: Sequence[RouteDescriptor]
) -> tuple[RouteTable, _Loads, _Ids]:
    """Validate ``routes`` (raising the first error) and build a fresh table, loads and ids."""
    with paused_gc(promote=True):
        built = RouteTable.build(implementation, routes)
        if built is None:
            # Unsorted but otherwise valid? Sorting is cheaper than the per-route checks.
            try:
                ordered = sorted(routes, key=_route_start)
            except (TypeError, AttributeError):
                ordered = None
            if ordered is not None and any(map(is_not, ordered, routes)):
                built = RouteTable.build(implementation, ordered)
        if built is None:
            built = RouteTable.build(implementation, _sorted_valid(routes))
            assert built is not None, "normalized routes must take the fast path"
    return built


def _merge_ranges(ranges: Iterable[_Range]) -> list[_Range]:
    """Sort ranges and merge those that overlap or touch."""
    merged: list[_Range] = []
    for start, end in sorted(ranges, key=_first_start):
        if merged:
            prev_start, prev_end = merged[-1]
            if prev_end is None or start <= prev_end:
                if prev_end is not None and (end is None or end > prev_end):
                    merged[-1] = (prev_start, end)
                continue
        merged.append((start, end))
    return merged


def _check_digest(name: str, value: object) -> int | None:
    """Return ``value`` if it is None or a signed 64-bit int (a catalog digest)."""
    if value is None or (value.__class__ is int and -(2**63) <= value < 2**63):
        return value
    raise TypeError(f"{name} must be a signed 64-bit int or None, got {value!r}")


def _key_error(keys: Iterable[object], error: TypeError) -> TypeError:
    """The library's TypeError for the first of ``keys`` that is not bytes, else ``error``.

    The C searches check their keys too, with a terser message than :func:`check_key`'s.
    """
    for key in keys:
        try:
            check_key("key", key)
        except TypeError as refused:
            return refused
    return error


class Engine(_Reader):
    """The in-memory routing table of a service: which route holds a key.

    Thread-safe: lookups never lock (they read an immutable table that writers swap in whole);
    writers (snapshots, changes, :meth:`update_route`, :meth:`record_access`) serialize on a lock.
    :meth:`get_route` (``get_route(key) -> Route | None``, O(log routes)) comes from the table
    implementation's ``Reader``: in C, a lookup is one C call.

    >>> from distribution import CatalogSnapshot, RouteDescriptor
    >>> engine = Engine()
    >>> engine.apply_snapshot(CatalogSnapshot(version=1, routes=(
    ...     RouteDescriptor(route_id=1, start=b"", end=b"m", group_id=1),
    ...     RouteDescriptor(route_id=2, start=b"m", end=None, group_id=2),
    ... )))
    >>> engine.get_route(b"q").group_id
    2
    """

    def __init__(self, hotspot_threshold: int = 0) -> None:
        """Create an empty Engine; ``hotspot_threshold == 0`` disables hotspot splits. O(1).

        >>> Engine(hotspot_threshold=100).version
        0
        """
        self._threshold = check_u64("hotspot_threshold", hotspot_threshold)
        self._lock = threading.Lock()
        self._ts_lock = threading.Lock()
        self._last_ts = 0
        self._version = 0
        self._table: RouteTable
        self._loads: _Loads
        #: Catalog route id -> its start's prefix (see :meth:`_catalog_route`).
        self._ids: _Ids
        #: The table implementation this Engine's tables are built by and searched with.
        self._search = table_module.IMPLEMENTATION
        self._table, self._loads, self._ids = _empty_table(self._search)
        #: Catalog routes split by a hotspot, sorted by start: their pieces serve their ranges.
        self._shadowed: list[Route] = []
        #: The catalog digest of the catalog routes, or None until first needed (see ``digest``).
        self._digest: int | None = 0

    @classmethod
    def with_default_route(cls, hotspot_threshold: int = 0) -> Engine:
        """An Engine holding one ephemeral route ``[b"", None)`` on group 1. O(1).

        >>> Engine.with_default_route().get_route(b"any")
        Route(route_id=0, start=b'', end=None, group_id=1, state=<RouteState.ACTIVE: 0>, load=0)
        """
        engine = cls(hotspot_threshold)
        engine.update_route(b"", None, 1)
        return engine

    @property
    def implementation(self) -> str:
        """Which searches the lookups use: ``"c"``, or ``"python"`` without the extension. O(1).

        ``"python"`` when the C extension was not built at install time, or when the environment
        variable ``DISTRIBUTION_PURE_PYTHON`` was set (not to ``"0"``) when ``distribution`` was
        imported.

        >>> Engine().implementation in ("c", "python")
        True
        """
        return self._search.IMPLEMENTATION

    @property
    def version(self) -> int:
        """The catalog version last applied; ``0`` at first. O(1).

        >>> Engine().version
        0
        """
        return self._version

    @property
    def route_count(self) -> int:
        """How many catalog routes the Engine holds (those a hotspot split shadows included,
        ephemeral routes not). O(1).

        >>> from distribution import CatalogSnapshot, RouteDescriptor
        >>> engine = Engine.with_default_route()
        >>> engine.route_count
        0
        >>> engine.apply_snapshot(CatalogSnapshot(version=1, routes=(
        ...     RouteDescriptor(route_id=1, start=b"", end=b"m", group_id=1),
        ...     RouteDescriptor(route_id=2, start=b"m", end=None, group_id=2))))
        >>> engine.route_count
        2
        """
        return len(self._ids)

    @property
    def digest(self) -> int:
        """The catalog digest of the catalog routes the Engine holds, as
        :func:`distribution.codec.routes_digest` computes it (the catalog's
        ``distribution_meta.digest`` at :attr:`version`). O(1).

        Catalog routes split by a hotspot count as the catalog has them; their ephemeral pieces,
        and routes from :meth:`update_route`, do not. After a snapshot that did not carry its
        digest, the first read computes it: O(routes), in C with the C table (other threads keep
        looking keys up meanwhile).

        >>> from distribution import CatalogSnapshot, RouteDescriptor
        >>> from distribution.codec import routes_digest
        >>> routes = (RouteDescriptor(route_id=1, start=b"", end=None, group_id=1),)
        >>> engine = Engine()
        >>> engine.digest
        0
        >>> engine.apply_snapshot(CatalogSnapshot(version=1, routes=routes))
        >>> engine.digest == routes_digest(routes)
        True
        """
        digest = self._digest
        if digest is None:
            with self._lock:
                digest = self._digest = self._current_digest()
        return digest

    def _current_digest(self) -> int:
        """The digest as last published, computed from the table if unknown (under the lock)."""
        if self._digest is not None:
            return self._digest
        digest = self._search.digest(self._table, self._ids)
        for route in self._shadowed:
            digest ^= self._route_hash(route)
        return digest

    def _route_hash(self, route: Route) -> int:
        """The catalog hash of catalog route ``route`` (its parent from the id index)."""
        return self._search.route_hash(*route[:5], self._ids[route[0]][1])

    # -- lookups (lock-free) -------------------------------------------------------------------

    def get_intersecting_routes(self, start: bytes, end: bytes | None) -> list[Route]:
        """Routes intersecting ``[start, end)`` in key order; ``end None`` is unbounded.

        An empty or inverted range gives ``[]``. O(log routes + routes returned), no lock.

        >>> engine = Engine()
        >>> engine.update_route(b"a", b"c", 1)
        >>> engine.update_route(b"c", b"e", 2)
        >>> [r.group_id for r in engine.get_intersecting_routes(b"b", b"d")]
        [1, 2]
        >>> engine.get_intersecting_routes(b"d", b"b")
        []
        """
        check_key("start", start)
        if end is not None:
            check_key("end", end)
            if start >= end:
                return []
        return self._table.intersecting(start, end)

    def group_keys(self, keys: Iterable[bytes]) -> list[tuple[Route, list[bytes]]]:
        """Route a batch of keys at once: ``[(route, [keys...]), ...]`` in key order.

        Keys are sorted within a group, duplicates are kept, keys no route holds are left out.
        O(k log k) for k keys (a radix sort on their first 8 bytes, then a comparison sort of the
        keys those leave tied, on their next 8 bytes, whole keys only where both tie), plus
        O(log routes) per group: a batch whose keys share routes costs far less per key than one
        :meth:`get_route` each. No lock.

        >>> engine = Engine()
        >>> engine.update_route(b"a", b"m", 1)
        >>> engine.update_route(b"m", None, 2)
        >>> [(r.group_id, ks) for r, ks in engine.group_keys([b"z", b"b", b"0", b"a", b"b"])]
        [(1, [b'a', b'b', b'b']), (2, [b'z'])]
        """
        batch = keys if keys.__class__ is list else list(keys)
        try:
            return self._group(batch)
        except TypeError as error:
            raise _key_error(batch, error) from None

    # -- writers -------------------------------------------------------------------------------

    def apply_snapshot(self, snapshot: CatalogSnapshot) -> None:
        """Replace every route with the snapshot's, atomically, if the snapshot is newer.

        An older version raises :class:`~distribution.EngineSnapshotVersionStaleError` and the same
        version is a silent no-op (not validated). Then each route is validated like a
        descriptor, ids must be unique, and, sorted by start, adjacent routes must not share a
        start, follow an unbounded route, or overlap. Loads restart at 0; ephemeral routes go.
        The snapshot's ``digest``, when not None, becomes :attr:`digest` as it is (a catalog read
        brings it from the same transaction), else the digest is computed on its first use.
        O(routes log routes) (O(routes) when sorted), built without holding the lock, one build
        at a time in a process (:data:`~distribution.table.BUILDING`).

        >>> from distribution import CatalogSnapshot, RouteDescriptor
        >>> engine = Engine.with_default_route()
        >>> engine.apply_snapshot(CatalogSnapshot(version=3, routes=()))
        >>> engine.version, engine.get_route(b"k")
        (3, None)
        >>> engine.apply_snapshot(CatalogSnapshot(version=2, routes=()))
        Traceback (most recent call last):
        ...
        distribution.errors.EngineSnapshotVersionStaleError: engine snapshot version is stale: snapshot version 2 is older than engine catalog version 3
        """
        version = check_u64("version", snapshot.version)
        if self._version_is_current(version):
            return
        digest = _check_digest("snapshot digest", snapshot.digest)
        with BUILDING:
            table, loads, ids = _build(self._search, snapshot.routes)
            with self._lock:
                if self._version_is_current(version):
                    return
                self._publish(version, table, loads, ids, digest)

    def reset(self, snapshot: CatalogSnapshot) -> None:
        """Replace every route with the snapshot's, atomically, whatever the versions.

        :meth:`apply_snapshot` for an Engine that must return to the catalog: the snapshot may be
        older than, or as new as, :attr:`version` (an Engine that applied changes the catalog
        never made, say). The same validation and digest rules; on any error nothing changes.
        O(routes log routes) (O(routes) when sorted), built without holding the lock, one build
        at a time in a process (:data:`~distribution.table.BUILDING`).

        >>> from distribution import CatalogSnapshot, RouteDescriptor
        >>> engine = Engine()
        >>> engine.apply_snapshot(CatalogSnapshot(version=5, routes=()))
        >>> engine.reset(CatalogSnapshot(version=3, routes=(
        ...     RouteDescriptor(route_id=1, start=b"", end=None, group_id=1),)))
        >>> engine.version, engine.get_route(b"k").route_id
        (3, 1)
        """
        version = check_u64("version", snapshot.version)
        digest = _check_digest("snapshot digest", snapshot.digest)
        with BUILDING:
            table, loads, ids = _build(self._search, snapshot.routes)
            with self._lock:
                self._publish(version, table, loads, ids, digest)

    def _publish(
        self, version: int, table: RouteTable, loads: _Loads, ids: _Ids, digest: int | None
    ) -> None:
        """Swap in a whole new table (under the lock)."""
        self._table, self._loads = table, loads
        self._ids = ids
        self._shadowed = []
        self._digest = digest
        self._version = version

    def _version_is_current(self, version: int) -> bool:
        """True if ``version`` is already applied; raise if it is older."""
        current = self._version
        if version < current:
            raise EngineSnapshotVersionStaleError(
                f"engine snapshot version is stale: snapshot version {version} is older than "
                f"engine catalog version {current}"
            )
        return version == current

    def apply_changes(self, changes: Sequence[CatalogChange]) -> None:
        """Apply contiguous catalog changes incrementally, with :meth:`apply_snapshot`'s rules.

        Changes already applied (``version <= engine.version``) are skipped; the rest must start
        from ``engine.version`` (:class:`~distribution.EngineSnapshotVersionGapError` if they start
        later, :class:`~distribution.EngineSnapshotVersionStaleError` if one straddles it). Each
        change deletes, then upserts (an upsert of a known id replaces it). Every upsert is
        validated like a descriptor, a change must not repeat an id, and the resulting routes must
        not overlap. A change whose ``digest`` is not None must leave :attr:`digest` equal to it,
        else :class:`~distribution.EngineDigestMismatchError`. On any error nothing of the batch
        changes. Changed routes get load 0, the others keep theirs; ephemeral routes overlapping a
        changed route are dropped. O(c log c + chunk) for c changed routes (plus the routes
        between them); a change of many routes (four or more, and one for every two chunks of
        the table) is merged with the table as a snapshot is built: O(routes + c log c).

        >>> from distribution import CatalogChange, CatalogSnapshot, RouteDescriptor
        >>> engine = Engine()
        >>> engine.apply_snapshot(CatalogSnapshot(version=1, routes=(
        ...     RouteDescriptor(route_id=1, start=b"", end=None, group_id=1),)))
        >>> engine.apply_changes([CatalogChange(previous_version=1, version=2, deletes=(1,),
        ...     upserts=(RouteDescriptor(route_id=2, start=b"", end=b"m", group_id=1),
        ...              RouteDescriptor(route_id=3, start=b"m", end=None, group_id=2)))])
        >>> engine.version, engine.get_route(b"x").route_id
        (2, 3)
        >>> engine.apply_changes([CatalogChange(previous_version=2, version=3, upserts=(),
        ...     deletes=(3,), digest=0)])
        Traceback (most recent call last):
        ...
        distribution.errors.EngineDigestMismatchError: engine change digest mismatch: the change from version 2 to version 3 leaves digest -5255514038620293305, the catalog has 0
        >>> engine.version
        2
        """
        pending = list(changes)
        for change in pending:
            check_u64("previous_version", change.previous_version)
            check_u64("version", change.version)
            if change.digest is not None:
                _check_digest("change digest", change.digest)
            if change.version <= change.previous_version:
                raise EngineSnapshotVersionGapError(
                    f"engine change is malformed: version {change.version} does not follow "
                    f"previous version {change.previous_version}"
                )
        for prev, cur in pairwise(pending):
            if cur.previous_version != prev.version:
                raise EngineSnapshotVersionGapError(
                    f"engine changes are not contiguous: a change to version {prev.version} is "
                    f"followed by one from version {cur.previous_version}"
                )
        # A change that may be merged builds a whole table, so it holds BUILDING (before the lock,
        # as every build does) until its table is swapped in; the table it reads the size of may
        # change meanwhile, and a change that finds it may not merge rewrites chunks instead.
        changed = sum(len(change.deletes) + len(change.upserts) for change in pending)
        may_merge = _rebuilds(changed, len(self._table.chunks), merged=True)
        with BUILDING if may_merge else nullcontext(), self._lock:
            current = self._version
            if not pending or pending[-1].version <= current:
                return
            k = next((k for k, c in enumerate(pending) if c.previous_version == current), None)
            if k is None:
                first = pending[0].previous_version
                if first > current:
                    raise EngineSnapshotVersionGapError(
                        f"engine changes do not continue from engine catalog version {current}: "
                        f"they start at version {first}"
                    )
                raise EngineSnapshotVersionStaleError(
                    f"engine snapshot version is stale: change from version {first} is older "
                    f"than engine catalog version {current}"
                )
            pending = pending[k:]
            steps = _validated(pending, self._search.usual_route)
            net = _net_effect(steps)
            # A large change rebuilds the table from one pass over its routes, O(routes) (route
            # by route, it would cost O(log routes + chunk) a changed route, far more in all):
            # as a snapshot is built if a snapshot could carry what the Engine holds, else from
            # its slots, creating a Route per route (with the collector paused, as a build).
            chunks = len(self._table.chunks)
            if may_merge and _rebuilds(len(net), chunks, merged=True):
                rebuilt = self._rebuilt(pending, steps, net)
                if rebuilt is not None:
                    self._table, self._loads, self._ids, self._digest = rebuilt
                    self._version = pending[-1].version
                    return
            large = _rebuilds(len(net), chunks, merged=False)
            added = sorted(
                (
                    Route(d.route_id, d.start, d.end, d.group_id, d.state, 0)
                    for d in net.values()
                    if d is not None
                ),
                key=_route_start,
            )
            with paused_gc() if large else nullcontext():
                slots = list(self._table.slots()) if large else None
                if slots is None:
                    removed = [r for r in map(self._catalog_route, net) if r is not None]
                    _check_placement(added, self._near_routes(net))
                else:
                    in_net = {r.route_id: r for r in slots if r is not None and r.route_id in net}
                    removed = [r for r in map(in_net.get, net) if r is not None]
                    removed += (r for r in self._shadowed if r.route_id in net)
                    survivors = [
                        r for r in slots if r is not None and r.route_id and r.route_id not in net
                    ]
                    survivors += (r for r in self._shadowed if r.route_id not in net)
                    _check_placement(added, _near_in(survivors))
                digest = self._digest
                if digest is not None or any(c.digest is not None for c in pending):
                    hashes = {r[0]: self._route_hash(r) for r in removed}
                    digest = self._next_digest(pending, steps, hashes)
                ranges = _merge_ranges([(r.start, r.end) for r in chain(removed, added)])
                if slots is None:
                    table, loads = self._table.rewrite(self._loads, ranges, net, added)
                else:
                    table, loads = self._table.rebuild(slots, self._loads, ranges, net, added)
            for route_id in net:
                if route_id in self._ids:
                    del self._ids[route_id]
            for d in net.values():
                if d is not None:
                    self._ids[d.route_id] = (prefix(d.start), d.parent_route_id)
            if self._shadowed:
                self._shadowed = [r for r in self._shadowed if r.route_id not in net]
            self._table, self._loads = table, loads
            self._digest = digest
            self._version = pending[-1].version

    def _rebuilt(
        self, changes: Sequence[CatalogChange], steps: list[_Step], net: _Net
    ) -> tuple[RouteTable, _Loads, _Ids, int | None] | None:
        """The table, loads, ids and digest after ``changes`` (validated as ``steps``, folded
        into ``net``), built as a snapshot is, from the table's routes and the upserts in one
        pass; or None if the Engine holds what a snapshot cannot carry (routes of
        :meth:`update_route` or hotspot pieces, loads) or if the routes are not valid together
        (the caller's exact checks then raise the error). O(routes + c log c) for c changed
        routes, in C with the C table (under the lock).
        """
        if self._shadowed or any(chain.from_iterable(self._loads)):
            return None
        upserts = sorted(filter(None, net.values()), key=_route_start)
        with paused_gc(promote=True):
            merged = self._table.merge(self._ids, list(net), upserts)
        if merged is None:
            return None
        table, loads, ids, hashes = merged
        digest = self._digest
        if digest is not None or any(c.digest is not None for c in changes):
            digest = self._next_digest(changes, steps, hashes)
        return table, loads, ids, digest

    def _next_digest(
        self, changes: Sequence[CatalogChange], steps: list[_Step], hashes: dict[int, int]
    ) -> int:
        """The digest after ``changes`` (validated as ``steps``; ``hashes``: route id -> the hash
        of the catalog route they replace or delete), checked against each change's own digest
        (under the lock).

        Each change XORs out the hash of every route it deletes or replaces (as the changes
        before it left that id) and XORs in those of its upserts. ``hashes`` is consumed.
        """
        route_hash = self._search.route_hash
        digest = self._digest
        if digest is None:
            digest = self._current_digest()
        for change, (deletes, upserts) in zip(changes, steps, strict=True):
            for route_id in deletes:
                old = hashes.pop(route_id, None)
                if old is not None:
                    digest ^= old
            for upsert in upserts:
                old = hashes.pop(upsert.route_id, None)
                new = route_hash(*upsert)
                digest ^= new if old is None else new ^ old
                hashes[upsert.route_id] = new
            if change.digest is not None and change.digest != digest:
                raise EngineDigestMismatchError(
                    f"engine change digest mismatch: the change from version "
                    f"{change.previous_version} to version {change.version} leaves digest "
                    f"{digest}, the catalog has {change.digest}"
                )
        return digest

    def _catalog_route(self, route_id: int) -> Route | None:
        """The catalog route ``route_id`` (in the table or shadowed), or None if unknown.

        Found from its start's prefix (see :meth:`RouteTable.find_catalog_route`).
        """
        if route_id not in self._ids:
            return None
        found = self._table.find_catalog_route(route_id, self._ids[route_id][0])
        if found is not None:
            return found
        return next((r for r in self._shadowed if r.route_id == route_id), None)

    def _near_routes(self, net: Container[int]) -> _Near:
        """The nearest catalog routes that survive a change (their id not in ``net``) around a
        key, in the table or shadowed by hotspot pieces (see :func:`_check_placement`)."""

        def survives(route: Route) -> bool:
            return route.route_id != 0 and route.route_id not in net

        shadowed = self._shadowed
        shadow_starts = list(map(_route_start, shadowed))

        def near(key: bytes, floor: bytes | None, ceiling: bytes | None) -> Iterator[Route]:
            for candidate in self._table.walk(key, forward=False):
                if floor is not None and candidate.start <= floor:
                    break
                if survives(candidate):
                    yield candidate
                    break
            for candidate in self._table.walk(key, forward=True):
                if ceiling is not None and candidate.start >= ceiling:
                    break
                if survives(candidate):
                    yield candidate
                    break
            s = bisect_right(shadow_starts, key)
            for candidate in reversed(shadowed[:s]):
                if floor is not None and candidate.start <= floor:
                    break
                if survives(candidate):
                    yield candidate
                    break
            for candidate in shadowed[s:]:
                if ceiling is not None and candidate.start >= ceiling:
                    break
                if survives(candidate):
                    yield candidate
                    break

        return near

    def update_route(self, start: bytes, end: bytes | None, group_id: int) -> None:
        """Add an ephemeral route ``[start, end)`` (route_id 0, ACTIVE) on ``group_id``.

        Validated like a descriptor (the id aside; a bound longer than
        :data:`~distribution.MAX_ROUTE_KEY_BYTES` raises
        :class:`~distribution.RouteKeyTooLongError`); a route overlapping an existing one raises
        :class:`~distribution.EngineSnapshotRouteOverlapError` and nothing changes. The version,
        the digest and the other routes' loads do not change. O(log routes + chunk).

        >>> engine = Engine()
        >>> engine.update_route(b"a", b"b", 7)
        >>> engine.update_route(b"a", None, 7)
        Traceback (most recent call last):
        ...
        distribution.errors.EngineSnapshotRouteOverlapError: engine routes overlap: new route [b'a', None) overlaps route 0 [b'a', b'b')
        """
        check_bound("new route start", start)
        if end is not None:
            check_bound("new route end", end)
        check_u64("group_id", group_id)
        if group_id == 0:
            raise CatalogGroupIDRequiredError("catalog group id is required: new route has group 0")
        if end is not None and start >= end:
            raise CatalogInvalidRouteRangeError(
                f"catalog route range is invalid: new route has start {start!r} >= end {end!r}"
            )
        route = Route(0, start, end, group_id, RouteState.ACTIVE, 0)
        with self._lock:
            existing = self.get_intersecting_routes(start, end)
            if existing:
                other = existing[0]
                raise EngineSnapshotRouteOverlapError(
                    f"engine routes overlap: new route [{start!r}, {end!r}) overlaps route "
                    f"{other.route_id} [{other.start!r}, {other.end!r})"
                )
            self._table, self._loads = self._table.rewrite(self._loads, [(start, end)], (), [route])

    def record_access(self, key: bytes) -> None:
        """Add 1 to the load of the route holding ``key`` (no route: nothing happens).

        Exact under threads. With a non-zero threshold, an ACTIVE route whose load reaches it is
        split at ``start + b"\\x00"`` into two ephemeral routes (loads 0); an unbounded route, or
        one too narrow to split, has its load reset to 0 instead. Fenced and migrating routes are
        never split. A split whose middle bound would be longer than
        :data:`~distribution.MAX_ROUTE_KEY_BYTES` raises
        :class:`~distribution.RouteKeyTooLongError` and nothing changes (the access is not
        counted). O(log routes) under the lock; O(chunk) when a split happens.

        >>> engine = Engine(hotspot_threshold=2)
        >>> engine.update_route(b"a", b"b", 1)
        >>> engine.record_access(b"a"); engine.record_access(b"a")
        >>> [(r.start, r.end) for r in engine.stats()]
        [(b'a', b'a\\x00'), (b'a\\x00', b'b')]
        """
        if key.__class__ is not bytes:
            check_key("key", key)
        with self._lock:
            c, i = self._table.locate(key)
            route = self._table.chunks[c].route(i)
            if route is None:
                return
            loads = self._loads[c]
            load = loads[i] + 1
            if (
                not self._threshold
                or load < self._threshold
                or route.state is not RouteState.ACTIVE
            ):
                loads[i] = load
                return
            middle = route.start + b"\x00"
            if route.end is None or middle >= route.end:
                loads[i] = 0
                return
            check_bound("hotspot split key", middle)
            pieces = [
                Route(0, route.start, middle, route.group_id, RouteState.ACTIVE, 0),
                Route(0, middle, route.end, route.group_id, RouteState.ACTIVE, 0),
            ]
            self._table, self._loads = self._table.rewrite(
                self._loads,
                [(route.start, route.end)],
                (route.route_id,),
                pieces,
            )
            if route.route_id:
                shadow_starts = list(map(_route_start, self._shadowed))
                self._shadowed.insert(bisect_right(shadow_starts, route.start), route)

    def stats(self) -> list[Route]:
        """Every route in key order, with its exact load. O(routes).

        >>> engine = Engine.with_default_route()
        >>> engine.record_access(b"k")
        >>> engine.stats()[0].load
        1
        """
        with self._lock:
            table = self._table
            loads = list(map(list.copy, self._loads))
        return [
            route if load == route.load else route._replace(load=load)
            for route, load in zip(
                table.slots(),
                chain.from_iterable(loads),
                strict=True,
            )
            if route is not None
        ]

    def next_timestamp(self) -> int:
        """A timestamp (ns since the epoch) strictly greater than any returned before. O(1).

        >>> engine = Engine()
        >>> engine.next_timestamp() < engine.next_timestamp()
        True
        """
        with self._ts_lock:
            now = time.time_ns()
            self._last_ts = now if now > self._last_ts else self._last_ts + 1
            return self._last_ts

    # -- invariants ----------------------------------------------------------------------------

    def _check(self) -> None:
        """Assert every structural invariant (tests call this after each change). O(routes)."""
        with self._lock:
            self._table._check(self._loads)
            slots = list(self._table.slots())
            flat_loads = list(chain.from_iterable(self._loads))
            in_table: dict[int, Route] = {}
            for i, route in enumerate(slots):
                if route is None:
                    continue
                load = flat_loads[i]
                if self._threshold and route.state is RouteState.ACTIVE:
                    assert load < self._threshold
                if route.route_id:
                    assert route.route_id not in in_table, "duplicate route id"
                    in_table[route.route_id] = route
                    assert self._catalog_route(route.route_id) == route
            for route in self._shadowed:
                assert self._catalog_route(route.route_id) is route
                assert route.route_id not in in_table
                for piece in self.get_intersecting_routes(route.start, route.end):
                    assert piece.route_id == 0
                    assert piece.start >= route.start
                    assert route.end is None or (piece.end is not None and piece.end <= route.end)
            assert list(map(_route_start, self._shadowed)) == sorted(
                map(_route_start, self._shadowed)
            )
            assert len(self._ids) == len(in_table) + len(self._shadowed)
            catalog = [
                RouteDescriptor(r.route_id, r.start, r.end, r.group_id, r.state, self._ids[i][1])
                for i, r in chain(in_table.items(), ((r.route_id, r) for r in self._shadowed))
            ]
            in_table_digest = routes_digest(catalog[: len(in_table)])
            assert self._search.digest(self._table, self._ids) == in_table_digest
            digest = in_table_digest ^ routes_digest(catalog[len(in_table) :])
            assert self._current_digest() == digest
            if self._digest is not None:
                assert self._digest == digest, "the digest is the catalog routes' digest"


def _rebuilds(changed: int, chunks: int, *, merged: bool) -> bool:
    """Whether a change of ``changed`` routes to a table of ``chunks`` chunks is applied by a
    rebuild of the table, ``merged`` in C as a snapshot is built or (if the Engine holds loads,
    ephemeral routes or hotspot pieces) from its slots in Python, rather than by rewriting the
    chunks it touches.

    Measured (C table): a change scattered over a table costs about a chunk's rewrite a changed
    route; a merge costs about the rewrite of half the chunks (at 1,000 routes, 0.09 ms: less
    than the rewrite of 2 scattered routes, more than a split's, which splices one chunk); a
    rebuild from the slots, about the rewrite of twice the chunks.
    """
    if merged:
        return changed >= max(_MERGE_MIN, chunks // 2)
    return changed >= max(_REBUILD_MIN, 2 * chunks)


def _check_placement(added: list[Route], near: _Near) -> None:
    """Raise the first order/overlap error among the catalog routes after a change.

    Routes that survive the change were valid together, so only pairs involving an added route
    can fail: each added route (``added``, sorted by start) is compared with the nearest surviving
    neighbours ``near`` finds on each side, looking no further than the next added route, and the
    pairs are checked in key order as apply_snapshot would.
    """
    neighbours: dict[int, Route] = {}
    for idx, route in enumerate(added):
        floor = added[idx - 1].start if idx else None
        ceiling = added[idx + 1].start if idx + 1 < len(added) else None
        for candidate in near(route.start, floor, ceiling):
            neighbours[candidate.route_id] = candidate
    ordered = sorted(chain(neighbours.values(), added), key=_route_start)
    for prev, cur in pairwise(ordered):
        _check_pair(prev, cur)


def _near_in(survivors: list[Route]) -> _Near:
    """:func:`_check_placement`'s neighbours among ``survivors`` (every catalog route that
    survives a change, in the table order, then those shadowed): O(routes) once, then
    O(log routes) a key."""
    ordered = sorted(survivors, key=_route_start)
    starts = list(map(_route_start, ordered))

    def near(key: bytes, floor: bytes | None, ceiling: bytes | None) -> Iterator[Route]:
        s = bisect_right(starts, key)
        if s and (floor is None or starts[s - 1] > floor):
            yield ordered[s - 1]
        if s < len(starts) and (ceiling is None or starts[s] < ceiling):
            yield ordered[s]

    return near


def _validated(changes: Sequence[CatalogChange], usual: Callable[[object], bool]) -> list[_Step]:
    """Each change's deletes type-checked and upserts validated (normalized descriptors); an
    upsert ``usual`` vouches for is taken as it is (``validate_route_descriptor`` would return it
    unchanged)."""
    return [
        (
            [check_u64("route_id", d) for d in change.deletes],
            [u if usual(u) else validate_route_descriptor(u) for u in change.upserts],
        )
        for change in changes
    ]


def _net_effect(steps: list[_Step]) -> dict[int, RouteDescriptor | None]:
    """Fold validated changes: route id -> its final descriptor, or None if deleted.

    Each change is checked for a repeated upsert id (after every upsert was validated, as
    apply_snapshot validates routes before looking for duplicates).
    """
    net: dict[int, RouteDescriptor | None] = {}
    for deletes, upserts in steps:
        ids = [u.route_id for u in upserts]
        seen: set[int] = set()
        for route_id in ids:
            if route_id in seen:
                raise EngineSnapshotDuplicateIDError(
                    f"engine snapshot route id is duplicated: route {route_id} appears twice"
                )
            seen.add(route_id)
        net.update(zip(deletes, repeat(None)))
        net.update(zip(ids, upserts, strict=True))
    return net

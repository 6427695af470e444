"""The in-memory routing Engine: which route holds a key, answered without taking a lock.

Layout of the routing table
---------------------------
Readers never lock. The Engine holds ``self._table``, an immutable pair ``(tops, chunks)`` that
writers replace with one reference assignment (writers serialize on a :class:`threading.Lock`),
so a reader always sees one consistent table, old or new.

The table is the sorted list of every distinct boundary key (each route's start and each bounded
end), cut into *chunks* of about :data:`_CHUNK` keys. ``tops`` holds the key between chunk
``c - 1`` and chunk ``c`` (so ``len(tops) == len(chunks) - 1``); chunk ``c`` is a pair
``(bounds, slots)`` covering ``[tops[c - 1], tops[c])`` with ``len(slots) == len(bounds) + 1``:
``slots[i]`` is the :class:`~distribution.Route` covering ``[bounds[i - 1], bounds[i])`` (the chunk
edges standing in for ``bounds[-1]`` and ``bounds[len(bounds)]``), or ``None`` for a gap. A route
fills exactly one slot. A lookup is therefore two bisects and two indexings, and no comparison
with a route's end.

The lookups (:meth:`Engine.get_route`, :meth:`Engine.group_keys`) search in C, in
:mod:`distribution._lookup`: a bisect through rich comparisons spends about 18 ns on each of
its ``log2(routes)`` steps on this project's machines, ``memcmp`` a few. Writers, which run far
more rarely, use :mod:`bisect`.

Why chunks rather than one flat list: a write copies what it changes (copy-on-write keeps reads
lock-free), and copying a list of a million references costs 12-40 ms on a small machine, because
every element's reference count is touched. With chunks a one-route change copies one chunk and
the short outer lists, a fraction of a millisecond, while a lookup still makes about
``log2(routes)`` comparisons in all.

Boundary keys are fresh ``bytes`` objects allocated in key order by :meth:`Engine.apply_snapshot`,
so a bisect walks memory that is close together instead of chasing keys scattered wherever the
caller allocated them; routes reference the same objects.

Loads live apart from the routes, in lists parallel to the slots that only writers touch (under
the lock). Routes in the table always carry ``load == 0``; :meth:`Engine.stats` gives exact loads.

Catalog routes (``route_id != 0``) are also kept by id, so that :meth:`Engine.apply_changes` finds a
deleted route in O(1). A catalog route split by a hotspot is *shadowed*: its ephemeral pieces serve
its range, and the Engine still knows it, so a later change that deletes or replaces it removes
the pieces too.
"""

from __future__ import annotations

import marshal
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Container, Iterable, Iterator, Sequence
from itertools import accumulate, chain, compress, islice, pairwise, repeat
from operator import attrgetter, is_not, itemgetter, le, lt, ne
from typing import Any, TypeAlias

from distribution._lookup import find as _find
from distribution._lookup import group as _group
from distribution.bulk import paused_gc
from distribution.errors import (
    CatalogGroupIDRequiredError,
    CatalogInvalidRouteRangeError,
    EngineSnapshotDuplicateIDError,
    EngineSnapshotRouteOrderError,
    EngineSnapshotRouteOverlapError,
    EngineSnapshotVersionGapError,
    EngineSnapshotVersionStaleError,
)
from distribution.types import (
    CatalogChange,
    CatalogSnapshot,
    Route,
    RouteDescriptor,
    RouteState,
    check_key,
    check_route_pair,
    check_u64,
    route_columns,
    validate_route_descriptor,
    validate_route_table,
)

__all__ = ["Engine"]

#: Target number of boundary keys per chunk: a write copies about this many references, plus the
#: outer lists (routes / _CHUNK long). Near the square root of a million routes, both stay small.
_CHUNK = 1024

#: Descriptors handled per step by apply_snapshot's column extraction. The keys of one block are
#: touched while their memory is still cached, instead of once per pass over the whole snapshot.
_BLOCK = 1024

_Slots: TypeAlias = list[Route | None]
_Chunk: TypeAlias = tuple[list[bytes], _Slots]
_Table: TypeAlias = tuple[list[bytes], list[_Chunk]]
_Loads: TypeAlias = list[list[int]]
#: A key range ``[start, end)``; ``end is None`` means unbounded.
_Range: TypeAlias = tuple[bytes, bytes | None]

_route_start = attrgetter("start")
_first_start = itemgetter(0)


def _empty_table() -> tuple[_Table, _Loads]:
    return ([], [([], [None])]), [[0]]


def _copy_keys(keys: tuple[bytes | None, ...]) -> tuple[Any, ...]:
    """Fresh copies of ``keys`` (``None`` kept), allocated one after another, in order.

    A marshal round-trip is one C-level pass that allocates every copy contiguously: a bisect over
    them then walks nearby memory rather than keys scattered by their original allocation.
    """
    copies: tuple[Any, ...] = marshal.loads(marshal.dumps(keys, 2))
    return copies


# -- bulk build (apply_snapshot) ---------------------------------------------------------------


def _fast_build(
    routes: Sequence[RouteDescriptor],
) -> tuple[list[bytes], _Slots, dict[int, Route]] | None:
    """Validate and lay out ``routes`` with C-level passes only, or return None.

    None means "something is unusual" (an invalid route, a field of the wrong type, an unsorted
    snapshot, a duplicate id...): the caller then runs the exact, per-route checks, which raise
    the first error in the order the contract specifies, or return normalized routes that this
    function accepts.

    Returns the flat bounds and slots (``len(slots) == len(bounds) + 1``) and the routes by id.
    """
    built = _build_contiguous(routes)
    return built if built is not None else _build_with_gaps(routes)


def _build_contiguous(
    routes: Sequence[RouteDescriptor],
) -> tuple[list[bytes], _Slots, dict[int, Route]] | None:
    """:func:`_fast_build` for the common catalog: each route ends where the next one starts.

    Everything happens block by block, on objects still in the cache: a million scattered keys
    cost a cache miss each per pass over the whole snapshot, but only once this way.
    """
    n = len(routes)
    bounds: list[bytes] = []
    route_list: list[Route] = []
    by_id: dict[int, Route] = {}
    last_end: bytes | None = None
    for i in range(0, n, _BLOCK):
        columns = route_columns(routes[i : i + _BLOCK])
        if columns is None:
            return None
        ids, starts, ends, groups, states, _ = columns
        # Tuple equality short-cuts on identity, so shared key objects cost no comparison.
        if not (ends[:-1] == starts[1:] and (i == 0 or last_end == starts[0])):
            return None
        last_end = ends[-1]
        # Copies of the block's starts and of its last end (None if unbounded): each route ends
        # where the next copy starts.
        keys = _copy_keys(starts + ends[-1:])
        block_routes = _make_routes(ids, keys, keys[1:], groups, states)
        route_list += block_routes
        by_id.update(zip(ids, block_routes, strict=True))
        bounds += keys
        bounds.pop()
    # Sorted starts imply every range but the last: starts[i] < starts[i + 1] == ends[i].
    if (
        len(by_id) != n
        or not all(map(lt, bounds, islice(bounds, 1, None)))
        or (last_end is not None and not last_end > bounds[-1])
    ):
        return None
    slots: _Slots = [None]
    slots += route_list
    if last_end is not None:
        bounds.append(route_list[-1].end)  # type: ignore[arg-type]
        slots.append(None)
    return bounds, slots, by_id


def _build_with_gaps(
    routes: Sequence[RouteDescriptor],
) -> tuple[list[bytes], _Slots, dict[int, Route]] | None:
    """:func:`_fast_build` for sorted routes that may leave gaps between them."""
    n = len(routes)
    ids: list[int] = []
    starts: list[bytes] = []
    ends: list[bytes | None] = []
    groups: list[int] = []
    states: list[RouteState] = []
    for i in range(0, n, _BLOCK):
        columns = route_columns(routes[i : i + _BLOCK])
        if columns is None:
            return None
        b_ids, b_starts, b_ends, b_groups, b_states, _ = columns
        # Unsorted input is caught at its first block, not after copying the whole snapshot.
        if not (
            all(map(lt, b_starts, islice(b_starts, 1, None)))
            and (i == 0 or starts[-1] < b_starts[0])
        ):
            return None
        ids += b_ids
        starts += _copy_keys(b_starts)
        ends += _copy_keys(b_ends)
        groups += b_groups
        states += b_states
    head: list[Any] = ends[:-1]  # None only in an invalid snapshot, checked first
    if not (
        None not in head
        and all(map(lt, starts[:-1], head))
        and (ends[-1] is None or starts[-1] < ends[-1])
        and all(map(le, head, islice(starts, 1, None)))
    ):
        return None
    bounds, slots, route_list = _layout_with_gaps(ids, starts, ends, groups, states)
    by_id = dict(zip(ids, route_list, strict=True))
    if len(by_id) != n:
        return None
    return bounds, slots, by_id


def _make_routes(
    ids: Sequence[int],
    starts: Sequence[bytes],
    ends: Sequence[bytes | None],
    groups: Sequence[int],
    states: Sequence[RouteState],
) -> list[Route]:
    """Routes with load 0, built at C level.

    ``tuple.__new__(Route, fields)`` skips the Python-level ``Route.__new__``: about 0.4 s per
    million routes, against 0.6 s through ``functools.partial`` and over 1 s calling ``Route``.
    """
    fields = zip(ids, starts, ends, groups, states, repeat(0), strict=False)
    return list(map(tuple.__new__, repeat(Route), fields))


def _layout_with_gaps(
    ids: list[int],
    starts: list[bytes],
    ends: list[bytes | None],
    groups: list[int],
    states: list[Any],
) -> tuple[list[bytes], _Slots, list[Route]]:
    """Bounds, slots and routes for sorted, non-overlapping routes that may leave gaps.

    Interleaves ``start0, end0, start1, end1, ...`` (a non-decreasing sequence) and drops each end
    that equals the next start, or is unbounded; positions in the result give each route its end
    object, so routes and bounds share keys. All passes are C-level.
    """
    n = len(starts)
    flat: list[bytes | None] = [None] * (2 * n)
    flat[0::2] = starts
    flat[1::2] = ends
    keep: list[bool] = [True] * (2 * n)
    keep[1:-1:2] = map(ne, ends[:-1], islice(starts, 1, None))
    keep[-1] = ends[-1] is not None
    bounds: list[bytes] = list(compress(flat, keep))  # type: ignore[arg-type]
    # After start i, the next kept key is its end (kept, or equal to the next start).
    end_at = list(accumulate(keep))[0::2]
    route_ends: list[bytes | None] = list(map(bounds.__getitem__, end_at[:-1]))
    route_ends.append(bounds[end_at[-1]] if keep[-1] else None)
    route_list = _make_routes(ids, starts, route_ends, groups, states)
    flat_slots: _Slots = [None] * (2 * n)
    flat_slots[0::2] = route_list
    slots: _Slots = [None]
    slots += compress(flat_slots, keep)
    return bounds, slots, route_list


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


def _build(routes: Sequence[RouteDescriptor]) -> tuple[_Table, _Loads, dict[int, Route]]:
    """Validate ``routes`` (raising the first error) and build a fresh table, loads and index."""
    with paused_gc(promote=True):
        built = _fast_build(routes)
        if built is None:
            # Unsorted but otherwise valid? Sorting is cheaper than the per-route checks.
            try:
                ordered = sorted(routes, key=_route_start)
            except (TypeError, AttributeError):
                ordered = None
            if ordered is not None and any(map(is_not, ordered, routes)):
                built = _fast_build(ordered)
        if built is None:
            built = _fast_build(_sorted_valid(routes))
            assert built is not None, "normalized routes must take the fast path"
        bounds, slots, by_id = built
        tops, chunks, loads = _chunked(bounds, slots, [0] * len(slots))
    return (tops, chunks), loads, by_id


# -- chunk manipulation ------------------------------------------------------------------------


def _chunked(
    bounds: list[bytes], slots: _Slots, loads: list[int]
) -> tuple[list[bytes], list[_Chunk], _Loads]:
    """Cut a flat table into chunks of about _CHUNK bounds; one bound between chunks is a top."""
    m = len(bounds)
    k = max(1, (m + _CHUNK // 2) // _CHUNK)
    # Positions of the tops in ``bounds``: k - 1 evenly spread, strictly increasing indices.
    cuts = [j * (m + 1) // k - 1 for j in range(1, k)]
    tops = list(map(bounds.__getitem__, cuts))
    edges = [-1, *cuts, m]
    chunks: list[_Chunk] = [(bounds[a + 1 : b], slots[a + 1 : b + 1]) for a, b in pairwise(edges)]
    chunk_loads = [loads[a + 1 : b + 1] for a, b in pairwise(edges)]
    return tops, chunks, chunk_loads


def _flatten(
    table: _Table, loads: _Loads, first: int, last: int
) -> tuple[list[bytes], _Slots, list[int]]:
    """Chunks ``first..last`` (inclusive) as one flat bounds/slots/loads triple."""
    tops, chunks = table
    bounds: list[bytes] = []
    slots: _Slots = []
    flat_loads: list[int] = []
    for c in range(first, last + 1):
        if c > first:
            bounds.append(tops[c - 1])
        chunk_bounds, chunk_slots = chunks[c]
        bounds += chunk_bounds
        slots += chunk_slots
        flat_loads += loads[c]
    return bounds, slots, flat_loads


def _intersects(route: Route, range_starts: list[bytes], ranges: list[_Range]) -> bool:
    """Whether ``route`` intersects one of ``ranges`` (sorted, disjoint)."""
    # Only the last range starting before route.end can intersect it (the others end earlier).
    j = len(ranges) if route.end is None else bisect_left(range_starts, route.end)
    if j == 0:
        return False
    end = ranges[j - 1][1]
    return end is None or route.start < end


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


def _fill(
    placed: list[tuple[Route, int]], lower: bytes | None, upper: bytes | None
) -> tuple[_Slots, list[bytes], list[int]]:
    """Slots, inner bounds and loads laying ``placed`` (sorted routes) over ``[lower, upper)``.

    ``lower is None`` is the start of the key space (whose first slot is always a gap),
    ``upper is None`` its end. Gaps become ``None`` slots; empty gaps are left out.
    """
    slots: _Slots = []
    inner: list[bytes] = []
    loads: list[int] = []
    cur = lower
    open_end = False
    for route, load in placed:
        if cur is None or route.start != cur:
            slots.append(None)
            loads.append(0)
            inner.append(route.start)
        slots.append(route)
        loads.append(load)
        if route.end is None:
            open_end = True
            break
        if route.end != upper:
            inner.append(route.end)
        cur = route.end
    if not slots or (not open_end and cur != upper):
        slots.append(None)
        loads.append(0)
    return slots, inner, loads


def _rewrite(
    table: _Table,
    loads: _Loads,
    ranges: list[_Range],
    dropped_ids: Container[int],
    new_routes: list[Route],
) -> tuple[_Table, _Loads]:
    """A new table where ``new_routes`` (load 0) replace what they must inside ``ranges``.

    ``ranges`` (sorted, disjoint) must cover every new route. Inside them, catalog routes whose id
    is in ``dropped_ids`` and ephemeral routes that intersect a range are removed; everything else
    is kept with its load. Only the chunks around the ranges are copied.
    """
    tops, chunks = table
    n_tops = len(tops)
    # Group the ranges by the chunks they touch, padded by one chunk on each side, so that a gap
    # next to a range can be merged with a gap in the neighbouring slot.
    clusters: list[tuple[int, int, list[_Range]]] = []
    for start, end in ranges:
        first = max(bisect_right(tops, start) - 1, 0)
        last = n_tops if end is None else min(bisect_left(tops, end) + 1, n_tops)
        if clusters and first <= clusters[-1][1] + 1:
            c_first, c_last, c_ranges = clusters[-1]
            clusters[-1] = (c_first, max(c_last, last), c_ranges)
            c_ranges.append((start, end))
        else:
            clusters.append((first, last, [(start, end)]))
    new_starts = list(map(_route_start, new_routes))
    range_starts = list(map(_first_start, ranges))
    new_tops: list[bytes] = []
    new_chunks: list[_Chunk] = []
    new_loads: _Loads = []
    done = 0
    for first, last, cluster_ranges in clusters:
        bounds, slots, flat_loads = _flatten(table, loads, first, last)
        lower = tops[first - 1] if first else None
        upper = tops[last] if last < n_tops else None
        out_bounds: list[bytes] = []
        out_slots: _Slots = []
        out_loads: list[int] = []
        pos = 0
        for window in _windows(bounds, cluster_ranges):
            lo, hi = window
            window_lower = bounds[lo - 1] if lo else lower
            window_upper = bounds[hi - 1] if hi <= len(bounds) else upper
            placed = [
                (route, load)
                for route, load in zip(slots[lo:hi], flat_loads[lo:hi], strict=True)
                if route is not None
                and not (
                    route.route_id in dropped_ids
                    if route.route_id
                    else _intersects(route, range_starts, ranges)
                )
            ]
            i = 0 if window_lower is None else bisect_left(new_starts, window_lower)
            j = len(new_routes) if window_upper is None else bisect_left(new_starts, window_upper)
            if i < j:
                placed += zip(new_routes[i:j], repeat(0))
                placed.sort(key=_placed_start)
            fill, inner, fill_loads = _fill(placed, window_lower, window_upper)
            # Two gaps must never be neighbours: absorb a gap slot next to the window.
            if fill[0] is None and lo and slots[lo - 1] is None:
                lo -= 1
                window_lower = bounds[lo - 1] if lo else lower
                fill, inner, fill_loads = _fill(placed, window_lower, window_upper)
            if fill[-1] is None and hi < len(slots) and slots[hi] is None:
                hi += 1
                window_upper = bounds[hi - 1] if hi <= len(bounds) else upper
                fill, inner, fill_loads = _fill(placed, window_lower, window_upper)
            out_bounds += bounds[pos:lo]
            out_slots += slots[pos:lo]
            out_loads += flat_loads[pos:lo]
            out_bounds += inner
            out_slots += fill
            out_loads += fill_loads
            if hi <= len(bounds):
                out_bounds.append(bounds[hi - 1])
            pos = hi
        out_bounds += bounds[pos:]
        out_slots += slots[pos:]
        out_loads += flat_loads[pos:]
        part_tops, part_chunks, part_loads = _chunked(out_bounds, out_slots, out_loads)
        new_chunks += chunks[done:first]
        new_loads += loads[done:first]
        new_tops += tops[done:first]
        new_chunks += part_chunks
        new_loads += part_loads
        new_tops += part_tops
        if last < n_tops:
            new_tops.append(tops[last])
        done = last + 1
    new_chunks += chunks[done:]
    new_loads += loads[done:]
    new_tops += tops[done:]
    return (new_tops, new_chunks), new_loads


def _placed_start(item: tuple[Route, int]) -> bytes:
    return item[0].start


def _windows(bounds: list[bytes], ranges: list[_Range]) -> list[tuple[int, int]]:
    """Slot windows ``[lo, hi)`` of a flat table covering ``ranges``, merged when one slot apart.

    Windows at least two slots apart can each absorb a neighbouring gap without colliding, since
    a valid table never has two gaps side by side.
    """
    windows: list[tuple[int, int]] = []
    n_slots = len(bounds) + 1
    for start, end in ranges:
        lo = bisect_right(bounds, start)
        hi = n_slots if end is None else bisect_left(bounds, end) + 1
        if windows and lo <= windows[-1][1] + 1:
            windows[-1] = (windows[-1][0], max(windows[-1][1], hi))
        else:
            windows.append((lo, hi))
    return windows


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


def _walk(table: _Table, key: bytes, forward: bool) -> Iterator[Route]:
    """Routes from the slot holding ``key`` (excluded if forward) onwards or backwards."""
    tops, chunks = table
    c = bisect_right(tops, key)
    i = bisect_right(chunks[c][0], key)
    if forward:
        here: Iterable[Route | None] = islice(chunks[c][1], i + 1, None)
        rest = chain.from_iterable(slots for _, slots in islice(chunks, c + 1, None))
    else:
        here = reversed(chunks[c][1][: i + 1])
        rest = chain.from_iterable(reversed(slots) for _, slots in reversed(chunks[:c]))
    for route in chain(here, rest):
        if route is not None:
            yield route


class Engine:
    """The in-memory routing table of a service: which route holds a key.

    Thread-safe: lookups never lock (they read an immutable table that writers swap in whole);
    writers (snapshots, changes, :meth:`update_route`, :meth:`record_access`) serialize on a lock.

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
        self._table: _Table
        self._loads: _Loads
        self._table, self._loads = _empty_table()
        self._catalog: dict[int, Route] = {}
        #: Catalog routes split by a hotspot, sorted by start: their pieces serve their ranges.
        self._shadowed: list[Route] = []

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
    def version(self) -> int:
        """The catalog version last applied; ``0`` at first. O(1).

        >>> Engine().version
        0
        """
        return self._version

    # -- lookups (lock-free) -------------------------------------------------------------------

    def get_route(self, key: bytes) -> Route | None:
        """The route whose ``[start, end)`` holds ``key``, or None. O(log routes), no lock.

        The route's ``load`` is not kept up to date (see :meth:`stats`).

        >>> engine = Engine.with_default_route()
        >>> engine.get_route(b"k").group_id
        1
        >>> Engine().get_route("k")
        Traceback (most recent call last):
        ...
        TypeError: key must be bytes, got str (encode text keys explicitly)
        """
        try:
            return _find(self._table, key)
        except TypeError as error:
            raise _key_error((key,), error) from None

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
        tops, chunks = self._table
        c = bisect_right(tops, start)
        last = len(chunks) - 1 if end is None else bisect_left(tops, end)
        bounds, slots = chunks[c]
        lo = bisect_right(bounds, start)
        found: list[Route] = []
        while True:
            hi = len(slots) if end is None or c < last else bisect_left(bounds, end) + 1
            found += filter(None, slots[lo:hi])
            if c >= last:
                return found
            c += 1
            bounds, slots = chunks[c]
            lo = 0

    def group_keys(self, keys: Iterable[bytes]) -> list[tuple[Route, list[bytes]]]:
        """Route a batch of keys at once: ``[(route, [keys...]), ...]`` in key order.

        Keys are sorted within a group, duplicates are kept, keys no route holds are left out.
        O(k log k) for k keys (a radix sort on their first 8 bytes, then a comparison sort of the
        keys those leave tied), plus O(log routes) per group: a batch whose keys share routes
        costs far less per key than one :meth:`get_route` each. No lock.

        >>> engine = Engine()
        >>> engine.update_route(b"a", b"m", 1)
        >>> engine.update_route(b"m", None, 2)
        >>> [(r.group_id, ks) for r, ks in engine.group_keys([b"z", b"b", b"0", b"a", b"b"])]
        [(1, [b'a', b'b', b'b']), (2, [b'z'])]
        """
        batch = keys if keys.__class__ is list else list(keys)
        try:
            return _group(self._table, batch)
        except TypeError as error:
            raise _key_error(batch, error) from None

    # -- writers -------------------------------------------------------------------------------

    def apply_snapshot(self, snapshot: CatalogSnapshot) -> None:
        """Replace every route with the snapshot's, atomically, if the snapshot is newer.

        An older version raises :class:`~distribution.EngineSnapshotVersionStaleError` and the same
        version is a silent no-op (not validated). Then each route is validated like a
        descriptor, ids must be unique, and, sorted by start, adjacent routes must not share a
        start, follow an unbounded route, or overlap. Loads restart at 0; ephemeral routes go.
        O(routes log routes) (O(routes) when sorted), built without holding the lock.

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
        table, loads, by_id = _build(snapshot.routes)
        with self._lock:
            if self._version_is_current(version):
                return
            self._table, self._loads = table, loads
            self._catalog = by_id
            self._shadowed = []
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
        not overlap; on any error nothing changes. Changed routes get load 0, the others keep
        theirs; ephemeral routes overlapping a changed route are dropped.
        O(c log c + chunk) for c changed routes (plus the routes between them).

        >>> from distribution import CatalogChange, CatalogSnapshot, RouteDescriptor
        >>> engine = Engine()
        >>> engine.apply_snapshot(CatalogSnapshot(version=1, routes=(
        ...     RouteDescriptor(route_id=1, start=b"", end=None, group_id=1),)))
        >>> engine.apply_changes([CatalogChange(previous_version=1, version=2, deletes=(1,),
        ...     upserts=(RouteDescriptor(route_id=2, start=b"", end=b"m", group_id=1),
        ...              RouteDescriptor(route_id=3, start=b"m", end=None, group_id=2)))])
        >>> engine.version, engine.get_route(b"x").route_id
        (2, 3)
        """
        pending = list(changes)
        for change in pending:
            check_u64("previous_version", change.previous_version)
            check_u64("version", change.version)
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
        with self._lock:
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
            net = _net_effect(pending)
            removed = [self._catalog[i] for i in net if i in self._catalog]
            added = sorted(
                (
                    Route(d.route_id, d.start, d.end, d.group_id, d.state, 0)
                    for d in net.values()
                    if d is not None
                ),
                key=_route_start,
            )
            self._check_placement(added, net)
            ranges = _merge_ranges([(r.start, r.end) for r in chain(removed, added)])
            table, loads = _rewrite(self._table, self._loads, ranges, net, added)
            for route_id in net:
                self._catalog.pop(route_id, None)
            self._catalog.update(zip(map(attrgetter("route_id"), added), added, strict=True))
            if self._shadowed:
                self._shadowed = [r for r in self._shadowed if r.route_id not in net]
            self._table, self._loads = table, loads
            self._version = pending[-1].version

    def _check_placement(self, added: list[Route], net: Container[int]) -> None:
        """Raise the first order/overlap error among the catalog routes after a change.

        Routes that survive the change were valid together, so only pairs involving an added
        route can fail: each added route is compared with its nearest surviving neighbours
        (in the table, or shadowed by hotspot pieces), scanning no further than the next added
        route, and the pairs are checked in key order as apply_snapshot would.
        """

        def survives(route: Route) -> bool:
            return route.route_id != 0 and route.route_id not in net

        shadow_starts = list(map(_route_start, self._shadowed))
        neighbours: dict[int, Route] = {}
        for idx, route in enumerate(added):
            floor = added[idx - 1].start if idx else None
            ceiling = added[idx + 1].start if idx + 1 < len(added) else None
            for candidate in _walk(self._table, route.start, forward=False):
                if floor is not None and candidate.start <= floor:
                    break
                if survives(candidate):
                    neighbours[id(candidate)] = candidate
                    break
            for candidate in _walk(self._table, route.start, forward=True):
                if ceiling is not None and candidate.start >= ceiling:
                    break
                if survives(candidate):
                    neighbours[id(candidate)] = candidate
                    break
            s = bisect_right(shadow_starts, route.start)
            for candidate in reversed(self._shadowed[:s]):
                if floor is not None and candidate.start <= floor:
                    break
                if survives(candidate):
                    neighbours[id(candidate)] = candidate
                    break
            for candidate in self._shadowed[s:]:
                if ceiling is not None and candidate.start >= ceiling:
                    break
                if survives(candidate):
                    neighbours[id(candidate)] = candidate
                    break
        ordered = sorted(chain(neighbours.values(), added), key=_route_start)
        for prev, cur in pairwise(ordered):
            _check_pair(prev, cur)

    def update_route(self, start: bytes, end: bytes | None, group_id: int) -> None:
        """Add an ephemeral route ``[start, end)`` (route_id 0, ACTIVE) on ``group_id``.

        Validated like a descriptor (the id aside); a route overlapping an existing one raises
        :class:`~distribution.EngineSnapshotRouteOverlapError` and nothing changes. The version
        and the other routes' loads do not change. O(log routes + chunk).

        >>> engine = Engine()
        >>> engine.update_route(b"a", b"b", 7)
        >>> engine.update_route(b"a", None, 7)
        Traceback (most recent call last):
        ...
        distribution.errors.EngineSnapshotRouteOverlapError: engine routes overlap: new route [b'a', None) overlaps route 0 [b'a', b'b')
        """
        check_key("start", start)
        if end is not None:
            check_key("end", end)
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
            self._table, self._loads = _rewrite(
                self._table, self._loads, [(start, end)], (), [route]
            )

    def record_access(self, key: bytes) -> None:
        """Add 1 to the load of the route holding ``key`` (no route: nothing happens).

        Exact under threads. With a non-zero threshold, an ACTIVE route whose load reaches it is
        split at ``start + b"\\x00"`` into two ephemeral routes (loads 0); an unbounded route, or
        one too narrow to split, has its load reset to 0 instead. Fenced and migrating routes are
        never split. O(log routes) under the lock; O(chunk) when a split happens.

        >>> engine = Engine(hotspot_threshold=2)
        >>> engine.update_route(b"a", b"b", 1)
        >>> engine.record_access(b"a"); engine.record_access(b"a")
        >>> [(r.start, r.end) for r in engine.stats()]
        [(b'a', b'a\\x00'), (b'a\\x00', b'b')]
        """
        if key.__class__ is not bytes:
            check_key("key", key)
        with self._lock:
            tops, chunks = self._table
            c = bisect_right(tops, key)
            bounds, slots = chunks[c]
            i = bisect_right(bounds, key)
            route = slots[i]
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
            pieces = [
                Route(0, route.start, middle, route.group_id, RouteState.ACTIVE, 0),
                Route(0, middle, route.end, route.group_id, RouteState.ACTIVE, 0),
            ]
            self._table, self._loads = _rewrite(
                self._table, self._loads, [(route.start, route.end)], (route.route_id,), pieces
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
            _, chunks = self._table
            loads = list(map(list.copy, self._loads))
        return [
            route if load == route.load else route._replace(load=load)
            for route, load in zip(
                chain.from_iterable(map(itemgetter(1), chunks)),
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
            tops, chunks = self._table
            loads = self._loads
            assert len(tops) == len(chunks) - 1
            assert len(loads) == len(chunks)
            bounds: list[bytes] = []
            slots: _Slots = []
            flat_loads: list[int] = []
            for c, (chunk_bounds, chunk_slots) in enumerate(chunks):
                assert len(chunk_slots) == len(chunk_bounds) + 1
                assert len(loads[c]) == len(chunk_slots)
                assert len(chunk_bounds) <= 2 * _CHUNK
                if c:
                    bounds.append(tops[c - 1])
                bounds += chunk_bounds
                slots += chunk_slots
                flat_loads += loads[c]
            assert all(type(b) is bytes for b in bounds)
            assert all(map(lt, bounds, bounds[1:])), "bounds must strictly increase"
            assert slots[0] is None, "nothing lies before the first bound"
            assert all(a is not None or b is not None for a, b in pairwise(slots)), "two gaps"
            in_table: dict[int, Route] = {}
            for i, route in enumerate(slots):
                if route is None:
                    assert flat_loads[i] == 0
                    continue
                assert type(route) is Route
                assert route.start == bounds[i - 1]
                if i < len(bounds):
                    assert route.end == bounds[i]
                else:
                    assert route.end is None
                assert route.group_id > 0
                assert type(route.state) is RouteState
                assert route.load == 0
                load = flat_loads[i]
                assert load >= 0
                if self._threshold and route.state is RouteState.ACTIVE:
                    assert load < self._threshold
                if route.route_id:
                    assert route.route_id not in in_table, "duplicate route id"
                    in_table[route.route_id] = route
                    assert self._catalog.get(route.route_id) is route
                else:
                    assert route.state is RouteState.ACTIVE
            for route in self._shadowed:
                assert self._catalog.get(route.route_id) is route
                assert route.route_id not in in_table
                for piece in self.get_intersecting_routes(route.start, route.end):
                    assert piece.route_id == 0
                    assert piece.start >= route.start
                    assert route.end is None or (piece.end is not None and piece.end <= route.end)
            assert list(map(_route_start, self._shadowed)) == sorted(
                map(_route_start, self._shadowed)
            )
            assert len(self._catalog) == len(in_table) + len(self._shadowed)


def _net_effect(changes: Sequence[CatalogChange]) -> dict[int, RouteDescriptor | None]:
    """Validate changes and fold them: route id -> its final descriptor, or None if deleted.

    Every upsert is validated (and every delete type-checked) first, then each change is checked
    for a repeated upsert id, as apply_snapshot validates routes before looking for duplicates.
    """
    validated = [
        (
            [check_u64("route_id", d) for d in change.deletes],
            [validate_route_descriptor(u) for u in change.upserts],
        )
        for change in changes
    ]
    net: dict[int, RouteDescriptor | None] = {}
    for deletes, upserts in validated:
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

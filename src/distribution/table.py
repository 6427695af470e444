"""The Engine's routing table: an immutable, chunked, sorted run of boundary keys and routes.

Layout
------
The table is the sorted list of every distinct boundary key (each route's start and each bounded
end), cut into *chunks* of about :data:`CHUNK` keys. ``tops`` holds the key between chunk
``c - 1`` and chunk ``c`` (so ``len(tops) == len(chunks) - 1``); chunk ``c`` covers
``[tops[c - 1], tops[c])``, and its slot ``i`` holds the :class:`~distribution.Route` covering
``[bound i - 1, bound i)`` (the chunk's edges standing in at its ends), or ``None`` for a gap. A
route fills exactly one slot, so a lookup is two searches and no comparison with a route's end.

A chunk is packed (:class:`distribution._lookup.Chunk`, in C): its keys' 8-byte big-endian
prefixes in one array, searched first, with the whole keys compared only on a tie; the keys in one
arena with offsets; route ids, groups and states in fixed-width arrays. A :class:`Route` is built
only when a lookup returns one. ``index`` is the same packed search over ``tops``. Without the C
extension, or with ``DISTRIBUTION_PURE_PYTHON`` set (to anything but ``""`` or ``"0"``), the same
API runs in pure Python (:mod:`distribution._pylookup`, lists of keys and routes).

Why chunks: a write copies what it changes (copy-on-write keeps reads lock-free), and copying a
table of a million routes costs milliseconds. A change inside one chunk splices that chunk alone
(tops, index and every other chunk are shared with the previous table); a change across chunks
rebuilds those chunks and the short top level.

A :class:`RouteTable` never changes: a writer builds the next one and publishes it with one
reference assignment. Loads live outside it, in lists parallel to its slots that only writers
touch (see :class:`distribution.Engine`).
"""

from __future__ import annotations

import os
import threading
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Container, Iterator, Sequence
from functools import partial
from itertools import accumulate, chain, islice, pairwise, repeat
from operator import attrgetter, itemgetter, lt
from typing import Any, NamedTuple, Protocol, TypeAlias

from distribution import _pylookup
from distribution._pylookup import cut, prefix
from distribution.types import Route, RouteDescriptor, RouteState

__all__ = ["BUILDING", "CHUNK", "IMPLEMENTATION", "RouteTable"]

#: Target number of boundary keys per chunk: a write copies about this many entries, plus the
#: top level (routes / CHUNK long). Near the square root of a million routes, both stay small.
CHUNK = 1024

_Slots: TypeAlias = list[Route | None]
_Loads: TypeAlias = list[list[int]]
#: A key range ``[start, end)``; ``end is None`` means unbounded.
_Range: TypeAlias = tuple[bytes, bytes | None]


class _Chunk(Protocol):
    """A chunk of the table: :class:`distribution._lookup.Chunk` or its pure-Python twin."""

    @property
    def lower(self) -> bytes | None: ...

    @property
    def upper(self) -> bytes | None: ...

    def __len__(self) -> int: ...

    def bisect_right(self, key: bytes) -> int: ...

    def bisect_left(self, key: bytes) -> int: ...

    def route(self, slot: int) -> Route | None: ...

    def find_id(self, route_id: int) -> int: ...

    def bound(self, i: int) -> bytes: ...

    def splice(self, lo: int, hi: int, bounds: list[bytes], slots: _Slots) -> _Chunk: ...

    def bounds(self) -> list[bytes]: ...

    def slots(self) -> _Slots: ...


class _Ids(Protocol):
    """Route id -> (its start's prefix, its parent route id): :class:`distribution._lookup.IdIndex`
    or a dict."""

    def __contains__(self, route_id: object, /) -> bool: ...

    def __getitem__(self, route_id: int, /) -> tuple[int, int]: ...

    def __setitem__(self, route_id: int, value: tuple[int, int], /) -> None: ...

    def __delitem__(self, route_id: int, /) -> None: ...

    def __len__(self) -> int: ...


class _Searches(Protocol):
    """A table implementation: :mod:`distribution._lookup` or :mod:`distribution._pylookup`."""

    IMPLEMENTATION: str

    def Chunk(
        self, bounds: list[bytes], slots: _Slots, lower: bytes | None, upper: bytes | None
    ) -> _Chunk: ...

    def IdIndex(self) -> _Ids: ...

    def find(self, table: Any, key: bytes, /) -> Route | None: ...

    def group(self, table: Any, keys: list[bytes], /) -> list[tuple[Route, list[bytes]]]: ...

    def build(
        self, routes: Sequence[RouteDescriptor], chunk_size: int, /
    ) -> tuple[Any, _Ids] | None: ...

    def make_index(self, tops: list[bytes], /) -> Any: ...

    def route_hash(
        self,
        route_id: int,
        start: bytes,
        end: bytes | None,
        group_id: int,
        state: RouteState,
        parent_route_id: int,
        /,
    ) -> int: ...

    def digest(self, table: Any, ids: Any, /) -> int: ...

    def merge(
        self,
        table: Any,
        ids: Any,
        dropped: list[int],
        upserts: list[RouteDescriptor],
        chunk_size: int,
        /,
    ) -> tuple[Any, _Ids, dict[int, int]] | None: ...

    def usual_route(self, route: object, /) -> bool: ...


def _searches() -> _Searches:
    """The module whose ``find`` and ``group`` the lookups use: C unless absent or refused."""
    if os.environ.get("DISTRIBUTION_PURE_PYTHON", "") not in ("", "0"):
        return _pylookup
    try:
        from distribution import _lookup
    except ImportError:
        return _pylookup
    return _lookup


#: The table implementation new Engines use: :mod:`distribution._lookup` (packed chunks, C
#: searches) or its pure-Python twin :mod:`distribution._pylookup`, chosen once at import.
IMPLEMENTATION: _Searches = _searches()


_route_start = attrgetter("start")
_first_start = itemgetter(0)

#: Held by an Engine from the start of a whole-table build or merge until the new table has
#: replaced the one before it: one at a time in a process. A new table lives beside the one it
#: replaces until the swap, so Engines changed at once (the watchers of one process fed the same
#: large change) would otherwise hold one extra table each; the work is the same, since builds
#: run under the GIL. Taken before an Engine's own lock, never after; lookups never take it.
BUILDING = threading.Lock()


class RouteTable(NamedTuple):
    """The routing table: immutable; lookups need no lock. See the module docstring.

    ``loads`` (a list per chunk, parallel to its slots) belong to the owner: methods that change
    the layout take the current loads and return the new ones.

    >>> from distribution import RouteDescriptor
    >>> table, loads, ids = RouteTable.build(
    ...     IMPLEMENTATION, [RouteDescriptor(1, b"", b"m", 1), RouteDescriptor(2, b"m", None, 2)])
    >>> table.find(b"q").route_id, loads
    (2, [[0, 0, 0]])
    >>> table._check(loads)
    """

    #: The keys between chunks.
    tops: list[bytes]
    #: A search index over ``tops`` (the implementation's own).
    top_index: Any
    #: The chunks, one more than ``tops``.
    chunks: list[_Chunk]
    #: The implementation that built the table: :mod:`distribution._lookup` or its twin.
    implementation: _Searches

    @staticmethod
    def build(
        implementation: _Searches, routes: Sequence[RouteDescriptor]
    ) -> tuple[RouteTable, _Loads, _Ids] | None:
        """A table of sorted, valid ``routes``, its loads (all 0) and its id index (route id ->
        start prefix and parent id), or None if any route is unusual (invalid, of another type, out of order,
        a repeated id): the caller then checks and normalizes them. O(routes), one pass in C.

        >>> RouteTable.build(IMPLEMENTATION, [RouteDescriptor(1, b"b", None, 1),
        ...                                   RouteDescriptor(2, b"a", None, 1)]) is None
        True
        """
        built = implementation.build(routes, CHUNK)
        if built is None:
            return None
        (tops, index, chunks), ids = built
        table = RouteTable(tops, index, chunks, implementation)
        return table, [[0] * len(chunk) for chunk in chunks], ids

    def merge(
        self, ids: _Ids, dropped: list[int], upserts: list[RouteDescriptor]
    ) -> tuple[RouteTable, _Loads, _Ids, dict[int, int]] | None:
        """:meth:`build` of this table's routes (catalog routes, their parents in ``ids``) but
        those whose id is in ``dropped``, and of ``upserts`` (sorted by start), in one pass over
        both; and the hash in the catalog digest of each route dropped, by id. None if the table
        holds an ephemeral route, or if :meth:`build` would return None. O(routes + upserts), in
        C with the C table.

        >>> table, _, ids = RouteTable.build(IMPLEMENTATION, [RouteDescriptor(1, b"a", None, 1)])
        >>> merged, loads, ids, hashes = table.merge(ids, [1], [RouteDescriptor(2, b"b", None, 1)])
        >>> [r.route_id for r in merged.routes()], list(hashes)
        ([2], [1])
        """
        search = self.implementation
        merged = search.merge(self, ids, dropped, upserts, CHUNK)
        if merged is None:
            return None
        (tops, index, chunks), new_ids, hashes = merged
        table = RouteTable(tops, index, chunks, search)
        return table, [[0] * len(chunk) for chunk in chunks], new_ids, hashes

    def find(self, key: bytes) -> Route | None:
        """The route holding ``key``, or None. O(log routes).

        >>> RouteTable.build(IMPLEMENTATION, [RouteDescriptor(1, b"a", None, 1)])[0].find(b"0")
        """
        return self.implementation.find(self, key)

    def group(self, keys: list[bytes]) -> list[tuple[Route, list[bytes]]]:
        """``[(route, [keys...]), ...]`` in key order, keys sorted within a group, keys in gaps
        left out. O(k log k) for k keys, plus O(log routes) per group.

        >>> table = RouteTable.build(IMPLEMENTATION, [RouteDescriptor(1, b"a", None, 1)])[0]
        >>> [(r.route_id, ks) for r, ks in table.group([b"b", b"0", b"a"])]
        [(1, [b'a', b'b'])]
        """
        return self.implementation.group(self, keys)

    def locate(self, key: bytes) -> tuple[int, int]:
        """``(chunk, slot)`` of the slot holding ``key``. O(log routes).

        >>> RouteTable.build(IMPLEMENTATION, [RouteDescriptor(1, b"a", None, 1)])[0].locate(b"b")
        (0, 1)
        """
        c = bisect_right(self.tops, key)
        return c, self.chunks[c].bisect_right(key)

    def intersecting(self, start: bytes, end: bytes | None) -> list[Route]:
        """Routes intersecting ``[start, end)`` (``end`` None: unbounded; ``start < end``), in
        key order. O(log routes + routes returned).

        >>> table = RouteTable.build(IMPLEMENTATION, [RouteDescriptor(1, b"a", b"c", 1),
        ...                                           RouteDescriptor(2, b"c", None, 1)])[0]
        >>> [r.route_id for r in table.intersecting(b"b", b"d")]
        [1, 2]
        """
        tops, chunks = self.tops, self.chunks
        c = bisect_right(tops, start)
        last = len(chunks) - 1 if end is None else bisect_left(tops, end)
        chunk = chunks[c]
        lo = chunk.bisect_right(start)
        found: list[Route] = []
        while True:
            hi = len(chunk) if end is None or c < last else chunk.bisect_left(end) + 1
            found += filter(None, map(chunk.route, range(lo, hi)))
            if c >= last:
                return found
            c += 1
            chunk = chunks[c]
            lo = 0

    def walk(self, key: bytes, *, forward: bool, inclusive: bool = False) -> Iterator[Route]:
        """Routes from the slot holding ``key`` (itself only if ``inclusive``) on, or back.
        O(log routes) to start, O(1) a slot.

        >>> table = RouteTable.build(IMPLEMENTATION, [RouteDescriptor(1, b"a", b"c", 1),
        ...                                           RouteDescriptor(2, b"c", None, 1)])[0]
        >>> [r.route_id for r in table.walk(b"d", forward=False, inclusive=True)]
        [2, 1]
        """
        return _walk(self, key, forward, inclusive)

    def find_catalog_route(self, route_id: int, start_prefix: int) -> Route | None:
        """The route of id ``route_id`` whose start has prefix ``start_prefix``, or None.

        The chunks from the one holding the least key of that prefix on, while their keys may
        still have it, are scanned for the id. O(log routes + chunk) (times the chunks one prefix
        spans).

        >>> table = RouteTable.build(IMPLEMENTATION, [RouteDescriptor(7, b"a", None, 1)])[0]
        >>> table.find_catalog_route(7, prefix(b"a")).start
        b'a'
        """
        c = bisect_right(self.tops, start_prefix.to_bytes(8, "big").rstrip(b"\x00"))
        for chunk in islice(self.chunks, c, None):
            slot = chunk.find_id(route_id)
            if slot >= 0:
                return chunk.route(slot)
            if chunk.upper is None or prefix(chunk.upper) > start_prefix:
                break
        return None

    def rewrite(
        self,
        loads: _Loads,
        ranges: list[_Range],
        dropped_ids: Container[int],
        new_routes: list[Route],
    ) -> tuple[RouteTable, _Loads]:
        """A new table and loads where ``new_routes`` (load 0) replace what they must inside
        ``ranges``.

        ``ranges`` (sorted, disjoint) must cover every new route. Inside them, catalog routes whose
        id is in ``dropped_ids`` and ephemeral routes that intersect a range are removed;
        everything else is kept with its load. O(chunk) for a change inside one chunk (a splice);
        otherwise O(chunk) per chunk touched, plus O(routes / CHUNK) for the top level.

        >>> table, loads, _ = RouteTable.build(IMPLEMENTATION, [RouteDescriptor(1, b"a", None, 1)])
        >>> piece = Route(0, b"b", b"c", 2, RouteState.ACTIVE, 0)
        >>> table, loads = table.rewrite(loads, [(b"a", None)], {1}, [piece])
        >>> [r.route_id for r in table.routes()], table.find(b"b").group_id
        ([0], 2)
        """
        return _rewrite(self, loads, ranges, dropped_ids, new_routes)

    def rebuild(
        self,
        slots: _Slots,
        loads: _Loads,
        ranges: list[_Range],
        dropped_ids: Container[int],
        new_routes: list[Route],
    ) -> tuple[RouteTable, _Loads]:
        """:meth:`rewrite`'s table and loads, built whole: ``slots`` are the table's (as
        :meth:`slots` gives them), the rest as for :meth:`rewrite`. O(routes + new routes): for a
        change touching many chunks, cheaper than rewriting them one range at a time.

        >>> table, loads, _ = RouteTable.build(IMPLEMENTATION, [RouteDescriptor(1, b"a", None, 1)])
        >>> piece = Route(0, b"b", b"c", 2, RouteState.ACTIVE, 0)
        >>> table, loads = table.rebuild(list(table.slots()), loads, [(b"a", None)], {1}, [piece])
        >>> [r.route_id for r in table.routes()], table.find(b"b").group_id
        ([0], 2)
        """
        range_starts = list(map(_first_start, ranges))
        placed = [
            (route, load)
            for route, load in zip(slots, chain.from_iterable(loads), strict=True)
            if route is not None
            and not (
                route.route_id in dropped_ids
                if route.route_id
                else _intersects(route, range_starts, ranges)
            )
        ]
        placed += zip(new_routes, repeat(0))
        placed.sort(key=_placed_start)
        fill, inner, fill_loads = _fill(placed, None, None)
        search = self.implementation
        tops, chunks, chunk_loads = _chunked(search, inner, fill, fill_loads, None, None)
        return RouteTable(tops, search.make_index(tops), chunks, search), chunk_loads

    def routes(self) -> Iterator[Route]:
        """Every route in key order. O(routes).

        >>> table = RouteTable.build(IMPLEMENTATION, [RouteDescriptor(1, b"a", None, 1)])[0]
        >>> [r.route_id for r in table.routes()]
        [1]
        """
        return (route for route in self.slots() if route is not None)

    def slots(self) -> Iterator[Route | None]:
        """Every slot (a route or None for a gap) in key order, loads aligned with
        ``chain.from_iterable(loads)``. O(routes).

        >>> table = RouteTable.build(IMPLEMENTATION, [RouteDescriptor(1, b"a", None, 1)])[0]
        >>> [r and r.route_id for r in table.slots()]
        [None, 1]
        """
        return chain.from_iterable(chunk.slots() for chunk in self.chunks)

    def _check(self, loads: _Loads) -> None:
        """Assert every structural invariant of the table and of ``loads``. O(routes)."""
        tops, top_index, chunks, implementation = self
        assert len(tops) == len(chunks) - 1
        assert len(loads) == len(chunks)
        assert type(top_index) is type(implementation.make_index(tops))
        for c, top in enumerate(tops):
            assert self.find(top) == chunks[c + 1].route(0), "the index finds each top's chunk"
        bounds: list[bytes] = []
        slots: list[Route | None] = []
        flat_loads: list[int] = []
        for c, chunk in enumerate(chunks):
            chunk_bounds, chunk_slots = chunk.bounds(), chunk.slots()
            assert type(chunk) is implementation.Chunk
            assert len(chunk_slots) == len(chunk_bounds) + 1 == len(chunk)
            assert len(loads[c]) == len(chunk_slots)
            assert len(chunk_bounds) <= 2 * CHUNK
            assert chunk.lower == (tops[c - 1] if c else None)
            assert chunk.upper == (tops[c] if c < len(tops) else None)
            assert [chunk.bound(i) for i in range(len(chunk_bounds))] == chunk_bounds
            if c:
                bounds.append(tops[c - 1])
            bounds += chunk_bounds
            slots += chunk_slots
            flat_loads += loads[c]
        assert all(type(b) is bytes for b in bounds)
        assert all(map(lt, bounds, bounds[1:])), "bounds must strictly increase"
        assert slots[0] is None, "nothing lies before the first bound"
        assert all(a is not None or b is not None for a, b in pairwise(slots)), "two gaps"
        for i, route in enumerate(slots):
            assert type(flat_loads[i]) is int and flat_loads[i] >= 0
            if route is None:
                assert flat_loads[i] == 0
                continue
            assert type(route) is Route
            assert route.start == bounds[i - 1]
            assert route.end == (bounds[i] if i < len(bounds) else None)
            assert route.group_id > 0
            assert type(route.state) is RouteState
            assert route.load == 0
            assert route.route_id or route.state is RouteState.ACTIVE


def _chunked(
    search: _Searches,
    bounds: list[bytes],
    slots: _Slots,
    loads: list[int],
    lower: bytes | None,
    upper: bytes | None,
) -> tuple[list[bytes], list[Any], _Loads]:
    """Cut a flat table over ``[lower, upper)`` into chunks of about CHUNK bounds; one bound
    between chunks is a top."""
    tops, chunks = cut(bounds, slots, CHUNK, search.Chunk, lower, upper)
    edges = list(accumulate(map(len, chunks), initial=0))
    return tops, chunks, [loads[a:b] for a, b in pairwise(edges)]


def _flatten(
    table: RouteTable, loads: _Loads, first: int, last: int
) -> tuple[list[bytes], _Slots, list[int]]:
    """Chunks ``first..last`` (inclusive) as one flat bounds/slots/loads triple."""
    tops, chunks = table.tops, table.chunks
    bounds: list[bytes] = []
    slots: _Slots = []
    flat_loads: list[int] = []
    for c in range(first, last + 1):
        if c > first:
            bounds.append(tops[c - 1])
        bounds += chunks[c].bounds()
        slots += chunks[c].slots()
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
    table: RouteTable,
    loads: _Loads,
    ranges: list[_Range],
    dropped_ids: Container[int],
    new_routes: list[Route],
) -> tuple[RouteTable, _Loads]:
    """A new table where ``new_routes`` (load 0) replace what they must inside ``ranges``.

    ``ranges`` (sorted, disjoint) must cover every new route. Inside them, catalog routes whose id
    is in ``dropped_ids`` and ephemeral routes that intersect a range are removed; everything else
    is kept with its load. Only the chunks around the ranges are copied.
    """
    in_chunk = _rewrite_in_chunk(table, loads, ranges, dropped_ids, new_routes)
    if in_chunk is not None:
        return in_chunk
    tops, chunks, search = table.tops, table.chunks, table.implementation
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
        windows = _windows(
            partial(bisect_right, bounds), partial(bisect_left, bounds), len(slots), cluster_ranges
        )
        for window in windows:
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
        part_tops, part_chunks, part_loads = _chunked(
            search, out_bounds, out_slots, out_loads, lower, upper
        )
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
    return RouteTable(new_tops, search.make_index(new_tops), new_chunks, search), new_loads


def _placed_start(item: tuple[Route, int]) -> bytes:
    return item[0].start


def _windows(
    bisect_right: Callable[[bytes], int],
    bisect_left: Callable[[bytes], int],
    n_slots: int,
    ranges: list[_Range],
) -> list[tuple[int, int]]:
    """Slot windows ``[lo, hi)`` covering ``ranges``, merged when one slot apart, in a run of
    ``n_slots`` slots searched by the bisects over its bounds.

    Windows at least two slots apart can each absorb a neighbouring gap without colliding, since
    a valid table never has two gaps side by side.
    """
    windows: list[tuple[int, int]] = []
    for start, end in ranges:
        lo = bisect_right(start)
        hi = n_slots if end is None else bisect_left(end) + 1
        if windows and lo <= windows[-1][1] + 1:
            windows[-1] = (windows[-1][0], max(windows[-1][1], hi))
        else:
            windows.append((lo, hi))
    return windows


def _rewrite_in_chunk(
    table: RouteTable,
    loads: _Loads,
    ranges: list[_Range],
    dropped_ids: Container[int],
    new_routes: list[Route],
) -> tuple[RouteTable, _Loads] | None:
    """:func:`_rewrite` when the ranges make one window of slots inside one chunk, clear of its
    edges (the neighbours a gap may merge with included), else None.

    Only that chunk is rebuilt, by a splice of the window's slots; tops, index and every other
    chunk are shared with the old table. O(chunk) in memory copies, plus the window.
    """
    tops, chunks = table.tops, table.chunks
    if not ranges or ranges[-1][1] is None:
        return None
    c = bisect_right(tops, ranges[0][0])
    if bisect_left(tops, ranges[-1][1]) != c:
        return None
    chunk = chunks[c]
    windows = _windows(chunk.bisect_right, chunk.bisect_left, len(chunk), ranges)
    lo, hi = windows[0]
    if len(windows) != 1 or lo < 1 or hi >= len(chunk):
        return None
    range_starts = list(map(_first_start, ranges))
    new_starts = list(map(_route_start, new_routes))
    chunk_loads = loads[c]
    placed = [
        (route, chunk_loads[i])
        for i in range(lo, hi)
        if (route := chunk.route(i)) is not None
        and not (
            route.route_id in dropped_ids
            if route.route_id
            else _intersects(route, range_starts, ranges)
        )
    ]
    lower, upper = chunk.bound(lo - 1), chunk.bound(hi - 1)
    first, last = bisect_left(new_starts, lower), bisect_left(new_starts, upper)
    if first < last:
        placed += zip(new_routes[first:last], repeat(0))
        placed.sort(key=_placed_start)
    fill, inner, fill_loads = _fill(placed, lower, upper)
    # Two gaps must never be neighbours: absorb a gap slot next to the window.
    if fill[0] is None and chunk.route(lo - 1) is None:
        lo -= 1
        if lo < 1:
            return None
        lower = chunk.bound(lo - 1)
        fill, inner, fill_loads = _fill(placed, lower, upper)
    if fill[-1] is None and chunk.route(hi) is None:
        hi += 1
        if hi >= len(chunk):
            return None
        upper = chunk.bound(hi - 1)
        fill, inner, fill_loads = _fill(placed, lower, upper)
    if len(chunk) - (hi - lo) + len(fill) > 2 * CHUNK + 1:
        return None
    new_chunks = chunks.copy()
    new_chunks[c] = chunk.splice(lo, hi, inner, fill)
    new_loads = loads.copy()
    new_loads[c] = [*chunk_loads[:lo], *fill_loads, *chunk_loads[hi:]]
    return table._replace(chunks=new_chunks), new_loads


def _walk(table: RouteTable, key: bytes, forward: bool, inclusive: bool) -> Iterator[Route]:
    """Routes from the slot holding ``key`` (included only if ``inclusive``) on, or back."""
    tops, chunks = table.tops, table.chunks
    c = bisect_right(tops, key)
    here = chunks[c].bisect_right(key)
    if forward:
        first = here if inclusive else here + 1
        for chunk in islice(chunks, c, None):
            for slot in range(first, len(chunk)):
                route = chunk.route(slot)
                if route is not None:
                    yield route
            first = 0
    else:
        last = here
        for d in range(c, -1, -1):
            chunk = chunks[d]
            for slot in range(len(chunk) - 1 if d < c else last, -1, -1):
                route = chunk.route(slot)
                if route is not None:
                    yield route

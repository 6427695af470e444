"""The Engine's routing table chunks and searches in pure Python: :mod:`distribution._lookup`'s API.

Used when the C extension is not built (no compiler at install time) or when the environment
variable ``DISTRIBUTION_PURE_PYTHON`` is set to anything but ``""`` or ``"0"``; see
:attr:`distribution.Engine.implementation`. Same table, same answers, same errors for keys that
are not ``bytes``, at the speed of :mod:`bisect` and without the packing: a :class:`Chunk` here
keeps its bounds and its routes in lists.

The table is ``(tops, index, chunks, ...)`` as :mod:`distribution.table` lays it out: chunk ``c``
covers ``[tops[c - 1], tops[c])``; its slot ``i`` holds the route covering
``[bound i - 1, bound i)``, or None for a gap. Here ``index`` is ``tops`` itself.
"""

from __future__ import annotations

import marshal
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from itertools import accumulate, compress, islice, pairwise, repeat
from operator import attrgetter, le, lt, ne
from typing import Any, TypeAlias

from distribution import codec
from distribution.types import Route, RouteDescriptor, RouteState, check_key, route_columns

__all__ = [
    "IMPLEMENTATION",
    "Chunk",
    "IdIndex",
    "Reader",
    "build",
    "digest",
    "find",
    "group",
    "make_index",
    "merge",
    "route_hash",
    "usual_route",
]

#: What :attr:`distribution.Engine.implementation` reports while this module is in use.
IMPLEMENTATION = "python"

#: Route id -> (the big-endian value of its start's first 8 bytes, zero padded; its parent id).
IdIndex = dict

#: Descriptors handled per step by :func:`build`'s column extraction. The keys of one block are
#: touched while their memory is still cached, instead of once per pass over the whole snapshot.
_BLOCK = 1024

_Slots: TypeAlias = list[Route | None]
_Table: TypeAlias = tuple[list[bytes], Any, list[Any]]

_ONLY_BYTES = frozenset({bytes})

_parent_of = attrgetter("parent_route_id")
_start_of = attrgetter("start")


class Chunk:
    """A run of the routing table: sorted bounds and the slots between them; never changes.

    Slot ``i`` covers ``[bound i - 1, bound i)``, ``lower`` and ``upper`` standing in at the ends
    (None: the start or the end of the key space). ``len(chunk)`` is its number of slots.

    >>> route = Route(1, b"a", b"m", 1, RouteState.ACTIVE, 0)
    >>> chunk = Chunk([b"a", b"m"], [None, route, None], None, None)
    >>> len(chunk), chunk.bisect_right(b"b"), chunk.route(1) is route
    (3, 1, True)
    """

    __slots__ = ("_bounds", "_slots", "lower", "upper")

    def __init__(
        self, bounds: list[bytes], slots: _Slots, lower: bytes | None, upper: bytes | None
    ) -> None:
        """Hold ``bounds`` and ``slots`` (one more than bounds). O(1): they are not copied.

        >>> Chunk([], [], None, None)
        Traceback (most recent call last):
        ...
        ValueError: a chunk has one slot more than bounds
        """
        if len(slots) != len(bounds) + 1:
            raise ValueError("a chunk has one slot more than bounds")
        self._bounds = bounds
        self._slots = slots
        self.lower = lower
        self.upper = upper

    def __len__(self) -> int:
        """The number of slots. O(1).

        >>> len(Chunk([], [None], None, None))
        1
        """
        return len(self._slots)

    def bisect_right(self, key: bytes) -> int:
        """The slot holding ``key``. O(log n).

        >>> Chunk([b"m"], [None, None], None, None).bisect_right(b"m")
        1
        """
        return bisect_right(self._bounds, key)

    def bisect_left(self, key: bytes) -> int:
        """The number of bounds below ``key``. O(log n).

        >>> Chunk([b"m"], [None, None], None, None).bisect_left(b"m")
        0
        """
        return bisect_left(self._bounds, key)

    def route(self, slot: int) -> Route | None:
        """Slot ``slot``'s route (load 0), or None for a gap. O(1).

        >>> Chunk([], [None], None, None).route(0) is None
        True
        """
        return self._slots[slot]

    def bound(self, i: int) -> bytes:
        """Bound ``i``. O(1).

        >>> Chunk([b"m"], [None, None], None, None).bound(0)
        b'm'
        """
        return self._bounds[i]

    def splice(self, lo: int, hi: int, bounds: list[bytes], slots: _Slots) -> Chunk:
        """A new chunk whose slots ``lo .. hi - 1`` and the bounds between them are replaced by
        ``slots`` and ``bounds`` (one fewer); ``0 < lo < hi <=`` the number of bounds. O(n).

        >>> route = Route(1, b"a", b"c", 1, RouteState.ACTIVE, 0)
        >>> chunk = Chunk([b"a", b"c"], [None, route, None], None, None)
        >>> left, right = route._replace(end=b"b"), route._replace(start=b"b")
        >>> chunk.splice(1, 2, [b"b"], [left, right]).bounds()
        [b'a', b'b', b'c']
        """
        if not (0 < lo < hi <= len(self._bounds)) or len(slots) != len(bounds) + 1:
            raise ValueError("splice() out of range")
        return Chunk(
            [*self._bounds[:lo], *bounds, *self._bounds[hi - 1 :]],
            [*self._slots[:lo], *slots, *self._slots[hi:]],
            self.lower,
            self.upper,
        )

    def find_id(self, route_id: int) -> int:
        """The slot of the route whose id is ``route_id``, or -1. O(n).

        >>> Chunk([], [Route(4, b"", None, 1, RouteState.ACTIVE, 0)], b"", None).find_id(4)
        0
        """
        for slot, route in enumerate(self._slots):
            if route is not None and route.route_id == route_id:
                return slot
        return -1

    def bounds(self) -> list[bytes]:
        """The bounds, a new list. O(n).

        >>> Chunk([b"m"], [None, None], None, None).bounds()
        [b'm']
        """
        return list(self._bounds)

    def slots(self) -> _Slots:
        """Every slot's route or None, a new list. O(n).

        >>> Chunk([b"m"], [None, None], None, None).slots()
        [None, None]
        """
        return list(self._slots)


class Reader:
    """The base of :class:`distribution.Engine`: its table, in ``_table``, and its lookup.

    :mod:`distribution._lookup` has the same in C, sparing a lookup its Python frame.
    """

    _table: Any

    def get_route(self, key: bytes) -> Route | None:
        """The route whose ``[start, end)`` holds ``key``, or None. O(log routes), no lock.

        The route's ``load`` is not kept up to date (see ``Engine.stats``).

        >>> from distribution import _pylookup
        >>> route = Route(1, b"a", None, 1, RouteState.ACTIVE, 0)
        >>> reader = Reader()
        >>> reader._table = ([], [], [Chunk([b"a"], [None, route], None, None)], _pylookup)
        >>> reader.get_route(b"b") is route
        True
        >>> reader.get_route("b")
        Traceback (most recent call last):
        ...
        TypeError: key must be bytes, got str (encode text keys explicitly)
        """
        if key.__class__ is not bytes:
            check_key("key", key)
        table = self._table
        found: Route | None = table[3].find(table, key)
        return found

    def _group(self, keys: list[bytes]) -> list[tuple[Route, list[bytes]]]:
        """``group(_table, keys)``: the groups of a list of bytes ``keys``. O(k log k) for k keys,
        plus O(log routes) per group.

        >>> from distribution import _pylookup
        >>> route = Route(1, b"a", None, 1, RouteState.ACTIVE, 0)
        >>> reader = Reader()
        >>> reader._table = ([], [], [Chunk([b"a"], [None, route], None, None)], _pylookup)
        >>> reader._group([b"b", b"0"]) == [(route, [b"b"])]
        True
        """
        table = self._table
        groups: list[tuple[Route, list[bytes]]] = table[3].group(table, keys)
        return groups


def make_index(tops: list[bytes]) -> list[bytes]:
    """The search index over ``tops``: here the list itself. O(1).

    >>> make_index([b"m"])
    [b'm']
    """
    return tops


def _not_bytes(keys: list[bytes]) -> TypeError:
    bad = next(key for key in keys if key.__class__ is not bytes)
    return TypeError(f"routing table key must be bytes, got {type(bad).__name__}")


def find(table: _Table, key: bytes, /) -> Route | None:
    """The route (or None) in the slot of ``table`` holding ``key``. O(log routes).

    >>> route = Route(1, b"a", None, 1, RouteState.ACTIVE, 0)
    >>> table = ([], [], [Chunk([b"a"], [None, route], None, None)])
    >>> find(table, b"b") is route, find(table, b"0")
    (True, None)
    """
    if key.__class__ is not bytes:
        raise _not_bytes([key])
    index, chunks = table[1], table[2]
    chunk: Chunk = chunks[bisect_right(index, key)]
    return chunk._slots[bisect_right(chunk._bounds, key)]


def group(table: _Table, keys: list[bytes], /) -> list[tuple[Route, list[bytes]]]:
    """Route a batch: ``[(route, [keys...]), ...]`` in key order, as ``_lookup.group`` does.

    Keys are sorted (stably: equal keys keep their order) within a group, keys no route holds are
    left out. O(k log k) for k keys, plus O(log routes + log k) per slot the keys fall in.

    >>> low = Route(1, b"a", b"m", 1, RouteState.ACTIVE, 0)
    >>> high = Route(2, b"m", None, 2, RouteState.ACTIVE, 0)
    >>> table = ([], [], [Chunk([b"a", b"m"], [None, low, high], None, None)])
    >>> [(r.route_id, ks) for r, ks in group(table, [b"z", b"b", b"0", b"a"])]
    [(1, [b'a', b'b']), (2, [b'z'])]
    """
    if keys.__class__ is not list:
        raise TypeError("group() keys must be a list")
    if not _ONLY_BYTES.issuperset(map(type, keys)):
        raise _not_bytes(keys)
    ordered = sorted(keys)
    index, chunks = table[1], table[2]
    n = len(ordered)
    groups: list[tuple[Route, list[bytes]]] = []
    i = 0
    while i < n:
        key = ordered[i]
        chunk: Chunk = chunks[bisect_right(index, key)]
        bounds = chunk._bounds
        s = bisect_right(bounds, key)
        upper = bounds[s] if s < len(bounds) else chunk.upper
        k = n if upper is None else bisect_left(ordered, upper, i)
        route = chunk._slots[s]
        if route is not None:
            groups.append((route, ordered[i:k]))
        i = k
    return groups


def build(
    routes: Sequence[RouteDescriptor], chunk_size: int, /
) -> tuple[_Table, dict[int, tuple[int, int]]] | None:
    """``(table, ids)`` for sorted, valid descriptors, or None if any is unusual.

    None means "something is unusual" (an invalid route, a field of the wrong type, an unsorted
    snapshot, a duplicate id...): the caller then runs the exact, per-route checks, which raise
    the first error in the order the contract specifies, or return normalized routes that this
    function accepts. ``ids`` maps each route id to its start's prefix and its parent id.
    O(routes), in C-level passes.

    >>> table, ids = build((RouteDescriptor(7, b"a", None, 1, parent_route_id=3),), 1024)
    >>> find(table, b"b").route_id, ids
    (7, {7: (6989586621679009792, 3)})
    >>> build((RouteDescriptor(7, b"b", None, 1), RouteDescriptor(8, b"a", None, 1)), 1024)
    """
    built = _build_contiguous(routes) if routes else ([], [None], {})
    if built is None:
        built = _build_with_gaps(routes)
    if built is None:
        return None
    bounds, slots, by_id = built
    table = chunked(bounds, slots, chunk_size)
    parents = map(_parent_of, routes)
    return table, {
        route_id: (prefix(route.start), parent)
        for (route_id, route), parent in zip(by_id.items(), parents, strict=True)
    }


def route_hash(
    route_id: int,
    start: bytes,
    end: bytes | None,
    group_id: int,
    state: RouteState,
    parent_route_id: int,
    /,
) -> int:
    """The route's hash in the catalog digest (:func:`distribution.codec.route_hash`).
    O(len(start) + len(end)).

    >>> route_hash(1, b"", None, 1, RouteState.ACTIVE, 0)
    -9181016149331000729
    """
    return codec.route_hash(
        RouteDescriptor(route_id, start, end, group_id, state, parent_route_id)
    )


def usual_route(route: object, /) -> bool:
    """Whether ``route`` is known valid as it is, sparing its validation: never, here (a check in
    Python costs what the validation does; ``_lookup.usual_route`` answers in C). O(1).

    >>> usual_route(RouteDescriptor(1, b"", None, 1))
    False
    """
    return False


def digest(table: _Table, ids: dict[int, tuple[int, int]], /) -> int:
    """The catalog digest of the table's catalog routes (route id not 0), each with the parent
    its id has in ``ids``. O(routes).

    >>> table, ids = build((RouteDescriptor(1, b"", None, 1),), 1024)
    >>> digest(table, ids) == route_hash(1, b"", None, 1, RouteState.ACTIVE, 0)
    True
    """
    value = 0
    for chunk in table[2]:
        for route in chunk._slots:
            if route is not None and route.route_id:
                route_id, start, end, group_id, state, _ = route
                value ^= route_hash(route_id, start, end, group_id, state, ids[route_id][1])
    return value


def merge(
    table: _Table,
    ids: dict[int, tuple[int, int]],
    dropped: list[int],
    upserts: list[RouteDescriptor],
    chunk_size: int,
    /,
) -> tuple[_Table, dict[int, tuple[int, int]], dict[int, int]] | None:
    """``(table, ids, hashes)``: :func:`build` of the table's routes (parents from ``ids``) but
    those whose id is in ``dropped``, and of ``upserts`` (sorted by start); ``hashes`` maps the
    id of each route dropped to its hash in the catalog digest. None if the table holds an
    ephemeral route, or if :func:`build` would return None. O(routes + upserts).

    >>> table, ids = build((RouteDescriptor(1, b"a", None, 1),), 1024)
    >>> merged, ids, hashes = merge(table, ids, [1], [RouteDescriptor(2, b"b", None, 1)], 1024)
    >>> list(ids), hashes == {1: route_hash(1, b"a", None, 1, RouteState.ACTIVE, 0)}
    ([2], True)
    """
    drop = set(dropped)
    kept: list[RouteDescriptor] = []
    hashes: dict[int, int] = {}
    for chunk in table[2]:
        for r in chunk._slots:
            if r is None:
                continue
            if not r.route_id:
                return None
            d = RouteDescriptor(r.route_id, r.start, r.end, r.group_id, r.state, ids[r.route_id][1])
            if d.route_id in drop:
                hashes[d.route_id] = route_hash(*d)
            else:
                kept.append(d)
    # Stable: a kept route sharing its start with an upsert comes first, as in the C merge.
    routes = sorted(kept + upserts, key=_start_of)
    built = build(routes, chunk_size)
    if built is None:
        return None
    return built[0], built[1], hashes


def prefix(key: bytes) -> int:
    """The big-endian value of ``key``'s first 8 bytes, zero padded. O(1).

    >>> prefix(bytes([1])), prefix(bytes([0, 0, 0, 0, 0, 0, 0, 2, 255]))
    (72057594037927936, 2)
    """
    return int.from_bytes(key[:8].ljust(8, bytes(1)), "big")


def chunked(bounds: list[bytes], slots: _Slots, chunk_size: int) -> _Table:
    """A table of a flat bounds/slots pair cut into chunks of about ``chunk_size`` bounds.

    Its tops are bounds taken out of the chunks. O(bounds).

    >>> tops, index, chunks = chunked([b"a", b"b", b"c"], [None] * 4, 1)
    >>> tops, [len(c) for c in chunks]
    ([b'a', b'b'], [1, 1, 2])
    """
    tops, pieces = cut(bounds, slots, chunk_size)
    return tops, make_index(tops), pieces


def cut(
    bounds: list[bytes],
    slots: _Slots,
    chunk_size: int,
    chunk_type: Any = Chunk,
    lower: bytes | None = None,
    upper: bytes | None = None,
) -> tuple[list[bytes], list[Any]]:
    """Tops and ``chunk_type`` chunks of a flat bounds/slots pair over ``[lower, upper)``, about
    ``chunk_size`` bounds a chunk; one bound between chunks is a top. O(bounds).

    >>> cut([b"a", b"b", b"c"], [None] * 4, 2)[0]
    [b'b']
    """
    m = len(bounds)
    k = max(1, (m + chunk_size // 2) // chunk_size)
    # Positions of the tops in ``bounds``: k - 1 evenly spread, strictly increasing indices.
    cuts = [j * (m + 1) // k - 1 for j in range(1, k)]
    tops = list(map(bounds.__getitem__, cuts))
    edges = [-1, *cuts, m]
    lowers: list[bytes | None] = [lower, *tops]
    uppers: list[bytes | None] = [*tops, upper]
    pieces = [
        chunk_type(bounds[a + 1 : b], slots[a + 1 : b + 1], lowers[j], uppers[j])
        for j, (a, b) in enumerate(pairwise(edges))
    ]
    return tops, pieces


def _copy_keys(keys: tuple[bytes | None, ...]) -> tuple[Any, ...]:
    """Fresh copies of ``keys`` (``None`` kept), allocated one after another, in order.

    A marshal round-trip is one C-level pass that allocates every copy contiguously: a bisect over
    them then walks nearby memory rather than keys scattered by their original allocation.
    """
    copies: tuple[Any, ...] = marshal.loads(marshal.dumps(keys, 2))
    return copies


# -- bulk build (apply_snapshot) ---------------------------------------------------------------


def _build_contiguous(
    routes: Sequence[RouteDescriptor],
) -> tuple[list[bytes], _Slots, dict[int, Route]] | None:
    """The flat layout, for the common catalog: each route ends where the next one starts.

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
    """The flat layout, for sorted routes that may leave gaps between them."""
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

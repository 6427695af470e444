"""The immutable values the library passes around, and the checks that make them valid.

Constructing a value never validates it: a descriptor with ``state=4`` can exist, for example to
be refused by an encoder. Validation happens where values are used.

Route values are :class:`typing.NamedTuple` subclasses: immutable, hashable, keyword
constructible, and cheap enough to build by the million (an Engine holds one per route).
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice, pairwise
from operator import attrgetter, le, lt
from types import MappingProxyType
from typing import Any, NamedTuple, TypeAlias

from distribution.errors import (
    CatalogGroupIDRequiredError,
    CatalogInvalidRouteRangeError,
    CatalogInvalidRouteStateError,
    CatalogRouteIDRequiredError,
    RouteKeyTooLongError,
)

__all__ = [
    "MAX_ACTOR_BYTES",
    "MAX_REQUEST_ID_LENGTH",
    "MAX_ROUTE_KEY_BYTES",
    "ROUTE_STATES",
    "UINT64_MAX",
    "CatalogChange",
    "CatalogChangeSet",
    "CatalogHead",
    "CatalogHistoryEntry",
    "CatalogSnapshot",
    "CatalogWriteResult",
    "Route",
    "RouteDescriptor",
    "RouteState",
    "validate_route_descriptor",
]
# The checks below (check_u64, check_key, check_bound, check_route_bounds, the route-table
# validators...) are shared with the other modules of the package but are not public API (SPEC.md
# does not name them, and the package does not export them), so they stay out of __all__.

#: The largest id, version or timestamp: every one is an unsigned 64-bit integer.
UINT64_MAX = 2**64 - 1
#: The longest route bound (start or end), in bytes: well inside what PostgreSQL's B-tree index on
#: the live starts can hold (about 2,700 bytes a row), checked before anything is sent.
MAX_ROUTE_KEY_BYTES = 1024
#: The longest actor a write may name, in bytes of UTF-8.
MAX_ACTOR_BYTES = 256
#: The longest request id a write may be named by, in characters (printable ASCII).
MAX_REQUEST_ID_LENGTH = 64


class RouteState(enum.IntEnum):
    """The control-plane state of a route."""

    #: A normal serving route.
    ACTIVE = 0
    #: Writes are blocked during a cutover.
    WRITE_FENCED = 1
    #: The range's data is being copied out.
    MIGRATING_SOURCE = 2
    #: The range's data is being copied in.
    MIGRATING_TARGET = 3


#: Every valid state value (plain ints included) mapped to its RouteState member.
ROUTE_STATES: Mapping[int, RouteState] = MappingProxyType({int(s): s for s in RouteState})


class RouteDescriptor(NamedTuple):
    """The durable representation of a route: ``[start, end)`` served by ``group_id``.

    ``end is None`` means unbounded; ``end == b""`` is an (invalid) empty end.

    >>> RouteDescriptor(route_id=1, start=b"a", end=None, group_id=2)
    RouteDescriptor(route_id=1, start=b'a', end=None, group_id=2, state=<RouteState.ACTIVE: 0>, parent_route_id=0)
    """

    route_id: int
    start: bytes
    end: bytes | None
    group_id: int
    state: RouteState = RouteState.ACTIVE
    parent_route_id: int = 0


class Route(NamedTuple):
    """A route as the Engine serves it; ``route_id == 0`` marks an ephemeral route.

    ``load`` counts the accesses recorded on the route. On a route returned by a lookup it may
    already be out of date: :meth:`distribution.Engine.stats` gives exact loads.
    """

    route_id: int
    start: bytes
    end: bytes | None
    group_id: int
    state: RouteState
    load: int


@dataclass(frozen=True, slots=True, weakref_slot=True)
class CatalogSnapshot:
    """A consistent point-in-time view of the catalog.

    ``read_ts`` is the catalog version the snapshot was read at. ``digest`` is the catalog's route
    digest at ``version`` (see :func:`distribution.codec.routes_digest`) when the snapshot was
    read with it, else None. Weakly referenceable: a catalog store remembers the snapshot it
    last returned only while its caller holds it.
    """

    version: int
    routes: tuple[RouteDescriptor, ...]
    read_ts: int = 0
    #: Derived from ``routes`` (where it is right), so it takes no part in equality.
    digest: int | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class CatalogChange:
    """What one write did to the catalog: from ``previous_version`` to ``version``.

    ``upserts`` carries the new descriptor of every created or changed route, ``deletes`` the id of
    every retired route. ``digest`` is the catalog's route digest after the write, when known.
    """

    previous_version: int
    version: int
    upserts: tuple[RouteDescriptor, ...]
    deletes: tuple[int, ...]
    #: A claim about the catalog after the write, so it takes no part in equality.
    digest: int | None = field(default=None, compare=False)


class CatalogHead(NamedTuple):
    """The catalog's version and its route digest, read together; ``standby`` when they were
    read from a hot standby (which may lag behind the primary)."""

    version: int
    digest: int
    standby: bool = False


@dataclass(frozen=True, slots=True)
class CatalogChangeSet:
    """The answer of ``changes_since``: either ``reset`` (a full snapshot) or ``changes``.

    ``head`` is the catalog's version and digest in the same read, when it was read with them.
    """

    changes: tuple[CatalogChange, ...] = ()
    reset: CatalogSnapshot | None = None
    head: CatalogHead | None = None


@dataclass(frozen=True, slots=True)
class CatalogWriteResult:
    """What a catalog operation did: the version it produced, what it created and retired."""

    version: int
    created: tuple[RouteDescriptor, ...]
    retired: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CatalogHistoryEntry:
    """The audit record of one catalog write."""

    #: The version the write produced.
    version: int
    #: ``save``, ``split_route``, ``merge_routes``, ``set_route_state`` or ``move_route``.
    operation: str
    #: The operation's arguments (for ``save``: how many routes, opened and retired).
    arguments: dict[str, Any] = field(hash=False)
    #: Who asked for the write, as the caller said; None when not said.
    actor: str | None
    #: When the write's transaction started, as the database saw it.
    committed_at: datetime.datetime


def check_u64(name: str, value: object) -> int:
    """Return ``value`` if it is an unsigned 64-bit integer.

    Raises :class:`TypeError` for a non-integer and :class:`ValueError` outside ``0..2**64-1``.

    >>> check_u64("version", 2**64)
    Traceback (most recent call last):
    ...
    ValueError: version must be in 0..2**64-1, got 18446744073709551616
    """
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value <= UINT64_MAX:
        raise ValueError(f"{name} must be in 0..2**64-1, got {value}")
    return value


def check_key(name: str, value: object) -> bytes:
    """Return ``value`` if it is ``bytes``; keys are never encoded implicitly.

    >>> check_key("key", "a")
    Traceback (most recent call last):
    ...
    TypeError: key must be bytes, got str (encode text keys explicitly)
    """
    if value.__class__ is not bytes:
        hint = " (encode text keys explicitly)" if isinstance(value, str) else ""
        raise TypeError(f"{name} must be bytes, got {type(value).__name__}{hint}")
    return value


def check_bound(name: str, value: object) -> bytes:
    """Return ``value`` if it can be a route bound: ``bytes`` of at most
    :data:`MAX_ROUTE_KEY_BYTES`; O(1).

    A key given to split a route at becomes a bound, so it is held to the same limit. Keys that
    are only looked up are not: they may be longer than any bound.

    >>> check_bound("split_key", bytes(MAX_ROUTE_KEY_BYTES + 1))
    Traceback (most recent call last):
    ...
    distribution.errors.RouteKeyTooLongError: split_key is 1,025 bytes long: route bounds are at most 1,024 bytes (MAX_ROUTE_KEY_BYTES)
    """
    key = check_key(name, value)
    if len(key) > MAX_ROUTE_KEY_BYTES:
        raise _too_long(name, key)
    return key


def check_route_bounds(routes: Iterable[RouteDescriptor]) -> None:
    """Refuse routes to write with a start or end longer than :data:`MAX_ROUTE_KEY_BYTES`.

    Raises :class:`~distribution.RouteKeyTooLongError` naming the first such route. For routes
    whose types were checked (a validated table, say): O(n) in two C-level passes, with Python
    code per route only to name the culprit.

    >>> check_route_bounds([RouteDescriptor(route_id=4, start=b"", end=bytes(2000), group_id=1)])
    Traceback (most recent call last):
    ...
    distribution.errors.RouteKeyTooLongError: the end of route 4 is 2,000 bytes long: route bounds are at most 1,024 bytes (MAX_ROUTE_KEY_BYTES)
    """
    table = routes if isinstance(routes, Sequence) else list(routes)
    if (
        max(map(len, map(_start, table)), default=0) <= MAX_ROUTE_KEY_BYTES
        and max(map(len, filter(None, map(_end, table))), default=0) <= MAX_ROUTE_KEY_BYTES
    ):
        return
    for route in table:
        if len(route.start) > MAX_ROUTE_KEY_BYTES:
            raise _too_long(f"the start of route {route.route_id}", route.start)
        if route.end is not None and len(route.end) > MAX_ROUTE_KEY_BYTES:
            raise _too_long(f"the end of route {route.route_id}", route.end)


def _too_long(name: str, key: bytes) -> RouteKeyTooLongError:
    return RouteKeyTooLongError(
        f"{name} is {len(key):,} bytes long: route bounds are at most "
        f"{MAX_ROUTE_KEY_BYTES:,} bytes (MAX_ROUTE_KEY_BYTES)"
    )


def check_route_state(value: object) -> RouteState:
    """Return the RouteState of ``value`` (a member or its int value).

    >>> check_route_state(1)
    <RouteState.WRITE_FENCED: 1>
    >>> check_route_state(4)
    Traceback (most recent call last):
    ...
    distribution.errors.CatalogInvalidRouteStateError: catalog route state is invalid: 4
    """
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"state must be a RouteState, got {type(value).__name__}")
    state = ROUTE_STATES.get(value)
    if state is None:
        raise CatalogInvalidRouteStateError(f"catalog route state is invalid: {int(value)}")
    return state


def validate_route_descriptor(route: RouteDescriptor) -> RouteDescriptor:
    """Check that ``route`` is a valid descriptor and return it with its state as a RouteState.

    Types are checked first (``TypeError``, ``ValueError`` for ids outside u64), then, in order:
    ``route_id != 0``, ``group_id != 0``, a known state, ``end is None or start < end``. Bounds of
    any length are valid: what the catalog holds, the Engine mirrors; the library's writes hold
    them to :data:`MAX_ROUTE_KEY_BYTES` (:func:`check_route_bounds`).

    >>> validate_route_descriptor(RouteDescriptor(route_id=1, start=b"b", end=b"a", group_id=1))
    Traceback (most recent call last):
    ...
    distribution.errors.CatalogInvalidRouteRangeError: catalog route range is invalid: route 1 has start b'b' >= end b'a'
    """
    check_u64("route_id", route.route_id)
    check_key("start", route.start)
    if route.end is not None:
        check_key("end", route.end)
    check_u64("group_id", route.group_id)
    check_u64("parent_route_id", route.parent_route_id)
    # A bool is an int, but ``state=True`` is a mistake, not WRITE_FENCED (as with check_u64).
    if not isinstance(route.state, int) or isinstance(route.state, bool):
        raise TypeError(f"state must be a RouteState, got {type(route.state).__name__}")
    if route.route_id == 0:
        raise CatalogRouteIDRequiredError("catalog route id is required")
    if route.group_id == 0:
        raise CatalogGroupIDRequiredError(
            f"catalog group id is required: route {route.route_id} has group 0"
        )
    state = ROUTE_STATES.get(route.state)
    if state is None:
        raise CatalogInvalidRouteStateError(
            f"catalog route state is invalid: route {route.route_id} has state {int(route.state)}"
        )
    if route.end is not None and route.start >= route.end:
        raise CatalogInvalidRouteRangeError(
            f"catalog route range is invalid: route {route.route_id} has start "
            f"{route.start!r} >= end {route.end!r}"
        )
    if state is not route.state:
        return route._replace(state=state)
    return route


def validate_route_table(
    routes: Iterable[RouteDescriptor],
    *,
    duplicate: type[Exception],
    order: type[Exception],
    overlap: type[Exception],
) -> list[RouteDescriptor]:
    """Check a whole set of routes and return them validated, sorted by start; O(n log n).

    The checks, in order: each route as :func:`validate_route_descriptor`; unique ids (else
    ``duplicate``); then, for each pair adjacent by start, :func:`check_route_pair`. The Engine
    and the catalog share these rules and differ in the error classes they raise.

    >>> from distribution.errors import CatalogRouteOverlapError as Overlap
    >>> validate_route_table(
    ...     [RouteDescriptor(route_id=1, start=b"a", end=b"c", group_id=1),
    ...      RouteDescriptor(route_id=2, start=b"b", end=None, group_id=1)],
    ...     duplicate=ValueError, order=Overlap, overlap=Overlap)
    Traceback (most recent call last):
    ...
    distribution.errors.CatalogRouteOverlapError: routes overlap: route 1 ends at b'c', after route 2 starts at b'b'
    """
    valid = [validate_route_descriptor(route) for route in routes]
    seen: set[int] = set()
    for route in valid:
        if route.route_id in seen:
            raise duplicate(f"route ids must be unique: route {route.route_id} appears twice")
        seen.add(route.route_id)
    valid.sort(key=_start)
    for previous, following in pairwise(valid):
        check_route_pair(previous, following, order=order, overlap=overlap)
    return valid


def check_route_pair(
    previous: RouteDescriptor | Route,
    following: RouteDescriptor | Route,
    *,
    order: type[Exception],
    overlap: type[Exception],
) -> None:
    """Check two routes adjacent in start order; O(1).

    A shared start, or an unbounded route followed by another, raises ``order``;
    ``previous.end > following.start`` raises ``overlap``. Gaps are fine.

    >>> check_route_pair(Route(1, b"a", None, 1, RouteState.ACTIVE, 0),
    ...                  Route(2, b"b", None, 1, RouteState.ACTIVE, 0),
    ...                  order=LookupError, overlap=ValueError)
    Traceback (most recent call last):
    ...
    LookupError: routes are out of order (they overlap): unbounded route 1 is followed by route 2
    """
    if previous.start == following.start:
        raise order(
            f"routes are out of order (they overlap): route {previous.route_id} and route "
            f"{following.route_id} share start {following.start!r}"
        )
    if previous.end is None:
        raise order(
            f"routes are out of order (they overlap): unbounded route {previous.route_id} is "
            f"followed by route {following.route_id}"
        )
    if previous.end > following.start:
        raise overlap(
            f"routes overlap: route {previous.route_id} ends at {previous.end!r}, after route "
            f"{following.route_id} starts at {following.start!r}"
        )


#: The six fields of a run of descriptors, one tuple per field: ``(route_ids, starts, ends,
#: group_ids, states, parent_route_ids)``.
RouteColumns: TypeAlias = tuple[tuple[Any, ...], ...]

_ONLY_DESCRIPTORS = frozenset({RouteDescriptor})
_ONLY_INT = frozenset({int})
_ONLY_BYTES = frozenset({bytes})
_BYTES_OR_NONE = frozenset({bytes, type(None)})
_ONLY_STATES = frozenset({RouteState})
_STATE_TYPES = frozenset({RouteState, int})
_start = attrgetter("start")
_end = attrgetter("end")


def route_columns(
    routes: Sequence[RouteDescriptor], *, convert_states: bool = True
) -> RouteColumns | None:
    """The fields of ``routes`` as columns if each field has its exact type and range, else None.

    The fast half of validation: each check is one C-level pass, with no Python code run per
    route. Every route must be a :class:`RouteDescriptor` whose ids are ``int`` (route ids
    ``1..2**64-1``, group ids ``1..2**64-1``, parents ``0..2**64-1``), whose start is ``bytes``
    and end ``bytes`` or None. States come back as RouteState members: plain int states are
    converted, unless ``convert_states`` is false, when they make the answer None. None means
    "something is unusual": the caller runs the exact checks (:func:`validate_route_table`), which
    raise the first error in the contract's order. ``routes`` must not be empty. O(n).

    >>> route_columns([RouteDescriptor(route_id=1, start=b"a", end=None, group_id=2, state=1)])
    ((1,), (b'a',), (None,), (2,), (<RouteState.WRITE_FENCED: 1>,), (0,))
    >>> route_columns([RouteDescriptor(route_id=0, start=b"a", end=None, group_id=2)]) is None
    True
    """
    if not _ONLY_DESCRIPTORS.issuperset(map(type, routes)):
        return None
    ids, starts, ends, groups, states, parents = zip(*routes, strict=True)
    if not (
        _ONLY_BYTES.issuperset(map(type, starts))
        and _BYTES_OR_NONE.issuperset(map(type, ends))
        and _ONLY_INT.issuperset(map(type, ids))
        and _ONLY_INT.issuperset(map(type, groups))
        and _ONLY_INT.issuperset(map(type, parents))
        and min(ids) > 0
        and max(ids) <= UINT64_MAX
    ):
        return None
    # Groups and parents repeat: the range check on their distinct values is cheaper.
    distinct_groups = set(groups)
    distinct_parents = set(parents)
    if not (
        min(distinct_groups) > 0
        and max(distinct_groups) <= UINT64_MAX
        and min(distinct_parents) >= 0
        and max(distinct_parents) <= UINT64_MAX
    ):
        return None
    if not _ONLY_STATES.issuperset(map(type, states)):
        if not (
            convert_states
            and _STATE_TYPES.issuperset(map(type, states))
            and ROUTE_STATES.keys() >= set(states)
        ):
            return None
        states = tuple(map(ROUTE_STATES.__getitem__, states))
    return ids, starts, ends, groups, states, parents


def sorted_route_table(
    routes: Sequence[RouteDescriptor], *, max_route_id: int = UINT64_MAX
) -> tuple[RouteDescriptor, ...] | None:
    """``routes`` sorted by start if they form a valid route table, else None.

    The fast route-table validator, shared by the Engine and the catalog: C-level passes only,
    O(n) for routes already sorted by start, O(n log n) otherwise. Valid means: every field
    passes :func:`route_columns` (states RouteState members), route ids are unique and at most
    ``max_route_id``, every range is non-empty, and no two routes overlap (only the last may be
    unbounded). None sends the caller to :func:`validate_route_table`, which raises the contract's
    first error, or accepts an unusual but valid table (plain int states, say).

    >>> a = RouteDescriptor(route_id=1, start=b"", end=b"m", group_id=1)
    >>> b = RouteDescriptor(route_id=2, start=b"m", end=None, group_id=1)
    >>> sorted_route_table([b, a]) == (a, b)
    True
    >>> sorted_route_table([a, b._replace(start=b"l")]) is None  # they overlap
    True
    """
    if not routes:
        return ()
    columns = route_columns(routes, convert_states=False)
    if columns is None:
        return None
    ids, starts, ends = columns[0], columns[1], columns[2]
    if max(ids) > max_route_id or len(set(ids)) != len(ids):
        return None
    table = routes
    if not all(map(lt, starts, islice(starts, 1, None))):
        table = sorted(routes, key=_start)
        starts = tuple(map(_start, table))
        ends = tuple(map(_end, table))
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

"""The Engine's searches over its routing table in pure Python: :mod:`distribution._lookup`'s API.

Used when the C extension is not built (no compiler at install time) or when the environment
variable ``DISTRIBUTION_PURE_PYTHON`` is set to anything but ``""`` or ``"0"``; see
:attr:`distribution.Engine.implementation`. Same table, same answers, same errors for keys that
are not ``bytes``, at the speed of :mod:`bisect`.

The table is ``(tops, chunks)`` as :mod:`distribution.engine` lays it out: chunk ``c`` is
``(bounds, slots)`` covering ``[tops[c - 1], tops[c])``; ``slots[i]`` is the route covering
``[bounds[i - 1], bounds[i])``, or None for a gap.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import TypeAlias

from distribution.types import Route

__all__ = ["IMPLEMENTATION", "find", "group"]

#: What :attr:`distribution.Engine.implementation` reports while these searches are in use.
IMPLEMENTATION = "python"

_Table: TypeAlias = tuple[list[bytes], list[tuple[list[bytes], list[Route | None]]]]
_ONLY_BYTES = frozenset({bytes})


def _not_bytes(keys: list[bytes]) -> TypeError:
    bad = next(key for key in keys if key.__class__ is not bytes)
    return TypeError(f"routing table key must be bytes, got {type(bad).__name__}")


def find(table: _Table, key: bytes, /) -> Route | None:
    """The route (or None) in the slot of ``table`` holding ``key``. O(log routes).

    >>> route = Route(1, b"a", None, 1, 0, 0)
    >>> table = ([], [([b"a"], [None, route])])
    >>> find(table, b"b") is route, find(table, b"0")
    (True, None)
    """
    if key.__class__ is not bytes:
        raise _not_bytes([key])
    tops, chunks = table
    bounds, slots = chunks[bisect_right(tops, key)]
    return slots[bisect_right(bounds, key)]


def group(table: _Table, keys: list[bytes], /) -> list[tuple[Route, list[bytes]]]:
    """Route a batch: ``[(route, [keys...]), ...]`` in key order, as ``_lookup.group`` does.

    Keys are sorted (stably: equal keys keep their order) within a group, keys no route holds are
    left out. O(k log k) for k keys, plus O(log routes + log k) per slot the keys fall in.

    >>> low, high = Route(1, b"a", b"m", 1, 0, 0), Route(2, b"m", None, 2, 0, 0)
    >>> table = ([], [([b"a", b"m"], [None, low, high])])
    >>> [(r.route_id, ks) for r, ks in group(table, [b"z", b"b", b"0", b"a"])]
    [(1, [b'a', b'b']), (2, [b'z'])]
    """
    if keys.__class__ is not list:
        raise TypeError("group() keys must be a list")
    if not _ONLY_BYTES.issuperset(map(type, keys)):
        raise _not_bytes(keys)
    ordered = sorted(keys)
    tops, chunks = table
    n = len(ordered)
    groups: list[tuple[Route, list[bytes]]] = []
    i = 0
    while i < n:
        key = ordered[i]
        c = bisect_right(tops, key)
        bounds, slots = chunks[c]
        s = bisect_right(bounds, key)
        if s < len(bounds):
            upper: bytes | None = bounds[s]
        else:
            upper = tops[c] if c < len(tops) else None
        k = n if upper is None else bisect_left(ordered, upper, i)
        route = slots[s]
        if route is not None:
            groups.append((route, ordered[i:k]))
        i = k
    return groups

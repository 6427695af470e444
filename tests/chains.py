"""Routes for tests: contiguous chains of them over the whole key space."""

from __future__ import annotations

from distribution import RouteDescriptor

__all__ = ["chain", "key"]


def key(i: int) -> bytes:
    """The ``i``-th key of a chain: ``b"k000001"`` for 1 (sorted as the numbers are)."""
    return b"k%06d" % i


def chain(n: int, *, first_id: int = 1, group: int = 1) -> list[RouteDescriptor]:
    """``n`` contiguous routes over the whole key space: ``[b"", k1), [k1, k2), … [kn-1, ∞)``,
    with ids from ``first_id``, all in ``group``."""
    return [
        RouteDescriptor(
            route_id=first_id + i,
            start=b"" if i == 0 else key(i),
            end=None if i == n - 1 else key(i + 1),
            group_id=group,
        )
        for i in range(n)
    ]

"""What a save sends: the routes it is given, validated, compared with the routes the store knows.

A store knows the routes of the version it last read or wrote, while its caller holds the
snapshot it returned (or else reads them first). Saving from that version, it sends only the
routes that changed (:func:`change_from`), once the catalog's digest shows the catalog still
holds the known routes; otherwise it sends every route and the server diffs them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import compress
from operator import attrgetter, ne

from distribution.codec import next_route_id_floor
from distribution.errors import CatalogDuplicateRouteIDError, CatalogRouteOverlapError
from distribution.types import (
    UINT64_MAX,
    RouteDescriptor,
    sorted_route_table,
    validate_route_table,
)

__all__ = ["Change", "KnownRoutesStale", "catalog_table", "change_from"]

#: Above this many changed routes (or this fraction of them), sending every route is as cheap.
CHANGE_LIMIT = 1024
CHANGE_FRACTION = 8

_route_id = attrgetter("route_id")


@dataclass(frozen=True, slots=True)
class Change:
    """What a save changes, against known routes."""

    #: The whole new catalog, validated, sorted by start.
    table: tuple[RouteDescriptor, ...]
    #: New routes, and routes whose fields changed.
    upserts: tuple[RouteDescriptor, ...]
    #: Ids of the known routes that are gone.
    deletes: tuple[int, ...]


class KnownRoutesStale(Exception):
    """The catalog is at the known version but holds other routes; never leaves the store."""


def catalog_table(routes: Iterable[RouteDescriptor]) -> tuple[RouteDescriptor, ...]:
    """Validate a whole catalog and return it sorted by start; O(n), C-level, when it is valid.

    The fast check (:func:`~distribution.types.sorted_route_table`) runs first; when it finds
    something unusual, the exact checks run: a TypeError for anything but a RouteDescriptor,
    then the Engine's rules (:func:`~distribution.types.validate_route_table`) with the
    catalog's errors, then :class:`~distribution.CatalogRouteIDOverflowError` for a route id of
    ``2**64 - 1``, which leaves no id to allocate.
    """
    if isinstance(routes, (str, bytes)):
        raise TypeError("routes must be an iterable of RouteDescriptor")
    given = list(routes)
    table = sorted_route_table(given, max_route_id=UINT64_MAX - 1)
    if table is not None:
        return table
    for route in given:
        if not isinstance(route, RouteDescriptor):
            raise TypeError(f"routes must hold RouteDescriptor values, got {type(route).__name__}")
    table = tuple(
        validate_route_table(
            given,
            duplicate=CatalogDuplicateRouteIDError,
            order=CatalogRouteOverlapError,
            overlap=CatalogRouteOverlapError,
        )
    )
    next_route_id_floor(table)
    return table


def change_from(
    known: tuple[RouteDescriptor, ...], table: tuple[RouteDescriptor, ...]
) -> Change | None:
    """The change from the ``known`` routes to a valid ``table``, or None when too many routes
    changed.

    A route equal to the known route with its id is unchanged (its fields' types were checked,
    so equal means the same values). O(n), C-level passes only.
    """
    known_by_id = dict(zip(map(_route_id, known), known, strict=True))
    route_ids = list(map(_route_id, table))
    previous = map(known_by_id.get, route_ids)
    upserts = tuple(compress(table, map(ne, table, previous)))
    if len(upserts) > min(CHANGE_LIMIT, len(table) // CHANGE_FRACTION + 1):
        return None
    deletes = tuple(known_by_id.keys() - set(route_ids))
    return Change(table, upserts, deletes)

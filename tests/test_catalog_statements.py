"""Tests of ``distribution.catalog.statements``: decoding the rows the hot paths read, and the
binary COPY that stages a save's routes, against a real PostgreSQL."""

from __future__ import annotations

import random
from typing import Any

import psycopg

from distribution import RouteDescriptor, RouteState
from distribution.catalog import statements
from distribution.models import u64_from_db

FENCED = RouteState.WRITE_FENCED
U64_MAX = 2**64 - 1


def test_snapshot_columns_in_any_order_come_back_sorted() -> None:
    """SQL does not promise the order an aggregate reads its rows in; the snapshot sorts.

    The id columns arrive with the stored values' sign bit flipped: u64 values, negative from
    2**63 up."""
    columns = ([2, 1], [b"m", b""], [None, b"m"], [3, -1], [0, 1], [0, -(2**63)])
    assert statements.column_descriptors(columns) == (
        RouteDescriptor(
            route_id=1, start=b"", end=b"m", group_id=U64_MAX, state=FENCED, parent_route_id=2**63
        ),
        RouteDescriptor(route_id=2, start=b"m", end=None, group_id=3),
    )
    assert statements.column_descriptors((None,) * 6) == ()


def _staged(connection: psycopg.Connection[Any], routes: list[RouteDescriptor]) -> list[Any]:
    """Stage ``routes`` in a transaction and read the temporary table back, in stage order."""
    with connection.transaction(), connection.cursor(binary=True) as cursor:
        statements.stage(cursor, routes)
        rows = cursor.execute(
            'SELECT route_id, start, "end", group_id, state, parent_route_id '
            "FROM pg_temp.distribution_desired"
        ).fetchall()
    return [
        RouteDescriptor(
            u64_from_db(i), start, end, u64_from_db(g), RouteState(state), u64_from_db(p)
        )
        for i, start, end, g, state, p in rows
    ]


def test_stage_copies_every_field_exactly(database_url: str) -> None:
    """u64 edges, empty and binary keys, None and bounded ends, every state survive the COPY."""
    routes = [
        RouteDescriptor(1, b"", b"\x00", 1, RouteState.ACTIVE, 0),
        RouteDescriptor(2**63 - 1, b"\x00", b"\xff" * 3, 2**63, FENCED, 2**63 - 1),
        RouteDescriptor(2**63, b"\xff" * 3, b"\xff" * 4, U64_MAX, RouteState.MIGRATING_SOURCE, 1),
        RouteDescriptor(U64_MAX, b"\xff" * 4, None, 7, RouteState.MIGRATING_TARGET, U64_MAX),
    ]
    with psycopg.connect(database_url) as connection:
        assert _staged(connection, routes) == routes
        assert _staged(connection, []) == []


def test_stage_streams_many_blocks(database_url: str) -> None:
    """More routes than one staging block: every one arrives, in order (seeded random keys)."""
    rng = random.Random(14)
    count = 3 * statements._STAGE_BLOCK + 17
    keys = sorted({rng.randbytes(rng.randrange(1, 12)) for _ in range(count)})
    routes = [
        RouteDescriptor(i + 1, start, end, rng.randrange(1, 2**64), RouteState(i % 4), i)
        for i, (start, end) in enumerate(zip(keys, [*keys[1:], None], strict=True))
    ]
    with psycopg.connect(database_url) as connection:
        assert _staged(connection, routes) == routes

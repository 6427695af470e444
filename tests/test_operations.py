"""Catalog operations: split, merge, move and fence routes by compare-and-set.

Every operation runs against a real PostgreSQL catalog (see ``conftest.py``). Failed operations
must leave the catalog exactly as it was: the snapshot, the id counter, the audit trail and the
raw rows of ``distribution_routes`` are compared before and after.
"""

from __future__ import annotations

import base64
import datetime
import itertools
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import psycopg
import psycopg.errors
import pytest

from distribution import (
    CatalogGroupIDRequiredError,
    CatalogInvalidRouteStateError,
    CatalogInvalidSplitKeyError,
    CatalogInvalidStateTransitionError,
    CatalogRouteGroupMismatchError,
    CatalogRouteIDOverflowError,
    CatalogRouteNotActiveError,
    CatalogRouteNotFencedError,
    CatalogRouteNotFoundError,
    CatalogRoutesNotAdjacentError,
    CatalogSplitKeyAtBoundaryError,
    CatalogVersionMismatchError,
    CatalogVersionOverflowError,
    CatalogWriteResult,
    DistributionError,
    RouteDescriptor,
    RouteState,
    decode_route_descriptor,
)
from distribution.catalog import NOTIFY_CHANNEL, CatalogStore, statements
from distribution.codec import routes_digest
from distribution.models import u64_from_db, u64_to_db

ACTIVE = RouteState.ACTIVE
FENCED = RouteState.WRITE_FENCED
SOURCE = RouteState.MIGRATING_SOURCE
TARGET = RouteState.MIGRATING_TARGET

U64_MAX = 2**64 - 1

#: The base catalog (version 1, next route id 5): two routes of group 1, then, after a gap
#: between b"t" and b"x", group 2 up to an unbounded last route.
BASE = (
    RouteDescriptor(route_id=1, start=b"", end=b"g", group_id=1),
    RouteDescriptor(route_id=2, start=b"g", end=b"p", group_id=1),
    RouteDescriptor(route_id=3, start=b"p", end=b"t", group_id=2),
    RouteDescriptor(route_id=4, start=b"x", end=None, group_id=2),
)

#: How to bring an ACTIVE route to each state through allowed transitions.
PATH_TO = {
    ACTIVE: (),
    FENCED: (FENCED,),
    SOURCE: (FENCED, SOURCE),
    TARGET: (FENCED, TARGET),
}

ALLOWED_TRANSITIONS = {
    (ACTIVE, FENCED),
    (FENCED, ACTIVE),
    (FENCED, SOURCE),
    (FENCED, TARGET),
    (SOURCE, ACTIVE),
    (SOURCE, FENCED),
    (TARGET, ACTIVE),
    (TARGET, FENCED),
}


# -- helpers ---------------------------------------------------------------------------------------


@pytest.fixture
def catalog(store: CatalogStore) -> CatalogStore:
    """The store holding BASE as version 1."""
    store.save(0, BASE, actor="fixture")
    return store


def _raw_rows(database_url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as connection:
        return connection.execute(
            'SELECT route_id, valid_from, valid_to, start, "end", group_id, state, '
            "parent_route_id FROM distribution_routes ORDER BY route_id, valid_from"
        ).fetchall()


def _raw_meta(database_url: str) -> tuple[Any, ...]:
    with psycopg.connect(database_url) as connection:
        row = connection.execute(
            "SELECT version, next_route_id, history_floor FROM distribution_meta"
        ).fetchone()
    assert row is not None
    return row


def _state(store: CatalogStore, database_url: str) -> dict[str, Any]:
    """Everything a failed operation must leave alone."""
    rows = _raw_rows(database_url)
    return {
        "snapshot": store.snapshot(),
        "next_route_id": store.next_route_id(),
        "history": len(store.history()),
        "row_count": len(rows),
        "rows": rows,
        "meta": _raw_meta(database_url),
    }


@contextmanager
def unchanged(store: CatalogStore, database_url: str) -> Iterator[None]:
    """Assert that the block changes nothing in the catalog, down to the raw rows."""
    before = _state(store, database_url)
    yield
    after = _state(store, database_url)
    assert after["row_count"] == before["row_count"]
    assert after == before


def _reach(store: CatalogStore, route_id: int, state: RouteState) -> int:
    """Bring the ACTIVE route ``route_id`` to ``state``; return the catalog version."""
    version = store.version()
    for step in PATH_TO[state]:
        version = store.set_route_state(route_id, step, version).version
    return version


def _live(store: CatalogStore) -> dict[int, RouteDescriptor]:
    return {route.route_id: route for route in store.snapshot().routes}


# -- argument checks come first --------------------------------------------------------------------

# Every call below carries a wrong expected version and/or a missing route as well: the argument
# error must win over both.
BAD_ARGUMENTS: list[tuple[str, Callable[[CatalogStore], object], type[Exception]]] = [
    ("split id str", lambda s: s.split_route("2", b"k", 9), TypeError),
    ("split id float", lambda s: s.split_route(2.0, b"k", 9), TypeError),
    ("split id bool", lambda s: s.split_route(True, b"k", 9), TypeError),
    ("split id None", lambda s: s.split_route(None, b"k", 9), TypeError),
    ("split id negative", lambda s: s.split_route(-1, b"k", 9), ValueError),
    ("split id too big", lambda s: s.split_route(2**64, b"k", 9), ValueError),
    ("split key str", lambda s: s.split_route(2, "k", 1), TypeError),
    ("split key bytearray", lambda s: s.split_route(2, bytearray(b"k"), 1), TypeError),
    ("split key memoryview", lambda s: s.split_route(2, memoryview(b"k"), 1), TypeError),
    ("split key None", lambda s: s.split_route(2, None, 1), TypeError),
    ("split version str", lambda s: s.split_route(2, b"k", "1"), TypeError),
    ("split version None", lambda s: s.split_route(2, b"k", None), TypeError),
    ("split version negative", lambda s: s.split_route(2, b"k", -1), ValueError),
    ("split version too big", lambda s: s.split_route(2, b"k", 2**64), ValueError),
    ("split actor int", lambda s: s.split_route(2, b"k", 1, actor=7), TypeError),
    ("split actor bytes", lambda s: s.split_route(2, b"k", 1, actor=b"me"), TypeError),
    ("merge left str", lambda s: s.merge_routes("1", 2, 9), TypeError),
    ("merge right None", lambda s: s.merge_routes(1, None, 9), TypeError),
    ("merge left negative", lambda s: s.merge_routes(-1, 2, 9), ValueError),
    ("merge right too big", lambda s: s.merge_routes(1, 2**64, 9), ValueError),
    ("merge version float", lambda s: s.merge_routes(1, 2, 1.0), TypeError),
    ("merge version negative", lambda s: s.merge_routes(1, 2, -1), ValueError),
    ("merge actor int", lambda s: s.merge_routes(1, 2, 1, actor=1), TypeError),
    ("state id str", lambda s: s.set_route_state("2", FENCED, 9), TypeError),
    ("state id negative", lambda s: s.set_route_state(-2, FENCED, 9), ValueError),
    ("state str", lambda s: s.set_route_state(2, "WRITE_FENCED", 9), TypeError),
    ("state None", lambda s: s.set_route_state(2, None, 9), TypeError),
    ("state 4", lambda s: s.set_route_state(2, 4, 9), CatalogInvalidRouteStateError),
    ("state -1", lambda s: s.set_route_state(999, -1, 9), CatalogInvalidRouteStateError),
    ("state 256", lambda s: s.set_route_state(2, 256, 1), CatalogInvalidRouteStateError),
    ("state version str", lambda s: s.set_route_state(2, FENCED, "1"), TypeError),
    ("state version too big", lambda s: s.set_route_state(2, FENCED, 2**64), ValueError),
    ("state actor int", lambda s: s.set_route_state(2, FENCED, 1, actor=1), TypeError),
    ("move id str", lambda s: s.move_route("2", 3, 9), TypeError),
    ("move id too big", lambda s: s.move_route(2**64, 3, 9), ValueError),
    ("move group str", lambda s: s.move_route(2, "3", 9), TypeError),
    ("move group negative", lambda s: s.move_route(2, -3, 9), ValueError),
    ("move group too big", lambda s: s.move_route(2, 2**64, 9), ValueError),
    ("move group 0", lambda s: s.move_route(2, 0, 1), CatalogGroupIDRequiredError),
    ("move group 0, bad version", lambda s: s.move_route(2, 0, 9), CatalogGroupIDRequiredError),
    ("move group 0, no route", lambda s: s.move_route(999, 0, 1), CatalogGroupIDRequiredError),
    ("move version negative", lambda s: s.move_route(2, 3, -1), ValueError),
    ("move actor int", lambda s: s.move_route(2, 3, 1, actor=3), TypeError),
]


@pytest.mark.parametrize(
    ("call", "error"),
    [pytest.param(call, error, id=name) for name, call, error in BAD_ARGUMENTS],
)
def test_argument_errors_come_first_and_change_nothing(
    catalog: CatalogStore,
    database_url: str,
    call: Callable[[CatalogStore], object],
    error: type[Exception],
) -> None:
    with unchanged(catalog, database_url), pytest.raises(error):
        call(catalog)


def test_invalid_state_and_group_errors_are_value_errors() -> None:
    assert issubclass(CatalogInvalidRouteStateError, ValueError)
    assert issubclass(CatalogGroupIDRequiredError, ValueError)
    assert issubclass(CatalogRouteNotFoundError, LookupError)
    assert issubclass(CatalogRouteNotFoundError, DistributionError)
    assert not issubclass(CatalogVersionMismatchError, ValueError)


# -- split -----------------------------------------------------------------------------------------


def test_split_creates_two_children_with_the_next_ids(catalog: CatalogStore) -> None:
    assert catalog.next_route_id() == 5

    result = catalog.split_route(2, b"k", 1, actor="alice")

    left = RouteDescriptor(route_id=5, start=b"g", end=b"k", group_id=1, parent_route_id=2)
    right = RouteDescriptor(route_id=6, start=b"k", end=b"p", group_id=1, parent_route_id=2)
    assert result == CatalogWriteResult(version=2, created=(left, right), retired=(2,))
    assert all(type(route.state) is RouteState for route in result.created)
    snapshot = catalog.snapshot()
    assert snapshot.version == 2
    assert snapshot.read_ts == 2
    assert snapshot.routes == (BASE[0], left, right, BASE[2], BASE[3])
    assert catalog.version() == 2
    assert catalog.next_route_id() == 7


def test_split_of_an_unbounded_route_keeps_the_unbounded_end(catalog: CatalogStore) -> None:
    result = catalog.split_route(4, b"y\x00", 1)

    assert result.created == (
        RouteDescriptor(route_id=5, start=b"x", end=b"y\x00", group_id=2, parent_route_id=4),
        RouteDescriptor(route_id=6, start=b"y\x00", end=None, group_id=2, parent_route_id=4),
    )
    assert result.created[1].end is None
    assert result.retired == (4,)
    assert catalog.snapshot().routes[-1] == result.created[1]


def test_split_of_the_first_route_and_chained_splits(catalog: CatalogStore) -> None:
    first = catalog.split_route(1, b"\x00", 1)
    assert [(r.route_id, r.start, r.end) for r in first.created] == [
        (5, b"", b"\x00"),
        (6, b"\x00", b"g"),
    ]
    second = catalog.split_route(6, b"a", first.version)
    assert second.version == 3
    assert [(r.route_id, r.start, r.end, r.parent_route_id) for r in second.created] == [
        (7, b"\x00", b"a", 6),
        (8, b"a", b"g", 6),
    ]
    assert [r.route_id for r in catalog.snapshot().routes] == [5, 7, 8, 2, 3, 4]
    assert catalog.next_route_id() == 9


@pytest.mark.parametrize("state", list(RouteState), ids=lambda s: s.name)
def test_split_keeps_the_parent_group_and_state(catalog: CatalogStore, state: RouteState) -> None:
    version = _reach(catalog, 3, state)

    result = catalog.split_route(3, b"r", version)

    assert [route.state for route in result.created] == [state, state]
    assert [route.group_id for route in result.created] == [2, 2]
    assert [route.parent_route_id for route in result.created] == [3, 3]
    live = _live(catalog)
    assert live[result.created[0].route_id].state is state
    assert live[result.created[1].route_id].state is state


def test_split_compares_keys_as_raw_bytes(store: CatalogStore, database_url: str) -> None:
    store.save(0, [RouteDescriptor(route_id=1, start=b"\x10", end=b"\xf0", group_id=1)])

    for key in (b"\x05", b"\x0f\xff", b"\xf0\x00", b"\xff"):
        with unchanged(store, database_url), pytest.raises(CatalogInvalidSplitKeyError):
            store.split_route(1, key, 1)
    # Above 0x7f, as unsigned bytes: a signed comparison would put this outside the route.
    result = store.split_route(1, b"\x80", 1)
    assert [(r.start, r.end) for r in result.created] == [(b"\x10", b"\x80"), (b"\x80", b"\xf0")]
    # A key that extends the start by a zero byte lies strictly inside.
    result = store.split_route(2, b"\x10\x00", result.version)
    assert [(r.start, r.end) for r in result.created] == [
        (b"\x10", b"\x10\x00"),
        (b"\x10\x00", b"\x80"),
    ]


@pytest.mark.parametrize(
    ("route_id", "key"),
    [
        pytest.param(2, b"g", id="at start"),
        pytest.param(2, b"p", id="at end"),
        pytest.param(1, b"", id="at empty start"),
        pytest.param(1, b"g", id="at end of first"),
        pytest.param(4, b"x", id="at start of unbounded"),
    ],
)
def test_split_at_a_boundary_is_refused(
    catalog: CatalogStore, database_url: str, route_id: int, key: bytes
) -> None:
    with unchanged(catalog, database_url), pytest.raises(CatalogSplitKeyAtBoundaryError) as info:
        catalog.split_route(route_id, key, 1)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("route_id", "key"),
    [
        pytest.param(2, b"a", id="below start"),
        pytest.param(2, b"f\xff", id="just below start"),
        pytest.param(2, b"z", id="above end"),
        pytest.param(2, b"p\x00", id="just above end"),
        pytest.param(3, b"", id="empty key"),
        pytest.param(4, b"a", id="below start of unbounded"),
        pytest.param(4, b"w\xff\xff", id="just below start of unbounded"),
    ],
)
def test_split_key_outside_the_route_is_refused(
    catalog: CatalogStore, database_url: str, route_id: int, key: bytes
) -> None:
    with unchanged(catalog, database_url), pytest.raises(CatalogInvalidSplitKeyError) as info:
        catalog.split_route(route_id, key, 1)
    assert isinstance(info.value, ValueError)


# -- merge -----------------------------------------------------------------------------------------


def test_merge_creates_a_fresh_route(catalog: CatalogStore) -> None:
    result = catalog.merge_routes(1, 2, 1, actor="bob")

    merged = RouteDescriptor(route_id=5, start=b"", end=b"p", group_id=1, parent_route_id=1)
    assert result == CatalogWriteResult(version=2, created=(merged,), retired=(1, 2))
    assert result.created[0].state is ACTIVE
    snapshot = catalog.snapshot()
    assert snapshot.version == 2
    assert snapshot.routes == (merged, BASE[2], BASE[3])
    assert catalog.next_route_id() == 6


def test_merge_into_an_unbounded_route(store: CatalogStore) -> None:
    store.save(
        0,
        [
            RouteDescriptor(route_id=10, start=b"a", end=b"m", group_id=3),
            RouteDescriptor(route_id=20, start=b"m", end=None, group_id=3),
        ],
    )
    result = store.merge_routes(10, 20, 1)

    assert result.created == (
        RouteDescriptor(route_id=21, start=b"a", end=None, group_id=3, parent_route_id=10),
    )
    assert result.retired == (10, 20)
    assert store.snapshot().routes == result.created


def test_merge_undoes_a_split_with_new_ids(catalog: CatalogStore) -> None:
    split = catalog.split_route(2, b"k", 1)
    left, right = split.created
    merged = catalog.merge_routes(left.route_id, right.route_id, split.version)

    assert merged.created == (
        RouteDescriptor(route_id=7, start=b"g", end=b"p", group_id=1, parent_route_id=5),
    )
    assert catalog.snapshot().routes == (BASE[0], merged.created[0], BASE[2], BASE[3])
    assert catalog.next_route_id() == 8


@pytest.mark.parametrize(
    ("left", "right"),
    [
        pytest.param(2, 1, id="reversed"),
        pytest.param(1, 1, id="same route"),
        pytest.param(4, 4, id="same unbounded route"),
        pytest.param(1, 3, id="not neighbours"),
        pytest.param(3, 4, id="gap between"),
        pytest.param(4, 3, id="gap reversed"),
        pytest.param(4, 1, id="unbounded left"),
    ],
)
def test_merge_of_routes_that_are_not_adjacent_is_refused(
    catalog: CatalogStore, database_url: str, left: int, right: int
) -> None:
    with unchanged(catalog, database_url), pytest.raises(CatalogRoutesNotAdjacentError) as info:
        catalog.merge_routes(left, right, 1)
    assert isinstance(info.value, ValueError)


def test_merge_across_groups_is_refused(catalog: CatalogStore, database_url: str) -> None:
    with unchanged(catalog, database_url), pytest.raises(CatalogRouteGroupMismatchError):
        catalog.merge_routes(2, 3, 1)


def test_merge_checks_adjacency_then_group_then_state(
    catalog: CatalogStore, database_url: str
) -> None:
    version = _reach(catalog, 3, FENCED)
    # Not adjacent and of different groups: adjacency first.
    with unchanged(catalog, database_url), pytest.raises(CatalogRoutesNotAdjacentError):
        catalog.merge_routes(1, 3, version)
    # Different groups and one of them fenced: the group first.
    with unchanged(catalog, database_url), pytest.raises(CatalogRouteGroupMismatchError):
        catalog.merge_routes(2, 3, version)


@pytest.mark.parametrize("state", [FENCED, SOURCE, TARGET], ids=lambda s: s.name)
@pytest.mark.parametrize("which", ["left", "right"])
def test_merge_of_a_route_that_is_not_active_is_refused(
    catalog: CatalogStore, database_url: str, state: RouteState, which: str
) -> None:
    version = _reach(catalog, 1 if which == "left" else 2, state)
    with unchanged(catalog, database_url), pytest.raises(CatalogRouteNotActiveError):
        catalog.merge_routes(1, 2, version)


# -- set_route_state -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new"),
    list(itertools.product(RouteState, RouteState)),
    ids=lambda s: s.name,
)
def test_state_transition_matrix(
    catalog: CatalogStore, database_url: str, old: RouteState, new: RouteState
) -> None:
    version = _reach(catalog, 2, old)
    next_id = catalog.next_route_id()
    if (old, new) in ALLOWED_TRANSITIONS:
        result = catalog.set_route_state(2, new, version, actor="ops")
        expected = BASE[1]._replace(state=new)
        assert result == CatalogWriteResult(version=version + 1, created=(expected,), retired=())
        assert result.created[0].state is new
        assert _live(catalog)[2] == expected
        assert catalog.version() == version + 1
        assert catalog.next_route_id() == next_id
    else:
        with unchanged(catalog, database_url), pytest.raises(CatalogInvalidStateTransitionError):
            catalog.set_route_state(2, new, version)
        assert _live(catalog)[2].state is old


def test_set_route_state_accepts_plain_ints(catalog: CatalogStore) -> None:
    result = catalog.set_route_state(2, 1, 1)
    assert result.created[0].state is FENCED


def test_fencing_keeps_the_parent_link(catalog: CatalogStore) -> None:
    left, _ = catalog.split_route(2, b"k", 1).created
    result = catalog.set_route_state(left.route_id, FENCED, 2)
    assert result.created == (left._replace(state=FENCED),)
    assert result.created[0].parent_route_id == 2


# -- move_route ------------------------------------------------------------------------------------


def test_move_a_fenced_route_keeps_its_id(catalog: CatalogStore) -> None:
    version = _reach(catalog, 2, FENCED)

    result = catalog.move_route(2, 7, version, actor="mover")

    moved = BASE[1]._replace(group_id=7, state=FENCED)
    assert result == CatalogWriteResult(version=version + 1, created=(moved,), retired=())
    assert _live(catalog)[2] == moved
    assert catalog.next_route_id() == 5
    # The whole cutover: fence, move, unfence.
    done = catalog.set_route_state(2, ACTIVE, result.version)
    assert done.created == (BASE[1]._replace(group_id=7),)


def test_move_to_a_large_group_id(catalog: CatalogStore) -> None:
    version = _reach(catalog, 4, FENCED)
    result = catalog.move_route(4, U64_MAX, version)
    assert result.created[0].group_id == U64_MAX
    assert _live(catalog)[4].group_id == U64_MAX


@pytest.mark.parametrize("state", [ACTIVE, SOURCE, TARGET], ids=lambda s: s.name)
def test_move_of_a_route_that_is_not_fenced_is_refused(
    catalog: CatalogStore, database_url: str, state: RouteState
) -> None:
    version = _reach(catalog, 2, state)
    with unchanged(catalog, database_url), pytest.raises(CatalogRouteNotFencedError) as info:
        catalog.move_route(2, 7, version)
    assert isinstance(info.value, ValueError)


# -- version, existence, overflow ------------------------------------------------------------------

OPERATIONS: list[tuple[str, Callable[[CatalogStore, int], object]]] = [
    ("split", lambda s, v: s.split_route(2, b"k", v)),
    ("merge", lambda s, v: s.merge_routes(1, 2, v)),
    ("set_route_state", lambda s, v: s.set_route_state(2, FENCED, v)),
    ("move", lambda s, v: s.move_route(2, 7, v)),
]
MISSING: list[tuple[str, Callable[[CatalogStore, int], object]]] = [
    ("split", lambda s, v: s.split_route(99, b"k", v)),
    ("merge left", lambda s, v: s.merge_routes(99, 2, v)),
    ("merge right", lambda s, v: s.merge_routes(1, 99, v)),
    ("merge both", lambda s, v: s.merge_routes(98, 99, v)),
    ("set_route_state", lambda s, v: s.set_route_state(99, FENCED, v)),
    ("move", lambda s, v: s.move_route(99, 7, v)),
    ("split id 0", lambda s, v: s.split_route(0, b"k", v)),
    ("split max id", lambda s, v: s.split_route(U64_MAX, b"k", v)),
]


def _operation_params(
    table: list[tuple[str, Callable[[CatalogStore, int], object]]],
) -> list[Any]:
    return [pytest.param(call, id=name) for name, call in table]


@pytest.mark.parametrize("call", _operation_params(OPERATIONS))
@pytest.mark.parametrize("expected", [0, 2, 3, U64_MAX])
def test_version_mismatch_changes_nothing(
    catalog: CatalogStore,
    database_url: str,
    call: Callable[[CatalogStore, int], object],
    expected: int,
) -> None:
    with unchanged(catalog, database_url), pytest.raises(CatalogVersionMismatchError) as info:
        call(catalog, expected)
    assert not isinstance(info.value, ValueError)


@pytest.mark.parametrize("call", _operation_params(MISSING))
def test_missing_route_is_not_found(
    catalog: CatalogStore, database_url: str, call: Callable[[CatalogStore, int], object]
) -> None:
    with unchanged(catalog, database_url), pytest.raises(CatalogRouteNotFoundError) as info:
        call(catalog, 1)
    assert isinstance(info.value, LookupError)


@pytest.mark.parametrize("call", _operation_params(MISSING))
def test_version_is_checked_before_existence(
    catalog: CatalogStore, database_url: str, call: Callable[[CatalogStore, int], object]
) -> None:
    with unchanged(catalog, database_url), pytest.raises(CatalogVersionMismatchError):
        call(catalog, 7)


def test_an_empty_catalog_has_no_routes_to_operate_on(
    store: CatalogStore, database_url: str
) -> None:
    for _, call in OPERATIONS:
        with unchanged(store, database_url), pytest.raises(CatalogRouteNotFoundError):
            call(store, 0)
        with unchanged(store, database_url), pytest.raises(CatalogVersionMismatchError):
            call(store, 1)


def test_retired_routes_are_not_found(catalog: CatalogStore, database_url: str) -> None:
    split = catalog.split_route(2, b"k", 1)
    merged = catalog.merge_routes(1, split.created[0].route_id, split.version)
    v = merged.version
    for call in (
        lambda: catalog.split_route(2, b"h", v),
        lambda: catalog.merge_routes(1, 5, v),
        lambda: catalog.merge_routes(2, 3, v),
        lambda: catalog.set_route_state(2, FENCED, v),
        lambda: catalog.move_route(1, 7, v),
    ):
        with unchanged(catalog, database_url), pytest.raises(CatalogRouteNotFoundError):
            call()


def test_preconditions_are_checked_after_existence(
    catalog: CatalogStore, database_url: str
) -> None:
    # A missing right route with a non-adjacent, other-group left route: not found wins.
    with unchanged(catalog, database_url), pytest.raises(CatalogRouteNotFoundError):
        catalog.merge_routes(3, 99, 1)
    # A wrong version with a boundary split key: the version wins.
    with unchanged(catalog, database_url), pytest.raises(CatalogVersionMismatchError):
        catalog.split_route(2, b"g", 2)
    # A wrong version with a forbidden transition and an unfenced move.
    with unchanged(catalog, database_url), pytest.raises(CatalogVersionMismatchError):
        catalog.set_route_state(2, TARGET, 0)
    with unchanged(catalog, database_url), pytest.raises(CatalogVersionMismatchError):
        catalog.move_route(2, 7, 0)


@pytest.mark.parametrize("call", _operation_params(OPERATIONS))
def test_version_overflow_changes_nothing(
    catalog: CatalogStore,
    database_url: str,
    unguarded: Callable[..., None],
    call: Callable[[CatalogStore, int], object],
) -> None:
    # Route 2 fenced and route 1 active: every operation would succeed but for the version.
    catalog.set_route_state(3, FENCED, 1)
    unguarded("UPDATE distribution_meta SET version = %s", [u64_to_db(U64_MAX)])
    if call is OPERATIONS[3][1]:
        unguarded(
            "UPDATE distribution_routes SET state = 1 WHERE valid_to IS NULL AND route_id = %s",
            [u64_to_db(2)],
        )
    assert catalog.version() == U64_MAX

    with unchanged(catalog, database_url), pytest.raises(CatalogVersionOverflowError) as info:
        call(catalog, U64_MAX)
    assert not isinstance(info.value, ValueError)
    # One below the last version is just a mismatch.
    with unchanged(catalog, database_url), pytest.raises(CatalogVersionMismatchError):
        call(catalog, U64_MAX - 1)


def test_the_last_version_can_be_written_once(
    catalog: CatalogStore, database_url: str, unguarded: Callable[..., None]
) -> None:
    unguarded("UPDATE distribution_meta SET version = %s", [u64_to_db(U64_MAX - 1)])
    result = catalog.split_route(2, b"k", U64_MAX - 1)
    assert result.version == U64_MAX
    assert catalog.snapshot().version == U64_MAX
    assert catalog.history(since=U64_MAX - 1)[0].version == U64_MAX
    with unchanged(catalog, database_url), pytest.raises(CatalogVersionOverflowError):
        catalog.split_route(5, b"h", U64_MAX)


def test_route_id_overflow_changes_nothing(
    catalog: CatalogStore, database_url: str, unguarded: Callable[..., None]
) -> None:
    unguarded("UPDATE distribution_meta SET next_route_id = %s", [u64_to_db(2**64 - 2)])
    assert catalog.next_route_id() == 2**64 - 2

    # A split needs two ids, the second of which would leave no next id.
    with unchanged(catalog, database_url), pytest.raises(CatalogRouteIDOverflowError) as info:
        catalog.split_route(2, b"k", 1)
    assert not isinstance(info.value, ValueError)

    # A merge needs one: it gets 2**64 - 2, and the counter reaches its last value.
    merged = catalog.merge_routes(1, 2, 1)
    assert merged.created[0].route_id == 2**64 - 2
    assert catalog.next_route_id() == 2**64 - 1

    # Operations that allocate no id still work: bring route 3 into group 1 (fence, move, unfence).
    version = catalog.set_route_state(3, FENCED, merged.version).version
    version = catalog.move_route(3, 1, version).version
    version = catalog.set_route_state(3, ACTIVE, version).version

    # Nothing is left to allocate: id 2**64 - 1 would leave the counter past the last u64.
    with unchanged(catalog, database_url), pytest.raises(CatalogRouteIDOverflowError):
        catalog.split_route(3, b"r", version)
    with unchanged(catalog, database_url), pytest.raises(CatalogRouteIDOverflowError):
        catalog.split_route(2**64 - 2, b"a", version)
    with unchanged(catalog, database_url), pytest.raises(CatalogRouteIDOverflowError):
        catalog.merge_routes(2**64 - 2, 3, version)


# -- concurrency -----------------------------------------------------------------------------------


def _race(calls: list[Callable[[], CatalogWriteResult]]) -> list[Any]:
    """Run ``calls`` on threads released together by a barrier; return results or errors."""
    barrier = threading.Barrier(len(calls), timeout=30)
    outcomes: list[Any] = [None] * len(calls)

    def run(index: int) -> None:
        barrier.wait()
        try:
            outcomes[index] = calls[index]()
        except Exception as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    return outcomes


def test_concurrent_splits_from_one_version_let_exactly_one_win(
    catalog: CatalogStore, database_url: str
) -> None:
    rounds = 6
    stores = [CatalogStore.from_url(database_url) for _ in range(2)]
    try:
        target = 4  # the unbounded route; each round splits the winner's right child further
        for round_number in range(rounds):
            version = catalog.version()
            next_id = catalog.next_route_id()
            history = len(catalog.history())
            outcomes = _race(
                [
                    partial(s.split_route, target, b"y" + bytes([round_number, i]), version)
                    for i, s in enumerate(stores)
                ]
            )

            wins = [o for o in outcomes if isinstance(o, CatalogWriteResult)]
            losses = [o for o in outcomes if isinstance(o, CatalogVersionMismatchError)]
            assert len(wins) == 1, outcomes
            assert len(losses) == 1, outcomes
            (won,) = wins
            assert won.version == version + 1
            assert [r.route_id for r in won.created] == [next_id, next_id + 1]
            snapshot = catalog.snapshot()
            assert snapshot.version == version + 1
            assert set(won.created) <= set(snapshot.routes)
            assert target not in {r.route_id for r in snapshot.routes}
            assert catalog.next_route_id() == next_id + 2
            assert len(catalog.history()) == history + 1
            assert len(_raw_rows(database_url)) == len(BASE) + 2 * (round_number + 1)
            target = won.created[1].route_id
    finally:
        for s in stores:
            s.close()


def test_concurrent_different_operations_from_one_version_let_exactly_one_win(
    catalog: CatalogStore, database_url: str
) -> None:
    stores = [CatalogStore.from_url(database_url) for _ in range(3)]
    try:
        outcomes = _race(
            [
                partial(stores[0].split_route, 3, b"r", 1),
                partial(stores[1].merge_routes, 1, 2, 1),
                partial(stores[2].set_route_state, 4, FENCED, 1),
            ]
        )
    finally:
        for s in stores:
            s.close()
    wins = [o for o in outcomes if isinstance(o, CatalogWriteResult)]
    assert len(wins) == 1, outcomes
    assert sum(isinstance(o, CatalogVersionMismatchError) for o in outcomes) == 2, outcomes
    assert catalog.version() == 2
    assert len(catalog.history()) == 2


# -- ids are never reused --------------------------------------------------------------------------


def test_route_ids_are_never_reused(store: CatalogStore, database_url: str) -> None:
    created: list[int] = []
    seen: set[int] = set()

    def record(result: CatalogWriteResult) -> int:
        ids = [route.route_id for route in result.created]
        assert not seen & set(ids), f"ids {ids} were seen before"
        created.extend(ids)
        seen.update(ids)
        assert store.next_route_id() > max(seen)
        return result.version

    snapshot = store.save(0, [RouteDescriptor(route_id=1, start=b"", end=None, group_id=1)])
    seen.add(1)
    v = snapshot.version
    v = record(store.split_route(1, b"m", v))  # 2, 3
    v = record(store.split_route(3, b"t", v))  # 4, 5
    v = record(store.split_route(2, b"f", v))  # 6, 7
    v = record(store.merge_routes(7, 4, v))  # 8
    v = record(store.merge_routes(6, 8, v))  # 9
    assert store.next_route_id() == 10

    # A whole-catalog save that drops the routes with the highest ids (9 and 5)...
    v = store.save(v, [RouteDescriptor(route_id=1, start=b"", end=b"z", group_id=1)]).version
    assert store.next_route_id() == 10
    v = record(store.split_route(1, b"k", v))
    assert created[-2:] == [10, 11]

    # ...a save that empties the catalog, then one that reuses a low id by the caller's choice...
    v = store.save(v, []).version
    v = store.save(v, [RouteDescriptor(route_id=2, start=b"a", end=None, group_id=1)]).version
    assert store.next_route_id() == 12
    v = record(store.split_route(2, b"q", v))
    assert created[-2:] == [12, 13]

    # ...and history pruned away: the counter alone still remembers every id.
    store.prune_history(keep_versions=1)
    v = record(store.merge_routes(12, 13, v))
    v = record(store.split_route(14, b"c", v))
    assert created[-3:] == [14, 15, 16]

    assert len(created) == len(set(created))
    assert store.next_route_id() > max(seen)
    # Every id ever stored (the retired ones still in history included) is below the counter.
    assert max(u64_from_db(row[0]) for row in _raw_rows(database_url)) < store.next_route_id()


# -- the database guards itself --------------------------------------------------------------------


def _begin_write(connection: psycopg.Connection[Any]) -> None:
    """Move the version in ``connection``'s transaction, as every write must: raw SQL after it
    passes the database's guards and meets every other rule."""
    connection.execute("SELECT distribution_begin_write(version) FROM distribution_meta")


def _insert_live(
    connection: psycopg.Connection[Any],
    route_id: int,
    start: bytes,
    end: bytes | None,
    group_id: int = 1,
) -> None:
    """Insert a live route with raw SQL, as a write of its own (it moves the version)."""
    _begin_write(connection)
    connection.execute(
        "INSERT INTO distribution_routes "
        '(route_id, start, "end", group_id, state, parent_route_id, valid_from) '
        "SELECT %s, %s, %s, %s, 0, %s, version FROM distribution_meta",
        [u64_to_db(route_id), start, end, u64_to_db(group_id), u64_to_db(0)],
    )


@pytest.mark.parametrize(
    ("start", "end"),
    [
        pytest.param(b"h", b"k", id="inside a route"),
        pytest.param(b"f", b"h", id="across a boundary"),
        pytest.param(b"s", b"u", id="into a gap from a route"),
        pytest.param(b"u", b"y", id="from a gap into a route"),
        pytest.param(b"u", None, id="unbounded over the last"),
        pytest.param(b"\x00", b"z", id="over several routes"),
        pytest.param(b"y", b"z", id="inside the unbounded route"),
    ],
)
def test_the_database_refuses_overlapping_raw_inserts(
    catalog: CatalogStore, database_url: str, start: bytes, end: bytes | None
) -> None:
    with unchanged(catalog, database_url), psycopg.connect(database_url) as connection:
        with pytest.raises(psycopg.errors.ExclusionViolation) as info:
            _insert_live(connection, 100, start, end)
        assert info.value.diag.constraint_name == "distribution_routes_no_overlap"
        connection.rollback()


def test_the_database_refuses_an_overlapping_raw_update(
    catalog: CatalogStore, database_url: str
) -> None:
    with unchanged(catalog, database_url), psycopg.connect(database_url) as connection:
        _begin_write(connection)
        with pytest.raises(psycopg.errors.ExclusionViolation):
            connection.execute(
                'UPDATE distribution_routes SET "end" = %s '
                "WHERE route_id = %s AND valid_to IS NULL",
                [b"q", u64_to_db(2)],
            )
        connection.rollback()


def test_the_database_refuses_two_overlapping_rows_in_one_raw_statement(
    catalog: CatalogStore, database_url: str
) -> None:
    with unchanged(catalog, database_url), psycopg.connect(database_url) as connection:
        _begin_write(connection)
        with pytest.raises(psycopg.errors.ExclusionViolation):
            connection.execute(
                "INSERT INTO distribution_routes "
                '(route_id, start, "end", group_id, state, parent_route_id, valid_from) '
                "SELECT v.id, v.s, v.e, %(g)s, 0, %(g)s, m.version FROM distribution_meta m, "
                "(VALUES (%(a)s::bigint, 'ua'::bytea, 'uz'::bytea), "
                "(%(b)s::bigint, 'uc'::bytea, 'ud'::bytea)) AS v(id, s, e)",
                {"g": u64_to_db(1), "a": u64_to_db(100), "b": u64_to_db(101)},
            )
        connection.rollback()


def test_a_raw_route_above_the_counter_is_not_reused(
    catalog: CatalogStore, database_url: str
) -> None:
    with psycopg.connect(database_url) as connection:
        _insert_live(connection, 50, b"t", b"x", group_id=2)  # fills the gap exactly
    assert catalog.next_route_id() == 5
    assert _live(catalog)[50] == RouteDescriptor(route_id=50, start=b"t", end=b"x", group_id=2)

    result = catalog.split_route(2, b"k", 2)
    assert [route.route_id for route in result.created] == [51, 52]
    assert catalog.next_route_id() == 53
    merged = catalog.merge_routes(3, 50, result.version)
    assert merged.created[0].route_id == 53
    assert merged.created[0].end == b"x"


# -- audit trail -----------------------------------------------------------------------------------


def test_every_write_is_in_the_history(store: CatalogStore) -> None:
    started = datetime.datetime.now(datetime.UTC)
    store.save(0, BASE, actor="seeder")
    store.split_route(2, b"k", 1, actor="alice")  # 5, 6
    store.merge_routes(1, 5, 2)  # no actor: 7
    store.set_route_state(3, FENCED, 3, actor="bob")
    store.move_route(3, 9, 4, actor="carol")
    store.set_route_state(3, ACTIVE, 5, actor="carol")
    # Keeps the merged route as it is (its parent included): only the others are retired.
    kept = RouteDescriptor(route_id=7, start=b"", end=b"k", group_id=1, parent_route_id=1)
    store.save(6, [kept], actor="dave")

    history = store.history()
    assert [(e.version, e.operation, e.actor) for e in history] == [
        (1, "save", "seeder"),
        (2, "split_route", "alice"),
        (3, "merge_routes", None),
        (4, "set_route_state", "bob"),
        (5, "move_route", "carol"),
        (6, "set_route_state", "carol"),
        (7, "save", "dave"),
    ]
    assert [e.arguments for e in history] == [
        {"routes": 4, "opened": 4, "retired": 0},
        {"route_id": 2, "split_key": b"k".hex()},
        {"left_route_id": 1, "right_route_id": 5},
        {"route_id": 3, "from": 0, "to": 1},
        {"route_id": 3, "from_group": 2, "to_group": 9},
        {"route_id": 3, "from": 1, "to": 0},
        {"routes": 1, "opened": 0, "retired": 3},
    ]
    finished = datetime.datetime.now(datetime.UTC)
    slack = datetime.timedelta(minutes=5)
    times = [e.committed_at for e in history]
    assert all(t.tzinfo is not None for t in times)
    assert times == sorted(times)
    assert started - slack <= times[0] and times[-1] <= finished + slack

    assert [e.version for e in store.history(since=4)] == [5, 6, 7]
    assert store.history(since=7) == []
    assert [e.version for e in store.history(since=0, limit=2)] == [1, 2]
    assert store.history(since=3)[0] == history[3]


def test_history_records_large_ids_exactly(
    catalog: CatalogStore, unguarded: Callable[..., None]
) -> None:
    version = _reach(catalog, 2, FENCED)
    catalog.move_route(2, U64_MAX, version)
    (entry,) = catalog.history(since=version)
    assert entry.arguments == {"route_id": 2, "from_group": 1, "to_group": U64_MAX}
    unguarded("UPDATE distribution_meta SET next_route_id = %s", [u64_to_db(2**63 + 3)])
    split = catalog.split_route(3, b"r", version + 1, actor="big")
    assert [r.route_id for r in split.created] == [2**63 + 3, 2**63 + 4]
    assert catalog.history(since=version + 1)[0].arguments == {"route_id": 3, "split_key": "72"}


def test_failed_operations_leave_no_history(catalog: CatalogStore) -> None:
    for call in (
        lambda: catalog.split_route(2, b"g", 1),
        lambda: catalog.merge_routes(2, 3, 1),
        lambda: catalog.set_route_state(2, SOURCE, 1),
        lambda: catalog.move_route(2, 3, 1),
        lambda: catalog.split_route(2, b"k", 0),
    ):
        with pytest.raises(DistributionError):
            call()
    assert [e.operation for e in catalog.history()] == ["save"]


# -- notifications ---------------------------------------------------------------------------------


@pytest.fixture
def listener(catalog: CatalogStore, database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection listening on the catalog's channel, from after the catalog's first save."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
        yield connection


def _next_payload(listener: psycopg.Connection[Any]) -> tuple[int, dict[str, Any]]:
    notifies = list(listener.notifies(timeout=10, stop_after=1))
    assert len(notifies) == 1, notifies
    assert notifies[0].channel == NOTIFY_CHANNEL
    head, _, body = notifies[0].payload.partition(" ")
    return int(head), json.loads(body)


def _decoded(upserts: list[str]) -> list[RouteDescriptor]:
    return [decode_route_descriptor(base64.b64decode(record, validate=True)) for record in upserts]


def test_every_operation_notifies_its_change(
    catalog: CatalogStore, listener: psycopg.Connection[Any]
) -> None:
    operations: list[Callable[[], CatalogWriteResult]] = [
        lambda: catalog.split_route(2, b"k", 1),
        lambda: catalog.merge_routes(1, 5, 2),
        lambda: catalog.set_route_state(6, FENCED, 3),
        lambda: catalog.move_route(6, 11, 4),
        lambda: catalog.split_route(4, b"z", 5),
    ]
    for operation in operations:
        result = operation()
        version, change = _next_payload(listener)
        assert version == result.version
        assert change["previous"] == result.version - 1
        assert _decoded(change["upserts"]) == list(result.created)
        expected_deletes = sorted(set(result.retired) - {r.route_id for r in result.created})
        assert change["deletes"] == expected_deletes
        # The change feed tells the same story.
        (feed,) = catalog.changes_since(result.version - 1).changes
        assert feed.upserts == result.created
        assert sorted(feed.deletes) == expected_deletes
    # Nothing else was sent.
    assert list(listener.notifies(timeout=0.2)) == []


def test_every_write_announces_and_records_the_digest_it_left(
    catalog: CatalogStore, listener: psycopg.Connection[Any]
) -> None:
    """The payload of each kind of write, and its entry in the change feed, carry the catalog's
    route digest after that write: as the database keeps it, and as the routes hash."""
    many = [RouteDescriptor(20 + i, bytes([i]), None, 3) for i in range(40)]
    many[-1] = RouteDescriptor(route_id=59, start=bytes([39]), end=None, group_id=3)
    many = [
        RouteDescriptor(route_id=r.route_id, start=r.start, end=n.start, group_id=3)
        for r, n in itertools.pairwise(many)
    ] + [many[-1]]
    writes: list[Callable[[int], int]] = [
        lambda v: catalog.split_route(2, b"k", v).version,
        lambda v: catalog.merge_routes(1, 5, v).version,
        lambda v: catalog.set_route_state(6, FENCED, v).version,
        lambda v: catalog.move_route(6, 11, v).version,
        # A save that sends only what changed, then one that sends every route.
        lambda v: catalog.save(v, catalog.snapshot().routes[1:]).version,
        lambda v: catalog.save(v, many).version,
        # And one that empties the catalog: the digest of nothing.
        lambda v: catalog.save(v, []).version,
    ]
    version = 1
    for write in writes:
        version = write(version)
        head = catalog.head()
        assert head.version == version
        payload_version, change = _next_payload(listener)
        assert payload_version == version
        assert isinstance(change["digest"], int)
        assert change["digest"] == head.digest
        assert head.digest == routes_digest(catalog.snapshot().routes)
        (feed,) = catalog.changes_since(version - 1).changes
        assert feed.digest == head.digest
    assert catalog.head().digest == 0
    # The whole feed, read at once, gives each version its own digest.
    digests = [c.digest for c in catalog.changes_since(1).changes]
    assert len(set(digests)) == len(writes)


def test_split_notification_payload(
    catalog: CatalogStore, listener: psycopg.Connection[Any]
) -> None:
    catalog.split_route(2, b"k", 1)
    version, change = _next_payload(listener)
    assert version == 2
    assert change["deletes"] == [2]
    assert _decoded(change["upserts"]) == [
        RouteDescriptor(route_id=5, start=b"g", end=b"k", group_id=1, parent_route_id=2),
        RouteDescriptor(route_id=6, start=b"k", end=b"p", group_id=1, parent_route_id=2),
    ]


def test_a_change_too_large_to_carry_is_announced_by_its_version_alone(
    catalog: CatalogStore, listener: psycopg.Connection[Any], database_url: str
) -> None:
    # NOTIFY payloads stop at 8000 bytes: two children holding a 5000-byte key do not fit. The
    # library refuses such a key (MAX_ROUTE_KEY_BYTES): it comes from a client without the limit,
    # straight to the server function.
    key = b"k" * 5000
    with psycopg.connect(database_url) as connection:
        rows = connection.execute(
            statements.operation("distribution_split_route"),
            [u64_to_db(2), key, u64_to_db(1), None],
        ).fetchall()
    version = u64_from_db(rows[0][0])
    notifies = list(listener.notifies(timeout=10, stop_after=1))
    assert [n.payload for n in notifies] == [str(version)]
    assert [r.end for r in _live(catalog).values() if r.route_id == 5] == [key]


def test_failed_operations_do_not_notify(
    catalog: CatalogStore, listener: psycopg.Connection[Any]
) -> None:
    for call in (
        lambda: catalog.split_route(2, b"g", 1),
        lambda: catalog.split_route(2, b"k", 5),
        lambda: catalog.merge_routes(2, 3, 1),
        lambda: catalog.move_route(2, 3, 1),
    ):
        with pytest.raises(DistributionError):
            call()
    assert list(listener.notifies(timeout=0.3)) == []


# -- an operation touches O(1) rows ----------------------------------------------------------------


def test_a_split_touches_only_its_own_rows(store: CatalogStore, database_url: str) -> None:
    count = 2000
    routes = [
        RouteDescriptor(
            route_id=i + 1,
            start=b"" if i == 0 else i.to_bytes(4, "big"),
            end=None if i == count - 1 else (i + 1).to_bytes(4, "big"),
            group_id=1 + i % 7,
        )
        for i in range(count)
    ]
    store.save(0, routes)
    live_xmin = """SELECT route_id, xmin::text FROM distribution_routes WHERE valid_to IS NULL"""
    with psycopg.connect(database_url) as connection:
        before = dict(connection.execute(live_xmin).fetchall())
        rows_before = connection.execute("SELECT count(*) FROM distribution_routes").fetchone()
    assert len(before) == count

    parent = routes[1000]
    result = store.split_route(parent.route_id, parent.start + b"\x80", 1)

    written = u64_to_db(result.version)
    with psycopg.connect(database_url) as connection:
        closed = connection.execute(
            "SELECT route_id FROM distribution_routes WHERE valid_to = %s", [written]
        ).fetchall()
        opened = connection.execute(
            "SELECT route_id FROM distribution_routes WHERE valid_from = %s ORDER BY route_id",
            [written],
        ).fetchall()
        after = dict(connection.execute(live_xmin).fetchall())
        rows_after = connection.execute("SELECT count(*) FROM distribution_routes").fetchone()
    assert [u64_from_db(r[0]) for r in closed] == [parent.route_id]
    assert [u64_from_db(r[0]) for r in opened] == [count + 1, count + 2]
    assert rows_before is not None and rows_after is not None
    assert rows_after[0] == rows_before[0] + 2
    untouched = {k: v for k, v in before.items() if k != u64_to_db(parent.route_id)}
    assert {k: after[k] for k in untouched} == untouched
    assert len(after) == count + 1

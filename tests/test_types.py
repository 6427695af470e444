"""Tests of the immutable values and their validation (``distribution.types``)."""

from __future__ import annotations

import dataclasses
import enum
import inspect
import itertools
import random
from typing import Any

import pytest

from distribution import (
    UINT64_MAX,
    CatalogChange,
    CatalogChangeSet,
    CatalogGroupIDRequiredError,
    CatalogInvalidRouteRangeError,
    CatalogInvalidRouteStateError,
    CatalogRouteIDRequiredError,
    CatalogSnapshot,
    CatalogWriteResult,
    DistributionError,
    Route,
    RouteDescriptor,
    RouteState,
    validate_route_descriptor,
)
from distribution.types import (
    check_key,
    check_u64,
    route_columns,
    sorted_route_table,
    validate_route_table,
)

GOOD = RouteDescriptor(route_id=1, start=b"a", end=b"m", group_id=2)


def loose(value: object) -> Any:
    """Pass a deliberately wrong value past the type checker."""
    return value


def field_names(cls: type) -> list[str]:
    return list(inspect.signature(cls).parameters)


# --------------------------------------------------------------------------------------------
# RouteState
# --------------------------------------------------------------------------------------------


def test_route_state_values() -> None:
    assert issubclass(RouteState, enum.IntEnum)
    assert {s.name: s.value for s in RouteState} == {
        "ACTIVE": 0,
        "WRITE_FENCED": 1,
        "MIGRATING_SOURCE": 2,
        "MIGRATING_TARGET": 3,
    }
    with pytest.raises(ValueError):
        RouteState(4)


# --------------------------------------------------------------------------------------------
# RouteDescriptor and the other values
# --------------------------------------------------------------------------------------------


class TestRouteDescriptor:
    def test_fields_in_spec_order(self) -> None:
        assert field_names(RouteDescriptor) == [
            "route_id",
            "start",
            "end",
            "group_id",
            "state",
            "parent_route_id",
        ]

    def test_keyword_construction_and_defaults(self) -> None:
        route = RouteDescriptor(route_id=7, start=b"a", end=None, group_id=3)
        assert route.route_id == 7
        assert route.start == b"a"
        assert route.end is None
        assert route.group_id == 3
        assert route.state is RouteState.ACTIVE
        assert route.parent_route_id == 0
        full = RouteDescriptor(
            route_id=7,
            start=b"a",
            end=b"b",
            group_id=3,
            state=RouteState.WRITE_FENCED,
            parent_route_id=2,
        )
        assert (full.state, full.parent_route_id) == (RouteState.WRITE_FENCED, 2)

    def test_required_fields(self) -> None:
        with pytest.raises(TypeError):
            RouteDescriptor(route_id=1, start=b"", end=None)  # type: ignore[call-arg]

    def test_frozen(self) -> None:
        for name in field_names(RouteDescriptor):
            with pytest.raises(AttributeError):
                setattr(GOOD, name, getattr(GOOD, name))
        assert RouteDescriptor(route_id=1, start=b"a", end=b"m", group_id=2) == GOOD

    def test_hashable_and_compared_by_value(self) -> None:
        same = RouteDescriptor(route_id=1, start=b"a", end=b"m", group_id=2, state=loose(0))
        assert same == GOOD
        assert hash(same) == hash(GOOD)
        assert len({GOOD, same, GOOD._replace(group_id=3)}) == 2
        assert {GOOD: "x"}[same] == "x"
        assert GOOD._replace(end=None) != GOOD
        assert GOOD._replace(parent_route_id=1) != GOOD

    def test_construction_does_not_validate(self) -> None:
        # An invalid descriptor can exist, e.g. to be rejected by an encoder.
        bad = RouteDescriptor(route_id=0, start=b"z", end=b"a", group_id=0, state=loose(4))
        assert bad.state == 4
        assert bad.route_id == 0


def test_route_fields_and_immutability() -> None:
    assert field_names(Route) == ["route_id", "start", "end", "group_id", "state", "load"]
    route = Route(route_id=0, start=b"", end=None, group_id=1, state=RouteState.ACTIVE, load=0)
    with pytest.raises(AttributeError):
        route.load = 1  # type: ignore[misc]
    assert hash(route) == hash(Route(0, b"", None, 1, RouteState.ACTIVE, 0))


def test_catalog_snapshot() -> None:
    assert field_names(CatalogSnapshot) == ["version", "routes", "read_ts", "digest"]
    snap = CatalogSnapshot(version=3, routes=(GOOD,))
    assert snap.read_ts == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.version = 4  # type: ignore[misc]
    assert snap == CatalogSnapshot(version=3, routes=(GOOD,), read_ts=0)
    assert hash(snap) == hash(CatalogSnapshot(version=3, routes=(GOOD,), read_ts=0))


def test_change_values() -> None:
    assert field_names(CatalogChange) == [
        "previous_version",
        "version",
        "upserts",
        "deletes",
        "digest",
    ]
    change = CatalogChange(previous_version=1, version=2, upserts=(GOOD,), deletes=(5,))
    with pytest.raises(AttributeError):
        change.version = 3  # type: ignore[misc]
    empty = CatalogChangeSet()
    assert empty.changes == ()
    assert empty.reset is None
    assert field_names(CatalogWriteResult) == ["version", "created", "retired"]
    result = CatalogWriteResult(version=2, created=(GOOD,), retired=(1,))
    assert hash(result) == hash(CatalogWriteResult(version=2, created=(GOOD,), retired=(1,)))


# --------------------------------------------------------------------------------------------
# validate_route_descriptor
# --------------------------------------------------------------------------------------------

#: The validity checks in SPEC order, each with the change that breaks it and the error it raises.
FAULTS: list[tuple[str, dict[str, Any], type[DistributionError]]] = [
    ("route_id", {"route_id": 0}, CatalogRouteIDRequiredError),
    ("group_id", {"group_id": 0}, CatalogGroupIDRequiredError),
    ("state", {"state": 9}, CatalogInvalidRouteStateError),
    ("range", {"start": b"z", "end": b"a"}, CatalogInvalidRouteRangeError),
]

FAULT_COMBINATIONS = [
    pytest.param(combo, id="+".join(name for name, _, _ in combo))
    for size in range(1, len(FAULTS) + 1)
    for combo in itertools.combinations(FAULTS, size)
]


@pytest.mark.parametrize("combo", FAULT_COMBINATIONS)
def test_first_fault_in_spec_order_wins(
    combo: tuple[tuple[str, dict[str, Any], type[DistributionError]], ...],
) -> None:
    changes: dict[str, Any] = {}
    for _, change, _ in combo:
        changes.update(change)
    expected = combo[0][2]
    with pytest.raises(expected) as excinfo:
        validate_route_descriptor(GOOD._replace(**changes))
    assert type(excinfo.value) is expected


@pytest.mark.parametrize(
    ("start", "end"),
    [(b"a", b"a"), (b"b", b"a"), (b"", b""), (b"a", b""), (b"\x00", b"\x00"), (b"\xff\0", b"\xff")],
    ids=repr,
)
def test_empty_or_inverted_range_is_invalid(start: bytes, end: bytes) -> None:
    with pytest.raises(CatalogInvalidRouteRangeError):
        validate_route_descriptor(GOOD._replace(start=start, end=end))


def test_empty_end_is_not_unbounded() -> None:
    assert validate_route_descriptor(GOOD._replace(start=b"", end=None)).end is None
    assert validate_route_descriptor(GOOD._replace(start=b"\xff" * 8, end=None)).end is None
    with pytest.raises(CatalogInvalidRouteRangeError):
        validate_route_descriptor(GOOD._replace(start=b"", end=b""))
    with pytest.raises(CatalogInvalidRouteRangeError):
        validate_route_descriptor(GOOD._replace(start=b"\xff" * 8, end=b""))


@pytest.mark.parametrize(
    ("start", "end"),
    [(b"", b"\x00"), (b"a", b"a\x00"), (b"\x00", b"\x01"), (b"\xfe\xff", b"\xff"), (b"", None)],
    ids=repr,
)
def test_valid_ranges_compare_as_raw_bytes(start: bytes, end: bytes | None) -> None:
    route = GOOD._replace(start=start, end=end)
    assert validate_route_descriptor(route) == route


@pytest.mark.parametrize("state", list(RouteState), ids=lambda s: s.name)
def test_state_is_normalised_to_route_state(state: RouteState) -> None:
    checked = validate_route_descriptor(GOOD._replace(state=loose(int(state))))
    assert checked.state is state
    assert type(checked.state) is RouteState
    assert checked == GOOD._replace(state=state)
    assert validate_route_descriptor(GOOD._replace(state=state)).state is state


@pytest.mark.parametrize("state", [-1, 4, 255, 2**64], ids=str)
def test_unknown_states_are_invalid(state: int) -> None:
    with pytest.raises(CatalogInvalidRouteStateError):
        validate_route_descriptor(GOOD._replace(state=loose(state)))


@pytest.mark.parametrize(
    "changes",
    [
        {"start": "a"},
        {"end": "m"},
        {"start": bytearray(b"a")},
        {"end": memoryview(b"m")},
        {"start": None},
        {"route_id": "1"},
        {"route_id": 1.0},
        {"route_id": True},
        {"group_id": None},
        {"parent_route_id": 0.0},
        {"state": "ACTIVE"},
        {"state": None},
        {"state": True},  # not WRITE_FENCED: a bool is never taken for a state
        {"state": False},
        {"state": 1.0},
        # A wrong type is reported before any validity fault.
        {"route_id": 0, "start": "a"},
        {"group_id": 0, "end": "m"},
    ],
    # The same in every process (which a memoryview's repr, holding its address, is not).
    ids=lambda changes: ",".join(
        f"{k}={'memoryview' if isinstance(v, memoryview) else repr(v)}" for k, v in changes.items()
    ),
)
def test_wrong_types_are_type_errors(changes: dict[str, Any]) -> None:
    with pytest.raises(TypeError):
        validate_route_descriptor(GOOD._replace(**changes))


@pytest.mark.parametrize(
    "changes",
    [
        {"route_id": -1},
        {"route_id": 2**64},
        {"group_id": -1},
        {"group_id": 2**64},
        {"parent_route_id": -1},
        {"parent_route_id": 2**64},
    ],
    ids=repr,
)
def test_out_of_range_ids_are_value_errors(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as excinfo:
        validate_route_descriptor(GOOD._replace(**changes))
    assert not isinstance(excinfo.value, DistributionError)


def test_full_u64_ids_are_valid() -> None:
    route = GOOD._replace(route_id=UINT64_MAX, group_id=UINT64_MAX, parent_route_id=UINT64_MAX)
    assert validate_route_descriptor(route) == route


# --------------------------------------------------------------------------------------------
# check_u64 and check_key
# --------------------------------------------------------------------------------------------


def test_uint64_max() -> None:
    assert UINT64_MAX == 2**64 - 1


@pytest.mark.parametrize("value", [0, 1, 2**32, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1], ids=str)
def test_check_u64_accepts_the_whole_range(value: int) -> None:
    assert check_u64("version", value) == value


@pytest.mark.parametrize("value", [-1, 2**64, -(2**63), 2**65], ids=str)
def test_check_u64_refuses_out_of_range(value: int) -> None:
    with pytest.raises(ValueError, match="version") as excinfo:
        check_u64("version", value)
    assert not isinstance(excinfo.value, DistributionError)


@pytest.mark.parametrize("value", [True, False, 1.0, "1", None, b"\x01"], ids=repr)
def test_check_u64_refuses_non_ints_and_bools(value: object) -> None:
    with pytest.raises(TypeError, match="version"):
        check_u64("version", value)


def test_check_key() -> None:
    assert check_key("key", b"") == b""
    assert check_key("key", b"\x00\xff") == b"\x00\xff"
    with pytest.raises(TypeError, match="encode"):
        check_key("key", "a")
    for value in (bytearray(b"a"), memoryview(b"a"), None, 1):
        with pytest.raises(TypeError, match="key"):
            check_key("key", value)


# --------------------------------------------------------------------------------------------
# The fast route-table validator agrees with the exact checks
# --------------------------------------------------------------------------------------------


def _exact(routes: list[Any]) -> tuple[RouteDescriptor, ...] | None:
    """The exact checks' answer: the sorted table, or None when they raise."""
    try:
        valid = validate_route_table(
            routes, duplicate=ValueError, order=ValueError, overlap=ValueError
        )
    except (TypeError, ValueError):
        return None
    return tuple(valid)


def _random_table(rng: random.Random) -> list[Any]:
    """A table that is valid, or broken in one of the ways a table can be."""
    count = rng.randrange(1, 12)
    keys = sorted({rng.randbytes(rng.randrange(0, 3)) for _ in range(count + 1)})
    routes: list[Any] = [
        RouteDescriptor(i + 1, start, end, rng.randrange(1, 4), RouteState(rng.randrange(4)))
        for i, (start, end) in enumerate(itertools.pairwise([*keys[:-1], None]))
    ]
    rng.shuffle(routes)
    if not routes or rng.random() < 0.3:
        return routes
    i = rng.randrange(len(routes))
    breakages = [
        {"route_id": 0},
        {"route_id": routes[(i + 1) % len(routes)].route_id},
        {"route_id": UINT64_MAX},
        {"route_id": UINT64_MAX + 1},
        {"group_id": 0},
        {"group_id": True},
        {"state": 4},
        {"state": 1},
        {"start": "text"},
        {"end": b""},
        {"end": None},
        {"start": routes[(i + 1) % len(routes)].start},
        {"parent_route_id": -1},
    ]
    return [*routes[:i], routes[i]._replace(**rng.choice(breakages)), *routes[i + 1 :]]


@pytest.mark.parametrize("seed", range(5))
def test_sorted_route_table_agrees_with_the_exact_checks(seed: int) -> None:
    """Whatever it accepts, the exact checks accept, sorted alike; it refuses (None) at least
    whatever they refuse, and any table with a non-member state, which they would normalize."""
    rng = random.Random(seed)
    accepted = 0
    for _ in range(400):
        routes = _random_table(rng)
        fast = sorted_route_table(routes)
        exact = _exact(routes)
        if fast is not None:
            accepted += 1
            assert fast == exact
            assert all(type(route.state) is RouteState for route in fast)
        elif exact is not None:
            assert any(type(route.state) is not RouteState for route in routes)
    assert accepted > 100


def test_sorted_route_table_caps_route_ids() -> None:
    top = RouteDescriptor(route_id=UINT64_MAX, start=b"", end=None, group_id=1)
    assert sorted_route_table([top]) == (top,)
    assert sorted_route_table([top], max_route_id=UINT64_MAX - 1) is None
    assert sorted_route_table([]) == ()


def test_route_columns_converts_plain_int_states_unless_told_not() -> None:
    plain = GOOD._replace(state=1)
    columns = route_columns([plain])
    assert columns is not None and columns[4] == (RouteState.WRITE_FENCED,)
    assert type(columns[4][0]) is RouteState
    assert route_columns([plain], convert_states=False) is None
    assert route_columns([GOOD._replace(state=9)]) is None

"""Tests of distribution.Engine: every contract behaviour, against a naive model, and threads."""

from __future__ import annotations

import copy
import dataclasses
import gc
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from itertools import pairwise

import pytest

import distribution.engine as engine_module
import distribution.table as table_module
from distribution import (
    MAX_ROUTE_KEY_BYTES,
    UINT64_MAX,
    CatalogChange,
    CatalogGroupIDRequiredError,
    CatalogInvalidRouteRangeError,
    CatalogInvalidRouteStateError,
    CatalogRouteIDRequiredError,
    CatalogSnapshot,
    DistributionError,
    Engine,
    EngineDigestMismatchError,
    EngineSnapshotDuplicateIDError,
    EngineSnapshotRouteOrderError,
    EngineSnapshotRouteOverlapError,
    EngineSnapshotVersionGapError,
    EngineSnapshotVersionStaleError,
    Route,
    RouteDescriptor,
    RouteKeyTooLongError,
    RouteState,
    _pylookup,
    validate_route_descriptor,
)
from distribution.codec import routes_digest

ACTIVE = RouteState.ACTIVE
FENCED = RouteState.WRITE_FENCED


def rd(
    route_id: int,
    start: bytes,
    end: bytes | None,
    group_id: int = 1,
    state: int = ACTIVE,
    parent_route_id: int = 0,
) -> RouteDescriptor:
    return RouteDescriptor(route_id, start, end, group_id, state, parent_route_id)  # type: ignore[arg-type]


def snap(version: int, *routes: RouteDescriptor) -> CatalogSnapshot:
    return CatalogSnapshot(version=version, routes=routes)


def change(
    previous: int,
    version: int,
    upserts: tuple[RouteDescriptor, ...] = (),
    deletes: tuple[int, ...] = (),
) -> CatalogChange:
    return CatalogChange(
        previous_version=previous, version=version, upserts=upserts, deletes=deletes
    )


def shape(engine: Engine) -> list[tuple[int, bytes, bytes | None, int, RouteState, int]]:
    engine._check()
    return [tuple(r) for r in engine.stats()]  # type: ignore[misc]


@pytest.fixture(params=[2, 1024], ids=["tiny-chunks", "default-chunks"])
def chunk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run a test with tiny chunks and blocks too, so multi-chunk code paths are exercised."""
    size: int = request.param
    monkeypatch.setattr(table_module, "CHUNK", size)
    monkeypatch.setattr(_pylookup, "_BLOCK", max(size, 3))
    return size


@pytest.fixture(autouse=True, params=["c", "python"])
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run every test on the C searches and on the pure-Python ones."""
    if request.param == "c":
        monkeypatch.setattr(
            table_module, "IMPLEMENTATION", pytest.importorskip("distribution._lookup")
        )
    else:
        monkeypatch.setattr(table_module, "IMPLEMENTATION", _pylookup)
    assert Engine().implementation == request.param
    return str(request.param)


@pytest.fixture(params=["measured", "rebuild", "rewrite"])
def change_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Apply changes as the Engine chooses, or always by a rebuild of the table, or always by a
    rewrite of the chunks they touch: the results must not differ."""
    if request.param != "measured":
        rebuilds = request.param == "rebuild"
        monkeypatch.setattr(engine_module, "_rebuilds", lambda *_, **__: rebuilds)
    return str(request.param)


ABC = snap(
    1,
    rd(1, b"", b"b", 1),
    rd(2, b"b", b"d", 2),
    rd(3, b"d", None, 3),
)


# -- construction --------------------------------------------------------------------------------


def test_new_engine_is_empty() -> None:
    engine = Engine()
    assert engine.version == 0
    assert engine.get_route(b"") is None
    assert engine.get_route(b"k") is None
    assert engine.stats() == []
    assert engine.get_intersecting_routes(b"", None) == []
    assert engine.group_keys([b"a"]) == []
    engine.record_access(b"a")
    engine._check()


@pytest.mark.parametrize("threshold", [-1, 2**64])
def test_threshold_out_of_range(threshold: int) -> None:
    with pytest.raises(ValueError):
        Engine(hotspot_threshold=threshold)


def test_threshold_wrong_type() -> None:
    with pytest.raises(TypeError):
        Engine(hotspot_threshold="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Engine(hotspot_threshold=True)


def test_with_default_route() -> None:
    engine = Engine.with_default_route()
    assert shape(engine) == [(0, b"", None, 1, ACTIVE, 0)]
    assert engine.get_route(b"") == Route(0, b"", None, 1, ACTIVE, 0)
    assert engine.get_route(b"\xff" * 20) is not None
    assert engine.version == 0
    hot = Engine.with_default_route(hotspot_threshold=5)
    for _ in range(5):
        hot.record_access(b"x")
    # Unbounded: the load is reset, not split.
    assert shape(hot) == [(0, b"", None, 1, ACTIVE, 0)]


@pytest.mark.parametrize("bad", ["k", bytearray(b"k"), memoryview(b"k"), 1, None])
def test_keys_must_be_bytes_even_on_an_empty_engine(bad: object) -> None:
    for engine in (Engine(), Engine.with_default_route()):
        with pytest.raises(TypeError):
            engine.get_route(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            engine.record_access(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            engine.group_keys([b"a", bad])  # type: ignore[list-item]
        with pytest.raises(TypeError):
            engine.get_intersecting_routes(bad, None)  # type: ignore[arg-type]
        if bad is not None:
            with pytest.raises(TypeError):
                engine.get_intersecting_routes(b"", bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            engine.update_route(bad, None, 1)  # type: ignore[arg-type]


def test_str_key_message_suggests_encoding() -> None:
    with pytest.raises(TypeError, match="encode text keys explicitly"):
        Engine().get_route("k")  # type: ignore[arg-type]


def test_a_refused_key_is_one_error_not_a_chain() -> None:
    """The C search refuses the key first; the caller sees only the library's message."""
    engine = Engine.with_default_route()
    with pytest.raises(TypeError, match=r"^key must be bytes, got str \(encode") as refused:
        engine.get_route("k")  # type: ignore[arg-type]
    error = refused.value
    assert (error.__context__ is None or error.__suppress_context__) and error.__cause__ is None
    with pytest.raises(TypeError, match=r"^key must be bytes, got int$") as refused:
        engine.group_keys([b"a", b"b", 3])  # type: ignore[list-item]
    assert refused.value.__suppress_context__ and refused.value.__cause__ is None


def test_bytes_subclass_is_refused() -> None:
    class Key(bytes):
        pass

    with pytest.raises(TypeError):
        Engine().get_route(Key(b"a"))
    with pytest.raises(TypeError):
        Engine().apply_snapshot(snap(1, rd(1, Key(b"a"), None)))


# -- apply_snapshot ------------------------------------------------------------------------------


def test_apply_snapshot_and_lookups(chunk: int) -> None:
    engine = Engine()
    engine.apply_snapshot(ABC)
    assert engine.version == 1
    assert shape(engine) == [
        (1, b"", b"b", 1, ACTIVE, 0),
        (2, b"b", b"d", 2, ACTIVE, 0),
        (3, b"d", None, 3, ACTIVE, 0),
    ]
    route = engine.get_route(b"")
    assert route is not None and route.route_id == 1
    assert engine.get_route(b"a\xff").route_id == 1  # type: ignore[union-attr]
    assert engine.get_route(b"b").route_id == 2  # type: ignore[union-attr]
    assert engine.get_route(b"c").route_id == 2  # type: ignore[union-attr]
    assert engine.get_route(b"d").route_id == 3  # type: ignore[union-attr]
    assert engine.get_route(b"\xff\xff").route_id == 3  # type: ignore[union-attr]
    assert type(engine.get_route(b"b")) is Route


def test_gaps_are_allowed(chunk: int) -> None:
    engine = Engine()
    engine.apply_snapshot(snap(1, rd(2, b"m", b"p", 2), rd(1, b"c", b"f"), rd(3, b"x", b"z")))
    engine._check()
    assert [r.route_id for r in engine.stats()] == [1, 2, 3]
    assert engine.get_route(b"a") is None
    assert engine.get_route(b"c").route_id == 1  # type: ignore[union-attr]
    assert engine.get_route(b"f") is None
    assert engine.get_route(b"p") is None
    assert engine.get_route(b"y").route_id == 3  # type: ignore[union-attr]
    assert engine.get_route(b"z") is None


def test_stale_snapshot_changes_nothing() -> None:
    engine = Engine()
    engine.apply_snapshot(snap(2, rd(1, b"", None)))
    engine.record_access(b"k")
    before = shape(engine)
    with pytest.raises(EngineSnapshotVersionStaleError) as info:
        engine.apply_snapshot(snap(1, rd(5, b"", None, 5)))
    message = str(info.value)
    assert "snapshot version 1" in message and "engine catalog version 2" in message
    assert not isinstance(info.value, ValueError)
    assert isinstance(info.value, DistributionError)
    assert engine.version == 2
    assert shape(engine) == before


def test_same_version_is_a_silent_noop_not_validated() -> None:
    engine = Engine()
    engine.apply_snapshot(ABC)
    engine.record_access(b"c")
    before = shape(engine)
    engine.apply_snapshot(snap(1, rd(0, b"z", b"a", 0, 9)))
    assert shape(engine) == before
    # Version 0 on a new engine is the same version too.
    fresh = Engine()
    fresh.apply_snapshot(snap(0, rd(0, b"", None)))
    assert fresh.stats() == []


def test_newer_empty_snapshot_clears_everything() -> None:
    engine = Engine.with_default_route()
    engine.apply_snapshot(ABC)
    engine.apply_snapshot(snap(5))
    assert engine.version == 5
    assert shape(engine) == []
    assert engine.get_route(b"a") is None


def test_snapshot_resets_loads_and_drops_ephemeral_routes() -> None:
    engine = Engine()
    engine.apply_snapshot(snap(1, rd(1, b"a", b"c")))
    engine.update_route(b"x", None, 4)
    engine.record_access(b"a")
    engine.record_access(b"x")
    engine.apply_snapshot(snap(2, rd(1, b"a", b"c")))
    assert shape(engine) == [(1, b"a", b"c", 1, ACTIVE, 0)]


@pytest.mark.parametrize("version", [-1, 2**64])
def test_snapshot_version_out_of_range(version: int) -> None:
    with pytest.raises(ValueError):
        Engine().apply_snapshot(snap(version))


def test_snapshot_version_full_u64_range() -> None:
    engine = Engine()
    engine.apply_snapshot(snap(UINT64_MAX, rd(UINT64_MAX, b"", None, UINT64_MAX)))
    assert engine.version == UINT64_MAX
    assert shape(engine) == [(UINT64_MAX, b"", None, UINT64_MAX, ACTIVE, 0)]


@pytest.mark.parametrize(
    ("route", "error"),
    [
        (rd(0, b"a", b"b"), CatalogRouteIDRequiredError),
        (rd(1, b"a", b"b", 0), CatalogGroupIDRequiredError),
        (rd(1, b"a", b"b", 1, 4), CatalogInvalidRouteStateError),
        (rd(1, b"a", b"b", 1, -1), CatalogInvalidRouteStateError),
        (rd(1, b"b", b"a"), CatalogInvalidRouteRangeError),
        (rd(1, b"a", b"a"), CatalogInvalidRouteRangeError),
        (rd(1, b"a", b""), CatalogInvalidRouteRangeError),
        (rd(1, b"", b""), CatalogInvalidRouteRangeError),
        (rd(2**64, b"a", b"b"), ValueError),
        (rd(1, b"a", b"b", 2**64), ValueError),
        (rd(1, b"a", b"b", 1, ACTIVE, -1), ValueError),
        (rd(True, b"a", b"b"), TypeError),
        (rd(1, "a", b"b"), TypeError),  # type: ignore[arg-type]
        (rd(1, b"a", "b"), TypeError),  # type: ignore[arg-type]
        (rd(1, b"a", bytearray(b"b")), TypeError),  # type: ignore[arg-type]
        (rd(1, b"a", b"b", 1.0), TypeError),  # type: ignore[arg-type]
        (rd(1, b"a", b"b", 1, 0.0), TypeError),  # type: ignore[arg-type]
        (rd(1, b"a", b"b", 1, ACTIVE, None), TypeError),  # type: ignore[arg-type]
    ],
)
def test_invalid_route_in_snapshot(
    route: RouteDescriptor, error: type[Exception], chunk: int
) -> None:
    engine = Engine()
    engine.apply_snapshot(snap(1, rd(9, b"x", None)))
    good = [rd(10, b"0", b"1"), rd(11, b"1", b"2")]
    with pytest.raises(error):
        engine.apply_snapshot(snap(2, *good, route))
    assert engine.version == 1
    assert shape(engine) == [(9, b"x", None, 1, ACTIVE, 0)]


def test_descriptor_checks_run_in_order() -> None:
    with pytest.raises(CatalogRouteIDRequiredError):
        Engine().apply_snapshot(snap(1, rd(0, b"b", b"a", 0, 9)))
    with pytest.raises(CatalogGroupIDRequiredError):
        Engine().apply_snapshot(snap(1, rd(1, b"b", b"a", 0, 9)))
    with pytest.raises(CatalogInvalidRouteStateError):
        Engine().apply_snapshot(snap(1, rd(1, b"b", b"a", 1, 9)))


def test_snapshot_checks_run_in_order(chunk: int) -> None:
    # Each route is validated (in input order) before ids are compared...
    with pytest.raises(CatalogGroupIDRequiredError):
        Engine().apply_snapshot(snap(1, rd(1, b"a", b"b"), rd(1, b"a", b"b"), rd(2, b"c", b"d", 0)))
    with pytest.raises(CatalogGroupIDRequiredError):
        Engine().apply_snapshot(snap(1, rd(1, b"c", b"d", 0), rd(0, b"a", b"b")))
    with pytest.raises(CatalogRouteIDRequiredError):
        Engine().apply_snapshot(snap(1, rd(0, b"a", b"b"), rd(1, b"c", b"d", 0)))
    # ...ids before order and overlap...
    with pytest.raises(EngineSnapshotDuplicateIDError, match="route 1"):
        Engine().apply_snapshot(snap(1, rd(1, b"a", b"z"), rd(2, b"a", b"c"), rd(1, b"x", None)))
    # ...and adjacent pairs in start order: the first failing pair decides.
    with pytest.raises(EngineSnapshotRouteOverlapError):
        Engine().apply_snapshot(snap(1, rd(3, b"x", None), rd(2, b"c", b"e"), rd(1, b"a", b"d")))
    with pytest.raises(EngineSnapshotRouteOrderError):
        Engine().apply_snapshot(snap(1, rd(3, b"x", b"y"), rd(2, b"x", b"z"), rd(1, b"a", b"d")))
    with pytest.raises(EngineSnapshotRouteOrderError):
        Engine().apply_snapshot(
            snap(1, rd(4, b"y", b"z"), rd(3, b"x", b"z"), rd(2, b"a", b"b"), rd(1, b"a", b"c"))
        )
    with pytest.raises(EngineSnapshotRouteOverlapError):
        Engine().apply_snapshot(
            snap(1, rd(4, b"x", b"z"), rd(3, b"x", b"y"), rd(2, b"c", b"e"), rd(1, b"a", b"d"))
        )


def test_order_errors(chunk: int) -> None:
    with pytest.raises(EngineSnapshotRouteOrderError):
        Engine().apply_snapshot(snap(1, rd(1, b"a", b"c"), rd(2, b"a", b"b")))
    with pytest.raises(EngineSnapshotRouteOrderError):
        Engine().apply_snapshot(snap(1, rd(1, b"a", None), rd(2, b"b", b"c")))
    with pytest.raises(EngineSnapshotRouteOrderError):
        Engine().apply_snapshot(snap(1, rd(1, b"a", None), rd(2, b"b", None)))
    with pytest.raises(EngineSnapshotRouteOverlapError):
        Engine().apply_snapshot(snap(1, rd(1, b"a", b"c"), rd(2, b"b", b"d")))
    with pytest.raises(EngineSnapshotRouteOverlapError):
        Engine().apply_snapshot(snap(1, rd(2, b"b", b"d"), rd(1, b"a", b"z")))
    for error in (
        EngineSnapshotRouteOrderError,
        EngineSnapshotRouteOverlapError,
        EngineSnapshotDuplicateIDError,
    ):
        assert issubclass(error, ValueError)


def test_unsorted_snapshot_is_sorted(chunk: int) -> None:
    routes = [rd(i + 1, bytes([i]), bytes([i + 1]), i + 1) for i in range(20)]
    random.Random(3).shuffle(routes)
    engine = Engine()
    engine.apply_snapshot(snap(1, *routes))
    assert [r[0] for r in shape(engine)] == list(range(1, 21))


def test_plain_int_states_are_normalized(chunk: int) -> None:
    engine = Engine()
    engine.apply_snapshot(snap(1, rd(1, b"a", b"b", 1, 1), rd(2, b"b", None, 1, 3)))
    states = [r.state for r in engine.stats()]
    assert states == [RouteState.WRITE_FENCED, RouteState.MIGRATING_TARGET]
    assert all(type(s) is RouteState for s in states)
    engine._check()


def test_duck_typed_descriptors_are_accepted() -> None:
    @dataclass
    class Loose:
        route_id: int
        start: bytes
        end: bytes | None
        group_id: int
        state: RouteState = ACTIVE
        parent_route_id: int = 0

    engine = Engine()
    engine.apply_snapshot(CatalogSnapshot(1, (Loose(1, b"a", None, 2),)))  # type: ignore[arg-type]
    assert shape(engine) == [(1, b"a", None, 2, ACTIVE, 0)]


def test_distinct_but_equal_boundary_keys(chunk: int) -> None:
    # Keys decoded from a database are equal, not identical, across adjacent routes.
    routes = [rd(i + 1, b"k%03d" % i, b"k%03d" % (i + 1)) for i in range(10)]
    engine = Engine()
    engine.apply_snapshot(snap(1, *routes))
    assert len(shape(engine)) == 10
    assert engine.get_route(b"k005").route_id == 6  # type: ignore[union-attr]
    assert engine.get_route(b"k010") is None


def test_snapshot_with_gaps_and_shared_keys(chunk: int) -> None:
    starts = [b"%02d" % i for i in range(0, 40, 2)]
    routes = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i % 3 == 0 and i + 1 < len(starts) else start + b"5"
        routes.append(rd(i + 1, start, end))
    engine = Engine()
    engine.apply_snapshot(snap(1, *routes))
    model = Model()
    model.apply_snapshot(snap(1, *routes))
    model.compare(engine)


# -- update_route ----------------------------------------------------------------------------------


def test_update_route(chunk: int) -> None:
    engine = Engine()
    engine.apply_snapshot(snap(3, rd(1, b"c", b"f")))
    engine.record_access(b"c")
    engine.update_route(b"a", b"c", 7)
    engine.update_route(b"f", None, 8)
    assert engine.version == 3
    assert shape(engine) == [
        (0, b"a", b"c", 7, ACTIVE, 0),
        (1, b"c", b"f", 1, ACTIVE, 1),
        (0, b"f", None, 8, ACTIVE, 0),
    ]


def test_update_route_overlap_changes_nothing(chunk: int) -> None:
    engine = Engine()
    engine.apply_snapshot(snap(3, rd(1, b"c", b"f")))
    engine.record_access(b"d")
    before = shape(engine)
    for start, end in [(b"a", b"d"), (b"e", None), (b"c", b"f"), (b"d", b"e"), (b"", None)]:
        with pytest.raises(EngineSnapshotRouteOverlapError):
            engine.update_route(start, end, 2)
        assert shape(engine) == before


def test_update_route_validation() -> None:
    engine = Engine()
    with pytest.raises(CatalogGroupIDRequiredError):
        engine.update_route(b"b", b"a", 0)
    with pytest.raises(CatalogInvalidRouteRangeError):
        engine.update_route(b"b", b"a", 1)
    with pytest.raises(CatalogInvalidRouteRangeError):
        engine.update_route(b"a", b"", 1)
    with pytest.raises(ValueError):
        engine.update_route(b"a", None, 2**64)
    with pytest.raises(TypeError):
        engine.update_route(b"a", None, "1")  # type: ignore[arg-type]
    assert shape(engine) == []


# -- lookups ---------------------------------------------------------------------------------------


def test_get_intersecting_routes(chunk: int) -> None:
    engine = Engine()
    engine.apply_snapshot(snap(1, rd(1, b"b", b"d"), rd(2, b"d", b"f"), rd(3, b"h", None)))

    def ids(start: bytes, end: bytes | None) -> list[int]:
        return [r.route_id for r in engine.get_intersecting_routes(start, end)]

    assert ids(b"", None) == [1, 2, 3]
    assert ids(b"", b"b") == []
    assert ids(b"", b"b\x00") == [1]
    assert ids(b"c", b"e") == [1, 2]
    assert ids(b"d", b"e") == [2]
    assert ids(b"f", b"h") == []
    assert ids(b"f", b"h\x00") == [3]
    assert ids(b"z", None) == [3]
    assert ids(b"c", b"c") == []
    assert ids(b"e", b"c") == []
    assert ids(b"a", b"") == []


def test_group_keys(chunk: int) -> None:
    engine = Engine()
    engine.apply_snapshot(snap(1, rd(1, b"b", b"d"), rd(2, b"d", b"f"), rd(3, b"h", None)))
    keys = [b"z", b"c", b"a", b"d", b"b", b"c", b"g", b"h", b"e", b"\xff"]
    grouped = engine.group_keys(iter(keys))
    assert [(r.route_id, ks) for r, ks in grouped] == [
        (1, [b"b", b"c", b"c"]),
        (2, [b"d", b"e"]),
        (3, [b"h", b"z", b"\xff"]),
    ]
    assert engine.group_keys([]) == []
    assert engine.group_keys([b"a", b"g"]) == []


# -- loads and hotspots ----------------------------------------------------------------------------


def test_record_access_and_stats(chunk: int) -> None:
    engine = Engine()
    engine.apply_snapshot(ABC)
    for key in [b"a", b"a", b"c", b"zz", b"d"]:
        engine.record_access(key)
    assert [r.load for r in engine.stats()] == [2, 1, 2]
    # Lookups carry the load the route was built with, not the current one.
    assert engine.get_route(b"a").load == 0  # type: ignore[union-attr]


def test_record_access_without_route_does_nothing() -> None:
    engine = Engine(hotspot_threshold=1)
    engine.apply_snapshot(snap(1, rd(1, b"b", b"c")))
    engine.record_access(b"a")
    engine.record_access(b"c")
    assert shape(engine) == [(1, b"b", b"c", 1, ACTIVE, 0)]


def test_hotspot_split(chunk: int) -> None:
    engine = Engine(hotspot_threshold=3)
    engine.apply_snapshot(ABC)
    engine.record_access(b"e")
    engine.record_access(b"a")
    engine.record_access(b"c")
    engine.record_access(b"c")
    assert [r.load for r in engine.stats()] == [1, 2, 1]
    engine.record_access(b"b")
    assert shape(engine) == [
        (1, b"", b"b", 1, ACTIVE, 1),
        (0, b"b", b"b\x00", 2, ACTIVE, 0),
        (0, b"b\x00", b"d", 2, ACTIVE, 0),
        (3, b"d", None, 3, ACTIVE, 1),
    ]
    # The pieces split again, in turn.
    for _ in range(3):
        engine.record_access(b"c")
    assert [(r.start, r.end) for r in engine.stats()][1:4] == [
        (b"b", b"b\x00"),
        (b"b\x00", b"b\x00\x00"),
        (b"b\x00\x00", b"d"),
    ]
    engine._check()


def test_hotspot_narrow_or_unbounded_resets(chunk: int) -> None:
    engine = Engine(hotspot_threshold=2)
    engine.apply_snapshot(snap(1, rd(1, b"a", b"a\x00"), rd(2, b"b", None)))
    for key in [b"a", b"a", b"b", b"b", b"b"]:
        engine.record_access(key)
    assert shape(engine) == [(1, b"a", b"a\x00", 1, ACTIVE, 0), (2, b"b", None, 1, ACTIVE, 1)]


@pytest.mark.parametrize(
    "state", [RouteState.WRITE_FENCED, RouteState.MIGRATING_SOURCE, RouteState.MIGRATING_TARGET]
)
def test_fenced_and_migrating_routes_never_split(state: RouteState) -> None:
    engine = Engine(hotspot_threshold=2)
    engine.apply_snapshot(snap(1, rd(1, b"a", b"z", 1, state)))
    for _ in range(5):
        engine.record_access(b"m")
    assert shape(engine) == [(1, b"a", b"z", 1, state, 5)]


def test_threshold_one_splits_at_once() -> None:
    engine = Engine(hotspot_threshold=1)
    engine.update_route(b"a", b"c", 1)
    engine.record_access(b"b")
    assert shape(engine) == [(0, b"a", b"a\x00", 1, ACTIVE, 0), (0, b"a\x00", b"c", 1, ACTIVE, 0)]


# -- apply_changes ---------------------------------------------------------------------------------


def test_apply_changes_split_keeps_other_loads(chunk: int) -> None:
    engine = Engine()
    engine.apply_snapshot(ABC)
    for key in [b"a", b"c", b"c", b"x"]:
        engine.record_access(key)
    engine.apply_changes([change(1, 2, (rd(4, b"b", b"c", 2), rd(5, b"c", b"d", 4)), (2,))])
    assert engine.version == 2
    assert shape(engine) == [
        (1, b"", b"b", 1, ACTIVE, 1),
        (4, b"b", b"c", 2, ACTIVE, 0),
        (5, b"c", b"d", 4, ACTIVE, 0),
        (3, b"d", None, 3, ACTIVE, 1),
    ]
    # Merge back, move, fence, delete, several versions at once.
    engine.apply_changes(
        [
            change(2, 3, (rd(6, b"b", b"d", 2),), (4, 5)),
            change(3, 4, (rd(3, b"d", None, 9, FENCED),)),
            change(4, 5, (), (1,)),
        ]
    )
    assert engine.version == 5
    assert shape(engine) == [(6, b"b", b"d", 2, ACTIVE, 0), (3, b"d", None, 9, FENCED, 0)]


def test_apply_changes_already_applied_is_a_noop() -> None:
    engine = Engine()
    engine.apply_snapshot(snap(3, rd(1, b"a", None)))
    engine.record_access(b"a")
    before = shape(engine)
    engine.apply_changes([])
    engine.apply_changes([change(1, 2, (rd(0, b"", b"", 0),)), change(2, 3)])
    assert shape(engine) == before
    assert engine.version == 3


def test_apply_changes_mixed_starts_from_engine_version() -> None:
    engine = Engine()
    engine.apply_snapshot(snap(2, rd(1, b"a", None)))
    engine.apply_changes([change(1, 2, (rd(0, b"", b"", 0),)), change(2, 3, (rd(2, b"", b"a"),))])
    assert engine.version == 3
    assert [r[0] for r in shape(engine)] == [2, 1]


def test_apply_changes_gap_and_stale() -> None:
    engine = Engine()
    engine.apply_snapshot(snap(4, rd(1, b"a", None)))
    with pytest.raises(EngineSnapshotVersionGapError):
        engine.apply_changes([change(5, 6)])
    with pytest.raises(EngineSnapshotVersionStaleError) as info:
        engine.apply_changes([change(3, 5)])
    assert "3" in str(info.value) and "4" in str(info.value)
    with pytest.raises(EngineSnapshotVersionGapError):
        engine.apply_changes([change(4, 5), change(6, 7)])
    with pytest.raises(EngineSnapshotVersionGapError):
        engine.apply_changes([change(4, 4)])
    with pytest.raises(ValueError):
        engine.apply_changes([change(4, 2**64)])
    assert issubclass(EngineSnapshotVersionGapError, DistributionError)
    assert not issubclass(EngineSnapshotVersionGapError, ValueError)
    assert engine.version == 4
    assert shape(engine) == [(1, b"a", None, 1, ACTIVE, 0)]


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (change(1, 2, (rd(0, b"x", b"y"),)), CatalogRouteIDRequiredError),
        (change(1, 2, (rd(7, b"y", b"x"),)), CatalogInvalidRouteRangeError),
        (change(1, 2, (rd(7, "x", None),)), TypeError),  # type: ignore[arg-type]
        (change(1, 2, (), ("1",)), TypeError),  # type: ignore[arg-type]
        (change(1, 2, (), (-1,)), ValueError),
        (change(1, 2, (rd(7, b"x", b"y"), rd(7, b"y", b"z"))), EngineSnapshotDuplicateIDError),
        (change(1, 2, (rd(7, b"c", b"e"),)), EngineSnapshotRouteOverlapError),
        (change(1, 2, (rd(7, b"a", b"b"),)), EngineSnapshotRouteOverlapError),
        (change(1, 2, (rd(7, b"b", b"c"),)), EngineSnapshotRouteOrderError),
        (change(1, 2, (rd(7, b"e", None),)), EngineSnapshotRouteOrderError),
        (change(1, 2, (rd(2, b"a", b"d"),)), EngineSnapshotRouteOverlapError),
        (change(1, 2, (rd(7, b"x", b"y"), rd(8, b"x", b"z"))), EngineSnapshotRouteOrderError),
        (
            change(1, 2, (rd(7, b"x", b"z"), rd(8, b"y", None)), (3,)),
            EngineSnapshotRouteOverlapError,
        ),
    ],
)
def test_apply_changes_errors_change_nothing(
    bad: CatalogChange, error: type[Exception], chunk: int
) -> None:
    engine = Engine()
    engine.apply_snapshot(ABC)
    engine.record_access(b"c")
    before = shape(engine)
    with pytest.raises(error):
        engine.apply_changes([change(0, 1), bad, change(2, 3)])
    assert engine.version == 1
    assert shape(engine) == before


def test_apply_changes_validates_before_duplicates_and_placement() -> None:
    engine = Engine()
    engine.apply_snapshot(ABC)
    with pytest.raises(CatalogGroupIDRequiredError):
        engine.apply_changes(
            [
                change(1, 2, (rd(7, b"c", b"e"), rd(7, b"x", b"y"))),
                change(2, 3, (rd(8, b"q", b"r", 0),)),
            ]
        )


def test_apply_changes_upsert_replaces_and_unknown_delete_is_ignored(chunk: int) -> None:
    engine = Engine()
    engine.apply_snapshot(ABC)
    engine.record_access(b"a")
    engine.apply_changes([change(1, 2, (rd(2, b"b", b"c", 5),), (42,))])
    assert shape(engine) == [
        (1, b"", b"b", 1, ACTIVE, 1),
        (2, b"b", b"c", 5, ACTIVE, 0),
        (3, b"d", None, 3, ACTIVE, 0),
    ]
    # Delete and re-create an id in one change: upserts come after deletes.
    engine.apply_changes([change(2, 3, (rd(2, b"b", b"d", 6),), (2,))])
    assert shape(engine)[1] == (2, b"b", b"d", 6, ACTIVE, 0)


def test_apply_changes_catalog_wins_over_ephemeral_routes(chunk: int) -> None:
    engine = Engine()
    engine.apply_snapshot(snap(1, rd(1, b"a", b"c")))
    engine.update_route(b"m", b"p", 9)
    engine.update_route(b"x", None, 9)
    engine.record_access(b"x")
    engine.apply_changes([change(1, 2, (rd(2, b"n", b"o"),))])
    assert shape(engine) == [
        (1, b"a", b"c", 1, ACTIVE, 0),
        (2, b"n", b"o", 1, ACTIVE, 0),
        (0, b"x", None, 9, ACTIVE, 1),
    ]


def test_apply_changes_on_a_hotspot_split_route(chunk: int) -> None:
    engine = Engine(hotspot_threshold=2)
    engine.apply_snapshot(snap(1, rd(1, b"a", b"m"), rd(2, b"m", None)))
    engine.record_access(b"b")
    engine.record_access(b"b")
    assert [r[0] for r in shape(engine)] == [0, 0, 2]
    # The shadowed route still blocks an overlapping upsert...
    with pytest.raises(EngineSnapshotRouteOverlapError):
        engine.apply_changes([change(1, 2, (rd(3, b"", b"b"),))])
    with pytest.raises(EngineSnapshotRouteOrderError):
        engine.apply_changes([change(1, 2, (rd(3, b"a", b"b"),))])
    # ...and deleting it removes its pieces.
    engine.apply_changes([change(1, 2, (), (1,))])
    assert shape(engine) == [(2, b"m", None, 1, ACTIVE, 0)]
    engine.record_access(b"x")
    engine.apply_changes([change(2, 3, (rd(1, b"a", b"m"),))])
    engine.record_access(b"c")
    engine.record_access(b"c")
    engine.apply_changes([change(3, 4, (rd(1, b"a", b"m", 4),))])
    assert shape(engine) == [(1, b"a", b"m", 4, ACTIVE, 0), (2, b"m", None, 1, ACTIVE, 1)]


# -- the catalog digest, reset --------------------------------------------------------------------


def descriptors_digest(*routes: RouteDescriptor) -> int:
    return routes_digest(routes)


SPLIT_ABC = (rd(1, b"", b"b", 1), rd(4, b"b", b"c", 2, ACTIVE, 2), rd(5, b"c", b"d", 2, FENCED, 2))


def test_digest_follows_snapshots_and_changes(chunk: int) -> None:
    engine = Engine()
    assert engine.digest == 0
    engine.apply_snapshot(ABC)
    assert engine.digest == descriptors_digest(*ABC.routes)
    split = change(1, 2, SPLIT_ABC[1:], (2,))
    engine.apply_changes([split])
    assert engine.digest == descriptors_digest(*SPLIT_ABC, ABC.routes[2])
    # An upsert of a known id replaces its hash; a delete takes it out.
    engine.apply_changes([change(2, 3, (rd(5, b"c", b"d", 3, FENCED, 2),), (3,))])
    want = descriptors_digest(*SPLIT_ABC[:2], rd(5, b"c", b"d", 3, FENCED, 2))
    assert engine.digest == want
    engine._check()
    # Ephemeral routes are not in the catalog.
    engine.update_route(b"x", None, 7)
    assert engine.digest == want
    engine._check()


def test_hotspot_pieces_leave_the_digest_to_the_route_they_shadow(chunk: int) -> None:
    engine = Engine(hotspot_threshold=2)
    routes = (rd(1, b"a", b"m", 1, ACTIVE, 9), rd(2, b"m", None, 2, ACTIVE, 8))
    engine.apply_snapshot(snap(1, *routes))
    engine.record_access(b"b")
    engine.record_access(b"b")
    assert [r.route_id for r in engine.stats()] == [0, 0, 2]
    assert engine.digest == descriptors_digest(*routes)
    engine._check()
    # Deleting the shadowed route takes its hash out, as the catalog does.
    engine.apply_changes([replace_digest(change(1, 2, (), (1,)), descriptors_digest(routes[1]))])
    assert engine.digest == descriptors_digest(routes[1])
    engine._check()


def test_digest_of_a_shadowed_route_is_computed_when_the_snapshot_had_none(chunk: int) -> None:
    engine = Engine(hotspot_threshold=2)
    routes = (rd(1, b"a", b"m", 1, ACTIVE, 9), rd(2, b"m", None, 2, ACTIVE, 8))
    engine.apply_snapshot(snap(1, *routes))
    engine.record_access(b"b")
    engine.record_access(b"b")
    engine._check()
    assert engine.digest == descriptors_digest(*routes)


def replace_digest(c: CatalogChange, digest: int) -> CatalogChange:
    return dataclasses.replace(c, digest=digest)


def test_snapshot_digest_is_taken_as_it_is() -> None:
    """A catalog read brings the digest: the Engine does not hash a million routes again."""
    engine = Engine()
    engine.apply_snapshot(dataclasses.replace(ABC, digest=42))
    assert engine.digest == 42
    engine.reset(dataclasses.replace(ABC, digest=43))
    assert engine.digest == 43


def test_snapshot_without_digest_computes_it(chunk: int) -> None:
    engine = Engine()
    engine.apply_snapshot(ABC)
    engine.apply_changes([change(1, 2, SPLIT_ABC[1:], (2,))])
    assert engine.digest == descriptors_digest(*SPLIT_ABC, ABC.routes[2])
    # Computed first for a change that names its digest.
    engine.reset(snap(2, *SPLIT_ABC, ABC.routes[2]))
    after = descriptors_digest(*SPLIT_ABC)
    engine.apply_changes([replace_digest(change(2, 3, (), (3,)), after)])
    assert engine.digest == after


@pytest.mark.parametrize("digest", ["1", 1.0, 2**63, -(2**63) - 1])
def test_digest_must_be_a_signed_64_bit_int(digest: object) -> None:
    engine = Engine()
    engine.apply_snapshot(ABC)
    with pytest.raises(TypeError, match="digest"):
        engine.apply_snapshot(dataclasses.replace(snap(2), digest=digest))
    with pytest.raises(TypeError, match="digest"):
        engine.apply_changes([replace_digest(change(1, 2), digest)])  # type: ignore[arg-type]
    assert engine.version == 1
    assert engine.digest == descriptors_digest(*ABC.routes)


def test_a_mismatching_change_publishes_nothing_of_its_batch(chunk: int) -> None:
    engine = Engine(hotspot_threshold=5)
    engine.apply_snapshot(dataclasses.replace(ABC, digest=descriptors_digest(*ABC.routes)))
    engine.record_access(b"a")
    before = shape(engine)
    good = change(1, 2, SPLIT_ABC[1:], (2,))
    good = replace_digest(good, descriptors_digest(*SPLIT_ABC, ABC.routes[2]))
    bad = replace_digest(change(2, 3, (), (3,)), descriptors_digest(*SPLIT_ABC, ABC.routes[2]))
    with pytest.raises(EngineDigestMismatchError) as raised:
        engine.apply_changes([good, bad])
    message = str(raised.value)
    assert "version 2 to version 3" in message
    assert str(descriptors_digest(*SPLIT_ABC)) in message and str(bad.digest) in message
    assert shape(engine) == before
    assert engine.version == 1
    assert engine.digest == descriptors_digest(*ABC.routes)
    # A wrong digest on the first change: the same.
    with pytest.raises(EngineDigestMismatchError, match="version 1 to version 2"):
        engine.apply_changes([replace_digest(good, 0)])
    assert shape(engine) == before
    # The right one goes through.
    engine.apply_changes([good])
    assert engine.version == 2 and engine.digest == good.digest


def test_changes_already_applied_are_not_checked() -> None:
    engine = Engine()
    engine.apply_snapshot(ABC)
    engine.apply_changes([change(1, 2, (), (3,))])
    engine.apply_changes([replace_digest(change(1, 2, (), (3,)), 12345)])
    assert engine.version == 2


def test_reset_goes_back_to_an_older_catalog(chunk: int) -> None:
    engine = Engine(hotspot_threshold=5)
    engine.apply_snapshot(ABC)
    # Forged changes the catalog never made...
    engine.apply_changes([change(1, 2, (rd(2, b"b", b"d", 9),)), change(2, 3, (), (3,))])
    engine.update_route(b"x", None, 4)
    engine.record_access(b"a")
    # ...undone by the catalog's snapshot at its version.
    engine.reset(ABC)
    assert engine.version == 1
    assert shape(engine) == [tuple(to_route(d)) for d in ABC.routes]
    assert engine.digest == descriptors_digest(*ABC.routes)
    # The same version is applied again too (apply_snapshot would skip it): loads restart.
    engine.record_access(b"a")
    engine.reset(ABC)
    assert shape(engine) == [tuple(to_route(d)) for d in ABC.routes]
    engine.apply_changes([change(1, 2, (), (3,))])
    assert engine.version == 2


def test_reset_validates_and_changes_nothing_on_error(chunk: int) -> None:
    engine = Engine()
    engine.apply_snapshot(snap(5, *ABC.routes))
    before = shape(engine)
    with pytest.raises(EngineSnapshotRouteOverlapError):
        engine.reset(snap(2, rd(1, b"a", b"c"), rd(2, b"b", None)))
    with pytest.raises(EngineSnapshotDuplicateIDError):
        engine.reset(snap(2, rd(1, b"a", b"c"), rd(1, b"c", None)))
    with pytest.raises(ValueError):
        engine.reset(snap(-1))
    assert shape(engine) == before
    assert engine.version == 5
    assert engine.digest == descriptors_digest(*ABC.routes)


def test_digest_readers_see_a_published_digest_while_changes_apply() -> None:
    engine = Engine()
    routes = [rd(1, b"", None)]
    engine.apply_snapshot(snap(1, *routes))
    digests = {descriptors_digest(*routes)}
    changes = []
    for version in range(1, 200):
        # Split the last route at a new key, and name the digest it leads to.
        last = routes.pop()
        middle = last.start + b"\x01"
        left = rd(2 * version, last.start, middle, 1, ACTIVE, last.route_id)
        right = rd(2 * version + 1, middle, None, 1, ACTIVE, last.route_id)
        routes += [left, right]
        digest = descriptors_digest(*routes)
        digests.add(digest)
        changes.append(
            replace_digest(change(version, version + 1, (left, right), (last.route_id,)), digest)
        )
    done = threading.Event()

    def reader(index: int) -> None:
        while not done.is_set():
            assert engine.digest in digests

    def writer(index: int) -> None:
        try:
            for c in changes:
                engine.apply_changes([c])
        finally:
            done.set()

    run_threads(3, lambda i: writer(i) if i == 0 else reader(i))
    assert engine.digest == descriptors_digest(*routes)


# -- the named key limit ---------------------------------------------------------------------------


def test_update_route_refuses_bounds_over_the_limit(chunk: int) -> None:
    engine = Engine()
    engine.apply_snapshot(ABC)
    longest = b"x" * MAX_ROUTE_KEY_BYTES
    before = shape(engine)
    with pytest.raises(RouteKeyTooLongError, match="1,025 bytes"):
        engine.update_route(b"y" * (MAX_ROUTE_KEY_BYTES + 1), None, 1)
    with pytest.raises(RouteKeyTooLongError):
        engine.update_route(b"e", longest + b"\x00", 1)
    assert isinstance(RouteKeyTooLongError("x"), ValueError)
    assert shape(engine) == before
    engine = Engine()
    engine.update_route(longest, None, 1)
    engine.update_route(b"", longest, 2)
    assert [r.group_id for r in engine.stats()] == [2, 1]


def test_hotspot_split_refuses_a_middle_over_the_limit(chunk: int) -> None:
    longest = b"x" * MAX_ROUTE_KEY_BYTES
    engine = Engine(hotspot_threshold=2)
    engine.apply_snapshot(snap(1, rd(1, longest, b"y"), rd(2, b"y", b"z")))
    engine.record_access(longest)
    before = shape(engine)
    with pytest.raises(RouteKeyTooLongError, match="hotspot split key is 1,025 bytes"):
        engine.record_access(longest)
    assert shape(engine) == before
    # A split within the limit still happens.
    engine.record_access(b"y")
    engine.record_access(b"y")
    assert [(r.start, r.end) for r in engine.stats()][1:] == [(b"y", b"y\x00"), (b"y\x00", b"z")]


# -- next_timestamp --------------------------------------------------------------------------------


def test_next_timestamp_increases() -> None:
    engine = Engine()
    values = [engine.next_timestamp() for _ in range(1000)]
    assert all(map(int.__lt__, values, values[1:]))
    assert values[0] > 10**18  # nanoseconds since the epoch


# -- threads ---------------------------------------------------------------------------------------


def run_threads(count: int, target: Callable[[int], object]) -> None:
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def body(index: int) -> None:
        try:
            barrier.wait()
            target(index)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_threads_count_exactly() -> None:
    engine = Engine()
    engine.apply_snapshot(ABC)
    per_thread = 3000
    keys = [b"a", b"c", b"e", b"zz"]

    def worker(index: int) -> None:
        for j in range(per_thread):
            engine.record_access(keys[(index + j) % 4])

    run_threads(8, worker)
    stats = shape(engine)
    assert sum(r[5] for r in stats) == 8 * per_thread
    assert [r[5] for r in stats] == [6000, 6000, 12000]


def test_threads_split_a_hotspot_exactly_once() -> None:
    threshold = 1000
    engine = Engine(hotspot_threshold=threshold)
    engine.apply_snapshot(snap(1, rd(1, b"", b"m"), rd(2, b"m", None)))

    def worker(_index: int) -> None:
        for _ in range(threshold // 10):
            engine.record_access(b"g")

    run_threads(10, worker)
    assert shape(engine) == [
        (0, b"", b"\x00", 1, ACTIVE, 0),
        (0, b"\x00", b"m", 1, ACTIVE, 0),
        (2, b"m", None, 1, ACTIVE, 0),
    ]


def test_lookups_keep_answering_while_snapshots_are_applied() -> None:
    size = 2000
    keys = sorted({random.Random(5).randbytes(6) for _ in range(size)} | {b""})

    def snapshot(version: int) -> CatalogSnapshot:
        shift = version % 2
        routes = [
            rd(i + 1, keys[i], keys[i + 1] if i + 1 < len(keys) else None, 1 + (i + shift) % 3)
            for i in range(len(keys))
        ]
        return CatalogSnapshot(version=version, routes=tuple(routes))

    engine = Engine()
    engine.apply_snapshot(snapshot(1))
    snapshots = [snapshot(v) for v in range(2, 12)]
    stop = threading.Event()
    lookups = [0]

    def reader(index: int) -> None:
        rng = random.Random(index)
        while not stop.is_set():
            key = rng.randbytes(rng.randrange(8))
            route = engine.get_route(key)
            assert route is not None and route.start <= key
            assert route.end is None or key < route.end
            assert engine.group_keys([key, key])[0][0].start <= key
            lookups[0] += 1

    def writer(index: int) -> None:
        try:
            if index == 0:
                for s in snapshots:
                    engine.apply_snapshot(s)
            else:
                reader(index)
        finally:
            stop.set()

    run_threads(3, writer)
    assert engine.version == 11
    assert lookups[0] > 0
    engine._check()


def test_next_timestamp_across_threads() -> None:
    engine = Engine()
    results: dict[int, list[int]] = {}

    def worker(index: int) -> None:
        results[index] = [engine.next_timestamp() for _ in range(2000)]

    run_threads(8, worker)
    everything = [t for values in results.values() for t in values]
    assert len(set(everything)) == len(everything)
    for values in results.values():
        assert all(map(int.__lt__, values, values[1:]))


# -- randomized comparison with a naive model ------------------------------------------------------


def by_start(route: Route) -> bytes:
    return route.start


@dataclass
class Model:
    """A deliberately simple Engine: a sorted list of routes carrying their exact loads."""

    threshold: int = 0
    version: int = 0
    table: list[Route] = field(default_factory=list)
    catalog: dict[int, Route] = field(default_factory=dict)
    #: The catalog routes as descriptors (with their parents), for the digest.
    descriptors: dict[int, RouteDescriptor] = field(default_factory=dict)

    def digest(self) -> int:
        return routes_digest(self.descriptors.values())

    def find(self, key: bytes) -> int | None:
        for i, r in enumerate(self.table):
            if r.start <= key and (r.end is None or key < r.end):
                return i
        return None

    def apply_snapshot(self, snapshot: CatalogSnapshot) -> None:
        if snapshot.version < self.version:
            raise EngineSnapshotVersionStaleError("stale")
        if snapshot.version == self.version:
            return
        self.reset(snapshot)

    def reset(self, snapshot: CatalogSnapshot) -> None:
        valid = check_catalog(list(snapshot.routes))
        self.table = [to_route(d) for d in valid]
        self.catalog = {r.route_id: r for r in self.table}
        self.descriptors = {d.route_id: d for d in valid}
        self.version = snapshot.version

    def update_route(self, start: bytes, end: bytes | None, group: int) -> None:
        if group == 0:
            raise CatalogGroupIDRequiredError("group")
        if end is not None and start >= end:
            raise CatalogInvalidRouteRangeError("range")
        for r in self.table:
            if intersects(r.start, r.end, start, end):
                raise EngineSnapshotRouteOverlapError("overlap")
        self.table.append(Route(0, start, end, group, ACTIVE, 0))
        self.table.sort(key=by_start)

    def record_access(self, key: bytes) -> None:
        i = self.find(key)
        if i is None:
            return
        route = self.table[i]
        load = route.load + 1
        if not self.threshold or load < self.threshold or route.state != ACTIVE:
            self.table[i] = route._replace(load=load)
            return
        middle = route.start + b"\x00"
        if route.end is None or middle >= route.end:
            self.table[i] = route._replace(load=0)
            return
        self.table[i : i + 1] = [
            Route(0, route.start, middle, route.group_id, ACTIVE, 0),
            Route(0, middle, route.end, route.group_id, ACTIVE, 0),
        ]

    def apply_changes(self, changes: list[CatalogChange]) -> None:
        for a, b in pairwise(changes):
            if b.previous_version != a.version:
                raise EngineSnapshotVersionGapError("gap")
        if not changes or changes[-1].version <= self.version:
            return
        starts = [c.previous_version for c in changes]
        if self.version not in starts:
            if starts[0] > self.version:
                raise EngineSnapshotVersionGapError("gap")
            raise EngineSnapshotVersionStaleError("stale")
        pending = changes[starts.index(self.version) :]
        for c in pending:
            for u in c.upserts:
                validate_route_descriptor(u)
        net: dict[int, RouteDescriptor | None] = {}
        for c in pending:
            ids = [u.route_id for u in c.upserts]
            if len(set(ids)) != len(ids):
                raise EngineSnapshotDuplicateIDError("dup")
            net.update(dict.fromkeys(c.deletes))
            net.update({u.route_id: validate_route_descriptor(u) for u in c.upserts})
        survivors = [r for i, r in self.catalog.items() if i not in net]
        added = [to_route(d) for d in net.values() if d is not None]
        # The resulting catalog must be a valid snapshot.
        check_catalog(
            [rd(r.route_id, r.start, r.end, r.group_id, r.state) for r in survivors + added]
        )
        descriptors = dict(self.descriptors)
        for c in pending:
            for i in c.deletes:
                descriptors.pop(i, None)
            descriptors.update({u.route_id: validate_route_descriptor(u) for u in c.upserts})
            if c.digest is not None and c.digest != routes_digest(descriptors.values()):
                raise EngineDigestMismatchError("digest")
        changed = [(self.catalog[i].start, self.catalog[i].end) for i in net if i in self.catalog]
        changed += [(r.start, r.end) for r in added]
        kept = [
            r
            for r in self.table
            if not (r.route_id and r.route_id in net)
            and not (not r.route_id and any(intersects(r.start, r.end, s, e) for s, e in changed))
        ]
        self.table = sorted(kept + added, key=by_start)
        for i in net:
            self.catalog.pop(i, None)
        self.catalog.update({r.route_id: r for r in added})
        self.descriptors = descriptors
        self.version = pending[-1].version

    def compare(self, engine: Engine, rng: random.Random | None = None) -> None:
        assert shape(engine) == [tuple(r) for r in self.table]
        assert engine.version == self.version
        # Read only now and then: an unread digest a snapshot did not bring stays to compute.
        if rng is None or rng.random() < 0.5:
            assert engine.digest == self.digest()
        probes = [r.start for r in self.table] + [r.end for r in self.table if r.end is not None]
        if rng is not None:
            probes += [random_key(rng) for _ in range(30)]
        for key in probes:
            i = self.find(key)
            got = engine.get_route(key)
            if i is None:
                assert got is None, key
            else:
                assert got is not None and got[:5] == self.table[i][:5], key
        grouped = engine.group_keys(probes)
        expected_groups: dict[int, list[bytes]] = {}
        for key in probes:
            i = self.find(key)
            if i is not None:
                expected_groups.setdefault(i, []).append(key)
        assert [(r[:5], ks) for r, ks in grouped] == [
            (self.table[i][:5], sorted(ks)) for i, ks in sorted(expected_groups.items())
        ]
        if rng is not None:
            for _ in range(5):
                a, b = sorted([random_key(rng), random_key(rng)])
                end = None if rng.random() < 0.3 else b
                want = [r[:5] for r in self.table if intersects(r.start, r.end, a, end)]
                if end is not None and a >= end:
                    want = []
                assert [r[:5] for r in engine.get_intersecting_routes(a, end)] == want


def same_in_c_and_python(engine: Engine, twin: Engine, rng: random.Random) -> None:
    """Two Engines fed the same operations, on the C table and on the pure-Python one, agree."""
    assert engine.implementation != twin.implementation
    assert shape(engine) == shape(twin)
    assert engine.version == twin.version
    keys = [random_key(rng) for _ in range(40)]
    keys += [r.start for r in engine.stats()]
    assert [engine.get_route(k) for k in keys] == [twin.get_route(k) for k in keys]
    assert engine.group_keys(keys) == twin.group_keys(keys)
    a, b = sorted([random_key(rng), random_key(rng)])
    assert engine.get_intersecting_routes(a, b) == twin.get_intersecting_routes(a, b)


def twin_of(engine: Engine, monkeypatch: pytest.MonkeyPatch, threshold: int) -> Engine:
    """A new Engine on the other table implementation than ``engine``'s."""
    other = (
        _pylookup if engine.implementation == "c" else pytest.importorskip("distribution._lookup")
    )
    with monkeypatch.context() as patch:
        patch.setattr(table_module, "IMPLEMENTATION", other)
        return Engine(hotspot_threshold=threshold)


def intersects(s1: bytes, e1: bytes | None, s2: bytes, e2: bytes | None) -> bool:
    return (e2 is None or s1 < e2) and (e1 is None or s2 < e1)


def to_route(d: RouteDescriptor) -> Route:
    return Route(d.route_id, d.start, d.end, d.group_id, RouteState(d.state), 0)


def check_catalog(routes: list[RouteDescriptor]) -> list[RouteDescriptor]:
    valid = [validate_route_descriptor(r) for r in routes]
    ids = [r.route_id for r in valid]
    if len(set(ids)) != len(ids):
        raise EngineSnapshotDuplicateIDError("dup")
    valid.sort(key=lambda r: r.start)
    for a, b in pairwise(valid):
        if a.start == b.start or a.end is None:
            raise EngineSnapshotRouteOrderError("order")
        if a.end > b.start:
            raise EngineSnapshotRouteOverlapError("overlap")
    return valid


def random_key(rng: random.Random) -> bytes:
    return bytes(rng.choice(b"\x00abcd") for _ in range(rng.randrange(4)))


def random_layout(rng: random.Random, first_id: int) -> list[RouteDescriptor]:
    """Random routes: mostly valid (gaps, shared ends, one unbounded), sometimes broken."""
    keys = sorted({random_key(rng) for _ in range(rng.randrange(0, 14))})
    routes = []
    next_id = first_id
    for i, start in enumerate(keys):
        if rng.random() < 0.2:
            continue
        if i + 1 < len(keys):
            end: bytes | None = keys[i + 1] if rng.random() < 0.7 else start + b"\x00"
            if end is not None and end > keys[i + 1]:
                end = keys[i + 1]
        else:
            end = None if rng.random() < 0.5 else start + b"z"
        state = rng.choice(list(RouteState))
        parent = rng.choice([0, 0, next_id - 1, UINT64_MAX])
        routes.append(rd(next_id, start, end, rng.randrange(1, 4), state, parent))
        next_id += 1
    if routes and rng.random() < 0.15:
        victim = rng.randrange(len(routes))
        kind = rng.randrange(5)
        r = routes[victim]
        if kind == 0:
            routes[victim] = r._replace(route_id=routes[0].route_id if victim else 0)
        elif kind == 1:
            routes[victim] = r._replace(group_id=0)
        elif kind == 2:
            routes[victim] = r._replace(end=r.start)
        elif kind == 3:
            routes[victim] = r._replace(end=None)
        else:
            routes[victim] = r._replace(state=7)  # type: ignore[arg-type]
    rng.shuffle(routes)
    return routes


def random_change(rng: random.Random, model: Model, next_id: int) -> tuple[CatalogChange, int]:
    routes = sorted(model.catalog.values(), key=lambda r: r.start)
    upserts: list[RouteDescriptor] = []
    deletes: list[int] = []
    for _ in range(rng.randrange(1, 4)):
        kind = rng.randrange(6)
        if kind == 0 and routes:  # split
            r = rng.choice(routes)
            middle = r.start + rng.choice([b"\x00", b"b", b"c"])
            if r.end is None or middle < r.end:
                deletes.append(r.route_id)
                upserts.append(rd(next_id, r.start, middle, r.group_id, ACTIVE, r.route_id))
                upserts.append(rd(next_id + 1, middle, r.end, r.group_id, ACTIVE, r.route_id))
                next_id += 2
        elif kind == 1 and len(routes) > 1:  # merge neighbours
            i = rng.randrange(len(routes) - 1)
            a, b = routes[i], routes[i + 1]
            deletes += [a.route_id, b.route_id]
            upserts.append(rd(next_id, a.start, b.end, a.group_id))
            next_id += 1
        elif kind == 2 and routes:  # move / change state
            r = rng.choice(routes)
            upserts.append(
                rd(
                    r.route_id,
                    r.start,
                    r.end,
                    rng.randrange(1, 5),
                    rng.choice(list(RouteState)),
                    rng.choice([0, r.route_id, UINT64_MAX]),
                )
            )
        elif kind == 3 and routes:
            deletes.append(rng.choice(routes).route_id)
        else:  # a random new route, often overlapping something
            low, high = sorted([random_key(rng), random_key(rng) + b"\x01"])
            upserts.append(
                rd(
                    next_id,
                    low,
                    None if rng.random() < 0.2 else high,
                    rng.randrange(0 if rng.random() < 0.05 else 1, 4),
                )
            )
            next_id += 1
    previous = model.version
    return change(previous, previous + 1, tuple(upserts), tuple(deletes)), next_id


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_match_the_model(
    seed: int, chunk: int, change_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(seed)
    threshold = rng.choice([0, 2, 3, 5])
    engine = Engine(hotspot_threshold=threshold)
    twin = twin_of(engine, monkeypatch, threshold)
    model = Model(threshold=threshold)
    next_id = 1
    for _step in range(300):
        op = rng.random()
        action: tuple[Callable[[], None], Callable[[], None]]
        if op < 0.08:
            version = model.version + rng.choice([-1, 0, 1, 1, 1, 2])
            snapshot = with_digest(
                rng, CatalogSnapshot(max(version, 0), tuple(random_layout(rng, next_id)))
            )
            next_id += 20
            method = "reset" if rng.random() < 0.3 else "apply_snapshot"
            action = (
                partial(getattr(engine, method), snapshot),
                partial(getattr(model, method), snapshot),
            )
        elif op < 0.35:
            c, next_id = random_change(rng, model, next_id)
            c = change_with_digest(rng, model, c)
            batch = [c]
            if c.previous_version and rng.random() < 0.2:
                batch.insert(0, change(c.previous_version - 1, c.previous_version))
            if rng.random() < 0.05:
                batch = [change(c.previous_version + 1, c.version + 1)]
            action = (partial(engine.apply_changes, batch), partial(model.apply_changes, batch))
        elif op < 0.45:
            low, high = sorted([random_key(rng), random_key(rng) + b"\x01"])
            args = (
                low,
                None if rng.random() < 0.2 else high,
                rng.randrange(0 if rng.random() < 0.05 else 1, 4),
            )
            action = (partial(engine.update_route, *args), partial(model.update_route, *args))
        else:
            key = random_key(rng)
            action = (partial(engine.record_access, key), partial(model.record_access, key))
        expected_error: type[Exception] | None = None
        try:
            action[1]()
        except (DistributionError, ValueError, TypeError) as error:
            expected_error = type(error)
        on_engine = action[0]
        assert isinstance(on_engine, partial)
        on_twin = partial(getattr(twin, on_engine.func.__name__), *on_engine.args)
        for call in (on_engine, on_twin):
            if expected_error is None:
                call()
            else:
                with pytest.raises(expected_error):
                    call()
        model.compare(engine, rng)
        same_in_c_and_python(engine, twin, rng)
        assert engine.route_count == twin.route_count == len(model.catalog)
    assert engine.digest == twin.digest == model.digest()


def with_digest(rng: random.Random, snapshot: CatalogSnapshot) -> CatalogSnapshot:
    """The snapshot, carrying its digest (as a catalog read does) half the time."""
    if rng.random() < 0.5:
        return snapshot
    try:
        valid = check_catalog(list(snapshot.routes))
    except (DistributionError, ValueError):
        return snapshot
    return dataclasses.replace(snapshot, digest=routes_digest(valid))


def change_with_digest(rng: random.Random, model: Model, c: CatalogChange) -> CatalogChange:
    """The change carrying the digest it leads to, or a wrong one, or none."""
    after = copy.deepcopy(model)
    try:
        after.apply_changes([c])
    except (DistributionError, ValueError, TypeError):
        return c
    kind = rng.randrange(4)
    if kind == 0:
        return c
    digest = after.digest()
    return dataclasses.replace(c, digest=digest if kind < 3 else digest ^ (1 << rng.randrange(64)))


def test_large_snapshot_and_changes_match_the_model(change_path: str) -> None:
    rng = random.Random(11)
    keys = sorted({rng.randbytes(rng.randrange(1, 5)) for _ in range(5000)})
    routes = []
    for i, start in enumerate(keys[:-1]):
        end = keys[i + 1] if rng.random() < 0.9 else start + b"\x00"
        end = min(end, keys[i + 1])
        routes.append(rd(i + 1, start, end, 1 + i % 5))
    engine = Engine(hotspot_threshold=3)
    model = Model(threshold=3)
    snapshot = CatalogSnapshot(1, tuple(routes))
    engine.apply_snapshot(snapshot)
    model.apply_snapshot(snapshot)
    model.compare(engine)
    next_id = len(routes) + 1
    for _ in range(40):
        c, next_id = random_change(rng, model, next_id)
        for _ in range(20):
            key = rng.choice(keys)
            engine.record_access(key)
            model.record_access(key)
        try:
            model.apply_changes([c])
        except (DistributionError, ValueError) as error:
            with pytest.raises(type(error)):
                engine.apply_changes([c])
        else:
            engine.apply_changes([c])
    model.compare(engine, rng)


# -- the garbage collector around bulk builds ------------------------------------------------------


def test_snapshot_restores_the_garbage_collector() -> None:
    engine = Engine()
    assert gc.isenabled()
    engine.apply_snapshot(ABC)
    assert gc.isenabled()
    gc.disable()
    try:
        engine.apply_snapshot(snap(2, rd(1, b"", None)))
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(EngineSnapshotRouteOrderError):
        engine.apply_snapshot(snap(3, rd(1, b"a", None), rd(2, b"b", None)))
    assert gc.isenabled()


def test_snapshot_keeps_the_applications_frozen_objects_frozen() -> None:
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        Engine().apply_snapshot(ABC)
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


# -- keys the packed table must not confuse --------------------------------------------------------


def routes_over(keys: list[bytes], last_end: bytes | None = None) -> list[RouteDescriptor]:
    """Contiguous routes ``[keys[i], keys[i + 1])`` with ids 1, 2, ..., the last one ending at
    ``last_end`` (none for no key)."""
    ends: list[bytes | None] = [*keys[1:], last_end]
    return [
        rd(i + 1, start, end, 1 + i % 7)
        for i, (start, end) in enumerate(zip(keys, ends, strict=False))
    ]


def check_against_model(engine: Engine, model: Model, rng: random.Random) -> None:
    model.compare(engine, rng)
    for route in model.table:
        assert engine.get_route(route.start) == route._replace(load=0)
        if route.end is not None:
            before_end = route.end[:-1] if route.end[-1:] == b"\x00" else None
            if before_end is not None and before_end >= route.start:
                assert engine.get_route(before_end) == route._replace(load=0)


@pytest.mark.parametrize("shared", [8, 9, 16, 40])
def test_keys_sharing_long_prefixes(shared: int, chunk: int) -> None:
    """Keys equal in their first 8 bytes (and more) tie on every prefix: only the whole keys
    order them, and a catalog route is found by id among chunks that all share its prefix."""
    rng = random.Random(shared)
    head = b"tenant-" + b"\x00" * (shared - 7)
    keys = sorted({head + rng.randbytes(rng.randrange(0, 3)) for _ in range(300)})
    keys += [head[:7], head[:7] + b"\x00"]  # shorter keys that zero-pad to the same prefix
    keys = sorted(set(keys))
    engine = Engine()
    model = Model()
    snapshot = snap(1, *routes_over(keys))
    engine.apply_snapshot(snapshot)
    model.apply_snapshot(snapshot)
    check_against_model(engine, model, rng)
    # Split, delete and replace routes by id: each is found among routes of one prefix.
    next_id = len(keys) + 1
    for version in range(2, 30):
        c, next_id = random_change(rng, model, next_id)
        c = change(version - 1, version, c.upserts, c.deletes)
        try:
            model.apply_changes([c])
        except (DistributionError, ValueError) as error:
            with pytest.raises(type(error)):
                engine.apply_changes([c])
            model.version = version
            engine.apply_changes([change(version - 1, version)])
        else:
            engine.apply_changes([c])
        check_against_model(engine, model, rng)


def test_empty_and_maximal_keys(chunk: int) -> None:
    """The empty key, keys of zeros (which pad to the empty key's prefix), keys of 0xff bytes
    (the largest prefix) and a long key: bounds, lookups and batches."""
    huge = b"\xff" * 4096
    keys = [b"", b"\x00", b"\x00" * 8, b"\x00" * 9, b"\x7f", b"\xff" * 7, b"\xff" * 8, huge]
    engine = Engine()
    engine.apply_snapshot(snap(1, *routes_over(keys)))
    engine._check()
    probes = [*keys, b"\x00" * 20, b"\xff" * 9, huge + b"\x00", b"\xff" * 5000, b"\x01"]
    for key in probes:
        route = engine.get_route(key)
        assert route is not None
        assert route.start <= key and (route.end is None or key < route.end)
    assert engine.get_route(huge).route_id == len(keys)
    assert engine.get_route(b"").route_id == 1
    grouped = engine.group_keys(probes)
    assert [k for _, ks in grouped for k in ks] == sorted(probes)
    # A bounded last route: keys past it, the largest included, fall in no route.
    engine.apply_snapshot(snap(2, *routes_over(keys[:-1], last_end=huge)))
    engine._check()
    assert engine.get_route(huge) is None
    assert engine.get_route(b"\xff" * 5000) is None
    assert engine.get_route(b"\xff" * 4095).route_id == len(keys) - 1
    assert engine.group_keys([huge, b"\xff" * 5000]) == []
    # A hotspot split of the route at the empty key, and of the one just below the largest.
    hot = Engine(hotspot_threshold=1)
    hot.apply_snapshot(snap(1, *routes_over(keys[:-1], last_end=huge)))
    hot.record_access(b"")
    hot.record_access(b"\xff" * 8)
    hot._check()
    assert hot.get_route(b"").end == b"\x00"
    assert hot.get_route(b"\xff" * 8).end == b"\xff" * 8 + b"\x00"


def sizes_around(chunk: int) -> list[int]:
    """Route counts just below, at and above each of the first few multiples of ``chunk``
    (and of half of it: tables are cut into chunks of chunk / 2 to 2 chunk bounds)."""
    sizes = {0, 1, 2, 3}
    for multiple in range(1, 5):
        for edge in (multiple * chunk, multiple * chunk // 2):
            sizes.update(edge + d for d in (-2, -1, 0, 1, 2) if edge + d >= 0)
    return sorted(sizes)


@pytest.mark.parametrize("chunk_size", [2, 3, 4, 7, 16])
def test_table_sizes_crossing_every_block_boundary(
    chunk_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tables of every size around the chunk size's multiples (with gaps, and without), then a
    split at the first, a middle and the last route, all checked against the model."""
    monkeypatch.setattr(table_module, "CHUNK", chunk_size)
    monkeypatch.setattr(_pylookup, "_BLOCK", max(chunk_size, 3))
    rng = random.Random(chunk_size)
    for size in sizes_around(chunk_size):
        keys = [b"k%05d" % i for i in range(size)]
        for gaps in (False, True):
            routes = routes_over(keys, last_end=b"l" if gaps else None)
            if gaps:
                routes = [
                    r._replace(end=r.start + b"\x00") if i % 3 == 1 else r
                    for i, r in enumerate(routes)
                ]
            engine = Engine()
            model = Model()
            snapshot = snap(1, *routes)
            engine.apply_snapshot(snapshot)
            model.apply_snapshot(snapshot)
            check_against_model(engine, model, rng)
            picks = sorted({0, size // 2, size - 1} & set(range(size)))
            for pick in picks:
                version = engine.version + 1
                victim = routes[pick]
                middle = victim.start + b"m"
                if victim.end is not None and middle >= victim.end:
                    continue
                c = change(
                    version - 1,
                    version,
                    (
                        rd(10_000 + 2 * version, victim.start, middle, victim.group_id),
                        rd(10_001 + 2 * version, middle, victim.end, victim.group_id),
                    ),
                    (victim.route_id,),
                )
                model.apply_changes([c])
                engine.apply_changes([c])
                check_against_model(engine, model, rng)


# -- the Reader's cache of Routes, and large changes ----------------------------------------------


def many_routes(count: int, first_id: int = 1, group: int = 1) -> list[RouteDescriptor]:
    """``count`` contiguous routes over 4-byte keys, ids from ``first_id``, the last unbounded."""
    keys = [i.to_bytes(4, "big") for i in range(0, 7 * count, 7)]
    return [
        rd(first_id + i, key, keys[i + 1] if i + 1 < count else None, group + i % 3)
        for i, key in enumerate(keys)
    ]


WRITES: dict[str, Callable[[Engine], None]] = {
    "apply_changes": lambda e: e.apply_changes(
        [change(1, 2, (rd(2, b"b", b"d", 9),), ())]  # route 2 moves to group 9
    ),
    "apply_snapshot": lambda e: e.apply_snapshot(snap(2, rd(1, b"", b"b"), rd(2, b"b", b"d", 9))),
    "reset": lambda e: e.reset(snap(1, rd(1, b"", b"b"), rd(2, b"b", b"d", 9))),
    "update_route": lambda e: e.apply_changes([change(1, 2, (), (2,))])
    or e.update_route(b"b", b"d", 9),
    "record_access": lambda e: [e.record_access(b"c") for _ in range(2)] and None,
}


@pytest.mark.parametrize("write", sorted(WRITES))
def test_a_lookup_after_a_write_sees_it(write: str, chunk: int) -> None:
    """Routes looked up (and cached) before a write are not answered after it."""
    engine = Engine(hotspot_threshold=2)
    engine.apply_snapshot(ABC)
    keys = [b"a", b"c", b"c\x00", b"e"]
    before = [engine.get_route(key) for key in keys]
    assert [engine.get_route(key) for key in keys] == before
    assert engine.group_keys(keys) == [(before[0], [b"a"]), (before[1], [b"c", b"c\x00"]),
                                       (before[3], [b"e"])]
    WRITES[write](engine)
    engine._check()
    stats = [r._replace(load=0) for r in engine.stats()]
    expected = {key: next((r for r in stats if r.start <= key and (r.end is None or key < r.end)),
                          None) for key in keys}
    assert [engine.get_route(key) for key in keys] == [expected[key] for key in keys]
    assert engine.get_route(b"c") != before[1]
    grouped = engine.group_keys(keys)
    assert [ks for _, ks in grouped] == [
        [key for key in keys if expected[key] == route] for route, _ in grouped
    ]
    assert all(route == expected[ks[0]] for route, ks in grouped)


def test_lookups_after_each_of_many_snapshots_see_the_latest() -> None:
    """Each snapshot frees the chunks of the one before, and new chunks may take their
    addresses: a Route cached from the old table must not answer for the new one."""
    engine = Engine()
    keys = [route.start + b"\x01" for route in many_routes(300)]
    for version in range(1, 40):
        engine.apply_snapshot(CatalogSnapshot(version, tuple(many_routes(300, group=version))))
        for _ in range(2):
            found = [engine.get_route(key) for key in keys]
            assert [(r.route_id, r.group_id) for r in found if r is not None] == [
                (i + 1, version + i % 3) for i in range(300)
            ]
        assert [r.group_id for r, _ in engine.group_keys(keys)] == [
            version + i % 3 for i in range(300)
        ]


def test_lookups_of_more_routes_than_the_cache_holds() -> None:
    """3,500 routes: a table of 3 chunks, cached, with more slots than the cache's 2,048."""
    rng = random.Random(3)
    routes = many_routes(3500)
    engine = Engine()
    engine.apply_snapshot(CatalogSnapshot(1, tuple(routes)))
    assert len(engine._table.chunks) == 3
    expected = [to_route(r) for r in routes]
    for _ in range(3):
        order = rng.sample(range(3500), 3500)
        assert [engine.get_route(routes[i].start) for i in order] == [expected[i] for i in order]
        batch = [routes[i].start for i in order[:3000]]
        assert engine.group_keys(batch) == [
            (expected[i], [routes[i].start]) for i in sorted(order[:3000])
        ]


def test_threads_count_exactly_while_looking_up_cached_routes() -> None:
    engine = Engine()
    engine.apply_snapshot(CatalogSnapshot(1, tuple(many_routes(3000))))
    keys = [r.start for r in many_routes(3000)]
    per_thread = 2000

    def worker(index: int) -> None:
        rng = random.Random(index)
        for j in range(per_thread):
            key = keys[(index * 7 + j) % 100]
            assert engine.get_route(key) == engine.get_route(key)
            engine.record_access(key)
            if j % 100 == 0:
                engine.group_keys(rng.sample(keys, 50))

    run_threads(8, worker)
    loads = [r.load for r in engine.stats()]
    assert sum(loads) == 8 * per_thread
    counts = [0] * 3000
    for index in range(8):
        for j in range(per_thread):
            counts[(index * 7 + j) % 100] += 1
    assert loads == counts
    assert all(r.load == 0 for r in map(engine.get_route, keys) if r is not None)


def test_readers_see_each_write_once_it_returns() -> None:
    """Readers looping over cached routes while a writer moves routes between groups: whatever
    a reader reads after a write returned is that write's result."""
    engine = Engine()
    routes = many_routes(2000)
    engine.apply_snapshot(CatalogSnapshot(1, tuple(routes)))
    keys = [r.start for r in routes]
    published = [1]
    stop = threading.Event()
    errors: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            version = published[0]
            for key in keys[:200]:
                route = engine.get_route(key)
                if route is None or route.group_id < version:
                    errors.append(f"{key!r}: {route} after version {version}")

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    for version in range(2, 30):
        moved = tuple(r._replace(group_id=version + 10) for r in routes[:200])
        engine.apply_changes([change(version - 1, version, moved, ())])
        published[0] = version + 10
    stop.set()
    for thread in threads:
        thread.join()
    assert errors == []


def large_change(
    rng: random.Random, routes: list[RouteDescriptor], version: int, next_id: int
) -> CatalogChange:
    """A change of about a tenth of ``routes``: moves, deletes and splits."""
    upserts: list[RouteDescriptor] = []
    deletes: list[int] = []
    for route in rng.sample(routes, len(routes) // 10):
        kind = rng.randrange(3)
        if kind == 0:
            upserts.append(route._replace(group_id=route.group_id % 5 + 1))
        elif kind == 1:
            deletes.append(route.route_id)
        elif route.end is not None:
            middle = route.start + b"\x00"
            deletes.append(route.route_id)
            parent = route.route_id
            upserts.append(rd(next_id, route.start, middle, route.group_id, ACTIVE, parent))
            upserts.append(rd(next_id + 1, middle, route.end, route.group_id, ACTIVE, parent))
            next_id += 2
    return change(version, version + 1, tuple(upserts), tuple(deletes))


def changed_engine(
    holds: str, rebuilds: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[Engine, str]:
    """An Engine of 600 routes holding ``holds`` too, after a change of a tenth of them applied
    by a rebuild or a rewrite, and the message of the error a bad change then raised."""
    rng = random.Random(holds)
    routes = many_routes(600)
    engine = Engine(hotspot_threshold=3)
    engine.apply_snapshot(CatalogSnapshot(1, tuple(routes)))
    monkeypatch.setattr(engine_module, "_rebuilds", lambda *_, **__: rebuilds)
    keys = rng.sample([r.start for r in routes[:-3]], 50)
    if holds == "loads":
        for key in keys:
            engine.record_access(key)
    elif holds == "ephemeral":
        engine.apply_changes([change(1, 2, (), tuple(r.route_id for r in routes[-3:]))])
        engine.update_route(routes[-3].start, None, 4)
    elif holds == "shadowed":
        for key in keys:
            for _ in range(3):
                engine.record_access(key)
    version = engine.version
    c = large_change(random.Random(7), routes[:-3], version, 10_000)
    with pytest.raises(EngineDigestMismatchError):
        engine.apply_changes([dataclasses.replace(c, digest=0)])
    engine._check()
    engine.apply_changes([c])
    engine._check()
    # An overlapping upsert among many deletes: the error, and nothing changes.
    bad = change(
        c.version,
        c.version + 1,
        (rd(20_000, b"\x00\x00\x00\x05", b"\x00\x00\x03\x00"),),
        tuple(r.route_id for r in routes[100:200]),
    )
    before = engine.stats()
    with pytest.raises(EngineSnapshotRouteOverlapError) as raised:
        engine.apply_changes([bad])
    assert engine.stats() == before
    return engine, str(raised.value)


@pytest.mark.parametrize("holds", ["catalog", "loads", "ephemeral", "shadowed"])
def test_large_changes_rebuilt_or_rewritten_agree(
    holds: str, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change of a tenth of the routes, applied by a rebuild and by a rewrite, to Engines
    holding catalog routes only, or loads, ephemeral routes, hotspot pieces too."""
    rebuilt, rebuilt_error = changed_engine(holds, True, monkeypatch)
    rewritten, rewritten_error = changed_engine(holds, False, monkeypatch)
    assert rebuilt.stats() == rewritten.stats()
    assert rebuilt.digest == rewritten.digest
    assert rebuilt.route_count == rewritten.route_count
    assert rebuilt_error == rewritten_error
    keys = [r.start for r in many_routes(600)]
    keys += [key + b"\x00" for key in keys]
    assert [rebuilt.get_route(k) for k in keys] == [rewritten.get_route(k) for k in keys]
    assert rebuilt.group_keys(keys) == rewritten.group_keys(keys)


def test_a_change_is_rebuilt_when_large_for_its_table() -> None:
    rebuilds = engine_module._rebuilds
    assert not rebuilds(3, 1, merged=True)  # a split splices its chunk
    assert rebuilds(4, 1, merged=True)
    assert not rebuilds(40, 98, merged=True)
    assert rebuilds(49, 98, merged=True)
    assert not rebuilds(63, 1, merged=False)
    assert rebuilds(64, 1, merged=False)
    assert not rebuilds(150, 98, merged=False)
    assert rebuilds(196, 98, merged=False)


def test_engines_rebuilt_at_once_hold_one_table_being_built_at_a_time() -> None:
    """Eight Engines of one process given a new catalog at once (the watchers of a process fed
    the same change) build one table at a time: the memory they need beside their tables is one
    table's, not eight."""
    import tracemalloc

    rng = random.Random(7)
    keys = sorted({rng.randbytes(8) for _ in range(60_000)})
    first = CatalogSnapshot(version=1, routes=tuple(routes_over(keys)))
    second = CatalogSnapshot(version=2, routes=tuple(routes_over(keys[1:])))
    engines = [Engine() for _ in range(8)]
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        engines[0].apply_snapshot(first)
        one_table = tracemalloc.get_traced_memory()[0] - before
        for engine in engines[1:]:
            engine.apply_snapshot(first)
        held, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        start = threading.Barrier(len(engines))

        def rebuild(engine: Engine) -> None:
            start.wait()
            engine.apply_snapshot(second)

        threads = [threading.Thread(target=rebuild, args=(e,)) for e in engines]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(engine.version == 2 for engine in engines)
    # One table at a time, and its build's staging (about 0.7 of a table in C): an Engine that
    # released the build before swapping its table in let the next build start beside it.
    assert peak - held < 2 * one_table

"""Tests of the Engine's searches, in C (distribution._lookup) and in pure Python
(distribution._pylookup), against bisect over plain lists.

The Engine's own tests (test_engine.py) go through these functions too; here the batches are
large enough for every sorting path of the C one (insertion, merge, radix with runs of equal
prefixes), the keys are chosen to defeat an 8-byte prefix, and malformed tables must make the C
searches raise, never crash.
"""

from __future__ import annotations

import gc
import random
import sys
from bisect import bisect_left, bisect_right
from itertools import groupby
from types import ModuleType

import pytest

import distribution.table as table_module
from distribution import (
    MAX_ROUTE_KEY_BYTES,
    Engine,
    Route,
    RouteDescriptor,
    RouteState,
    _pylookup,
    codec,
    validate_route_descriptor,
)
from distribution.types import CatalogSnapshot

_lookup = pytest.importorskip("distribution._lookup")

#: Keys that differ only past their first 8 bytes, are prefixes of one another, or end in zeros.
_TRICKY = [
    b"",
    b"\x00",
    b"\x00\x00",
    b"a",
    b"a\x00",
    b"a\x00\x00\x00\x00\x00\x00\x00",
    b"a\x00\x00\x00\x00\x00\x00\x00\x00",
    b"tenant-0001/a",
    b"tenant-0001/b",
    b"tenant-0001/",
    b"tenant-0002",
    b"\xff" * 8,
    b"\xff" * 9,
]


@pytest.fixture(params=["c", "python"])
def search(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Each table implementation in turn (Engines made in the test use it): both answer every
    test alike."""
    module: ModuleType = _lookup if request.param == "c" else _pylookup
    monkeypatch.setattr(table_module, "IMPLEMENTATION", module)
    return module


def _random_key(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.3:
        return rng.choice(_TRICKY)
    if kind < 0.6:
        return b"tenant-0001/" + bytes(rng.choice(b"\x00ab\xff") for _ in range(rng.randrange(4)))
    return bytes(rng.choice(b"\x00\x01a\x7f\xff") for _ in range(rng.randrange(12)))


def _engine(rng: random.Random, routes: int) -> tuple[Engine, list[bytes], list[Route | None]]:
    """An Engine of random routes with gaps, and the flat bounds and slots a bisect reads.

    ``slots[i]`` covers ``[bounds[i - 1], bounds[i])``; the first slot and every gap hold None.
    """
    keys = sorted({_random_key(rng) for _ in range(routes * 2)})
    descriptors: list[RouteDescriptor] = []
    bounds: list[bytes] = []
    slots: list[Route | None] = [None]
    i = 0
    while i + 1 < len(keys):
        start, end = keys[i], keys[i + 1]
        descriptor = RouteDescriptor(len(descriptors) + 1, start, end, 1)
        descriptors.append(descriptor)
        route = Route(descriptor.route_id, start, end, 1, RouteState.ACTIVE, 0)
        if bounds and bounds[-1] == start:
            slots[-1] = route
        else:
            bounds.append(start)
            slots.append(route)
        bounds.append(end)
        slots.append(None)
        i += rng.choice((1, 2))  # 2 leaves a gap
    engine = Engine()
    engine.apply_snapshot(CatalogSnapshot(version=1, routes=tuple(descriptors)))
    return engine, bounds, slots


def _expected(
    bounds: list[bytes], slots: list[Route | None], keys: list[bytes]
) -> list[tuple[Route, list[bytes]]]:
    """The groups as bisect over the flat lists finds them, in key order, gaps left out."""
    result: list[tuple[Route, list[bytes]]] = []
    for p, members in groupby(sorted(keys), key=lambda key: bisect_right(bounds, key)):
        route = slots[p]
        if route is not None:
            result.append((route, list(members)))
    return result


@pytest.mark.parametrize("seed", range(12))
def test_find_and_group_match_bisect(
    search: ModuleType, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(seed)
    # Small chunks on odd seeds: groups then cross chunk edges.
    if seed % 2:
        monkeypatch.setattr(table_module, "CHUNK", 4)
        monkeypatch.setattr(_pylookup, "_BLOCK", 4)
    engine, bounds, slots = _engine(rng, rng.choice((3, 40, 300)))
    engine._check()
    table = engine._table
    for size in (0, 1, 2, 17, 64, 65, 200, 1000):
        keys = [_random_key(rng) for _ in range(size)]
        keys += rng.sample(bounds, min(len(bounds), size // 4))
        rng.shuffle(keys)
        want = _expected(bounds, slots, keys)
        assert search.group(table, keys) == want
        assert search.group(table, sorted(keys)) == want
        assert search.group(table, sorted(keys, reverse=True)) == want
        for key in keys:
            assert search.find(table, key) == slots[bisect_right(bounds, key)]


def _two_level(table: object, key: bytes) -> object:
    """The Engine's lookup written with bisect over lists: the chunk over tops, then the slot
    over bounds."""
    tops, chunks = table  # type: ignore[misc]
    bounds, slots = chunks[bisect_right(tops, key)]
    return slots[bisect_right(bounds, key)]


@pytest.mark.parametrize("seed", range(8))
def test_chunks_of_every_small_size(search: ModuleType, seed: int) -> None:
    """Tables built by hand, whose chunks hold 0 to 6 bounds: searches side by side over lists
    of different sizes, empty ones included."""
    rng = random.Random(seed)
    keys = sorted({bytes([rng.randrange(256), rng.randrange(4)]) for _ in range(80)})
    tops: list[bytes] = []
    all_bounds: list[list[bytes]] = []
    pos = 0
    while True:
        size = rng.randrange(7)
        all_bounds.append(keys[pos : pos + size])
        pos += size
        if pos >= len(keys) - 1:
            break
        tops.append(keys[pos])
        pos += 1
    edges: list[bytes | None] = [None, *tops, None]
    chunks: list[tuple[list[bytes], list[Route | None]]] = []
    for c, bounds in enumerate(all_bounds):
        # Slot i covers [starts[i], ends[i]); the very first slot is always a gap.
        starts, ends = [edges[c], *bounds], [*bounds, edges[c + 1]]
        slots = [
            Route(1, start, end, 1, RouteState.ACTIVE, 0)
            if start is not None and rng.random() < 0.7
            else None
            for start, end in zip(starts, ends, strict=True)
        ]
        chunks.append((bounds, slots))
    lists = (tops, chunks)
    table = (
        tops,
        search.make_index(tops),
        [search.Chunk(b, s, edges[c], edges[c + 1]) for c, (b, s) in enumerate(chunks)],
        search,
    )
    for size in (2, 9, 100, 1000):
        batch = [rng.choice(keys) + rng.choice((b"", b"\x00", b"\xff")) for _ in range(size)]
        batch += [b"", b"\xff" * 3][: size // 50]
        want: list[tuple[object, list[bytes]]] = []
        for route, members in groupby(sorted(batch), key=lambda key: id(_two_level(lists, key))):
            del route
            keys_here = list(members)
            found = _two_level(lists, keys_here[0])
            if found is not None:
                want.append((found, keys_here))
        assert search.group(table, batch) == want
        assert [search.find(table, key) for key in batch] == [
            _two_level(lists, key) for key in batch
        ]


def test_an_empty_table_groups_nothing(search: ModuleType) -> None:
    table = Engine()._table
    for size in (1, 2, 8, 9, 100):
        assert search.group(table, [bytes([i]) for i in range(size)]) == []


def test_group_keeps_duplicates_and_the_key_objects_in_their_order(search: ModuleType) -> None:
    engine = Engine.with_default_route()
    keys = [bytes([i % 7]) * 9 for i in range(300)]
    [(route, grouped)] = search.group(engine._table, keys)
    assert route.route_id == 0
    assert grouped == sorted(keys)
    # Equal keys keep the order they came in, as sorted() keeps them.
    assert list(map(id, grouped)) == list(map(id, sorted(keys)))


def test_a_finalizer_emptying_the_keys_during_group_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Allocating the groups runs the garbage collector, and so finalizers: one that empties the
    caller's list, freeing its keys, must not reach the keys being grouped (by the C search)."""
    monkeypatch.setattr(table_module, "IMPLEMENTATION", _lookup)
    starts = [bytes([i]) for i in range(251)]
    engine = Engine()
    engine.apply_snapshot(
        CatalogSnapshot(
            version=1,
            routes=tuple(
                RouteDescriptor(i + 1, start, starts[i + 1] if i + 1 < len(starts) else None, 1)
                for i, start in enumerate(starts)
            ),
        )
    )
    # Keys in every route, so that the groups outnumber the interpreter's spare lists and
    # tuples, and their allocation must call on the collector.
    keys = [bytes([i % 251, i % 13]) * 3 for i in range(1000)]
    by_route: dict[int, list[bytes]] = {}
    for key in sorted(keys):
        by_route.setdefault(key[0] + 1, []).append(bytes(bytearray(key)))  # equal, not the same
    want = sorted(by_route.items())

    class EmptiesTheKeys:
        def __init__(self) -> None:
            self.cycle = self  # garbage only the cyclic collector finds

        def __del__(self) -> None:
            keys.clear()

    EmptiesTheKeys()
    threshold = gc.get_threshold()
    gc.set_threshold(1)
    try:
        got = _lookup.group(engine._table, keys)
    finally:
        gc.set_threshold(*threshold)
    assert keys == []  # the finalizer ran during the call
    assert [(route.route_id, grouped) for route, grouped in got] == want


def test_group_of_a_list_leaves_the_list_alone(search: ModuleType) -> None:
    engine = Engine.with_default_route()
    keys = [b"c", b"a", b"b"] * 40
    before = list(keys)
    search.group(engine._table, keys)
    assert keys == before


def test_a_key_that_is_not_bytes_raises_type_error(search: ModuleType) -> None:
    table = Engine.with_default_route()._table
    with pytest.raises(TypeError, match="must be bytes, got str"):
        search.find(table, "k")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be bytes, got bytearray"):
        search.group(table, [b"a"] * 100 + [bytearray(b"k")])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="must be a list"):
        search.group(table, (b"a",))  # type: ignore[arg-type]


def _route(start: bytes) -> Route:
    return Route(1, start, None, 1, RouteState.ACTIVE, 0)


def _malformed_tables() -> list[object]:
    chunk = _lookup.Chunk([b"a"], [None, _route(b"a")], None, None)
    index = _lookup.make_index([])
    return [
        None,
        ([], []),
        ([], index),
        ([], index, []),
        ([], index, [chunk, chunk]),
        ([], index, ["chunk"]),
        ([], [], [chunk]),
        [[], index, [chunk]],
    ]


@pytest.mark.parametrize(
    "table",
    _malformed_tables(),
    ids=[
        "not-a-tuple",
        "a-pair",
        "a-pair-with-index",
        "no-chunk",
        "more-chunks-than-the-index-has-room-for",
        "chunk-of-a-string",
        "index-not-a-chunk",
        "a-list",
    ],
)
def test_a_malformed_table_raises_instead_of_crashing(table: object) -> None:
    for key in (b"", b"a", b"m", b"z"):
        with pytest.raises((TypeError, SystemError)):
            _lookup.find(table, key)  # type: ignore[arg-type]
        with pytest.raises((TypeError, SystemError)):
            _lookup.group(table, [key, key + b"\x00"])  # type: ignore[arg-type]


def test_a_chunk_refuses_what_it_cannot_hold() -> None:
    route = _route(b"a")
    for bounds, slots, lower, upper in [
        ([b"a"], [None], None, None),  # slots must be one more than bounds
        ([b"b", b"a"], [None, route, route], None, None),  # bounds must increase
        ([b"a"], [None, route], b"b", None),  # above the lower edge
        ([b"a"], [None, route], None, b"a"),  # below the upper edge
        ([b"a"], [route, None], None, None),  # nothing starts before the key space
        ([b"a"], [None, route._replace(group_id=0)], None, None),
        ([b"a"], [None, route._replace(state=9)], None, None),
        ([b"a"], [None, route._replace(route_id=-1)], None, None),
        ([b"a"], [None, "route"], None, None),
        ([bytearray(b"a")], [None, route], None, None),
    ]:
        with pytest.raises((TypeError, ValueError)):
            _lookup.Chunk(bounds, slots, lower, upper)  # type: ignore[arg-type]


# -- the catalog digest -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_route_hash_is_the_codecs(search: ModuleType, seed: int) -> None:
    """Records of every length around MD5's 64-byte blocks, unbounded ends, extreme fields."""
    rng = random.Random(seed)
    for length in range(0, 200):
        start = rng.randbytes(length)
        end = None if rng.random() < 0.3 else start + rng.randbytes(rng.randrange(1, 140))
        route = RouteDescriptor(
            rng.choice([1, rng.randrange(1, 2**64), 2**64 - 1]),
            start,
            end,
            rng.choice([1, rng.randrange(1, 2**64), 2**64 - 1]),
            rng.choice(list(RouteState)),
            rng.choice([0, rng.randrange(2**64), 2**64 - 1]),
        )
        assert search.route_hash(*route) == codec.route_hash(route), route


def test_route_hash_refuses_what_is_not_a_route() -> None:
    with pytest.raises(ValueError):
        _lookup.route_hash(0.5, b"", None, 1, 0, 0)
    with pytest.raises(ValueError):
        _lookup.route_hash(1, "a", None, 1, 0, 0)
    with pytest.raises(ValueError):
        _lookup.route_hash(1, b"", None, 1, 9, 0)
    with pytest.raises(TypeError):
        _lookup.route_hash(1, b"", None, 1, 0)


@pytest.mark.parametrize("seed", range(4))
def test_digest_of_a_built_table_is_the_codecs(search: ModuleType, seed: int) -> None:
    rng = random.Random(seed)
    keys = sorted({_random_key(rng) for _ in range(rng.randrange(1, 3000))})
    routes = []
    for i, key in enumerate(keys):
        # Contiguous mostly; a gap now and then (key + b"\x00" is key's successor).
        end: bytes | None = None
        if i + 1 < len(keys):
            end = keys[i + 1] if rng.random() < 0.9 else key + b"\x00"
        state = rng.choice(list(RouteState))
        routes.append(RouteDescriptor(i + 1, key, end, 1 + i % 7, state, rng.randrange(2**64)))
    built = search.build(routes, rng.choice([2, 16, 1024]))
    assert built is not None
    table, ids = built
    assert search.digest(table, ids) == codec.routes_digest(routes)
    assert {route_id: ids[route_id] for route_id, _ in ids.items()} == {
        r.route_id: (_pylookup.prefix(r.start), r.parent_route_id) for r in routes
    }


def test_id_index_holds_a_prefix_and_a_parent() -> None:
    index = _lookup.IdIndex()
    for i in range(1, 100):
        index[i] = (i * 3, 2**64 - i)
    for i in range(1, 100, 2):
        del index[i]
    assert len(index) == 49
    assert index[98] == (294, 2**64 - 98)
    assert sorted(index.items())[:2] == [(2, (6, 2**64 - 2)), (4, (12, 2**64 - 4))]
    with pytest.raises(TypeError):
        index[5] = 7
    with pytest.raises(KeyError):
        index[1]


def test_usual_route_vouches_only_for_what_validation_returns_unchanged() -> None:
    rng = random.Random(3)
    fields: list[list[object]] = [
        [0, 1, 2**64 - 1, 2**64, -1, True, 1.0],
        [b"", b"a", b"b" * MAX_ROUTE_KEY_BYTES, b"c" * (MAX_ROUTE_KEY_BYTES + 1), "a", bytearray(b"a")],
        [None, b"", b"b", b"z", b"y" * (MAX_ROUTE_KEY_BYTES + 1), "z"],
        [0, 1, 2**64 - 1, 2**64, False],
        [RouteState.ACTIVE, RouteState.MIGRATING_TARGET, 0, 2, 9, "x"],
        [0, 5, 2**64 - 1, -1, None],
    ]
    vouched = 0
    for _ in range(30000):
        route = RouteDescriptor(*(rng.choice(column) for column in fields))  # type: ignore[arg-type]
        if not _lookup.usual_route(route):
            continue
        vouched += 1
        assert validate_route_descriptor(route) is route
    assert vouched > 50
    assert not _lookup.usual_route((1, b"", None, 1, RouteState.ACTIVE, 0))
    assert not _pylookup.usual_route(RouteDescriptor(1, b"", None, 1))


@pytest.mark.parametrize("seed", range(4))
def test_chunks_across_block_edges_with_short_and_tied_keys(search: ModuleType, seed: int) -> None:
    """Chunks of 0 to 130 bounds (the C search looks prefixes up by blocks of 32), of keys
    shorter than 8 bytes and keys tied on their first 8: each search agrees with bisect."""
    rng = random.Random(seed)
    pool = sorted(
        {bytes(rng.choice(b"\x00\x01ab\xff") for _ in range(rng.randrange(9))) for _ in range(150)}
        | {b"tenant-0" + bytes(rng.choice(b"\x00a\xff") for _ in range(rng.randrange(4)))
           for _ in range(60)}
    )
    for n in [*range(0, 70), 95, 96, 97, 127, 128, 129, 130]:
        bounds = sorted(rng.sample(pool, min(n, len(pool))))
        slots: list[Route | None] = [
            None if i % 2 == 0 else Route(i, bounds[i - 1], bounds[i] if i < len(bounds) else None,
                                          1, RouteState.ACTIVE, 0)
            for i in range(len(bounds) + 1)
        ]
        chunk = search.Chunk(bounds, slots, None, None)
        table = ([], search.make_index([]), [chunk], search)
        probes = [*bounds, *(b + b"\x00" for b in bounds), *(b[:-1] for b in bounds if b)]
        probes += [rng.choice(pool)[: rng.randrange(9)] + rng.randbytes(rng.randrange(3))
                   for _ in range(100)]
        for key in probes:
            assert chunk.bisect_right(key) == bisect_right(bounds, key), (n, key)
            assert chunk.bisect_left(key) == bisect_left(bounds, key), (n, key)
            assert search.find(table, key) == slots[bisect_right(bounds, key)], (n, key)
        assert search.group(table, probes) == _expected(bounds, slots, probes)


def _flat(table: object) -> list[tuple[object, ...]]:
    """Every slot of a table, as (route fields) or None, and its tops."""
    tops, _index, chunks = table[:3]  # type: ignore[index]
    return [tuple(tops)] + [(chunk.lower, chunk.upper, *chunk.slots()) for chunk in chunks]


@pytest.mark.parametrize("seed", range(6))
def test_merge_is_build_of_the_routes_it_leaves(search: ModuleType, seed: int) -> None:
    """A merge of a table, some ids dropped and upserts added, is the build of the routes it
    leaves, with the dropped routes' hashes; None where build would refuse them."""
    rng = random.Random(seed)
    keys = sorted({_random_key(rng) for _ in range(rng.randrange(2, 600))})
    routes = [
        RouteDescriptor(i + 1, key, keys[i + 1] if i + 1 < len(keys) else None, 1 + i % 3,
                        rng.choice(list(RouteState)), rng.randrange(2**64))
        for i, key in enumerate(keys)
    ]
    chunk_size = rng.choice([2, 16, 1024])
    built = search.build(routes, chunk_size)
    assert built is not None
    table, ids = built
    for _ in range(10):
        dropped = rng.sample(routes, rng.randrange(len(routes) + 1))
        left = [r for r in routes if r not in dropped]
        # Upserts into the room the dropped routes leave (some of it), new ids.
        upserts = sorted(
            (r._replace(route_id=10_000 + r.route_id, group_id=9) for r in dropped),
            key=lambda r: r.start,
        )[:: rng.choice([1, 2, 3])]
        dropped_ids = [r.route_id for r in dropped] + [99_999]  # an unknown id is ignored
        merged = search.merge(table, ids, dropped_ids, upserts, chunk_size)
        assert merged is not None
        merged_table, merged_ids, hashes = merged
        expected = search.build(sorted(left + upserts, key=lambda r: r.start), chunk_size)
        assert expected is not None
        assert _flat(merged_table) == _flat(expected[0])
        assert sorted(merged_ids.items()) == sorted(expected[1].items())
        assert hashes == {r.route_id: codec.route_hash(r) for r in dropped}
    if len(routes) > 2:
        overlapping = routes[1]._replace(route_id=20_000, end=routes[2].end)
        assert search.merge(table, ids, [routes[2].route_id], [overlapping], chunk_size) is None
        assert search.merge(table, ids, [], [routes[0]], chunk_size) is None  # start repeated
    ephemeral = Route(0, keys[-1] + b"\x01", None, 1, RouteState.ACTIVE, 0)
    with_ephemeral = search.build(routes[:-1], chunk_size)
    assert with_ephemeral is not None
    last_chunk = with_ephemeral[0][2][-1]
    bounds, slots = last_chunk.bounds(), last_chunk.slots()
    spliced = search.Chunk([*bounds, ephemeral.start], [*slots, ephemeral], last_chunk.lower, None)
    table_e = (*with_ephemeral[0][:2], [*with_ephemeral[0][2][:-1], spliced])
    if bounds or last_chunk.lower is not None:
        assert search.merge(table_e, with_ephemeral[1], [], [], chunk_size) is None


def _tied_pool(rng: random.Random) -> list[bytes]:
    """Keys tied on their first 8 and first 16 bytes, of every length around 8 and 16, some
    ending in zero bytes (which the zero-padded prefixes of shorter keys hold too)."""
    base = b"tenant-0001/abcdefgh"
    suffixes = [b"", b"\x00", b"\x00\x00", b"\x01", b"a", b"\xff", b"\xff\xff\x00"]
    pool = {b"", b"\x00", b"\xff" * 20}
    for cut in (0, 1, 4, 7, 8, 9, 15, 16, 17, 20):
        for suffix in suffixes:
            pool.add(base[:cut] + suffix)
    pool |= {base[: rng.choice((8, 16))] + rng.randbytes(rng.randrange(6)) for _ in range(60)}
    return sorted(pool)


@pytest.mark.parametrize("seed", range(6))
def test_group_of_keys_tied_on_their_first_8_and_16_bytes(search: ModuleType, seed: int) -> None:
    """Grouping sorts keys on their first 8 bytes, then their next 8, and compares them whole
    only where both tie: batches of such keys (duplicates, the empty key, keys past the last
    route and in gaps, all in one route, clustered and shuffled) group as bisect says."""
    rng = random.Random(seed)
    pool = _tied_pool(rng)
    bounds = sorted(rng.sample(pool[1:-1], rng.choice((1, 2, 9, 40, len(pool) - 2))))
    slots: list[Route | None] = [
        None if i == 0 or rng.random() < 0.3
        else Route(i, bounds[i - 1], bounds[i] if i < len(bounds) else None, 1,
                   RouteState.ACTIVE, 0)
        for i in range(len(bounds) + 1)
    ]
    chunk = search.Chunk(bounds, slots, None, None)
    table = ([], search.make_index([]), [chunk], search)
    inside = [key for key in pool if slots[bisect_right(bounds, key)] is not None]
    one_route = [key for key in inside if bisect_right(bounds, key) == bisect_right(bounds, inside[0])]
    batches = [
        [rng.choice(pool) for _ in range(size)] for size in (0, 1, 2, 63, 64, 65, 300, 3000)
    ]
    batches.append([rng.choice(one_route) for _ in range(500)])
    batches.append([b""] * 70 + [b"\xff" * 20] * 70)
    clustered = [key for key in rng.sample(pool, 20) for _ in range(10)]
    rng.shuffle(clustered)
    batches.append(clustered)
    for batch in batches:
        want = _expected(bounds, slots, batch)
        assert search.group(table, batch) == want
        assert search.group(table, sorted(batch, reverse=True)) == want


def test_group_of_keys_of_every_length(search: ModuleType) -> None:
    """The C sort reads a key's first 16 bytes as two 8-byte loads ending inside the key, the
    bytes before a short key's data masked off: keys of every length up to 24 (prefixes of one
    another, zero and 0xff bytes at every place), hashed or not (the hash is stored just before
    the data), group as bisect says."""
    rng = random.Random(11)
    pool = sorted(
        {fill[:length] for length in range(25) for fill in (bytes(24), b"\xff" * 24)}
        | {bytes(rng.choice(b"\x00\x01\x80\xff") for _ in range(rng.randrange(25)))
           for _ in range(300)}
    )
    bounds = sorted(rng.sample(pool[1:], 40))
    slots: list[Route | None] = [
        None if i == 0 or i % 5 == 0
        else Route(i, bounds[i - 1], bounds[i] if i < len(bounds) else None, 1,
                   RouteState.ACTIVE, 0)
        for i in range(len(bounds) + 1)
    ]
    table: tuple[object, ...] = (
        [], search.make_index([]), [search.Chunk(bounds, slots, None, None)], search
    )
    for size in (0, 1, 5, 64, 65, 1000):
        # New objects, half of them hashed, so that no two runs read the same bytes around them.
        batch = [bytes(bytearray(rng.choice(pool))) for _ in range(size)]
        for key in batch[::2]:
            hash(key)
        want = _expected(bounds, slots, batch)
        assert search.group(table, batch) == want
        assert search.group(table, sorted(batch)) == want


def test_group_holds_no_reference_it_does_not_return(search: ModuleType) -> None:
    """The C grouping takes a reference to each key, moves those of grouped keys into the
    groups' lists and lets the others go (keys in gaps, below the first route), on success and
    on a TypeError part way through the list: no key is leaked or freed early."""
    bounds = [b"b", b"d", b"f"]
    slots: list[Route | None] = [
        None,
        Route(1, b"b", b"d", 1, RouteState.ACTIVE, 0),
        None,
        Route(2, b"f", None, 1, RouteState.ACTIVE, 0),
    ]
    table: tuple[object, ...] = (
        [], search.make_index([]), [search.Chunk(bounds, slots, None, None)], search
    )
    # New objects (no interned or cached bytes): below the first route, in a route, in the gap,
    # in the last route; some repeated.
    keys = [bytes(bytearray(key)) for key in (b"aa", b"bb", b"cc", b"dd", b"ee", b"ff", b"zz")]
    batch = [keys[i % len(keys)] for i in range(70)] + [keys[1]] * 30
    random.Random(3).shuffle(batch)

    def counts() -> list[int]:
        return [sys.getrefcount(keys[i]) for i in range(len(keys))]

    before = counts()
    groups = search.group(table, batch)
    assert groups == _expected(bounds, slots, batch)
    held = [sum(member is key for _, members in groups for member in members) for key in keys]
    assert [count - held[i] for i, count in enumerate(counts())] == before
    del groups
    assert counts() == before
    for at in (0, 1, 50, len(batch)):
        with pytest.raises(TypeError):
            search.group(table, [*batch[:at], bytearray(b"k"), *batch[at:]])
        assert counts() == before


def test_group_of_a_huge_batch(search: ModuleType) -> None:
    """A batch far larger than the table (more buckets than the sort keeps on the stack)."""
    rng = random.Random(7)
    engine, bounds, slots = _engine(rng, 300)
    keys = [_random_key(rng) for _ in range(20_000)]
    keys += [rng.randbytes(rng.randrange(20)) for _ in range(100_000)]
    assert search.group(engine._table, keys) == _expected(bounds, slots, keys)

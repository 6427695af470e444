"""Engine benchmarks: lookups, batch grouping, snapshot and change application, memory.

Engines of 1,000 / 100,000 / 1,000,000 routes over random 8-byte keys, generated then sorted, so
that the keys a snapshot carries are scattered in memory, as a service's keys are. Each route is
``[key[i], key[i + 1])``, the last one unbounded. Every figure is the median of interleaved
repetitions, beside a baseline measured in the same run:

* ``get_route``: ns per key, beside the floor: a bare ``bisect_right`` over a plain list of the
  snapshot's start keys and one indexing, in a loop of the same shape;
* ``group_keys``: ns per key on 1,000-key batches, uniform random keys, and clustered keys (about
  ten keys in each of a hundred routes, shuffled), beside a ``get_route`` loop on the same keys;
  clustered batches also beside the ``get_route`` figure (random keys), the per-key cost a
  service pays without batching;
* ``apply_snapshot``: ms to apply the whole snapshot to a new Engine (the process has not frozen
  objects with ``gc.freeze()``: see ``distribution.bulk.paused_gc``);
* ``apply_changes``: ms to apply a one-route change (a split: delete 1, upsert 2, carrying the
  catalog digest it leads to, as a watcher's changes do) to the full Engine, the mean of a run
  of splits applied one call each, beside ``apply_snapshot``;
* ``apply_changes`` of a tenth of the routes (at 100,000 routes and fewer): ms to apply one change
  moving half of them to another group, deleting a quarter and splitting a quarter, carrying its
  digest, beside ``apply_snapshot`` of the routes it leaves;
* memory: bytes per route the Engine allocates (tracemalloc) applying a pre-built snapshot.

Then the *Go workload*, the one the Engine was measured on beside the Go original
(``Engine.GetRoute`` / ``ApplySnapshot``, Go 1.19, same machine, alternating): route bounds of
seeded random 4-16-byte keys, uniform random 4-16-byte lookup keys, and clustered batches. Its rows
carry the Go figures of that comparison as their baseline (a quoted constant, not measured in this
run: the Go side is rerun beside ours by hand), so the ratio column is Python / Go, and the
baseline names the goal:

=============================  =========  ===========  ===========  ======
figure (Go)                    1k routes  100k routes  1M routes    goal
=============================  =========  ===========  ===========  ======
``GetRoute`` ns/key            251        1,281        1,912        <= 0.7x
``group_keys`` uniform         (Go ``GetRoute`` per key)            <= 0.6x
``ApplySnapshot`` ms           0.27       33           342          <= 1.0x
memory B/route                 107        104          104          (<= 110 B at 1M)
=============================  =========  ===========  ===========  ======

Clustered ``group_keys`` is compared with ``get_route`` on random keys of the same run (goal
<= 0.3x), and a split applied by ``apply_changes`` at 1M routes has a goal of 0.1 ms. Lookups
never wait for a snapshot being applied: the longest gap between two answers of a thread looking
keys up while another applies the snapshot stands beside the same wait while the other thread
runs plain Python code for as long (a thread waits about a switch interval, 5 ms by default, for
the GIL behind any Python code; the build lets it go every half interval, pausing long enough
for a waiting thread to take it, and frees a dropped table's arrays without it).
"""

from __future__ import annotations

import dataclasses
import gc
import random
import threading
import time
import tracemalloc
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from benchmarks.harness import Case, Row, progress, run_interleaved, summarize
from distribution import CatalogChange, CatalogSnapshot, Engine, RouteDescriptor
from distribution.codec import route_hash, routes_digest

__all__ = ["run"]

#: Go figures for the Go workload, by route count: GetRoute ns/key, ApplySnapshot ms, B/route.
GO_GET_ROUTE_NS = {1_000: 251.0, 100_000: 1_281.0, 1_000_000: 1_912.0}
GO_APPLY_SNAPSHOT_MS = {1_000: 0.27, 100_000: 33.0, 1_000_000: 342.0}
GO_BYTES_PER_ROUTE = {1_000: 107.0, 100_000: 104.0, 1_000_000: 104.0}

FULL_SIZES = (1_000, 100_000, 1_000_000)
QUICK_SIZES = (1_000, 10_000)

_BATCH = 1_000
_PER_ROUTE = 10


@dataclass
class _Fixture:
    size: int
    keys: list[bytes]
    snapshot: CatalogSnapshot
    engine: Engine
    lookups: list[bytes]
    uniform: list[list[bytes]]
    clustered: list[list[bytes]]


def _random_key(rng: random.Random, lengths: tuple[int, int]) -> bytes:
    return rng.randbytes(rng.randint(*lengths))


def _fixture(
    size: int,
    rng: random.Random,
    lookups: int,
    batches: int,
    lengths: tuple[int, int] = (8, 8),
) -> _Fixture:
    """Routes over ``size`` random keys of ``lengths`` bytes (inclusive), and keys to look up."""
    unique: set[bytes] = set()
    while len(unique) < size:
        unique.add(_random_key(rng, lengths))
    keys = sorted(unique)
    routes = tuple(
        RouteDescriptor(
            route_id=i + 1,
            start=keys[i],
            end=keys[i + 1] if i + 1 < size else None,
            group_id=1 + i % 16,
        )
        for i in range(size)
    )
    snapshot = CatalogSnapshot(version=1, routes=routes)
    engine = Engine()
    engine.apply_snapshot(snapshot)

    def inside(i: int) -> bytes:
        # keys[i] itself, or keys[i] followed by bytes: both lie in [keys[i], keys[i + 1]).
        key = keys[i] + rng.randbytes(rng.randint(1, 4))
        return key if key < keys[i + 1] else keys[i]

    clustered: list[list[bytes]] = []
    for _ in range(batches):
        batch = [
            inside(i)
            for i in rng.sample(range(size - 1), _BATCH // _PER_ROUTE)
            for _ in range(_PER_ROUTE)
        ]
        rng.shuffle(batch)
        clustered.append(batch)
    return _Fixture(
        size=size,
        keys=keys,
        snapshot=snapshot,
        engine=engine,
        lookups=[_random_key(rng, lengths) for _ in range(lookups)],
        uniform=[[_random_key(rng, lengths) for _ in range(_BATCH)] for _ in range(batches)],
        clustered=clustered,
    )


def _per_key_ns(seconds: float, keys: int) -> float:
    return seconds / keys * 1e9


def _floor_case(fixture: _Fixture) -> Case:
    starts = [route.start for route in fixture.snapshot.routes]
    objs = list(fixture.snapshot.routes)
    lookups = fixture.lookups

    def case() -> float:
        begin = time.perf_counter()
        for key in lookups:
            i = bisect_right(starts, key) - 1
            _obj = objs[i]
        return _per_key_ns(time.perf_counter() - begin, len(lookups))

    return case


def _get_route_case(engine: Engine, batches: list[list[bytes]]) -> Case:
    total = sum(map(len, batches))

    def case() -> float:
        get = engine.get_route
        begin = time.perf_counter()
        for batch in batches:
            for key in batch:
                _obj = get(key)
        return _per_key_ns(time.perf_counter() - begin, total)

    return case


def _group_keys_case(engine: Engine, batches: list[list[bytes]]) -> Case:
    total = sum(map(len, batches))

    def case() -> float:
        group = engine.group_keys
        begin = time.perf_counter()
        for batch in batches:
            group(batch)
        return _per_key_ns(time.perf_counter() - begin, total)

    return case


def _apply_snapshot_case(snapshot: CatalogSnapshot) -> Case:
    def case() -> float:
        engine = Engine()
        begin = time.perf_counter()
        engine.apply_snapshot(snapshot)
        return (time.perf_counter() - begin) * 1e3

    return case


#: The largest table the change of a tenth of its routes is measured on (a repetition applies the
#: snapshot first, untimed).
_LARGE_CHANGE_MAX = 100_000

#: Splits applied, one ``apply_changes`` call each, per repetition of the apply_changes case.
_SPLITS = 50


def _apply_changes_case(fixture: _Fixture, rng: random.Random) -> Case:
    engine = fixture.engine
    next_id = [fixture.size + 1]
    # The digest the catalog would name: the Engine's, moved by each split's hashes.
    digest = [engine.digest]

    def split() -> CatalogChange:
        while True:
            route = engine.get_route(rng.choice(fixture.keys))
            # Each route of the Engine at most once a run: the run is applied after it is made.
            if route is None or route.end is None or route.route_id in split_ids:
                continue
            split_ids.add(route.route_id)
            # A key just past the start: inside the route unless the route is that narrow.
            middle = route.start + rng.randbytes(1)
            if not route.start < middle < route.end:
                continue
            old = RouteDescriptor(route.route_id, route.start, route.end, route.group_id)
            left = RouteDescriptor(next_id[0], route.start, middle, route.group_id)
            right = RouteDescriptor(next_id[0] + 1, middle, route.end, route.group_id)
            next_id[0] += 2
            digest[0] ^= route_hash(old) ^ route_hash(left) ^ route_hash(right)
            version = engine.version + len(batch)
            return CatalogChange(
                previous_version=version,
                version=version + 1,
                upserts=(left, right),
                deletes=(route.route_id,),
                digest=digest[0],
            )

    batch: list[CatalogChange] = []
    split_ids: set[int] = set()

    def case() -> float:
        batch.clear()
        split_ids.clear()
        for _ in range(_SPLITS):
            batch.append(split())
        apply = engine.apply_changes
        begin = time.perf_counter()
        for change in batch:
            apply([change])
        return (time.perf_counter() - begin) * 1e3 / _SPLITS

    return case


def _large_change(fixture: _Fixture, rng: random.Random) -> tuple[CatalogChange, CatalogSnapshot]:
    """A change touching a tenth of the routes (half of them moved to another group, a quarter
    deleted, a quarter split in two), carrying its digest, and the snapshot of the routes it
    leaves."""
    routes = {route.route_id: route for route in fixture.snapshot.routes}
    chosen = rng.sample(sorted(routes), len(routes) // 10)
    next_id = len(routes) + 1
    upserts: list[RouteDescriptor] = []
    deletes: list[int] = []
    for n, route_id in enumerate(chosen):
        route = routes[route_id]
        middle = route.start + rng.randbytes(1)
        if n % 4 == 1:
            deletes.append(route_id)
            del routes[route_id]
        elif n % 4 == 3 and route.end is not None and route.start < middle < route.end:
            deletes.append(route_id)
            del routes[route_id]
            for piece in (
                RouteDescriptor(next_id, route.start, middle, route.group_id),
                RouteDescriptor(next_id + 1, middle, route.end, route.group_id),
            ):
                upserts.append(piece)
                routes[piece.route_id] = piece
            next_id += 2
        else:
            moved = route._replace(group_id=route.group_id % 16 + 1)
            upserts.append(moved)
            routes[route_id] = moved
    after = tuple(sorted(routes.values(), key=lambda r: r.start))
    digest = routes_digest(after)
    change = CatalogChange(
        previous_version=1,
        version=2,
        upserts=tuple(upserts),
        deletes=tuple(deletes),
        digest=digest,
    )
    return change, CatalogSnapshot(version=2, routes=after, digest=digest)


def _apply_large_change_case(snapshot: CatalogSnapshot, change: CatalogChange) -> Case:
    # Carrying its digest, as a catalog read brings it: the change's digest is checked from it.
    snapshot = dataclasses.replace(snapshot, digest=routes_digest(snapshot.routes))

    def case() -> float:
        engine = Engine()
        engine.apply_snapshot(snapshot)
        begin = time.perf_counter()
        engine.apply_changes([change])
        return (time.perf_counter() - begin) * 1e3

    return case


def _apply_fresh(snapshot: CatalogSnapshot) -> None:
    Engine().apply_snapshot(snapshot)


def _python_for(seconds: float) -> None:
    """Run plain Python code (no C call holding the GIL) for ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _longest_lookup_waits(fixture: _Fixture, repeats: int) -> tuple[float, float]:
    """The longest times (ms) a thread looking keys up waits between two answers while another
    thread applies the whole snapshot to a new Engine, and while it runs plain Python code as
    long: medians of interleaved repetitions. Any thread waits about a switch interval (5 ms by
    default) for the GIL behind Python code; the snapshot must not make it wait longer."""
    took = [0.0]

    def build() -> float:
        begin = time.perf_counter()
        wait = _longest_wait(fixture, partial(_apply_fresh, fixture.snapshot))
        took[0] = time.perf_counter() - begin
        return wait

    def python() -> float:
        return _longest_wait(fixture, partial(_python_for, took[0]))

    results = run_interleaved({"build": build, "python": python}, repeats)
    return summarize(results["build"]).median, summarize(results["python"]).median


def _longest_wait(fixture: _Fixture, work: Callable[[], None]) -> float:
    """The longest gap (ms) between two answers of a thread looking keys up while ``work``
    runs in this one."""
    engine = fixture.engine
    done = threading.Event()
    longest = [0.0]

    def look_up() -> None:
        get = engine.get_route
        keys = fixture.lookups
        last = time.perf_counter()
        i = 0
        while not done.is_set():
            get(keys[i % len(keys)])
            i += 1
            now = time.perf_counter()
            longest[0] = max(longest[0], now - last)
            last = now

    reader = threading.Thread(target=look_up, name="bench-reader")
    reader.start()
    time.sleep(0.02)
    longest[0] = 0.0
    work()
    done.set()
    reader.join()
    return longest[0] * 1e3


def _memory_per_route(snapshot: CatalogSnapshot) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        engine = Engine()
        engine.apply_snapshot(snapshot)
        current, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del engine
    return current / len(snapshot.routes)


def _size_rows(size: int, quick: bool) -> list[Row]:
    rng = random.Random(size)
    repeats = 3 if quick else 7
    progress(f"engine: building {size:,} routes")
    fixture = _fixture(size, rng, lookups=5_000 if quick else 20_000, batches=3 if quick else 10)
    cases: dict[str, Case] = {
        "floor": _floor_case(fixture),
        "get_route": _get_route_case(fixture.engine, [fixture.lookups]),
        "group uniform": _group_keys_case(fixture.engine, fixture.uniform),
        "get_route uniform": _get_route_case(fixture.engine, fixture.uniform),
        "group clustered": _group_keys_case(fixture.engine, fixture.clustered),
        "get_route clustered": _get_route_case(fixture.engine, fixture.clustered),
        "apply_snapshot": _apply_snapshot_case(fixture.snapshot),
        "apply_changes": _apply_changes_case(fixture, rng),
    }
    if size <= _LARGE_CHANGE_MAX:
        change, after = _large_change(fixture, rng)
        cases["large change"] = _apply_large_change_case(fixture.snapshot, change)
        cases["large change snapshot"] = _apply_snapshot_case(after)
    progress(f"engine: measuring {size:,} routes ({repeats} interleaved repetitions)")
    results = {
        name: summarize(values).median for name, values in run_interleaved(cases, repeats).items()
    }
    progress(f"engine: measuring memory of {size:,} routes")
    memory = _memory_per_route(fixture.snapshot)
    label = f"{size:,} routes"
    rows = [
        Row(
            "engine get_route",
            label,
            results["get_route"],
            "ns/key",
            "bisect floor (target <= 1.3x)",
            results["floor"],
        ),
        Row(
            "engine group_keys uniform",
            label,
            results["group uniform"],
            "ns/key",
            "get_route loop, same keys (target <= 1x)",
            results["get_route uniform"],
        ),
        Row(
            "engine group_keys clustered",
            label,
            results["group clustered"],
            "ns/key",
            "get_route loop, same keys",
            results["get_route clustered"],
        ),
        Row(
            "engine group_keys clustered",
            label,
            results["group clustered"],
            "ns/key",
            "get_route, random keys (target <= 0.3x)",
            results["get_route"],
        ),
        Row("engine apply_snapshot", label, results["apply_snapshot"], "ms"),
        Row(
            "engine apply_changes split",
            label,
            results["apply_changes"],
            "ms",
            "apply_snapshot",
            results["apply_snapshot"],
        ),
        Row("engine memory", label, memory, "B/route"),
    ]
    if "large change" in results:
        rows.insert(
            -1,
            Row(
                "engine apply_changes, a tenth of the routes",
                label,
                results["large change"],
                "ms",
                "apply_snapshot of the routes it leaves",
                results["large change snapshot"],
            ),
        )
    return rows


def _go_rows(size: int, quick: bool) -> list[Row]:
    """The Go workload's rows: random 4-16-byte keys, beside the quoted Go figures."""
    rng = random.Random(-size)
    repeats = 3 if quick else 7
    progress(f"engine: building {size:,} routes of 4-16-byte keys")
    fixture = _fixture(
        size, rng, lookups=5_000 if quick else 100_000, batches=3 if quick else 10, lengths=(4, 16)
    )
    cases: dict[str, Case] = {
        "get_route": _get_route_case(fixture.engine, [fixture.lookups]),
        "group uniform": _group_keys_case(fixture.engine, fixture.uniform),
        "group clustered": _group_keys_case(fixture.engine, fixture.clustered),
        "apply_snapshot": _apply_snapshot_case(fixture.snapshot),
        "apply_changes": _apply_changes_case(fixture, rng),
    }
    progress(f"engine: measuring {size:,} routes of 4-16-byte keys ({repeats} repetitions)")
    results = {
        name: summarize(values).median for name, values in run_interleaved(cases, repeats).items()
    }
    memory = _memory_per_route(fixture.snapshot)
    wait, python_wait = _longest_lookup_waits(fixture, 3)
    label = f"{size:,} routes"
    go_get_route = GO_GET_ROUTE_NS.get(size)
    return [
        Row(
            "engine get_route, Go workload",
            label,
            results["get_route"],
            "ns/key",
            "Go GetRoute, quoted (goal <= 0.7x)",
            go_get_route,
        ),
        Row(
            "engine group_keys uniform, Go workload",
            label,
            results["group uniform"],
            "ns/key",
            "Go GetRoute, quoted (goal <= 0.6x)",
            go_get_route,
        ),
        Row(
            "engine group_keys clustered, Go workload",
            label,
            results["group clustered"],
            "ns/key",
            "get_route, random keys (goal <= 0.3x)",
            results["get_route"],
        ),
        Row(
            "engine apply_snapshot, Go workload",
            label,
            results["apply_snapshot"],
            "ms",
            "Go ApplySnapshot, quoted (goal <= 1.0x)",
            GO_APPLY_SNAPSHOT_MS.get(size),
        ),
        Row(
            "engine get_route longest wait, during apply_snapshot",
            label,
            wait,
            "ms",
            "same wait, plain Python code as long (goal: no longer)",
            python_wait,
        ),
        Row(
            "engine apply_changes split, Go workload",
            label,
            results["apply_changes"],
            "ms",
            "goal at 1M routes: 0.1 ms",
            0.1 if size == 1_000_000 else None,
        ),
        Row(
            "engine memory, Go workload",
            label,
            memory,
            "B/route",
            "Go, quoted (goal at 1M: <= 110 B)",
            GO_BYTES_PER_ROUTE.get(size),
        ),
    ]


def run(quick: bool) -> list[Row]:
    """Measure the Engine at every size (smaller sizes, fewer repetitions when ``quick``)."""
    rows: list[Row] = []
    for size in QUICK_SIZES if quick else FULL_SIZES:
        rows += _size_rows(size, quick)
    for size in QUICK_SIZES if quick else FULL_SIZES:
        rows += _go_rows(size, quick)
    return rows

"""CatalogStore benchmarks: snapshot, save and split_route, each beside the floor it is held to.

* floor A: a bare psycopg round trip (``SELECT 1``);
* floor B: the bare compare-and-set transaction on a raw psycopg connection (the conditional
  ``UPDATE distribution_meta … WHERE version = %s`` and a commit);
* ``snapshot()`` beside a bare binary fetch of the same rows as plain tuples (target <= 2x),
  and the reset ``changes_since`` answers a version behind the history window with, beside
  ``snapshot()`` (the same read);
* ``save()`` of the whole catalog with one route changed, beside ``snapshot()`` (target <= 2x):
  from the version the store has just read (it sends only the change), and from a store behind
  (stores take turns, each saving from a version another wrote: it reads the catalog first);
* ``save(0, routes)`` loading each catalog, beside floor C: a bare binary COPY of the same rows
  (psycopg's ``write_row``) into a temporary table, the transfer any load pays;
* ``split_route`` beside floor B (target <= 3x), and flat in the catalog size (the largest
  catalog within 1.2x of the smallest).

Every measured thing is repeated in rounds that interleave it with what it is compared to, so
drift on a busy machine hits both sides alike; the table reports medians (and p99 for the
per-operation latencies). Catalogs are contiguous routes over random, unique, sorted 8-byte keys,
loaded with one ``store.save(0, routes)`` each, then vacuumed, analyzed and checkpointed so the
measurements see the steady state, not the aftermath of the bulk load.
"""

from __future__ import annotations

import gc
import itertools
import os
import random
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import psycopg

from benchmarks.database import BenchServer, bench_server
from benchmarks.harness import Case, Measurement, Row, progress, run_interleaved, summarize
from distribution import RouteDescriptor
from distribution.bulk import paused_gc
from distribution.catalog import CatalogStore

__all__ = ["FULL", "QUICK", "Plan", "make_routes", "run"]

#: The bare fetch ``snapshot()`` is compared to: the same rows, as plain tuples.
BARE_FETCH = (
    'SELECT route_id, start, "end", group_id, state, parent_route_id '
    "FROM distribution_routes WHERE valid_to IS NULL ORDER BY start"
)
#: Floor B: the compare-and-set every write starts with, on its own.
BARE_CAS = "UPDATE distribution_meta SET version = version + 1 WHERE version = %s"
#: How long loading the largest catalog may take before the report says it is too slow.
LOAD_BUDGET_SECONDS = 180.0


@dataclass(frozen=True)
class Plan:
    """What to measure, and how often."""

    snapshot_sizes: tuple[int, ...]
    save_sizes: tuple[int, ...]
    split_sizes: tuple[int, ...]
    #: Rounds for the per-operation latencies (floors, splits).
    op_rounds: int
    #: Rounds for the whole-catalog reads and writes, per size.
    bulk_rounds: dict[int, int]
    warmup: int


FULL = Plan(
    snapshot_sizes=(10_000, 100_000),
    save_sizes=(10_000, 100_000),
    split_sizes=(1_000, 100_000, 1_000_000),
    op_rounds=600,
    bulk_rounds={1_000: 60, 10_000: 31, 100_000: 11},
    warmup=20,
)
QUICK = Plan(
    snapshot_sizes=(1_000, 10_000),
    save_sizes=(1_000, 10_000),
    split_sizes=(1_000, 10_000),
    op_rounds=60,
    bulk_rounds={1_000: 9, 10_000: 5},
    warmup=3,
)


# -- catalogs --------------------------------------------------------------------------------------


def make_routes(count: int) -> list[RouteDescriptor]:
    """``count`` contiguous routes over random, unique, sorted 8-byte keys, the last unbounded."""
    with paused_gc():
        keys: set[bytes] = set()
        while len(keys) < count - 1:
            missing = count - 1 - len(keys)
            raw = os.urandom(8 * missing)
            keys.update(raw[i : i + 8] for i in range(0, len(raw), 8))
        bounds: list[bytes | None] = [b"", *sorted(keys), None]
        return [
            RouteDescriptor(
                route_id=i + 1,
                start=bounds[i] or b"",  # only the last bound is None, never a start
                end=bounds[i + 1],
                group_id=1 + i % 5,
            )
            for i in range(count)
        ]


@dataclass
class Catalog:
    """A loaded catalog in its own scratch database."""

    size: int
    url: str
    store: CatalogStore
    routes: list[RouteDescriptor]
    version: int
    load_seconds: float
    #: Floor C: a bare binary COPY of the same rows, in the same database.
    copy_seconds: float


def load_catalog(server: BenchServer, stack: ExitStack, size: int) -> Catalog:
    """Create a scratch database holding ``size`` routes, settled after the bulk load."""
    url = stack.enter_context(server.scratch_database())
    store = stack.enter_context(CatalogStore.from_url(url))
    routes = make_routes(size)
    started = time.perf_counter()
    version = store.save(0, routes, actor="bench").version
    load_seconds = time.perf_counter() - started
    copy_seconds = bare_copy_seconds(url, routes)
    settle(url)
    return Catalog(size, url, store, routes, version, load_seconds, copy_seconds)


def bare_copy_seconds(url: str, routes: Sequence[RouteDescriptor]) -> float:
    """Floor C: the seconds a bare binary COPY of ``routes`` into a temporary table takes."""
    shift = 2**63
    with psycopg.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(
            'CREATE TEMP TABLE floor_c (route_id bigint, start bytea, "end" bytea, '
            "group_id bigint, state smallint, parent_route_id bigint)"
        )
        started = time.perf_counter()
        with cursor.copy("COPY floor_c FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "bytea", "bytea", "int8", "int2", "int8"])
            for route_id, start, end, group_id, state, parent in routes:
                copy.write_row(
                    (route_id - shift, start, end, group_id - shift, state, parent - shift)
                )
        connection.commit()
        return time.perf_counter() - started


def settle(url: str) -> None:
    """Vacuum, analyze and checkpoint, so the bulk load's aftermath is not measured."""
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("VACUUM (ANALYZE) distribution_routes")
        connection.execute("VACUUM (ANALYZE) distribution_meta")
        connection.execute("CHECKPOINT")


# -- cases: each runs its workload once and returns the microseconds it took ----------------------


def _micros(started: int) -> float:
    return (time.perf_counter_ns() - started) / 1000


def round_trip_case(url: str, stack: ExitStack) -> Case:
    """Floor A: one bare ``SELECT 1`` round trip (autocommit: no BEGIN, no COMMIT)."""
    connection = stack.enter_context(psycopg.connect(url, autocommit=True))

    def case() -> float:
        started = time.perf_counter_ns()
        connection.execute("SELECT 1").fetchone()
        return _micros(started)

    return case


def compare_and_set_case(url: str, stack: ExitStack) -> Case:
    """Floor B: the bare conditional UPDATE of the version, then a commit.

    On a non-autocommit connection, as the store's: BEGIN, the UPDATE, COMMIT.
    """
    connection = stack.enter_context(psycopg.connect(url))
    row = connection.execute("SELECT version FROM distribution_meta").fetchone()
    assert row is not None
    connection.commit()
    version = row[0]

    def case() -> float:
        nonlocal version
        started = time.perf_counter_ns()
        updated = connection.execute(BARE_CAS, [version]).rowcount
        connection.commit()
        took = _micros(started)
        assert updated == 1
        version += 1
        return took

    return case


def bare_fetch_case(url: str, stack: ExitStack) -> Case:
    """The live routes as plain tuples: one binary query on an autocommit connection."""
    connection = stack.enter_context(psycopg.connect(url, autocommit=True))
    cursor = connection.cursor(binary=True)

    def case() -> float:
        started = time.perf_counter_ns()
        rows = cursor.execute(BARE_FETCH).fetchall()
        took = _micros(started)
        del rows
        return took

    return case


def snapshot_case(store: CatalogStore) -> Case:
    def case() -> float:
        started = time.perf_counter_ns()
        snapshot = store.snapshot()
        took = _micros(started)
        del snapshot
        return took

    return case


def reset_case(store: CatalogStore) -> Case:
    """``changes_since(0)`` on a catalog whose history window starts after version 0: a reset
    carrying every live route."""

    def case() -> float:
        started = time.perf_counter_ns()
        answer = store.changes_since(0)
        took = _micros(started)
        assert answer.reset is not None
        del answer
        return took

    return case


class _Catalog:
    """The routes the save cases of one catalog share, with the version they saved last."""

    def __init__(self, catalog: Catalog) -> None:
        self.routes = list(catalog.store.snapshot().routes)
        self.version = catalog.store.version()

    def change_one(self, rng: random.Random) -> None:
        index = rng.randrange(len(self.routes))
        route = self.routes[index]
        self.routes[index] = route._replace(group_id=route.group_id % 9 + 1)


def save_case(catalog: Catalog, shared: _Catalog, seed: int) -> Case:
    """Save the whole catalog with one route changed (a different route each time), as a
    service does: from the snapshot it has just read and still holds, through the store that
    read it, which then sends only the change."""
    store = catalog.store
    rng = random.Random(seed)

    def case() -> float:
        snapshot = store.snapshot()
        shared.version = snapshot.version
        shared.change_one(rng)
        started = time.perf_counter_ns()
        shared.version = store.save(shared.version, shared.routes, actor="bench").version
        took = _micros(started)
        del snapshot
        return took

    return case


def save_behind_case(stores: Sequence[CatalogStore], shared: _Catalog, seed: int) -> Case:
    """As :func:`save_case`, but the saves take turns among ``stores`` (two or more): each saves
    from a version another one wrote, so it reads the catalog before it sends the change."""
    turns = itertools.cycle(stores)
    rng = random.Random(seed)

    def case() -> float:
        store = next(turns)
        shared.change_one(rng)
        started = time.perf_counter_ns()
        shared.version = store.save(shared.version, shared.routes, actor="bench").version
        return _micros(started)

    return case


def split_case(catalog: Catalog, seed: int) -> Case:
    """Split a fresh route on every run, from the catalog's current version."""
    store = catalog.store
    version = store.version()
    # Neither the first route (its start is b"") nor the unbounded last: start + b"\x80" lies
    # strictly inside every other route, whose end is another 8-byte key.
    fresh = catalog.routes[1:-1]
    random.Random(seed).shuffle(fresh)

    def case() -> float:
        nonlocal version
        route = fresh.pop()
        key = route.start + b"\x80"
        started = time.perf_counter_ns()
        version = store.split_route(route.route_id, key, version, actor="bench").version
        return _micros(started)

    return case


# -- the section -----------------------------------------------------------------------------------


def _label(size: int) -> str:
    return f"{size:,} routes"


def _measure(cases: dict[str, Case], repeats: int, warmup: int) -> dict[str, Measurement]:
    values = run_interleaved(cases, repeats, warmup=warmup)
    return {name: summarize(samples) for name, samples in values.items()}


def run(quick: bool) -> list[Row]:
    """Measure the catalog store against its floors (smaller sizes, fewer runs when ``quick``)."""
    plan = QUICK if quick else FULL
    rows: list[Row] = []
    with bench_server() as server, ExitStack() as stack:
        progress(f"catalog: {server.describe()}; load average {_load()}")
        sizes = sorted({*plan.snapshot_sizes, *plan.save_sizes, *plan.split_sizes})
        catalogs: dict[int, Catalog] = {}
        for size in sizes:
            progress(f"catalog: loading {_label(size)} with one save(0, routes)")
            catalogs[size] = catalog = load_catalog(server, stack, size)
            progress(f"catalog: loaded {_label(size)} in {catalog.load_seconds:.1f} s")
            if catalog.load_seconds > LOAD_BUDGET_SECONDS:
                progress(
                    f"catalog: loading {_label(size)} took longer than the "
                    f"{LOAD_BUDGET_SECONDS:.0f} s budget"
                )
            rows.append(
                Row(
                    "catalog load: save(0, routes)",
                    _label(size),
                    catalog.load_seconds,
                    "s",
                    "floor C: bare binary COPY",
                    catalog.copy_seconds,
                )
            )
        # The data the cases hold lives through the whole run: keep the collector from walking
        # it again and again (the store's own allocations are still collected as usual).
        gc.collect()
        gc.freeze()
        try:
            rows += _snapshot_rows(plan, catalogs, stack)
            rows += _save_rows(plan, catalogs, stack)
            rows += _split_rows(plan, catalogs, server, stack)
        finally:
            gc.unfreeze()
        progress(f"catalog: load average {_load()}")
    return rows


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _snapshot_rows(plan: Plan, catalogs: dict[int, Catalog], stack: ExitStack) -> list[Row]:
    rows = []
    for size in plan.snapshot_sizes:
        catalog = catalogs[size]
        repeats = plan.bulk_rounds[size]
        progress(
            f"catalog: snapshot() and a reset of {_label(size)} "
            f"({repeats} interleaved repetitions)"
        )
        # Version 0 falls out of the history window: changes_since(0) answers with a reset.
        catalog.store.prune_history(keep_versions=1)
        result = _measure(
            {
                "bare": bare_fetch_case(catalog.url, stack),
                "snapshot": snapshot_case(catalog.store),
                "reset": reset_case(catalog.store),
            },
            repeats,
            warmup=2,
        )
        rows.append(
            Row(
                "catalog snapshot()",
                _label(size),
                result["snapshot"].median / 1000,
                "ms",
                "bare fetch (target <= 2x)",
                result["bare"].median / 1000,
            )
        )
        rows.append(
            Row(
                "catalog changes_since() reset",
                _label(size),
                result["reset"].median / 1000,
                "ms",
                "snapshot()",
                result["snapshot"].median / 1000,
            )
        )
    return rows


def _save_rows(plan: Plan, catalogs: dict[int, Catalog], stack: ExitStack) -> list[Row]:
    rows = []
    for size in plan.save_sizes:
        catalog = catalogs[size]
        repeats = plan.bulk_rounds[size]
        progress(f"catalog: save() of {_label(size)} ({repeats} interleaved repetitions)")
        shared = _Catalog(catalog)
        taking_turns = [stack.enter_context(CatalogStore.from_url(catalog.url)) for _ in "ab"]
        result = _measure(
            {
                "snapshot": snapshot_case(catalog.store),
                "save": save_case(catalog, shared, seed=size),
                "save behind": save_behind_case(taking_turns, shared, seed=size + 1),
            },
            repeats,
            warmup=2,
        )
        snapshot = result["snapshot"].median / 1000
        rows.append(
            Row(
                "catalog save(), 1 route changed",
                _label(size),
                result["save"].median / 1000,
                "ms",
                "snapshot() (target <= 2x)",
                snapshot,
            )
        )
        rows.append(
            Row(
                "catalog save(), 1 changed, store behind",
                _label(size),
                result["save behind"].median / 1000,
                "ms",
                "snapshot()",
                snapshot,
            )
        )
    return rows


def _split_rows(
    plan: Plan, catalogs: dict[int, Catalog], server: BenchServer, stack: ExitStack
) -> list[Row]:
    floor_url = stack.enter_context(server.scratch_database())
    cases: dict[str, Case] = {
        "A": round_trip_case(floor_url, stack),
        "B": compare_and_set_case(floor_url, stack),
    }
    for size in plan.split_sizes:
        cases[f"split {size}"] = split_case(catalogs[size], seed=size)
    progress(
        "catalog: floors and split_route on "
        + ", ".join(_label(size) for size in plan.split_sizes)
        + f" ({plan.op_rounds} interleaved repetitions)"
    )
    result = _measure(cases, plan.op_rounds, warmup=plan.warmup)
    floor_a, floor_b = result["A"], result["B"]
    rows = [
        Row("catalog floor A: SELECT 1", "p50", floor_a.median, "us"),
        Row("catalog floor A: SELECT 1", "p99", floor_a.p99, "us"),
        Row("catalog floor B: bare CAS + commit", "p50", floor_b.median, "us"),
        Row("catalog floor B: bare CAS + commit", "p99", floor_b.p99, "us"),
    ]
    for size in plan.split_sizes:
        split = result[f"split {size}"]
        rows.append(
            Row(
                "catalog split_route p50",
                _label(size),
                split.median,
                "us",
                "floor B p50 (target <= 3x)",
                floor_b.median,
            )
        )
        rows.append(
            Row(
                "catalog split_route p99",
                _label(size),
                split.p99,
                "us",
                "floor B p99",
                floor_b.p99,
            )
        )
    smallest, largest = plan.split_sizes[0], plan.split_sizes[-1]
    rows.append(
        Row(
            "catalog split_route flatness",
            _label(largest),
            result[f"split {largest}"].median,
            "us",
            f"split_route {_label(smallest)} (target <= 1.2x)",
            result[f"split {smallest}"].median,
        )
    )
    return rows

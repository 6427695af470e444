"""Watcher benchmarks: commit-to-visible latency, and what watchers cost the database.

* commit-to-visible: the writer's call returns, then the watcher's Engine shows the version; with
  NOTIFY, beside polling only at the seed's 100 ms (the baseline, measured in the same run);
* catalog reads per second of an idle watcher, listening, beside a polling-only one;
* catalog reads per change per watcher, for 20 watchers following small changes (carried in the
  notification) and large ones (fetched with ``changes_since``);
* commit-to-visible with ``trust_notifications=False`` (every change read from the catalog),
  beside the trusted watcher of the same run;
* how long a forged notification (a well-formed lie, digest right) stays in a listening watcher's
  Engine before the watcher's next catalog read undoes it;
* what the watcher does per notification, in-process, at 1k and 100k routes: parse the payload of
  a split and apply it with its digest checked, beside the same payloads without a digest (the
  Engine then checks nothing); and ``get_route`` on the Engine those changes built, beside an
  Engine of the same routes built by ``apply_snapshot``.

The time to apply a one-route change to 1k / 100k / 1M-route Engines, beside a full
``apply_snapshot``, is in the engine section.
"""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack

import psycopg

from benchmarks.bench_catalog import make_routes
from benchmarks.database import bench_server
from benchmarks.harness import Case, Row, progress, run_interleaved, summarize
from distribution import (
    CatalogSnapshot,
    CatalogStore,
    CatalogWatcher,
    Engine,
    RouteDescriptor,
    encode_route_descriptor,
    route_hash,
    routes_digest,
)
from distribution.catalog import parse_notification

__all__ = ["Splitter", "run"]

_SEED_POLL_INTERVAL = 0.1
_WAIT_STEP = 0.0002


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> float:
    """Sleep-poll (releasing the GIL for the watcher) until ``condition``; return when it held."""
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            raise TimeoutError("the watcher did not catch up")
        time.sleep(_WAIT_STEP)
    return time.perf_counter()


class Splitter:
    """Splits successive routes of a catalog: a one-route change, as an autosplitter makes."""

    def __init__(self, store: CatalogStore) -> None:
        self._store = store
        snapshot = store.snapshot()
        self.version = snapshot.version
        self._routes = [r for r in snapshot.routes if r.end is not None]

    def split(self) -> int:
        while True:
            route = self._routes.pop()
            key = route.start + b"\x80"
            if route.end is not None and key < route.end:
                break
        result = self._store.split_route(route.route_id, key, self.version, actor="bench")
        self.version = result.version
        self._routes[:0] = result.created
        return self.version


def _latencies(
    store: CatalogStore, *, listen: bool, writes: int, trust_notifications: bool = True
) -> list[float]:
    """Commit-to-visible milliseconds of ``writes`` splits, one watcher following."""
    splitter = Splitter(store)
    engine = Engine()
    values = []
    with CatalogWatcher(
        store,
        engine,
        interval=_SEED_POLL_INTERVAL,
        listen=listen,
        trust_notifications=trust_notifications,
    ) as watcher:
        _wait_for(lambda: engine.version == splitter.version and watcher.listening == listen)
        for _ in range(writes):
            # A random phase, so that polling is not measured in step with its own period.
            time.sleep(random.uniform(0, _SEED_POLL_INTERVAL))
            version = splitter.split()
            returned = time.perf_counter()
            visible = _wait_for(lambda v=version: engine.version >= v)  # type: ignore[misc]
            values.append(max(0.0, visible - returned) * 1e3)
    return values


def _idle_reads_per_second(store: CatalogStore, *, listen: bool, seconds: float) -> float:
    engine = Engine()
    with CatalogWatcher(store, engine, interval=_SEED_POLL_INTERVAL, listen=listen) as watcher:
        _wait_for(lambda: engine.version == store.version() and watcher.listening == listen)
        before = watcher.syncs
        time.sleep(seconds)
        return (watcher.syncs - before) / seconds


def _reads_per_change(store: CatalogStore, *, watchers: int, changes: int, large: bool) -> float:
    """Catalog reads per change per watcher, ``watchers`` listening watchers following."""
    engines = [Engine() for _ in range(watchers)]
    with ExitStack() as stack:
        running = [stack.enter_context(CatalogWatcher(store, e)) for e in engines]
        version = store.version()
        _wait_for(lambda: all(w.listening and w.applied_version == version for w in running))
        before = sum(w.syncs for w in running)
        started = time.perf_counter()
        splitter = Splitter(store)
        for _ in range(changes):
            if large:
                snapshot = store.snapshot()
                moved = [r._replace(group_id=r.group_id % 5 + 1) for r in snapshot.routes]
                version = store.save(snapshot.version, moved, actor="bench").version
            else:
                version = splitter.split()
            _wait_for(lambda v=version: all(e.version >= v for e in engines))  # type: ignore[misc]
        reads = sum(w.syncs for w in running) - before
        # The safety-net polls (at most one a second per watcher) are not caused by the changes.
        background = watchers * (time.perf_counter() - started)
        return max(0.0, reads - background) / (changes * watchers)


def _payload(
    previous: int,
    upserts: Sequence[RouteDescriptor],
    deletes: Sequence[int],
    digest: int | None,
) -> str:
    """A notification payload as the database builds it (see ``distribution_change_payload``)."""
    body: dict[str, object] = {
        "previous": previous,
        "upserts": [base64.b64encode(encode_route_descriptor(r)).decode() for r in upserts],
        "deletes": list(deletes),
    }
    if digest is not None:
        body["digest"] = digest
    return f"{previous + 1} {json.dumps(body)}"


def _split_payloads(
    snapshot: CatalogSnapshot, count: int, rng: random.Random
) -> tuple[list[str], list[str], CatalogSnapshot]:
    """``count`` successive splits of random routes of ``snapshot``, as payloads with their digest
    and without it; and the catalog they lead to."""
    live = {r.route_id: r for r in snapshot.routes}
    digest = routes_digest(snapshot.routes)
    next_id = max(live) + 1
    version = snapshot.version
    with_digest, without = [], []
    candidates = [r.route_id for r in snapshot.routes if r.end is not None]
    while len(with_digest) < count:
        route = live[candidates.pop(rng.randrange(len(candidates)))]
        assert route.end is not None
        middle = route.start + b"\x80"
        if not route.start < middle < route.end:
            continue
        pieces = (
            RouteDescriptor(
                next_id, route.start, middle, route.group_id, parent_route_id=route.route_id
            ),
            RouteDescriptor(
                next_id + 1, middle, route.end, route.group_id, parent_route_id=route.route_id
            ),
        )
        next_id += 2
        del live[route.route_id]
        digest ^= route_hash(route)
        for piece in pieces:
            live[piece.route_id] = piece
            digest ^= route_hash(piece)
            candidates.append(piece.route_id)
        with_digest.append(_payload(version, pieces, (route.route_id,), digest))
        without.append(_payload(version, pieces, (route.route_id,), None))
        version += 1
    final = tuple(sorted(live.values(), key=lambda r: r.start))
    return with_digest, without, CatalogSnapshot(version, final, version, digest)


def _notified_case(snapshot: CatalogSnapshot, payloads: list[str]) -> Case:
    """Microseconds per notification: parse its payload, apply its change (a fresh Engine each
    run, loaded outside the timing)."""

    def case() -> float:
        engine = Engine()
        engine.apply_snapshot(snapshot)
        begin = time.perf_counter()
        for payload in payloads:
            change = parse_notification(payload).change
            assert change is not None
            engine.apply_changes([change])
        return (time.perf_counter() - begin) / len(payloads) * 1e6

    return case


def _lookup_case(engine: Engine, keys: list[bytes]) -> Case:
    def case() -> float:
        get = engine.get_route
        begin = time.perf_counter()
        for key in keys:
            get(key)
        return (time.perf_counter() - begin) / len(keys) * 1e9

    return case


def _in_process_rows(size: int, quick: bool) -> list[Row]:
    """The watcher's work per notification, and lookups on the Engine it feeds, at ``size``."""
    rng = random.Random(size)
    table = tuple(make_routes(size))
    # As the catalog sends it: with its digest (else the Engine computes it on first use).
    snapshot = CatalogSnapshot(1, table, 1, routes_digest(table))
    with_digest, without, final = _split_payloads(snapshot, 200 if quick else 1000, rng)
    fed = Engine()
    fed.apply_snapshot(snapshot)
    for payload in with_digest:
        change = parse_notification(payload).change
        assert change is not None
        fed.apply_changes([change])
    built = Engine()
    built.apply_snapshot(final)
    keys = [rng.randbytes(8) for _ in range(20_000 if quick else 200_000)]
    results = run_interleaved(
        {
            "with digest": _notified_case(snapshot, with_digest),
            "without digest": _notified_case(snapshot, without),
            "get fed": _lookup_case(fed, keys),
            "get built": _lookup_case(built, keys),
        },
        repeats=3 if quick else 9,
    )
    label = f"{size // 1000}k routes"
    return [
        Row(
            "watcher applies a notified split, digest checked",
            label,
            summarize(results["with digest"]).median,
            "us",
            "the same payloads without a digest",
            summarize(results["without digest"]).median,
        ),
        Row(
            "watcher-fed Engine get_route",
            label,
            summarize(results["get fed"]).median,
            "ns/key",
            "get_route, same routes by apply_snapshot",
            summarize(results["get built"]).median,
        ),
    ]


def _undo_seconds(store: CatalogStore, url: str, *, lies: int) -> list[float]:
    """Seconds from a forged notification's commit until the watcher's Engine holds the catalog
    again, for ``lies`` lies sent at random phases of the watcher's safety poll."""
    engine = Engine()
    values = []
    with CatalogWatcher(store, engine) as watcher, psycopg.connect(url, autocommit=True) as forger:
        snapshot = store.snapshot()
        _wait_for(lambda: watcher.listening and engine.version == snapshot.version)
        first = snapshot.routes[0]
        lie = _payload(
            snapshot.version,
            [first._replace(group_id=first.group_id % 5 + 1)],
            (),
            routes_digest(snapshot.routes)
            ^ route_hash(first)
            ^ route_hash(first._replace(group_id=first.group_id % 5 + 1)),
        )
        for _ in range(lies):
            time.sleep(random.uniform(0, 1.0))
            forger.execute("SELECT pg_notify('distribution_catalog', %s)", [lie])
            sent = time.perf_counter()
            _wait_for(lambda: engine.version > snapshot.version)
            undone = _wait_for(lambda: engine.version == snapshot.version, timeout=5.0)
            values.append(undone - sent)
    return values


def run(quick: bool) -> list[Row]:
    """Measure the watcher on a 1,000-route catalog."""
    writes = 20 if quick else 200
    idle_seconds = 3.0 if quick else 10.0
    with bench_server() as server, server.scratch_database() as url:
        progress(f"watcher: on {server.describe()}")
        with CatalogStore.from_url(url) as store:
            store.save(0, make_routes(1000), actor="bench")
            progress("watcher: commit-to-visible, NOTIFY and polling")
            pushed = summarize(_latencies(store, listen=True, writes=writes))
            polled = summarize(_latencies(store, listen=False, writes=max(10, writes // 4)))
            progress("watcher: commit-to-visible, trust_notifications=False")
            trusting, wary = [], []
            for _ in range(2 if quick else 5):
                trusting += _latencies(store, listen=True, writes=writes // 5)
                wary += _latencies(
                    store, listen=True, writes=writes // 5, trust_notifications=False
                )
            progress("watcher: forged notifications undone")
            undo = summarize(_undo_seconds(store, url, lies=3 if quick else 10))
            progress("watcher: idle reads")
            idle_listening = _idle_reads_per_second(store, listen=True, seconds=idle_seconds)
            idle_polling = _idle_reads_per_second(store, listen=False, seconds=idle_seconds)
            progress("watcher: reads per change, 20 watchers")
            small = _reads_per_change(store, watchers=20, changes=10 if quick else 50, large=False)
            big = _reads_per_change(store, watchers=20, changes=3 if quick else 10, large=True)
    progress("watcher: per notification, in-process")
    in_process = [row for size in (1_000, 100_000) for row in _in_process_rows(size, quick)]
    polling = "polling every 100 ms (seed)"
    trusted = "trusted notifications, same run"
    return [
        Row(
            "watcher commit-to-visible, NOTIFY", "p50", pushed.median, "ms", polling, polled.median
        ),
        Row("watcher commit-to-visible, NOTIFY", "p99", pushed.p99, "ms", polling, polled.p99),
        Row(
            "watcher idle catalog reads, listening",
            "1 watcher",
            idle_listening,
            "/s",
            polling,
            idle_polling,
        ),
        Row(
            "watcher reads per change, small (in payload)", "20 watchers", small, "/change/watcher"
        ),
        Row("watcher reads per change, 1,000 routes moved", "20 watchers", big, "/change/watcher"),
        Row(
            "watcher commit-to-visible, trust_notifications=False",
            "p50",
            summarize(wary).median,
            "ms",
            trusted,
            summarize(trusting).median,
        ),
        Row(
            "watcher commit-to-visible, trust_notifications=False",
            "p99",
            summarize(wary).p99,
            "ms",
            trusted,
            summarize(trusting).p99,
        ),
        Row("watcher forged change undone after", "p50", undo.median, "s"),
        Row("watcher forged change undone after", "max", max(undo.values), "s"),
        *in_process,
    ]

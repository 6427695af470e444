"""Watcher benchmarks: commit-to-visible latency, and what watchers cost the database.

* commit-to-visible: the writer's call returns, then the watcher's Engine shows the version; with
  NOTIFY, beside polling only at the seed's 100 ms (the baseline, measured in the same run);
* catalog reads per second of an idle watcher, listening, beside a polling-only one;
* catalog reads per change per watcher, for 20 watchers following small changes (carried in the
  notification) and large ones (fetched with ``changes_since``).

The time to apply a one-route change to 1k / 100k / 1M-route Engines, beside a full
``apply_snapshot``, is in the engine section.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from contextlib import ExitStack

from benchmarks.bench_catalog import make_routes
from benchmarks.database import bench_server
from benchmarks.harness import Row, progress, summarize
from distribution import CatalogStore, CatalogWatcher, Engine

__all__ = ["run"]

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


class _Splitter:
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


def _latencies(store: CatalogStore, *, listen: bool, writes: int) -> list[float]:
    """Commit-to-visible milliseconds of ``writes`` splits, one watcher following."""
    splitter = _Splitter(store)
    engine = Engine()
    values = []
    with CatalogWatcher(store, engine, interval=_SEED_POLL_INTERVAL, listen=listen) as watcher:
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
        splitter = _Splitter(store)
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
            progress("watcher: idle reads")
            idle_listening = _idle_reads_per_second(store, listen=True, seconds=idle_seconds)
            idle_polling = _idle_reads_per_second(store, listen=False, seconds=idle_seconds)
            progress("watcher: reads per change, 20 watchers")
            small = _reads_per_change(store, watchers=20, changes=10 if quick else 50, large=False)
            big = _reads_per_change(store, watchers=20, changes=3 if quick else 10, large=True)
    polling = "polling every 100 ms (seed)"
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
    ]

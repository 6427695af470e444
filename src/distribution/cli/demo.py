"""``distribution demo``: live services follow the catalog through splits, a cutover and a merge.

The demo works on the same catalog as the other commands (the embedded server by default, or the
given URL), so ``distribution demo && distribution routes`` shows what it left. It **replaces the
catalog's routes**: it migrates the database, then, in one compare-and-set ``save`` at the current
version (on a database named by URL, only with ``--replace`` once the catalog has been written), swaps whatever routes there were for four fresh ones on groups 1-4 (with new ids, taken
from the catalog's counter, so retired ids are never reused), split at ``"g"``, ``"n"`` and ``"t"``.

Then it starts in-process services (four by default), each an :class:`~distribution.Engine` kept
in step by a :class:`~distribution.CatalogWatcher` and a thread that keeps routing batches of
random keys (``group_keys``, plus ``record_access`` for a sample). Each service thread records the
first moment its Engine shows each catalog version. The demo then writes, one step at a time:

1. split the first route at ``"c"``;
2. split the last (unbounded) route at ``"w"``;
3. fence ``["n", "t")`` (WRITE_FENCED): the services stop writing to it; the barrier
   (:func:`~distribution.catalog.wait_applied`) waits until every watcher holds the fence;
4. move it to group 5, and wait for every watcher again;
5. lift the fence (ACTIVE): the cutover is done;
6. merge the two children of step 1 back into one route.

After each step it prints what the write did and its commit-to-visible latency in every service:
the time from the write call returning to that service's thread first seeing the new version
(0.0 when the service saw it before the call even returned). It ends with a summary: the keys each
service routed, the latencies' p50 and max, the final catalog, and how long the demo took.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from distribution.cli.errors import EXIT_OK, CommandError
from distribution.cli.keys import format_key, format_range
from distribution.cli.output import routes_table
from distribution.errors import CatalogVersionMismatchError
from distribution.types import CatalogWriteResult, RouteDescriptor, RouteState

if TYPE_CHECKING:
    from distribution.catalog import CatalogStore
    from distribution.cli.session import Session
    from distribution.engine import Engine

__all__ = ["DEMO_BOUNDARIES", "DemoService", "run_demo"]

#: Where the demo's four seed routes are split.
DEMO_BOUNDARIES = (b"g", b"n", b"t")
# How long a service may take to see a version before the demo gives up.
_VISIBLE_TIMEOUT = 10.0
# How long the services route keys between two steps.
_PAUSE = 0.25
_BATCH = 64
_ALPHABET = b"abcdefghijklmnopqrstuvwxyz"


@dataclass
class DemoService:
    """One in-process service: an Engine, the watcher keeping it in step, and a routing thread."""

    name: str
    engine: Engine
    keys: list[bytes]
    #: Keys routed (every key of every batch).
    routed: int = 0
    #: Writes held back because their route was fenced or migrating.
    held: int = 0
    #: When (``time.perf_counter()``) the service thread first saw each catalog version.
    seen: dict[int, float] = field(default_factory=dict)
    error: BaseException | None = None
    #: The newest version the service thread has seen (set before the thread starts).
    last_version: int = 0

    def observe(self) -> None:
        """Record the first sighting of the Engine's version (and of every one it skipped)."""
        version = self.engine.version
        if version > self.last_version:
            now = time.perf_counter()
            for skipped in range(self.last_version + 1, version + 1):
                self.seen.setdefault(skipped, now)
            self.last_version = version

    def run(self, stop: threading.Event) -> None:
        """Route batches of keys until ``stop`` is set, watching the Engine's version."""
        try:
            position = 0
            while not stop.is_set():
                self.observe()
                batch = self.keys[position : position + _BATCH]
                position = (position + _BATCH) % (len(self.keys) - _BATCH)
                for route, keys in self.engine.group_keys(batch):
                    self.routed += len(keys)
                    if route.state != RouteState.ACTIVE:
                        self.held += len(keys)
                for key in batch[:8]:
                    self.engine.record_access(key)
                self.observe()
                # Leave the interpreter to the watchers and the writer most of the time.
                time.sleep(0.0005)
        except BaseException as exc:  # reported by the main thread
            self.error = exc


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


class _Tour:
    """The demo's state: the catalog, the services, and the latencies measured so far."""

    def __init__(self, session: Session, store: CatalogStore, services: list[DemoService]) -> None:
        self.session = session
        self.store = store
        self.services = services
        self.version = 0
        self.latencies: list[float] = []
        self.actor = session.actor()

    def wait_visible(self, version: int, since: float) -> list[float]:
        """Wait until every service has seen ``version``; return each one's latency after ``since``."""
        deadline = time.monotonic() + _VISIBLE_TIMEOUT
        while True:
            for service in self.services:
                if service.error is not None:
                    raise CommandError(f"demo service {service.name} failed: {service.error}")
            if all(version in s.seen for s in self.services):
                return [max(0.0, s.seen[version] - since) for s in self.services]
            if time.monotonic() > deadline:
                late = [s.name for s in self.services if version not in s.seen]
                raise CommandError(
                    f"demo services {', '.join(late)} did not see catalog version {version} "
                    f"within {_VISIBLE_TIMEOUT:g} s"
                )
            time.sleep(0.0002)

    def barrier(self, version: int) -> str:
        """Wait until every watcher of the catalog holds ``version``; say how long it took."""
        from distribution.catalog import wait_applied

        result = wait_applied(self.store, version, _VISIBLE_TIMEOUT)
        if not result.reached:
            late = ", ".join(w.name for w in result.laggards)
            raise CommandError(
                f"watchers {late} did not hold catalog version {version} within "
                f"{_VISIBLE_TIMEOUT:g} s"
            )
        count = len(result.watchers)
        took = _ms(result.elapsed)
        return f"      barrier: all {count} watchers hold version {version} after {took}"

    def step(
        self,
        number: int,
        title: str,
        write: Callable[[int], CatalogWriteResult],
        *,
        barrier: bool = False,
    ) -> CatalogWriteResult:
        """Run one write at the current version, then report it and its latencies; with
        ``barrier``, wait until every watcher holds it before going on."""
        started = time.perf_counter()
        result = write(self.version)
        returned = time.perf_counter()
        self.version = result.version
        waited = self.barrier(result.version) if barrier else None
        latencies = self.wait_visible(result.version, returned)
        self.latencies += latencies
        out = self.session
        out.print(f"[{number}/6] {title}: catalog version {result.version} (write took {_ms(returned - started)})")
        for route in result.created:
            out.print(
                f"      route {route.route_id:<4} {format_range(route.start, route.end)} "
                f"group {route.group_id}, {route.state.name.lower()}"
            )
        if result.retired:
            out.print(f"      retired {', '.join(map(str, result.retired))}")
        shown = ", ".join(f"{s.name} {_ms(t)}" for s, t in zip(self.services, latencies, strict=True))
        out.print(f"      visible in: {shown}")
        if waited is not None:
            out.print(waited)
        self.session.out.flush()
        if number < 6:
            time.sleep(_PAUSE)  # let the services route keys under the new catalog
        return result


def _seed_routes(first_id: int) -> list[RouteDescriptor]:
    starts = [b"", *DEMO_BOUNDARIES]
    ends: list[bytes | None] = [*DEMO_BOUNDARIES, None]
    return [
        RouteDescriptor(route_id=first_id + i, start=start, end=end, group_id=i + 1)
        for i, (start, end) in enumerate(zip(starts, ends, strict=True))
    ]


def _route_holding(routes: tuple[RouteDescriptor, ...], key: bytes) -> RouteDescriptor:
    for route in routes:
        if route.start <= key and (route.end is None or key < route.end):
            return route
    raise CommandError(f"no route holds {format_key(key)}")  # pragma: no cover


def run_demo(session: Session, url: str, source: str) -> int:
    """Run the demo on the catalog at ``url`` (described as ``source``); return the exit code."""
    from distribution.engine import Engine
    from distribution.migrator import migrate
    from distribution.watcher import CatalogWatcher

    began = time.perf_counter()
    count = session.args.services
    migrate(url)
    store = session.store()
    current = store.version()
    if current and session.external_url is not None and not session.args.replace:
        raise CatalogVersionMismatchError(
            f"the catalog on {session.url_source} has been written (version {current}): the demo "
            "would replace its routes; pass --replace to let it, or point it at a scratch database"
        )
    session.print(
        f"distribution demo on {source}: it replaces the catalog's routes",
        "latency: from a write call returning to each service's Engine showing the new version "
        "(0.0 ms: seen before the call returned)",
    )
    seeded = store.save(current, _seed_routes(store.next_route_id()), actor=session.actor())
    session.print(
        f"[0/6] seeded {len(seeded.routes)} routes on groups 1-4: catalog version {seeded.version}",
        *("      " + line for line in routes_table(seeded.routes).splitlines()),
    )
    rng = random.Random(20240601)
    services = [
        DemoService(
            name=f"s{i}",
            engine=Engine(),
            keys=[bytes(rng.choices(_ALPHABET, k=rng.randint(1, 6))) for _ in range(4096)],
        )
        for i in range(1, count + 1)
    ]
    stop = threading.Event()
    with ExitStack() as stack:
        for service in services:
            # As a service starts: load the catalog, then let the watcher follow it from there.
            service.engine.apply_snapshot(seeded)
            service.last_version = seeded.version
            service_store = stack.enter_context(session.open_store(url))
            stack.enter_context(
                CatalogWatcher(service_store, service.engine, name=f"demo-{service.name}")
            )
        threads = [
            threading.Thread(target=s.run, args=(stop,), name=f"demo-{s.name}", daemon=True)
            for s in services
        ]

        def join_threads() -> None:
            for thread in threads:
                thread.join(5)

        stack.callback(join_threads)
        stack.callback(stop.set)
        for thread in threads:
            thread.start()
        tour = _Tour(session, store, services)
        tour.version = seeded.version
        session.print(
            f"      {count} services started at version {seeded.version} (an Engine loaded from "
            "the catalog and a CatalogWatcher each), routing keys"
        )
        time.sleep(_PAUSE)

        routes = seeded.routes
        first, last = routes[0], routes[-1]
        left = tour.step(
            1,
            f"split route {first.route_id} at \"c\"",
            lambda v: store.split_route(first.route_id, b"c", v, actor=tour.actor),
        )
        tour.step(
            2,
            f"split route {last.route_id} at \"w\"",
            lambda v: store.split_route(last.route_id, b"w", v, actor=tour.actor),
        )
        moving = _route_holding(routes, b"n")
        tour.step(
            3,
            f"fence route {moving.route_id} (write_fenced)",
            lambda v: store.set_route_state(moving.route_id, RouteState.WRITE_FENCED, v, actor=tour.actor),
            barrier=True,
        )
        tour.step(
            4,
            f"move route {moving.route_id} to group 5",
            lambda v: store.move_route(moving.route_id, 5, v, actor=tour.actor),
            barrier=True,
        )
        tour.step(
            5,
            f"unfence route {moving.route_id} (active), cutover done",
            lambda v: store.set_route_state(moving.route_id, RouteState.ACTIVE, v, actor=tour.actor),
        )
        merge_left, merge_right = left.created
        tour.step(
            6,
            f"merge routes {merge_left.route_id} and {merge_right.route_id}",
            lambda v: store.merge_routes(merge_left.route_id, merge_right.route_id, v, actor=tour.actor),
        )
    elapsed = time.perf_counter() - began

    final = store.snapshot()
    session.print("", "summary")
    for service in services:
        session.print(
            f"  {service.name}: routed {service.routed:,} keys ({service.held:,} on the fenced "
            f"route, their writes held back); engine at version {service.engine.version}"
        )
    latencies = tour.latencies
    session.print(
        f"  commit-to-visible latency over {len(latencies) // max(1, count)} writes x {count} "
        f"services: p50 {_ms(statistics.median(latencies))}, "
        f"p90 {_ms(_percentile(latencies, 0.9))}, max {_ms(max(latencies))}",
        f"  final catalog, version {final.version} ('distribution routes' shows it):",
        *("    " + line for line in routes_table(final.routes).splitlines()),
        f"demo finished in {elapsed:.1f} s",
    )
    return EXIT_OK

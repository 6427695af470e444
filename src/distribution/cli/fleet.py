"""``distribution fleet``, the ``--wait`` barrier of the write commands, and ``watch``'s metrics.

``fleet`` prints one roll call (see :mod:`distribution.catalog.fleet`): every watcher connected
to the catalog's database, laggards first. A write given ``--wait`` then waits until every such
watcher holds the catalog's version. Both exit with :data:`~distribution.cli.errors.EXIT_BEHIND`
when some watcher lags. Given ``--nats URL`` (and ``--subject S``, as ``watch`` takes them), both
ask the watchers following that NATS subject instead: those that answer within the window, as
NATS cannot show the silent ones.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from distribution.catalog import BarrierResult, WatcherStatus, roll_call, wait_applied
from distribution.cli.errors import EXIT_BEHIND, EXIT_OK, CommandError, UsageError
from distribution.cli.output import render_table, write_json
from distribution.cli.relay import open_nats

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from distribution.cli.session import Session
    from distribution.fanout import NatsNotifications
    from distribution.watcher import CatalogWatcher

__all__ = ["DEFAULT_WAIT_TIMEOUT", "cmd_fleet", "describe_watcher", "serving_metrics", "waiting"]


def _duration(seconds: float | None) -> str:
    """A duration, short: ``850 ms``, ``12.0 s``, ``7 min``, ``3.5 h``.

    >>> [_duration(s) for s in (0.85, 12, 420, 12600, None)]
    ['850 ms', '12.0 s', '7 min', '3.5 h', '-']
    """
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe_watcher(status: WatcherStatus) -> str:
    """A watcher and its version, for messages.

    >>> from distribution.catalog.fleet import silent_watcher
    >>> describe_watcher(silent_watcher("billing-7", 4242))
    'billing-7 (no answer; server pid 4242)'
    """
    if not status.answered:
        return f"{status.name} (no answer; server pid {status.backend_pid})"
    return f"{status.name} (version {status.applied_version})"


# How long a roll call or a barrier over NATS waits for its connection to NATS, at most.
_NATS_CONNECT_SECONDS = 10.0


@contextlib.contextmanager
def _asking_nats(session: Session) -> Iterator[NatsNotifications | None]:
    """The NATS connection ``--nats`` names, for the block (None without ``--nats``)."""
    if not session.args.nats:
        yield None
        return
    with open_nats(session, "distribution-fleet") as nats:
        # Unconnected by then, asking raises NotificationsUnavailableError, which says so.
        nats.wait_connected(_NATS_CONNECT_SECONDS)
        yield nats


def _row(status: WatcherStatus, catalog_version: int) -> list[str]:
    if not status.answered:
        return [status.name, "-", "-", "-", "-", "-", "-", "(no answer)"]
    applied = status.applied_version or 0
    return [
        status.name,
        status.host,
        str(status.pid),
        str(applied),
        str(max(0, catalog_version - applied)),
        "yes" if status.listening else "no",
        _duration(status.uptime),
        " ".join((status.last_error or "").split()),
    ]


def cmd_fleet(session: Session) -> int:
    """Show every watcher of the catalog from one roll call, laggards first."""
    with _asking_nats(session) as nats:
        report = roll_call(session.store(), window=session.args.window, nats=nats)
    laggards = report.laggards
    if session.args.json:
        write_json(
            {
                "catalog_version": report.catalog_version,
                "elapsed": round(report.elapsed, 6),
                "watchers": [w.to_json() for w in report.watchers],
            },
            session.out,
        )
    elif not report.watchers:
        nobody = "answered" if session.args.nats else "is listening"
        session.print(f"catalog version {report.catalog_version}: no watcher {nobody}")
    else:
        count = len(report.watchers)
        state = f"{len(laggards)} behind" if laggards else "all at this version"
        session.print(
            f"catalog version {report.catalog_version}: {count} watcher{'s' * (count != 1)}, "
            f"{state}",
            render_table(
                ("NAME", "HOST", "PID", "VERSION", "LAG", "LISTENING", "UPTIME", "LAST ERROR"),
                [_row(w, report.catalog_version) for w in report.watchers],
                "<<>>><><",
            ),
        )
    if laggards:
        raise CommandError(
            f"{len(laggards)} of {len(report.watchers)} watchers behind catalog version "
            f"{report.catalog_version}: {', '.join(map(describe_watcher, laggards))}",
            EXIT_BEHIND,
        )
    return EXIT_OK


def barrier_line(result: BarrierResult) -> str:
    """What a barrier that was reached says."""
    if not result.watchers:
        return f"version {result.version}: no watcher is listening, nothing to wait for"
    count = len(result.watchers)
    last = "" if result.last is None else f" (last: {result.last.name})"
    return (
        f"version {result.version} held by all {count} watcher{'s' * (count != 1)} after "
        f"{result.elapsed * 1000:.1f} ms{last}"
    )


#: How long ``--wait`` waits without ``--timeout``, in seconds.
DEFAULT_WAIT_TIMEOUT = 10.0


def _wait(session: Session) -> None:
    """The barrier after a write: every watcher holds the catalog's version, or EXIT_BEHIND."""
    store = session.store()
    timeout: float = session.args.timeout or DEFAULT_WAIT_TIMEOUT
    with _asking_nats(session) as nats:
        result = wait_applied(store, store.version(), timeout, nats=nats)
    if not result.reached:
        raise CommandError(
            f"after {timeout:g} s, {len(result.laggards)} of {len(result.watchers)} watchers "
            f"do not hold catalog version {result.version}: "
            f"{', '.join(map(describe_watcher, result.laggards))}",
            EXIT_BEHIND,
        )
    line = barrier_line(result)
    if session.args.json:
        session.note(line)  # stdout holds the write's JSON
    else:
        session.print(line)


def waiting(command: Callable[[Session], int]) -> Callable[[Session], int]:
    """``command`` followed, with ``--wait``, by the barrier on the catalog's version."""

    @functools.wraps(command)
    def run(session: Session) -> int:
        for option in ("timeout", "nats"):
            if getattr(session.args, option) is not None and not session.args.wait:
                raise UsageError(f"--{option} needs --wait")
        code = command(session)
        if code == EXIT_OK and session.args.wait:
            _wait(session)
        return code

    return run


@contextlib.contextmanager
def serving_metrics(watcher: CatalogWatcher, port: int | None) -> Iterator[None]:
    """Serve ``watcher``'s Prometheus metrics on ``port`` for the block (nothing when None)."""
    if port is None:
        yield
        return
    try:
        from distribution.metrics import serve_metrics
    except ImportError as exc:
        raise UsageError(
            f"--metrics-port needs prometheus_client (pip install 'distribution[metrics]'): {exc}"
        ) from None
    try:
        server: WSGIServer = serve_metrics(watcher, port)
    except OSError as exc:
        raise CommandError(f"cannot serve metrics on port {port}: {exc}") from None
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()

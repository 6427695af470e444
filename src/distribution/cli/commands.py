"""The subcommands of ``distribution``: each reads its arguments, calls the library, and prints.

Every command is a function ``(session) -> exit code``; :data:`COMMANDS` maps names to them.
Errors are raised, not printed: :func:`distribution.cli.main` turns them into one line on stderr
and an exit code (see :mod:`distribution.cli.errors`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import queue
import time
import uuid
from collections.abc import Callable, Iterable
from typing import NamedTuple

from distribution.catalog import CatalogStore
from distribution.cli.db import cmd_db
from distribution.cli.demo import run_demo
from distribution.cli.errors import EXIT_NOT_FOUND, EXIT_OK, CommandError, UsageError
from distribution.cli.fleet import cmd_fleet, serving_metrics, waiting
from distribution.cli.keys import format_key, format_range, parse_key
from distribution.cli.output import (
    STATE_TRANSITIONS,
    change_lines,
    change_to_json,
    describe_route,
    history_arguments,
    history_to_json,
    render_table,
    route_to_json,
    routes_table,
    snapshot_to_json,
    state_name,
    write_json,
    write_result_lines,
    write_result_to_json,
)
from distribution.cli.relay import cmd_relay, open_nats
from distribution.cli.session import Session, redact
from distribution.cli.transfer import cmd_export, cmd_import
from distribution.errors import (
    CatalogInvalidSplitKeyError,
    CatalogInvalidStateTransitionError,
    CatalogRouteGroupMismatchError,
    CatalogRouteNotActiveError,
    CatalogRouteNotFencedError,
    CatalogRouteNotFoundError,
    CatalogRoutesNotAdjacentError,
    CatalogSplitKeyAtBoundaryError,
    CatalogUnavailableError,
    CatalogVersionMismatchError,
)
from distribution.types import (
    CatalogChange,
    CatalogSnapshot,
    CatalogWriteResult,
    Route,
    RouteDescriptor,
    RouteState,
)

__all__ = ["COMMANDS", "init_routes"]

# How often ``watch``'s main thread wakes while waiting for changes (to see a deadline).
_WATCH_WAKE_SECONDS = 0.5
# How long ``watch`` waits for its watcher to listen before it says it is watching anyway.
_WATCH_LISTEN_SECONDS = 10.0


# -- reading -----------------------------------------------------------------------------------


def _routes_header(snapshot: CatalogSnapshot) -> str:
    count = len(snapshot.routes)
    return f"catalog version {snapshot.version}: {count} route{'s' * (count != 1)}"


def _revision(url: str) -> str | None:
    """The schema revision the database at ``url`` holds (None: never migrated)."""
    import sqlalchemy as sa

    from distribution.database import sqlalchemy_url
    from distribution.migrator import current_revision

    sa_engine = sa.create_engine(sqlalchemy_url(url))
    try:
        with sa_engine.connect() as connection:
            return current_revision(connection)
    finally:
        sa_engine.dispose()


def cmd_migrate(session: Session) -> int:
    """Upgrade the database to the newest catalog schema, and say what it did."""
    from distribution.migrator import head_revision, migrate

    url = session.url(migrated=False)
    before = _revision(url)
    migrate(url)
    head = head_revision()
    if before == head:
        session.print(f"the catalog schema is already up to date (revision {head}) on {redact(url)}")
    else:
        start = "an empty database" if before is None else f"revision {before}"
        session.print(f"upgraded the catalog schema from {start} to revision {head} on {redact(url)}")
    return EXIT_OK


def init_routes(groups: int) -> list[RouteDescriptor]:
    """Return the routes ``init --groups N`` seeds: N routes split at one-byte keys.

    Route ``i`` (1..N) is on group ``i`` and starts at ``bytes([256*(i-1)//N])`` (the first at
    ``b""``); each ends where the next starts, and the last is unbounded.

    >>> [(r.route_id, r.start, r.end, r.group_id) for r in init_routes(2)]
    [(1, b'', b'\\x80', 1), (2, b'\\x80', None, 2)]
    >>> [r.start for r in init_routes(4)]
    [b'', b'@', b'\\x80', b'\\xc0']
    """
    bounds = [bytes([256 * i // groups]) for i in range(1, groups)]
    starts = [b"", *bounds]
    ends: list[bytes | None] = [*bounds, None]
    return [
        RouteDescriptor(route_id=i, start=start, end=end, group_id=i)
        for i, (start, end) in enumerate(zip(starts, ends, strict=True), start=1)
    ]


def cmd_init(session: Session) -> int:
    """Seed an empty catalog; refuse (version conflict) one that is not empty."""
    store = session.store()
    current = store.snapshot()
    if current.version != 0 or current.routes:
        raise CatalogVersionMismatchError(
            f"the catalog is not empty (version {current.version}, {len(current.routes)} routes): "
            "init only seeds an empty catalog"
        )
    snapshot = store.save(0, init_routes(session.args.groups), actor=session.actor())
    if session.args.json:
        write_json(snapshot_to_json(snapshot), session.out)
    else:
        session.print(_routes_header(snapshot), routes_table(snapshot.routes))
    return EXIT_OK


def _route_filter(session: Session) -> Callable[[RouteDescriptor], bool] | None:
    """The ``routes`` filters as one predicate (None: no filter given)."""
    args = session.args
    start = None if args.from_key is None else _parse_keys(session, [args.from_key])[0]
    end = None if args.to_key is None else _parse_keys(session, [args.to_key])[0]
    if start is not None and end is not None and end <= start:
        raise UsageError(f"--to {format_key(end)} must come after --from {format_key(start)}")
    given = (args.route_id, args.group, args.state, start, end)
    if all(value is None for value in given):
        return None

    def keep(route: RouteDescriptor) -> bool:
        return (
            (args.route_id is None or route.route_id == args.route_id)
            and (args.group is None or route.group_id == args.group)
            and (args.state is None or route.state == args.state)
            and (start is None or route.end is None or route.end > start)
            and (end is None or route.start < end)
        )

    return keep


def cmd_routes(session: Session) -> int:
    """Show the catalog's routes, now or at a past version, maybe filtered."""
    keep = _route_filter(session)
    snapshot = session.snapshot(session.args.at)
    if keep is not None:
        snapshot = dataclasses.replace(snapshot, routes=tuple(filter(keep, snapshot.routes)))
    if session.args.json:
        write_json(snapshot_to_json(snapshot), session.out)
        return EXIT_OK
    if not snapshot.routes:
        if keep is not None:
            session.print(f"catalog version {snapshot.version}: no route matches")
            if session.args.route_id is not None:
                raise CatalogRouteNotFoundError(
                    f"route {session.args.route_id} not found: catalog version "
                    f"{snapshot.version} has no live route {session.args.route_id} that matches"
                )
            return EXIT_OK
        empty_now = snapshot.version == 0 and session.args.at is None
        hint = " (seed it with 'distribution init')" if empty_now else ""
        session.print(f"catalog version {snapshot.version}: no routes{hint}")
        return EXIT_OK
    session.print(_routes_header(snapshot), routes_table(snapshot.routes))
    return EXIT_OK


def _parse_keys(session: Session, texts: Iterable[str]) -> list[bytes]:
    args = session.args
    return [parse_key(text, hex_key=args.hex, text_key=args.text) for text in texts]


def _found(
    by_id: dict[int, RouteDescriptor], route: Route | None
) -> RouteDescriptor | None:
    return None if route is None else by_id[route.route_id]


def cmd_lookup(session: Session) -> int:
    """Show which route holds each key, with an Engine built from the catalog."""
    from distribution.engine import Engine

    keys = _parse_keys(session, session.args.keys)
    snapshot = session.snapshot(session.args.at)
    engine = Engine()
    engine.apply_snapshot(snapshot)
    # The Engine's routes carry no parent: show the catalog's descriptor of the route found.
    by_id = {route.route_id: route for route in snapshot.routes}
    found = [(key, _found(by_id, engine.get_route(key))) for key in keys]
    missing = [key for key, route in found if route is None]
    if session.args.json:
        write_json(
            {
                "version": snapshot.version,
                "lookups": [
                    {"key": key.hex(), "route": None if route is None else route_to_json(route)}
                    for key, route in found
                ],
            },
            session.out,
        )
    else:
        rows = [
            [format_key(key), "-", "(no route holds this key)", "", ""]
            if route is None
            else [
                format_key(key),
                str(route.route_id),
                format_range(route.start, route.end),
                str(route.group_id),
                state_name(route.state),
            ]
            for key, route in found
        ]
        session.print(
            f"catalog version {snapshot.version}",
            render_table(("KEY", "ROUTE", "RANGE", "GROUP", "STATE"), rows, "<><><"),
        )
    if missing:
        shown = ", ".join(map(format_key, missing))
        raise CommandError(f"no route holds {shown}", EXIT_NOT_FOUND)
    return EXIT_OK


def cmd_history(session: Session) -> int:
    """Show the audit trail of catalog writes."""
    args = session.args
    if args.last is not None:
        entries = session.store().history(since=args.since, limit=args.last, newest_first=True)
    else:
        entries = session.store().history(since=args.since, limit=args.limit)
    if session.args.json:
        write_json([history_to_json(e) for e in entries], session.out)
        return EXIT_OK
    if not entries:
        session.print(f"no catalog writes after version {session.args.since}")
        return EXIT_OK
    rows = [
        [
            str(e.version),
            e.committed_at.astimezone().isoformat(sep=" ", timespec="seconds"),
            e.actor or "-",
            e.operation,
            history_arguments(e),
        ]
        for e in entries
    ]
    session.print(render_table(("VERSION", "COMMITTED", "ACTOR", "OPERATION", "ARGUMENTS"), rows, "><<<<"))
    return EXIT_OK


def cmd_prune(session: Session) -> int:
    """Drop the history of all but the newest ``--keep`` versions."""
    store = session.store()
    floor = store.prune_history(session.args.keep)
    session.print(
        f"history kept from version {floor} (catalog version {store.version()}); "
        "older versions can no longer be read"
    )
    return EXIT_OK


# -- writing -----------------------------------------------------------------------------------


def _route(snapshot: CatalogSnapshot, route_id: int) -> RouteDescriptor:
    for route in snapshot.routes:
        if route.route_id == route_id:
            return route
    raise CatalogRouteNotFoundError(
        f"route {route_id} not found: catalog version {snapshot.version} has no live route {route_id}"
    )


def _check_split(snapshot: CatalogSnapshot, args: argparse.Namespace) -> str | None:
    route = _route(snapshot, args.route_id)
    key: bytes = args.split_key
    if key == route.start:
        raise CatalogSplitKeyAtBoundaryError(
            f"cannot split {describe_route(route)} at {format_key(key)}: that is its start boundary; "
            "the split key must lie strictly inside the route"
        )
    inside = route.start < key and (route.end is None or key < route.end)
    if not inside:
        raise CatalogInvalidSplitKeyError(
            f"cannot split {describe_route(route)} at {format_key(key)}: the split key must lie "
            "strictly inside the route (after its start, before its end)"
        )
    return None


def _check_merge(snapshot: CatalogSnapshot, args: argparse.Namespace) -> str | None:
    left, right = _route(snapshot, args.left), _route(snapshot, args.right)
    if right.end == left.start:
        raise CatalogRoutesNotAdjacentError(
            f"{describe_route(right)} comes before {describe_route(left)}: give the left route first "
            f"(distribution merge {right.route_id} {left.route_id})"
        )
    if left.end != right.start:
        raise CatalogRoutesNotAdjacentError(
            f"{describe_route(left)} and {describe_route(right)} are not adjacent: the left route must "
            "end where the right one starts"
        )
    if left.group_id != right.group_id:
        raise CatalogRouteGroupMismatchError(
            f"routes {left.route_id} (group {left.group_id}) and {right.route_id} "
            f"(group {right.group_id}) are on different groups: move one first"
        )
    for route in (left, right):
        if route.state != RouteState.ACTIVE:
            raise CatalogRouteNotActiveError(
                f"route {route.route_id} is {state_name(route.state)}: only active routes merge"
            )
    return None


def _check_set_state(snapshot: CatalogSnapshot, args: argparse.Namespace) -> str | None:
    route = _route(snapshot, args.route_id)
    if route.state == args.state:
        return f"route {route.route_id} is already {state_name(route.state)}: nothing written"
    allowed = STATE_TRANSITIONS[RouteState(route.state)]
    if args.state not in allowed:
        raise CatalogInvalidStateTransitionError(
            f"route {route.route_id} cannot go from {state_name(route.state)} to "
            f"{state_name(args.state)}: from {state_name(route.state)} it can go to "
            f"{' or '.join(map(state_name, allowed))}"
        )
    return None


def _check_move(snapshot: CatalogSnapshot, args: argparse.Namespace) -> str | None:
    route = _route(snapshot, args.route_id)
    if route.state != RouteState.WRITE_FENCED:
        raise CatalogRouteNotFencedError(
            f"route {route.route_id} is {state_name(route.state)}: fence it before moving it "
            f"(distribution set-state {route.route_id} write_fenced)"
        )
    if route.group_id == args.group_id:
        return f"route {route.route_id} is already on group {args.group_id}: nothing written"
    return None


class _Write(NamedTuple):
    """One compare-and-set command: what it says it did, its checks, and the library call."""

    done: str
    check: Callable[[CatalogSnapshot, argparse.Namespace], str | None]
    #: The call: store, arguments, expected version, actor, request id.
    call: Callable[[CatalogStore, argparse.Namespace, int, str, str], CatalogWriteResult]


#: The write commands. ``done`` is formatted with the arguments; ``check`` reads the catalog the
#: write is compared with and raises the library's error, worded for an operator, before the
#: database would, or returns why there is nothing to write.
_WRITES: dict[str, _Write] = {
    "split": _Write(
        "split route {route_id} at {split_key}",
        _check_split,
        lambda store, a, v, actor, rid: store.split_route(
            a.route_id, a.split_key, v, actor=actor, request_id=rid
        ),
    ),
    "merge": _Write(
        "merged routes {left} and {right}",
        _check_merge,
        lambda store, a, v, actor, rid: store.merge_routes(
            a.left, a.right, v, actor=actor, request_id=rid
        ),
    ),
    "set-state": _Write(
        "route {route_id} is now {state}",
        _check_set_state,
        lambda store, a, v, actor, rid: store.set_route_state(
            a.route_id, a.state, v, actor=actor, request_id=rid
        ),
    ),
    "move": _Write(
        "moved route {route_id} to group {group_id}",
        _check_move,
        lambda store, a, v, actor, rid: store.move_route(
            a.route_id, a.group_id, v, actor=actor, request_id=rid
        ),
    ),
}


def cmd_write(session: Session) -> int:
    """Run one compare-and-set write at ``--expect-version``, or at the version read just before.

    The write's checks run on the catalog at that version first, so that an operator's mistake
    is reported with the routes' keys and state names; the database checks again as it writes.

    The write is named by a fresh request id: when the connection drops before its outcome is
    known (:class:`~distribution.CatalogUnavailableError`), it is sent once more with the same
    id, which the catalog writes at most once (a note on stderr says so).
    """
    args = session.args
    write = _WRITES[args.command]
    if args.command == "split":
        (args.split_key,) = _parse_keys(session, [args.key])
    store = session.store()
    expected = args.expect_version
    snapshot = store.snapshot()
    if expected is not None and expected != snapshot.version:
        raise CatalogVersionMismatchError(
            f"the catalog is at version {snapshot.version}, not {expected}"
        )
    nothing = write.check(snapshot, args)
    if nothing is not None:
        session.print(nothing)
        return EXIT_OK
    request_id = uuid.uuid4().hex
    try:
        result = write.call(store, args, snapshot.version, session.actor(), request_id)
    except CatalogUnavailableError as exc:
        session.note(
            f"the write's outcome is unknown ({exc}): sending it again as request "
            f"{request_id}, which is written at most once"
        )
        result = write.call(store, args, snapshot.version, session.actor(), request_id)
    if args.json:
        write_json(write_result_to_json(result), session.out)
    else:
        shown = {
            **vars(args),
            "split_key": format_key(getattr(args, "split_key", b"")),
            "state": state_name(getattr(args, "state", 0)),
        }
        lines = write_result_lines(result)
        session.print(f"{write.done.format(**shown)}: {lines[0]}", *lines[1:])
    return EXIT_OK


# -- watching ----------------------------------------------------------------------------------


def _watch_header(store: CatalogStore, version: int) -> tuple[str, str | None]:
    """The operation and actor of the write that produced ``version`` (pruned: unknown)."""
    try:
        entries = store.history(since=version - 1, limit=1)
    except CatalogUnavailableError:
        # A pooled connection the server dropped fails once; the watcher has reconnected.
        entries = store.history(since=version - 1, limit=1)
    if not entries or entries[0].version != version:
        return "(history pruned)", None
    return entries[0].operation, entries[0].actor


def _print_applied(session: Session, applied: CatalogChange | CatalogSnapshot) -> None:
    args = session.args
    if isinstance(applied, CatalogSnapshot):
        if args.json:
            write_json({"snapshot": True, **snapshot_to_json(applied)}, session.out, compact=True)
        else:
            # Read whole: the watcher's first read of a catalog, or history pruned past it.
            session.print(
                f"version {applied.version}: the whole catalog, {len(applied.routes)} routes",
                *("  " + line for line in routes_table(applied.routes).splitlines()),
            )
    else:
        operation, actor = _watch_header(session.store(), applied.version)
        if args.json:
            document = {"operation": operation, "actor": actor, **change_to_json(applied)}
            write_json(document, session.out, compact=True)
        else:
            session.print(*change_lines(applied, operation, actor))
    session.out.flush()


def cmd_watch(session: Session) -> int:
    """Print each catalog change as it lands, until Ctrl-C, ``--count`` or ``--timeout``.

    A :class:`~distribution.CatalogWatcher` follows the catalog (notifications, polling, and
    reconnecting when the server goes away); its listener hands each applied change to this
    thread, which prints it.
    """
    from distribution.engine import Engine
    from distribution.watcher import CatalogWatcher

    args = session.args
    store = session.store()
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    applied: queue.Queue[CatalogChange | CatalogSnapshot] = queue.Queue()
    engine = Engine()
    start = store.version() if args.since is None else args.since
    # The changes after --since are replayed from the catalog's history first.
    answer = store.changes_since(start)
    if answer.reset is not None:
        engine.apply_snapshot(answer.reset)
        applied.put(answer.reset)
    else:
        if start > 0:
            engine.apply_snapshot(store.snapshot_at(start))
        engine.apply_changes(answer.changes)
        for change in answer.changes:
            applied.put(change)
    seen = 0
    try:
        with contextlib.ExitStack() as stack:
            watcher_store = stack.enter_context(session.open_store())
            # Following NATS (``distribution relay`` publishes there), the watcher holds no
            # listening connection on the catalog's database.
            nats = None
            if args.nats:
                nats = stack.enter_context(open_nats(session, "distribution-watch"))
                # Connecting is under way; a watcher started before it ends would warn that it
                # cannot subscribe, and back off.
                nats.wait_connected(_WATCH_LISTEN_SECONDS)
            watcher = CatalogWatcher(
                watcher_store,
                engine,
                name=args.name,
                notifications=None if nats is None else nats.subscribe,
            )
            watcher.add_listener(applied.put)
            stack.enter_context(watcher)
            stack.enter_context(serving_metrics(watcher, args.metrics_port))
            # Ready once the watcher listens (it polls meanwhile, and if it cannot listen).
            ready = time.monotonic() + _WATCH_LISTEN_SECONDS
            while not watcher.listening and time.monotonic() < ready:
                time.sleep(0.01)
            session.note(f"watching the catalog after version {start} (Ctrl-C to stop)")
            while args.count is None or seen < args.count:
                wait = _WATCH_WAKE_SECONDS
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        break
                try:
                    event = applied.get(timeout=wait)
                except queue.Empty:
                    continue
                _print_applied(session, event)
                seen += 1
    except KeyboardInterrupt:
        return EXIT_OK
    if args.count is not None and seen < args.count:
        raise CommandError(
            f"timed out after {args.timeout:g} s having seen {seen} of {args.count} changes"
        )
    return EXIT_OK


def cmd_demo(session: Session) -> int:
    """Run the guided tour (see :mod:`distribution.cli.demo`)."""
    url = session.url()
    source = "the embedded server" if session.external_url is None else redact(url)
    return run_demo(session, url, source)


#: The function of every subcommand.
COMMANDS: dict[str, Callable[[Session], int]] = {
    "migrate": cmd_migrate,
    "init": cmd_init,
    "routes": cmd_routes,
    "lookup": cmd_lookup,
    **dict.fromkeys(_WRITES, waiting(cmd_write)),
    "history": cmd_history,
    "prune": cmd_prune,
    "watch": cmd_watch,
    "fleet": cmd_fleet,
    "relay": cmd_relay,
    "export": cmd_export,
    "import": cmd_import,
    "db": cmd_db,
    "demo": cmd_demo,
}

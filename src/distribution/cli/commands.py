"""The subcommands of ``distribution``: each reads its arguments, calls the library, and prints.

Every command is a function ``(session) -> exit code``; :data:`COMMANDS` maps names to them.
Errors are raised, not printed: :func:`distribution.cli.main` turns them into one line on stderr
and an exit code (see :mod:`distribution.cli.errors`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any, TextIO

from distribution.catalog import DEFAULT_CHANGES_LIMIT, CatalogStore
from distribution.cli.embedded import EmbeddedDatabase
from distribution.cli.errors import EXIT_NOT_FOUND, EXIT_OK, CommandError, UsageError
from distribution.cli.keys import format_key, format_range, parse_key
from distribution.cli.output import (
    change_lines,
    change_to_json,
    history_arguments,
    history_to_json,
    render_table,
    route_from_json,
    route_to_json,
    routes_table,
    snapshot_to_json,
    state_name,
    write_json,
    write_result_lines,
    write_result_to_json,
)
from distribution.cli.parser import default_actor
from distribution.codec import (
    catalog_next_route_id_key,
    catalog_route_key,
    catalog_version_key,
    decode_catalog_next_route_id,
    decode_catalog_route_entry,
    decode_catalog_version,
    encode_catalog_next_route_id,
    encode_catalog_version,
    encode_route_descriptor,
)
from distribution.database import DATABASE_URL_ENV, sqlalchemy_url
from distribution.errors import CatalogVersionMismatchError, DistributionError
from distribution.types import CatalogSnapshot, CatalogWriteResult, RouteDescriptor

__all__ = ["COMMANDS", "PROGRESS_THRESHOLD", "Session", "init_routes", "redact"]

#: Catalogs with at least this many routes get a progress bar on export and import.
PROGRESS_THRESHOLD = 10_000
# How often ``watch`` polls the catalog while listening, as a safety net for lost notifications.
_WATCH_POLL_SECONDS = 1.0
_CONNECT_TIMEOUT_SECONDS = 10


def redact(url: str) -> str:
    """Return ``url`` with its password hidden.

    >>> redact("postgresql://app:secret@db.example/catalog")
    'postgresql://app:***@db.example/catalog'
    """
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable URL>"


class Session:
    """One run of a command: its arguments, its streams, and the catalog it works on.

    The database is resolved on first use: ``--database-url``, else ``$DISTRIBUTION_DATABASE_URL``,
    else the embedded server, started (and migrated) on demand.
    """

    def __init__(
        self, args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None
    ) -> None:
        self.args = args
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self._url: str | None = None
        self._store: CatalogStore | None = None

    @property
    def external_url(self) -> str | None:
        """The database URL given by option or environment, if any."""
        url: str | None = getattr(self.args, "database_url", None) or os.environ.get(
            DATABASE_URL_ENV
        )
        return url or None

    @property
    def url_source(self) -> str:
        """Where the database URL comes from, for messages."""
        if getattr(self.args, "database_url", None):
            return "--database-url"
        if os.environ.get(DATABASE_URL_ENV):
            return f"${DATABASE_URL_ENV}"
        return "the embedded server"

    def url(self) -> str:
        """The catalog database's URL; starts and migrates the embedded server if it is the one."""
        if self._url is None:
            url = self.external_url
            if url is not None:
                try:
                    sqlalchemy_url(url)
                except Exception as exc:
                    raise UsageError(f"invalid database URL {redact(url)!r}: {exc}") from None
            else:
                url = EmbeddedDatabase().start()
                from distribution.migrator import migrate

                migrate(url)
            self._url = url
        return self._url

    def open_store(self, url: str | None = None) -> CatalogStore:
        """Open a new CatalogStore on ``url`` (default: the session's database)."""
        url = url or self.url()
        from sqlalchemy.engine import make_url

        connect_args: dict[str, Any] = {"application_name": "distribution-cli"}
        if "connect_timeout" not in make_url(url).query:
            connect_args["connect_timeout"] = _CONNECT_TIMEOUT_SECONDS
        return CatalogStore.from_url(url, connect_args=connect_args)

    def store(self) -> CatalogStore:
        """The session's CatalogStore, opened once."""
        if self._store is None:
            self._store = self.open_store()
        return self._store

    def actor(self) -> str:
        """Who asks, for the audit trail: ``--actor``, else the OS user name."""
        actor: str | None = getattr(self.args, "actor", None)
        return actor or default_actor()

    def print(self, *lines: str) -> None:
        """Print lines on stdout."""
        for line in lines:
            print(line, file=self.out)

    def note(self, message: str) -> None:
        """Print a status line on stderr (it never mixes with the data on stdout)."""
        print(message, file=self.err, flush=True)

    def close(self) -> None:
        """Close the store, if one was opened."""
        if self._store is not None:
            self._store.close()
            self._store = None


# -- reading -----------------------------------------------------------------------------------


def _snapshot(session: Session, at: int | None) -> CatalogSnapshot:
    store = session.store()
    return store.snapshot() if at is None else store.snapshot_at(at)


def _routes_header(snapshot: CatalogSnapshot) -> str:
    count = len(snapshot.routes)
    return f"catalog version {snapshot.version}: {count} route{'s' * (count != 1)}"


def cmd_migrate(session: Session) -> int:
    """Upgrade the database to the newest catalog schema."""
    from distribution.migrator import migrate

    url = session.url()
    migrate(url)
    session.print(f"the catalog schema is up to date on {redact(url)}")
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


def cmd_routes(session: Session) -> int:
    """Show the catalog's routes, now or at a past version."""
    snapshot = _snapshot(session, session.args.at)
    if session.args.json:
        write_json(snapshot_to_json(snapshot), session.out)
        return EXIT_OK
    if not snapshot.routes:
        hint = " (seed it with 'distribution init')" if snapshot.version == 0 else ""
        session.print(f"catalog version {snapshot.version}: no routes{hint}")
        return EXIT_OK
    session.print(_routes_header(snapshot), routes_table(snapshot.routes))
    return EXIT_OK


def _parse_keys(session: Session, texts: Iterable[str]) -> list[bytes]:
    args = session.args
    return [parse_key(text, hex_key=args.hex, text_key=args.text) for text in texts]


def cmd_lookup(session: Session) -> int:
    """Show which route holds each key, with an Engine built from the catalog."""
    from distribution.engine import Engine

    keys = _parse_keys(session, session.args.keys)
    snapshot = _snapshot(session, session.args.at)
    engine = Engine()
    engine.apply_snapshot(snapshot)
    found = [(key, engine.get_route(key)) for key in keys]
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
    entries = session.store().history(since=session.args.since, limit=session.args.limit)
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


# -- writing -----------------------------------------------------------------------------------


def _write(
    session: Session, what: str, operation: Callable[[int, str], CatalogWriteResult]
) -> int:
    """Run one compare-and-set write at ``--expect-version``, or at the version read just before."""
    store = session.store()
    expected = session.args.expect_version
    if expected is None:
        expected = store.version()
    result = operation(expected, session.actor())
    if session.args.json:
        write_json(write_result_to_json(result), session.out)
    else:
        lines = write_result_lines(result)
        session.print(f"{what}: {lines[0]}", *lines[1:])
    return EXIT_OK


def cmd_split(session: Session) -> int:
    """Split a route in two at a key."""
    args = session.args
    (key,) = _parse_keys(session, [args.key])
    return _write(
        session,
        f"split route {args.route_id} at {format_key(key)}",
        lambda expected, actor: session.store().split_route(args.route_id, key, expected, actor=actor),
    )


def cmd_merge(session: Session) -> int:
    """Merge two adjacent ACTIVE routes of one group."""
    args = session.args
    return _write(
        session,
        f"merged routes {args.left} and {args.right}",
        lambda expected, actor: session.store().merge_routes(
            args.left, args.right, expected, actor=actor
        ),
    )


def cmd_set_state(session: Session) -> int:
    """Change a route's state."""
    args = session.args
    return _write(
        session,
        f"route {args.route_id} is now {state_name(args.state)}",
        lambda expected, actor: session.store().set_route_state(
            args.route_id, args.state, expected, actor=actor
        ),
    )


def cmd_move(session: Session) -> int:
    """Move a WRITE_FENCED route to another group."""
    args = session.args
    return _write(
        session,
        f"moved route {args.route_id} to group {args.group_id}",
        lambda expected, actor: session.store().move_route(
            args.route_id, args.group_id, expected, actor=actor
        ),
    )


# -- watching ----------------------------------------------------------------------------------


def cmd_watch(session: Session) -> int:
    """Print each catalog change as it lands, until Ctrl-C, ``--count`` or ``--timeout``."""
    args = session.args
    store = session.store()
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    seen = 0
    try:
        # Listen first, then read the version: no write can slip between the two unseen.
        with store.listen() as listener:
            last = store.version() if args.since is None else args.since
            session.note(f"watching the catalog after version {last} (Ctrl-C to stop)")
            while True:
                answer = store.changes_since(last)
                if answer.reset is not None:
                    snapshot = answer.reset
                    if args.json:
                        write_json(
                            {"reset": True, **snapshot_to_json(snapshot)}, session.out, compact=True
                        )
                    else:
                        session.print(
                            f"version {snapshot.version}: reset (the history no longer reaches "
                            f"version {last}); {len(snapshot.routes)} routes",
                            *("  " + line for line in routes_table(snapshot.routes).splitlines()),
                        )
                    session.out.flush()
                    last = snapshot.version
                    seen += 1
                for change in answer.changes:
                    if args.json:
                        write_json(change_to_json(change), session.out, compact=True)
                    else:
                        session.print(*change_lines(change))
                    session.out.flush()
                    last = change.version
                    seen += 1
                    if args.count is not None and seen >= args.count:
                        return EXIT_OK
                if answer.reset is not None and args.count is not None and seen >= args.count:
                    return EXIT_OK
                if len(answer.changes) >= DEFAULT_CHANGES_LIMIT:
                    continue  # there are more right away
                wait = _WATCH_POLL_SECONDS
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        break
                listener.wait(wait)
    except KeyboardInterrupt:
        return EXIT_OK
    if args.count is not None:
        raise CommandError(
            f"timed out after {args.timeout:g} s having seen {seen} of {args.count} changes"
        )
    return EXIT_OK


# -- export and import -------------------------------------------------------------------------


def _progress(items: Iterable[Any], total: int, session: Session, what: str) -> Iterable[Any]:
    """Wrap ``items`` in a tqdm progress bar on stderr for large catalogs on a terminal."""
    if total < PROGRESS_THRESHOLD or session.args.quiet or not session.err.isatty():
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=what, unit=" routes", file=session.err, leave=False)  # type: ignore[no-any-return]


@contextmanager
def _open_output(path: str) -> Iterator[TextIO]:
    if path == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    with open(path, "w", encoding="utf-8") as handle:
        yield handle


@contextmanager
def _open_input(path: str) -> Iterator[IO[str]]:
    if path == "-":
        yield sys.stdin
        return
    with open(path, encoding="utf-8") as handle:
        yield handle


def _kv_line(key: bytes, value: bytes) -> str:
    return json.dumps({"key": key.hex(), "value": value.hex()}) + "\n"


def cmd_export(session: Session) -> int:
    """Write the catalog (or its state at ``--at``) as JSON or as the seed's key-value records."""
    args = session.args
    store = session.store()
    snapshot = _snapshot(session, args.at)
    next_route_id = store.next_route_id_at(snapshot.version)
    routes = snapshot.routes
    with _open_output(args.file) as out:
        if args.format == "json":
            out.write("{\n")
            out.write(f'  "format": "distribution-catalog",\n  "version": {snapshot.version},\n')
            out.write(f'  "next_route_id": {next_route_id},\n  "routes": [')
            separator = "\n    "
            for route in _progress(routes, len(routes), session, "export"):
                out.write(separator + json.dumps(route_to_json(route)))
                separator = ",\n    "
            out.write("\n  ]\n}\n" if routes else "]\n}\n")
        else:
            out.write(_kv_line(catalog_version_key(), encode_catalog_version(snapshot.version)))
            out.write(
                _kv_line(catalog_next_route_id_key(), encode_catalog_next_route_id(next_route_id))
            )
            by_id = sorted(routes, key=lambda r: r.route_id)  # the route keys' byte order
            for route in _progress(by_id, len(by_id), session, "export"):
                out.write(_kv_line(catalog_route_key(route.route_id), encode_route_descriptor(route)))
    if args.file != "-" and not args.quiet:
        session.note(
            f"exported {len(routes)} routes of catalog version {snapshot.version} to {args.file}"
        )
    return EXIT_OK


def _read_json_routes(session: Session, handle: IO[str], name: str) -> list[RouteDescriptor]:
    try:
        document = json.load(handle)
    except json.JSONDecodeError as exc:
        raise CommandError(f"{name}: not valid JSON: {exc}") from None
    if isinstance(document, dict) and "routes" in document:
        document = document["routes"]
    if not isinstance(document, list):
        raise CommandError(f"{name}: expected a JSON object with \"routes\" (as export writes)")
    return [
        route_from_json(item, f"{name}: route #{index}")
        for index, item in enumerate(_progress(document, len(document), session, "import"), 1)
    ]


def _read_kv_routes(session: Session, handle: IO[str], name: str) -> list[RouteDescriptor]:
    lines = handle.readlines()
    routes = []
    for number, line in enumerate(_progress(lines, len(lines), session, "import"), 1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            record = json.loads(line)
            key, value = bytes.fromhex(record["key"]), bytes.fromhex(record["value"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise CommandError(
                f'{where}: expected {{"key": hex, "value": hex}}: {type(exc).__name__}: {exc}'
            ) from None
        try:
            if key == catalog_version_key():
                decode_catalog_version(value)
            elif key == catalog_next_route_id_key():
                decode_catalog_next_route_id(value)
            else:
                routes.append(decode_catalog_route_entry(key, value))
        except (DistributionError, ValueError) as exc:
            # Keep the library's error type (for the exit code) and say where it happened.
            raise type(exc)(f"{where}: {exc}") from exc
    return routes


def cmd_import(session: Session) -> int:
    """Replace the catalog's routes by those of a file, in one compare-and-set ``save``."""
    args = session.args
    name = "<stdin>" if args.file == "-" else args.file
    with _open_input(args.file) as handle:
        if args.format == "json":
            routes = _read_json_routes(session, handle, name)
        else:
            routes = _read_kv_routes(session, handle, name)
    store = session.store()
    expected = args.expect_version if args.expect_version is not None else store.version()
    snapshot = store.save(expected, routes, actor=session.actor())
    if args.json:
        write_json(snapshot_to_json(snapshot), session.out)
    else:
        session.print(
            f"imported {len(snapshot.routes)} routes from {name}: "
            f"catalog version {snapshot.version}"
        )
    return EXIT_OK


# -- the embedded server -----------------------------------------------------------------------


def _server_lines(session: Session, url: str) -> list[str]:
    """Describe the server at ``url``: its version, and the catalog's (if migrated)."""
    from distribution.migrator import VERSION_TABLE, head_revision

    with session.open_store(url) as store, store.sa_engine.connect() as connection:
        server = connection.exec_driver_sql("SHOW server_version").scalar()
        revision = None
        if connection.exec_driver_sql(f"SELECT to_regclass('{VERSION_TABLE}')").scalar():
            revision = connection.exec_driver_sql(
                f"SELECT version_num FROM {VERSION_TABLE}"
            ).scalar()
        lines = [f"server: PostgreSQL {server}"]
        if revision is None:
            return [*lines, "catalog: not migrated (run 'distribution migrate')"]
        lines.append(f"catalog version: {store.version()}")
        needed = head_revision()
        if revision != needed:
            lines.append(
                f"catalog schema: revision {revision}, this library needs {needed} "
                "(run 'distribution migrate')"
            )
    return lines


def cmd_db(session: Session) -> int:
    """``db status``, ``db start`` and ``db stop``."""
    action = session.args.db_command
    external = session.external_url
    if external is not None:
        if action != "status":
            raise UsageError(
                f"db {action} manages the embedded server only, but {session.url_source} "
                "names a database"
            )
        session.print(f"database: {redact(external)} (from {session.url_source})")
        session.print(*_server_lines(session, session.url()))
        return EXIT_OK
    embedded = EmbeddedDatabase()
    if action == "stop":
        if embedded.stop():
            session.print(f"stopped the embedded PostgreSQL server in {embedded.pgdata}")
        else:
            session.print(f"the embedded PostgreSQL server in {embedded.pgdata} is not running")
        return EXIT_OK
    if action == "start":
        session.url()
    status = embedded.status()
    if not status.running:
        session.print(
            "embedded PostgreSQL server: not running",
            f"folder: {status.pgdata}"
            + ("" if status.initialised else " (not created yet: the next command creates it)"),
        )
        return EXIT_OK
    session.print(
        f"embedded PostgreSQL server: running (pid {status.pid})",
        f"folder: {status.pgdata}",
        f"url: {status.url}",
    )
    if status.url is not None:
        session.print(*_server_lines(session, status.url))
    return EXIT_OK


def cmd_demo(session: Session) -> int:
    """Run the guided tour (see :mod:`distribution.cli.demo`)."""
    from distribution.cli.demo import run_demo

    url = session.url()
    source = "the embedded server" if session.external_url is None else redact(url)
    return run_demo(session, url, source)


#: The function of every subcommand.
COMMANDS: dict[str, Callable[[Session], int]] = {
    "migrate": cmd_migrate,
    "init": cmd_init,
    "routes": cmd_routes,
    "lookup": cmd_lookup,
    "split": cmd_split,
    "merge": cmd_merge,
    "set-state": cmd_set_state,
    "move": cmd_move,
    "history": cmd_history,
    "watch": cmd_watch,
    "export": cmd_export,
    "import": cmd_import,
    "db": cmd_db,
    "demo": cmd_demo,
}

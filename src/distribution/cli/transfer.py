"""``distribution export`` and ``import``: the catalog as JSON, or as the seed's key-value records.

An import is planned first (:func:`plan_import`: routes added, changed and retired, by id) and
written as one ``save``; ``--dry-run`` prints the plan only, and retiring routes needs
``--replace``. Each route is checked as it is read (a bound longer than
:data:`~distribution.MAX_ROUTE_KEY_BYTES`, say), naming where it is in the file, before the
catalog is read or written.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any, NamedTuple, TextIO

from distribution.cli.errors import EXIT_OK, CommandError
from distribution.cli.output import (
    describe_route,
    route_from_json,
    route_to_json,
    snapshot_to_json,
    write_json,
)
from distribution.cli.session import Session
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
from distribution.errors import (
    CatalogVersionMismatchError,
    DistributionError,
)
from distribution.types import (
    CatalogSnapshot,
    RouteDescriptor,
    check_route_bounds,
    validate_route_descriptor,
)

__all__ = ["PROGRESS_THRESHOLD", "ImportPlan", "cmd_export", "cmd_import", "plan_import"]

#: Catalogs with at least this many routes get a progress bar on export and import.
PROGRESS_THRESHOLD = 10_000


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
    snapshot = session.snapshot(args.at)
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


class _Source(NamedTuple):
    """What an import file holds: its routes, and its id counter when it says."""

    routes: list[RouteDescriptor]
    next_route_id: int | None


def _read_json_routes(session: Session, handle: IO[str], name: str) -> _Source:
    text = handle.read()
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = ""
        first = text.lstrip().partition("\n")[0]
        if first.startswith('{"key"'):
            hint = " (it looks like key-value records: pass --format kv)"
        raise CommandError(f"{name}: not valid JSON: {exc}{hint}") from None
    next_route_id = None
    if isinstance(document, dict) and "routes" in document:
        next_route_id = document.get("next_route_id")
        if next_route_id is not None and (
            not isinstance(next_route_id, int) or isinstance(next_route_id, bool)
        ):
            raise CommandError(f"{name}: \"next_route_id\" is not an integer: {next_route_id!r}")
        document = document["routes"]
    if not isinstance(document, list):
        raise CommandError(f"{name}: expected a JSON object with \"routes\" (as export writes)")
    routes = []
    for index, item in enumerate(_progress(document, len(document), session, "read"), 1):
        where = f"{name}: route #{index}"
        route = route_from_json(item, where)
        # Checked as read, as the key-value records are: a dry run refuses what a save would.
        with _located(where):
            routes.append(validate_route_descriptor(route))
            check_route_bounds((route,))
    return _Source(routes, next_route_id)


@contextmanager
def _located(where: str) -> Iterator[None]:
    """Re-raise a data error of the block saying ``where`` it happened, keeping the library's
    error type (for the exit code)."""
    try:
        yield
    except (DistributionError, ValueError) as exc:
        raise type(exc)(f"{where}: {exc}") from exc


def _read_kv_routes(session: Session, handle: IO[str], name: str) -> _Source:
    lines = handle.readlines()
    routes = []
    next_route_id = None
    for number, line in enumerate(_progress(lines, len(lines), session, "read"), 1):
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
        with _located(where):
            if key == catalog_version_key():
                decode_catalog_version(value)
            elif key == catalog_next_route_id_key():
                next_route_id = decode_catalog_next_route_id(value)
            else:
                routes.append(decode_catalog_route_entry(key, value))
                check_route_bounds(routes[-1:])
    return _Source(routes, next_route_id)


class ImportPlan(NamedTuple):
    """What an import changes in the catalog, computed before anything is written."""

    #: The routes the catalog will hold.
    routes: list[RouteDescriptor]
    added: list[RouteDescriptor]
    changed: list[RouteDescriptor]
    retired: list[RouteDescriptor]
    unchanged: int
    #: Source ids the target catalog had already issued (and retired), and the new ids they get.
    renumbered: dict[int, int]
    #: The id counter after the import: the larger of the source's and the target's.
    next_route_id: int
    #: True when the import would raise the target's id counter.
    raises_counter: bool

    @property
    def empty(self) -> bool:
        """True when the import would change nothing at all."""
        return not (self.added or self.changed or self.retired or self.raises_counter)


def plan_import(
    target: CatalogSnapshot, target_next_route_id: int, source: _Source
) -> ImportPlan:
    """Compare a source's routes with the target catalog, by route id.

    A route whose id is live in the target replaces it (changed, or unchanged); a route whose id
    the target never issued is added as it is; a route whose id the target issued and retired
    since gets a fresh id, so a retired id never comes back. The id counter becomes the larger
    of the source's and the target's (and of every id kept).
    """
    live = {route.route_id: route for route in target.routes}
    floor = max(
        target_next_route_id,
        source.next_route_id or 0,
        *(route.route_id + 1 for route in source.routes),
    )
    fresh = floor
    renumbered: dict[int, int] = {}
    for given in source.routes:
        if given.route_id not in live and given.route_id < target_next_route_id:
            renumbered[given.route_id] = fresh
            fresh += 1
    routes, added, changed = [], [], []
    unchanged = 0
    for given in source.routes:
        # A renumbered route's children name its new id as their parent.
        route = given._replace(
            route_id=renumbered.get(given.route_id, given.route_id),
            parent_route_id=renumbered.get(given.parent_route_id, given.parent_route_id),
        )
        current = live.get(route.route_id)
        if current is None:
            added.append(route)
        elif current != route:
            changed.append(route)
        else:
            unchanged += 1
        routes.append(route)
    kept = {route.route_id for route in routes}
    retired = [route for route in target.routes if route.route_id not in kept]
    return ImportPlan(
        routes, added, changed, retired, unchanged, renumbered, fresh, fresh > target_next_route_id
    )


def _plan_lines(plan: ImportPlan) -> list[str]:
    lines = [
        f"{len(plan.added)} added, {len(plan.changed)} changed, {len(plan.retired)} retired, "
        f"{plan.unchanged} unchanged; next route id {plan.next_route_id}"
    ]
    lines += [f"  + {describe_route(route)} group {route.group_id}" for route in plan.added[:20]]
    lines += [f"  ~ {describe_route(route)} group {route.group_id}" for route in plan.changed[:20]]
    lines += [f"  - {describe_route(route)}" for route in plan.retired[:20]]
    if plan.renumbered:
        shown = ", ".join(f"{old}->{new}" for old, new in list(plan.renumbered.items())[:20])
        lines.append(f"  ids this catalog had retired get new ones: {shown}")
    if max(len(plan.added), len(plan.changed), len(plan.retired), len(plan.renumbered)) > 20:
        lines.append("  (lists cut at 20 routes each)")
    return lines


def cmd_import(session: Session) -> int:
    """Make the catalog's routes those of a file, in one compare-and-set ``save``.

    Shows the plan (routes added, changed, retired) first; retiring routes needs ``--replace``;
    ``--dry-run`` stops after the plan; an import that changes nothing writes nothing.
    """
    args = session.args
    name = "<stdin>" if args.file == "-" else args.file
    with _open_input(args.file) as handle:
        if args.format == "json":
            source = _read_json_routes(session, handle, name)
        else:
            source = _read_kv_routes(session, handle, name)
    store = session.store()
    target = store.snapshot()
    if args.expect_version is not None and args.expect_version != target.version:
        raise CatalogVersionMismatchError(
            f"the catalog is at version {target.version}, not {args.expect_version}"
        )
    plan = plan_import(target, store.next_route_id(), source)
    lines = _plan_lines(plan)
    if not args.json:
        session.print(f"import of {name} into catalog version {target.version}: {lines[0]}", *lines[1:])
    if plan.empty or args.dry_run:
        if args.json:
            write_json(snapshot_to_json(target), session.out)
        elif plan.empty:
            session.print("nothing to import: the catalog already holds these routes")
        else:
            session.print("dry run: nothing written")
        return EXIT_OK
    if plan.retired and not args.replace:
        raise CommandError(
            f"the import would retire {len(plan.retired)} of the catalog's routes: pass --replace "
            "to retire them (or --dry-run to see the plan); nothing was written"
        )
    if len(plan.routes) >= PROGRESS_THRESHOLD and not args.quiet:
        session.note(f"import: writing {len(plan.routes):,} routes in one transaction…")
    snapshot = store.save(
        target.version, plan.routes, actor=session.actor(), next_route_id=plan.next_route_id
    )
    if args.json:
        write_json(snapshot_to_json(snapshot), session.out)
    else:
        session.print(
            f"imported {len(snapshot.routes)} routes from {name}: "
            f"catalog version {snapshot.version}"
        )
    return EXIT_OK

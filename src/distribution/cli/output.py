"""Rendering for the CLI: aligned tables for people, JSON for programs.

Tables show keys as described in :mod:`distribution.cli.keys`; JSON carries keys as lowercase hex
(``null`` for an unbounded end), states by name (``"write_fenced"``) and ids as integers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

from distribution.cli.errors import CommandError
from distribution.cli.keys import format_end, format_key, format_range
from distribution.types import (
    CatalogChange,
    CatalogHistoryEntry,
    CatalogSnapshot,
    CatalogWriteResult,
    Route,
    RouteDescriptor,
    RouteState,
)

__all__ = [
    "ROUTE_HEADERS",
    "STATE_TRANSITIONS",
    "change_lines",
    "change_to_json",
    "describe_route",
    "history_arguments",
    "history_to_json",
    "parse_state",
    "render_table",
    "route_from_json",
    "route_row",
    "route_to_json",
    "routes_table",
    "snapshot_to_json",
    "state_name",
    "write_json",
    "write_result_lines",
    "write_result_to_json",
]

#: The columns of a route table.
ROUTE_HEADERS = ("ID", "START", "END", "GROUP", "STATE", "PARENT")
_ROUTE_ALIGN = "><<><>"

_STATE_NAMES = {state: state.name.lower() for state in RouteState}

#: The state changes the catalog allows (its database refuses the others): a route is fenced
#: before it migrates or moves, and goes back to active or fenced from a migration.
STATE_TRANSITIONS: dict[RouteState, tuple[RouteState, ...]] = {
    RouteState.ACTIVE: (RouteState.WRITE_FENCED,),
    RouteState.WRITE_FENCED: (
        RouteState.ACTIVE,
        RouteState.MIGRATING_SOURCE,
        RouteState.MIGRATING_TARGET,
    ),
    RouteState.MIGRATING_SOURCE: (RouteState.ACTIVE, RouteState.WRITE_FENCED),
    RouteState.MIGRATING_TARGET: (RouteState.ACTIVE, RouteState.WRITE_FENCED),
}
_STATES_BY_NAME = {name: state for state, name in _STATE_NAMES.items()}


def describe_route(route: RouteDescriptor) -> str:
    """A route as operators read it in messages: its id and range.

    >>> describe_route(RouteDescriptor(route_id=3, start=b"a", end=None, group_id=1))
    'route 3 ["a", +∞)'
    """
    return f"route {route.route_id} {format_range(route.start, route.end)}"


def state_name(state: int) -> str:
    """Return a state's lowercase name (``write_fenced``), or its number when it has none.

    >>> state_name(RouteState.WRITE_FENCED), state_name(7)
    ('write_fenced', '7')
    """
    try:
        return _STATE_NAMES[RouteState(state)]
    except ValueError:
        return str(int(state))


def parse_state(text: str) -> RouteState:
    """Parse a state name (any case, ``-`` or ``_``) or number 0-3; ValueError otherwise.

    >>> parse_state("Write-Fenced"), parse_state("3")
    (<RouteState.WRITE_FENCED: 1>, <RouteState.MIGRATING_TARGET: 3>)
    """
    name = text.strip().lower().replace("-", "_")
    if name.isdigit() and int(name) in RouteState._value2member_map_:
        return RouteState(int(name))
    state = _STATES_BY_NAME.get(name)
    if state is None:
        choices = ", ".join(_STATES_BY_NAME)
        raise ValueError(f"unknown route state {text!r} (choose from {choices}, or 0-3)")
    return state


def render_table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None
) -> str:
    """Return rows as a text table under ``headers``; ``align`` has one ``<`` or ``>`` a column.

    >>> print(render_table(["ID", "NAME"], [[1, "a"], [22, "bb"]], "><"))
    ID  NAME
     1  a
    22  bb
    """
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    align = align or "<" * len(headers)
    lines = []
    for row in [list(headers), *cells]:
        padded = [
            cell.rjust(width) if how == ">" else cell.ljust(width)
            for cell, width, how in zip(row, widths, align, strict=True)
        ]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def route_row(route: RouteDescriptor | Route) -> list[str]:
    """Return the cells of one route in a route table (``-`` for no parent)."""
    parent = route.parent_route_id if isinstance(route, RouteDescriptor) else 0
    return [
        str(route.route_id),
        format_key(route.start),
        format_end(route.end),
        str(route.group_id),
        state_name(route.state),
        str(parent) if parent else "-",
    ]


def routes_table(routes: Iterable[RouteDescriptor]) -> str:
    """Return routes as a table: id, start, end, group, state, parent."""
    return render_table(ROUTE_HEADERS, map(route_row, routes), _ROUTE_ALIGN)


def route_to_json(route: RouteDescriptor | Route) -> dict[str, Any]:
    """Return a route as a JSON object; keys in hex, the end ``null`` when unbounded.

    >>> route_to_json(RouteDescriptor(route_id=1, start=b"a", end=None, group_id=2))
    {'route_id': 1, 'start': '61', 'end': None, 'group_id': 2, 'state': 'active', 'parent_route_id': 0}
    """
    parent = route.parent_route_id if isinstance(route, RouteDescriptor) else 0
    return {
        "route_id": route.route_id,
        "start": route.start.hex(),
        "end": None if route.end is None else route.end.hex(),
        "group_id": route.group_id,
        "state": state_name(route.state),
        "parent_route_id": parent,
    }


def _field(obj: Mapping[str, Any], name: str, kinds: tuple[type, ...], where: str) -> Any:
    if name not in obj:
        raise CommandError(f"{where}: missing field {name!r}")
    value = obj[name]
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise CommandError(f"{where}: field {name!r} has the wrong type: {value!r}")
    return value


def _hex_field(value: str, name: str, where: str) -> bytes:
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise CommandError(f"{where}: field {name!r} is not hex: {value!r}") from None


def route_from_json(obj: object, where: str = "route") -> RouteDescriptor:
    """Read a route written by :func:`route_to_json` (the state may also be a number).

    Raises :class:`CommandError` for a malformed object; the values themselves are validated
    where they are used (by ``CatalogStore.save``).

    >>> route_from_json({"route_id": 3, "start": "", "end": "ff", "group_id": 1, "state": 1})
    RouteDescriptor(route_id=3, start=b'', end=b'\\xff', group_id=1, state=<RouteState.WRITE_FENCED: 1>, parent_route_id=0)
    """
    if not isinstance(obj, Mapping):
        raise CommandError(f"{where}: expected a JSON object, got {obj!r}")
    route_id = _field(obj, "route_id", (int,), where)
    start = _hex_field(_field(obj, "start", (str,), where), "start", where)
    raw_end = obj.get("end")
    end = None if raw_end is None else _hex_field(_field(obj, "end", (str,), where), "end", where)
    group_id = _field(obj, "group_id", (int,), where)
    raw_state = _field(obj, "state", (str, int), where) if "state" in obj else 0
    try:
        state = parse_state(str(raw_state))
    except ValueError as exc:
        raise CommandError(f"{where}: {exc}") from None
    parent = _field(obj, "parent_route_id", (int,), where) if "parent_route_id" in obj else 0
    return RouteDescriptor(
        route_id=route_id,
        start=start,
        end=end,
        group_id=group_id,
        state=state,
        parent_route_id=parent,
    )


def snapshot_to_json(snapshot: CatalogSnapshot) -> dict[str, Any]:
    """Return a snapshot as a JSON object: ``version``, ``read_ts`` and ``routes``."""
    return {
        "version": snapshot.version,
        "read_ts": snapshot.read_ts,
        "routes": [route_to_json(r) for r in snapshot.routes],
    }


def write_result_to_json(result: CatalogWriteResult) -> dict[str, Any]:
    """Return what a write did as a JSON object: ``version``, ``created``, ``retired``."""
    return {
        "version": result.version,
        "created": [route_to_json(r) for r in result.created],
        "retired": list(result.retired),
    }


def write_result_lines(result: CatalogWriteResult) -> list[str]:
    """Return what a write did, for a human: the new version, then each route it touched.

    Routes are ``created`` by a split or a merge (which retire others) and ``updated`` by a state
    change or a move (which keep the route's id).
    """
    lines = [f"catalog version {result.version}"]
    label = "created" if result.retired else "updated"
    rows: list[list[str]] = [[label, *route_row(r)] for r in result.created]
    rows += [["retired", str(route_id), "", "", "", "", ""] for route_id in result.retired]
    if rows:
        lines.append(render_table(("", *ROUTE_HEADERS), rows, "<" + _ROUTE_ALIGN))
    return lines


def change_to_json(change: CatalogChange) -> dict[str, Any]:
    """Return one catalog change as a JSON object."""
    return {
        "version": change.version,
        "previous_version": change.previous_version,
        "upserts": [route_to_json(r) for r in change.upserts],
        "deletes": list(change.deletes),
    }


def change_lines(change: CatalogChange, operation: str, actor: str | None) -> list[str]:
    """Return one catalog change for a human: a header, then ``+`` upserts and ``-`` deletes."""
    lines = [
        f"version {change.version}: {operation} by {actor or '(no actor)'}: "
        f"{len(change.upserts)} upserted, {len(change.deletes)} deleted"
    ]
    rows: list[list[str]] = [["+", *route_row(r)] for r in change.upserts]
    rows += [["-", str(route_id), "", "", "", "", ""] for route_id in change.deletes]
    if rows:
        table = render_table(("", *ROUTE_HEADERS), rows, "<" + _ROUTE_ALIGN)
        lines += ["  " + line for line in table.splitlines()]
    return lines


# The order in which history arguments are shown (the database keeps them in no useful order).
_ARGUMENT_ORDER = {
    name: i
    for i, name in enumerate(
        ("route_id", "left_route_id", "right_route_id", "split_key", "from", "to", "from_group",
         "to_group", "routes", "opened", "retired")
    )
}


def history_arguments(entry: CatalogHistoryEntry) -> str:
    """Return a history entry's arguments as ``name=value`` pairs, keys and states readable.

    >>> import datetime
    >>> when = datetime.datetime(2024, 1, 1)
    >>> history_arguments(CatalogHistoryEntry(3, "split_route", {"route_id": 1, "split_key": "6d"}, None, when))
    'route_id=1 split_key="m"'
    >>> history_arguments(CatalogHistoryEntry(4, "set_route_state", {"to": 1, "from": 0, "route_id": 2}, None, when))
    'route_id=2 from=active to=write_fenced'
    """
    parts = []
    names = sorted(entry.arguments, key=lambda n: (_ARGUMENT_ORDER.get(n, len(_ARGUMENT_ORDER)), n))
    for name in names:
        value = entry.arguments[name]
        shown = value
        if name == "split_key" and isinstance(value, str):
            try:
                shown = format_key(bytes.fromhex(value))
            except ValueError:
                shown = value
        elif entry.operation == "set_route_state" and name in ("from", "to"):
            shown = state_name(value) if isinstance(value, int) else value
        parts.append(f"{name}={shown}")
    return " ".join(parts)


def history_to_json(entry: CatalogHistoryEntry) -> dict[str, Any]:
    """Return a history entry as a JSON object (states by name, the time in ISO 8601).

    >>> import datetime
    >>> when = datetime.datetime(2024, 1, 1)
    >>> history_to_json(CatalogHistoryEntry(4, "set_route_state", {"from": 0, "to": 1}, "ann", when))["arguments"]
    {'from': 'active', 'to': 'write_fenced'}
    """
    arguments = dict(entry.arguments)
    if entry.operation == "set_route_state":
        for name in ("from", "to"):
            if isinstance(arguments.get(name), int):
                arguments[name] = state_name(arguments[name])
    return {
        "version": entry.version,
        "operation": entry.operation,
        "arguments": arguments,
        "actor": entry.actor,
        "committed_at": entry.committed_at.isoformat(),
    }


def write_json(value: object, out: TextIO, *, compact: bool = False) -> None:
    """Write ``value`` as JSON and a newline: indented, or on one line with ``compact``."""
    if compact:
        out.write(json.dumps(value, separators=(",", ":")) + "\n")
    else:
        out.write(json.dumps(value, indent=2) + "\n")

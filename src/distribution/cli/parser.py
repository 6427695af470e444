"""The argument parser of the ``distribution`` command, and the types of its values."""

from __future__ import annotations

import argparse
import getpass
from collections.abc import Sequence
from typing import Any, NoReturn

from distribution.cli.errors import UsageError
from distribution.cli.output import parse_state
from distribution.cli.relay import add_nats_arguments, add_relay_arguments
from distribution.types import UINT64_MAX, RouteState

__all__ = ["EPILOG", "MAX_INIT_GROUPS", "build_parser", "default_actor", "positive_int", "u64"]

#: The most routes ``init --groups`` can pre-split (one per one-byte boundary).
MAX_INIT_GROUPS = 256

EPILOG = """\
database:
  --database-url or $DISTRIBUTION_DATABASE_URL names the catalog's PostgreSQL database. Without
  either, an embedded PostgreSQL server is started on demand in a per-user data folder
  ($DISTRIBUTION_DATA_DIR/pgdata when set), migrated on first use, and left running for the next
  commands (see 'distribution db --help').

keys:
  Key arguments are UTF-8 text, or hex when they start with 0x (0x alone is the empty key) or when
  --hex is given; --text forces text. Output shows keys in double quotes, printable ASCII as is,
  \\\\ and \\" escaped, other bytes as \\xNN; "" is the empty key and +∞ an unbounded end.
  JSON output and exports carry keys as hex.

exit codes:
  0 ok, 1 error, 2 usage (bad command, option or argument), 3 version conflict,
  4 not found (no such route; for lookup, no route holds a key), 5 behind (fleet, --wait: some
  watcher does not hold the catalog's version), 130 interrupted.
"""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``distribution: error: …`` (exit code 2)."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras and " " in self.prog:
            # A subcommand's stray argument is that subcommand's error, and its help says why.
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras

    def error(self, message: str) -> NoReturn:
        command = self.prog.partition(" ")[2]
        where = f"{command}: " if command else ""
        raise UsageError(f"{where}{message} (see '{self.prog} --help')")


def u64(text: str) -> int:
    """An argparse type: an unsigned 64-bit integer (decimal, or hex with ``0x``)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value <= UINT64_MAX:
        raise argparse.ArgumentTypeError(f"out of range 0..2**64-1: {text!r}")
    return value


def _nonzero_u64(text: str) -> int:
    value = u64(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must not be 0")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer from 1 to 2**63-1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= 2**63 - 1:
        raise argparse.ArgumentTypeError(f"out of range 1..2**63-1: {text!r}")
    return value


def _database_url(text: str) -> str:
    # An empty value is a mistake (an unset shell variable), not a request for the embedded server.
    if not text.strip():
        raise argparse.ArgumentTypeError("empty database URL")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"out of range 1..65535: {text!r}")
    return value


def _state(text: str) -> RouteState:
    try:
        return parse_state(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _groups(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= MAX_INIT_GROUPS:
        raise argparse.ArgumentTypeError(f"out of range 1..{MAX_INIT_GROUPS}: {text!r}")
    return value


def default_actor() -> str:
    """The OS user name, for the audit trail (``unknown`` when it cannot be found)."""
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def _key_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--hex", action="store_true", help="read keys as hex (0x optional)")
    group.add_argument(
        "--text", action="store_true", help="read keys as UTF-8 text, even when they start with 0x"
    )


_DATABASE_URL_OPTION: dict[str, Any] = {
    "metavar": "URL",
    "type": _database_url,
    "help": "the catalog database (default: $DISTRIBUTION_DATABASE_URL, else the embedded server)",
}


def build_parser() -> argparse.ArgumentParser:
    """Build the parser of every subcommand."""
    # Options every subcommand accepts too, so that they can come after the command's name.
    # SUPPRESS keeps a subcommand from overwriting a value given before the command's name.
    common = _Parser(add_help=False)
    common.add_argument("--database-url", default=argparse.SUPPRESS, **_DATABASE_URL_OPTION)

    writes = _Parser(add_help=False)
    writes.add_argument(
        "--expect-version",
        metavar="V",
        type=u64,
        help="write only if the catalog is at version V (default: the version read just before; "
        "a conflict is reported with exit code 3, never retried)",
    )
    writes.add_argument(
        "--actor",
        metavar="NAME",
        default=None,
        help="who asks, for the audit trail (default: the OS user name)",
    )
    writes.add_argument("--json", action="store_true", help="print what the write did as JSON")

    # The one-route writes: an operator waits for the fleet before the next step of a cutover.
    waits = _Parser(add_help=False)
    waits.add_argument(
        "--wait",
        action="store_true",
        help="then wait until every watcher connected to the catalog holds its version "
        "(exit code 5 if some do not within --timeout)",
    )
    waits.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_seconds,
        help="how long --wait waits (default: 10)",
    )
    # With --nats, --wait waits for the watchers following NATS instead.
    add_nats_arguments(
        waits, required=False, verb="wait for the watchers following, with --wait --nats"
    )

    parser = _Parser(
        prog="distribution",
        description="Inspect and operate the route catalog of a range-sharded key-value store.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--database-url", default=None, **_DATABASE_URL_OPTION)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def add(
        name: str, summary: str, description: str | None = None, *parents: _Parser
    ) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=summary,
            description=description or summary,
            parents=[common, *parents],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    add("migrate", "upgrade the database to the newest catalog schema")

    init = add(
        "init",
        "seed an empty catalog",
        "Seed an empty catalog (version 0): one route [\"\", +∞) on group 1, or with --groups N,\n"
        "N routes evenly pre-split over the first key byte: route i (i = 1..N, on group i) starts\n"
        "at the one-byte key bytes([256*(i-1)//N]) (the first at \"\") and ends where the next\n"
        "starts (the last is unbounded). --groups 4 splits at 0x40, 0x80 and 0xc0.\n"
        "A catalog that is not empty is refused (exit code 3).",
    )
    init.add_argument(
        "--groups", metavar="N", type=_groups, default=1, help="pre-split into N routes (1-256)"
    )
    init.add_argument("--actor", metavar="NAME", default=None, help="who asks, for the audit trail")
    init.add_argument("--json", action="store_true", help="print the new catalog as JSON")

    routes = add(
        "routes",
        "show the catalog's routes",
        "Show the catalog's routes, now or at --at VERSION; the filters narrow them down (all\n"
        "given filters apply): one route by id, a group, a state, the routes that hold keys in\n"
        "[--from KEY, --to KEY).",
    )
    routes.add_argument(
        "route_id", metavar="ROUTE_ID", nargs="?", type=_nonzero_u64, help="only this route"
    )
    routes.add_argument("--group", metavar="G", type=_nonzero_u64, help="only routes on group G")
    routes.add_argument("--state", metavar="STATE", type=_state, help="only routes in STATE")
    routes.add_argument(
        "--from", dest="from_key", metavar="KEY", help="only routes holding keys at or after KEY"
    )
    routes.add_argument(
        "--to", dest="to_key", metavar="KEY", help="only routes holding keys before KEY"
    )
    _key_options(routes)
    routes.add_argument("--json", action="store_true", help="print JSON (keys in hex)")
    routes.add_argument(
        "--at", metavar="VERSION", type=u64, help="show the catalog as it was at VERSION"
    )

    lookup = add("lookup", "show which route holds each key")
    lookup.add_argument("keys", metavar="KEY", nargs="+", help="a key (text, or hex: see --hex)")
    _key_options(lookup)
    lookup.add_argument("--json", action="store_true", help="print JSON")
    lookup.add_argument("--at", metavar="VERSION", type=u64, help="look up in the catalog at VERSION")

    split = add("split", "split a route in two at a key", None, writes, waits)
    split.add_argument("route_id", metavar="ROUTE_ID", type=_nonzero_u64)
    split.add_argument("key", metavar="KEY", help="the split key: the right child's start")
    _key_options(split)

    merge = add("merge", "merge two adjacent routes of one group", None, writes, waits)
    merge.add_argument("left", metavar="LEFT", type=_nonzero_u64, help="the left route's id")
    merge.add_argument("right", metavar="RIGHT", type=_nonzero_u64, help="the right route's id")

    set_state = add(
        "set-state",
        "change a route's state (fence, migrate, unfence)",
        "Change a route's state. STATE is active, write_fenced (or write-fenced),\n"
        "migrating_source or migrating_target, in any case, or its number 0-3.",
        writes,
        waits,
    )
    set_state.add_argument("route_id", metavar="ROUTE_ID", type=_nonzero_u64)
    set_state.add_argument("state", metavar="STATE", type=_state)

    move = add("move", "move a write-fenced route to another group", None, writes, waits)
    move.add_argument("route_id", metavar="ROUTE_ID", type=_nonzero_u64)
    move.add_argument("group_id", metavar="GROUP", type=_nonzero_u64)

    history = add("history", "show the audit trail of catalog writes")
    history.add_argument(
        "--since", metavar="V", type=u64, default=0, help="only the writes after version V"
    )
    shown = history.add_mutually_exclusive_group()
    shown.add_argument(
        "--limit", metavar="N", type=positive_int, help="the N oldest writes (after --since)"
    )
    shown.add_argument(
        "--last", metavar="N", type=positive_int, help="the N newest writes, newest first"
    )
    history.add_argument("--json", action="store_true", help="print JSON")

    watch = add(
        "watch",
        "print catalog changes as they land",
        "Follow the catalog live and print each change as it lands (Ctrl-C stops).",
    )
    watch.add_argument("--count", metavar="N", type=positive_int, help="stop after N changes")
    watch.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_seconds,
        help="stop after SECONDS (exit code 1 if --count changes were not seen by then)",
    )
    watch.add_argument(
        "--since", metavar="V", type=u64, help="start after version V (default: the current one)"
    )
    watch.add_argument("--json", action="store_true", help="print one JSON object per change")
    watch.add_argument(
        "--name",
        metavar="NAME",
        help="the name the watcher answers roll calls with (default: program@host:pid)",
    )
    # Without --nats the watcher LISTENs on the catalog's database.
    add_nats_arguments(watch, required=False, verb="follow, instead of LISTEN, with --nats")
    watch.add_argument(
        "--metrics-port",
        metavar="PORT",
        type=_port,
        help="serve the watcher's Prometheus metrics on PORT (needs the metrics extra)",
    )

    fleet = add(
        "fleet",
        "show every watcher following the catalog (one roll call)",
        "Ask every watcher connected to the catalog's database for its state, over a\n"
        "notification channel (nothing is written), and show them, laggards first. A watcher\n"
        "that is connected but does not answer within --window is shown as silent. Exit code 0\n"
        "when all hold the catalog's version, 5 when some do not. With --nats, ask the\n"
        "watchers following NATS instead: those that answer within --window (NATS cannot show\n"
        "silent ones).",
    )
    add_nats_arguments(fleet, required=False, verb="ask the watchers of, with --nats")
    fleet.add_argument(
        "--window",
        metavar="SECONDS",
        type=_seconds,
        default=1.0,
        help="how long to wait for connected watchers to answer, at most; with --nats, the "
        "time the answers are collected for (default: 1)",
    )
    fleet.add_argument("--json", action="store_true", help="print JSON")

    add_relay_arguments(
        add(
            "relay",
            "publish every catalog write on NATS, for watchers that follow NATS",
            "LISTEN on the catalog database (the primary) and publish each write's notification\n"
            "on a NATS subject, for services whose watchers follow NATS instead of holding a\n"
            "connection to the primary each. Run two or more for availability: watchers apply each\n"
            "version once. Runs until SIGTERM or Ctrl-C. Needs the nats extra.",
        )
    )

    formats = ("json", "kv")
    format_help = (
        "json: the routes, with the version, keys in hex (default); kv: the seed's key-value "
        "records, one JSON line {\"key\": hex, \"value\": hex} each"
    )
    export = add("export", "write the catalog to a file (or stdout)")
    export.add_argument("file", metavar="FILE", nargs="?", default="-", help="default: - (stdout)")
    export.add_argument("--format", choices=formats, default="json", help=format_help)
    export.add_argument("--at", metavar="VERSION", type=u64, help="export the catalog at VERSION")
    export.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    import_ = add(
        "import",
        "make the catalog's routes those of a file (or stdin)",
        "Make the catalog's routes those of FILE, in one compare-and-set write. It first prints\n"
        "the plan: routes added, changed (same id) and retired (absent from FILE). Retiring\n"
        "routes needs --replace. A route whose id this catalog issued and retired gets a new id,\n"
        "and the id counter becomes the larger of FILE's and the catalog's, so no id is issued\n"
        "twice. An import that changes nothing writes nothing.",
        writes,
    )
    import_.add_argument(
        "--replace", action="store_true", help="retire the catalog's routes absent from FILE"
    )
    import_.add_argument(
        "--dry-run", action="store_true", help="print the plan and write nothing"
    )
    import_.add_argument("file", metavar="FILE", help="a file written by export, or - for stdin")
    import_.add_argument("--format", choices=formats, default="json", help=format_help)
    import_.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    prune = add(
        "prune",
        "drop old history",
        "Drop the history (audit entries and past routes) of all but the newest N versions.\n"
        "Past versions then read as 'too old' (routes --at, export --at); watchers further\n"
        "behind catch up with a full snapshot. The current routes are never touched.",
    )
    prune.add_argument(
        "--keep",
        metavar="N",
        type=positive_int,
        default=1024,
        help="versions of history to keep, the current one included (default: 1024)",
    )

    db = add("db", "manage the embedded database server")
    db_commands = db.add_subparsers(dest="db_command", metavar="ACTION", parser_class=_Parser)
    db_commands.required = True
    db_actions = {}
    for name, summary in (
        ("status", "whether the server runs, its folder, URL and catalog version"),
        ("start", "start the embedded server (and migrate it)"),
        ("stop", "stop the embedded server (its data is kept)"),
        ("url", "print the embedded server's URL (starting the server if needed)"),
        ("reset", "stop the embedded server and delete its data: an empty catalog next time"),
    ):
        db_actions[name] = db_commands.add_parser(
            name, help=summary, description=summary, parents=[common]
        )
    db_actions["reset"].add_argument(
        "--yes", action="store_true", help="do not ask for confirmation"
    )

    demo = add(
        "demo",
        "a guided tour: live services follow splits, a cutover and a merge",
        "Replace the catalog's routes by 4 routes on groups 1-4, start in-process services\n"
        "(an Engine and a CatalogWatcher each) that keep routing keys, then split, fence, move,\n"
        "unfence and merge routes, printing after each step how long every service took to see\n"
        "it. It runs on the same catalog as the other commands (the embedded server by default)\n"
        "and leaves its catalog there for 'distribution routes' to show. On a database named by\n"
        "URL it refuses (exit code 3) a catalog that has been written, unless --replace.",
    )
    demo.add_argument(
        "--replace",
        action="store_true",
        help="replace the routes of a catalog named by URL that has been written",
    )
    demo.add_argument(
        "--services", metavar="N", type=positive_int, default=4, help="in-process services (4)"
    )
    demo.add_argument("--actor", metavar="NAME", default=None, help="who asks, for the audit trail")
    return parser


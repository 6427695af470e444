"""The ``distribution`` command, driven as a user would: by subprocess, against the test database.

Each subprocess costs about a second of imports, so the tests group their checks: one test walks a
catalog through several commands. Pure argument handling (which needs no database) is checked
in-process through ``main()``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
import pytest

from distribution import (
    RouteDescriptor,
    catalog_next_route_id_key,
    catalog_route_key,
    catalog_version_key,
    encode_catalog_next_route_id,
    encode_catalog_version,
    encode_route_descriptor,
)
from distribution.cli import main
from distribution.cli.commands import init_routes

UNREACHABLE_URL = "postgresql://postgres@127.0.0.1:1/x"


def _sigint_as_in_a_terminal() -> None:
    """In a command's process before it starts: SIGINT at its default, as a terminal leaves it
    (a shell running this suite in the background has it ignored, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DISTRIBUTION_DATABASE_URL"}
    env["PYTHONIOENCODING"] = "utf-8"
    return env


class Result(NamedTuple):
    """What one run of the command did."""

    returncode: int
    stdout: str
    stderr: str


def cli(
    *args: str,
    url: str | None = None,
    input: str | None = None,
    sub: bool = False,
    timeout: float = 120,
) -> Result:
    """Run ``distribution [--database-url URL] ARGS``: in this process, or with ``sub`` as
    ``python -m distribution`` in a subprocess, exactly as a user would."""
    argv = ["--database-url", url, *args] if url is not None else list(args)
    if sub:
        done = subprocess.run(
            [sys.executable, "-m", "distribution", *argv],
            input=input,
            capture_output=True,
            text=True,
            encoding="utf-8",
            env=_env(),
            timeout=timeout,
            check=False,
        )
        return Result(done.returncode, done.stdout, done.stderr)
    out, err = io.StringIO(), io.StringIO()
    stdin = sys.stdin
    sys.stdin = io.StringIO(input or "")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        sys.stdin = stdin
    return Result(code, out.getvalue(), err.getvalue())


def ok(*args: str, url: str | None = None, input: str | None = None, sub: bool = False) -> str:
    """Run the command, check it succeeded, and return its stdout."""
    result = cli(*args, url=url, input=input, sub=sub)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


def fails(
    code: int,
    *args: str,
    url: str | None = None,
    input: str | None = None,
    notes: int = 0,
    sub: bool = False,
) -> str:
    """Run the command, check it failed with ``code`` and one error line; return that line.

    ``notes`` status lines (such as watch's banner) may come before the error line.
    """
    result = cli(*args, url=url, input=input, sub=sub)
    assert result.returncode == code, (args, result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()[notes:]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("distribution: error: "), lines[0]
    return lines[0]


def routes_json(url: str, *extra: str) -> dict[str, Any]:
    """The catalog as ``routes --json`` prints it."""
    document: dict[str, Any] = json.loads(ok("routes", "--json", *extra, url=url))
    return document


@contextlib.contextmanager
def watching(url: str, *args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``distribution watch ARGS`` in a process of its own, and its banner, once it has printed
    it (the watcher then listens); the process is killed on the way out."""
    command = [sys.executable, "-m", "distribution", "--database-url", url, "watch", *args]
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        env=_env(),
        preexec_fn=_sigint_as_in_a_terminal,  # noqa: PLW1509 (it only sets a signal handler)
    ) as watch:
        try:
            assert watch.stderr is not None
            banner = watch.stderr.readline()
            assert "watching" in banner, banner
            yield watch, banner
        finally:
            watch.kill()


# -- in process: arguments, no database --------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["bogus"],
        [],
        ["split", "1"],
        ["split", "one", "k"],
        ["split", "0", "k"],
        ["merge", "1", "18446744073709551616"],
        ["set-state", "1", "frozen"],
        ["set-state", "1", "4"],
        ["init", "--groups", "0"],
        ["init", "--groups", "257"],
        ["routes", "--at", "-1"],
        ["watch", "--timeout", "0"],
        ["export", "--format", "csv"],
        ["db", "restart"],
        ["split", "1", "0xzz", "--database-url", UNREACHABLE_URL],
        ["split", "1", "abc", "--hex", "--database-url", UNREACHABLE_URL],
        ["lookup", "--hex", "0", "--database-url", UNREACHABLE_URL],
        ["lookup", "--hex", "--text", "00"],
    ],
)
def test_usage_errors_exit_2_with_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("distribution: error: "), captured.err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in (
        "migrate",
        "init",
        "routes",
        "lookup",
        "split",
        "merge",
        "set-state",
        "move",
        "history",
        "watch",
        "export",
        "import",
        "db",
        "demo",
    ):
        assert command in text
    assert "exit codes" in text and "+∞" in text
    assert main(["init", "--help"]) == 0
    assert "bytes([256*(i-1)//N])" in capsys.readouterr().out


def test_state_names_are_case_insensitive(capsys: pytest.CaptureFixture[str]) -> None:
    from distribution.cli.parser import build_parser

    parser = build_parser()
    for text, value in [
        ("active", 0),
        ("WRITE_FENCED", 1),
        ("write-fenced", 1),
        ("Migrating-Source", 2),
        ("migrating_target", 3),
        ("2", 2),
    ]:
        assert parser.parse_args(["set-state", "5", text]).state == value


def test_init_routes_split_the_first_byte_evenly() -> None:
    routes = init_routes(4)
    assert [(r.route_id, r.start, r.end, r.group_id) for r in routes] == [
        (1, b"", b"\x40", 1),
        (2, b"\x40", b"\x80", 2),
        (3, b"\x80", b"\xc0", 3),
        (4, b"\xc0", None, 4),
    ]
    assert init_routes(1) == [RouteDescriptor(route_id=1, start=b"", end=None, group_id=1)]
    many = init_routes(256)
    assert [r.start for r in many[1:]] == [bytes([i]) for i in range(1, 256)]


# -- by subprocess, on the test database -------------------------------------------------------


def test_python_m_distribution_and_its_exit_codes(database_url: str) -> None:
    """Every exit code, from a real ``python -m distribution`` process: one line, no traceback."""
    url = database_url
    assert ok("--help", sub=True).startswith("usage: distribution")
    fails(2, "bogus", sub=True)
    assert "invalid hex" in fails(2, "split", "1", "0xzz", url=url, sub=True)
    assert "up to date" in ok("migrate", url=url, sub=True)
    ok("init", url=url, sub=True)
    assert '""     +∞' in ok("routes", url=url, sub=True)  # through the real stdout's encoding
    assert "version conflict" in fails(3, "init", url=url, sub=True)
    assert "version conflict" in fails(
        3, "split", "1", "m", "--expect-version", "0", url=url, sub=True
    )
    assert "not found" in fails(4, "split", "2", "m", url=url, sub=True)
    assert "boundary" in fails(1, "split", "1", "0x", url=url, sub=True)
    assert "unavailable" in fails(1, "routes", url=UNREACHABLE_URL, sub=True)


def test_every_command_in_a_real_process(database_url: str, tmp_path: Path) -> None:
    """A session of an operator, one ``python -m distribution`` process per command."""
    url = database_url
    ok("migrate", url=url, sub=True)
    assert "4 routes" in ok("init", "--groups", "4", url=url, sub=True)
    assert '"apple"' in ok("lookup", "apple", "0x41", url=url, sub=True)
    assert "catalog version 2" in ok("split", "1", "0x20", url=url, sub=True)
    ok("set-state", "2", "write_fenced", url=url, sub=True)
    ok("move", "2", "9", "--actor", "ops", url=url, sub=True)
    ok("set-state", "2", "active", url=url, sub=True)
    routes = json.loads(ok("routes", "--json", url=url, sub=True))
    assert routes["version"] == 5
    assert {r["route_id"]: r["group_id"] for r in routes["routes"]}[2] == 9
    assert "merged" in ok("merge", "5", "6", url=url, sub=True)
    assert "4 routes" in ok("routes", "--at", "1", url=url, sub=True)
    history = ok("history", "--since", "4", url=url, sub=True)
    assert "set_route_state" in history and "merge_routes" in history
    exported = tmp_path / "catalog.json"
    ok("export", str(exported), url=url, sub=True)
    ok("import", str(exported), url=url, sub=True)
    assert json.loads(ok("routes", "--json", url=url, sub=True))["routes"] == json.loads(
        exported.read_text()
    )["routes"]
    assert "catalog version" in ok("db", "status", url=url, sub=True)


def test_init_routes_and_lookup(database_url: str) -> None:
    url = database_url
    text = ok("init", url=url)
    assert "catalog version 1: 1 route" in text
    table = ok("routes", url=url)
    header, row = table.splitlines()[1:3]
    assert header.split() == ["ID", "START", "END", "GROUP", "STATE", "PARENT"]
    assert row.split() == ["1", '""', "+∞", "1", "active", "-"]
    line = fails(3, "init", "--groups", "2", url=url)
    assert "not empty" in line

    document = routes_json(url)
    assert document["version"] == 1
    assert document["routes"] == [
        {
            "route_id": 1,
            "start": "",
            "end": None,
            "group_id": 1,
            "state": "active",
            "parent_route_id": 0,
        }
    ]

    ok("split", "1", "m", url=url)  # routes 2 ["", "m") and 3 ["m", +∞)
    lookup = ok("lookup", "apple", "0x7a", "m", "0x", url=url)
    rows = {line.split()[0]: line.split()[1] for line in lookup.splitlines()[2:]}
    assert rows == {'"apple"': "2", '"z"': "3", '"m"': "3", '""': "2"}
    found = json.loads(ok("lookup", "--hex", "--json", "6d", "00", url=url))
    assert found["version"] == 2
    assert [(x["key"], x["route"]["route_id"]) for x in found["lookups"]] == [("6d", 3), ("00", 2)]
    # --text takes a 0x… argument as text; --at looks up in the past.
    text_key = ok("lookup", "--text", "0x7a", "--at", "1", url=url)
    assert '"0x7a"' in text_key and "catalog version 1" in text_key


def test_init_groups(database_url: str) -> None:
    ok("init", "--groups", "4", url=database_url)
    routes = routes_json(database_url)["routes"]
    assert [(r["start"], r["end"], r["group_id"]) for r in routes] == [
        ("", "40", 1),
        ("40", "80", 2),
        ("80", "c0", 3),
        ("c0", None, 4),
    ]
    table = ok("routes", url=database_url)
    assert '"\\x80"' in table and '"@"' in table and "+∞" in table


def test_write_commands_history_and_errors(database_url: str) -> None:
    url = database_url
    ok("init", "--groups", "2", url=url)  # version 1: 1 ["", "\x80") and 2 ["\x80", +∞)

    split = ok("split", "1", "0x20", "--actor", "alice", url=url)
    assert "catalog version 2" in split and "retired" in split
    routes = routes_json(url)["routes"]
    assert [(r["route_id"], r["start"], r["end"], r["parent_route_id"]) for r in routes] == [
        (3, "", "20", 1),
        (4, "20", "80", 1),
        (2, "80", None, 0),
    ]
    fenced = json.loads(ok("set-state", "3", "Write-Fenced", "--json", url=url))
    assert fenced["version"] == 3 and fenced["created"][0]["state"] == "write_fenced"
    assert fenced["retired"] == []
    moved = ok("move", "3", "7", "--expect-version", "3", url=url)
    assert "moved route 3 to group 7: catalog version 4" in moved
    ok("set-state", "3", "active", url=url)
    merge_line = fails(1, "merge", "3", "4", url=url)  # groups 7 and 1
    assert "groups" in merge_line
    ok("set-state", "3", "1", url=url)
    ok("move", "3", "1", url=url)
    ok("set-state", "3", "0", url=url)  # version 8
    merged = json.loads(ok("merge", "3", "4", "--json", url=url))
    assert merged["version"] == 9 and sorted(merged["retired"]) == [3, 4]
    assert [(r["route_id"], r["start"], r["end"]) for r in merged["created"]] == [(5, "", "80")]

    # Errors: a version conflict, a missing route, a split at a boundary, a bad transition.
    line = fails(3, "split", "5", "a", "--expect-version", "2", url=url)
    assert "version conflict" in line and "9" in line
    assert "not found" in fails(4, "split", "99", "a", url=url)
    assert "not found" in fails(4, "set-state", "99", "write-fenced", url=url)
    assert "boundary" in fails(1, "split", "2", "0x80", url=url)
    fails(1, "move", "5", "3", url=url)  # not fenced
    fails(1, "set-state", "5", "migrating_source", url=url)  # active -> migrating: refused
    assert routes_json(url)["version"] == 9  # nothing was written by the failures

    history = ok("history", url=url)
    lines = history.splitlines()
    assert lines[0].split() == ["VERSION", "COMMITTED", "ACTOR", "OPERATION", "ARGUMENTS"]
    assert len(lines) == 1 + 9
    assert "alice" in lines[2] and "split_route" in lines[2] and 'split_key=" "' in lines[2]
    assert "from=active to=write_fenced" in lines[3]
    since = json.loads(ok("history", "--since", "7", "--json", url=url))
    assert [(e["version"], e["operation"]) for e in since] == [
        (8, "set_route_state"),
        (9, "merge_routes"),
    ]
    assert since[1]["arguments"] == {"left_route_id": 3, "right_route_id": 4}

    past = ok("routes", "--at", "2", url=url)
    assert "catalog version 2: 3 routes" in past
    assert routes_json(url, "--at", "1")["routes"][0]["end"] == "80"
    fails(1, "routes", "--at", "99", url=url)  # a version the catalog has not reached


def test_lookup_of_an_unrouted_key_exits_4(database_url: str) -> None:
    fails(4, "lookup", "k", url=database_url)  # an empty catalog routes nothing
    ok("init", url=database_url)
    ok("lookup", "k", url=database_url)


def test_watch_prints_a_concurrent_split(database_url: str) -> None:
    url = database_url
    ok("init", url=url)
    # The split is made from this process while the watch runs in its own.
    with watching(url, "--count", "1", "--timeout", "60") as (watch, banner):
        assert "watching the catalog after version 1" in banner
        ok("split", "1", "m", "--actor", "root-of-the-test", url=url)
        out, err = watch.communicate(timeout=60)
    assert watch.returncode == 0, err
    assert "Traceback" not in err
    lines = out.splitlines()
    assert lines[0] == "version 2: split_route by root-of-the-test: 2 upserted, 1 deleted"
    assert any(line.split()[:2] == ["+", "2"] and '"m"' in line for line in lines)
    assert any(line.split() == ["-", "1"] for line in lines)

    # Replaying from a past version needs no concurrency; --json prints one object a change.
    replay = ok("watch", "--since", "0", "--count", "2", "--json", "--timeout", "30", url=url)
    changes = [json.loads(line) for line in replay.splitlines()]
    assert [c["version"] for c in changes] == [1, 2]
    assert changes[1]["deletes"] == [1] and len(changes[1]["upserts"]) == 2


def test_watch_stops_on_ctrl_c_and_times_out(database_url: str) -> None:
    with watching(database_url) as (watch, _):
        watch.send_signal(signal.SIGINT)
        _, err = watch.communicate(timeout=30)
    assert watch.returncode == 0, err
    assert "Traceback" not in err
    # A timeout with --count unmet is an error; without --count it is a normal end.
    line = fails(1, "watch", "--count", "1", "--timeout", "0.5", url=database_url, notes=1)
    assert "timed out" in line
    assert ok("watch", "--timeout", "0.5", url=database_url) == ""


def _catalog(url: str) -> list[dict[str, Any]]:
    routes: list[dict[str, Any]] = routes_json(url)["routes"]
    return routes


def test_export_import_round_trips(
    database_url: str, other_database_url: str, tmp_path: Path
) -> None:
    source, target = database_url, other_database_url
    ok("init", "--groups", "3", url=source)
    ok("split", "2", "0x60", url=source)
    ok("set-state", "1", "write_fenced", url=source)
    expected = _catalog(source)

    # json, through a file
    path = tmp_path / "catalog.json"
    ok("export", str(path), url=source)
    exported = json.loads(path.read_text())
    assert exported["version"] == 3 and exported["next_route_id"] == 6
    assert exported["routes"] == expected
    assert "imported 4 routes" in ok("import", str(path), url=target)
    assert _catalog(target) == expected

    # kv, through stdout and stdin, into a catalog that has moved on: --replace retires its
    # routes, and route 5, which the target has retired meanwhile, comes back under a new id.
    ok("split", "5", "0x70", url=target)
    kv = ok("export", "--format", "kv", url=source, sub=True)
    records = [json.loads(line) for line in kv.splitlines()]
    assert records[0] == {
        "key": catalog_version_key().hex(),
        "value": encode_catalog_version(3).hex(),
    }
    assert records[1] == {
        "key": catalog_next_route_id_key().hex(),
        "value": encode_catalog_next_route_id(6).hex(),
    }
    first = RouteDescriptor(route_id=1, start=b"", end=b"\x55", group_id=1, state=1)
    assert records[2] == {
        "key": catalog_route_key(1).hex(),
        "value": encode_route_descriptor(first).hex(),
    }
    assert len(records) == 2 + 4
    text = ok(
        "import", "--format", "kv", "-", "--actor", "restore", "--replace",
        input=kv, url=target, sub=True,
    )
    assert "catalog version 3" in text
    assert "5->8" in text
    renumbered = [{**r, "route_id": 8} if r["route_id"] == 5 else r for r in expected]
    assert _catalog(target) == renumbered
    assert json.loads(ok("history", "--since", "2", "--json", url=target))[0]["actor"] == "restore"

    # An export of the past.
    past = json.loads(ok("export", "--at", "1", url=source))
    assert past["version"] == 1 and len(past["routes"]) == 3


def test_import_refuses_bad_input(database_url: str, tmp_path: Path) -> None:
    url = database_url
    ok("init", url=url)
    route = RouteDescriptor(route_id=7, start=b"", end=None, group_id=1)
    good = json.dumps(
        {"key": catalog_route_key(7).hex(), "value": encode_route_descriptor(route).hex()}
    )
    truncated = json.dumps(
        {"key": catalog_route_key(7).hex(), "value": encode_route_descriptor(route)[:-1].hex()}
    )
    mismatched = json.dumps(
        {"key": catalog_route_key(8).hex(), "value": encode_route_descriptor(route).hex()}
    )
    bad_key = json.dumps({"key": b"!dist|other".hex(), "value": "00"})
    assert "record" in fails(1, "import", "--format", "kv", "-", input=truncated, url=url)
    assert "mismatch" in fails(1, "import", "--format", "kv", "-", input=mismatched, url=url)
    assert "key" in fails(1, "import", "--format", "kv", "-", input=bad_key, url=url)
    assert ":1:" in fails(1, "import", "--format", "kv", "-", input="not json\n", url=url)
    assert "not valid JSON" in fails(1, "import", "-", input="{", url=url)
    overlapping = {
        "routes": [
            {"route_id": 1, "start": "", "end": None, "group_id": 1},
            {"route_id": 2, "start": "61", "end": None, "group_id": 1},
        ]
    }
    assert "overlap" in fails(1, "import", "-", input=json.dumps(overlapping), url=url)
    fails(1, "import", str(tmp_path / "missing.json"), url=url)
    assert "version conflict" in fails(
        3, "import", "--format", "kv", "-", "--expect-version", "0", input=good, url=url
    )
    assert routes_json(url)["version"] == 1  # nothing was written
    ok("import", "--format", "kv", "-", "--replace", input=good, url=url)
    assert [r["route_id"] for r in _catalog(url)] == [7]


def test_db_status_on_a_url(database_url: str) -> None:
    text = ok("db", "status", url=database_url)
    assert "(from --database-url)" in text
    assert re.search(r"server: PostgreSQL \d+", text)
    assert "catalog version: 0" in text
    assert "embedded server only" in fails(2, "db", "stop", url=database_url)


def test_db_status_of_an_unmigrated_database(empty_database_url: str) -> None:
    assert "not migrated" in ok("db", "status", url=empty_database_url)
    assert "migrate" in fails(1, "routes", url=empty_database_url)


def test_db_status_of_a_database_behind_the_library(outdated_database_url: str) -> None:
    url = outdated_database_url
    assert re.search(r"revision 0001, this library needs \d{4}", ok("db", "status", url=url))
    assert "distribution migrate" in fails(1, "routes", url=url)
    ok("migrate", url=url)
    assert "revision" not in ok("db", "status", url=url)
    assert ok("routes", url=url)


def test_an_empty_database_url_is_a_usage_error() -> None:
    """An unset shell variable must not quietly send the command to the embedded server."""
    assert "empty database URL" in fails(2, "routes", url="")
    assert "empty database URL" in fails(2, "routes", "--database-url", " ")


def test_a_count_beyond_the_library_range_is_a_usage_error() -> None:
    assert "out of range" in fails(2, "history", "--limit", str(2**63), url=UNREACHABLE_URL)


# Runs the command with a SIGINT raised at one chosen point: the first import of a module, or the
# first call of a function (by qualified name). No timing: the interrupt lands exactly there.
_INTERRUPT_AT = """
import signal, sys
point = sys.argv[1]
fired = False
def fire():
    global fired
    if not fired:
        fired = True
        signal.raise_signal(signal.SIGINT)
def on_import(event, args):
    if event == "import" and args[0] == point:
        fire()
def on_call(frame, event, arg):
    if event == "call" and frame.f_code.co_qualname == point:
        sys.setprofile(None)
        fire()
sys.addaudithook(on_import)
sys.setprofile(on_call)
from distribution.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize(
    "point",
    [
        "distribution.cli.commands",  # importing the command's modules
        "sqlalchemy.engine",  # importing the database layers
        "transaction",  # connecting (the catalog's transactions)
        "CatalogStore.snapshot",  # about to query
        "Session.print",  # printing
    ],
)
def test_ctrl_c_while_a_command_runs_is_reported_in_one_line(database_url: str, point: str) -> None:
    """Wherever the interrupt lands (imports, connecting, the query, output), one line and 130."""
    done = subprocess.run(
        [sys.executable, "-c", _INTERRUPT_AT, point, "--database-url", database_url, "routes"],
        capture_output=True,
        text=True,
        env=_env(),
        preexec_fn=_sigint_as_in_a_terminal,
        timeout=120,
        check=False,
    )
    assert (done.returncode, done.stderr) == (130, "distribution: error: interrupted\n"), point


def test_library_warnings_are_one_line_each(database_url: str) -> None:
    with watching(database_url, "--count", "1") as (watch, _):
        with psycopg.connect(database_url, autocommit=True) as other:
            other.execute("NOTIFY distribution_catalog, 'not the catalog''s'")
        ok("init", url=database_url)
        out, err = watch.communicate(timeout=30)
    assert watch.returncode == 0, err
    assert "version 1" in out
    assert err.splitlines() == [
        "distribution: warning: ignored a malformed catalog notification: "
        "malformed catalog notification: \"not the catalog's\""
    ]


def test_unreachable_database_exits_1() -> None:
    assert "unavailable" in fails(1, "db", "status", url=UNREACHABLE_URL)
    assert "unavailable" in fails(1, "split", "1", "m", url=UNREACHABLE_URL)
    fails(2, "routes", url="mysql://localhost/x")


def test_demo_on_a_url_keeps_a_written_catalog_unless_told(database_url: str) -> None:
    ok("init", "--groups", "8", url=database_url)
    before = routes_json(database_url)
    assert "--replace" in fails(3, "demo", url=database_url)
    assert routes_json(database_url) == before


@pytest.mark.slow
def test_demo_on_a_url(database_url: str) -> None:
    ok("init", "--groups", "8", url=database_url)
    result = cli("demo", "--replace", url=database_url, sub=True, timeout=60)
    assert result.returncode == 0, (result.stdout, result.stderr)
    out = result.stdout
    for step in range(7):
        assert f"[{step}/6]" in out
    assert out.count("visible in:") == 6
    assert re.search(r"p50 [\d.]+ ms, p90 [\d.]+ ms, max [\d.]+ ms", out)
    assert re.search(r"demo finished in [\d.]+ s", out)  # reported, not bounded: no timing
    # The demo's catalog stays for `routes` to show: 6 writes after the seed.
    catalog = routes_json(database_url)
    assert catalog["version"] == 2 + 6
    assert 5 in {r["group_id"] for r in catalog["routes"]}
    assert all(r["state"] == "active" for r in catalog["routes"])

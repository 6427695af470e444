"""The CLI as an operator meets it: each test is a trap an operator walk-through found.

Every check runs the real command against a real catalog (the test database) and reads what an
operator reads: the exit code, stdout, and the one error line on stderr.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import psycopg
import pytest
from test_cli import UNREACHABLE_URL, cli, fails, ok, routes_json, watching

from distribution import (
    MAX_ROUTE_KEY_BYTES,
    CatalogSnapshot,
    RouteDescriptor,
    catalog_next_route_id_key,
    catalog_route_key,
    encode_catalog_next_route_id,
    encode_route_descriptor,
)
from distribution.cli import _OneLineLogHandler
from distribution.cli.transfer import _Source, plan_import

# -- what lookup and history show -----------------------------------------------------------------


def test_lookup_json_shows_each_route_s_real_parent(database_url: str) -> None:
    ok("init", url=database_url)
    ok("split", "1", "m", url=database_url)
    found = json.loads(ok("lookup", "--json", "a", "z", url=database_url))["lookups"]
    listed = {r["route_id"]: r for r in routes_json(database_url)["routes"]}
    assert [f["route"]["parent_route_id"] for f in found] == [1, 1]
    assert [f["route"] for f in found] == [listed[2], listed[3]]


def test_history_last_shows_the_newest_writes_newest_first(database_url: str) -> None:
    ok("init", url=database_url)
    for key in ("b", "c", "d"):
        ok("split", str(routes_json(database_url)["routes"][-1]["route_id"]), key, url=database_url)
    last = json.loads(ok("history", "--last", "2", "--json", url=database_url))
    assert [e["version"] for e in last] == [4, 3]
    oldest = json.loads(ok("history", "--limit", "2", "--json", url=database_url))
    assert [e["version"] for e in oldest] == [1, 2]
    table = ok("history", "--last", "1", url=database_url).splitlines()
    assert len(table) == 2 and table[1].split()[0] == "4"
    fails(2, "history", "--last", "1", "--limit", "1", url=database_url)


def test_history_json_names_states(database_url: str) -> None:
    ok("init", url=database_url)
    ok("set-state", "1", "write_fenced", url=database_url)
    entry = json.loads(ok("history", "--last", "1", "--json", url=database_url))[0]
    assert entry["arguments"]["from"] == "active"
    assert entry["arguments"]["to"] == "write_fenced"


# -- errors: the table's key notation, state names, one line -------------------------------------

_OTHER_NOTATIONS = re.compile(r"b'|b\"|\[\\x|(?<![-\w])state \d")


def test_write_errors_show_keys_as_the_table_does_and_states_by_name(database_url: str) -> None:
    url = database_url
    ok("init", "--groups", "2", url=url)  # 1: ["", "\x80"), 2: ["\x80", +∞)
    table = ok("routes", url=url)
    assert '"\\x80"' in table

    outside = fails(1, "split", "1", "0x90", url=url)
    assert 'route 1 ["", "\\x80")' in outside and '"\\x90"' in outside
    at_start = fails(1, "split", "2", "0x80", url=url)
    assert 'route 2 ["\\x80", +∞)' in at_start and "boundary" in at_start
    jump = fails(1, "set-state", "1", "migrating_target", url=url)
    assert "cannot go from active to migrating_target" in jump
    assert "it can go to write_fenced" in jump
    unfenced = fails(1, "move", "1", "7", url=url)
    assert "route 1 is active" in unfenced and "set-state 1 write_fenced" in unfenced
    for line in (outside, at_start, jump, unfenced):
        assert not _OTHER_NOTATIONS.search(line), line
    assert routes_json(url)["version"] == 1  # nothing was written


def test_setting_the_state_a_route_has_writes_nothing_and_says_so(database_url: str) -> None:
    ok("init", url=database_url)
    assert ok("set-state", "1", "active", url=database_url) == (
        "route 1 is already active: nothing written\n"
    )
    assert routes_json(database_url)["version"] == 1


def test_merge_with_the_ids_in_the_wrong_order_says_so(database_url: str) -> None:
    ok("init", url=database_url)
    ok("split", "1", "m", url=database_url)  # 2: ["", "m"), 3: ["m", +∞)
    line = fails(1, "merge", "3", "2", url=database_url)
    assert "comes before" in line and "distribution merge 2 3" in line
    assert "not adjacent" not in line
    assert "merged routes 2 and 3" in ok("merge", "2", "3", url=database_url)


def test_a_huge_split_key_is_refused_before_the_database(database_url: str) -> None:
    ok("init", url=database_url)
    line = fails(2, "split", "1", "x" * 100_000, url=database_url)
    assert f"at most {MAX_ROUTE_KEY_BYTES:,} bytes" in line
    assert routes_json(database_url)["version"] == 1


def test_argument_mistakes_get_the_right_message() -> None:
    groups = fails(2, "init", "--groups", "257", url=UNREACHABLE_URL)
    assert "1..256" in groups and "2**63" not in groups
    odd = fails(2, "lookup", "0x4", url=UNREACHABLE_URL)
    assert "odd number of hex digits" in odd
    stray = fails(2, "routes", "--bogus", url=UNREACHABLE_URL)
    assert "see 'distribution routes --help'" in stray


def test_routes_at_version_0_does_not_suggest_init(database_url: str) -> None:
    ok("init", url=database_url)
    past = ok("routes", "--at", "0", url=database_url)
    assert past == "catalog version 0: no routes\n"


def test_an_empty_database_url_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTRIBUTION_DATABASE_URL", "")
    line = fails(2, "routes")
    assert "DISTRIBUTION_DATABASE_URL is set but empty" in line


def test_an_unmigrated_database_is_one_line_every_time(empty_database_url: str) -> None:
    # psycopg's own note about the pipeline the error went through used to follow, about one
    # run in four.
    for _ in range(8):
        line = fails(1, "split", "1", "m", url=empty_database_url, sub=True)
        assert "distribution migrate" in line


def test_psycopg_s_pipeline_follow_up_note_is_not_shown(
    capsys: pytest.CaptureFixture[str],
) -> None:
    handler = _OneLineLogHandler(logging.WARNING)
    psycopg_logger = logging.getLogger("psycopg")
    psycopg_logger.addHandler(handler)
    try:
        psycopg_logger.warning(
            "error ignored terminating %r: %s", "<psycopg.Pipeline [INERROR]>", "pipeline aborted"
        )
        psycopg_logger.warning("connection lost")
    finally:
        psycopg_logger.removeHandler(handler)
    assert capsys.readouterr().err == "distribution: warning: connection lost\n"


# -- migrate -------------------------------------------------------------------------------------


def test_migrate_says_whether_it_upgraded(empty_database_url: str) -> None:
    first = ok("migrate", url=empty_database_url)
    assert first.startswith("upgraded the catalog schema from an empty database to revision")
    assert "already up to date" in ok("migrate", url=empty_database_url)


# -- routes filters, prune ---------------------------------------------------------------------


def test_routes_filters(database_url: str) -> None:
    url = database_url
    ok("init", "--groups", "4", url=url)  # splits at 0x40, 0x80, 0xc0 on groups 1-4
    ok("set-state", "3", "write_fenced", url=url)

    def ids(*args: str) -> list[int]:
        return [r["route_id"] for r in routes_json(url, *args)["routes"]]

    assert ids("2") == [2]
    assert ids("--group", "4") == [4]
    assert ids("--state", "write_fenced") == [3]
    assert ids("--from", "0x41", "--to", "0x81") == [2, 3]
    assert ids("--from", "0xc0") == [4]
    assert ids("--to", "0x40") == [1]
    assert ids("--group", "1", "--state", "write_fenced") == []
    assert "no route matches" in cli("routes", "9", url=url).stdout
    fails(4, "routes", "9", url=url)
    fails(2, "routes", "--from", "b", "--to", "a", url=url)


def test_prune_drops_old_history(database_url: str) -> None:
    url = database_url
    ok("init", url=url)
    for key in ("b", "c", "d"):
        ok("split", str(routes_json(url)["routes"][-1]["route_id"]), key, url=url)
    assert "history kept from version 3" in ok("prune", "--keep", "2", url=url)
    assert [e["version"] for e in json.loads(ok("history", "--json", url=url))] == [3, 4]
    assert "older than the history kept" in fails(1, "routes", "--at", "1", url=url)
    assert routes_json(url)["version"] == 4


# -- import --------------------------------------------------------------------------------------


def _write(path: Path, document: dict[str, Any]) -> str:
    path.write_text(json.dumps(document))
    return str(path)


def test_import_of_nothing_needs_replace_and_dry_run_writes_nothing(
    database_url: str, tmp_path: Path
) -> None:
    url = database_url
    ok("init", "--groups", "2", url=url)
    empty = _write(tmp_path / "empty.json", {"routes": []})
    line = fails(1, "import", empty, url=url)
    assert "would retire 2" in line and "--replace" in line
    plan = ok("import", empty, "--replace", "--dry-run", url=url)
    assert "0 added, 0 changed, 2 retired" in plan and "dry run: nothing written" in plan
    assert routes_json(url)["version"] == 1
    ok("import", empty, "--replace", url=url)
    assert routes_json(url) == {"version": 2, "read_ts": 2, "routes": []}


def test_an_identical_import_writes_nothing(database_url: str, tmp_path: Path) -> None:
    url = database_url
    ok("init", "--groups", "3", url=url)
    path = tmp_path / "catalog.json"
    ok("export", str(path), url=url)
    out = ok("import", str(path), url=url)
    assert "0 added, 0 changed, 0 retired, 3 unchanged" in out
    assert "nothing to import" in out
    assert routes_json(url)["version"] == 1


def test_importing_an_old_export_never_revives_a_retired_id(
    database_url: str, tmp_path: Path
) -> None:
    url = database_url
    ok("init", url=url)
    old = tmp_path / "old.json"
    ok("export", str(old), url=url)  # route 1, next route id 2
    ok("split", "1", "m", url=url)  # retires 1, creates 2 and 3
    out = ok("import", str(old), "--replace", url=url)
    assert "1->4" in out
    routes = routes_json(url)["routes"]
    assert [r["route_id"] for r in routes] == [4]
    exported = json.loads(ok("export", url=url))
    assert exported["next_route_id"] == 5
    # Every id ever issued stays unused: the next split starts at 5.
    assert {r["route_id"] for r in json.loads(ok("split", "4", "q", "--json", url=url))["created"]} == {5, 6}


def test_a_renumbered_route_s_children_name_its_new_id() -> None:
    parent = RouteDescriptor(route_id=2, start=b"", end=b"m", group_id=1)
    child = RouteDescriptor(route_id=9, start=b"m", end=None, group_id=1, parent_route_id=2)
    target = CatalogSnapshot(version=5, routes=(), read_ts=5)  # ids 1..8 issued, all retired
    plan = plan_import(target, 9, _Source([parent, child], None))
    assert plan.renumbered == {2: 10}
    assert [(r.route_id, r.parent_route_id) for r in plan.routes] == [(10, 0), (9, 10)]


def test_a_kv_import_carries_the_source_id_counter(
    database_url: str, other_database_url: str
) -> None:
    route = RouteDescriptor(route_id=3, start=b"", end=None, group_id=1)
    records = [
        {"key": catalog_next_route_id_key().hex(), "value": encode_catalog_next_route_id(40).hex()},
        {"key": catalog_route_key(3).hex(), "value": encode_route_descriptor(route).hex()},
    ]
    kv = "".join(json.dumps(r) + "\n" for r in records)
    out = ok("import", "--format", "kv", "-", input=kv, url=other_database_url)
    assert "next route id 40" in out
    assert json.loads(ok("export", url=other_database_url))["next_route_id"] == 40
    created = json.loads(ok("split", "3", "m", "--json", url=other_database_url))["created"]
    assert {r["route_id"] for r in created} == {40, 41}


def test_a_kv_file_without_format_gets_a_hint(database_url: str) -> None:
    record = {"key": catalog_route_key(3).hex(), "value": "00"}
    line = fails(1, "import", "-", input=json.dumps(record) + "\n" + json.dumps(record) + "\n", url=database_url)
    assert "not valid JSON" in line and "--format kv" in line


def test_a_large_import_says_when_it_writes(database_url: str, tmp_path: Path) -> None:
    count = 10_000
    routes = [
        {
            "route_id": i + 1,
            "start": "" if i == 0 else i.to_bytes(2, "big").hex(),
            "end": None if i == count - 1 else (i + 1).to_bytes(2, "big").hex(),
            "group_id": 1,
        }
        for i in range(count)
    ]
    path = _write(tmp_path / "big.json", {"routes": routes})
    result = cli("import", path, url=database_url)
    assert result.returncode == 0, result.stderr
    assert "import: writing 10,000 routes in one transaction" in result.stderr
    assert "imported 10000 routes" in result.stdout


# -- watch ---------------------------------------------------------------------------------------


def test_watch_keeps_going_when_its_connections_are_killed(database_url: str) -> None:
    ok("init", url=database_url)
    with watching(database_url, "--count", "1", "--timeout", "120") as (watch, _):
        with psycopg.connect(database_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
        assert killed is not None and killed[0] >= 1
        ok("split", "1", "m", "--actor", "after-the-kill", url=database_url)
        out, err = watch.communicate(timeout=120)
    assert watch.returncode == 0, err
    assert out.splitlines()[0] == "version 2: split_route by after-the-kill: 2 upserted, 1 deleted"

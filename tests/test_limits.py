"""The named limits: route bounds of at most MAX_ROUTE_KEY_BYTES and actors of at most
MAX_ACTOR_BYTES bytes of valid UTF-8 without NUL, refused with errors of their own at every entry
point before anything is sent, and the database's own refusals kept apart from unavailability."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_cli import UNREACHABLE_URL, fails, ok, routes_json

from distribution import (
    MAX_ACTOR_BYTES,
    MAX_ROUTE_KEY_BYTES,
    CatalogInvalidActorError,
    CatalogSnapshot,
    CatalogStore,
    CatalogUnavailableError,
    Engine,
    RouteDescriptor,
    RouteKeyTooLongError,
    RouteState,
    catalog_route_key,
    validate_route_descriptor,
)
from distribution.types import check_bound, check_route_bounds

LONGEST = MAX_ROUTE_KEY_BYTES
#: The size of the key the fault run shipped to the server before it was refused.
HUNDRED_MB = 100 * 1024 * 1024


def loose(value: object) -> Any:
    """Pass a deliberately wrong value past the type checker."""
    return value


def random_key(length: int, first: bytes = b"m") -> bytes:
    """Incompressible bytes (the index limit applies after compression), starting at ``first``."""
    return first + os.urandom(length - len(first))


def two_routes(middle: bytes) -> list[RouteDescriptor]:
    return [
        RouteDescriptor(route_id=1, start=b"", end=middle, group_id=1),
        RouteDescriptor(route_id=2, start=middle, end=None, group_id=1),
    ]


# --------------------------------------------------------------------------------------------
# Route bounds: the checks
# --------------------------------------------------------------------------------------------


def test_the_limits_are_within_what_the_database_can_index() -> None:
    # PostgreSQL's B-tree holds index rows of about 2,700 bytes; actors are not indexed.
    assert 0 < MAX_ROUTE_KEY_BYTES <= 2048
    assert 0 < MAX_ACTOR_BYTES <= MAX_ROUTE_KEY_BYTES


@pytest.mark.parametrize("field", ["start", "end"])
def test_a_bound_one_byte_past_the_limit_is_refused(field: str) -> None:
    at_limit = RouteDescriptor(route_id=3, start=b"a" * LONGEST, end=b"b" * LONGEST, group_id=1)
    check_route_bounds([at_limit])
    over = at_limit._replace(**{field: (b"a" if field == "start" else b"b") * (LONGEST + 1)})
    with pytest.raises(RouteKeyTooLongError, match=f"{field} of route 3 is 1,025 bytes") as info:
        check_route_bounds([*two_routes(b"m"), over])
    assert isinstance(info.value, ValueError)
    assert str(LONGEST) in str(info.value).replace(",", "")


def test_a_huge_bound_is_refused_with_a_short_message() -> None:
    with pytest.raises(RouteKeyTooLongError) as info:
        check_route_bounds(two_routes(bytes(HUNDRED_MB)))
    assert len(str(info.value)) < 200


def test_check_bound() -> None:
    assert check_bound("split_key", b"k" * LONGEST) == b"k" * LONGEST
    with pytest.raises(RouteKeyTooLongError, match="split_key is 1,025 bytes long"):
        check_bound("split_key", b"k" * (LONGEST + 1))
    with pytest.raises(TypeError, match="split_key must be bytes"):
        check_bound("split_key", "k")


def test_what_a_catalog_holds_is_mirrored_whatever_its_length() -> None:
    """The limit is on writes: a catalog written before it may hold longer bounds, and every
    Engine (and watcher) must still mirror it."""
    long_bound = b"m" * (4 * LONGEST)
    routes = two_routes(long_bound)
    assert [validate_route_descriptor(route) for route in routes] == routes
    engine = Engine()
    engine.apply_snapshot(CatalogSnapshot(version=1, routes=tuple(routes)))
    route = engine.get_route(long_bound + b"!")
    assert route is not None and route.route_id == 2


# --------------------------------------------------------------------------------------------
# Route bounds and actors: nothing is sent
# --------------------------------------------------------------------------------------------


@pytest.fixture
def unreachable() -> Iterator[CatalogStore]:
    """A store whose server does not answer: any call that sends something is unavailable."""
    with CatalogStore.from_url(UNREACHABLE_URL, connect_args={"connect_timeout": 5}) as store:
        yield store


def test_the_unreachable_store_is_unavailable(unreachable: CatalogStore) -> None:
    with pytest.raises(CatalogUnavailableError):
        unreachable.save(0, two_routes(b"m"))


@pytest.mark.parametrize("field", ["start", "end"])
def test_save_refuses_a_hundred_megabyte_bound_before_connecting(
    unreachable: CatalogStore, field: str
) -> None:
    huge = random_key(HUNDRED_MB)
    routes = two_routes(huge) if field == "start" else [
        RouteDescriptor(route_id=1, start=b"", end=huge, group_id=1)
    ]
    with pytest.raises(RouteKeyTooLongError):
        unreachable.save(0, routes)


def test_types_are_checked_before_lengths(unreachable: CatalogStore) -> None:
    routes = [RouteDescriptor(route_id=1, start=bytes(LONGEST + 1), end=loose("z"), group_id=1)]
    with pytest.raises(TypeError, match="end must be bytes"):
        unreachable.save(0, routes)


def test_split_refuses_a_hundred_megabyte_key_before_connecting(unreachable: CatalogStore) -> None:
    with pytest.raises(RouteKeyTooLongError, match="split_key"):
        unreachable.split_route(1, random_key(HUNDRED_MB), 1)


#: Every write the store offers, with an actor.
WRITES: dict[str, Callable[[CatalogStore, int, str | None], Any]] = {
    "save": lambda s, v, actor: s.save(v, two_routes(b"m"), actor=actor),
    "split_route": lambda s, v, actor: s.split_route(1, b"k", v, actor=actor),
    "merge_routes": lambda s, v, actor: s.merge_routes(1, 2, v, actor=actor),
    "set_route_state": lambda s, v, actor: s.set_route_state(
        1, RouteState.WRITE_FENCED, v, actor=actor
    ),
    "move_route": lambda s, v, actor: s.move_route(1, 2, v, actor=actor),
}

BAD_ACTORS = {
    "NUL": "ops\x00bot",
    "lone surrogate": "ops\udcffbot",
    "one byte too long": "x" * (MAX_ACTOR_BYTES + 1),
    "two-byte characters, too long": "é" * (MAX_ACTOR_BYTES // 2 + 1),
    "10 MB": "x" * 10_000_000,
}


@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("actor", list(BAD_ACTORS))
def test_every_write_refuses_a_bad_actor_before_connecting(
    unreachable: CatalogStore, write: str, actor: str
) -> None:
    with pytest.raises(CatalogInvalidActorError) as info:
        WRITES[write](unreachable, 1, BAD_ACTORS[actor])
    assert isinstance(info.value, ValueError)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("write", list(WRITES))
def test_an_actor_that_is_not_text_is_a_type_error(unreachable: CatalogStore, write: str) -> None:
    with pytest.raises(TypeError, match="actor must be a str"):
        WRITES[write](unreachable, 1, loose(b"ops"))


# --------------------------------------------------------------------------------------------
# Against the database: what the limits let through is stored; what they refuse changes nothing
# --------------------------------------------------------------------------------------------


def test_bounds_at_the_limit_are_stored_and_split_at(store: CatalogStore) -> None:
    middle = random_key(LONGEST, b"m")
    saved = store.save(0, two_routes(middle))
    assert store.snapshot() == saved
    split_key = random_key(LONGEST, b"t")
    result = store.split_route(2, split_key, saved.version)
    assert [(r.start, r.end) for r in result.created] == [(middle, split_key), (split_key, None)]


def test_a_bound_past_the_limit_changes_nothing(store: CatalogStore) -> None:
    saved = store.save(0, two_routes(b"m"))
    history = store.history()
    # Short of the database's own index limit: only the library's limit refuses these.
    over = random_key(LONGEST + 1, b"t")
    with pytest.raises(RouteKeyTooLongError):
        store.save(saved.version, two_routes(over))
    with pytest.raises(RouteKeyTooLongError):
        store.split_route(2, over, saved.version)
    assert store.snapshot() == saved
    assert store.history() == history


@pytest.mark.parametrize("actor", ["NUL", "lone surrogate", "one byte too long"])
def test_a_bad_actor_changes_nothing(store: CatalogStore, actor: str) -> None:
    saved = store.save(0, two_routes(b"m"))
    for write in WRITES.values():
        with pytest.raises(CatalogInvalidActorError):
            write(store, saved.version, BAD_ACTORS[actor])
    assert store.snapshot() == saved
    assert [entry.version for entry in store.history()] == [1]


def test_an_actor_at_the_limit_is_stored_as_given(store: CatalogStore) -> None:
    actor = "é" * (MAX_ACTOR_BYTES // 2)  # two bytes each: exactly the limit
    assert len(actor.encode()) == MAX_ACTOR_BYTES
    version = store.save(0, two_routes(b"m"), actor=actor).version
    store.split_route(1, b"c", version, actor="ops")
    assert [entry.actor for entry in store.history()] == [actor, "ops"]


# --------------------------------------------------------------------------------------------
# The command line: split keys and imports
# --------------------------------------------------------------------------------------------


def test_the_cli_refuses_a_split_key_past_the_limit_before_the_database() -> None:
    line = fails(2, "split", "1", "0x" + bytes(LONGEST + 1).hex(), url=UNREACHABLE_URL)
    assert f"at most {LONGEST:,} bytes" in line


def _json_routes(routes: list[RouteDescriptor]) -> str:
    return json.dumps(
        {
            "routes": [
                {
                    "route_id": r.route_id,
                    "start": r.start.hex(),
                    "end": None if r.end is None else r.end.hex(),
                    "group_id": r.group_id,
                }
                for r in routes
            ]
        }
    )


def _kv_record(route: RouteDescriptor) -> str:
    """The seed's record of ``route``, written by hand: the encoder refuses an over-long bound."""
    end = b"\x00" if route.end is None else b"\x01" + struct.pack(">Q", len(route.end)) + route.end
    value = (
        struct.pack(">BQQBQQ", 1, route.route_id, route.group_id, route.state,
                    route.parent_route_id, len(route.start))
        + route.start
        + end
    )
    return json.dumps({"key": catalog_route_key(route.route_id).hex(), "value": value.hex()})


@pytest.mark.parametrize("dry_run", [False, True], ids=["import", "dry-run"])
@pytest.mark.parametrize("layout", ["json", "kv"])
def test_import_refuses_a_bound_past_the_limit_saying_where(
    database_url: str, tmp_path: Path, layout: str, dry_run: bool
) -> None:
    ok("init", url=database_url)
    routes = two_routes(random_key(LONGEST + 1))
    path = tmp_path / f"catalog.{layout}"
    if layout == "json":
        path.write_text(_json_routes(routes))
        where = "route #1"
    else:
        path.write_text("".join(_kv_record(route) + "\n" for route in routes))
        where = f"{path}:1"
    args = ["import", "--format", layout, str(path), "--replace", *(["--dry-run"] * dry_run)]
    line = fails(1, *args, url=database_url)
    assert where in line and f"at most {LONGEST:,} bytes" in line
    assert routes_json(database_url)["version"] == 1

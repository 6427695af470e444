"""Tests of the PostgreSQL route catalog: ``CatalogStore`` and ``ensure_catalog_snapshot``.

Everything runs against a real PostgreSQL server (see ``conftest.py``): each test gets a fresh,
migrated, empty catalog. Where a claim is about what the database holds ("nothing was written",
"only changed rows were written", "the database refuses"), the test looks at the tables with
raw SQL over a separate psycopg connection that bypasses the library.
"""

from __future__ import annotations

import base64
import datetime
import functools
import gc
import hashlib
import importlib
import json
import logging
import operator
import random
import threading
import tracemalloc
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg.errors
import pytest
import sqlalchemy as sa
from chains import chain, key
from sqlalchemy.engine import make_url

import distribution
from distribution import (
    CatalogChange,
    CatalogChangeSet,
    CatalogDuplicateRouteIDError,
    CatalogGroupIDRequiredError,
    CatalogHead,
    CatalogInvalidRouteRangeError,
    CatalogInvalidRouteStateError,
    CatalogRouteIDOverflowError,
    CatalogRouteIDRequiredError,
    CatalogRouteOverlapError,
    CatalogSnapshot,
    CatalogSnapshotTooOldError,
    CatalogStoreRequiredError,
    CatalogVersionAheadError,
    CatalogVersionMismatchError,
    CatalogVersionOverflowError,
    DistributionError,
    EngineRequiredError,
    RouteDescriptor,
    RouteState,
    decode_route_descriptor,
    encode_route_descriptor,
)
from distribution.catalog import (
    DEFAULT_HISTORY_VERSIONS,
    NOTIFY_CHANNEL,
    CatalogStore,
    ensure_catalog_snapshot,
)
from distribution.codec import routes_digest
from distribution.database import create_engine, translate_error
from distribution.models import u64_to_db

ACTIVE = RouteState.ACTIVE
FENCED = RouteState.WRITE_FENCED
U64_MAX = 2**64 - 1

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def by_start(routes: Sequence[RouteDescriptor]) -> tuple[RouteDescriptor, ...]:
    return tuple(sorted(routes, key=lambda r: r.start))


def replace(
    routes: Sequence[RouteDescriptor], route_id: int, **changes: Any
) -> list[RouteDescriptor]:
    return [r._replace(**changes) if r.route_id == route_id else r for r in routes]


@pytest.fixture
def raw(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A plain psycopg connection (autocommit) that bypasses the library."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


def db_state(raw: psycopg.Connection[Any]) -> tuple[Any, ...]:
    """Everything the catalog holds, with the physical identity (xmin, ctid) of every row."""
    meta = raw.execute(
        "SELECT version, next_route_id, history_floor, xmin::text, ctid::text "
        "FROM distribution_meta"
    ).fetchall()
    routes = raw.execute(
        'SELECT route_id, valid_from, valid_to, start, "end", group_id, state, parent_route_id, '
        "xmin::text, ctid::text FROM distribution_routes ORDER BY route_id, valid_from"
    ).fetchall()
    history = raw.execute(
        "SELECT version, operation, arguments, next_route_id FROM distribution_history "
        "ORDER BY version"
    ).fetchall()
    return meta, routes, history


def scalar(raw: psycopg.Connection[Any], query: str, params: Sequence[Any] = ()) -> Any:
    row = raw.execute(query, params or None).fetchone()
    assert row is not None
    return row[0]


def live_routes(raw: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return raw.execute(
        'SELECT distribution_u64(route_id), start, "end" FROM distribution_routes '
        "WHERE valid_to IS NULL ORDER BY start"
    ).fetchall()


EMPTY = CatalogSnapshot(version=0, routes=(), read_ts=0)
#: A constraint the library knows nothing about: group ids below 100 only.
SMALL_GROUPS = (
    "ALTER TABLE distribution_routes ADD CONSTRAINT test_small_groups "
    f"CHECK (group_id < {u64_to_db(100)})"
)


@pytest.fixture(scope="module")
def shared_url(server_url: str, template_database: str) -> Iterator[str]:
    """One catalog for the tests that must leave it unchanged: ``BASE_ROUTES`` at version 1.

    Each of those tests checks, with raw SQL, that the catalog is exactly as before, so they can
    share a database instead of cloning one each.
    """
    name = f"distribution_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    try:
        with CatalogStore.from_url(url) as store:
            store.save(0, BASE_ROUTES)
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def shared_store(shared_url: str) -> Iterator[CatalogStore]:
    with CatalogStore.from_url(shared_url) as store:
        yield store


@pytest.fixture(scope="module")
def shared_raw(shared_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(shared_url, autocommit=True) as connection:
        yield connection


@pytest.fixture
def engine_class() -> Any:
    """``distribution.Engine``, imported when a test needs it."""
    return importlib.import_module("distribution.engine").Engine


# --------------------------------------------------------------------------------------------
# Construction, from_url, close, context manager
# --------------------------------------------------------------------------------------------


def test_store_requires_an_engine() -> None:
    with pytest.raises(CatalogStoreRequiredError):
        CatalogStore(None)
    assert not issubclass(CatalogStoreRequiredError, ValueError)


def test_store_refuses_a_url_where_an_engine_is_expected() -> None:
    with pytest.raises(TypeError):
        CatalogStore("postgresql://postgres@127.0.0.1/catalog")  # type: ignore[arg-type]


def test_store_is_exported_from_the_package() -> None:
    assert distribution.CatalogStore is CatalogStore  # type: ignore[attr-defined]
    assert distribution.ensure_catalog_snapshot is ensure_catalog_snapshot  # type: ignore[attr-defined]


def test_from_url_uses_psycopg_and_close_disposes_its_engine(database_url: str) -> None:
    store = CatalogStore.from_url(database_url)
    assert store.sa_engine.dialect.driver == "psycopg"
    assert store.snapshot() == EMPTY
    assert store.sa_engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    store.close()
    assert store.sa_engine.pool.checkedin() == 0  # type: ignore[attr-defined]


def test_from_url_accepts_an_explicit_psycopg_url(database_url: str) -> None:
    url = database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    with CatalogStore.from_url(url) as store:
        assert store.version() == 0


def test_from_url_refuses_another_database(tmp_path: Any) -> None:
    with pytest.raises(ValueError):
        CatalogStore.from_url(f"sqlite:///{tmp_path}/catalog.db")


def test_from_url_passes_engine_options(database_url: str) -> None:
    name = "catalog-test-options"
    with (
        CatalogStore.from_url(database_url, connect_args={"application_name": name}) as store,
        store.sa_engine.connect() as connection,
    ):
        assert connection.scalar(sa.text("SELECT current_setting('application_name')")) == name


def test_context_manager_disposes_its_engine(database_url: str) -> None:
    with CatalogStore.from_url(database_url) as store:
        assert store.next_route_id() == 1
        assert store.sa_engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    assert store.sa_engine.pool.checkedin() == 0  # type: ignore[attr-defined]


def test_close_leaves_a_callers_engine_alone(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        with CatalogStore(engine) as store:
            assert store.sa_engine is engine
            assert store.snapshot() == EMPTY
        assert engine.pool.checkedin() == 1  # type: ignore[attr-defined]
        assert CatalogStore(engine).version() == 0
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("read_sa_engine", "message"),
    [
        ("postgresql://postgres@127.0.0.1/catalog", "read_sa_engine must be a SQLAlchemy Engine"),
        (sa.create_engine("sqlite://"), "got sqlite"),
    ],
    ids=["a url", "sqlite"],
)
def test_store_refuses_a_read_engine_it_cannot_use(
    database_url: str, read_sa_engine: Any, message: str
) -> None:
    engine = create_engine(database_url)
    try:
        with pytest.raises(TypeError, match=message):
            CatalogStore(engine, read_sa_engine=read_sa_engine)
    finally:
        engine.dispose()


def test_from_url_refuses_another_database_to_read_from(database_url: str, tmp_path: Any) -> None:
    with pytest.raises(ValueError):
        CatalogStore.from_url(database_url, read_url=f"sqlite:///{tmp_path}/catalog.db")


def test_a_store_without_a_read_engine_reads_from_the_primary(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        for store in (CatalogStore(engine), CatalogStore(engine, read_sa_engine=engine)):
            assert store.reads_from_primary
            assert store.read_sa_engine is store.sa_engine is engine
            assert store.primary is store
    finally:
        engine.dispose()


def test_close_disposes_both_engines_from_url_made(database_url: str) -> None:
    """Reads check connections out of the read engine's pool alone; writes out of the
    primary's; close() empties both."""
    with CatalogStore.from_url(database_url, read_url=database_url) as store:
        assert not store.reads_from_primary
        assert store.read_sa_engine is not store.sa_engine
        primary = store.primary
        assert primary is store.primary and primary.reads_from_primary
        assert primary.sa_engine is primary.read_sa_engine is store.sa_engine
        assert store.snapshot() == EMPTY and store.head() == CatalogHead(0, 0)
        assert (store.version(), store.next_route_id(), store.history()) == (0, 1, [])
        assert store.changes_since(0) == CatalogChangeSet(head=CatalogHead(0, 0))
        assert store.sa_engine.pool.checkedin() == 0  # type: ignore[attr-defined]
        assert store.read_sa_engine.pool.checkedin() == 1  # type: ignore[attr-defined]
        store.save(0, chain(3))
        assert store.sa_engine.pool.checkedin() == 1  # type: ignore[attr-defined]
        primary.close()  # a no-op: the store's engines stay
        assert store.sa_engine.pool.checkedin() == 1  # type: ignore[attr-defined]
        assert primary.snapshot().routes == store.snapshot().routes == tuple(chain(3))
    assert store.sa_engine.pool.checkedin() == 0  # type: ignore[attr-defined]
    assert store.read_sa_engine.pool.checkedin() == 0  # type: ignore[attr-defined]


def test_close_leaves_a_callers_read_engine_alone(database_url: str) -> None:
    engine, read_engine = create_engine(database_url), create_engine(database_url)
    try:
        with CatalogStore(engine, read_sa_engine=read_engine) as store:
            assert store.read_sa_engine is read_engine
            assert store.snapshot() == EMPTY
        assert read_engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    finally:
        engine.dispose()
        read_engine.dispose()


# --------------------------------------------------------------------------------------------
# The empty catalog
# --------------------------------------------------------------------------------------------


def test_empty_catalog(store: CatalogStore) -> None:
    snapshot = store.snapshot()
    assert snapshot == EMPTY
    assert (snapshot.version, snapshot.routes, snapshot.read_ts) == (0, (), 0)
    assert store.version() == 0
    assert store.next_route_id() == 1
    assert store.next_route_id_at(0) == 1
    assert store.snapshot_at(0) == EMPTY
    assert store.changes_since(0) == CatalogChangeSet(changes=(), reset=None, head=CatalogHead(0, 0))
    assert store.history() == []


# --------------------------------------------------------------------------------------------
# save: validation, then the version check
# --------------------------------------------------------------------------------------------

INVALID_CATALOGS = [
    pytest.param(
        [RouteDescriptor(route_id=0, start=b"", end=None, group_id=1)],
        CatalogRouteIDRequiredError,
        id="route-id-0",
    ),
    pytest.param(
        [RouteDescriptor(route_id=1, start=b"", end=None, group_id=0)],
        CatalogGroupIDRequiredError,
        id="group-0",
    ),
    pytest.param(
        [RouteDescriptor(route_id=1, start=b"", end=None, group_id=1, state=4)],  # type: ignore[arg-type]
        CatalogInvalidRouteStateError,
        id="state-4",
    ),
    pytest.param(
        [RouteDescriptor(route_id=1, start=b"b", end=b"b", group_id=1)],
        CatalogInvalidRouteRangeError,
        id="start-equals-end",
    ),
    pytest.param(
        [RouteDescriptor(route_id=1, start=b"b", end=b"a", group_id=1)],
        CatalogInvalidRouteRangeError,
        id="start-after-end",
    ),
    pytest.param(
        [RouteDescriptor(route_id=1, start=b"", end=b"", group_id=1)],
        CatalogInvalidRouteRangeError,
        id="empty-end-is-not-unbounded",
    ),
    pytest.param(
        [
            RouteDescriptor(route_id=1, start=b"", end=b"m", group_id=1),
            RouteDescriptor(route_id=1, start=b"m", end=None, group_id=1),
        ],
        CatalogDuplicateRouteIDError,
        id="duplicate-ids",
    ),
    pytest.param(
        [
            RouteDescriptor(route_id=1, start=b"", end=b"n", group_id=1),
            RouteDescriptor(route_id=2, start=b"m", end=None, group_id=1),
        ],
        CatalogRouteOverlapError,
        id="overlap",
    ),
    pytest.param(
        [
            RouteDescriptor(route_id=2, start=b"m", end=None, group_id=1),
            RouteDescriptor(route_id=1, start=b"a", end=b"z", group_id=1),
        ],
        CatalogRouteOverlapError,
        id="overlap-given-unsorted",
    ),
    pytest.param(
        [
            RouteDescriptor(route_id=1, start=b"a", end=b"z", group_id=1),
            RouteDescriptor(route_id=2, start=b"c", end=b"d", group_id=1),
        ],
        CatalogRouteOverlapError,
        id="contained",
    ),
    pytest.param(
        [
            RouteDescriptor(route_id=1, start=b"m", end=b"n", group_id=1),
            RouteDescriptor(route_id=2, start=b"m", end=b"p", group_id=1),
        ],
        CatalogRouteOverlapError,
        id="equal-starts",
    ),
    pytest.param(
        [
            RouteDescriptor(route_id=1, start=b"m", end=b"n", group_id=1),
            RouteDescriptor(route_id=2, start=b"m", end=b"n", group_id=1),
        ],
        CatalogRouteOverlapError,
        id="identical-ranges",
    ),
    pytest.param(
        [
            RouteDescriptor(route_id=1, start=b"a", end=None, group_id=1),
            RouteDescriptor(route_id=2, start=b"x", end=b"y", group_id=1),
        ],
        CatalogRouteOverlapError,
        id="unbounded-followed-by-another",
    ),
    pytest.param(
        [
            RouteDescriptor(route_id=1, start=b"a", end=None, group_id=1),
            RouteDescriptor(route_id=2, start=b"x", end=None, group_id=1),
        ],
        CatalogRouteOverlapError,
        id="two-unbounded",
    ),
    pytest.param(
        [
            RouteDescriptor(route_id=1, start=b"\x00", end=b"\x80", group_id=1),
            RouteDescriptor(route_id=2, start=b"\x7f", end=None, group_id=1),
        ],
        CatalogRouteOverlapError,
        id="raw-byte-order",
    ),
]


@pytest.mark.parametrize(("routes", "error"), INVALID_CATALOGS)
@pytest.mark.parametrize("expected_version", [1, 7], ids=["right-version", "wrong-version"])
def test_invalid_catalogs_are_refused_before_the_version_check(
    shared_store: CatalogStore,
    shared_raw: psycopg.Connection[Any],
    routes: list[RouteDescriptor],
    error: type[Exception],
    expected_version: int,
) -> None:
    before = db_state(shared_raw)
    with pytest.raises(error):
        shared_store.save(expected_version, routes)
    assert isinstance(error(), ValueError)
    assert db_state(shared_raw) == before
    assert shared_store.snapshot().routes == tuple(BASE_ROUTES)


def test_validation_runs_route_by_route_before_ids_and_overlaps(store: CatalogStore) -> None:
    bad_group = RouteDescriptor(route_id=3, start=b"z", end=None, group_id=0)
    duplicate = [
        RouteDescriptor(route_id=1, start=b"a", end=b"c", group_id=1),
        RouteDescriptor(route_id=1, start=b"b", end=b"d", group_id=1),
    ]
    # Each descriptor is checked first, then the ids, then the overlaps.
    with pytest.raises(CatalogGroupIDRequiredError):
        store.save(0, [*duplicate, bad_group])
    with pytest.raises(CatalogDuplicateRouteIDError):
        store.save(0, duplicate)
    # Within a descriptor, the spec's order: id, group, state, range.
    with pytest.raises(CatalogRouteIDRequiredError):
        store.save(0, [RouteDescriptor(route_id=0, start=b"b", end=b"a", group_id=0, state=9)])  # type: ignore[arg-type]
    with pytest.raises(CatalogGroupIDRequiredError):
        store.save(0, [RouteDescriptor(route_id=1, start=b"b", end=b"a", group_id=0, state=9)])  # type: ignore[arg-type]
    with pytest.raises(CatalogInvalidRouteStateError):
        store.save(0, [RouteDescriptor(route_id=1, start=b"b", end=b"a", group_id=1, state=9)])  # type: ignore[arg-type]
    assert store.snapshot() == EMPTY


def test_touching_routes_and_gaps_are_allowed(store: CatalogStore) -> None:
    routes = [
        RouteDescriptor(route_id=1, start=b"a", end=b"c", group_id=1),
        RouteDescriptor(route_id=2, start=b"c", end=b"d", group_id=2),
        RouteDescriptor(route_id=3, start=b"x", end=None, group_id=3),
    ]
    assert store.save(0, routes).routes == tuple(routes)


def test_version_mismatch_writes_nothing(store: CatalogStore, raw: psycopg.Connection[Any]) -> None:
    first = store.save(0, chain(3))
    before = db_state(raw)
    for expected in (0, 2, 5, U64_MAX):
        with pytest.raises(CatalogVersionMismatchError):
            store.save(expected, chain(4, group=2))
    assert db_state(raw) == before
    assert store.snapshot() == first
    assert not issubclass(CatalogVersionMismatchError, ValueError)


def test_version_mismatch_on_an_empty_catalog(
    store: CatalogStore, raw: psycopg.Connection[Any]
) -> None:
    before = db_state(raw)
    with pytest.raises(CatalogVersionMismatchError):
        store.save(1, chain(2))
    assert db_state(raw) == before


def test_version_overflow(
    store: CatalogStore, raw: psycopg.Connection[Any], unguarded: Callable[..., None]
) -> None:
    unguarded("UPDATE distribution_meta SET version = 9223372036854775807")
    assert store.version() == U64_MAX
    before = db_state(raw)
    with pytest.raises(CatalogVersionOverflowError):
        store.save(U64_MAX, chain(2))
    with pytest.raises(CatalogVersionMismatchError):
        store.save(U64_MAX - 1, chain(2))
    with pytest.raises(CatalogVersionMismatchError):
        store.save(0, chain(2))
    assert db_state(raw) == before
    assert not issubclass(CatalogVersionOverflowError, ValueError)


def test_the_last_version_can_be_written(
    store: CatalogStore, unguarded: Callable[..., None]
) -> None:
    unguarded("UPDATE distribution_meta SET version = %s", [u64_to_db(U64_MAX - 1)])
    saved = store.save(U64_MAX - 1, chain(2))
    assert (saved.version, saved.read_ts) == (U64_MAX, U64_MAX)
    assert store.snapshot() == saved
    with pytest.raises(CatalogVersionOverflowError):
        store.save(U64_MAX, chain(2))


# --------------------------------------------------------------------------------------------
# save: what it returns and what it writes
# --------------------------------------------------------------------------------------------


def test_save_returns_and_stores_the_routes_sorted(store: CatalogStore) -> None:
    routes = [
        RouteDescriptor(route_id=5, start=b"\xff", end=None, group_id=2, parent_route_id=9),
        RouteDescriptor(route_id=2, start=b"", end=b"\x01", group_id=1, state=FENCED),
        RouteDescriptor(route_id=9, start=b"\x80", end=b"\xff", group_id=3),
        RouteDescriptor(route_id=1, start=b"\x01", end=b"\x7f", group_id=4),
    ]
    expected = by_start(routes)
    saved = store.save(0, routes)
    assert saved == CatalogSnapshot(version=1, routes=expected, read_ts=1)
    assert store.snapshot() == saved
    assert all(type(r.state) is RouteState for r in store.snapshot().routes)


def test_save_accepts_any_iterable_and_int_states(store: CatalogStore) -> None:
    routes = (r._replace(state=int(FENCED)) for r in chain(3))
    saved = store.save(0, routes)
    assert [r.state for r in saved.routes] == [FENCED] * 3
    assert all(type(r.state) is RouteState for r in saved.routes)
    assert store.snapshot().routes == saved.routes


def test_each_save_moves_the_version_by_exactly_one(store: CatalogStore) -> None:
    previous = store.snapshot()
    for step in range(1, 8):
        saved = store.save(previous.version, chain(step, group=step))
        assert saved.version == previous.version + 1 == step
        assert saved.read_ts == saved.version
        current = store.snapshot()
        assert current == saved
        assert current.read_ts >= previous.read_ts
        assert store.version() == step
        previous = current


def test_a_save_of_nothing_new_still_moves_the_version(
    store: CatalogStore, raw: psycopg.Connection[Any]
) -> None:
    store.save(0, chain(3))
    before_rows = db_state(raw)[1]
    saved = store.save(1, chain(3))
    assert saved.version == 2
    assert db_state(raw)[1] == before_rows
    assert store.history()[-1].arguments == {"routes": 3, "opened": 0, "retired": 0}


def test_read_ts_never_decreases(store: CatalogStore) -> None:
    seen = [store.snapshot().read_ts]
    for group in range(1, 5):
        store.save(store.version(), chain(2, group=group))
        seen.append(store.snapshot().read_ts)
        seen.append(store.snapshot().read_ts)
    assert seen == sorted(seen)
    assert seen[0] == 0
    assert all(ts > 0 for ts in seen[1:])


def test_an_emptied_catalog_keeps_its_version(store: CatalogStore) -> None:
    store.save(0, chain(3))
    saved = store.save(1, [])
    assert saved == CatalogSnapshot(version=2, routes=(), read_ts=2)
    assert store.snapshot() == saved
    assert store.next_route_id() == 4


def test_next_route_id_never_goes_down(store: CatalogStore) -> None:
    store.save(0, chain(5))
    assert store.next_route_id() == 6
    store.save(1, chain(2))
    assert store.next_route_id() == 6
    store.save(2, [])
    assert store.next_route_id() == 6
    assert [store.next_route_id_at(v) for v in (0, 1, 2, 3)] == [1, 6, 6, 6]
    store.save(3, [RouteDescriptor(route_id=40, start=b"", end=None, group_id=1)])
    assert store.next_route_id() == 41
    store.save(4, [RouteDescriptor(route_id=1, start=b"", end=None, group_id=1)])
    assert store.next_route_id() == 41


def test_ids_of_retired_routes_are_never_reused(store: CatalogStore) -> None:
    store.save(0, chain(5))
    kept = store.save(1, chain(2))
    assert [r.route_id for r in kept.routes] == [1, 2]
    result = store.split_route(2, b"z", kept.version)
    assert sorted(r.route_id for r in result.created) == [6, 7]
    assert store.next_route_id() == 8


def test_the_counter_covers_the_old_routes_even_if_it_was_lowered(
    store: CatalogStore, unguarded: Callable[..., None]
) -> None:
    store.save(0, [RouteDescriptor(route_id=10, start=b"", end=None, group_id=1)])
    unguarded("UPDATE distribution_meta SET next_route_id = %s", [u64_to_db(2)])
    store.save(1, [RouteDescriptor(route_id=1, start=b"", end=None, group_id=1)])
    assert store.next_route_id() == 11


def test_only_changed_rows_are_written(store: CatalogStore, raw: psycopg.Connection[Any]) -> None:
    routes = chain(1000)
    store.save(0, routes)
    identity = "SELECT route_id, valid_from, xmin::text, ctid::text FROM distribution_routes"
    before = {(r[0], r[1]): r[2:] for r in raw.execute(identity).fetchall()}
    assert len(before) == 1000

    changed = replace(routes, 500, group_id=2)
    saved = store.save(1, changed)
    v = u64_to_db(saved.version)
    assert saved.version == 2
    assert scalar(raw, "SELECT count(*) FROM distribution_routes WHERE valid_from = %s", [v]) == 1
    assert scalar(raw, "SELECT count(*) FROM distribution_routes WHERE valid_to = %s", [v]) == 1
    assert scalar(raw, "SELECT count(*) FROM distribution_routes") == 1001
    opened = raw.execute(
        "SELECT distribution_u64(route_id), distribution_u64(group_id) FROM distribution_routes "
        "WHERE valid_from = %s",
        [v],
    ).fetchall()
    assert opened == [(500, 2)]
    closed = scalar(
        raw, "SELECT distribution_u64(route_id) FROM distribution_routes WHERE valid_to = %s", [v]
    )
    assert closed == 500
    after = {(r[0], r[1]): r[2:] for r in raw.execute(identity).fetchall()}
    untouched = {k: ident for k, ident in before.items() if k != (u64_to_db(500), u64_to_db(1))}
    assert len(untouched) == 999
    assert {k: after[k] for k in untouched} == untouched
    assert after[(u64_to_db(500), u64_to_db(1))] != before[(u64_to_db(500), u64_to_db(1))]
    assert store.history()[-1].arguments == {"routes": 1000, "opened": 1, "retired": 1}

    # The same list again touches no row at all.
    store.save(2, changed)
    assert {(r[0], r[1]): r[2:] for r in raw.execute(identity).fetchall()} == after


def test_retired_routes_keep_their_history(
    store: CatalogStore, raw: psycopg.Connection[Any]
) -> None:
    store.save(0, chain(3))
    store.save(1, chain(1))
    rows = raw.execute(
        "SELECT distribution_u64(route_id), distribution_u64(valid_from), "
        "distribution_u64(valid_to) FROM distribution_routes ORDER BY route_id"
    ).fetchall()
    assert rows == [(1, 1, 2), (1, 2, None), (2, 1, 2), (3, 1, 2)]


# --------------------------------------------------------------------------------------------
# Saves that send only the change, and the digest that guards them
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 2**63 - 1, 2**63, 2**64 - 2])
def test_u64_values_keep_their_whole_range(store: CatalogStore, value: int) -> None:
    routes = [
        RouteDescriptor(route_id=value, start=b"", end=b"m", group_id=value, parent_route_id=value),
        RouteDescriptor(
            route_id=value + 1 if value < 2**64 - 2 else 3,
            start=b"m",
            end=None,
            group_id=U64_MAX,
            parent_route_id=U64_MAX,
        ),
    ]
    saved = store.save(0, routes)
    assert saved.routes == tuple(routes)
    assert store.snapshot().routes == tuple(routes)
    assert store.snapshot_at(1).routes == tuple(routes)
    assert store.changes_since(0).changes[0].upserts == tuple(routes)
    store.save(1, routes)
    store.prune_history(keep_versions=1)
    reset = store.changes_since(0).reset
    assert reset is not None and reset.routes == tuple(routes)


CATALOG_LOGGER = "distribution.catalog"


def route_hash(route: RouteDescriptor) -> int:
    """The digest's hash of one route, computed independently of the SQL: the first 8 bytes of
    the MD5 of its seed record, as a signed 64-bit integer."""
    digest = hashlib.md5(encode_route_descriptor(route)).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def expected_digest(routes: Sequence[RouteDescriptor]) -> int:
    return functools.reduce(operator.xor, map(route_hash, routes), 0)


def save_paths(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Which path each save took, from the store's debug log: 'change' or 'all'."""
    return [
        "all" if "sent all" in record.getMessage() else "change"
        for record in caplog.records
        if record.name == CATALOG_LOGGER
        and record.getMessage().startswith("save from")
        and ": sent " in record.getMessage()
    ]


READ_FIRST = "reading the live routes first"


def test_the_digest_follows_every_kind_of_write(
    store: CatalogStore, raw: psycopg.Connection[Any]
) -> None:
    def check() -> None:
        routes = store.snapshot().routes
        assert scalar(raw, "SELECT digest FROM distribution_meta") == expected_digest(routes)

    check()  # empty: 0
    version = store.save(0, chain(20)).version
    check()
    version = store.save(version, replace(chain(20), 7, group_id=3)).version
    check()
    split = store.split_route(3, key(2) + b"m", version)  # route 3 is [key(2), key(3))
    check()
    merged = store.merge_routes(split.created[0].route_id, split.created[1].route_id, split.version)
    check()
    version = store.set_route_state(5, FENCED, merged.version).version
    version = store.move_route(5, 4, version).version
    check()
    version = store.save(version, chain(4, first_id=100)).version  # every route replaced
    check()
    store.save(version, [])
    check()
    assert scalar(raw, "SELECT digest FROM distribution_meta") == 0


def test_a_save_from_the_version_read_sends_only_the_change(
    store: CatalogStore, raw: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=CATALOG_LOGGER)
    store.save(0, chain(1000))
    snapshot = store.snapshot()
    routes = list(snapshot.routes)
    routes[500] = routes[500]._replace(group_id=2)
    del routes[999]
    routes[998] = routes[998]._replace(end=None)
    routes.append(RouteDescriptor(route_id=5000, start=b"\xff", end=None, group_id=3))
    routes[998] = routes[998]._replace(end=b"\xff")
    saved = store.save(snapshot.version, routes)
    assert save_paths(caplog) == ["all", "change"]
    assert "sent 3 new or changed and 1 retired of 1000 routes" in caplog.text
    v = u64_to_db(saved.version)
    ids = "SELECT distribution_u64(route_id)::bigint FROM distribution_routes WHERE {} = %s"
    opened = raw.execute(ids.format("valid_from") + " ORDER BY 1", [v]).fetchall()
    closed = raw.execute(ids.format("valid_to") + " ORDER BY 1", [v]).fetchall()
    assert opened == [(501,), (999,), (5000,)]
    assert closed == [(501,), (999,), (1000,)]
    assert saved.routes == by_start(routes)
    assert store.snapshot().routes == by_start(routes)
    assert store.history()[-1].arguments == {"routes": 1000, "opened": 3, "retired": 3}
    assert store.next_route_id() == 5001


def test_equal_descriptors_are_no_change(
    store: CatalogStore, raw: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=CATALOG_LOGGER)
    version = store.save(0, chain(50)).version
    rows = "SELECT count(*) FROM distribution_routes"
    saved = store.save(version, list(reversed(chain(50))))  # equal, not identical, unsorted
    assert save_paths(caplog) == ["all", "change"]
    assert "sent 0 new or changed and 0 retired of 50 routes" in caplog.text
    assert scalar(raw, rows) == 50
    assert saved.version == version + 1
    assert saved.routes == tuple(chain(50))


@pytest.mark.parametrize("fresh_store", [False, True], ids=["same-store", "fresh-store"])
@pytest.mark.parametrize("regroup", [1, 60], ids=["few-changes", "many-changes"])
def test_every_path_writes_the_catalog_it_is_given(
    database_url: str,
    raw: psycopg.Connection[Any],
    caplog: pytest.LogCaptureFixture,
    fresh_store: bool,
    regroup: int,
) -> None:
    """Random splits, merges and regroupings, saved through the store that wrote the last
    version or through a fresh one (which reads the catalog first); with few changes only they
    travel, with many (over an eighth of the routes) every route does."""
    caplog.set_level(logging.DEBUG, logger=CATALOG_LOGGER)
    rng = random.Random(7)
    routes = chain(300)
    next_id = 1000
    with CatalogStore.from_url(database_url) as kept:
        version = kept.save(0, routes).version
        for _ in range(20):
            i = rng.randrange(1, len(routes) - 2)
            left, right = routes[i], routes[i + 1]
            routes[i : i + 2] = [RouteDescriptor(next_id, left.start, right.end, left.group_id)]
            while True:
                j = rng.randrange(len(routes) - 1)
                route = routes[j]
                middle = route.start + bytes([rng.randrange(1, 256)])
                if route.end is None or middle < route.end:
                    break
            routes[j : j + 1] = [
                route._replace(route_id=next_id + 1, end=middle),
                route._replace(route_id=next_id + 2, start=middle),
            ]
            for k in rng.sample(range(len(routes)), regroup):
                routes[k] = routes[k]._replace(group_id=routes[k].group_id % 8 + 1)
            next_id += 3
            if fresh_store:
                with CatalogStore.from_url(database_url) as fresh:
                    version = fresh.save(version, routes).version
            else:
                version = kept.save(version, routes).version
            assert live_routes(raw) == [(r.route_id, r.start, r.end) for r in routes]
            assert kept.snapshot().routes == tuple(routes)
        assert scalar(raw, "SELECT digest FROM distribution_meta") == expected_digest(routes)
    # The first save loads 300 routes: every one travels. Then the path the changes' size says.
    assert save_paths(caplog) == ["all"] + ["change" if regroup == 1 else "all"] * 20


@pytest.mark.parametrize("fresh_store", [False, True], ids=["same-store", "fresh-store"])
def test_a_change_given_in_any_order(
    database_url: str, raw: psycopg.Connection[Any], fresh_store: bool
) -> None:
    with CatalogStore.from_url(database_url) as store:
        version = store.save(0, chain(50)).version
        # Reversed: the unbounded route comes first; it changes, and so does another.
        wanted = replace(replace(chain(50), 50, group_id=7), 11, group_id=8)
        if fresh_store:
            with CatalogStore.from_url(database_url) as fresh:
                saved = fresh.save(version, list(reversed(wanted)))
        else:
            saved = store.save(version, list(reversed(wanted)))
        assert saved.routes == tuple(wanted)
        assert store.snapshot().routes == tuple(wanted)
        assert scalar(raw, "SELECT count(*) FROM distribution_routes") == 52


@pytest.mark.parametrize(
    "behind_the_store",
    [
        "UPDATE distribution_routes SET group_id = group_id + 1 "
        "WHERE route_id = %s AND valid_to IS NULL",
        "DELETE FROM distribution_routes WHERE route_id = %s",
        "TRUNCATE distribution_routes",
    ],
    ids=["update", "delete", "truncate"],
)
def test_routes_changed_behind_the_store_are_caught_by_the_digest(
    store: CatalogStore,
    raw: psycopg.Connection[Any],
    caplog: pytest.LogCaptureFixture,
    unguarded: Callable[..., None],
    behind_the_store: str,
) -> None:
    """A restore from another backup, say: the database refuses such writes from anyone but an
    owner who turns its guards off."""
    caplog.set_level(logging.DEBUG, logger=CATALOG_LOGGER)
    held = store.save(0, chain(10))  # held: the store compares with what it wrote
    params = [u64_to_db(5)] if "%s" in behind_the_store else []
    unguarded(behind_the_store, params)
    wanted = replace(chain(10), 7, group_id=2)
    saved = store.save(held.version, wanted)
    assert save_paths(caplog) == ["all", "all"]
    assert store.snapshot().routes == saved.routes == tuple(wanted)
    assert scalar(raw, "SELECT digest FROM distribution_meta") == expected_digest(wanted)


def test_a_catalog_changed_behind_the_store_is_saved_whole(
    store: CatalogStore,
    raw: psycopg.Connection[Any],
    caplog: pytest.LogCaptureFixture,
    unguarded: Callable[..., None],
) -> None:
    """A catalog at the known version but holding other routes (restored from a backup, or
    rebuilt, since the store read it) gets every route: the change alone would keep the
    stranger's routes."""
    caplog.set_level(logging.DEBUG, logger=CATALOG_LOGGER)
    held = store.save(0, chain(100))  # held: the store compares with what it wrote
    # An owner rewrites route 5 in place, keeping the version (the guards off): no library write
    # does that.
    unguarded(
        "UPDATE distribution_routes SET group_id = %s WHERE route_id = %s AND valid_to IS NULL",
        [u64_to_db(9), u64_to_db(5)],
    )
    wanted = replace(chain(100), 7, group_id=2)
    saved = store.save(held.version, wanted)
    assert save_paths(caplog) == ["all", "all"]
    assert "holds other routes than this store read" in caplog.text
    assert store.snapshot().routes == saved.routes == tuple(wanted)
    assert scalar(raw, "SELECT digest FROM distribution_meta") == expected_digest(wanted)


def test_a_save_from_a_held_snapshot_reads_nothing_first(
    store: CatalogStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A writer that holds the snapshot it saves from (read or written) sends the change alone;
    once it drops it, a save reads the live routes first, and still sends the change alone."""
    caplog.set_level(logging.DEBUG, logger=CATALOG_LOGGER)
    store.save(0, chain(1000))  # dropped at once
    snapshot = store.snapshot()
    caplog.clear()
    saved = store.save(snapshot.version, replace(snapshot.routes, 7, group_id=2))
    again = store.save(saved.version, replace(saved.routes, 8, group_id=2))
    assert READ_FIRST not in caplog.text
    assert save_paths(caplog) == ["change", "change"]
    version = again.version
    del snapshot, saved, again
    gc.collect()
    caplog.clear()
    routes = replace(chain(1000), 9, group_id=2)
    assert store.save(version, routes).routes == by_start(routes)
    assert READ_FIRST in caplog.text
    assert save_paths(caplog) == ["change"]
    assert "sent 3 new or changed and 0 retired of 1000 routes" in caplog.text


def test_a_store_keeps_no_copy_of_a_snapshot_its_caller_dropped(
    store: CatalogStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A service that only reads (it builds its Engine from a snapshot and drops it) holds no
    second copy of the routes in its store; a writer holding its snapshot still saves the
    change alone."""
    caplog.set_level(logging.DEBUG, logger=CATALOG_LOGGER)
    store.save(0, chain(100_000))
    gc.collect()
    caplog.clear()
    tracemalloc.start()
    try:
        snapshot = store.snapshot()
        routes = replace(snapshot.routes, 70_000, group_id=2)
        saved = store.save(snapshot.version, routes)
        held = tracemalloc.get_traced_memory()[0]
        del snapshot, routes, saved
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert READ_FIRST not in caplog.text
    assert "sent 1 new or changed and 0 retired of 100000 routes" in caplog.text
    assert held > 10_000_000, f"{held:,} bytes"  # the 100,000 routes: the measure sees them
    assert kept < 1_000_000, f"the store keeps {kept:,} bytes"


def replace_at(routes: list[RouteDescriptor], index: int, **changes: Any) -> list[Any]:
    return [*routes[:index], routes[index]._replace(**changes), *routes[index + 1 :]]


# Index 9 of chain(100) is route 10, [key(9), key(10)).
CHANGE_PATH_ERRORS = [
    ("overlap", lambda r: replace_at(r, 9, end=key(12)), CatalogRouteOverlapError),
    ("shared start", lambda r: replace_at(r, 9, start=key(8)), CatalogRouteOverlapError),
    ("duplicate id", lambda r: replace_at(r, 9, route_id=11), CatalogDuplicateRouteIDError),
    ("group 0", lambda r: replace_at(r, 9, group_id=0), CatalogGroupIDRequiredError),
    ("empty range", lambda r: replace_at(r, 9, end=key(9)), CatalogInvalidRouteRangeError),
    ("max id", lambda r: replace_at(r, 9, route_id=U64_MAX), CatalogRouteIDOverflowError),
    ("unbounded in the middle", lambda r: replace_at(r, 9, end=None), CatalogRouteOverlapError),
    ("a str start", lambda r: replace_at(r, 9, start="k000009"), TypeError),
    ("not a descriptor", lambda r: [*r[:-1], tuple(r[-1])], TypeError),
    # Equal to the stored route, but not of the contract's types.
    ("a float id", lambda r: replace_at(r, 9, route_id=10.0), TypeError),
    ("a bool group", lambda r: replace_at(r, 9, group_id=True), TypeError),
    ("a bytearray start", lambda r: replace_at(r, 9, start=bytearray(key(9))), TypeError),
    ("a memoryview end", lambda r: replace_at(r, 9, end=memoryview(key(10))), TypeError),
    ("a bool state", lambda r: replace_at(r, 9, state=False), TypeError),
    ("a float parent", lambda r: replace_at(r, 9, parent_route_id=0.0), TypeError),
]


@pytest.mark.parametrize(
    ("change", "error"),
    [case[1:] for case in CHANGE_PATH_ERRORS],
    ids=[case[0] for case in CHANGE_PATH_ERRORS],
)
def test_bad_changes_get_the_full_checks_and_write_nothing(
    store: CatalogStore,
    raw: psycopg.Connection[Any],
    change: Callable[[list[RouteDescriptor]], list[Any]],
    error: type[Exception],
) -> None:
    version = store.save(0, chain(100)).version
    before = db_state(raw)
    with pytest.raises(error):
        store.save(version, change(chain(100)))
    assert db_state(raw) == before
    assert store.snapshot().routes == tuple(chain(100))


# --------------------------------------------------------------------------------------------
# Past versions: snapshot_at, next_route_id_at, changes_since, prune_history, history
# --------------------------------------------------------------------------------------------


def _build_history(store: CatalogStore) -> tuple[dict[int, CatalogSnapshot], dict[int, int]]:
    """Seven versions of assorted changes; returns what each save returned, and the counters."""
    snapshots = {0: store.snapshot()}
    counters = {0: store.next_route_id()}

    def save(routes: Sequence[RouteDescriptor], actor: str | None = None) -> None:
        current = max(snapshots)
        saved = store.save(current, routes, actor=actor)
        assert saved.version == current + 1
        snapshots[saved.version] = saved
        counters[saved.version] = store.next_route_id()

    v1 = chain(5)
    save(v1, actor="alice")  # 1: five routes
    v2 = replace(v1, 3, group_id=7)
    save(v2)  # 2: a group change
    v3 = replace([r for r in v2 if r.route_id != 5], 4, end=None)
    save(v3, actor="bob")  # 3: a route retired, its neighbour extended
    v4 = [r for r in v3 if r.route_id != 2] + [
        RouteDescriptor(route_id=6, start=key(1), end=b"k0000015", group_id=1, parent_route_id=2),
        RouteDescriptor(route_id=7, start=b"k0000015", end=key(2), group_id=1, parent_route_id=2),
    ]
    save(v4)  # 4: a split by hand
    save(replace(v4, 1, state=FENCED))  # 5: a state change
    save([])  # 6: everything retired
    save(chain(2, first_id=8, group=3))  # 7: a fresh catalog
    return snapshots, counters


def test_snapshot_at_answers_exactly_for_every_past_version(store: CatalogStore) -> None:
    snapshots, counters = _build_history(store)
    for version, snapshot in snapshots.items():
        assert store.snapshot_at(version) == CatalogSnapshot(
            version=version, routes=snapshot.routes, read_ts=version
        )
        assert store.next_route_id_at(version) == counters[version]
    assert counters == {0: 1, 1: 6, 2: 6, 3: 6, 4: 8, 5: 8, 6: 8, 7: 10}
    assert store.snapshot() == snapshots[7]


def test_version_ahead(store: CatalogStore) -> None:
    with pytest.raises(CatalogVersionAheadError):
        store.snapshot_at(1)
    store.save(0, chain(2))
    for read in (store.snapshot_at, store.next_route_id_at, store.changes_since):
        with pytest.raises(CatalogVersionAheadError):
            read(2)
        with pytest.raises(CatalogVersionAheadError):
            read(U64_MAX)
    assert not issubclass(CatalogVersionAheadError, ValueError)


def _apply(routes: Sequence[RouteDescriptor], change: CatalogChange) -> tuple[RouteDescriptor, ...]:
    table = {r.route_id: r for r in routes}
    for route_id in change.deletes:
        del table[route_id]
    for route in change.upserts:
        table[route.route_id] = route
    return by_start(list(table.values()))


def test_changes_since_replays_every_version(store: CatalogStore) -> None:
    snapshots, _ = _build_history(store)
    result = store.changes_since(0)
    assert result.reset is None
    assert [(c.previous_version, c.version) for c in result.changes] == [
        (v - 1, v) for v in range(1, 8)
    ]
    routes: tuple[RouteDescriptor, ...] = ()
    for change in result.changes:
        routes = _apply(routes, change)
        assert routes == snapshots[change.version].routes
    for start in range(8):
        assert store.changes_since(start).changes == result.changes[start:]


def test_changes_carry_upserts_and_deletes(store: CatalogStore) -> None:
    snapshots, _ = _build_history(store)
    changes = {c.version: c for c in store.changes_since(0).changes}
    assert set(changes[1].upserts) == set(snapshots[1].routes)
    assert changes[1].deletes == ()
    # A changed route is an upsert under the same id, never a delete.
    assert changes[2].upserts == (snapshots[2].routes[2],)
    assert changes[2].upserts[0].route_id == 3
    assert changes[2].deletes == ()
    assert [r.route_id for r in changes[3].upserts] == [4]
    assert changes[3].upserts[0].end is None
    assert changes[3].deletes == (5,)
    assert sorted(r.route_id for r in changes[4].upserts) == [6, 7]
    assert changes[4].deletes == (2,)
    assert changes[5].upserts == (snapshots[5].routes[0],)
    assert changes[5].upserts[0].state is FENCED
    assert changes[5].deletes == ()
    assert changes[6].upserts == ()
    assert sorted(changes[6].deletes) == sorted(r.route_id for r in snapshots[5].routes)
    assert changes[7].deletes == ()


def test_a_save_that_changes_nothing_is_an_empty_change(store: CatalogStore) -> None:
    store.save(0, chain(2))
    store.save(1, chain(2))
    assert store.changes_since(1).changes == (CatalogChange(1, 2, (), ()),)


def test_changes_since_respects_the_limit(store: CatalogStore) -> None:
    _build_history(store)
    everything = store.changes_since(0).changes
    assert store.changes_since(0, limit=2).changes == everything[:2]
    assert store.changes_since(2, limit=2).changes == everything[2:4]
    assert store.changes_since(5, limit=5).changes == everything[5:]
    assert store.changes_since(0, limit=1).changes == everything[:1]
    with pytest.raises(ValueError):
        store.changes_since(0, limit=0)
    with pytest.raises(ValueError):
        store.changes_since(0, limit=-1)
    with pytest.raises(TypeError):
        store.changes_since(0, limit="2")  # type: ignore[arg-type]


def test_changes_since_the_current_version_is_empty(store: CatalogStore) -> None:
    assert store.changes_since(0) == CatalogChangeSet(head=CatalogHead(0, 0))
    store.save(0, chain(2))
    assert store.changes_since(1) == CatalogChangeSet(
        changes=(), reset=None, head=CatalogHead(1, routes_digest(chain(2)))
    )


def test_every_read_brings_the_digest_of_the_routes_it_read(store: CatalogStore) -> None:
    """The database's digest (kept by triggers) is the codec's, over the routes read with it."""
    snapshots, _ = _build_history(store)
    current = store.snapshot()
    assert current.digest == routes_digest(current.routes) == store.head().digest
    assert store.head() == CatalogHead(current.version, routes_digest(current.routes))
    for version in range(7):
        answer = store.changes_since(version)
        assert answer.head == store.head()
    store.prune_history(keep_versions=1)
    reset = store.changes_since(0).reset
    assert reset is not None and reset.digest == routes_digest(reset.routes) == current.digest
    assert routes_digest(snapshots[3].routes) != routes_digest(snapshots[4].routes)


def test_a_head_is_one_statement_with_no_transaction(database_url: str) -> None:
    """``head()`` sends the catalog's HEAD alone, in autocommit: no BEGIN or COMMIT travels (the
    session's last statement is the HEAD), as the watcher's polls and heartbeats send it."""
    name = "one-statement-head"
    with (
        CatalogStore.from_url(
            database_url, pool_size=1, max_overflow=0, connect_args={"application_name": name}
        ) as store,
        psycopg.connect(database_url, autocommit=True) as admin,
    ):
        written = store.save(0, chain(2))  # its session's last statement is a COMMIT
        assert store.head() == CatalogHead(written.version, written.digest)
        rows = admin.execute(
            "SELECT state, query FROM pg_stat_activity WHERE application_name = %s", [name]
        ).fetchall()
    assert len(rows) == 1 and rows[0][0] == "idle", rows
    assert "pg_is_in_recovery()" in rows[0][1], rows


def test_prune_history_keeps_the_last_versions(store: CatalogStore) -> None:
    snapshots, counters = _build_history(store)
    assert store.prune_history(keep_versions=3) == 5
    for version in (5, 6, 7):
        assert store.snapshot_at(version).routes == snapshots[version].routes
        assert store.next_route_id_at(version) == counters[version]
    for version in (0, 4):
        with pytest.raises(CatalogSnapshotTooOldError):
            store.snapshot_at(version)
        with pytest.raises(CatalogSnapshotTooOldError):
            store.next_route_id_at(version)
    assert [h.version for h in store.history()] == [5, 6, 7]
    assert store.snapshot() == snapshots[7]
    # The floor never goes back down, and keeping one version keeps the current one.
    assert store.prune_history(keep_versions=100) == 5
    assert store.prune_history(keep_versions=1) == 7
    assert store.snapshot_at(7) == snapshots[7]
    with pytest.raises(CatalogSnapshotTooOldError):
        store.snapshot_at(6)
    assert not issubclass(CatalogSnapshotTooOldError, ValueError)


@pytest.mark.slow
def test_prune_history_keeps_the_last_1024_versions_by_default(store: CatalogStore) -> None:
    """The documented window: with no argument, the newest 1,024 versions stay readable."""
    routes = chain(2)
    saved = {1: store.save(0, routes)}
    for version in range(2, DEFAULT_HISTORY_VERSIONS + 10):
        routes = replace(routes, 1 + version % 2, group_id=version)
        saved[version] = store.save(version - 1, routes)
    current = max(saved)
    floor = current - DEFAULT_HISTORY_VERSIONS + 1
    assert store.prune_history() == floor
    for version in (floor, floor + 1, current):
        assert store.snapshot_at(version).routes == saved[version].routes
    with pytest.raises(CatalogSnapshotTooOldError):
        store.snapshot_at(floor - 1)
    assert store.changes_since(floor - 1).reset == saved[current]


def test_prune_history_drops_the_rows(store: CatalogStore, raw: psycopg.Connection[Any]) -> None:
    _build_history(store)
    store.prune_history(keep_versions=2)
    floor = u64_to_db(6)
    assert (
        scalar(raw, "SELECT count(*) FROM distribution_routes WHERE valid_to <= %s", [floor]) == 0
    )
    assert scalar(raw, "SELECT count(*) FROM distribution_history WHERE version < %s", [floor]) == 0
    assert scalar(raw, "SELECT distribution_u64(history_floor) FROM distribution_meta") == 6


@pytest.mark.parametrize("keep", [3, 7, 8, 1000])
def test_prune_history_window(store: CatalogStore, keep: int) -> None:
    snapshots, _ = _build_history(store)
    store.prune_history(keep_versions=keep)
    oldest = max(0, 7 - keep + 1)
    assert store.snapshot_at(oldest).routes == snapshots[oldest].routes
    if oldest > 0:
        with pytest.raises(CatalogSnapshotTooOldError):
            store.snapshot_at(oldest - 1)


def test_prune_history_refuses_bad_arguments(store: CatalogStore) -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError):
            store.prune_history(keep_versions=bad)
    with pytest.raises(TypeError):
        store.prune_history(keep_versions="3")  # type: ignore[arg-type]


def test_prune_history_on_an_empty_catalog(store: CatalogStore) -> None:
    assert store.prune_history(keep_versions=1) == 0
    assert store.snapshot_at(0) == EMPTY


def test_changes_since_resets_after_pruning(store: CatalogStore) -> None:
    snapshots, _ = _build_history(store)
    store.prune_history(keep_versions=3)
    for version in (0, 3, 4):
        result = store.changes_since(version)
        assert result.changes == ()
        assert result.reset == snapshots[7]
    assert [c.version for c in store.changes_since(5).changes] == [6, 7]
    with pytest.raises(CatalogVersionAheadError):
        store.changes_since(8)


def test_a_reset_is_the_snapshot_of_the_head_it_comes_with(store: CatalogStore) -> None:
    """Read as a snapshot is (column arrays), in the same transaction as the head: the same
    routes, version, read_ts and digest, for a catalog of many routes and for an emptied one."""
    version = store.save(0, list(reversed(chain(2000)))).version
    version = store.split_route(700, key(699) + b"m", version).version
    store.prune_history(keep_versions=1)
    answer = store.changes_since(0)
    snapshot = store.snapshot()
    assert answer.changes == () and answer.reset == snapshot
    assert answer.reset.digest == snapshot.digest == routes_digest(snapshot.routes)
    assert answer.head == CatalogHead(version, routes_digest(snapshot.routes))
    store.save(version, [])
    store.prune_history(keep_versions=1)
    assert store.changes_since(0) == CatalogChangeSet(
        reset=CatalogSnapshot(version + 1, (), version + 1), head=CatalogHead(version + 1, 0)
    )


def test_history_has_one_entry_per_write(store: CatalogStore) -> None:
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    _build_history(store)
    result = store.split_route(9, b"zz", 7, actor="carol")
    assert result.version == 8
    entries = store.history()
    assert [e.version for e in entries] == list(range(1, 9))
    assert [e.operation for e in entries] == ["save"] * 7 + ["split_route"]
    assert [e.actor for e in entries] == ["alice", None, "bob", None, None, None, None, "carol"]
    assert entries[0].arguments == {"routes": 5, "opened": 5, "retired": 0}
    assert entries[1].arguments == {"routes": 5, "opened": 1, "retired": 1}
    assert entries[2].arguments == {"routes": 4, "opened": 1, "retired": 2}
    assert entries[5].arguments == {"routes": 0, "opened": 0, "retired": 5}
    assert entries[7].arguments["route_id"] == 9
    stamps = [e.committed_at for e in entries]
    assert all(isinstance(s, datetime.datetime) and s.tzinfo is not None for s in stamps)
    assert stamps == sorted(stamps)
    assert stamps[0] >= start
    assert [e.version for e in store.history(since=5)] == [6, 7, 8]
    assert [e.version for e in store.history(since=2, limit=2)] == [3, 4]
    assert store.history(since=8) == []


def test_history_refuses_bad_arguments(store: CatalogStore) -> None:
    with pytest.raises(TypeError):
        store.history(since="0")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.history(since=-1)
    with pytest.raises(TypeError):
        store.history(limit="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.history(limit=-1)


def test_failed_writes_leave_no_history(store: CatalogStore) -> None:
    store.save(0, chain(2))
    with pytest.raises(CatalogVersionMismatchError):
        store.save(0, chain(2))
    with pytest.raises(CatalogRouteOverlapError):
        store.save(1, [*chain(2), RouteDescriptor(route_id=9, start=b"a", end=None, group_id=1)])
    assert [e.version for e in store.history()] == [1]


# --------------------------------------------------------------------------------------------
# Argument types
# --------------------------------------------------------------------------------------------

TYPE_ERRORS: list[Any] = [
    pytest.param(lambda s: s.save("0", []), TypeError, id="save-version-str"),
    pytest.param(lambda s: s.save(0.0, []), TypeError, id="save-version-float"),
    pytest.param(lambda s: s.save(True, []), TypeError, id="save-version-bool"),
    pytest.param(lambda s: s.save(-1, []), ValueError, id="save-version-negative"),
    pytest.param(lambda s: s.save(2**64, []), ValueError, id="save-version-2^64"),
    pytest.param(lambda s: s.save(0, "abc"), TypeError, id="save-routes-str"),
    pytest.param(lambda s: s.save(0, b"abc"), TypeError, id="save-routes-bytes"),
    pytest.param(lambda s: s.save(0, [(1, b"", None, 1)]), TypeError, id="save-plain-tuple"),
    pytest.param(
        lambda s: s.save(0, [RouteDescriptor(route_id=1, start="a", end=None, group_id=1)]),
        TypeError,
        id="save-str-start",
    ),
    pytest.param(
        lambda s: s.save(0, [RouteDescriptor(route_id=1, start=b"a", end="b", group_id=1)]),
        TypeError,
        id="save-str-end",
    ),
    pytest.param(
        lambda s: s.save(
            0, [RouteDescriptor(route_id=1, start=bytearray(b"a"), end=None, group_id=1)]
        ),
        TypeError,
        id="save-bytearray-start",
    ),
    pytest.param(
        lambda s: s.save(0, [RouteDescriptor(route_id="1", start=b"a", end=None, group_id=1)]),
        TypeError,
        id="save-str-route-id",
    ),
    pytest.param(
        lambda s: s.save(0, [RouteDescriptor(route_id=-1, start=b"a", end=None, group_id=1)]),
        ValueError,
        id="save-negative-route-id",
    ),
    pytest.param(
        lambda s: s.save(0, [RouteDescriptor(route_id=1, start=b"a", end=None, group_id=2**64)]),
        ValueError,
        id="save-group-2^64",
    ),
    pytest.param(
        lambda s: s.save(
            0, [RouteDescriptor(route_id=1, start=b"a", end=None, group_id=1, parent_route_id=-1)]
        ),
        ValueError,
        id="save-negative-parent",
    ),
    pytest.param(
        lambda s: s.save(
            0, [RouteDescriptor(route_id=1, start=b"a", end=None, group_id=1, state="ACTIVE")]
        ),
        TypeError,
        id="save-str-state",
    ),
    pytest.param(lambda s: s.snapshot_at("1"), TypeError, id="snapshot-at-str"),
    pytest.param(lambda s: s.snapshot_at(-1), ValueError, id="snapshot-at-negative"),
    pytest.param(lambda s: s.snapshot_at(2**64), ValueError, id="snapshot-at-2^64"),
    pytest.param(lambda s: s.next_route_id_at("0"), TypeError, id="next-route-id-at-str"),
    pytest.param(lambda s: s.next_route_id_at(2**64), ValueError, id="next-route-id-at-2^64"),
    pytest.param(lambda s: s.changes_since("0"), TypeError, id="changes-since-str"),
    pytest.param(lambda s: s.changes_since(-1), ValueError, id="changes-since-negative"),
    pytest.param(lambda s: s.split_route(1, "m", 1), TypeError, id="split-str-key"),
    pytest.param(lambda s: s.split_route(1, b"m", -1), ValueError, id="split-negative-version"),
]


@pytest.mark.parametrize(("call", "error"), TYPE_ERRORS)
def test_argument_types(
    shared_store: CatalogStore,
    shared_raw: psycopg.Connection[Any],
    call: Callable[[CatalogStore], Any],
    error: type[Exception],
) -> None:
    before = db_state(shared_raw)
    with pytest.raises(error) as info:
        call(shared_store)
    assert type(info.value) is error, "a plain TypeError/ValueError, not a library error"
    assert db_state(shared_raw) == before


# --------------------------------------------------------------------------------------------
# ensure_catalog_snapshot
# --------------------------------------------------------------------------------------------


def _engine_routes(engine: Any) -> list[tuple[int, bytes, bytes | None, int, RouteState]]:
    return [(r.route_id, r.start, r.end, r.group_id, r.state) for r in engine.stats()]


def test_ensure_seeds_an_empty_catalog_from_the_engine(
    store: CatalogStore, engine_class: Any
) -> None:
    engine = engine_class.with_default_route()
    snapshot = ensure_catalog_snapshot(store, engine)
    expected = (RouteDescriptor(route_id=1, start=b"", end=None, group_id=1),)
    assert snapshot == CatalogSnapshot(version=1, routes=expected, read_ts=1)
    assert store.snapshot() == snapshot
    assert engine.version == 1
    assert _engine_routes(engine) == [(1, b"", None, 1, ACTIVE)]
    assert store.next_route_id() == 2
    assert [e.version for e in store.history()] == [1]


def test_ensure_numbers_the_engine_routes_in_key_order(
    store: CatalogStore, engine_class: Any
) -> None:
    engine = engine_class()
    engine.update_route(b"x", None, 3)
    engine.update_route(b"", b"g", 1)
    engine.update_route(b"m", b"p", 2)  # a gap between b"g" and b"m", and b"p" and b"x"
    snapshot = ensure_catalog_snapshot(store, engine)
    assert snapshot.version == 1
    assert snapshot.routes == (
        RouteDescriptor(route_id=1, start=b"", end=b"g", group_id=1),
        RouteDescriptor(route_id=2, start=b"m", end=b"p", group_id=2),
        RouteDescriptor(route_id=3, start=b"x", end=None, group_id=3),
    )
    assert store.snapshot() == snapshot
    assert engine.version == 1
    assert _engine_routes(engine) == [
        (1, b"", b"g", 1, ACTIVE),
        (2, b"m", b"p", 2, ACTIVE),
        (3, b"x", None, 3, ACTIVE),
    ]


def test_ensure_seeds_an_empty_engine_as_an_empty_version_1(
    store: CatalogStore, engine_class: Any
) -> None:
    engine = engine_class()
    snapshot = ensure_catalog_snapshot(store, engine)
    assert snapshot == CatalogSnapshot(version=1, routes=(), read_ts=1)
    assert engine.version == 1
    # A second service now finds an existing (if empty) catalog and leaves it alone.
    other = engine_class.with_default_route()
    assert ensure_catalog_snapshot(store, other) == snapshot
    assert other.version == 1
    assert other.stats() == []
    assert store.version() == 1


def test_ensure_leaves_an_existing_catalog_alone(
    store: CatalogStore, raw: psycopg.Connection[Any], engine_class: Any
) -> None:
    store.save(0, chain(3, first_id=10, group=4))
    existing = store.save(1, replace(chain(3, first_id=10, group=4), 11, state=FENCED))
    before = db_state(raw)
    engine = engine_class.with_default_route()
    snapshot = ensure_catalog_snapshot(store, engine)
    assert snapshot == existing
    assert db_state(raw) == before
    assert engine.version == 2
    assert _engine_routes(engine) == [
        (r.route_id, r.start, r.end, r.group_id, r.state) for r in existing.routes
    ]
    route = engine.get_route(key(1))
    assert route is not None
    assert (route.route_id, route.state) == (11, FENCED)


def test_ensure_checks_its_arguments(
    store: CatalogStore, raw: psycopg.Connection[Any], engine_class: Any
) -> None:
    before = db_state(raw)
    with pytest.raises(CatalogStoreRequiredError):
        ensure_catalog_snapshot(None, engine_class.with_default_route())
    with pytest.raises(EngineRequiredError):
        ensure_catalog_snapshot(store, None)
    with pytest.raises(CatalogStoreRequiredError):
        ensure_catalog_snapshot(None, None)
    assert db_state(raw) == before


def _waiting_on_locks(raw: psycopg.Connection[Any]) -> int:
    return int(
        scalar(
            raw,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
        )
    )


def test_two_services_seeding_at_once_agree(
    database_url: str, raw: psycopg.Connection[Any], engine_class: Any
) -> None:
    """Both services read an empty catalog, then race to seed it: one wins, one adopts.

    A third connection holds the metadata row's lock while both services read and try to write,
    so both really attempt the seed from version 0; then it lets them go.
    """
    engines = [engine_class.with_default_route(), engine_class()]
    engines[1].update_route(b"", b"m", 5)
    engines[1].update_route(b"m", None, 6)
    results: list[CatalogSnapshot | None] = [None, None]
    errors: list[BaseException] = []
    stores = [CatalogStore.from_url(database_url) for _ in engines]

    def seed(index: int) -> None:
        try:
            results[index] = ensure_catalog_snapshot(stores[index], engines[index])
        except BaseException as exc:
            errors.append(exc)

    blocker = psycopg.connect(database_url)
    try:
        blocker.execute("SELECT 1 FROM distribution_meta FOR UPDATE")
        threads = [threading.Thread(target=seed, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        deadline = 600
        while _waiting_on_locks(raw) < 2 and deadline and all(t.is_alive() for t in threads):
            threading.Event().wait(0.05)
            deadline -= 1
        assert _waiting_on_locks(raw) == 2, "both services should be blocked on the seed write"
        blocker.rollback()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        blocker.close()
        for s in stores:
            s.close()
    assert errors == []
    assert results[0] is not None
    assert results[0] == results[1]
    winner = results[0]
    assert winner.version == 1
    assert winner.routes in (
        (RouteDescriptor(route_id=1, start=b"", end=None, group_id=1),),
        (
            RouteDescriptor(route_id=1, start=b"", end=b"m", group_id=5),
            RouteDescriptor(route_id=2, start=b"m", end=None, group_id=6),
        ),
    )
    assert engines[0].version == engines[1].version == 1
    assert _engine_routes(engines[0]) == _engine_routes(engines[1])
    assert scalar(raw, "SELECT count(*) FROM distribution_history") == 1


def test_many_services_seeding_at_once_agree(database_url: str, engine_class: Any) -> None:
    count = 6
    barrier = threading.Barrier(count)
    engines = [engine_class() for _ in range(count)]
    for i, engine in enumerate(engines):
        engine.update_route(b"", None, i + 1)
    results: list[Any] = [None] * count

    def seed(index: int) -> None:
        with CatalogStore.from_url(database_url) as store:
            store.version()  # connect first, so the calls below start together
            barrier.wait()
            try:
                results[index] = ensure_catalog_snapshot(store, engines[index])
            except BaseException as exc:
                results[index] = exc

    threads = [threading.Thread(target=seed, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(isinstance(r, CatalogSnapshot) for r in results), results
    assert len(set(results)) == 1
    assert results[0].version == 1
    assert {e.version for e in engines} == {1}
    assert len({tuple(_engine_routes(e)) for e in engines}) == 1


# --------------------------------------------------------------------------------------------
# NOTIFY distribution_catalog
# --------------------------------------------------------------------------------------------


@pytest.fixture
def listener(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
        yield connection


def next_payload(listener: psycopg.Connection[Any]) -> str:
    received = list(listener.notifies(timeout=30, stop_after=1))
    assert len(received) == 1, "no notification arrived"
    assert received[0].channel == "distribution_catalog"
    return received[0].payload


def parse_payload(payload: str) -> tuple[int, dict[str, Any] | None]:
    head, _, body = payload.partition(" ")
    assert head.isdigit() and head == str(int(head))
    return int(head), (json.loads(body) if body else None)


def decoded_upserts(body: dict[str, Any]) -> list[RouteDescriptor]:
    return [
        decode_route_descriptor(base64.b64decode(item, validate=True)) for item in body["upserts"]
    ]


def test_notify_channel_name() -> None:
    assert NOTIFY_CHANNEL == "distribution_catalog"


def test_a_save_notifies_its_change(store: CatalogStore, listener: psycopg.Connection[Any]) -> None:
    routes = [*chain(3)[:2], RouteDescriptor(route_id=3, start=key(2), end=None, group_id=2)]
    saved = store.save(0, routes)
    version, body = parse_payload(next_payload(listener))
    assert version == 1
    assert body is not None
    assert set(body) == {"previous", "upserts", "deletes", "digest"}
    assert body["digest"] == saved.digest == routes_digest(routes)
    assert body["previous"] == 0
    assert decoded_upserts(body) == routes
    assert body["deletes"] == []

    changed = [replace(routes, 2, group_id=9, state=FENCED)[i] for i in (0, 1)]
    store.save(1, changed)
    version, body = parse_payload(next_payload(listener))
    assert version == 2
    assert body is not None
    assert body["previous"] == 1
    # A changed route is an upsert; only the route that went away is a delete.
    assert decoded_upserts(body) == [changed[1]]
    assert body["deletes"] == [3]


def test_notification_payload_with_huge_versions_and_ids(
    store: CatalogStore, listener: psycopg.Connection[Any], unguarded: Callable[..., None]
) -> None:
    unguarded("UPDATE distribution_meta SET version = %s", [u64_to_db(U64_MAX - 1)])
    big = RouteDescriptor(route_id=2**64 - 2, start=b"", end=None, group_id=U64_MAX)
    store.save(U64_MAX - 1, [big])
    payload = next_payload(listener)
    assert payload.startswith("18446744073709551615 ")
    version, body = parse_payload(payload)
    assert version == U64_MAX
    assert body is not None
    assert body["previous"] == U64_MAX - 1
    assert decoded_upserts(body) == [big]


def test_an_empty_save_notifies_an_empty_change(
    store: CatalogStore, listener: psycopg.Connection[Any]
) -> None:
    store.save(0, [])
    assert parse_payload(next_payload(listener)) == (
        1,
        {"previous": 0, "upserts": [], "deletes": [], "digest": 0},
    )


def test_failed_writes_send_nothing(
    store: CatalogStore, raw: psycopg.Connection[Any], listener: psycopg.Connection[Any]
) -> None:
    store.save(0, chain(2))
    assert parse_payload(next_payload(listener))[0] == 1
    with pytest.raises(CatalogVersionMismatchError):
        store.save(0, chain(3))
    with pytest.raises(CatalogVersionMismatchError):
        store.save(5, chain(3))
    with pytest.raises(CatalogRouteOverlapError):
        store.save(1, [*chain(2), *chain(2, first_id=3)])
    with pytest.raises(TypeError):
        store.save(1, [RouteDescriptor(route_id=1, start="a", end=None, group_id=1)])  # type: ignore[arg-type]
    raw.execute(SMALL_GROUPS)
    with pytest.raises(DistributionError):
        store.save(1, chain(2, group=200))
    # Notifications arrive in commit order: the next one must be that of the next success.
    store.save(1, chain(4))
    assert parse_payload(next_payload(listener))[0] == 2
    assert list(listener.notifies(timeout=0)) == []


def test_a_large_save_notifies_the_version_alone(
    store: CatalogStore, listener: psycopg.Connection[Any]
) -> None:
    store.save(0, chain(500))
    assert next_payload(listener) == "1"
    store.save(1, replace(chain(500), 7, group_id=2))
    version, body = parse_payload(next_payload(listener))
    assert version == 2
    assert body is not None
    assert decoded_upserts(body) == [chain(500)[6]._replace(group_id=2)]


def test_a_save_of_huge_keys_notifies_the_version_alone(
    store: CatalogStore, listener: psycopg.Connection[Any]
) -> None:
    """PostgreSQL refuses NOTIFY payloads of 8000 bytes or more: the write must not fail."""
    bounds = [b"", *(bytes([letter]) * distribution.MAX_ROUTE_KEY_BYTES for letter in b"abcdef")]
    routes = [
        RouteDescriptor(route_id=i + 1, start=start, end=end, group_id=1)
        for i, (start, end) in enumerate(zip(bounds, [*bounds[1:], None], strict=True))
    ]
    assert store.save(0, routes).version == 1
    assert next_payload(listener) == "1"


def test_a_notification_is_sent_only_on_commit(
    store: CatalogStore, listener: psycopg.Connection[Any], database_url: str
) -> None:
    """While the write's transaction waits on a lock, nothing is delivered; then it is."""
    store.save(0, chain(2))
    assert parse_payload(next_payload(listener))[0] == 1
    # The library's notifying function itself, run in a transaction we roll back: nothing.
    with psycopg.connect(database_url) as other:
        other.execute("SELECT distribution_begin_write(%s)", [u64_to_db(1)])
        other.execute(
            "SELECT distribution_finish_write(%s, 'test', '{}', NULL, '{}', '{}')", [u64_to_db(2)]
        )
        other.rollback()
    store.save(1, chain(3))
    assert parse_payload(next_payload(listener))[0] == 2


# --------------------------------------------------------------------------------------------
# Database invariants: raw SQL bypassing the library is refused
# --------------------------------------------------------------------------------------------

BASE_ROUTES = [
    RouteDescriptor(route_id=1, start=b"b", end=b"d", group_id=1),
    RouteDescriptor(route_id=2, start=b"f", end=b"h", group_id=1),
]


@pytest.fixture
def base(store: CatalogStore) -> CatalogStore:
    """A catalog at version 1 holding ``[b, d)`` and ``[f, h)``, with gaps around them."""
    store.save(0, BASE_ROUTES)
    return store


@contextmanager
def versioned(raw: psycopg.Connection[Any]) -> Iterator[None]:
    """A transaction on ``raw`` that moves the version as every write must
    (``distribution_begin_write``): raw SQL in it passes the guards and meets every other rule."""
    with raw.transaction():
        raw.execute("SELECT distribution_begin_write(version) FROM distribution_meta")
        yield


def insert_route(
    raw: psycopg.Connection[Any],
    route_id: int,
    start: bytes,
    end: bytes | None,
    *,
    group_id: int = 1,
    state: int = 0,
    valid_from: int = 1,
    valid_to: int | None = None,
) -> None:
    """Insert a route row with raw SQL, in a transaction of its own that moves the version."""
    with versioned(raw):
        raw.execute(
            'INSERT INTO distribution_routes (route_id, valid_from, valid_to, start, "end", '
            "group_id, state, parent_route_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            [
                u64_to_db(route_id),
                u64_to_db(valid_from),
                None if valid_to is None else u64_to_db(valid_to),
                start,
                end,
                u64_to_db(group_id),
                state,
                u64_to_db(0),
            ],
        )


def refused(
    raw: psycopg.Connection[Any],
    statement: Callable[[], Any],
    db_error: type[psycopg.Error],
    constraint: str | None,
    library_error: type[Exception],
) -> None:
    before = db_state(raw)
    with pytest.raises(db_error) as info:
        statement()
    if constraint is not None:
        assert info.value.diag.constraint_name == constraint
    translated = translate_error(info.value)
    assert isinstance(translated, library_error)
    assert isinstance(translated, DistributionError)
    assert not isinstance(translated, psycopg.Error)
    assert db_state(raw) == before


def test_the_database_keeps_exactly_one_meta_row(
    shared_store: CatalogStore, shared_raw: psycopg.Connection[Any]
) -> None:
    raw = shared_raw
    row = "(%s, 0, 1, 0)"
    META_INSERT = "INSERT INTO distribution_meta (id, version, next_route_id, history_floor) VALUES"
    refused(
        raw,
        lambda: raw.execute(f"{META_INSERT} {row % 2}"),
        psycopg.errors.CheckViolation,
        "ck_distribution_meta_single_row",
        DistributionError,
    )
    refused(
        raw,
        lambda: raw.execute(f"{META_INSERT} {row % 1}"),
        psycopg.errors.UniqueViolation,
        "pk_distribution_meta",
        DistributionError,
    )
    refused(
        raw,
        lambda: raw.execute("DELETE FROM distribution_meta"),
        psycopg.errors.RestrictViolation,
        None,
        DistributionError,
    )
    refused(
        raw,
        lambda: raw.execute("TRUNCATE distribution_meta"),
        psycopg.errors.RestrictViolation,
        None,
        DistributionError,
    )
    refused(
        raw,
        lambda: raw.execute("TRUNCATE distribution_meta CASCADE"),
        psycopg.errors.RestrictViolation,
        None,
        DistributionError,
    )
    def zero_counter() -> None:
        with versioned(raw):
            raw.execute("UPDATE distribution_meta SET next_route_id = %s", [u64_to_db(0)])

    refused(
        raw,
        zero_counter,
        psycopg.errors.CheckViolation,
        "ck_distribution_meta_next_route_id_nonzero",
        DistributionError,
    )
    refused(
        raw,
        lambda: raw.execute("UPDATE distribution_meta SET history_floor = version + 1"),
        psycopg.errors.CheckViolation,
        "ck_distribution_meta_history_floor_reached",
        DistributionError,
    )
    assert shared_store.snapshot().routes == tuple(BASE_ROUTES)


@pytest.mark.parametrize(
    ("route", "constraint", "library_error"),
    [
        pytest.param(
            {"route_id": 0, "start": b"x", "end": None},
            "ck_distribution_routes_route_id_nonzero",
            CatalogRouteIDRequiredError,
            id="route-id-0",
        ),
        pytest.param(
            {"route_id": 9, "start": b"x", "end": None, "group_id": 0},
            "ck_distribution_routes_group_id_nonzero",
            CatalogGroupIDRequiredError,
            id="group-0",
        ),
        pytest.param(
            {"route_id": 9, "start": b"x", "end": None, "state": 4},
            "ck_distribution_routes_state_known",
            CatalogInvalidRouteStateError,
            id="state-4",
        ),
        pytest.param(
            {"route_id": 9, "start": b"x", "end": None, "state": -1},
            "ck_distribution_routes_state_known",
            CatalogInvalidRouteStateError,
            id="state-negative",
        ),
        pytest.param(
            {"route_id": 9, "start": b"x", "end": b"x"},
            "ck_distribution_routes_range_nonempty",
            CatalogInvalidRouteRangeError,
            id="start-equals-end",
        ),
        pytest.param(
            {"route_id": 9, "start": b"y", "end": b"x"},
            "ck_distribution_routes_range_nonempty",
            CatalogInvalidRouteRangeError,
            id="start-after-end",
        ),
        pytest.param(
            {"route_id": 9, "start": b"", "end": b""},
            "ck_distribution_routes_range_nonempty",
            CatalogInvalidRouteRangeError,
            id="empty-end",
        ),
        pytest.param(
            {"route_id": 9, "start": b"x", "end": None, "valid_from": 1, "valid_to": 1},
            "ck_distribution_routes_validity_ordered",
            DistributionError,
            id="validity-not-ordered",
        ),
        pytest.param(
            {"route_id": 1, "start": b"x", "end": b"y", "valid_from": 2},
            "ix_distribution_routes_live_route_id",
            CatalogDuplicateRouteIDError,
            id="second-live-row-of-an-id",
        ),
        pytest.param(
            {"route_id": 9, "start": b"f", "end": b"g"},
            "ix_distribution_routes_live_start",
            CatalogRouteOverlapError,
            id="two-live-rows-with-one-start",
        ),
        pytest.param(
            {"route_id": 9, "start": b"c", "end": b"e"},
            "distribution_routes_no_overlap",
            CatalogRouteOverlapError,
            id="overlaps-the-previous",
        ),
        pytest.param(
            {"route_id": 9, "start": b"a", "end": b"c"},
            "distribution_routes_no_overlap",
            CatalogRouteOverlapError,
            id="overlaps-the-next",
        ),
        pytest.param(
            {"route_id": 9, "start": b"a", "end": b"z"},
            "distribution_routes_no_overlap",
            CatalogRouteOverlapError,
            id="covers-two",
        ),
        pytest.param(
            {"route_id": 9, "start": b"c", "end": b"c\x00"},
            "distribution_routes_no_overlap",
            CatalogRouteOverlapError,
            id="inside-another",
        ),
        pytest.param(
            {"route_id": 9, "start": b"e", "end": None},
            "distribution_routes_no_overlap",
            CatalogRouteOverlapError,
            id="unbounded-followed-by-another",
        ),
    ],
)
def test_the_database_refuses_invalid_routes(
    shared_store: CatalogStore,
    shared_raw: psycopg.Connection[Any],
    route: dict[str, Any],
    constraint: str,
    library_error: type[Exception],
) -> None:
    raw = shared_raw
    db_error: type[psycopg.Error] = (
        psycopg.errors.ExclusionViolation
        if constraint == "distribution_routes_no_overlap"
        else psycopg.errors.UniqueViolation
        if constraint.startswith("ix_")
        else psycopg.errors.CheckViolation
    )
    refused(raw, lambda: insert_route(raw, **route), db_error, constraint, library_error)
    assert shared_store.snapshot().routes == tuple(BASE_ROUTES)


def test_the_database_refuses_a_route_after_an_unbounded_one(
    base: CatalogStore, raw: psycopg.Connection[Any]
) -> None:
    insert_route(raw, 9, b"x", None)  # allowed: nothing follows it
    refused(
        raw,
        lambda: insert_route(raw, 10, b"y", b"z"),
        psycopg.errors.ExclusionViolation,
        "distribution_routes_no_overlap",
        CatalogRouteOverlapError,
    )


def test_the_database_refuses_an_overlapping_update(
    base: CatalogStore, raw: psycopg.Connection[Any]
) -> None:
    grow_sql = 'UPDATE distribution_routes SET "end" = %s WHERE route_id = %s AND valid_to IS NULL'

    def grow(end: bytes | None) -> None:
        with versioned(raw):
            raw.execute(grow_sql, [end, u64_to_db(1)])

    refused(
        raw,
        lambda: grow(b"g"),
        psycopg.errors.ExclusionViolation,
        "distribution_routes_no_overlap",
        CatalogRouteOverlapError,
    )
    refused(
        raw,
        lambda: grow(None),
        psycopg.errors.ExclusionViolation,
        "distribution_routes_no_overlap",
        CatalogRouteOverlapError,
    )
    grow(b"f")  # touching is fine


def test_the_database_refuses_overlaps_within_one_statement(
    base: CatalogStore, raw: psycopg.Connection[Any]
) -> None:
    def both() -> None:
        with versioned(raw):
            raw.execute(
                'INSERT INTO distribution_routes (route_id, valid_from, start, "end", group_id, '
                "state, parent_route_id) VALUES (%s, %s, 'p', 'r', %s, 0, %s), "
                "(%s, %s, 'q', 's', %s, 0, %s)",
                [u64_to_db(v) for v in (9, 1, 1, 0, 10, 1, 1, 0)],
            )

    refused(
        raw,
        both,
        psycopg.errors.ExclusionViolation,
        "distribution_routes_no_overlap",
        CatalogRouteOverlapError,
    )


def test_the_database_accepts_valid_raw_rows(
    base: CatalogStore, raw: psycopg.Connection[Any]
) -> None:
    insert_route(raw, 9, b"d", b"f")  # exactly fills the gap
    insert_route(raw, 10, b"a", b"z", valid_from=1, valid_to=2)  # history may overlap
    insert_route(raw, 11, b"", b"b")
    assert [row[0] for row in live_routes(raw)] == [11, 1, 9, 2]


def test_database_errors_reach_callers_as_library_errors(
    base: CatalogStore, raw: psycopg.Connection[Any], unguarded: Callable[..., None]
) -> None:
    # A constraint the library does not know about: still a library error, caused by the raw one.
    raw.execute(SMALL_GROUPS)
    before = db_state(raw)
    with pytest.raises(DistributionError) as info:
        base.save(1, [RouteDescriptor(route_id=3, start=b"", end=None, group_id=200)])
    assert not isinstance(info.value, psycopg.Error)
    assert isinstance(info.value.__cause__, psycopg.errors.CheckViolation)
    assert db_state(raw) == before

    # An error raised by the server-side functions: the id counter is exhausted.
    raw.execute("ALTER TABLE distribution_routes DROP CONSTRAINT test_small_groups")
    unguarded("UPDATE distribution_meta SET next_route_id = %s", [u64_to_db(U64_MAX)])
    before = db_state(raw)
    with pytest.raises(CatalogRouteIDOverflowError) as overflow:
        base.split_route(1, b"c", 1)
    assert isinstance(overflow.value.__cause__, psycopg.Error)
    assert db_state(raw) == before


def test_an_autocommit_engine_still_writes_in_one_transaction(database_url: str) -> None:
    """The store sets the caller's AUTOCOMMIT aside: a save stays one transaction."""
    from distribution.database import create_engine as make_engine

    with CatalogStore(make_engine(database_url, isolation_level="AUTOCOMMIT")) as autocommit:
        first = autocommit.save(0, chain(3))
        again = autocommit.save(first.version, first.routes)
        assert again.version == 2
        assert autocommit.snapshot().routes == first.routes
        with pytest.raises(CatalogVersionMismatchError):
            autocommit.save(0, chain(2))
        assert autocommit.snapshot().routes == first.routes
        with autocommit.sa_engine.connect() as connection:
            assert connection.connection.driver_connection.autocommit  # restored


def test_save_refuses_a_non_text_actor(store: CatalogStore) -> None:
    with pytest.raises(TypeError):
        store.save(0, chain(1), actor=7)  # type: ignore[arg-type]
    assert store.version() == 0


def test_store_refuses_an_engine_on_another_driver() -> None:
    import sqlalchemy as sa

    with pytest.raises(TypeError):
        CatalogStore(sa.create_engine("sqlite://"))

"""Tests of the u64 representation (``distribution.models``) and of the SQL helpers built on it.

Every unsigned 64-bit value is stored in a ``BIGINT`` shifted down by ``2**63``. These tests push
the edges of the range (0, 1, 2**63 - 1, 2**63, 2**64 - 1) through every path that crosses the
shift: the SQLAlchemy ``U64`` type on the real tables, the CatalogStore's own raw SQL, ordering
comparisons inside SQL, and the server-side functions ``distribution_u64*`` and
``distribution_encode_route`` (checked byte for byte against the seed's reference vectors).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from distribution import (
    UINT64_MAX,
    CatalogRouteIDOverflowError,
    RouteDescriptor,
    RouteState,
    encode_route_descriptor,
)
from distribution.catalog import CatalogStore
from distribution.database import create_engine
from distribution.models import (
    U64,
    U64_DB_MAX,
    U64_DB_ZERO,
    HistoryRecord,
    RouteRecord,
    u64_from_db,
    u64_to_db,
)

EDGES = [0, 1, 2**63 - 1, 2**63, 2**64 - 1]
EDGE_IDS = ["zero", "one", "2^63-1", "2^63", "2^64-1"]

# --------------------------------------------------------------------------------------------
# The seed's reference vectors: the repository's copy, as tests/test_codec.py reads it
# --------------------------------------------------------------------------------------------

#: The repository's copy of the seed's ``shared/vectors/seed_codec_vectors.json``.
VECTORS_PATH = Path(__file__).resolve().parent / "data" / "seed_codec_vectors.json"


def _route_vectors() -> list[Any]:
    path = VECTORS_PATH
    try:
        vectors = json.loads(path.read_text(encoding="utf-8"))["route_descriptors"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [pytest.param(None, id=f"MISSING-{type(exc).__name__}")]
    if not isinstance(vectors, list) or not vectors:
        return [pytest.param(None, id="MISSING-empty")]
    return [pytest.param(v, id=f"vector{i}") for i, v in enumerate(vectors)]


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture
def sa_engine(database_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(database_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def raw(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A plain psycopg connection (autocommit) that bypasses the library."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


def _begin_write(session: Session) -> None:
    """Move the version in the session's transaction, as every write must: the database refuses
    route and history rows written in a transaction that has not."""
    session.execute(sa.text("SELECT distribution_begin_write(version) FROM distribution_meta"))


def _route_record(value: int, route_id: int = 1, start: bytes = b"k") -> RouteRecord:
    """A closed (historical) route row whose every u64 column holds ``value`` where allowed."""
    return RouteRecord(
        route_id=route_id,
        valid_from=value,
        valid_to=None,
        start=start,
        end=None,
        group_id=max(value, 1),
        state=int(RouteState.WRITE_FENCED),
        parent_route_id=value,
    )


# --------------------------------------------------------------------------------------------
# The shift itself
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", EDGES, ids=EDGE_IDS)
def test_shift_functions_round_trip_and_fit_bigint(value: int) -> None:
    stored = u64_to_db(value)
    assert -(2**63) <= stored <= 2**63 - 1
    assert stored == value - 2**63
    assert u64_from_db(stored) == value


def test_shift_constants() -> None:
    assert U64_DB_ZERO == u64_to_db(0) == -(2**63)
    assert U64_DB_MAX == u64_to_db(UINT64_MAX) == 2**63 - 1


def test_shift_preserves_order() -> None:
    values = sorted({0, 1, 2, 2**62, 2**63 - 2, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 2, 2**64 - 1})
    stored = [u64_to_db(v) for v in values]
    assert stored == sorted(stored)


def test_u64_type_binds_none_as_null() -> None:
    u64 = U64()
    dialect = postgresql.dialect()
    assert u64.process_bind_param(None, dialect) is None
    assert u64.process_result_value(None, dialect) is None
    assert u64.process_bind_param(0, dialect) == -(2**63)
    assert u64.process_result_value(2**63 - 1, dialect) == 2**64 - 1


# --------------------------------------------------------------------------------------------
# U64 through SQLAlchemy sessions on the real tables
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", EDGES, ids=EDGE_IDS)
def test_history_record_round_trips_through_a_session(
    value: int, sa_engine: sa.Engine, raw: psycopg.Connection[Any]
) -> None:
    with Session(sa_engine) as session:
        _begin_write(session)
        session.add(
            HistoryRecord(
                version=value,
                operation="test",
                arguments={"value": str(value)},
                actor="test_models",
                next_route_id=value,
            )
        )
        session.commit()
    with Session(sa_engine) as session:
        record = session.scalars(sa.select(HistoryRecord)).one()
        assert record.version == value
        assert record.next_route_id == value
        assert record.arguments == {"value": str(value)}
        assert isinstance(record.committed_at, datetime.datetime)
        # Lookups by primary key go through the bind side of the type too.
        assert session.get(HistoryRecord, value) is record
    stored = raw.execute("SELECT version, next_route_id FROM distribution_history").fetchone()
    assert stored == (value - 2**63, value - 2**63)


@pytest.mark.parametrize("value", EDGES, ids=EDGE_IDS)
def test_route_record_round_trips_through_a_session(
    value: int, sa_engine: sa.Engine, raw: psycopg.Connection[Any]
) -> None:
    route_id = max(value, 1)
    with Session(sa_engine) as session:
        _begin_write(session)
        session.add(_route_record(value, route_id=route_id))
        session.commit()
    with Session(sa_engine) as session:
        record = session.scalars(sa.select(RouteRecord)).one()
        assert record.route_id == route_id
        assert record.valid_from == value
        assert record.valid_to is None
        assert record.group_id == max(value, 1)
        assert record.parent_route_id == value
        assert record.start == b"k"
        assert record.end is None
        found = session.scalars(
            sa.select(RouteRecord).where(
                RouteRecord.route_id == route_id, RouteRecord.parent_route_id == value
            )
        ).one()
        assert found is record
    stored = raw.execute(
        "SELECT route_id, valid_from, group_id, parent_route_id FROM distribution_routes"
    ).fetchone()
    assert stored == (
        route_id - 2**63,
        value - 2**63,
        max(value, 1) - 2**63,
        value - 2**63,
    )


def test_u64_ordering_in_sql_crosses_the_sign_boundary(sa_engine: sa.Engine) -> None:
    versions = [0, 1, 2**63 - 2, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 2, 2**64 - 1]
    with Session(sa_engine) as session:
        _begin_write(session)
        for v in reversed(versions):
            session.add(HistoryRecord(version=v, operation="t", arguments={}, next_route_id=1))
        session.commit()
        ordered = session.scalars(sa.select(HistoryRecord.version).order_by(HistoryRecord.version))
        assert list(ordered) == versions
        for pivot in versions:
            below = session.scalars(
                sa.select(HistoryRecord.version)
                .where(HistoryRecord.version <= pivot)
                .order_by(HistoryRecord.version)
            )
            assert list(below) == [v for v in versions if v <= pivot]
            above = session.scalars(
                sa.select(HistoryRecord.version).where(HistoryRecord.version > pivot)
            )
            assert sorted(above) == [v for v in versions if v > pivot]
        assert session.scalar(sa.select(sa.func.max(HistoryRecord.version))) == 2**64 - 1
        assert session.scalar(sa.select(sa.func.min(HistoryRecord.version))) == 0


def test_route_validity_window_across_the_sign_boundary(sa_engine: sa.Engine) -> None:
    """``valid_from <= v AND (valid_to IS NULL OR valid_to > v)`` picks the right version."""
    windows = [(2**63 - 2, 2**63 - 1), (2**63 - 1, 2**63), (2**63, 2**63 + 1), (2**63 + 1, None)]
    with Session(sa_engine) as session:
        _begin_write(session)
        for group, (valid_from, valid_to) in enumerate(windows, start=1):
            record = _route_record(valid_from, route_id=7)
            record.valid_to = valid_to
            record.group_id = group
            session.add(record)
            session.flush()
        session.commit()
        for group, (valid_from, _) in enumerate(windows, start=1):
            live = session.scalars(
                sa.select(RouteRecord.group_id).where(
                    RouteRecord.valid_from <= valid_from,
                    sa.or_(RouteRecord.valid_to.is_(None), RouteRecord.valid_to > valid_from),
                )
            ).all()
            assert live == [group]


# --------------------------------------------------------------------------------------------
# U64 through the CatalogStore
# --------------------------------------------------------------------------------------------


def test_store_round_trips_ids_at_the_top_of_the_range(store: CatalogStore) -> None:
    routes = [
        RouteDescriptor(
            route_id=2**64 - 2,
            start=b"m",
            end=None,
            group_id=2**64 - 1,
            state=RouteState.MIGRATING_TARGET,
            parent_route_id=2**63,
        ),
        RouteDescriptor(
            route_id=2**63, start=b"", end=b"m", group_id=2**63 - 1, parent_route_id=2**63 - 1
        ),
    ]
    saved = store.save(0, routes)
    expected = (routes[1], routes[0])
    assert saved.routes == expected
    assert store.snapshot().routes == expected
    assert store.snapshot_at(1).routes == expected
    assert store.next_route_id() == 2**64 - 1
    assert store.next_route_id_at(1) == 2**64 - 1
    change = store.changes_since(0).changes[0]
    assert set(change.upserts) == set(expected)


def test_store_refuses_a_save_whose_next_route_id_overflows(
    store: CatalogStore, raw: psycopg.Connection[Any]
) -> None:
    store.save(0, [RouteDescriptor(route_id=2**64 - 2, start=b"", end=None, group_id=1)])
    with pytest.raises(CatalogRouteIDOverflowError):
        store.save(1, [RouteDescriptor(route_id=2**64 - 1, start=b"", end=None, group_id=1)])
    assert store.version() == 1
    assert store.next_route_id() == 2**64 - 1
    count = raw.execute("SELECT count(*) FROM distribution_routes").fetchone()
    assert count == (1,)


def test_store_versions_cross_the_sign_boundary(
    store: CatalogStore, raw: psycopg.Connection[Any], unguarded: Callable[..., None]
) -> None:
    """Versions 2**63 - 1, 2**63, 2**63 + 1 are written and read back exactly, in order."""
    unguarded("UPDATE distribution_meta SET version = %s", [u64_to_db(2**63 - 2)])
    saved = {}
    for group in (1, 2, 3):
        snapshot = store.save(
            store.version(), [RouteDescriptor(route_id=1, start=b"", end=None, group_id=group)]
        )
        saved[snapshot.version] = snapshot.routes
    assert sorted(saved) == [2**63 - 1, 2**63, 2**63 + 1]
    for version, routes in saved.items():
        assert store.snapshot_at(version).routes == routes
    changes = store.changes_since(2**63 - 1).changes
    assert [(c.previous_version, c.version) for c in changes] == [
        (2**63 - 1, 2**63),
        (2**63, 2**63 + 1),
    ]
    assert [c.upserts[0].group_id for c in changes] == [2, 3]
    assert [h.version for h in store.history()] == sorted(saved)
    newest = raw.execute("SELECT distribution_u64(max(version)) FROM distribution_history")
    assert newest.fetchone() == (Decimal(2**63 + 1),)


# --------------------------------------------------------------------------------------------
# The SQL functions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", EDGES, ids=EDGE_IDS)
def test_sql_u64_functions(value: int, raw: psycopg.Connection[Any]) -> None:
    row = raw.execute(
        "SELECT distribution_u64(%s::bigint), distribution_u64_stored(%s::numeric), "
        "distribution_u64_bytes(%s::bigint)",
        [u64_to_db(value), value, u64_to_db(value)],
    ).fetchone()
    assert row == (Decimal(value), u64_to_db(value), value.to_bytes(8, "big"))


def test_sql_u64_functions_are_strict(raw: psycopg.Connection[Any]) -> None:
    row = raw.execute(
        "SELECT distribution_u64(NULL), distribution_u64_stored(NULL), distribution_u64_bytes(NULL)"
    ).fetchone()
    assert row == (None, None, None)


def test_sql_u64_stored_refuses_out_of_range(raw: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.NumericValueOutOfRange):
        raw.execute("SELECT distribution_u64_stored(%s::numeric)", [2**64])


def _sql_encode(raw: psycopg.Connection[Any], route: RouteDescriptor) -> bytes:
    row = raw.execute(
        "SELECT distribution_encode_route(%s::bigint, %s::bytea, %s::bytea, %s::bigint, "
        "%s::smallint, %s::bigint)",
        [
            u64_to_db(route.route_id),
            route.start,
            route.end,
            u64_to_db(route.group_id),
            int(route.state),
            u64_to_db(route.parent_route_id),
        ],
    ).fetchone()
    assert row is not None
    assert isinstance(row[0], bytes)
    return row[0]


@pytest.mark.parametrize("vector", _route_vectors())
def test_sql_encoder_matches_the_seed_vectors(
    vector: dict[str, Any] | None, raw: psycopg.Connection[Any]
) -> None:
    if vector is None:
        pytest.fail(f"seed codec vectors (route_descriptors) not found or empty: {VECTORS_PATH}")
    spec = vector["route"]
    route = RouteDescriptor(
        route_id=spec["route_id"],
        start=bytes.fromhex(spec["start_hex"]),
        end=None if spec["end_hex"] is None else bytes.fromhex(spec["end_hex"]),
        group_id=spec["group_id"],
        state=RouteState(spec["state"]),
        parent_route_id=spec["parent_route_id"],
    )
    assert _sql_encode(raw, route) == bytes.fromhex(vector["encoded_hex"])


_u64 = st.integers(min_value=0, max_value=UINT64_MAX)
_nonzero = st.integers(min_value=1, max_value=UINT64_MAX)


@st.composite
def _valid_routes(draw: st.DrawFn) -> RouteDescriptor:
    start = draw(st.binary(max_size=40))
    end = draw(st.none() | st.binary(min_size=1, max_size=40).map(lambda tail: start + tail))
    return RouteDescriptor(
        route_id=draw(_nonzero),
        start=start,
        end=end,
        group_id=draw(_nonzero),
        state=draw(st.sampled_from(RouteState)),
        parent_route_id=draw(_u64),
    )


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(route=_valid_routes())
def test_sql_encoder_agrees_with_the_python_encoder(
    route: RouteDescriptor, raw: psycopg.Connection[Any]
) -> None:
    assert _sql_encode(raw, route) == encode_route_descriptor(route)


def test_sql_encoder_of_stored_rows_matches_the_python_encoder(
    store: CatalogStore, raw: psycopg.Connection[Any]
) -> None:
    routes = [
        RouteDescriptor(route_id=2**64 - 2, start=b"", end=b"\x00", group_id=2**64 - 1),
        RouteDescriptor(
            route_id=5,
            start=b"\x00",
            end=b"\xff" * 3,
            group_id=2**63,
            state=RouteState.WRITE_FENCED,
            parent_route_id=2**63 - 1,
        ),
        RouteDescriptor(route_id=2**63, start=b"\xff" * 3, end=None, group_id=1, parent_route_id=1),
    ]
    store.save(0, routes)
    rows = raw.execute(
        'SELECT distribution_encode_route(route_id, start, "end", group_id, state, '
        "parent_route_id) FROM distribution_routes ORDER BY start"
    ).fetchall()
    assert [row[0] for row in rows] == [encode_route_descriptor(r) for r in routes]


# --------------------------------------------------------------------------------------------
# Reading the catalog through the ORM (the README's query)
# --------------------------------------------------------------------------------------------


def test_readme_orm_query_reads_the_fenced_live_routes(store: CatalogStore) -> None:
    """The query the README shows, run as written against a catalog the store wrote."""
    routes = [
        RouteDescriptor(route_id=1, start=b"", end=b"g", group_id=1),
        RouteDescriptor(route_id=2**64 - 2, start=b"g", end=b"p", group_id=2**63, parent_route_id=1),
        RouteDescriptor(route_id=3, start=b"p", end=None, group_id=3),
    ]
    version = store.save(0, routes).version
    written = store.set_route_state(2**64 - 2, RouteState.WRITE_FENCED, version)
    store.set_route_state(3, RouteState.WRITE_FENCED, written.version)
    store.set_route_state(3, RouteState.ACTIVE, written.version + 1)

    with Session(store.sa_engine) as session:
        fenced = [
            record.descriptor()
            for record in session.scalars(
                RouteRecord.live().where(RouteRecord.state == RouteState.WRITE_FENCED)
            )
        ]

    assert fenced == [routes[1]._replace(state=RouteState.WRITE_FENCED)]
    assert type(fenced[0].state) is RouteState


def test_orm_live_routes_now_and_as_of_a_version_match_the_store(store: CatalogStore) -> None:
    """RouteRecord.live() and live(version) agree with snapshot() and snapshot_at()."""
    first = store.save(0, [RouteDescriptor(route_id=1, start=b"", end=None, group_id=1)])
    split = store.split_route(1, b"m", first.version)
    with Session(store.sa_engine) as session:
        now = [r.descriptor() for r in session.scalars(RouteRecord.live())]
        then = [r.descriptor() for r in session.scalars(RouteRecord.live(first.version))]
        records = session.scalars(RouteRecord.live()).all()
    assert tuple(now) == store.snapshot().routes
    assert len(now) == 2 and split.version == store.version()
    assert tuple(then) == store.snapshot_at(first.version).routes == first.routes
    assert all(type(r.state) is RouteState and r.valid_from == split.version for r in records)


def test_history_records_read_back_what_the_store_reports(store: CatalogStore) -> None:
    store.save(0, [RouteDescriptor(route_id=1, start=b"", end=None, group_id=1)], actor="orm")
    with Session(store.sa_engine) as session:
        records = session.scalars(sa.select(HistoryRecord).order_by(HistoryRecord.version)).all()
        read = [(r.version, r.operation, r.arguments, r.actor) for r in records]
    assert read == [(e.version, e.operation, e.arguments, e.actor) for e in store.history()]
    assert read[0][0] == 1 and read[0][3] == "orm"

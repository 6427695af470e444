"""SQLAlchemy models of the catalog's tables, the single source of their schema.

Unsigned 64-bit values (ids, versions) are stored in ``BIGINT`` shifted down by ``2**63``: the
whole u64 range fits, and order is preserved, so ``valid_from <= :version`` means what it says.
:class:`U64` hides the shift from SQLAlchemy code; raw SQL goes through :func:`u64_to_db` and
:func:`u64_from_db`. So version 0 is stored as ``-9223372036854775808``.

Route rows are versioned: a write never updates a route in place. It closes the live row
(``valid_to`` = the new version) and opens a new one (``valid_from`` = the new version), so any
version inside the history window can be read back exactly.

The invariants the database enforces itself, whoever writes:

* ``distribution_meta`` holds exactly one row (a check on its key, and a trigger that refuses
  deleting it);
* route ids and group ids are non-zero, states are the four known, ``start < end``;
* a live route id appears once and two live routes never share a start (partial unique indexes);
* live routes never overlap: a statement-level trigger (in the migrations) checks each new live
  row against its two neighbours through the live-start index, so the cost stays flat with the
  catalog size. Writers serialize on the metadata row.

Reading the catalog through the ORM: the records carry real values (u64 ids, states as
:class:`~distribution.RouteState`), :meth:`RouteRecord.live` selects the routes live now or as of a
version, and :meth:`RouteRecord.descriptor` turns a record into a ``RouteDescriptor``::

    with Session(sa_engine) as session:
        routes = [r.descriptor() for r in session.scalars(RouteRecord.live())]

Triggers also keep ``distribution_meta.digest``, the XOR of a hash of every live route, whoever
writes: two catalogs at one version hold the same routes exactly when their digests agree.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ColumnElement,
    DateTime,
    Index,
    LargeBinary,
    MetaData,
    Select,
    SmallInteger,
    Text,
    func,
    or_,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from distribution.types import ROUTE_STATES, RouteDescriptor, RouteState

__all__ = [
    "U64",
    "U64_DB_MAX",
    "U64_DB_ZERO",
    "Base",
    "CatalogMeta",
    "HistoryRecord",
    "RouteRecord",
    "RouteStateType",
    "u64_from_db",
    "u64_to_db",
]

_SHIFT = 2**63
#: How u64 ``0`` is stored.
U64_DB_ZERO = -_SHIFT
#: How u64 ``2**64 - 1`` is stored.
U64_DB_MAX = _SHIFT - 1


#: Return the stored form of a u64 (a C-level bound method: cheap inside ``map``).
#:
#: >>> u64_to_db(0), u64_to_db(2**63), u64_to_db(2**64 - 1)
#: (-9223372036854775808, 0, 9223372036854775807)
u64_to_db: Callable[[int], int] = (-_SHIFT).__add__
#: Return the u64 whose stored form is given: ``u64_from_db(-2**63) == 0``.
u64_from_db: Callable[[int], int] = _SHIFT.__add__


class U64(TypeDecorator[int]):
    """An unsigned 64-bit integer kept in a ``BIGINT`` shifted by ``2**63``."""

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: int | None, dialect: Dialect) -> int | None:
        return None if value is None else value - _SHIFT

    def process_result_value(self, value: Any, dialect: Dialect) -> int | None:
        return None if value is None else int(value) + _SHIFT


class RouteStateType(TypeDecorator[RouteState]):
    """A route state kept in a ``SMALLINT``, read back as its :class:`~distribution.RouteState`."""

    impl = SmallInteger
    cache_ok = True

    def process_bind_param(self, value: int | None, dialect: Dialect) -> int | None:
        return None if value is None else int(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> RouteState | None:
        return None if value is None else ROUTE_STATES[value]


class Base(DeclarativeBase):
    """Declarative base of the catalog's models."""

    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class CatalogMeta(Base):
    """The single metadata row: the catalog version, the route id counter, the history floor."""

    __tablename__ = "distribution_meta"
    __table_args__ = (
        CheckConstraint("id = 1", name="single_row"),
        CheckConstraint(f"next_route_id <> {U64_DB_ZERO}", name="next_route_id_nonzero"),
        CheckConstraint("history_floor <= version", name="history_floor_reached"),
    )

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True, server_default=text("1"))
    #: The catalog version; every write moves it by exactly one.
    version: Mapped[int] = mapped_column(U64, nullable=False)
    #: The next route id to allocate; it never goes down, so ids are never reused.
    next_route_id: Mapped[int] = mapped_column(U64, nullable=False)
    #: The oldest version that can still be read back exactly.
    history_floor: Mapped[int] = mapped_column(U64, nullable=False)
    #: XOR of a 64-bit hash of every live route, kept by triggers: equal digests at one version
    #: mean equal routes, which lets a save send only the routes that changed.
    digest: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    #: The top-level transaction id (``pg_current_xact_id()``) of the write that last moved the
    #: version, set by a trigger: routes and history change only in that transaction.
    write_xact_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class RouteRecord(Base):
    """One version of one route: live from ``valid_from`` until ``valid_to`` (None: still live)."""

    __tablename__ = "distribution_routes"
    __table_args__ = (
        CheckConstraint(f"route_id <> {U64_DB_ZERO}", name="route_id_nonzero"),
        CheckConstraint(f"group_id <> {U64_DB_ZERO}", name="group_id_nonzero"),
        CheckConstraint("state BETWEEN 0 AND 3", name="state_known"),
        CheckConstraint('"end" IS NULL OR start < "end"', name="range_nonempty"),
        CheckConstraint("valid_to IS NULL OR valid_to > valid_from", name="validity_ordered"),
        Index(
            "ix_distribution_routes_live_route_id",
            "route_id",
            unique=True,
            postgresql_where=text("valid_to IS NULL"),
        ),
        Index(
            "ix_distribution_routes_live_start",
            "start",
            unique=True,
            postgresql_where=text("valid_to IS NULL"),
        ),
        Index("ix_distribution_routes_valid_from", "valid_from"),
        Index(
            "ix_distribution_routes_valid_to",
            "valid_to",
            postgresql_where=text("valid_to IS NOT NULL"),
        ),
    )

    route_id: Mapped[int] = mapped_column(U64, primary_key=True)
    valid_from: Mapped[int] = mapped_column(U64, primary_key=True)
    valid_to: Mapped[int | None] = mapped_column(U64, nullable=True)
    start: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    end: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    group_id: Mapped[int] = mapped_column(U64, nullable=False)
    state: Mapped[RouteState] = mapped_column(RouteStateType, nullable=False)
    parent_route_id: Mapped[int] = mapped_column(U64, nullable=False)

    @classmethod
    def live_at(cls, version: int | ColumnElement[int] | None = None) -> ColumnElement[bool]:
        """The condition of the rows live at ``version`` (a value or a bound parameter), or live
        now when ``version`` is None."""
        if version is None:
            return cls.valid_to.is_(None)
        return (cls.valid_from <= version) & or_(cls.valid_to.is_(None), cls.valid_to > version)

    @classmethod
    def live(cls, version: int | None = None) -> Select[RouteRecord]:
        """Select the routes live now (or as of ``version``) in key order; O(routes) to run.

        ``version`` is read exactly only within the history window (see
        :meth:`~distribution.CatalogStore.prune_history`): older versions may have lost rows.
        """
        return select(cls).where(cls.live_at(version)).order_by(cls.start)

    def descriptor(self) -> RouteDescriptor:
        """This record's route as a :class:`~distribution.RouteDescriptor`; O(1)."""
        return RouteDescriptor(
            route_id=self.route_id,
            start=self.start,
            end=self.end,
            group_id=self.group_id,
            state=self.state,
            parent_route_id=self.parent_route_id,
        )


class HistoryRecord(Base):
    """The audit entry of one write: what was done, by whom, and what it produced."""

    __tablename__ = "distribution_history"
    __table_args__ = (
        Index(
            "ix_distribution_history_request_id",
            "request_id",
            unique=True,
            postgresql_where=text("request_id IS NOT NULL"),
        ),
    )

    version: Mapped[int] = mapped_column(U64, primary_key=True)
    operation: Mapped[str] = mapped_column(Text, nullable=False)
    arguments: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    actor: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: The route id counter after the write, so ``next_route_id_at`` answers exactly.
    next_route_id: Mapped[int] = mapped_column(U64, nullable=False)
    #: The catalog's route digest after the write (None for writes made before revision 0004).
    digest: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    #: The id the caller named the write by (None for an unnamed write or one made before
    #: revision 0004): a retry with the same id replays this entry instead of writing again.
    request_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: The SHA-256 (hex) of the named write's operation and arguments, so that an id reused for
    #: another write is refused rather than taken for a retry.
    request_digest: Mapped[str | None] = mapped_column(Text, nullable=True)
    committed_at: Mapped[datetime.datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )

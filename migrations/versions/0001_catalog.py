"""The route catalog: metadata, versioned routes, audit history, and the SQL that guards them.

Revision ID: 0001
Revises:
Create Date: 2026-11-26

Unsigned 64-bit values are stored shifted by -2**63 (see distribution.models); the server
functions (migrations/sql/) work on stored values and show u64 values to people through
``distribution_u64()``. The errors they raise on purpose use SQLSTATE class ``UD``, each the
``sqlstate`` of its class in distribution.errors. Overlapping live routes raise
exclusion_violation (23P01) with the constraint name ``distribution_routes_no_overlap``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from distribution.migrations.replaceable import create, drop
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ZERO = -(2**63)

#: The indexes of distribution_routes: name, column, unique, the predicate of a partial index.
_ROUTE_INDEXES = (
    ("ix_distribution_routes_live_route_id", "route_id", True, "valid_to IS NULL"),
    ("ix_distribution_routes_live_start", "start", True, "valid_to IS NULL"),
    ("ix_distribution_routes_valid_from", "valid_from", False, None),
    ("ix_distribution_routes_valid_to", "valid_to", False, "valid_to IS NOT NULL"),
)

#: The server functions, then the triggers, in migrations/sql/, in the order they are created.
OBJECTS = (
    "distribution_u64",
    "distribution_u64_stored",
    "distribution_u64_bytes",
    "distribution_encode_route",
    "distribution_meta_keep",
    "distribution_routes_no_overlap",
    "distribution_begin_write",
    "distribution_route_id_floor",
    "distribution_allocate_route_ids",
    "distribution_change_payload",
    "distribution_finish_write",
    "distribution_save_desired",
    "distribution_live_route",
    "distribution_split_route",
    "distribution_merge_routes",
    "distribution_replace_route",
    "distribution_set_route_state",
    "distribution_move_route",
    "distribution_meta_keep_row",
    "distribution_meta_keep_table",
    "distribution_routes_no_overlap_insert",
    "distribution_routes_no_overlap_update",
)


def upgrade() -> None:
    op.create_table(
        "distribution_meta",
        sa.Column("id", sa.SmallInteger(), server_default=sa.text("1"), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("next_route_id", sa.BigInteger(), nullable=False),
        sa.Column("history_floor", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_distribution_meta_single_row")),
        sa.CheckConstraint(
            f"next_route_id <> {_ZERO}", name=op.f("ck_distribution_meta_next_route_id_nonzero")
        ),
        sa.CheckConstraint(
            "history_floor <= version", name=op.f("ck_distribution_meta_history_floor_reached")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_distribution_meta")),
    )
    op.execute(
        f"INSERT INTO distribution_meta (id, version, next_route_id, history_floor) "
        f"VALUES (1, {_ZERO}, {_ZERO + 1}, {_ZERO})"
    )
    op.create_table(
        "distribution_routes",
        sa.Column("route_id", sa.BigInteger(), nullable=False),
        sa.Column("valid_from", sa.BigInteger(), nullable=False),
        sa.Column("valid_to", sa.BigInteger(), nullable=True),
        sa.Column("start", sa.LargeBinary(), nullable=False),
        sa.Column("end", sa.LargeBinary(), nullable=True),
        sa.Column("group_id", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.SmallInteger(), nullable=False),
        sa.Column("parent_route_id", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            f"route_id <> {_ZERO}", name=op.f("ck_distribution_routes_route_id_nonzero")
        ),
        sa.CheckConstraint(
            f"group_id <> {_ZERO}", name=op.f("ck_distribution_routes_group_id_nonzero")
        ),
        sa.CheckConstraint("state BETWEEN 0 AND 3", name=op.f("ck_distribution_routes_state_known")),
        sa.CheckConstraint(
            '"end" IS NULL OR start < "end"', name=op.f("ck_distribution_routes_range_nonempty")
        ),
        sa.CheckConstraint(
            "valid_to IS NULL OR valid_to > valid_from",
            name=op.f("ck_distribution_routes_validity_ordered"),
        ),
        sa.PrimaryKeyConstraint("route_id", "valid_from", name=op.f("pk_distribution_routes")),
    )
    for name, column, unique, where in _ROUTE_INDEXES:
        op.create_index(
            name,
            "distribution_routes",
            [column],
            unique=unique,
            postgresql_where=None if where is None else sa.text(where),
        )
    op.create_table(
        "distribution_history",
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("operation", sa.Text(), nullable=False),
        sa.Column("arguments", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("actor", sa.Text(), nullable=True),
        sa.Column("next_route_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "committed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_distribution_history")),
    )
    create(revision, *OBJECTS)


def downgrade() -> None:
    drop(*OBJECTS)
    op.drop_table("distribution_history")
    for name, *_ in reversed(_ROUTE_INDEXES):
        op.drop_index(name, table_name="distribution_routes")
    op.drop_table("distribution_routes")
    op.drop_table("distribution_meta")

"""Every write records and announces the route digest it left; the database refuses what it
cannot version.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

``distribution_history.digest`` is ``distribution_meta.digest`` after the write of that entry
(NULL for entries written before this revision), and the notification payload of a change
carries it as ``"digest"``: a watcher checks that the change it applies from a payload, or reads
from the history, leaves the routes the catalog held after that write.

Triggers refuse, whoever writes: a change of routes or history in a transaction that has not
moved the version through ``distribution_begin_write`` (``distribution_meta.write_xact_id`` holds
the top-level id of the transaction that last moved it, set by the metadata row's trigger and by
nothing else); a version change other than +1; the id counter or the digest changed outside such
a transaction, the digest by anything but the routes' triggers; deleting route rows or history
entries the history window still needs (pruning raises the floor first, then removes what lies
below it), TRUNCATE, and lowering the floor. The errors use SQLSTATEs UD012 to UD015.

A write may be named by a request id (``distribution_history.request_id``, unique when set, with
``request_digest`` the hash of what was asked): a retry of a write whose outcome its caller could
not learn finds the entry and replays its result instead of writing again.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from distribution.migrations.replaceable import create, drop, replace, restore

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The server objects this revision adds (migrations/sql/), functions first.
OBJECTS = (
    "distribution_meta_guard",
    "distribution_versioned_guard",
    "distribution_history_guard",
    "distribution_meta_check_update",
    "distribution_routes_check_write",
    "distribution_history_check_write",
    "distribution_routes_check_delete",
    "distribution_history_check_delete",
    "distribution_routes_check_truncate",
    "distribution_history_check_truncate",
)
#: The server objects this revision redefines (migrations/sql/, each with its NAME.0004.diff).
REPLACED = ("distribution_finish_write", "distribution_change_payload")


def upgrade() -> None:
    op.add_column("distribution_history", sa.Column("digest", sa.BigInteger(), nullable=True))
    op.add_column("distribution_meta", sa.Column("write_xact_id", sa.BigInteger(), nullable=True))
    op.add_column("distribution_history", sa.Column("request_id", sa.Text(), nullable=True))
    op.add_column("distribution_history", sa.Column("request_digest", sa.Text(), nullable=True))
    op.create_index(
        "ix_distribution_history_request_id",
        "distribution_history",
        ["request_id"],
        unique=True,
        postgresql_where=sa.text("request_id IS NOT NULL"),
    )
    replace(revision, *REPLACED)
    create(revision, *OBJECTS)


def downgrade() -> None:
    drop(*OBJECTS)
    restore(revision, *REPLACED)
    op.drop_index("ix_distribution_history_request_id", table_name="distribution_history")
    op.drop_column("distribution_history", "request_digest")
    op.drop_column("distribution_history", "request_id")
    op.drop_column("distribution_meta", "write_xact_id")
    op.drop_column("distribution_history", "digest")

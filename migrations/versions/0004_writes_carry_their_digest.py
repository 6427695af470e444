"""Every write records and announces the route digest it left.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

``distribution_history.digest`` is ``distribution_meta.digest`` after the write of that entry
(NULL for entries written before this revision), and the notification payload of a change
carries it as ``"digest"``: a watcher checks that the change it applies from a payload, or reads
from the history, leaves the routes the catalog held after that write.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from distribution.migrations.replaceable import replace, restore

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The server objects this revision redefines (migrations/sql/, each with its NAME.0004.diff).
REPLACED = ("distribution_finish_write", "distribution_change_payload")


def upgrade() -> None:
    op.add_column("distribution_history", sa.Column("digest", sa.BigInteger(), nullable=True))
    replace(revision, *REPLACED)


def downgrade() -> None:
    restore(revision, *REPLACED)
    op.drop_column("distribution_history", "digest")

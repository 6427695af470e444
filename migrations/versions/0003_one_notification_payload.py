"""One server function builds every notification payload, reading back a save's rows itself.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

``distribution_change_payload`` names its two size limits; the two save functions no longer
collect the rows of their change (the same block, twice) and pass NULLs for it instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from distribution.migrations.replaceable import replace, restore

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The server objects this revision redefines (migrations/sql/, with their NAME.0003.diff).
REPLACED = ("distribution_change_payload", "distribution_save_desired", "distribution_save_changes")


def upgrade() -> None:
    replace(revision, *REPLACED)


def downgrade() -> None:
    restore(revision, *REPLACED)

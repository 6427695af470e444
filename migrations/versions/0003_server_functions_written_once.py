"""Server functions that each write something once.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

``distribution_change_payload`` builds every notification payload and names its two size
limits; the two save functions no longer collect the rows of their change themselves (the same
block, twice). ``distribution_change_route`` changes a live route's state or group, which
``distribution_set_route_state`` and ``distribution_move_route`` did with the same steps, twice.
The functions keep their names, arguments and behaviour.
"""

from __future__ import annotations

from collections.abc import Sequence

from distribution.migrations.replaceable import create, drop, replace, restore

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The server objects this revision adds (migrations/sql/).
OBJECTS = ("distribution_change_route",)
#: The server objects this revision redefines (migrations/sql/, each with its NAME.0003.diff).
REPLACED = (
    "distribution_change_payload",
    "distribution_save_desired",
    "distribution_save_changes",
    "distribution_set_route_state",
    "distribution_move_route",
)


def upgrade() -> None:
    create(revision, *OBJECTS)
    replace(revision, *REPLACED)


def downgrade() -> None:
    restore(revision, *REPLACED)
    drop(*OBJECTS)

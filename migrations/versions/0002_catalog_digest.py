"""A digest of the live routes, kept by the database, and saves that send only what changed.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

``distribution_meta.digest`` is the XOR of a 64-bit hash of every live route (the first 8 bytes
of the MD5 of its seed record). Statement-level triggers keep it whatever writes the routes, so
two catalogs at the same version hold the same routes exactly when their digests match (up to a
2**-64 chance). A store that knows the routes of version V, and finds the catalog at version V
with the digest it read then, can send the routes that changed instead of every route:
``distribution_save_changes`` applies such a change.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from distribution.migrations.replaceable import create, drop

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The digest's server functions and triggers (migrations/sql/), in the order they are created.
OBJECTS = (
    "distribution_route_hash",
    "distribution_routes_digest",
    "distribution_routes_digest_insert",
    "distribution_routes_digest_update",
    "distribution_routes_digest_delete",
    "distribution_routes_truncated",
    "distribution_routes_digest_truncate",
    "distribution_save_changes",
)


def upgrade() -> None:
    op.add_column(
        "distribution_meta",
        sa.Column("digest", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
    )
    create(revision, *OBJECTS)
    op.execute(
        "UPDATE distribution_meta SET digest = (SELECT coalesce(bit_xor(distribution_route_hash("
        'route_id, start, "end", group_id, state, parent_route_id)), 0) '
        "FROM distribution_routes WHERE valid_to IS NULL)"
    )


def downgrade() -> None:
    drop(*OBJECTS)
    op.drop_column("distribution_meta", "digest")

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

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ROUTE_FIELDS = 'route_id, start, "end", group_id, state, parent_route_id'

_FUNCTIONS = f"""
CREATE FUNCTION distribution_route_hash(
    route_id bigint, start bytea, "end" bytea, group_id bigint, state smallint,
    parent_route_id bigint
) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ('x' || left(md5(distribution_encode_route({_ROUTE_FIELDS})), 16))::bit(64)::bigint;

-- XORs the hashes of the live rows a statement removed (old_routes) and added (new_routes) into
-- the digest. An UPDATE that closes a route removes its live row; an INSERT of a live row adds it.
CREATE FUNCTION distribution_routes_digest() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    change bigint := 0;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        SELECT change # coalesce(bit_xor(distribution_route_hash({_ROUTE_FIELDS})), 0)
        INTO change FROM old_routes WHERE valid_to IS NULL;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        SELECT change # coalesce(bit_xor(distribution_route_hash({_ROUTE_FIELDS})), 0)
        INTO change FROM new_routes WHERE valid_to IS NULL;
    END IF;
    IF change <> 0 THEN
        UPDATE distribution_meta SET digest = digest # change;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER distribution_routes_digest_insert AFTER INSERT ON distribution_routes
REFERENCING NEW TABLE AS new_routes
FOR EACH STATEMENT EXECUTE FUNCTION distribution_routes_digest();
CREATE TRIGGER distribution_routes_digest_update AFTER UPDATE ON distribution_routes
REFERENCING OLD TABLE AS old_routes NEW TABLE AS new_routes
FOR EACH STATEMENT EXECUTE FUNCTION distribution_routes_digest();
CREATE TRIGGER distribution_routes_digest_delete AFTER DELETE ON distribution_routes
REFERENCING OLD TABLE AS old_routes
FOR EACH STATEMENT EXECUTE FUNCTION distribution_routes_digest();

-- TRUNCATE has no transition table, and leaves no route: the digest of nothing.
CREATE FUNCTION distribution_routes_truncated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE distribution_meta SET digest = 0;
    RETURN NULL;
END
$$;

CREATE TRIGGER distribution_routes_digest_truncate AFTER TRUNCATE ON distribution_routes
FOR EACH STATEMENT EXECUTE FUNCTION distribution_routes_truncated();

-- Applies a change as version `written`: the routes staged in the temporary table
-- distribution_desired are new or changed (their live rows close, new rows open), the routes
-- whose ids are in `removed` retire. The caller checked the digest: the catalog holds the routes
-- the change was computed against. `routes` is the size of the whole new catalog, for the audit.
CREATE FUNCTION distribution_save_changes(
    written bigint, actor text, removed bigint[], routes bigint
) RETURNS integer[]
LANGUAGE plpgsql AS $$
DECLARE
    retired integer;
    opened integer;
    upserted distribution_routes[];
    deleted bigint[];
BEGIN
    -- One array of ids, so the live-route-id index finds the rows (an OR would scan).
    UPDATE distribution_routes r SET valid_to = written
    WHERE r.valid_to IS NULL AND r.route_id = ANY (
        removed || ARRAY(SELECT d.route_id FROM pg_temp.distribution_desired d));
    GET DIAGNOSTICS retired = ROW_COUNT;
    INSERT INTO distribution_routes ({_ROUTE_FIELDS}, valid_from)
    SELECT {_ROUTE_FIELDS}, written FROM pg_temp.distribution_desired;
    GET DIAGNOSTICS opened = ROW_COUNT;
    UPDATE distribution_meta
    SET next_route_id = greatest(next_route_id, distribution_route_id_floor());
    -- A change too large for a notification is announced by its version alone.
    IF opened + retired <= 200 THEN
        SELECT coalesce(array_agg(r ORDER BY r.start), '{{}}') INTO upserted
        FROM distribution_routes r WHERE r.valid_from = written;
        SELECT coalesce(array_agg(c.route_id ORDER BY c.route_id), '{{}}') INTO deleted
        FROM distribution_routes c
        WHERE c.valid_to = written AND NOT EXISTS (
            SELECT 1 FROM distribution_routes u
            WHERE u.valid_from = written AND u.route_id = c.route_id);
    END IF;
    PERFORM distribution_finish_write(written, 'save',
        jsonb_build_object('routes', routes, 'opened', opened, 'retired', retired),
        actor, upserted, deleted);
    RETURN ARRAY[opened, retired];
END
$$;
"""

_DROP_FUNCTIONS = """
DROP TRIGGER distribution_routes_digest_truncate ON distribution_routes;
DROP TRIGGER distribution_routes_digest_delete ON distribution_routes;
DROP TRIGGER distribution_routes_digest_update ON distribution_routes;
DROP TRIGGER distribution_routes_digest_insert ON distribution_routes;
DROP FUNCTION distribution_save_changes, distribution_routes_truncated, distribution_routes_digest,
    distribution_route_hash;
"""


def upgrade() -> None:
    op.add_column(
        "distribution_meta",
        sa.Column("digest", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
    )
    _execute_script(_FUNCTIONS)
    _execute_script(
        "UPDATE distribution_meta SET digest = (SELECT coalesce(bit_xor(distribution_route_hash("
        f"{_ROUTE_FIELDS})), 0) FROM distribution_routes WHERE valid_to IS NULL)"
    )


def _execute_script(script: str) -> None:
    # Straight to psycopg without parameters: several statements in one go, `%` left alone.
    op.get_bind().connection.driver_connection.execute(script)  # type: ignore[union-attr]


def downgrade() -> None:
    _execute_script(_DROP_FUNCTIONS)
    op.drop_column("distribution_meta", "digest")

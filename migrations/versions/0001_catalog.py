"""The route catalog: metadata, versioned routes, audit history, and the SQL that guards them.

Revision ID: 0001
Revises:
Create Date: 2026-11-26

Unsigned 64-bit values are stored shifted by -2**63 (see distribution.models); the SQL below
works on stored values and shows u64 values to people through ``distribution_u64()``.

Errors raised on purpose use SQLSTATE class ``UD`` (mapped in distribution.database):
UD001 version mismatch, UD002 version overflow, UD003 route id overflow, UD004 route not found,
UD005 split key at a boundary, UD006 split key outside the route, UD007 routes not adjacent,
UD008 group mismatch, UD009 route not ACTIVE, UD010 state transition not allowed,
UD011 route not WRITE_FENCED. Overlapping live routes raise exclusion_violation (23P01) with the
constraint name ``distribution_routes_no_overlap``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ZERO = -(2**63)
_MAX = 2**63 - 1

_FUNCTIONS = f"""
CREATE FUNCTION distribution_u64(stored bigint) RETURNS numeric
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN stored::numeric + 9223372036854775808;

CREATE FUNCTION distribution_u64_stored(value numeric) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN (value - 9223372036854775808)::bigint;

-- The seed's big-endian u64 encoding of a stored value: flip the sign bit back.
CREATE FUNCTION distribution_u64_bytes(stored bigint) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN set_byte(int8send(stored), 0, get_byte(int8send(stored), 0) # 128);

-- The seed's route record (codec version 1), byte for byte.
CREATE FUNCTION distribution_encode_route(
    route_id bigint, start bytea, "end" bytea, group_id bigint, state smallint,
    parent_route_id bigint
) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN '\\x01'::bytea
    || distribution_u64_bytes(route_id) || distribution_u64_bytes(group_id)
    || set_byte('\\x00'::bytea, 0, state) || distribution_u64_bytes(parent_route_id)
    || int8send(octet_length(start)::bigint) || start
    || CASE WHEN "end" IS NULL THEN '\\x00'::bytea
            ELSE '\\x01'::bytea || int8send(octet_length("end")::bigint) || "end" END;

CREATE FUNCTION distribution_meta_keep() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the catalog metadata row cannot be removed'
        USING ERRCODE = 'restrict_violation';
END
$$;

-- Each new live route must not overlap its two live neighbours. Checked per statement, through
-- the live-start index, so the cost per route is flat in the catalog size. The metadata row lock
-- serializes writers, so two concurrent writers cannot both miss each other's routes.
CREATE FUNCTION distribution_routes_no_overlap() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    PERFORM 1 FROM distribution_meta FOR NO KEY UPDATE;
    SELECT n.route_id, n.start INTO bad
    FROM new_rows n
    WHERE n.valid_to IS NULL
      AND (EXISTS (
              SELECT 1 FROM (
                  SELECT p."end" FROM distribution_routes p
                  WHERE p.valid_to IS NULL AND p.start < n.start
                  ORDER BY p.start DESC LIMIT 1) prev
              WHERE prev."end" IS NULL OR prev."end" > n.start)
        OR EXISTS (
              SELECT 1 FROM (
                  SELECT s.start FROM distribution_routes s
                  WHERE s.valid_to IS NULL AND s.start > n.start
                  ORDER BY s.start LIMIT 1) nxt
              WHERE n."end" IS NULL OR n."end" > nxt.start))
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'catalog route % starting at % overlaps a live route',
                distribution_u64(bad.route_id), bad.start
            USING ERRCODE = 'exclusion_violation', CONSTRAINT = 'distribution_routes_no_overlap';
    END IF;
    RETURN NULL;
END
$$;

-- The compare-and-set every write starts with: the conditional UPDATE queues concurrent writers
-- on the metadata row, and a loser finds no row to update.
CREATE FUNCTION distribution_begin_write(expected bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    written bigint;
    current bigint;
BEGIN
    UPDATE distribution_meta SET version = version + 1
    WHERE version = expected AND version < {_MAX}
    RETURNING version INTO written;
    IF FOUND THEN
        RETURN written;
    END IF;
    SELECT version INTO current FROM distribution_meta;
    IF current = expected THEN
        RAISE EXCEPTION 'catalog version overflow: version % is the last one',
                distribution_u64(current)
            USING ERRCODE = 'UD002';
    END IF;
    RAISE EXCEPTION 'catalog version mismatch: expected version %, the catalog is at version %',
            distribution_u64(expected), distribution_u64(current)
        USING ERRCODE = 'UD001';
END
$$;

-- The floor of the route id counter: above every id ever used, so none is reused.
CREATE FUNCTION distribution_route_id_floor() RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    highest bigint;
BEGIN
    SELECT max(route_id) INTO highest FROM distribution_routes;
    IF highest = {_MAX} THEN
        RAISE EXCEPTION 'catalog route id overflow' USING ERRCODE = 'UD003';
    END IF;
    RETURN coalesce(highest, {_ZERO}) + 1;
END
$$;

-- Allocates count route ids: never below the counter, never below any id ever used.
CREATE FUNCTION distribution_allocate_route_ids(count integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    first bigint;
BEGIN
    SELECT greatest(m.next_route_id, distribution_route_id_floor()) INTO first
    FROM distribution_meta m;
    IF first > {_MAX} - count THEN
        RAISE EXCEPTION 'catalog route id overflow' USING ERRCODE = 'UD003';
    END IF;
    UPDATE distribution_meta SET next_route_id = first + count;
    RETURN first;
END
$$;

-- The notification payload of a write: the new version in decimal, then, when the change is
-- known (upserts not NULL) and small enough to fit, a JSON object with the previous version, the
-- upserted routes as base64 seed route records, and the deleted route ids. Built from the rows
-- the write holds, not read back from the table.
CREATE FUNCTION distribution_change_payload(
    written bigint, upserts distribution_routes[], deletes bigint[]
) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    head text := distribution_u64(written)::text;
    payload text;
BEGIN
    IF upserts IS NULL THEN
        RETURN head;
    END IF;
    payload := head || ' ' || json_build_object(
        'previous', distribution_u64(written - 1),
        'upserts', (SELECT coalesce(json_agg(translate(encode(distribution_encode_route(
                        u.route_id, u.start, u."end", u.group_id, u.state, u.parent_route_id),
                        'base64'), E'\\n', '') ORDER BY u.start), '[]')
                    FROM unnest(upserts) u),
        'deletes', (SELECT coalesce(json_agg(distribution_u64(d) ORDER BY d), '[]')
                    FROM unnest(deletes) d))::text;
    IF octet_length(payload) >= 8000 THEN
        RETURN head;
    END IF;
    RETURN payload;
END
$$;

-- The end of every write: the audit entry, then the notification (delivered on commit only).
CREATE FUNCTION distribution_finish_write(
    written bigint, operation text, arguments jsonb, actor text,
    upserts distribution_routes[], deletes bigint[]
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO distribution_history (version, operation, arguments, actor, next_route_id)
    SELECT written, operation, arguments, actor, m.next_route_id FROM distribution_meta m;
    PERFORM pg_notify('distribution_catalog',
                      distribution_change_payload(written, upserts, deletes));
END
$$;

-- Applies the routes staged in the temporary table distribution_desired as version `written`:
-- closes the live rows that changed or went away, opens rows for the new and changed routes,
-- raises the id counter to the floor of every id ever used. Unchanged rows are not touched.
CREATE FUNCTION distribution_save_desired(written bigint, actor text)
RETURNS integer[]
LANGUAGE plpgsql AS $$
DECLARE
    retired integer;
    opened integer;
    upserted distribution_routes[];
    deleted bigint[];
BEGIN
    ANALYZE pg_temp.distribution_desired;
    UPDATE distribution_routes r SET valid_to = written
    WHERE r.valid_to IS NULL AND NOT EXISTS (
        SELECT 1 FROM pg_temp.distribution_desired d
        WHERE d.route_id = r.route_id AND d.start = r.start
          AND d."end" IS NOT DISTINCT FROM r."end" AND d.group_id = r.group_id
          AND d.state = r.state AND d.parent_route_id = r.parent_route_id);
    GET DIAGNOSTICS retired = ROW_COUNT;
    INSERT INTO distribution_routes
        (route_id, start, "end", group_id, state, parent_route_id, valid_from)
    SELECT d.route_id, d.start, d."end", d.group_id, d.state, d.parent_route_id, written
    FROM pg_temp.distribution_desired d
    WHERE NOT EXISTS (
        SELECT 1 FROM distribution_routes r
        WHERE r.valid_to IS NULL AND r.route_id = d.route_id);
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
        jsonb_build_object('routes', (SELECT count(*) FROM pg_temp.distribution_desired),
                           'opened', opened, 'retired', retired),
        actor, upserted, deleted);
    RETURN ARRAY[opened, retired];
END
$$;

CREATE FUNCTION distribution_live_route(wanted bigint) RETURNS distribution_routes
LANGUAGE plpgsql STABLE AS $$
DECLARE
    found_route distribution_routes;
BEGIN
    SELECT * INTO found_route FROM distribution_routes
    WHERE route_id = wanted AND valid_to IS NULL;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'catalog route % not found', distribution_u64(wanted)
            USING ERRCODE = 'UD004';
    END IF;
    RETURN found_route;
END
$$;

CREATE FUNCTION distribution_split_route(
    parent_id bigint, split_key bytea, expected bigint, actor text
) RETURNS SETOF distribution_routes
LANGUAGE plpgsql AS $$
DECLARE
    written bigint := distribution_begin_write(expected);
    parent distribution_routes := distribution_live_route(parent_id);
    left_id bigint;
    created distribution_routes[];
BEGIN
    IF split_key = parent.start OR split_key = parent."end" THEN
        RAISE EXCEPTION 'split key % is a boundary of catalog route %', split_key,
                distribution_u64(parent_id)
            USING ERRCODE = 'UD005';
    END IF;
    IF split_key < parent.start OR split_key > parent."end" THEN
        RAISE EXCEPTION 'split key % lies outside catalog route % [%, %)', split_key,
                distribution_u64(parent_id), parent.start, coalesce(parent."end"::text, 'unbounded')
            USING ERRCODE = 'UD006';
    END IF;
    left_id := distribution_allocate_route_ids(2);
    UPDATE distribution_routes SET valid_to = written
    WHERE route_id = parent_id AND valid_to IS NULL;
    WITH inserted (route) AS (
        INSERT INTO distribution_routes
            (route_id, start, "end", group_id, state, parent_route_id, valid_from)
        VALUES (left_id, parent.start, split_key, parent.group_id, parent.state, parent_id, written),
               (left_id + 1, split_key, parent."end", parent.group_id, parent.state, parent_id,
                written)
        RETURNING distribution_routes)
    SELECT array_agg(route ORDER BY (route).start) INTO created FROM inserted;
    PERFORM distribution_finish_write(written, 'split_route',
        jsonb_build_object('route_id', distribution_u64(parent_id),
                           'split_key', encode(split_key, 'hex')),
        actor, created, ARRAY[parent_id]);
    RETURN QUERY SELECT * FROM unnest(created);
END
$$;

CREATE FUNCTION distribution_merge_routes(
    left_id bigint, right_id bigint, expected bigint, actor text
) RETURNS SETOF distribution_routes
LANGUAGE plpgsql AS $$
DECLARE
    written bigint := distribution_begin_write(expected);
    left_route distribution_routes := distribution_live_route(left_id);
    right_route distribution_routes := distribution_live_route(right_id);
    merged distribution_routes;
BEGIN
    IF left_route."end" IS NULL OR left_route."end" <> right_route.start THEN
        RAISE EXCEPTION 'catalog routes % and % are not adjacent', distribution_u64(left_id),
                distribution_u64(right_id)
            USING ERRCODE = 'UD007';
    END IF;
    IF left_route.group_id <> right_route.group_id THEN
        RAISE EXCEPTION 'catalog routes % and % belong to groups % and %',
                distribution_u64(left_id), distribution_u64(right_id),
                distribution_u64(left_route.group_id), distribution_u64(right_route.group_id)
            USING ERRCODE = 'UD008';
    END IF;
    IF left_route.state <> 0 OR right_route.state <> 0 THEN
        RAISE EXCEPTION 'catalog routes % and % must both be ACTIVE to merge',
                distribution_u64(left_id), distribution_u64(right_id)
            USING ERRCODE = 'UD009';
    END IF;
    UPDATE distribution_routes SET valid_to = written
    WHERE route_id IN (left_id, right_id) AND valid_to IS NULL;
    INSERT INTO distribution_routes
        (route_id, start, "end", group_id, state, parent_route_id, valid_from)
    VALUES (distribution_allocate_route_ids(1), left_route.start, right_route."end",
            left_route.group_id, 0, left_id, written)
    RETURNING * INTO merged;
    PERFORM distribution_finish_write(written, 'merge_routes',
        jsonb_build_object('left_route_id', distribution_u64(left_id),
                           'right_route_id', distribution_u64(right_id)),
        actor, ARRAY[merged], ARRAY[left_id, right_id]);
    RETURN NEXT merged;
END
$$;

-- Replaces a live route by a copy with another state or group, under the same id.
CREATE FUNCTION distribution_replace_route(
    written bigint, old distribution_routes, new_state smallint, new_group bigint
) RETURNS distribution_routes
LANGUAGE plpgsql AS $$
DECLARE
    replaced distribution_routes;
BEGIN
    UPDATE distribution_routes SET valid_to = written
    WHERE route_id = old.route_id AND valid_to IS NULL;
    INSERT INTO distribution_routes
        (route_id, start, "end", group_id, state, parent_route_id, valid_from)
    VALUES (old.route_id, old.start, old."end", new_group, new_state, old.parent_route_id, written)
    RETURNING * INTO replaced;
    RETURN replaced;
END
$$;

-- The cutover lifecycle: ACTIVE -> WRITE_FENCED -> MIGRATING_SOURCE | MIGRATING_TARGET -> ACTIVE;
-- a fence can be lifted (WRITE_FENCED -> ACTIVE) and a migration stepped back to the fence.
CREATE FUNCTION distribution_set_route_state(
    target_id bigint, new_state smallint, expected bigint, actor text
) RETURNS SETOF distribution_routes
LANGUAGE plpgsql AS $$
DECLARE
    written bigint := distribution_begin_write(expected);
    old distribution_routes := distribution_live_route(target_id);
    replaced distribution_routes;
BEGIN
    IF (old.state, new_state) NOT IN ((0, 1), (1, 0), (1, 2), (1, 3), (2, 0), (2, 1), (3, 0), (3, 1))
    THEN
        RAISE EXCEPTION 'catalog route % cannot go from state % to state %',
                distribution_u64(target_id), old.state, new_state
            USING ERRCODE = 'UD010';
    END IF;
    replaced := distribution_replace_route(written, old, new_state, old.group_id);
    PERFORM distribution_finish_write(written, 'set_route_state',
        jsonb_build_object('route_id', distribution_u64(target_id), 'from', old.state,
                           'to', new_state),
        actor, ARRAY[replaced], '{{}}');
    RETURN NEXT replaced;
END
$$;

CREATE FUNCTION distribution_move_route(
    target_id bigint, new_group bigint, expected bigint, actor text
) RETURNS SETOF distribution_routes
LANGUAGE plpgsql AS $$
DECLARE
    written bigint := distribution_begin_write(expected);
    old distribution_routes := distribution_live_route(target_id);
    replaced distribution_routes;
BEGIN
    IF old.state <> 1 THEN
        RAISE EXCEPTION 'catalog route % must be WRITE_FENCED to move (state %)',
                distribution_u64(target_id), old.state
            USING ERRCODE = 'UD011';
    END IF;
    replaced := distribution_replace_route(written, old, old.state, new_group);
    PERFORM distribution_finish_write(written, 'move_route',
        jsonb_build_object('route_id', distribution_u64(target_id),
                           'from_group', distribution_u64(old.group_id),
                           'to_group', distribution_u64(new_group)),
        actor, ARRAY[replaced], '{{}}');
    RETURN NEXT replaced;
END
$$;

CREATE TRIGGER distribution_meta_keep_row BEFORE DELETE ON distribution_meta
    FOR EACH ROW EXECUTE FUNCTION distribution_meta_keep();
CREATE TRIGGER distribution_meta_keep_table BEFORE TRUNCATE ON distribution_meta
    FOR EACH STATEMENT EXECUTE FUNCTION distribution_meta_keep();
CREATE TRIGGER distribution_routes_no_overlap_insert AFTER INSERT ON distribution_routes
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION distribution_routes_no_overlap();
CREATE TRIGGER distribution_routes_no_overlap_update AFTER UPDATE ON distribution_routes
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION distribution_routes_no_overlap();
"""

_DROP_FUNCTIONS = """
DROP FUNCTION distribution_move_route, distribution_set_route_state, distribution_replace_route,
    distribution_merge_routes, distribution_split_route, distribution_live_route,
    distribution_save_desired, distribution_finish_write, distribution_change_payload,
    distribution_allocate_route_ids, distribution_route_id_floor, distribution_begin_write,
    distribution_routes_no_overlap,
    distribution_meta_keep, distribution_encode_route, distribution_u64_bytes,
    distribution_u64_stored, distribution_u64;
"""


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
    op.create_index(
        "ix_distribution_routes_live_route_id",
        "distribution_routes",
        ["route_id"],
        unique=True,
        postgresql_where=sa.text("valid_to IS NULL"),
    )
    op.create_index(
        "ix_distribution_routes_live_start",
        "distribution_routes",
        ["start"],
        unique=True,
        postgresql_where=sa.text("valid_to IS NULL"),
    )
    op.create_index(
        "ix_distribution_routes_valid_from", "distribution_routes", ["valid_from"], unique=False
    )
    op.create_index(
        "ix_distribution_routes_valid_to",
        "distribution_routes",
        ["valid_to"],
        unique=False,
        postgresql_where=sa.text("valid_to IS NOT NULL"),
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
    _execute_script(_FUNCTIONS)


def _execute_script(script: str) -> None:
    # Straight to psycopg without parameters: several statements in one go, and the `%` of
    # RAISE formats left alone.
    op.get_bind().connection.driver_connection.execute(script)  # type: ignore[union-attr]


def downgrade() -> None:
    op.execute("DROP TRIGGER distribution_routes_no_overlap_update ON distribution_routes")
    op.execute("DROP TRIGGER distribution_routes_no_overlap_insert ON distribution_routes")
    op.execute("DROP TRIGGER distribution_meta_keep_table ON distribution_meta")
    op.execute("DROP TRIGGER distribution_meta_keep_row ON distribution_meta")
    _execute_script(_DROP_FUNCTIONS)
    op.drop_table("distribution_history")
    op.drop_index("ix_distribution_routes_valid_to", table_name="distribution_routes")
    op.drop_index("ix_distribution_routes_valid_from", table_name="distribution_routes")
    op.drop_index("ix_distribution_routes_live_start", table_name="distribution_routes")
    op.drop_index("ix_distribution_routes_live_route_id", table_name="distribution_routes")
    op.drop_table("distribution_routes")
    op.drop_table("distribution_meta")

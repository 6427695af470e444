CREATE OR REPLACE FUNCTION distribution_route_hash(
    route_id bigint, start bytea, "end" bytea, group_id bigint, state smallint,
    parent_route_id bigint
) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ('x' || left(md5(distribution_encode_route(route_id, start, "end", group_id, state, parent_route_id)), 16))::bit(64)::bigint;

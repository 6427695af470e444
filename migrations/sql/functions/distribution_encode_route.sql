-- The seed's route record (codec version 1), byte for byte.
CREATE OR REPLACE FUNCTION distribution_encode_route(
    route_id bigint, start bytea, "end" bytea, group_id bigint, state smallint,
    parent_route_id bigint
) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN '\x01'::bytea
    || distribution_u64_bytes(route_id) || distribution_u64_bytes(group_id)
    || set_byte('\x00'::bytea, 0, state) || distribution_u64_bytes(parent_route_id)
    || int8send(octet_length(start)::bigint) || start
    || CASE WHEN "end" IS NULL THEN '\x00'::bytea
            ELSE '\x01'::bytea || int8send(octet_length("end")::bigint) || "end" END;

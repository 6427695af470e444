-- The seed's big-endian u64 encoding of a stored value: flip the sign bit back.
CREATE OR REPLACE FUNCTION distribution_u64_bytes(stored bigint) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN set_byte(int8send(stored), 0, get_byte(int8send(stored), 0) # 128);

-- Allocates count route ids: never below the counter, never below any id ever used.
CREATE OR REPLACE FUNCTION distribution_allocate_route_ids(count integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    first bigint;
BEGIN
    SELECT greatest(m.next_route_id, distribution_route_id_floor()) INTO first
    FROM distribution_meta m;
    IF first > 9223372036854775807 - count THEN
        RAISE EXCEPTION 'catalog route id overflow' USING ERRCODE = 'UD003';
    END IF;
    UPDATE distribution_meta SET next_route_id = first + count;
    RETURN first;
END
$$;

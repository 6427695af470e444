-- XORs the hashes of the live rows a statement removed (old_routes) and added (new_routes) into
-- the digest. An UPDATE that closes a route removes its live row; an INSERT of a live row adds it.
CREATE OR REPLACE FUNCTION distribution_routes_digest() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    change bigint := 0;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        SELECT change # coalesce(bit_xor(distribution_route_hash(route_id, start, "end", group_id, state, parent_route_id)), 0)
        INTO change FROM old_routes WHERE valid_to IS NULL;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        SELECT change # coalesce(bit_xor(distribution_route_hash(route_id, start, "end", group_id, state, parent_route_id)), 0)
        INTO change FROM new_routes WHERE valid_to IS NULL;
    END IF;
    IF change <> 0 THEN
        UPDATE distribution_meta SET digest = digest # change;
    END IF;
    RETURN NULL;
END
$$;

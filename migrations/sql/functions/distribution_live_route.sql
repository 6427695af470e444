CREATE OR REPLACE FUNCTION distribution_live_route(wanted bigint) RETURNS distribution_routes
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

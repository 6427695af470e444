-- The floor of the route id counter: above every id ever used, so none is reused.
CREATE OR REPLACE FUNCTION distribution_route_id_floor() RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    highest bigint;
BEGIN
    SELECT max(route_id) INTO highest FROM distribution_routes;
    IF highest = 9223372036854775807 THEN
        RAISE EXCEPTION 'catalog route id overflow' USING ERRCODE = 'UD003';
    END IF;
    RETURN coalesce(highest, -9223372036854775808) + 1;
END
$$;

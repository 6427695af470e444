-- Moves a route through the cutover lifecycle (see distribution_change_route).
CREATE OR REPLACE FUNCTION distribution_set_route_state(
    target_id bigint, new_state smallint, expected bigint, actor text
) RETURNS SETOF distribution_routes LANGUAGE sql BEGIN ATOMIC
    SELECT * FROM distribution_change_route(target_id, new_state, NULL, expected, actor);
END;

-- Moves a WRITE_FENCED route to another group (see distribution_change_route).
CREATE OR REPLACE FUNCTION distribution_move_route(
    target_id bigint, new_group bigint, expected bigint, actor text
) RETURNS SETOF distribution_routes LANGUAGE sql BEGIN ATOMIC
    SELECT * FROM distribution_change_route(target_id, NULL, new_group, expected, actor);
END;

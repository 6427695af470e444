-- Replaces a live route by a copy with another state or group, under the same id.
CREATE OR REPLACE FUNCTION distribution_replace_route(
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

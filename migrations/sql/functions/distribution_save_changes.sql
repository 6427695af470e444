-- Applies a change as version `written`: the routes staged in the temporary table
-- distribution_desired are new or changed (their live rows close, new rows open), the routes
-- whose ids are in `removed` retire. The caller checked the digest: the catalog holds the routes
-- the change was computed against. `routes` is the size of the whole new catalog, for the audit.
CREATE OR REPLACE FUNCTION distribution_save_changes(
    written bigint, actor text, removed bigint[], routes bigint
) RETURNS integer[]
LANGUAGE plpgsql AS $$
DECLARE
    retired integer;
    opened integer;
BEGIN
    -- One array of ids, so the live-route-id index finds the rows (an OR would scan).
    UPDATE distribution_routes r SET valid_to = written
    WHERE r.valid_to IS NULL AND r.route_id = ANY (
        removed || ARRAY(SELECT d.route_id FROM pg_temp.distribution_desired d));
    GET DIAGNOSTICS retired = ROW_COUNT;
    INSERT INTO distribution_routes (route_id, start, "end", group_id, state, parent_route_id, valid_from)
    SELECT route_id, start, "end", group_id, state, parent_route_id, written FROM pg_temp.distribution_desired;
    GET DIAGNOSTICS opened = ROW_COUNT;
    UPDATE distribution_meta
    SET next_route_id = greatest(next_route_id, distribution_route_id_floor());
    PERFORM distribution_finish_write(written, 'save',
        jsonb_build_object('routes', routes, 'opened', opened, 'retired', retired),
        actor, NULL, NULL);
    RETURN ARRAY[opened, retired];
END
$$;

-- Applies the routes staged in the temporary table distribution_desired as version `written`:
-- closes the live rows that changed or went away, opens rows for the new and changed routes,
-- raises the id counter to the floor of every id ever used. Unchanged rows are not touched.
CREATE OR REPLACE FUNCTION distribution_save_desired(written bigint, actor text)
RETURNS integer[]
LANGUAGE plpgsql AS $$
DECLARE
    retired integer;
    opened integer;
BEGIN
    ANALYZE pg_temp.distribution_desired;
    UPDATE distribution_routes r SET valid_to = written
    WHERE r.valid_to IS NULL AND NOT EXISTS (
        SELECT 1 FROM pg_temp.distribution_desired d
        WHERE d.route_id = r.route_id AND d.start = r.start
          AND d."end" IS NOT DISTINCT FROM r."end" AND d.group_id = r.group_id
          AND d.state = r.state AND d.parent_route_id = r.parent_route_id);
    GET DIAGNOSTICS retired = ROW_COUNT;
    INSERT INTO distribution_routes
        (route_id, start, "end", group_id, state, parent_route_id, valid_from)
    SELECT d.route_id, d.start, d."end", d.group_id, d.state, d.parent_route_id, written
    FROM pg_temp.distribution_desired d
    WHERE NOT EXISTS (
        SELECT 1 FROM distribution_routes r
        WHERE r.valid_to IS NULL AND r.route_id = d.route_id);
    GET DIAGNOSTICS opened = ROW_COUNT;
    UPDATE distribution_meta
    SET next_route_id = greatest(next_route_id, distribution_route_id_floor());
    PERFORM distribution_finish_write(written, 'save',
        jsonb_build_object('routes', (SELECT count(*) FROM pg_temp.distribution_desired),
                           'opened', opened, 'retired', retired),
        actor, NULL, NULL);
    RETURN ARRAY[opened, retired];
END
$$;

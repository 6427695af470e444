-- The cutover lifecycle: ACTIVE -> WRITE_FENCED -> MIGRATING_SOURCE | MIGRATING_TARGET -> ACTIVE;
-- a fence can be lifted (WRITE_FENCED -> ACTIVE) and a migration stepped back to the fence.
CREATE OR REPLACE FUNCTION distribution_set_route_state(
    target_id bigint, new_state smallint, expected bigint, actor text
) RETURNS SETOF distribution_routes
LANGUAGE plpgsql AS $$
DECLARE
    written bigint := distribution_begin_write(expected);
    old distribution_routes := distribution_live_route(target_id);
    replaced distribution_routes;
BEGIN
    IF (old.state, new_state) NOT IN ((0, 1), (1, 0), (1, 2), (1, 3), (2, 0), (2, 1), (3, 0), (3, 1))
    THEN
        RAISE EXCEPTION 'catalog route % cannot go from state % to state %',
                distribution_u64(target_id), old.state, new_state
            USING ERRCODE = 'UD010';
    END IF;
    replaced := distribution_replace_route(written, old, new_state, old.group_id);
    PERFORM distribution_finish_write(written, 'set_route_state',
        jsonb_build_object('route_id', distribution_u64(target_id), 'from', old.state,
                           'to', new_state),
        actor, ARRAY[replaced], '{}');
    RETURN NEXT replaced;
END
$$;

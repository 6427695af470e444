-- Replaces a live route by a copy in another state (new_group NULL) or on another group
-- (new_state NULL), under the same id: what set_route_state and move_route do, as one write.
-- The cutover lifecycle: ACTIVE -> WRITE_FENCED -> MIGRATING_SOURCE | MIGRATING_TARGET -> ACTIVE;
-- a fence can be lifted (WRITE_FENCED -> ACTIVE) and a migration stepped back to the fence. Only
-- a WRITE_FENCED route moves.
CREATE OR REPLACE FUNCTION distribution_change_route(
    target_id bigint, new_state smallint, new_group bigint, expected bigint, actor text
) RETURNS SETOF distribution_routes  -- the route as it now is
LANGUAGE plpgsql AS $$
DECLARE
    written bigint := distribution_begin_write(expected);
    old distribution_routes := distribution_live_route(target_id);
    operation text;
    arguments jsonb;
    replaced distribution_routes;
BEGIN
    IF new_group IS NULL THEN
        IF (old.state, new_state) NOT IN ((0, 1), (1, 0), (1, 2), (1, 3), (2, 0), (2, 1), (3, 0), (3, 1))
        THEN
            RAISE EXCEPTION 'catalog route % cannot go from state % to state %',
                    distribution_u64(target_id), old.state, new_state
                USING ERRCODE = 'UD010';
        END IF;
        operation := 'set_route_state';
        arguments := jsonb_build_object('route_id', distribution_u64(target_id),
                                        'from', old.state, 'to', new_state);
    ELSE
        IF old.state <> 1 THEN
            RAISE EXCEPTION 'catalog route % must be WRITE_FENCED to move (state %)',
                    distribution_u64(target_id), old.state
                USING ERRCODE = 'UD011';
        END IF;
        operation := 'move_route';
        arguments := jsonb_build_object('route_id', distribution_u64(target_id),
                                        'from_group', distribution_u64(old.group_id),
                                        'to_group', distribution_u64(new_group));
    END IF;
    replaced := distribution_replace_route(written, old, coalesce(new_state, old.state),
                                           coalesce(new_group, old.group_id));
    PERFORM distribution_finish_write(written, operation, arguments, actor, ARRAY[replaced], '{}');
    RETURN NEXT replaced;
END
$$;

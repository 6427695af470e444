CREATE OR REPLACE FUNCTION distribution_move_route(
    target_id bigint, new_group bigint, expected bigint, actor text
) RETURNS SETOF distribution_routes
LANGUAGE plpgsql AS $$
DECLARE
    written bigint := distribution_begin_write(expected);
    old distribution_routes := distribution_live_route(target_id);
    replaced distribution_routes;
BEGIN
    IF old.state <> 1 THEN
        RAISE EXCEPTION 'catalog route % must be WRITE_FENCED to move (state %)',
                distribution_u64(target_id), old.state
            USING ERRCODE = 'UD011';
    END IF;
    replaced := distribution_replace_route(written, old, old.state, new_group);
    PERFORM distribution_finish_write(written, 'move_route',
        jsonb_build_object('route_id', distribution_u64(target_id),
                           'from_group', distribution_u64(old.group_id),
                           'to_group', distribution_u64(new_group)),
        actor, ARRAY[replaced], '{}');
    RETURN NEXT replaced;
END
$$;

CREATE OR REPLACE FUNCTION distribution_merge_routes(
    left_id bigint, right_id bigint, expected bigint, actor text
) RETURNS SETOF distribution_routes  -- the merged route
LANGUAGE plpgsql AS $$
DECLARE
    written bigint := distribution_begin_write(expected);
    left_route distribution_routes := distribution_live_route(left_id);
    right_route distribution_routes := distribution_live_route(right_id);
    merged distribution_routes;
BEGIN
    IF left_route."end" IS NULL OR left_route."end" <> right_route.start THEN
        RAISE EXCEPTION 'catalog routes % and % are not adjacent', distribution_u64(left_id),
                distribution_u64(right_id)
            USING ERRCODE = 'UD007';
    END IF;
    IF left_route.group_id <> right_route.group_id THEN
        RAISE EXCEPTION 'catalog routes % and % belong to groups % and %',
                distribution_u64(left_id), distribution_u64(right_id),
                distribution_u64(left_route.group_id), distribution_u64(right_route.group_id)
            USING ERRCODE = 'UD008';
    END IF;
    IF left_route.state <> 0 OR right_route.state <> 0 THEN
        RAISE EXCEPTION 'catalog routes % and % must both be ACTIVE to merge',
                distribution_u64(left_id), distribution_u64(right_id)
            USING ERRCODE = 'UD009';
    END IF;
    UPDATE distribution_routes SET valid_to = written
    WHERE route_id IN (left_id, right_id) AND valid_to IS NULL;
    INSERT INTO distribution_routes
        (route_id, start, "end", group_id, state, parent_route_id, valid_from)
    VALUES (distribution_allocate_route_ids(1), left_route.start, right_route."end",
            left_route.group_id, 0, left_id, written)
    RETURNING * INTO merged;
    PERFORM distribution_finish_write(written, 'merge_routes',
        jsonb_build_object('left_route_id', distribution_u64(left_id),
                           'right_route_id', distribution_u64(right_id)),
        actor, ARRAY[merged], ARRAY[left_id, right_id]);
    RETURN NEXT merged;
END
$$;

CREATE OR REPLACE FUNCTION distribution_split_route(
    parent_id bigint, split_key bytea, expected bigint, actor text
) RETURNS SETOF distribution_routes  -- the two children, left first
LANGUAGE plpgsql AS $$
DECLARE
    written bigint := distribution_begin_write(expected);
    parent distribution_routes := distribution_live_route(parent_id);
    left_id bigint;
    created distribution_routes[];
BEGIN
    IF split_key = parent.start OR split_key = parent."end" THEN
        RAISE EXCEPTION 'split key % is a boundary of catalog route %', split_key,
                distribution_u64(parent_id)
            USING ERRCODE = 'UD005';
    END IF;
    IF split_key < parent.start OR split_key > parent."end" THEN
        RAISE EXCEPTION 'split key % lies outside catalog route % [%, %)', split_key,
                distribution_u64(parent_id), parent.start, coalesce(parent."end"::text, 'unbounded')
            USING ERRCODE = 'UD006';
    END IF;
    left_id := distribution_allocate_route_ids(2);
    UPDATE distribution_routes SET valid_to = written
    WHERE route_id = parent_id AND valid_to IS NULL;
    WITH inserted (route) AS (
        INSERT INTO distribution_routes
            (route_id, start, "end", group_id, state, parent_route_id, valid_from)
        VALUES (left_id, parent.start, split_key, parent.group_id, parent.state, parent_id, written),
               (left_id + 1, split_key, parent."end", parent.group_id, parent.state, parent_id,
                written)
        RETURNING distribution_routes)
    SELECT array_agg(route ORDER BY (route).start) INTO created FROM inserted;
    PERFORM distribution_finish_write(written, 'split_route',
        jsonb_build_object('route_id', distribution_u64(parent_id),
                           'split_key', encode(split_key, 'hex')),
        actor, created, ARRAY[parent_id]);
    RETURN QUERY SELECT * FROM unnest(created);
END
$$;

-- The notification payload of the write of version `written`, the only place one is built: the
-- version in decimal, then, when the change is small enough, a JSON object with the previous
-- version, the upserted routes as base64 seed route records, the deleted route ids, and the
-- catalog's route digest after the write (a signed 64-bit number), so a watcher can check that
-- the change it applies leaves the routes the catalog holds. An operation passes the rows it
-- holds; a save passes NULLs, and the rows it opened and closed are read back from the table.
CREATE OR REPLACE FUNCTION distribution_change_payload(
    written bigint, upserts distribution_routes[], deletes bigint[]
) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    -- pg_notify refuses a payload of this many bytes or more.
    max_payload_bytes CONSTANT integer := 8000;
    -- A save that opened and closed more rows than this is announced by its version alone:
    -- reading its rows back would cost more than the snapshot read it spares the watchers.
    max_read_back_rows CONSTANT integer := 200;
    head text := distribution_u64(written)::text;
    payload text;
BEGIN
    IF upserts IS NULL THEN
        IF (SELECT count(*) FROM (
                SELECT 1 FROM distribution_routes WHERE valid_from = written
                UNION ALL
                SELECT 1 FROM distribution_routes WHERE valid_to = written
                LIMIT max_read_back_rows + 1) changed) > max_read_back_rows THEN
            RETURN head;
        END IF;
        SELECT coalesce(array_agg(r ORDER BY r.start), '{}') INTO upserts
        FROM distribution_routes r WHERE r.valid_from = written;
        SELECT coalesce(array_agg(c.route_id ORDER BY c.route_id), '{}') INTO deletes
        FROM distribution_routes c
        WHERE c.valid_to = written AND NOT EXISTS (
            SELECT 1 FROM distribution_routes u
            WHERE u.valid_from = written AND u.route_id = c.route_id);
    END IF;
    payload := head || ' ' || json_build_object(
        'previous', distribution_u64(written - 1),
        'upserts', (SELECT coalesce(json_agg(translate(encode(distribution_encode_route(
                        u.route_id, u.start, u."end", u.group_id, u.state, u.parent_route_id),
                        'base64'), E'\n', '') ORDER BY u.start), '[]')
                    FROM unnest(upserts) u),
        'deletes', (SELECT coalesce(json_agg(distribution_u64(d) ORDER BY d), '[]')
                    FROM unnest(deletes) d),
        'digest', (SELECT m.digest FROM distribution_meta m))::text;
    IF octet_length(payload) >= max_payload_bytes THEN
        RETURN head;
    END IF;
    RETURN payload;
END
$$;

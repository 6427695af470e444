-- The notification payload of a write: the new version in decimal, then, when the change is
-- known (upserts not NULL) and small enough to fit, a JSON object with the previous version, the
-- upserted routes as base64 seed route records, and the deleted route ids. Built from the rows
-- the write holds, not read back from the table.
CREATE OR REPLACE FUNCTION distribution_change_payload(
    written bigint, upserts distribution_routes[], deletes bigint[]
) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    head text := distribution_u64(written)::text;
    payload text;
BEGIN
    IF upserts IS NULL THEN
        RETURN head;
    END IF;
    payload := head || ' ' || json_build_object(
        'previous', distribution_u64(written - 1),
        'upserts', (SELECT coalesce(json_agg(translate(encode(distribution_encode_route(
                        u.route_id, u.start, u."end", u.group_id, u.state, u.parent_route_id),
                        'base64'), E'\n', '') ORDER BY u.start), '[]')
                    FROM unnest(upserts) u),
        'deletes', (SELECT coalesce(json_agg(distribution_u64(d) ORDER BY d), '[]')
                    FROM unnest(deletes) d))::text;
    IF octet_length(payload) >= 8000 THEN
        RETURN head;
    END IF;
    RETURN payload;
END
$$;

-- The end of every write: the audit entry, with the route digest the write left, then the
-- notification (delivered on commit only).
CREATE OR REPLACE FUNCTION distribution_finish_write(
    written bigint, operation text, arguments jsonb, actor text,
    upserts distribution_routes[], deletes bigint[]
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO distribution_history (version, operation, arguments, actor, next_route_id, digest)
    SELECT written, operation, arguments, actor, m.next_route_id, m.digest
    FROM distribution_meta m;
    PERFORM pg_notify('distribution_catalog',
                      distribution_change_payload(written, upserts, deletes));
END
$$;

-- The end of every write: the audit entry, with the route digest the write left and the request
-- the caller named it by (the transaction-local settings distribution.request_id and
-- distribution.request_digest, empty or unset for an unnamed write), then the notification
-- (delivered on commit only).
CREATE OR REPLACE FUNCTION distribution_finish_write(
    written bigint, operation text, arguments jsonb, actor text,
    upserts distribution_routes[], deletes bigint[]
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO distribution_history
        (version, operation, arguments, actor, next_route_id, digest, request_id, request_digest)
    SELECT written, operation, arguments, actor, m.next_route_id, m.digest,
           nullif(current_setting('distribution.request_id', true), ''),
           nullif(current_setting('distribution.request_digest', true), '')
    FROM distribution_meta m;
    PERFORM pg_notify('distribution_catalog',
                      distribution_change_payload(written, upserts, deletes));
END
$$;

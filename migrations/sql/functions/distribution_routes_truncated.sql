-- TRUNCATE has no transition table, and leaves no route: the digest of nothing.
CREATE OR REPLACE FUNCTION distribution_routes_truncated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE distribution_meta SET digest = 0;
    RETURN NULL;
END
$$;

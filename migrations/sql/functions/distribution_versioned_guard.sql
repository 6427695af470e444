-- Routes and history change only in a transaction that moved the catalog version through
-- distribution_begin_write, which the metadata row records (see distribution_meta_guard): a
-- change the version does not count is one no watcher would ever see. One indexed read per
-- statement.
CREATE OR REPLACE FUNCTION distribution_versioned_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM distribution_meta
                   WHERE write_xact_id = pg_current_xact_id()::text::bigint) THEN
        RAISE EXCEPTION '% on % in a transaction that has not moved the catalog version '
                '(distribution_begin_write)', TG_OP, TG_TABLE_NAME
            USING ERRCODE = 'UD012';
    END IF;
    RETURN NULL;
END
$$;

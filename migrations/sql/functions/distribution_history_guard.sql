-- Only pruning removes rows, and only those below the history floor, which prune_history raises
-- first: route rows retired at or below it, history entries of versions below it. A live route
-- deleted would leave a gap, a route row or an entry above the floor would make a version in the
-- window read back wrong; TRUNCATE removes everything.
CREATE OR REPLACE FUNCTION distribution_history_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    floor bigint;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        RAISE EXCEPTION 'TRUNCATE % would remove the catalog''s history: prune_history drops '
                'what the history window no longer needs', TG_TABLE_NAME
            USING ERRCODE = 'UD014';
    END IF;
    SELECT m.history_floor INTO floor FROM distribution_meta m;
    IF TG_TABLE_NAME = 'distribution_routes' THEN
        PERFORM 1 FROM removed_rows r WHERE r.valid_to IS NULL OR r.valid_to > floor;
    ELSE
        PERFORM 1 FROM removed_rows r WHERE r.version >= floor;
    END IF;
    IF FOUND THEN
        RAISE EXCEPTION 'DELETE on % of rows the catalog still needs: only rows below the history '
                'floor (version %) can go, and prune_history removes them',
                TG_TABLE_NAME, distribution_u64(floor)
            USING ERRCODE = 'UD014';
    END IF;
    RETURN NULL;
END
$$;

-- The compare-and-set every write starts with: the conditional UPDATE queues concurrent writers
-- on the metadata row, and a loser finds no row to update.
CREATE OR REPLACE FUNCTION distribution_begin_write(expected bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    written bigint;
    current bigint;
BEGIN
    UPDATE distribution_meta SET version = version + 1
    WHERE version = expected AND version < 9223372036854775807
    RETURNING version INTO written;
    IF FOUND THEN
        RETURN written;
    END IF;
    SELECT version INTO current FROM distribution_meta;
    IF current = expected THEN
        RAISE EXCEPTION 'catalog version overflow: version % is the last one',
                distribution_u64(current)
            USING ERRCODE = 'UD002';
    END IF;
    RAISE EXCEPTION 'catalog version mismatch: expected version %, the catalog is at version %',
            distribution_u64(expected), distribution_u64(current)
        USING ERRCODE = 'UD001';
END
$$;

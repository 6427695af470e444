-- The metadata row changes only as the library's writes change it. The version moves by exactly
-- one (distribution_begin_write), which records the moving transaction in write_xact_id: the
-- top-level transaction id, which a savepoint or a PL/pgSQL exception block shares, never reused
-- and never set by hand. The id counter and the digest move only in a transaction that moved the
-- version, the digest only through the routes' triggers (pg_trigger_depth() > 1: a trigger on
-- distribution_routes updating this row). The history floor only rises (prune_history).
CREATE OR REPLACE FUNCTION distribution_meta_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    current_xact bigint := pg_current_xact_id()::text::bigint;
BEGIN
    IF NEW.version IS DISTINCT FROM OLD.version THEN
        IF OLD.version = 9223372036854775807 OR NEW.version IS DISTINCT FROM OLD.version + 1 THEN
            RAISE EXCEPTION 'catalog version % cannot become %: every write moves it by exactly one',
                    distribution_u64(OLD.version), distribution_u64(NEW.version)
                USING ERRCODE = 'UD013';
        END IF;
        NEW.write_xact_id := current_xact;
    ELSIF NEW.write_xact_id IS DISTINCT FROM OLD.write_xact_id THEN
        RAISE EXCEPTION 'the catalog records the transaction that moved its version itself'
            USING ERRCODE = 'UD012';
    ELSIF (NEW.next_route_id, NEW.digest) IS DISTINCT FROM (OLD.next_route_id, OLD.digest)
          AND OLD.write_xact_id IS DISTINCT FROM current_xact THEN
        RAISE EXCEPTION 'the catalog metadata changed in a transaction that has not moved the '
                'catalog version (distribution_begin_write)'
            USING ERRCODE = 'UD012';
    END IF;
    IF NEW.digest IS DISTINCT FROM OLD.digest AND pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION 'the catalog digest is kept by the routes'' triggers, not set by hand'
            USING ERRCODE = 'UD015';
    END IF;
    IF NEW.history_floor < OLD.history_floor THEN
        RAISE EXCEPTION 'the catalog history floor cannot go down from version % to %',
                distribution_u64(OLD.history_floor), distribution_u64(NEW.history_floor)
            USING ERRCODE = 'UD014';
    END IF;
    RETURN NEW;
END
$$;

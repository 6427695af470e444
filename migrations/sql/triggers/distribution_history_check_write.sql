CREATE OR REPLACE TRIGGER distribution_history_check_write BEFORE INSERT OR UPDATE ON distribution_history
    FOR EACH STATEMENT EXECUTE FUNCTION distribution_versioned_guard();

CREATE OR REPLACE TRIGGER distribution_history_check_truncate BEFORE TRUNCATE ON distribution_history
    FOR EACH STATEMENT EXECUTE FUNCTION distribution_history_guard();

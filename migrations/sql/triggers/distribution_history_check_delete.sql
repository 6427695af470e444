CREATE OR REPLACE TRIGGER distribution_history_check_delete AFTER DELETE ON distribution_history
    REFERENCING OLD TABLE AS removed_rows
    FOR EACH STATEMENT EXECUTE FUNCTION distribution_history_guard();

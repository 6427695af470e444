CREATE OR REPLACE TRIGGER distribution_routes_check_truncate BEFORE TRUNCATE ON distribution_routes
    FOR EACH STATEMENT EXECUTE FUNCTION distribution_history_guard();

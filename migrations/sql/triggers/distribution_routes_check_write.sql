CREATE OR REPLACE TRIGGER distribution_routes_check_write BEFORE INSERT OR UPDATE ON distribution_routes
    FOR EACH STATEMENT EXECUTE FUNCTION distribution_versioned_guard();

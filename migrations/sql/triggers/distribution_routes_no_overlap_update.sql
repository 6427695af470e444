CREATE OR REPLACE TRIGGER distribution_routes_no_overlap_update AFTER UPDATE ON distribution_routes
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION distribution_routes_no_overlap();

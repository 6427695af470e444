-- PostgreSQL fires the triggers of one event in name order: this one, before the digest's,
-- refuses a removal before the digest's own update of the metadata row is refused for it.
CREATE OR REPLACE TRIGGER distribution_routes_check_delete AFTER DELETE ON distribution_routes
    REFERENCING OLD TABLE AS removed_rows
    FOR EACH STATEMENT EXECUTE FUNCTION distribution_history_guard();

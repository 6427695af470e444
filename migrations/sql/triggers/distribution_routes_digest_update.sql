CREATE OR REPLACE TRIGGER distribution_routes_digest_update AFTER UPDATE ON distribution_routes
REFERENCING OLD TABLE AS old_routes NEW TABLE AS new_routes
FOR EACH STATEMENT EXECUTE FUNCTION distribution_routes_digest();

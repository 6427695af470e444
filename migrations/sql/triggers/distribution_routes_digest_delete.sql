CREATE OR REPLACE TRIGGER distribution_routes_digest_delete AFTER DELETE ON distribution_routes
REFERENCING OLD TABLE AS old_routes
FOR EACH STATEMENT EXECUTE FUNCTION distribution_routes_digest();

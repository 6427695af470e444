CREATE OR REPLACE TRIGGER distribution_routes_digest_truncate AFTER TRUNCATE ON distribution_routes
FOR EACH STATEMENT EXECUTE FUNCTION distribution_routes_truncated();

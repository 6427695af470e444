CREATE OR REPLACE TRIGGER distribution_routes_digest_insert AFTER INSERT ON distribution_routes
REFERENCING NEW TABLE AS new_routes
FOR EACH STATEMENT EXECUTE FUNCTION distribution_routes_digest();

CREATE OR REPLACE TRIGGER distribution_meta_check_update BEFORE UPDATE ON distribution_meta
    FOR EACH ROW EXECUTE FUNCTION distribution_meta_guard();

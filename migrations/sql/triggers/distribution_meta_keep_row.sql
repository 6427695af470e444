CREATE OR REPLACE TRIGGER distribution_meta_keep_row BEFORE DELETE ON distribution_meta
    FOR EACH ROW EXECUTE FUNCTION distribution_meta_keep();

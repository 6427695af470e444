CREATE OR REPLACE TRIGGER distribution_meta_keep_table BEFORE TRUNCATE ON distribution_meta
    FOR EACH STATEMENT EXECUTE FUNCTION distribution_meta_keep();

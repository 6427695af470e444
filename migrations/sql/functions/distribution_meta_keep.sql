CREATE OR REPLACE FUNCTION distribution_meta_keep() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the catalog metadata row cannot be removed'
        USING ERRCODE = 'restrict_violation';
END
$$;

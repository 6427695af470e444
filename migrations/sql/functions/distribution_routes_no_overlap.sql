-- Each new live route must not overlap its two live neighbours. Checked per statement, through
-- the live-start index, so the cost per route is flat in the catalog size. The metadata row lock
-- serializes writers, so two concurrent writers cannot both miss each other's routes.
CREATE OR REPLACE FUNCTION distribution_routes_no_overlap() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    PERFORM 1 FROM distribution_meta FOR NO KEY UPDATE;
    SELECT n.route_id, n.start INTO bad
    FROM new_rows n
    WHERE n.valid_to IS NULL
      AND (EXISTS (
              SELECT 1 FROM (
                  SELECT p."end" FROM distribution_routes p
                  WHERE p.valid_to IS NULL AND p.start < n.start
                  ORDER BY p.start DESC LIMIT 1) prev
              WHERE prev."end" IS NULL OR prev."end" > n.start)
        OR EXISTS (
              SELECT 1 FROM (
                  SELECT s.start FROM distribution_routes s
                  WHERE s.valid_to IS NULL AND s.start > n.start
                  ORDER BY s.start LIMIT 1) nxt
              WHERE n."end" IS NULL OR n."end" > nxt.start))
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'catalog route % starting at % overlaps a live route',
                distribution_u64(bad.route_id), bad.start
            USING ERRCODE = 'exclusion_violation', CONSTRAINT = 'distribution_routes_no_overlap';
    END IF;
    RETURN NULL;
END
$$;

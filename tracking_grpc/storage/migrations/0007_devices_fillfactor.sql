-- Every commit rewrites the state row of each device it has fixes of. Pages of the
-- devices table are now filled to half, so that the new version fits beside the old
-- one: a heap-only update (HOT), which adds no primary-key entry and writes less
-- WAL, and whose old version the next visit to the page prunes. Rows written before
-- this migration keep their full pages until the table is rewritten (VACUUM FULL).
ALTER TABLE devices SET (fillfactor = 50);

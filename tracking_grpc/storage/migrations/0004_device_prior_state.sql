-- The device state as it was before the latest write advanced it. The writer locks
-- a device's row and advances its state in one upsert, capturing the values it
-- replaced here (they are the locked version's, also after waiting for another
-- writer), so that it can tell which fixes may repeat a stored seq, and set the
-- state back for the rare device whose fixes turned out to be duplicates.
ALTER TABLE devices ADD COLUMN prior_seq bigint, ADD COLUMN prior_time_ms bigint;

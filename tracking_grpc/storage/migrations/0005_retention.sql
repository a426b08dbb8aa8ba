-- Retention: drops the day partitions of fixes that end before a day (every
-- partition of an earlier UTC day, day = time_ms / 86400000) and returns the days
-- it dropped. Serialised with tracking_ensure_partition on the same advisory lock.
CREATE FUNCTION tracking_drop_partitions_before(day bigint) RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
DECLARE
    old bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('tracking_partitions'));
    FOR old IN
        SELECT d FROM tracking_partition_days() AS d WHERE d < day ORDER BY d
    LOOP
        EXECUTE format(
            'DROP TABLE %I',
            'fixes_' || to_char(to_timestamp(old * 86400) AT TIME ZONE 'UTC', 'YYYYMMDD')
        );
        RETURN NEXT old;
    END LOOP;
END;
$$;

-- Retention deletes geofence events by time across tenants.
CREATE INDEX IF NOT EXISTS geofence_events_by_time ON geofence_events (time_ms);
